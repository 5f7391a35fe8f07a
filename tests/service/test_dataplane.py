"""The transport-free dataplane, in process (fake backend): typed operations, the one run path, the
one accounting context."""

from __future__ import annotations

import asyncio
import shutil
import types

import numpy as np
import pytest
from fakes import D, FakeLoader, write_model

from service import metrics
from service.codecs import ndjson_source
from service.dataplane import CHUNKS_IN_FLIGHT, DRAIN_MARGIN_S, DataPlane
from service.errors import (
    EmptyBatch,
    InvalidDatatype,
    InvalidParameter,
    InvalidValue,
    ModelLoadFailed,
    ModelNotFound,
    ShuttingDown,
    UnknownInput,
    UnknownOutput,
)
from service.repository import ModelRepository
from service.settings import Settings
from service.types import (
    InferInput,
    InferRequest,
    ModelConfigResponse,
    ModelStatsResponse,
    RequestedOutput,
    V1Request,
)


def _request(n: int = 3, outputs=(), seed: int = 0, **params) -> InferRequest:
    x = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
    return InferRequest(inputs=[InferInput("input", "FP32", x.shape, x)],
                        outputs=[RequestedOutput(o) for o in outputs], parameters=dict(params))


def _run(dataplane: DataPlane, body):
    """Start the dataplane, run ``await body()``, stop it."""
    async def main():
        await dataplane.start()
        try:
            return await body()
        finally:
            await dataplane.stop()
    return asyncio.run(main())


def _count(model: str, version: str, outcome: str) -> float:
    return metrics.INFERENCE_REQUESTS.labels(model, version, outcome)._value.get()


def test_infer_returns_typed_outputs_of_the_latest_version(dataplane):
    response = _run(dataplane, lambda: dataplane.infer("fclf", None, _request(outputs=("prediction", "attribution_index"),
                                                                                top_k=3)))
    assert response.model_name == "fclf" and response.model_version == "2"
    pred, index = response.outputs
    assert pred.name == "prediction" and pred.datatype == "INT64" and pred.array.shape == (3,)
    assert index.array.shape == (3, 3)   # sliced to top_k
    assert (index.array[:, 0] == 2).all()   # the fake's indices start at its seed: version 2 answered


def test_parameters_follow_the_protocol_types_numbers_as_strings(dataplane):
    """gRPC's InferParameter carries bool / int64 / string: numbers may arrive as strings, and
    diagnostics as a comma-separated string or a boolean string."""
    async def body():
        a = await dataplane.infer("freg", "1", _request(tau="0.25", top_k="2", diagnostics="energy_gap, saliency"))
        b = await dataplane.infer("freg", "1", _request(diagnostics="true"))
        c = await dataplane.infer("freg", "1", _request(diagnostics="false", timeout="5000000"))
        return a, b, c
    a, b, c = _run(dataplane, body)
    names = [o.name for o in a.outputs]
    assert names[-2:] == ["energy_gap", "saliency"]
    radius = next(o.array for o in a.outputs if o.name == "certified_radius")
    np.testing.assert_allclose(radius, 0.25)     # the fake's regression radius is tau
    assert len(b.outputs) == 13 and len(c.outputs) == 3
    for bad in ({"tau": "zero"}, {"top_k": "2.5"}, {"top_k": True}, {"timeout": "-1"}, {"diagnostics": 3},
                {"alpha": "0.2"}):
        with pytest.raises(InvalidParameter):
            _run(dataplane, lambda bad=bad: dataplane.infer("freg", "1", _request(**bad)))


def test_a_tau_input_is_accepted_as_the_tau_parameter(dataplane):
    x = np.zeros((2, D), np.float32)
    tau = np.full((2, 1), 0.4)
    request = InferRequest(inputs=[InferInput("input", "FP32", x.shape, x), InferInput("tau", "FP64", tau.shape, tau)],
                           outputs=[RequestedOutput("certified_radius")])
    out = _run(dataplane, lambda: dataplane.infer("freg", None, request))
    np.testing.assert_allclose(out.outputs[0].array, 0.4)
    mixed = np.asarray([[0.1], [0.2]])
    request.inputs[1] = InferInput("tau", "FP64", mixed.shape, mixed)
    with pytest.raises(InvalidParameter):
        _run(dataplane, lambda: dataplane.infer("freg", None, request))
    request.inputs[1] = InferInput("other", "FP64", mixed.shape, mixed)
    with pytest.raises(UnknownInput):
        _run(dataplane, lambda: dataplane.infer("freg", None, request))


@pytest.mark.parametrize("model, setting, expected", [   # a model gets the outputs it has: no probabilities
    ("fclf", "all", 14), ("fclf", "prediction,certified_radius", 2), ("freg", "prediction,probabilities", 1)])
def test_default_outputs_is_a_setting_reported_in_the_config(fake_root, loader, model, setting, expected):
    settings = Settings(model_repository=fake_root, default_outputs=setting)
    plane = DataPlane(settings, ModelRepository(settings, loader=loader))
    response = _run(plane, lambda: plane.infer(model, None, _request()))
    assert len(response.outputs) == expected
    config = _run(plane, lambda: asyncio.sleep(0, plane.model_config(model)))
    assert isinstance(config, ModelConfigResponse)
    assert len(__import__("json").loads(config.parameters["default_outputs"]["string_value"])) == expected


def test_options_and_rows_are_resolved_against_the_version_that_runs(fake_root, loader):
    """A version swapped between two requests is fully re-resolved: a new build with another number
    of features refuses the old rows instead of running them against stale options."""
    settings = Settings(model_repository=fake_root, model_control_mode="explicit")
    plane = DataPlane(settings, ModelRepository(settings, loader=loader))

    async def body():
        first = await plane.infer("fclf", "2", _request(outputs=("probabilities",)))
        spec_file = fake_root / "fclf" / "2" / "model.json"
        spec = __import__("json").loads(spec_file.read_text())
        spec["n_outputs"], spec["class_names"] = 2, ["alpha", "beta"]
        spec_file.write_text(__import__("json").dumps(spec))
        await plane.load_model("fclf")
        second = await plane.infer("fclf", "2", _request(outputs=("probabilities",)))
        return first, second
    first, second = _run(plane, body)
    assert first.outputs[0].array.shape == (3, 3) and second.outputs[0].array.shape == (3, 2)


def test_errors_are_typed_and_counted_once(dataplane):
    before = _count("fclf", "2", "failure")
    for request, error in ((_request(outputs=("nope",)), UnknownOutput), (_request(n=0), EmptyBatch)):
        with pytest.raises(error):
            _run(dataplane, lambda request=request: dataplane.infer("fclf", None, request))
    assert _count("fclf", "2", "failure") - before == 2
    with pytest.raises(ModelNotFound):
        _run(dataplane, lambda: dataplane.infer("nope", None, _request()))
    bad = _request()
    bad.inputs[0] = InferInput("input", "INT64", (1, D), np.zeros((1, D), np.int64))
    with pytest.raises(InvalidDatatype):
        _run(dataplane, lambda: dataplane.infer("fclf", None, bad))


def test_explain_is_a_dataplane_operation(dataplane):
    rows = np.random.default_rng(1).normal(size=(2, D)).tolist()
    predict = _run(dataplane, lambda: dataplane.explain("fclf", V1Request(instances=rows), detail=False))
    explain = _run(dataplane, lambda: dataplane.explain("fclf", V1Request(instances=rows), detail=True))
    assert predict.explanations is None and len(predict.predictions) == 2
    assert predict.predictions[0] in ("alpha", "beta", "gamma")
    assert len(explain.explanations) == 2 and explain.explanations[0]["salient_features"]["value"][0]["feature"]
    with pytest.raises(EmptyBatch):
        _run(dataplane, lambda: dataplane.explain("fclf", V1Request(instances=[]), detail=False))


def _ndjson(rows: int, bad_at: int | None = None):
    import io

    lines = [("[1, 2, 3, 4]" if i != bad_at else '["x", 2, 3, 4]') for i in range(rows)]
    return ndjson_source(io.BytesIO("\n".join(lines).encode()), chunk_rows=4, max_rows=10_000, max_line_bytes=1000)


def test_batch_attribution_is_one_request_in_the_statistics(dataplane):
    """Batch jobs were missing from /stats: now a job counts as one request with all its rows."""
    async def body():
        job = dataplane.attribute("fclf", "1", _ndjson(10), {}, [])
        await job.start()
        blocks = [b async for b in job.blocks()]
        return job, blocks, dataplane.model_stats("fclf", "1")
    job, blocks, stats = _run(dataplane, body)
    assert [b.start for b in blocks] == [0, 4, 8] and sum(b.rows for b in blocks) == 10 == job.rows_done
    assert len(blocks[0].outputs) == 14 and blocks[0].classes is not None   # every output by default
    assert isinstance(stats, ModelStatsResponse)
    entry = stats.model_stats[0]
    assert entry.inference_stats["success"]["count"] == 1 and entry.inference_count == 10


def test_batch_attribution_submits_the_next_chunk_before_it_hands_out_a_block(dataplane):
    """The pipeline: while the caller encodes block i (synchronous work on the event loop, ~6 ms per
    1,024 rows), the next CHUNKS_IN_FLIGHT chunks are already with the backend. Chunk i + 1 used to
    be only *scheduled* -- its task first ran when the caller next yielded the loop, after the
    encoding -- so the graph and the encoding ran one after the other instead of side by side."""
    async def body():
        mv = dataplane.repository.get("fclf", "1")
        submitted = []
        infer = mv.batcher.infer

        async def spy(rows, *args, **kwargs):   # the real batcher, its calls recorded as they start
            submitted.append(len(rows))
            return await infer(rows, *args, **kwargs)
        mv.batcher.infer = spy
        job = dataplane.attribute("fclf", "1", _ndjson(10), {}, [])
        await job.start()
        seen = []
        async for block in job.blocks():
            seen.append((block.start, len(submitted)))   # no await between the yield and this
        return seen
    # blocks 0, 4, 8: with block 0 out, chunks 1 and 2 are submitted too (all three there are)
    assert CHUNKS_IN_FLIGHT == 2 and _run(dataplane, body) == [(0, 3), (4, 3), (8, 3)]


def test_a_chunk_that_fails_while_later_ones_are_in_flight_ends_the_job_after_the_rows_before_it(dataplane):
    """Chunk 1 fails its checks (FP64 beyond the float32 range) while chunk 2 is already submitted:
    the job answers chunk 0, raises, and cancels chunk 2 (never answered; the job counts as one failure)."""
    rows = np.ones((4, D))
    chunks = [(rows, "FP64"), (np.full((4, D), 1e300), "FP64"), (rows, "FP64"), (rows, "FP64")]

    async def body():
        job = dataplane.attribute("fclf", "1", iter(chunks), {}, [])
        await job.start()
        seen = []
        with pytest.raises(InvalidValue):
            async for block in job.blocks():
                seen.append(block.start)
        await asyncio.sleep(0.05)   # the cancelled chunk settles
        return job, seen, dataplane.model_stats("fclf", "1")
    job, seen, stats = _run(dataplane, body)
    assert seen == [0] and job.rows_done == 4
    entry = stats.model_stats[0]
    assert entry.inference_stats["fail"]["count"] == 1 and entry.inference_stats["success"]["count"] == 0


def test_a_shutdown_ends_a_batch_job_while_it_can_still_say_where(dataplane):
    """Once draining, the dataplane is not ready; a job keeps answering while the grace lasts well
    beyond its next blocks, and ends with ShuttingDown -- every row before rows_done answered, none
    after -- when the grace left is within DRAIN_MARGIN_S of running out (it would be cut off then)."""
    async def body(grace_s):
        ready = dataplane.ready()
        job = dataplane.attribute("fclf", "1", _ndjson(10), {}, [])
        await job.start()
        seen = []
        try:
            async for block in job.blocks():
                seen.append(block.start)
                dataplane.drain(grace_s)
        except ShuttingDown as exc:
            stats = dataplane.model_stats("fclf", "1").model_stats[0].inference_stats
            return job, seen, exc, (ready, dataplane.ready(), stats["fail"]["count"])
        return job, seen, None, (ready, dataplane.ready())
    assert dataplane.drain_left_s() is None
    job, seen, error, ready = _run(dataplane, lambda: body(60.0))   # a long grace: the job finishes
    assert seen == [0, 4, 8] and error is None and ready == (True, False)
    assert 59 < dataplane.drain_left_s() <= 60
    dataplane.drain_deadline = None
    job, seen, error, ready = _run(dataplane, lambda: body(DRAIN_MARGIN_S / 2))
    assert seen == [0] and job.rows_done == 4
    assert "rows from 4 on were not answered" in str(error)
    assert ready == (True, False, 1)   # the job counts as one failed request
    dataplane.drain(60.0)   # a second signal changes nothing
    assert dataplane.drain_left_s() < DRAIN_MARGIN_S


def test_batch_attribution_answers_every_row_before_a_bad_one(dataplane):
    async def body():
        job = dataplane.attribute("fclf", "1", _ndjson(11, bad_at=9), {"top_k": "2"}, ["attribution_index"])
        await job.start()
        seen = []
        with pytest.raises(InvalidDatatype):
            async for block in job.blocks():
                seen.append(block)
        return job, seen, dataplane.model_stats("fclf", "1")
    job, seen, stats = _run(dataplane, body)
    assert job.rows_done == 9 and sum(b.rows for b in seen) == 9
    assert seen[0].outputs[0].array.shape == (4, 2)
    assert stats.model_stats[0].inference_stats["fail"]["count"] == 1


def test_batch_attribution_refuses_bad_parameters_before_reading(dataplane):
    with pytest.raises(InvalidParameter):
        _run(dataplane, lambda: asyncio.sleep(0, dataplane.attribute("fclf", None, _ndjson(2), {"tau": -1}, [])))
    async def empty():
        job = dataplane.attribute("fclf", None, iter(()), {}, [])
        await job.start()
    with pytest.raises(EmptyBatch):
        _run(dataplane, empty)


def test_a_reload_during_a_request_is_retried_on_the_new_load(fake_root):
    """The version swap: the old load's batcher closes while a request waits in it; the request is
    answered by the new load (same version number), not failed."""
    loader = FakeLoader()
    settings = Settings(model_repository=fake_root, max_batch_size=1, model_control_mode="explicit")
    plane = DataPlane(settings, ModelRepository(settings, loader=loader))

    async def body():
        old = loader.backends[("fclf", 2)]
        old.gate.clear()
        blocker = asyncio.ensure_future(plane.infer("fclf", "2", _request(n=1)))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(plane.infer("fclf", "2", _request(n=1)))
        await asyncio.sleep(0.05)
        shutil.rmtree(fake_root / "fclf" / "2")
        write_model(fake_root / "fclf" / "2", seed=7)
        reload = asyncio.ensure_future(plane.load_model("fclf"))
        await asyncio.sleep(0.1)
        old.gate.set()
        await reload
        return await blocker, await waiting
    first, second = _run(plane, body)
    assert first.model_version == second.model_version == "2"


def test_poll_mode_refuses_explicit_load_and_unload(fake_root, loader):
    settings = Settings(model_repository=fake_root, model_control_mode="poll", repository_poll_s=60)
    plane = DataPlane(settings, ModelRepository(settings, loader=loader))
    for op in (plane.load_model, plane.unload_model):
        with pytest.raises(ModelLoadFailed, match="poll"):
            _run(plane, lambda op=op: op("fclf"))


@pytest.mark.parametrize("overrides, computed", [
    ({}, {"prediction", "ood_flag", "ood_component", "ood_score", "hallucination_flag", "energy_gap",
          "probabilities"}),
    ({"monitored_outputs": "ood_flag, certified_radius"}, {"prediction", "ood_flag", "certified_radius",
                                                            "probabilities"}),
    ({"monitored_outputs": "all"}, None),
    ({"pruned_graphs": 0}, None),
])
def test_a_request_computes_its_outputs_and_the_monitored_ones(fake_root, overrides, computed):
    """The backend is asked for the request's outputs and those the metrics watch; the metrics record
    only those, whatever else its batch computed: the OOD flags of a request that did not ask for
    them are counted, the radius it did not ask for is not observed (unless monitored)."""
    from prometheus_client import REGISTRY

    loader = FakeLoader()
    settings = Settings(model_repository=fake_root, max_queue_delay_ms=0.0, **overrides)
    plane = DataPlane(settings, ModelRepository(settings, loader=loader))
    labels = {"model": "fclf", "version": "2"}

    def observed() -> tuple[float, float]:
        return (REGISTRY.get_sample_value("hjserve_certified_radius_count", labels) or 0.0,
                sum(REGISTRY.get_sample_value("hjserve_ood_flags_total", {**labels, "component": c}) or 0.0
                    for c in metrics.OOD_COMPONENTS))

    async def body():
        before = observed()
        x = 10.0 * np.random.default_rng(4).normal(size=(6, D)).astype(np.float32)   # the fake flags |x| > 10
        request = InferRequest(inputs=[InferInput("input", "FP32", x.shape, x)], outputs=[RequestedOutput("probabilities")])
        response = await plane.infer("fclf", None, request)
        assert [o.name for o in response.outputs] == ["probabilities"]
        asked = loader.backends[("fclf", 2)].asked[-1]
        assert asked == (None if computed is None else frozenset(computed))
        radius, flags = (a - b for a, b in zip(observed(), before))
        assert flags == 6 and radius == (6 if computed is None or "certified_radius" in computed else 0)
        await plane.infer("fclf", None, _request(n=2))      # the default outputs hold the radius
        assert observed()[0] - before[0] == radius + 2
    _run(plane, body)


def _record_alone(dataplane, monkeypatch) -> list[bool]:
    """The ``alone`` the dataplane passes to ``fclf``'s batcher, call by call (run inside the loop)."""
    seen: list[bool] = []
    batcher = dataplane.repository.get("fclf", None).batcher
    infer = batcher.infer

    async def recording(*args, **kwargs):
        seen.append(kwargs["alone"])
        return await infer(*args, **kwargs)

    monkeypatch.setattr(batcher, "infer", recording)
    return seen


def test_a_request_is_alone_when_it_is_the_only_inference_request_in_flight(dataplane, monkeypatch):
    """What the dataplane tells the batcher (which may then run the request on the event loop): alone
    only when no other request holds a slot -- admitted or reserved by a connection, any model -- the
    request is one chunk, and no request of a transport that keeps them off the loop (gRPC's) is in
    flight, itself included; every slot is given back, a rejected one too."""

    async def body():
        seen = _record_alone(dataplane, monkeypatch)

        async def one(n: int = 3, inline: bool = True):
            with dataplane.admit("fclf", inline=inline):
                return await dataplane.infer("fclf", None, _request(n))

        await one()
        release = dataplane.reserve("freg")                 # a request for another model, being read
        await one()
        release()
        await one(dataplane.settings.max_batch_size + 1)     # two chunks: never alone
        await one(inline=False)                              # a gRPC call: never alone
        with dataplane.admit("freg", inline=False):          # nor anything beside one
            await one()
        await one()
        monkeypatch.setattr(dataplane.settings, "max_queue_size", 0)
        with pytest.raises(Exception, match="in flight"):
            await one(inline=False)
        return dataplane.in_flight, dataplane._not_inline, seen

    assert _run(dataplane, body) == (0, 0, [True, False, False, False, False, False, True])


def test_a_grpc_call_alone_is_never_run_on_the_event_loop(dataplane, monkeypatch):
    """grpc.aio accepts one call at a time on the event loop, so a call held there would keep the
    next from being accepted or counted: the gRPC transport admits its calls with ``inline=False``
    (bench/results/ab_server_inline_grpc.md), and the batcher is told none is alone."""
    from service.grpc import inference_pb2 as pb
    from service.grpc.server import GRPCServer

    async def body():
        seen = _record_alone(dataplane, monkeypatch)
        # the transport's handler on this dataplane, without a grpc server: one would bind a port that
        # stays bound while it never starts (a later test's server once failed to bind that port)
        transport = types.SimpleNamespace(dataplane=dataplane)
        x = np.zeros((1, D), np.float32)
        request = pb.ModelInferRequest(model_name="fclf", raw_input_contents=[x.tobytes()], inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, D])])
        for _ in range(2):
            with dataplane.request_memory.hold() as memory:
                _, answer = await GRPCServer._infer(transport, request, memory)
            answer.release()
        with dataplane.admit("fclf"):                       # the same request over REST: alone
            await dataplane.infer("fclf", None, _request(1))
        return dataplane.in_flight, seen

    assert _run(dataplane, body) == (0, [False, False, True])
