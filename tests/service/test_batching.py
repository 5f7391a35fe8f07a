"""The dynamic batcher with a fake backend."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from hjmodel import serving
from service.batching import INLINE_ROWS, BatcherClosed, DynamicBatcher
from service.errors import BackendError, InternalError, Overloaded, RequestTimeout, ShuttingDown


class FakeBackend:
    """Returns ``2 * input`` and each row's tau; records every batch it sees."""

    name = "fake"
    device = "cpu"
    platform = "fake"

    def __init__(self, delay: float = 0.0, fail: Exception | None = None):
        self.delay = delay
        self.fail = fail
        self.batches: list[tuple[int, float]] = []
        self.asked: list[frozenset[str] | None] = []   # the outputs each run was asked for
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()   # set once a batch has reached infer
        self.closed = False

    def infer(self, input, tau, outputs=None, beside=False):
        self.asked.append(outputs)
        self.entered.set()
        self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.batches.append((len(input), tuple(np.unique(tau).tolist())))
        return {"double": input * 2, "tau": np.asarray(tau)}

    def close(self):
        self.closed = True


def _batcher(backend, **kw):
    opts = {"max_batch_size": 8, "max_queue_delay_s": 0.02, "max_queue_size": 100}
    opts.update(kw)
    return DynamicBatcher(backend, **opts)


def _rows(n, start=0):
    return np.arange(start, start + n * 2, dtype=np.float32).reshape(n, 2)


def test_requests_are_batched_and_split_back_in_order():
    backend = FakeBackend()

    async def main():
        b = _batcher(backend)
        results = await asyncio.gather(*(b.infer(_rows(2, 10 * i), 0.5, timeout_s=5) for i in range(4)))
        await b.close()
        return results

    results = asyncio.run(main())
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs["double"], 2 * _rows(2, 10 * i))
        assert r.batch_rows == 8
    assert backend.batches == [(8, (0.5,))] and backend.closed


@pytest.mark.parametrize("wants, asked", [
    ([frozenset({"a"}), frozenset({"b", "c"}), frozenset({"a"})], frozenset({"a", "b", "c"})),
    ([frozenset({"a"}), None], None),             # one request wants every output: the batch does
])
def test_a_batch_asks_the_backend_for_the_outputs_its_requests_need_together(wants, asked):
    backend = FakeBackend()
    backend.gate.clear()

    async def main():
        b = _batcher(backend, max_queue_delay_s=0.0)
        first = asyncio.ensure_future(b.infer(_rows(1), 0.5, timeout_s=5, outputs=frozenset({"z"})))
        while not backend.entered.is_set():   # the first batch holds the thread; the rest queue up
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(b.infer(_rows(1), 0.5, timeout_s=5, outputs=w)) for w in wants]
        await asyncio.sleep(0.05)
        backend.gate.set()
        await asyncio.gather(first, *rest)
        await b.close()

    asyncio.run(main())
    assert backend.asked == [frozenset({"z"}), asked] and [n for n, _ in backend.batches] == [1, len(wants)]


def test_requests_with_different_tau_share_batches_and_respect_max_batch_size():
    """tau is a batched graph input: each row carries its own, so requests are not grouped by it."""
    backend = FakeBackend()

    async def main():
        b = _batcher(backend, max_batch_size=4)
        coros = [b.infer(_rows(1), tau, timeout_s=5) for tau in (0.1, 0.2, 0.1, 0.2, 0.1, 0.1, 0.1)]
        results = await asyncio.gather(*coros)
        await b.close()
        return results

    results = asyncio.run(main())
    assert [float(r.outputs["tau"][0]) for r in results] == [0.1, 0.2, 0.1, 0.2, 0.1, 0.1, 0.1]
    assert all(n <= 4 for n, _ in backend.batches)
    assert sum(n for n, _ in backend.batches) == 7
    assert any(taus == (0.1, 0.2) for _, taus in backend.batches)   # mixed in one backend run


def test_full_queue_rejects_at_once_with_retry_after():
    backend = FakeBackend()
    backend.gate.clear()

    async def main():
        b = _batcher(backend, max_batch_size=1, max_queue_size=2, max_queue_delay_s=0, retry_after_s=3)
        running = asyncio.ensure_future(b.infer(_rows(1), 0.1, timeout_s=5))
        await asyncio.sleep(0.05)  # the first job is now inside the (blocked) backend
        queued = [asyncio.ensure_future(b.infer(_rows(1), 0.1, timeout_s=5)) for _ in range(2)]
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        with pytest.raises(Overloaded) as info:
            await b.infer(_rows(1), 0.1, timeout_s=5)
        assert time.perf_counter() - t0 < 0.05
        assert info.value.retry_after_s == 3
        backend.gate.set()
        await asyncio.gather(running, *queued)
        await b.close()

    asyncio.run(main())


def test_timeout_while_waiting_and_no_hang():
    backend = FakeBackend()
    backend.gate.clear()

    async def main():
        b = _batcher(backend, max_batch_size=1, max_queue_delay_s=0)
        first = asyncio.ensure_future(b.infer(_rows(1), 0.1, timeout_s=0.2))
        second = asyncio.ensure_future(b.infer(_rows(1), 0.1, timeout_s=0.2))
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(r, RequestTimeout) for r in results)
        backend.gate.set()
        ok = await b.infer(_rows(1), 0.1, timeout_s=5)  # the worker survives
        await b.close()
        return ok

    assert asyncio.run(main()).outputs["double"].shape == (1, 2)
    assert len(backend.batches) == 2  # the timed-out second job never ran


@pytest.mark.parametrize(("fail", "error"), [(BackendError("boom"), BackendError),
                                             (ValueError("bug"), InternalError)])
def test_backend_errors_reach_every_request_of_the_batch(fail, error):
    async def main():
        b = _batcher(FakeBackend(fail=fail))
        results = await asyncio.gather(*(b.infer(_rows(1), 0.1, timeout_s=5) for _ in range(3)),
                                       return_exceptions=True)
        await b.close()
        return results

    assert all(isinstance(r, error) for r in asyncio.run(main()))


def test_close_drains_the_queue_then_refuses():
    backend = FakeBackend(delay=0.01)

    async def main():
        b = _batcher(backend, max_batch_size=1, max_queue_delay_s=0)
        jobs = [asyncio.ensure_future(b.infer(_rows(1), 0.1, timeout_s=5)) for _ in range(5)]
        await asyncio.sleep(0)
        await b.close()
        done = await asyncio.gather(*jobs)
        with pytest.raises(BatcherClosed):
            await b.infer(_rows(1), 0.1, timeout_s=5)
        return done

    assert len(asyncio.run(main())) == 5


def test_a_drain_fails_the_requests_still_waiting_when_it_runs_out_and_runs_none_of_them():
    """Six one-row requests at 0.1 s each behind one another; a drain of 0.25 s: the ones answered by
    then keep their answers, the rest fail with ShuttingDown at 0.25 s -- the queued ones never
    run -- and so does any request after that (the requests' own 5 s timeouts would come too late:
    the server's grace ends first, and with it their connections)."""
    backend = FakeBackend(delay=0.1)

    async def main():
        b = _batcher(backend, max_batch_size=1, max_queue_delay_s=0)
        jobs = [asyncio.ensure_future(b.infer(_rows(1), 0.1, timeout_s=5)) for _ in range(6)]
        await asyncio.sleep(0)
        start = time.monotonic()
        b.drain(0.25)
        b.drain(10.0)   # a second signal changes nothing
        done = await asyncio.gather(*jobs, return_exceptions=True)
        shed_after = time.monotonic() - start
        with pytest.raises(ShuttingDown):
            await b.infer(_rows(1), 0.1, timeout_s=5)
        await b.close()
        return done, shed_after

    done, shed_after = asyncio.run(main())
    answered = [r for r in done if not isinstance(r, BaseException)]
    assert 1 <= len(answered) <= 3 and all(isinstance(r, ShuttingDown) for r in done[len(answered):])
    assert shed_after < 1.0
    assert len(backend.batches) <= len(answered) + 1   # the one computing at 0.25 s; no queued one ran


def test_wait_for_room_waits_instead_of_failing():
    backend = FakeBackend(delay=0.005)

    async def main():
        b = _batcher(backend, max_batch_size=1, max_queue_size=1, max_queue_delay_s=0)
        results = await asyncio.gather(*(b.infer(_rows(1), 0.1, timeout_s=5, wait_for_room=True)
                                         for _ in range(10)))
        await b.close()
        return results

    assert len(asyncio.run(main())) == 10


def test_the_backend_thread_flushes_subnormals():
    """The backend's thread runs with subnormals flushed to zero (hjmodel.serving.open_session:
    onnxruntime's far-from-data speed), whatever the thread that started it: the event loop's thread
    here keeps IEEE subnormals."""
    import torch

    torch.set_flush_denormal(False)                 # this thread: the processor's default
    product = np.float64(1e-300) * np.float64(1e-10)
    assert product == 1e-310                        # a subnormal, kept here

    class Tiny(FakeBackend):
        def infer(self, input, tau, outputs=None, beside=False):
            return {"product": np.full(len(input), np.float64(1e-300) * np.float64(1e-10))}

    async def main():
        batcher = _batcher(Tiny())
        try:
            return await batcher.infer(_rows(1), 0.1, timeout_s=5)
        finally:
            await batcher.close()

    assert asyncio.run(main()).outputs["product"][0] == 0.0


class ExplainingBackend(FakeBackend):
    """FakeBackend with an explanation graph: ``gap = input - baseline`` and each row's tau; records
    the rows of every explanation call and the thread of every call."""

    def __init__(self, explain_rows: int | None = None, **kw):
        super().__init__(**kw)
        self.explained: list[int] = []
        self.threads: dict[str, set[int]] = {"infer": set(), "explain": set()}
        self.explain_rows = explain_rows   # rows to return instead of the rows given (a broken backend)
        self.beside: list[bool] = []       # each serving call's ``beside``

    def infer(self, input, tau, outputs=None, beside=False):
        self.threads["infer"].add(threading.get_ident())
        self.beside.append(beside)
        return super().infer(input, tau)

    def explain(self, input, tau, baseline):
        self.threads["explain"].add(threading.get_ident())
        self.explained.append(len(input))
        n = len(input) if self.explain_rows is None else self.explain_rows
        return {"gap": (input - baseline)[:n], "explain_tau": np.asarray(tau)[:n]}


def test_explanations_run_with_their_batch_and_split_back_to_their_requests():
    """Jobs with a baseline get the explanation outputs of exactly their rows (from their own
    baseline and tau), computed in the same batch as jobs without one, which get none."""
    backend = ExplainingBackend()

    async def main():
        b = _batcher(backend, max_queue_delay_s=0.05)
        jobs = [b.infer(_rows(2, 10 * i), 0.1 * (i + 1), timeout_s=5,
                        baseline=None if i % 2 else np.full(2, float(i), np.float32)) for i in range(4)]
        results = await asyncio.gather(*jobs)
        await b.close()
        return results

    results = asyncio.run(main())
    assert backend.batches == [(8, (0.1, 0.2, 0.30000000000000004, 0.4))]   # one batch, all four jobs
    assert backend.explained == [4]                                        # one explanation call: jobs 0 and 2
    assert backend.beside == [True]            # the serving call was told its explanation runs beside it
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs["double"], _rows(2, 10 * i) * 2)
        if i % 2:
            assert "gap" not in r.outputs and "explain_tau" not in r.outputs
        else:
            np.testing.assert_array_equal(r.outputs["gap"], _rows(2, 10 * i) - i)
            np.testing.assert_allclose(r.outputs["explain_tau"], [0.1 * (i + 1)] * 2)
    infer, explain = backend.threads["infer"], backend.threads["explain"]
    assert len(infer) == len(explain) == 1 and infer != explain and threading.get_ident() not in infer | explain


def test_a_batchs_explanation_runs_while_its_serving_graph_runs():
    """The two graphs of one batch run at the same time (a request asking for both waits for the
    longer, not the sum): here each waits for the other to have started, which serial runs never do."""
    both = threading.Barrier(2, timeout=5)

    class Overlapping(ExplainingBackend):
        def infer(self, input, tau, outputs=None, beside=False):
            both.wait()
            return super().infer(input, tau)

        def explain(self, input, tau, baseline):
            both.wait()
            return super().explain(input, tau, baseline)

    async def main():
        b = _batcher(Overlapping(), max_queue_delay_s=0)
        result = await b.infer(_rows(3), 0.1, timeout_s=10, baseline=np.zeros(2, np.float32))
        await b.close()
        return result

    result = asyncio.run(main())
    np.testing.assert_array_equal(result.outputs["double"], _rows(3) * 2)
    np.testing.assert_array_equal(result.outputs["gap"], _rows(3))


def test_a_serving_call_is_told_only_when_an_explanation_runs_beside_it():
    """``beside``: the torch backend's small calls hold Python's lock unless told an explanation graph
    runs meanwhile (then the two would not overlap); on the thread and on the loop alike."""
    backend = ExplainingBackend()

    async def main():
        b = _batcher(backend, max_queue_delay_s=0, inline_max_s=1.0)
        try:
            await b.infer(_rows(2), 0.1, timeout_s=5)                       # the thread (measures)
            await b.infer(_rows(2), 0.1, timeout_s=5, alone=True)           # the loop
            await b.infer(_rows(2), 0.1, timeout_s=5, alone=True, baseline=np.zeros(2, np.float32))
            await b.infer(_rows(2), 0.1, timeout_s=5, baseline=np.zeros(2, np.float32))
        finally:
            await b.close()

    asyncio.run(main())
    assert backend.beside == [False, False, True, True] and len(backend.threads["infer"]) == 2


def test_explanations_run_at_most_max_batch_size_rows_a_call():
    """A job larger than max_batch_size (a batch job's chunk runs whole) is explained in
    max_batch_size-row calls: the explanation graph's memory grows with its rows."""
    backend = ExplainingBackend()

    async def main():
        b = _batcher(backend, max_batch_size=4, max_queue_delay_s=0)
        result = await b.infer(_rows(10), 0.5, timeout_s=5, baseline=np.zeros(2, np.float32))
        await b.close()
        return result

    result = asyncio.run(main())
    assert backend.batches == [(10, (0.5,))] and backend.explained == [4, 4, 2]
    np.testing.assert_array_equal(result.outputs["gap"], _rows(10))


def test_explanations_run_at_most_the_models_explain_rows_a_call():
    """The model's own bound on rows per explanation call (``explain_rows``: a memory model of many
    support points explains a few rows at a time) splits even a request below max_batch_size; the
    rows come back whole and in order."""
    backend = ExplainingBackend()

    async def main():
        b = _batcher(backend, max_batch_size=8, max_queue_delay_s=0, explain_rows=3)
        result = await b.infer(_rows(7), 0.5, timeout_s=5, baseline=np.zeros(2, np.float32))
        await b.close()
        return result

    result = asyncio.run(main())
    assert backend.batches == [(7, (0.5,))] and backend.explained == [3, 3, 1]
    np.testing.assert_array_equal(result.outputs["gap"], _rows(7))


def test_an_explanation_with_the_wrong_rows_is_a_backend_error():
    async def main():
        b = _batcher(ExplainingBackend(explain_rows=1), max_queue_delay_s=0)
        try:
            await b.infer(_rows(3), 0.5, timeout_s=5, baseline=np.zeros(2, np.float32))
        finally:
            await b.close()

    with pytest.raises(BackendError, match=r"output 'gap' has shape \[1, 2\], expected 3 rows"):
        asyncio.run(main())


@pytest.mark.parametrize(("fail", "error"), [(BackendError("explain boom"), BackendError),
                                             (ValueError("bug"), InternalError)])
def test_an_explanation_failure_reaches_only_the_requests_that_asked_for_one(fail, error):
    """A request that names no explanation output never fails because another request in its batch
    asked for one and the explanation graph failed."""
    class Failing(ExplainingBackend):
        def explain(self, input, tau, baseline):
            raise fail

    async def main():
        b = _batcher(Failing(), max_queue_delay_s=0.05)
        results = await asyncio.gather(
            b.infer(_rows(2), 0.1, timeout_s=5, baseline=np.zeros(2, np.float32)),
            b.infer(_rows(1, 10), 0.1, timeout_s=5),
            b.infer(_rows(1, 20), 0.1, timeout_s=5, baseline=np.zeros(2, np.float32)), return_exceptions=True)
        ok = await b.infer(_rows(1), 0.1, timeout_s=5)   # the thread lives on
        await b.close()
        return results, ok

    (first, plain, third), ok = asyncio.run(main())
    assert isinstance(first, error) and isinstance(third, error)
    np.testing.assert_array_equal(plain.outputs["double"], _rows(1, 10) * 2)
    assert "gap" not in plain.outputs and ok.outputs["double"].shape == (1, 2)


def test_a_batch_that_cannot_be_assembled_fails_its_requests_and_the_thread_lives_on():
    """Rows of different widths in one batch (never produced by the dataplane, which validates them
    against one version) fail that batch with an internal error instead of killing the thread."""
    backend = FakeBackend()

    async def main():
        b = _batcher(backend, max_queue_delay_s=0.05)
        bad = await asyncio.gather(b.infer(_rows(1), 0.1, timeout_s=5),
                                   b.infer(np.zeros((1, 3), np.float32), 0.1, timeout_s=5), return_exceptions=True)
        ok = await b.infer(_rows(1), 0.1, timeout_s=5)
        await b.close()
        return bad, ok

    bad, ok = asyncio.run(main())
    assert all(isinstance(r, InternalError) for r in bad)
    assert ok.outputs["double"].shape == (1, 2)


def _bulk_then_online(monkeypatch, max_wait_s: float):
    """Bulk chunk 0 computing (the gate closed), bulk chunks 1-2 and then two online requests
    queued behind it; returns the batches in the order the backend ran them."""
    import service.batching as batching

    monkeypatch.setattr(batching, "BULK_MAX_WAIT_S", max_wait_s)
    backend = FakeBackend()
    backend.gate.clear()

    async def main():
        b = _batcher(backend, max_queue_delay_s=0)
        bulk = [asyncio.ensure_future(b.infer(_rows(8), 0.1, timeout_s=5, bulk=True))]
        assert await asyncio.to_thread(backend.entered.wait, 5)   # chunk 0 computing, held at the gate
        bulk += [asyncio.ensure_future(b.infer(_rows(8), 0.1, timeout_s=5, bulk=True)) for _ in range(2)]
        online = [asyncio.ensure_future(b.infer(_rows(2), 0.9, timeout_s=5)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert b.queue_size == 4
        backend.gate.set()
        results = await asyncio.gather(*bulk, *online)
        await b.close()
        return results

    results = asyncio.run(main())
    assert [len(r.outputs["double"]) for r in results] == [8, 8, 8, 2, 2]
    return backend.batches


def test_online_requests_go_before_queued_bulk_chunks(monkeypatch):
    """A batch job's queued chunks wait for the online requests queued after them (both online
    requests in one batch), so a running job delays an online request by one chunk at most."""
    assert _bulk_then_online(monkeypatch, 60.0) == [(8, (0.1,)), (4, (0.9,)), (8, (0.1,)), (8, (0.1,))]


def test_a_bulk_chunk_that_waited_long_enough_goes_first(monkeypatch):
    """Online traffic cannot starve a batch job: past BULK_MAX_WAIT_S its chunk goes next."""
    assert _bulk_then_online(monkeypatch, 0.0) == [(8, (0.1,)), (8, (0.1,)), (8, (0.1,)), (4, (0.9,))]


def test_close_runs_the_queued_bulk_chunks_too():
    backend = FakeBackend(delay=0.01)

    async def main():
        b = _batcher(backend, max_batch_size=2, max_queue_delay_s=0)
        jobs = [asyncio.ensure_future(b.infer(_rows(2), 0.1, timeout_s=5, bulk=i % 2 == 0)) for i in range(6)]
        await asyncio.sleep(0)
        await b.close()
        return await asyncio.gather(*jobs)

    assert len(asyncio.run(main())) == 6


# -- a request alone runs on the event loop ----------------------------------------------------------


class WhereBackend(FakeBackend):
    """FakeBackend that records, for every call, its thread and whether it flushed subnormals."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[tuple[int, bool]] = []

    def infer(self, input, tau, outputs=None, beside=False):
        self.calls.append((threading.get_ident(), serving.flushing_subnormals()))
        return super().infer(input, tau, outputs)


def _on_loop(backend: WhereBackend, i: int) -> bool:
    return backend.calls[i][0] == threading.get_ident()


def test_a_request_alone_runs_on_the_event_loop_once_its_models_small_calls_are_known_fast():
    """The first call measures (the thread); then a request alone runs where it is, in the thread's
    floating-point mode, the loop's own mode restored after it, with the same answer."""
    backend = WhereBackend()
    before = serving.flushing_subnormals()

    async def main():
        batcher = _batcher(backend, max_queue_delay_s=0.0, inline_max_s=1.0)
        try:
            first = await batcher.infer(_rows(2), 0.3, timeout_s=5, alone=True)
            second = await batcher.infer(_rows(2), 0.3, timeout_s=5, alone=True)
            return first, second
        finally:
            await batcher.close()

    first, second = asyncio.run(main())
    assert not _on_loop(backend, 0) and _on_loop(backend, 1)
    assert [flushed for _, flushed in backend.calls] == [True, True]
    assert serving.flushing_subnormals() == before
    for name in ("double", "tau"):
        np.testing.assert_array_equal(first.outputs[name], second.outputs[name])
    assert second.queue_s == 0.0 and second.batch_rows == 2 and second.compute_s > 0


@pytest.mark.parametrize("case", ["not alone", "bulk", "too many rows", "slow calls", "off"])
def test_a_request_runs_on_the_thread_unless_it_is_alone_small_fast_and_allowed(case):
    backend = WhereBackend(delay=0.02 if case == "slow calls" else 0.0)

    async def main():
        batcher = _batcher(backend, max_batch_size=32, max_queue_delay_s=0.0,
                           inline_max_s=0.0 if case == "off" else 0.01)
        try:
            await batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True)   # measures
            await batcher.infer(_rows(INLINE_ROWS + 1 if case == "too many rows" else 1), 0.1, timeout_s=5,
                                alone=case != "not alone", bulk=case == "bulk")
        finally:
            await batcher.close()

    asyncio.run(main())
    assert len(backend.calls) == 2 and not _on_loop(backend, 1)


def test_a_request_alone_waits_for_the_thread_while_it_has_work():
    """A job queued or computing keeps a request alone on the thread (behind it, as any other); once
    the thread's jobs are settled -- delivered, or dropped after their timeout -- it runs inline again."""
    backend = WhereBackend()

    async def main():
        batcher = _batcher(backend, max_queue_delay_s=0.0, inline_max_s=1.0)
        try:
            await batcher.infer(_rows(1), 0.1, timeout_s=5)                       # measures
            backend.gate.clear()
            backend.entered.clear()
            running = asyncio.ensure_future(batcher.infer(_rows(1), 0.1, timeout_s=5))
            await asyncio.to_thread(backend.entered.wait, 5)                      # the thread is computing
            expiring = asyncio.ensure_future(batcher.infer(_rows(1), 0.1, timeout_s=0.01))   # queued
            alone = asyncio.ensure_future(batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True))
            with pytest.raises(RequestTimeout):
                await expiring
            backend.gate.set()
            await running
            await alone
            assert not _on_loop(backend, 2)            # it went behind the running job, on the thread
            for _ in range(100):                       # the timed-out job is dropped, then settled
                if batcher._pending == 0:
                    break
                await asyncio.sleep(0.01)
            await batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True)
            assert _on_loop(backend, 3)
        finally:
            backend.gate.set()
            await batcher.close()

    asyncio.run(main())
    assert len(backend.calls) == 4


@pytest.mark.parametrize(("fail", "error"), [(BackendError("bad input"), BackendError),
                                             (RuntimeError("boom"), InternalError)])
def test_a_request_run_on_the_event_loop_fails_as_on_the_thread(fail, error):
    backend = WhereBackend()

    async def main():
        batcher = _batcher(backend, max_queue_delay_s=0.0, inline_max_s=1.0)
        try:
            await batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True)
            backend.fail = fail
            with pytest.raises(error):
                await batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True)
            backend.fail = None
            return await batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True)
        finally:
            await batcher.close()

    assert asyncio.run(main()).batch_rows == 1
    assert [_on_loop(backend, i) for i in range(3)] == [False, True, True]


def test_a_request_run_on_the_event_loop_past_its_timeout_fails_with_a_timeout():
    backend = WhereBackend()

    async def main():
        batcher = _batcher(backend, max_queue_delay_s=0.0, inline_max_s=1.0)
        try:
            await batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True)
            backend.delay = 0.05
            with pytest.raises(RequestTimeout):
                await batcher.infer(_rows(1), 0.1, timeout_s=0.01, alone=True)
        finally:
            await batcher.close()

    asyncio.run(main())
    assert _on_loop(backend, 1)


def test_subnormals_flushed_sets_the_mode_for_the_block_and_restores_the_threads_own():
    import torch

    seen = []

    def on_a_thread():
        for mode in (False, True):
            torch.set_flush_denormal(mode)
            with serving.subnormals_flushed():
                seen.append((mode, serving.flushing_subnormals(), np.float64(1e-300) * np.float64(1e-10)))
            seen.append((mode, serving.flushing_subnormals()))

    worker = threading.Thread(target=on_a_thread)
    worker.start()
    worker.join()
    assert seen == [(False, True, 0.0), (False, False), (True, True, 0.0), (True, True)]


def test_a_request_alone_still_waits_for_company_when_the_batcher_is_asked_to():
    """With ``max_queue_delay_s`` set every request waits for more rows, as Triton's batcher does:
    none runs on the event loop, alone or not."""
    backend = WhereBackend()

    async def main():
        batcher = _batcher(backend, max_queue_delay_s=0.001, inline_max_s=1.0)
        try:
            for _ in range(3):
                await batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True)
        finally:
            await batcher.close()

    asyncio.run(main())
    assert not any(_on_loop(backend, i) for i in range(3))


class WhereExplainingBackend(ExplainingBackend):
    """ExplainingBackend whose explanation can be held (``explain_gate``) or fail (``explain_fail``)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.explain_gate = threading.Event()
        self.explain_gate.set()
        self.explain_fail: Exception | None = None

    def explain(self, input, tau, baseline):
        self.explain_gate.wait(10)
        if self.explain_fail is not None:
            raise self.explain_fail
        return super().explain(input, tau, baseline)


def test_a_request_alone_with_explanations_runs_its_serving_graph_on_the_loop_and_the_explanation_beside_it():
    """The explanation graph runs on the version's explanation thread while the serving graph runs
    on the loop, as beside a batch on the thread; the answer is the same as the thread's."""
    backend = WhereExplainingBackend()
    base = np.array([1.0, -1.0], np.float32)

    async def main():
        batcher = _batcher(backend, max_queue_delay_s=0.0, inline_max_s=1.0)
        try:
            first = await batcher.infer(_rows(3), 0.4, timeout_s=5, alone=True, baseline=base)   # measures
            threads = {k: set(v) for k, v in backend.threads.items()}
            second = await batcher.infer(_rows(3), 0.4, timeout_s=5, alone=True, baseline=base)
            return first, threads, second
        finally:
            await batcher.close()

    first, threads, second = asyncio.run(main())
    me = threading.get_ident()
    assert me not in threads["infer"] and me in backend.threads["infer"]
    assert backend.beside == [True, True]      # on the thread and on the loop, told the explanation is beside it
    assert me not in backend.threads["explain"] and backend.threads["explain"] == threads["explain"]
    assert first.outputs.keys() == second.outputs.keys() == {"double", "tau", "gap", "explain_tau"}
    for name in first.outputs:
        np.testing.assert_array_equal(first.outputs[name], second.outputs[name])
    np.testing.assert_array_equal(second.outputs["gap"], _rows(3) - base)


@pytest.mark.parametrize(("fail", "error"), [(BackendError("bad rows"), BackendError),
                                             (RuntimeError("boom"), InternalError), (None, RequestTimeout)])
def test_a_request_alone_whose_explanation_fails_or_overruns_gets_that_error(fail, error):
    backend = WhereExplainingBackend()
    base = np.zeros(2, np.float32)

    async def main():
        batcher = _batcher(backend, max_queue_delay_s=0.0, inline_max_s=1.0)
        try:
            await batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True, baseline=base)
            backend.explain_fail = fail
            if fail is None:
                backend.explain_gate.clear()            # the explanation outlives the request's timeout
            with pytest.raises(error):
                await batcher.infer(_rows(1), 0.1, timeout_s=0.2, alone=True, baseline=base)
            backend.explain_gate.set()
            backend.explain_fail = None
            return await batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True, baseline=base)
        finally:
            backend.explain_gate.set()
            await batcher.close()

    assert asyncio.run(main()).outputs.keys() == {"double", "tau", "gap", "explain_tau"}


def test_each_set_of_outputs_is_measured_on_the_thread_before_it_runs_on_the_loop():
    """A set of outputs runs a graph of its own: a cheap set measured fast says nothing of the whole
    graph, whose first small call therefore goes to the thread too; a slow set stays there."""
    few = frozenset({"prediction"})

    class Slow(WhereBackend):
        def infer(self, input, tau, outputs=None, beside=False):
            self.delay = 0.0 if outputs == few else 0.02
            return super().infer(input, tau, outputs)

    backend = Slow()

    async def main():
        batcher = _batcher(backend, max_queue_delay_s=0.0, inline_max_s=0.01)
        try:
            for outputs in (few, few, None, None, few):
                await batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True, outputs=outputs)
        finally:
            await batcher.close()

    asyncio.run(main())
    assert [_on_loop(backend, i) for i in range(5)] == [False, True, False, False, True]


def test_the_batcher_keeps_the_times_of_a_bounded_number_of_output_sets():
    from service import batching

    backend = WhereBackend()

    async def main():
        batcher = _batcher(backend, max_queue_delay_s=0.0, inline_max_s=1.0)
        try:
            for i in range(batching._CALL_S_SETS + 10):
                await batcher.infer(_rows(1), 0.1, timeout_s=5, alone=True, outputs=frozenset({f"o{i}"}))
            return dict(batcher._call_s)
        finally:
            await batcher.close()

    kept = asyncio.run(main())
    assert len(kept) == batching._CALL_S_SETS and frozenset({"o0"}) not in kept
    assert frozenset({f"o{batching._CALL_S_SETS + 9}"}) in kept
