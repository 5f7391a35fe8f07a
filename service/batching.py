"""Dynamic batching per model version.

Requests queue in a bounded FIFO; a worker task takes the first request, waits at most
``max_queue_delay`` for more rows, up to ``max_batch_size`` rows, and runs the backend in its own
thread so the event loop stays free. Requests with different ``tau`` share a batch: tau is a batched
input of the graph (one value per row).
A full queue rejects at once (:class:`~service.errors.Overloaded`, sent as 503 + ``Retry-After``);
a request that waits longer than its timeout fails with :class:`~service.errors.RequestTimeout`.
Every request ends with a result or an error: nothing hangs and nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from hjmodel import serving
from service.backends.base import Backend
from service.errors import BackendError, HJServeError, InternalError, Overloaded, RequestTimeout

__all__ = ["BatchResult", "BatcherClosed", "DynamicBatcher"]

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
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Batches requests for one backend. ``on_batch(rows, compute_s)`` and ``on_queue(size)`` feed
    metrics."""

    def __init__(self, backend: Backend, *, max_batch_size: int, max_queue_delay_s: float,
                 max_queue_size: int, retry_after_s: int = 1, name: str = "model",
                 on_batch: Callable[[int, float], None] | None = None,
                 on_queue: Callable[[int], None] | None = None):
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.retry_after_s = retry_after_s
        self._on_batch = on_batch or (lambda rows, seconds: None)
        self._on_queue = on_queue or (lambda size: None)
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False
        # the backend's thread flushes subnormals (hjmodel.serving.open_session says why and why
        # no certificate loosens); onnxruntime sets it only on the thread that opens a session
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hjserve-{name}",
                                            initializer=serving.flush_subnormals)

    @property
    def queue_size(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return len(self._pending)

    async def infer(self, rows: np.ndarray, tau: float, *, timeout_s: float,
                    wait_for_room: bool = False) -> BatchResult:
        """Run ``rows`` (float32 (n, d), n <= max_batch_size) through the batcher.

        With ``wait_for_room`` a full queue makes the caller wait (batch jobs) instead of failing.
        """
        deadline = time.monotonic() + timeout_s
        while len(self._pending) >= self.max_queue_size and not self._closing:
            if not wait_for_room:
                raise Overloaded(f"queue full ({self.max_queue_size} requests waiting); retry later",
                                 retry_after_s=self.retry_after_s)
            if time.monotonic() >= deadline:
                raise RequestTimeout(f"no room in the queue within {timeout_s:g} s")
            await asyncio.sleep(0.002)
        if self._closing:
            raise BatcherClosed()
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(), name="hjserve-batcher")
        job = _Job(rows, float(tau), loop.create_future())
        self._pending.append(job)
        self._on_queue(len(self._pending))
        self._wakeup.set()
        try:
            done, _ = await asyncio.wait({job.future}, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            job.future.cancel()
            raise
        if not done:
            job.future.cancel()
            raise RequestTimeout(f"no result within the request timeout of {timeout_s:g} s")
        return job.future.result()

    async def run_exclusive(self, fn, *args):
        """``fn(*args)`` on the backend's thread, between batches (the explanation graph: a per-request
        computation that must not run beside a batch on the same backend)."""
        if self._closing:
            raise BatcherClosed()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        """Stop taking requests, finish the queued ones, then release the backend."""
        self._closing = True
        if self._worker is not None:
            self._wakeup.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False)
        self.backend.close()

    # -- worker -----------------------------------------------------------------------------------

    def _take_batch(self) -> list[_Job]:
        """Pop the jobs of the next batch: FIFO, at most max_batch_size rows (a first job may be
        that large alone)."""
        batch: list[_Job] = []
        rows = 0
        while self._pending:
            job = self._pending[0]
            if job.future.done():   # timed out or cancelled while waiting
                self._pending.popleft()
                continue
            if batch and rows + len(job.rows) > self.max_batch_size:
                break
            batch.append(self._pending.popleft())
            rows += len(job.rows)
        return batch

    def _ready_rows(self) -> int:
        return sum(len(j.rows) for j in self._pending if not j.future.done())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._pending[0].enqueued
            while (not self._closing and self._ready_rows() < self.max_batch_size
                   and (remaining := first + self.max_queue_delay_s - time.perf_counter()) > 0):
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            batch = self._take_batch()
            self._on_queue(len(self._pending))
            if not batch:
                continue
            await self._execute(loop, batch)

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        start = time.perf_counter()
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([j.rows for j in batch])
        tau = np.concatenate([np.full(len(j.rows), j.tau) for j in batch])
        try:
            outputs = await loop.run_in_executor(self._executor, self.backend.infer, rows, tau)
            n = len(rows)
            for name, value in outputs.items():
                if np.ndim(value) == 0 or len(value) != n:
                    raise BackendError(
                        f"output '{name}' has shape {list(np.shape(value))}, expected {n} rows")
        except HJServeError as exc:
            error: HJServeError = exc
        except Exception as exc:  # a backend must not raise anything else; never kill the worker
            log.exception("backend failed")
            error = InternalError(f"inference failed: {type(exc).__name__}: {exc}")
        else:
            compute = time.perf_counter() - start
            self._on_batch(n, compute)
            offset = 0
            for job in batch:
                k = len(job.rows)
                if not job.future.done():
                    part = {name: value[offset:offset + k] for name, value in outputs.items()}
                    job.future.set_result(BatchResult(part, start - job.enqueued, compute, n))
                offset += k
            return
        for job in batch:
            if not job.future.done():
                job.future.set_exception(error)
