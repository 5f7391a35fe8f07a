"""The explanation outputs served: listed where the artifact has its explanation graph, computed only
when asked for, equal to hjmodel's own, with the baseline parameter; V1 :explain sections; gRPC."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tritonclient.grpc as tg
from svc_helpers import run_server

from hjmodel import load_dataset, load_model, serving

EXPLAIN = list(dict.fromkeys(o.name for o in serving.EXPLAIN_OUTPUTS))   # tropical_prediction: once


@pytest.fixture(scope="module")
def demo(demo_repository):
    from fastapi.testclient import TestClient

    from service.dataplane import DataPlane
    from service.repository import ModelRepository
    from service.rest.app import create_app
    from service.settings import Settings

    settings = Settings(model_repository=demo_repository)
    with TestClient(create_app(DataPlane(settings, ModelRepository(settings))), raise_server_exceptions=False) as c:
        yield c


def _digits(n=3, seed=0) -> np.ndarray:
    X = load_dataset("digits").X
    return X[np.random.default_rng(seed).choice(len(X), n, replace=False)]


def _infer(client, model, x, outputs, **params):
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP64", "data": x.ravel().tolist()}],
            "outputs": [{"name": o} for o in outputs], "parameters": params}
    return client.post(f"/v2/models/{model}/infer", content=json.dumps(body),   # NaN literals allowed
                       headers={"content-type": "application/json"})


def test_explanation_outputs_are_listed_per_kind(demo):
    memory = {o["name"] for o in demo.get("/v2/models/digits_memory").json()["outputs"]}
    deep = {o["name"] for o in demo.get("/v2/models/digits_deep").json()["outputs"]}
    assert {"integrated_gradients", "label_flips", "label_flip_index", "hj_support_point", "eps_decision_changes"} <= memory
    assert "integrated_gradients" in deep and not deep & {"label_flips", "hj_support_point"}
    meta = {o["name"]: o for o in demo.get("/v2/models/diabetes_lse").json()["outputs"]}
    assert meta["tropical_prediction"] == {"name": "tropical_prediction", "datatype": "FP32", "shape": [-1, 1]}
    config = {o["name"]: o for o in demo.get("/v2/models/digits_memory/config").json()["output"]}
    assert config["label_flip_index"]["dims"] == [-1] and config["integrated_gradients"]["dims"] == [64]


@pytest.mark.parametrize("model", ["digits_lse", "digits_memory", "digits_deep"])
def test_served_explanations_equal_hjmodels_own(demo, demo_repository, model):
    x = _digits(4, seed=1)
    names = [n for n in EXPLAIN if n in {o["name"] for o in demo.get(f"/v2/models/{model}").json()["outputs"]}]
    r = _infer(demo, model, x, names, top_k=4)
    assert r.status_code == 200, r.text
    served = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    want = load_model(demo_repository / model / "1").explain(torch.as_tensor(x.astype(np.float32), dtype=torch.float64))
    want = serving.select_outputs("classification", {k: v.numpy() for k, v in want.items()}, names, 4)
    for name in names:
        if want[name].dtype.kind in "biu":
            np.testing.assert_array_equal(served[name], want[name], err_msg=name)
        else:
            np.testing.assert_allclose(served[name], want[name], rtol=2e-5, atol=1e-6, err_msg=name)


def test_the_baseline_parameter(demo):
    x = _digits(2, seed=2)
    ig = {}
    for label, baseline in (("mean", "mean"), ("zeros", "zeros"), ("row", x[1].tolist()), ("string", ",".join("0" * 64))):
        r = _infer(demo, "digits_lse", x, ["integrated_gradients"], baseline=baseline)
        assert r.status_code == 200, r.text
        ig[label] = np.asarray(r.json()["outputs"][0]["data"]).reshape(2, 64)
    np.testing.assert_array_equal(ig["zeros"], ig["string"])
    assert not np.allclose(ig["mean"], ig["zeros"])
    assert np.abs(ig["row"][1]).max() == 0.0   # from itself: nothing to attribute
    for bad in ("median", [1.0, 2.0], "1,2,x", [float("nan")] * 64):
        r = _infer(demo, "digits_lse", x, ["integrated_gradients"], baseline=bad)
        assert r.status_code == 400 and r.json()["error_type"] == "invalid_parameter", bad


def test_explanations_cost_nothing_unless_asked_for(demo):
    """The default and the served-graph outputs never run the explanation graph (its span aside, its
    outputs are absent), and a batch job's default is the serving graph's outputs."""
    r = _infer(demo, "digits_deep", _digits(2), [], diagnostics=True)
    names = [o["name"] for o in r.json()["outputs"]]
    assert "integrated_gradients" in names   # "all" includes them
    lines = demo.post("/v2/models/digits_deep/batch-attribution", json={"instances": _digits(3).tolist()}).text
    row = json.loads(lines.splitlines()[0])
    assert "saliency" in row and "integrated_gradients" not in row


def test_v1_explain_reads_the_explanation_graph(demo):
    r = demo.post("/v1/models/digits_memory:explain", json={"instances": _digits(2, seed=3).tolist()})
    assert r.status_code == 200, r.text
    section = r.json()["explanations"][0]
    flips = section["label_flips"]["value"]
    assert flips["count"] is None or flips["count"] >= 1
    assert all("training_example_id" in e for e in flips["examples"])
    assert len(section["hj"]["value"]["hj_support_point"]) == 64
    assert section["eps_what_if"]["value"]["tropical_prediction"] in [str(k) for k in range(10)]
    assert abs(section["integrated_gradients"]["value"]["sum"]) > 0


def test_v1_explain_sums_the_attributions_where_they_cannot_overflow(demo):
    """Integrated gradients are float32 outputs, saturated at float32's largest value; their sum was
    taken in float32 too, and on 58a9ac3 a row of +-3.4e38 (a valid float32 input) was answered
    "sum": NaN -- no JSON number (a strict parser refuses the reply) and not the sum of the values
    served beside it. Summed in float64, it is."""
    row = (np.arange(64) % 2 * 2 - 1) * 3.4e38
    r = demo.post("/v1/models/digits_lse:explain", json={"instances": [row.tolist()]})
    assert r.status_code == 200, r.text

    def refuse(constant):
        raise ValueError(f"{constant} is no JSON number")

    ig = json.loads(r.text, parse_constant=refuse)["explanations"][0]["integrated_gradients"]["value"]
    assert np.isfinite(ig["sum"])
    full = _infer(demo, "digits_lse", row[None], ["integrated_gradients"])
    served = np.asarray(full.json()["outputs"][0]["data"], dtype=np.float32)
    assert ig["sum"] == float(served.sum(dtype=np.float64))


def test_old_artifacts_without_the_explanation_graph(tiny_repo, tmp_path):
    """The tiny fixture has no explain.onnx: nothing is listed, and asking is an unknown output."""
    from fastapi.testclient import TestClient

    from service.dataplane import DataPlane
    from service.repository import ModelRepository
    from service.rest.app import create_app
    from service.settings import Settings

    settings = Settings(model_repository=tiny_repo)
    with TestClient(create_app(DataPlane(settings, ModelRepository(settings)))) as c:
        assert "integrated_gradients" not in {o["name"] for o in c.get("/v2/models/clf").json()["outputs"]}
        r = _infer(c, "clf", np.zeros((1, 4)), ["integrated_gradients"])
        assert r.status_code == 400 and r.json()["error_type"] == "unknown_output"


def test_explanations_over_grpc(demo_repository, tmp_path):
    with run_server(demo_repository, tmp_path, grpc=True) as s:
        client = tg.InferenceServerClient(s.grpc_target)
        x = _digits(3, seed=4).astype(np.float32)
        inp = tg.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        outs = [tg.InferRequestedOutput(n) for n in ("integrated_gradients", "label_flips", "tropical_prediction")]
        result = client.infer("digits_memory", [inp], outputs=outs, parameters={"baseline": "zeros"})
        assert result.as_numpy("integrated_gradients").shape == (3, 64)
        assert result.as_numpy("label_flips").dtype == np.int64
        client.close()


def _explain_through(demo_repository, model: str, x: np.ndarray, wrap, max_batch_size: int, **params):
    """An integrated-gradients request through a real DataPlane whose backend's ``explain`` is
    ``wrap(original)``; returns the response (errors propagate)."""
    import asyncio

    from service.dataplane import DataPlane
    from service.repository import ModelRepository
    from service.settings import Settings
    from service.types import InferInput, InferRequest, RequestedOutput

    settings = Settings(model_repository=demo_repository, max_batch_size=max_batch_size)
    plane = DataPlane(settings, ModelRepository(settings))

    async def main():
        await plane.start()
        try:
            backend = plane.repository.get(model).backend
            backend.explain = wrap(backend.explain)
            request = InferRequest(inputs=[InferInput("input", "FP32", x.shape, x)],
                                   outputs=[RequestedOutput("integrated_gradients")], parameters=params)
            return await plane.infer(model, None, request)
        finally:
            await plane.stop()
    return asyncio.run(main())


def test_explanations_run_in_bounded_chunks(demo_repository):
    """The explanation graph's memory grows with the rows (a path of points per row): it runs
    max_batch_size rows at a time, and the answer is the same as in one piece."""
    x = _digits(10, seed=6).astype(np.float32)

    def run(max_batch_size: int):
        calls = []

        def counting(original):
            def explain(rows, tau, baseline):
                calls.append(len(rows))
                return original(rows, tau, baseline)
            return explain
        response = _explain_through(demo_repository, "digits_deep", x, counting, max_batch_size)
        return response.outputs[0].array, calls

    chunked, calls = run(3)
    whole, one = run(64)
    assert calls == [3, 3, 3, 1] and one == [10]
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_a_slow_explanation_ends_at_the_request_timeout(demo_repository):
    """The explanation graph runs with its batch, chunk by chunk, within the request's timeout: past
    it the request fails with a 504-class RequestTimeout at the timeout, and its chunks that have
    not started never run (4 chunks of 0.3 s against a 0.4 s timeout)."""
    import time

    from service.errors import RequestTimeout

    calls = []

    def slow(original):
        def explain(rows, tau, baseline):
            calls.append(len(rows))
            time.sleep(0.3)
            return original(rows, tau, baseline)
        return explain

    x = _digits(4, seed=7).astype(np.float32)
    with pytest.raises(RequestTimeout, match=r"no result within the request timeout of 0.4 s"):
        _explain_through(demo_repository, "digits_lse", x, slow, 1, timeout=400_000)   # 0.4 s
    # the chunk running at the timeout finishes (the second, or on a slow machine the first); the
    # ones that had not started never run
    assert calls in ([1], [1, 1])


def test_concurrent_requests_batch_together_and_each_gets_its_own_answer(demo_repository, tmp_path):
    """A real server batching concurrent requests (max_queue_delay_ms lets them meet): requests with
    and without explanation outputs, different baselines, top_k and tolerances share backend runs,
    and each answer equals the same request sent alone -- the batcher's split of the batch's outputs
    and of its explanation rows gives every request exactly its own rows and outputs."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    x = _digits(12, seed=11)
    tabular = load_dataset("diabetes").X[:6]

    def body(model, rows, outputs, **params):
        return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP64",
                            "data": rows.ravel().tolist()}],
                "outputs": [{"name": o} for o in outputs], "parameters": params}

    requests = []
    for i in range(6):   # digits_memory: half ask for an explanation, from alternating baselines
        rows = x[2 * i:2 * i + 1 + i % 2]
        outputs = ["prediction", "certified_radius", "attribution_weight"]
        if i % 2 == 0:
            outputs += ["integrated_gradients", "label_flips"]
        requests.append(("digits_memory", body("digits_memory", rows, outputs, top_k=1 + i,
                                                baseline="zeros" if i % 4 == 0 else "mean")))
    for i in range(6):   # diabetes_lse: each row its own tolerance; every other one explained
        outputs = ["prediction", "certified_radius"] + (["integrated_gradients"] if i % 2 else [])
        requests.append(("diabetes_lse", body("diabetes_lse", tabular[i:i + 1], outputs, tau=0.05 * (i + 1))))

    with run_server(demo_repository, tmp_path, max_queue_delay_ms=50, intra_op_threads=1) as s:
        with httpx.Client(base_url=s.url, timeout=30) as client:
            def send(item):
                model, payload = item
                r = client.post(f"/v2/models/{model}/infer", json=payload)
                assert r.status_code == 200, r.text
                return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}

            with ThreadPoolExecutor(len(requests)) as pool:
                together = list(pool.map(send, requests))
            alone = [send(item) for item in requests]
            stats = client.get("/v2/models/digits_memory/stats").json()["model_stats"][0]
    assert max(b["batch_size"] for b in stats["batch_stats"]) > 2          # requests did share runs
    for (model, payload), got, ref in zip(requests, together, alone):
        assert list(got) == [o["name"] for o in payload["outputs"]]        # its outputs, no others
        for name in got:
            assert got[name].shape == ref[name].shape, (model, name)
            if got[name].dtype.kind in "iub":
                np.testing.assert_array_equal(got[name], ref[name], err_msg=f"{model} {name}")
            else:
                np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=f"{model} {name}")
