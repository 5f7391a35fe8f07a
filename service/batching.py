"""Dynamic batching per model version.

Each model version has one backend thread, and that thread is the batcher: requests are put on a
FIFO queue from the event loop; the thread takes the first, waits at most ``max_queue_delay`` for
more rows, up to ``max_batch_size`` rows, runs the backend, and hands the batch's results back to
the event loop in one callback, which splits them to their requests. The event loop never waits for
a graph, and a request costs one hand-off to the thread and one back (the thread blocks on the
queue itself: no batching task on the loop, no executor between them). Requests with different
``tau`` share a batch: tau is a batched input of the graph (one value per row). Requests that name
an explanation output carry their integrated-gradients baseline: the explanation graph runs on their
rows in the same turn, on the version's second thread while the serving graph runs on the first
(the graphs do not depend on each other), so explanations batch across requests like everything
else and a request asking for both waits for the longer graph, not for their sum.

Batch-job chunks are *bulk* jobs: the thread takes every online request already queued before the
next bulk chunk, so a running batch job delays an online request by the chunk computing when it
arrived (its queued chunks wait). The exception keeps batch jobs moving under online traffic that
never lets the queue empty: a bulk chunk that has waited :data:`BULK_MAX_WAIT_S` goes next anyway.

A full queue rejects at once (:class:`~service.errors.Overloaded`, sent as 503 + ``Retry-After``);
a request that waits longer than its timeout fails with :class:`~service.errors.RequestTimeout`, and
if it has not started by then it never runs. A shutdown (:meth:`DynamicBatcher.drain`) gives the
requests waiting a last moment: those still without a result then fail with
:class:`~service.errors.ShuttingDown` (503), before the server's grace ends and their connections
would be cut. Every request ends with a result or an error: nothing hangs and nothing is dropped
silently.

A request that is *alone* -- the only inference request the server has in flight (the caller says so;
:class:`service.dataplane.DataPlane` counts them), with no job of this version queued or computing and
at most :data:`INLINE_ROWS` rows -- runs its serving graph on the event loop itself when this
version's recent small calls for the same outputs took at most ``inline_max_s`` (a set not yet
measured goes to the thread, which measures it) and the batcher is not asked to wait for
more rows (``max_queue_delay_s`` 0, the default: a delay asks every request to wait for company);
its explanation graph, if it asked for one, runs on the version's explanation thread meanwhile, as
beside a batch. The hand-off to the thread and back (two thread wake-ups, ~100 us on a shared
two-core machine, a tenth of a batch-1 request) buys no overlap when nothing else is waiting, and
nothing else waits on the loop for longer than about one such call. The graph runs in the same
floating-point mode as on the thread (subnormals flushed for the call:
:func:`hjmodel.serving.subnormals_flushed`), so the answer is the same bits either way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from hjmodel import serving
from service.backends.base import Backend
from service.errors import BackendError, HJServeError, InternalError, Overloaded, RequestTimeout, ShuttingDown

__all__ = ["BULK_MAX_WAIT_S", "BatchResult", "BatcherClosed", "DynamicBatcher", "INLINE_ROWS"]

#: Longest a bulk job (a batch job's chunk) waits behind online requests before it goes next anyway
BULK_MAX_WAIT_S = 0.25

#: Most rows a request may have to run on the event loop when it is alone (the module docstring); the
#: calls of at most this many rows are the ones whose time decides whether it may
INLINE_ROWS = 16

#: Weight of the latest call in the running estimate of a small call's time
_CALL_S_WEIGHT = 0.25

#: Output sets whose small calls' time is kept (the least recently measured is forgotten first)
_CALL_S_SETS = 64

log = logging.getLogger(__name__)


class BatcherClosed(Exception):
    """The batcher was closed (its model version was replaced or unloaded); resolve the model again."""


@dataclass
class BatchResult:
    """One request's slice of a batch and how long it took."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    batch_rows: int


@dataclass
class _Job:
    rows: np.ndarray
    tau: float
    future: asyncio.Future
    baseline: np.ndarray | None = None   # (d,) float32: the rows also go through the explanation graph
    bulk: bool = False                   # a batch job's chunk: online requests queued before it go first
    outputs: frozenset[str] | None = None   # the serving outputs it needs (None: every one)
    enqueued: float = field(default_factory=time.perf_counter)


#: Put on the queue by :meth:`DynamicBatcher.close` after the last request: the thread finishes
#: every request before it (online and bulk), then exits.
_STOP = object()


class DynamicBatcher:
    """Batches requests for one backend on the backend's own thread. ``on_batch(rows, compute_s)``
    and ``on_queue(size)`` feed metrics (called on the event loop)."""

    def __init__(self, backend: Backend, *, max_batch_size: int, max_queue_delay_s: float,
                 max_queue_size: int, retry_after_s: int = 1, name: str = "model",
                 on_batch: Callable[[int, float], None] | None = None,
                 on_queue: Callable[[int], None] | None = None, explain_rows: int | None = None,
                 inline_max_s: float = 0.0):
        self.backend = backend
        self.max_batch_size = max_batch_size
        #: rows per explanation-graph call (default max_batch_size; the repository sets the model's
        #: own, :func:`hjmodel.serving.explain_rows_per_call`)
        self.explain_rows = max(1, explain_rows or max_batch_size)
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.retry_after_s = retry_after_s
        self.name = name
        self._on_batch = on_batch or (lambda rows, seconds: None)
        self._on_queue = on_queue or (lambda size: None)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # the thread's: jobs it has taken off the queue and not yet run, in arrival order per kind
        self._online: collections.deque[_Job] = collections.deque()
        self._bulk: collections.deque[_Job] = collections.deque()
        self._stop_seen = False
        self._thread: threading.Thread | None = None
        #: the explanation's thread (started with the backend's): a batch's explanation graph runs
        #: there while the serving graph runs on the backend's thread
        self._explainer: ThreadPoolExecutor | None = None
        self._stopped: asyncio.Future | None = None
        self._closing = False
        #: a request alone runs on the event loop when small calls took at most this (0: never)
        self.inline_max_s = inline_max_s
        #: jobs put on the queue and not yet settled (delivered, or dropped by the thread); the
        #: event loop's count: the thread has nothing to do when it is 0
        self._pending = 0
        #: running estimate of a call of at most INLINE_ROWS rows per set of outputs asked for (each
        #: set runs a graph of its own: a cheap one's time says nothing of the whole graph's), seconds
        self._call_s: dict[frozenset[str] | None, float] = {}
        #: the futures of the requests waiting for a result (:meth:`drain` fails them)
        self._waiting: set[asyncio.Future] = set()
        #: when a shutdown fails the requests still waiting (``time.monotonic()``; None: never)
        self._shed_at: float | None = None

    @property
    def queue_size(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return self._queue.qsize() + len(self._online) + len(self._bulk)

    async def infer(self, rows: np.ndarray, tau: float, *, timeout_s: float, wait_for_room: bool = False,
                    baseline: np.ndarray | None = None, bulk: bool = False,
                    outputs: frozenset[str] | None = None, alone: bool = False,
                    deadline: float | None = None) -> BatchResult:
        """Run ``rows`` (float32 (n, d), n <= max_batch_size) through the batcher.

        ``outputs``: the serving outputs the caller needs (None: every one); a batch asks the backend
        for those its requests need together, and a request's result holds at least its own.

        With ``wait_for_room`` a full queue makes the caller wait (batch jobs) instead of failing.
        With ``baseline`` ((d,) float32) the result also holds the explanation outputs of ``rows``
        (``Backend.explain`` from that baseline), computed in the same turn, beside the serving graph.
        ``bulk`` (a batch job's chunk): online requests queued before it run first (the module says
        how long it may wait for them). ``alone``: no other inference request is in flight in the
        server; the rows may then run on the event loop (the module docstring says when).
        ``deadline`` (``time.monotonic()``): when the result is due, instead of ``timeout_s`` from now
        (one batch of a request whose timeout counts from the request's start; ``timeout_s`` still
        names the timeout in the error).
        """
        deadline = time.monotonic() + timeout_s if deadline is None else deadline
        while self.queue_size >= self.max_queue_size and not self._closing:
            self._check_shed()
            if not wait_for_room:
                raise Overloaded(f"queue full ({self.max_queue_size} requests waiting); retry later",
                                 retry_after_s=self.retry_after_s)
            if time.monotonic() >= deadline:
                raise RequestTimeout(f"no room in the queue within {timeout_s:g} s")
            await asyncio.sleep(0.002)
        if self._closing:
            raise BatcherClosed()
        self._check_shed()
        if alone and not bulk and self._inline(len(rows), outputs):
            return await self._run_inline(rows, float(tau), outputs, baseline, deadline, timeout_s)
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._start(loop)
        job = _Job(rows, float(tau), loop.create_future(), baseline, bulk, outputs)
        self._pending += 1
        self._queue.put(job)
        self._on_queue(self.queue_size)
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), _expire, job.future, timeout_s)
        self._waiting.add(job.future)
        try:
            return await job.future   # a cancelled caller cancels the job: the thread skips it
        finally:
            timer.cancel()
            self._waiting.discard(job.future)

    def drain(self, left_s: float) -> None:
        """A shutdown began: the requests still waiting ``left_s`` seconds from now (their results
        not delivered), and any asked of this batcher after that, fail with :class:`ShuttingDown`
        then; one that has not started never runs (the thread skips a settled job). On the event
        loop; a second call changes nothing."""
        if self._shed_at is None:
            self._shed_at = time.monotonic() + left_s
            asyncio.get_running_loop().call_later(max(0.0, left_s), self._shed)

    def _shed(self) -> None:
        for future in self._waiting:
            if not future.done():
                future.set_exception(_shutting_down())

    def _check_shed(self) -> None:
        if self._shed_at is not None and time.monotonic() >= self._shed_at:
            raise _shutting_down()

    def _inline(self, rows: int, outputs: frozenset[str] | None) -> bool:
        """Whether a request of ``rows`` rows for ``outputs`` that is alone may run on the event loop
        now: only once a call for the same outputs has been measured (on the thread first)."""
        if self.inline_max_s <= 0 or self.max_queue_delay_s != 0 or self._pending or rows > INLINE_ROWS:
            return False
        estimate = self._call_s.get(outputs)
        return estimate is not None and estimate <= self.inline_max_s

    async def _run_inline(self, rows: np.ndarray, tau: float, outputs: frozenset[str] | None,
                          baseline: np.ndarray | None, deadline: float, timeout_s: float) -> BatchResult:
        """On the event loop: ``rows`` through ``backend.infer`` as the thread would run them alone
        (the same inputs, floating-point mode and checks), as a batch of their own; with a
        ``baseline``, their explanation graph on the version's explanation thread meanwhile, as
        beside the thread's batch (:meth:`_explain`), awaited after the serving graph."""
        start = time.perf_counter()
        taus = np.full(len(rows), tau)
        pending = None
        if baseline is not None:
            if self._thread is None:
                self._start(asyncio.get_running_loop())
            pending = self._explainer.submit(self._explain, [_Job(rows, tau, None, baseline)], [0], rows, taus)
        with serving.subnormals_flushed():
            served = time.perf_counter()
            result = _guarded(self._infer(pending), "inference", len(rows), rows, taus, outputs)
            served = time.perf_counter() - served
        self._timed(len(rows), outputs, served)
        if isinstance(result, HJServeError):
            raise result
        if pending is not None:
            try:   # often done already: then no task and no turn of the loop to wait for it
                explained = pending.result() if pending.done() else await asyncio.wait_for(
                    asyncio.wrap_future(pending), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RequestTimeout(f"no result within the request timeout of {timeout_s:g} s") from None
            except Exception as exc:   # the gathering around the calls: never expected
                log.exception("explanation failed")
                raise InternalError(f"the explanation failed: {type(exc).__name__}: {exc}") from None
            if isinstance(explained, HJServeError):
                raise explained
            result = {**result, **explained}
        compute = time.perf_counter() - start
        self._on_batch(len(rows), compute)
        if time.monotonic() > deadline:   # as the thread's request would have: its answer comes too late
            raise RequestTimeout(f"no result within the request timeout of {timeout_s:g} s")
        return BatchResult(result, 0.0, compute, len(rows))

    def _timed(self, rows: int, outputs: frozenset[str] | None, seconds: float) -> None:
        """Fold a call's time into the estimate of a small call (at most INLINE_ROWS rows) for
        ``outputs``; at most _CALL_S_SETS sets are kept (a client can name many)."""
        if rows > INLINE_ROWS:
            return
        last = self._call_s.pop(outputs, None)          # re-inserted last: the dict's order is recency
        if last is None and len(self._call_s) >= _CALL_S_SETS:
            del self._call_s[next(iter(self._call_s))]
        self._call_s[outputs] = seconds if last is None else last + _CALL_S_WEIGHT * (seconds - last)

    def _settled(self, jobs: int) -> None:
        """On the event loop: ``jobs`` of the queue's are done with (delivered or dropped)."""
        self._pending -= jobs

    async def close(self) -> None:
        """Stop taking requests, finish the queued ones, then release the backend."""
        self._closing = True
        if self._thread is not None:
            self._queue.put(_STOP)
            await self._stopped
        self.backend.close()

    # -- the backend's thread ---------------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stopped = loop.create_future()
        self._explainer = ThreadPoolExecutor(1, thread_name_prefix=f"hjserve-{self.name}-explain",
                                             initializer=serving.flush_subnormals)
        self._thread = threading.Thread(target=self._serve, args=(loop,), name=f"hjserve-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        """The thread: batches until :data:`_STOP`. It flushes subnormals first
        (:func:`hjmodel.serving.open_session` says why and why no certificate loosens; onnxruntime
        sets the mode only on the thread that opens a session)."""
        serving.flush_subnormals()
        # RuntimeError: the event loop closed under the thread (a process exiting without close())
        with contextlib.suppress(RuntimeError):
            try:
                while (batch := self._take()) is not None:
                    if batch:
                        self._run(loop, batch)
            finally:
                self._explainer.shutdown(wait=True)
                loop.call_soon_threadsafe(_settle, self._stopped)

    def _take(self) -> list[_Job] | None:
        """The jobs of the next batch, at most ``max_batch_size`` rows (a first job may be that large
        alone), waiting at most ``max_queue_delay_s`` after the first for more; online jobs first,
        each kind FIFO (:meth:`_next`); jobs already done (timed out or cancelled) are dropped. None
        once every job before :data:`_STOP` has run."""
        batch: list[_Job] = []
        rows, deadline = 0, 0.0
        while True:
            job = self._next()
            if job is None:
                if self._stop_seen:
                    return batch or None
                if batch and not self._wait(deadline - time.perf_counter()):
                    return batch
                if not batch:
                    self._wait(None)
                continue
            if job.future.done():   # timed out or cancelled while queued: never runs
                self._loop.call_soon_threadsafe(self._settled, 1)
                continue
            if batch and rows + len(job.rows) > self.max_batch_size:
                (self._bulk if job.bulk else self._online).appendleft(job)   # the next batch's first
                return batch
            if not batch:
                deadline = job.enqueued + self.max_queue_delay_s
            batch.append(job)
            rows += len(job.rows)
            if rows >= self.max_batch_size:
                return batch

    def _next(self) -> _Job | None:
        """The next job to run among those queued now (None when there is none): the oldest online
        job, unless the oldest bulk job has waited :data:`BULK_MAX_WAIT_S` or there is no online one."""
        while True:   # sort what the queue holds now into the thread's two lists
            try:
                self._sort(self._queue.get_nowait())
            except queue.Empty:
                break
        if self._bulk and (not self._online or time.perf_counter() - self._bulk[0].enqueued >= BULK_MAX_WAIT_S):
            return self._bulk.popleft()
        return self._online.popleft() if self._online else None

    def _wait(self, timeout: float | None) -> bool:
        """Block until the queue holds something (sorted in) or ``timeout`` seconds pass (False)."""
        try:
            item = self._queue.get() if timeout is None else self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return False
        self._sort(item)
        return True

    def _sort(self, item: object) -> None:
        if item is _STOP:
            self._stop_seen = True
        else:
            (self._bulk if item.bulk else self._online).append(item)

    def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        """On the backend's thread: the batch through ``backend.infer`` (the outputs its jobs need
        together) while the rows of the jobs
        that carry a baseline go through ``backend.explain`` on the explanation's thread (the two
        graphs do not depend on each other: a request asking for both waits for the longer, not for
        their sum); both results (or errors) go to the event loop in one callback. An explanation's
        failure reaches only the requests that asked for one."""
        start = time.perf_counter()
        offsets = _offsets(batch)
        try:
            rows = batch[0].rows if len(batch) == 1 else np.concatenate([j.rows for j in batch])
            tau = np.concatenate([np.full(len(j.rows), j.tau) for j in batch])
        except Exception as exc:   # rows are validated against one version: never expected
            log.exception("batch assembly failed")
            loop.call_soon_threadsafe(self._deliver, batch, offsets, InternalError(f"batching failed: {exc}"), {},
                                      start, 0.0)
            return
        pending = (self._explainer.submit(self._explain, batch, offsets, rows, tau)
                   if any(j.baseline is not None for j in batch) else None)
        wanted = _wanted(batch)
        served = time.perf_counter()
        outputs = _guarded(self._infer(pending), "inference", len(rows), rows, tau, wanted)
        served = time.perf_counter() - served
        explained: dict[str, np.ndarray] | HJServeError = {}
        if pending is not None:
            try:
                explained = pending.result()
            except Exception as exc:   # the gathering around the calls: never expected
                log.exception("explanation failed")
                explained = InternalError(f"the explanation failed: {type(exc).__name__}: {exc}")
        loop.call_soon_threadsafe(self._deliver, batch, offsets, outputs, explained, start,
                                  time.perf_counter() - start, served)

    def _infer(self, explaining: Future | None) -> Callable[..., dict[str, np.ndarray]]:
        """``backend.infer``, told when an explanation graph runs beside it (``beside``: a backend
        whose small calls would hold Python's lock runs this one so that the two overlap)."""
        return self.backend.infer if explaining is None else functools.partial(self.backend.infer, beside=True)

    def _explain(self, batch: list[_Job], offsets: list[int], rows: np.ndarray,
                 tau: np.ndarray) -> dict[str, np.ndarray] | HJServeError:
        """The explanation outputs of the rows of the jobs that carry a baseline (one row per
        explained row, in job order), at most ``explain_rows`` rows a call: the explanation
        graph's memory grows with its rows (the integrated gradients hold a whole path of points
        per row)."""
        explained = [(offset, job) for offset, job in zip(offsets, batch) if job.baseline is not None]
        if len(explained) == len(batch):
            x, t = rows, tau
        else:
            x = np.concatenate([rows[o:o + len(j.rows)] for o, j in explained])
            t = np.concatenate([tau[o:o + len(j.rows)] for o, j in explained])
        base = np.concatenate([np.broadcast_to(j.baseline, j.rows.shape) for _, j in explained])
        size, parts = self.explain_rows, []
        for i in range(0, len(x), size):
            part = _guarded(self.backend.explain, "the explanation", len(x[i:i + size]), x[i:i + size],
                            t[i:i + size], base[i:i + size])
            if isinstance(part, HJServeError):
                return part
            parts.append(part)
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _deliver(self, batch: list[_Job], offsets: list[int], outputs: dict[str, np.ndarray] | HJServeError,
                 explained: dict[str, np.ndarray] | HJServeError, start: float, compute: float,
                 served_s: float = 0.0) -> None:
        """On the event loop: each job's slice of the batch's outputs (and of the explanation outputs
        when it asked for them), or the error that kept it from them. ``served_s``: the serving
        graph's time alone (the explanation's, run beside it, left out)."""
        self._settled(len(batch))
        self._on_queue(self.queue_size)
        if isinstance(outputs, HJServeError):
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(outputs)
            return
        n = offsets[-1] + len(batch[-1].rows)
        self._timed(n, _wanted(batch), served_s)
        self._on_batch(n, compute)
        done = 0   # explained rows before this job
        for offset, job in zip(offsets, batch):
            k = len(job.rows)
            if job.future.done():
                done += k if job.baseline is not None else 0
                continue
            if job.baseline is not None and isinstance(explained, HJServeError):
                job.future.set_exception(explained)
                continue
            part = outputs if k == n else {name: value[offset:offset + k] for name, value in outputs.items()}
            if job.baseline is not None:
                part = {**part, **{name: value[done:done + k] for name, value in explained.items()}}
                done += k
            job.future.set_result(BatchResult(part, start - job.enqueued, compute, n))


def _wanted(batch: list[_Job]) -> frozenset[str] | None:
    """The serving outputs a batch's jobs need together (None: every one)."""
    return None if any(j.outputs is None for j in batch) else frozenset().union(*(j.outputs for j in batch))


def _guarded(fn: Callable, what: str, n: int, *args) -> dict[str, np.ndarray] | HJServeError:
    """``fn(*args)``'s outputs, checked to have ``n`` rows each, or the error to answer instead: a
    backend raises only :class:`HJServeError`; anything else is a bug, logged, and the thread lives on."""
    try:
        outputs = fn(*args)
        for name, value in outputs.items():
            if np.ndim(value) == 0 or len(value) != n:
                raise BackendError(f"output '{name}' has shape {list(np.shape(value))}, expected {n} rows")
        return outputs
    except HJServeError as exc:
        return exc
    except Exception as exc:
        log.exception("backend failed")
        return InternalError(f"{what} failed: {type(exc).__name__}: {exc}")


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("the server is shutting down and this request got no result before its grace ran "
                        "out; send it again")


def _expire(future: asyncio.Future, timeout_s: float) -> None:
    if not future.done():
        future.set_exception(RequestTimeout(f"no result within the request timeout of {timeout_s:g} s"))


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _offsets(batch: list[_Job]) -> list[int]:
    """Each job's first row in the batch."""
    offsets, row = [], 0
    for job in batch:
        offsets.append(row)
        row += len(job.rows)
    return offsets
