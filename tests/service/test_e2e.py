"""End to end against a real server process: metadata, tritonclient round trips, V1, metrics, docs."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from svc_helpers import assert_outputs_close, reference_outputs, run_server
from tiny_model import CLASSES, D

from hjmodel import serving

REQUIRED_METRICS = [
    "hjserve_inference_requests_total", "hjserve_inference_failures_total", "hjserve_predictions_total",
    "hjserve_request_duration_seconds", "hjserve_queue_size", "hjserve_batch_size", "hjserve_ood_flags_total",
    "hjserve_hallucination_flags_total", "hjserve_certified_radius", "hjserve_energy_gap", "hjserve_ood_score",
    "hjserve_class_predictions_total", "hjserve_batch_rows_total", "hjserve_batch_jobs_in_progress",
    "hjserve_model_ready", "hjserve_http_requests_total",
]


def _rows(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32) * 2


def assert_matches(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert_outputs_close(got, want, name, rtol=1e-5, atol=1e-6)


def test_health_and_server_metadata(server, triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "hjserve"
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    assert "statistics" in meta["extensions"]


def test_model_metadata_config_and_readiness(server, triton):
    meta = triton.get_model_metadata("clf")
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, D]}]
    assert [o["name"] for o in meta["outputs"]] == list(serving.output_names("classification"))
    config = triton.get_model_config("clf", "1")
    assert config["max_batch_size"] == 64
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [D]}]
    by_name = {o["name"]: o for o in config["output"]}
    assert by_name["probabilities"]["dims"] == [len(CLASSES)]
    assert by_name["ood_flag"] == {"name": "ood_flag", "data_type": "TYPE_BOOL", "dims": [1], "reshape": {"shape": []}}
    # top-k outputs: their size is the request's top_k, so -1 in config and metadata alike
    assert by_name["attribution_index"]["dims"] == [-1] and by_name["saliency"]["dims"] == [D]
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["attribution_weight"] == [-1, -1]
    assert config["version_policy"] == {"all": {}}   # every version is loaded and addressable
    assert triton.is_model_ready("clf") and triton.is_model_ready("clf", "1")
    assert not triton.is_model_ready("broken") and not triton.is_model_ready("nope")
    with server.client() as c:
        listing = c.get("/v2/models").json()["models"]
    assert {m["name"]: m["versions"] for m in listing} == {"clf": ["1", "2"], "reg": ["1"]}
    reg = triton.get_model_metadata("reg")
    assert "probabilities" not in [o["name"] for o in reg["outputs"]]


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("mode", ["default", "all-json", "all-binary", "mixed"])
def test_tritonclient_round_trip_matches_in_process(server, triton, tiny_repo, binary_in, mode):
    x = _rows(5, seed=1)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    names = serving.output_names("classification")
    if mode == "default":
        outputs = None
    else:
        outputs = [httpclient.InferRequestedOutput(n, binary_data=(mode == "all-binary" or (mode == "mixed" and i % 2 == 1)))
                   for i, n in enumerate(names)]
    result = triton.infer("clf", [inp], model_version="1", outputs=outputs, request_id="req-7",
                          parameters={"top_k": serving.TOP_K_MAX})
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_version"] == "1"
    want = reference_outputs(tiny_repo / "clf" / "1", x)
    returned = [o["name"] for o in response["outputs"]]
    expected = list(serving.DEFAULT_OUTPUTS) if mode == "default" else list(names)
    assert returned == expected
    for name in returned:
        assert_matches(result.as_numpy(name), want[name], name)


def test_top_k_slicing_and_latest_version(server, triton, tiny_repo):
    x = _rows(3, seed=2)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outputs = [httpclient.InferRequestedOutput(n) for n in ("attribution_index", "attribution_weight", "label_sensitivity")]
    result = triton.infer("clf", [inp], outputs=outputs, parameters={"top_k": 3})
    assert result.get_response()["model_version"] == "2"
    want = reference_outputs(tiny_repo / "clf" / "2", x)
    for o in outputs:
        name = o.name()
        assert_matches(result.as_numpy(name), want[name][:, :3], name)


def test_regression_tau_and_diagnostics_parameter(server, tiny_repo):
    x = _rows(4, seed=3)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP64", "data": x.astype(float).tolist()}],
            "parameters": {"tau": 0.7, "diagnostics": True}}
    with server.client() as c:
        r = c.post("/v2/models/reg/infer", json=body)
    assert r.status_code == 200, r.text
    got = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    assert list(got) == list(serving.output_names("regression"))
    want = reference_outputs(tiny_repo / "reg" / "1", x, tau=0.7)
    for name in ("prediction", "certified_radius", "ood_score", "saliency"):
        assert_matches(got[name].astype(want[name].dtype), want[name], name)


def test_v1_predict_and_explain_are_readable(server, tiny_repo):
    x = _rows(2, seed=4)
    want = reference_outputs(tiny_repo / "clf" / "2", x)
    with server.client() as c:
        pred = c.post("/v1/models/clf:predict", json={"instances": x.tolist()}).json()
        expl = c.post("/v1/models/clf:explain", json={"instances": x.tolist(), "parameters": {"top_k": 2}}).json()
        reg = c.post("/v1/models/reg:predict", json={"instances": x.tolist()})
    assert pred["predictions"] == [CLASSES[k] for k in want["prediction"]]
    diag = pred["diagnostics"][0]
    assert set(diag["probabilities"]["value"]) == set(CLASSES)
    assert diag["certified_radius"]["meaning"] and "flagged" in diag["ood"]
    attributions = expl["explanations"][0]["attributions"]["value"]
    assert [a["index"] for a in attributions] == want["attribution_index"][0, :2].tolist()
    assert "Gibbs" in expl["explanations"][0]["attributions"]["meaning"]
    assert reg.status_code == 200 and len(reg.json()["predictions"][0]) == 2


def test_metrics_exposition(server, triton):
    x = _rows(2)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    triton.infer("clf", [inp])
    text = httpx.get(server.url + "/metrics").text
    for name in REQUIRED_METRICS:
        assert f"\n{name}" in text or f"# TYPE {name.removesuffix('_total')}" in text, name
    assert 'hjserve_model_ready{model="clf",version="1"} 1.0' in text
    assert 'hjserve_model_ready{model="broken",version="1"} 0.0' in text
    assert 'route="/v2/models/{model_name}/infer"' in text
    for phase in ("queue", "compute", "diagnostics", "total"):
        assert f'phase="{phase}"' in text


def test_docs_and_openapi(server):
    with server.client() as c:
        assert c.get("/docs").status_code == 200
        spec = c.get("/openapi.json").json()
    assert "/v2/models/{model_name}/infer" in spec["paths"]
    assert "InferenceRequest" in spec["components"]["schemas"]


def test_api_keys_and_admin_key(tiny_repo, tmp_path):
    with run_server(tiny_repo, tmp_path, api_keys="k1,k2", admin_key="root") as s, s.client() as c:
        assert c.get("/v2/health/ready").status_code == 200
        r = c.get("/v2/models/clf")
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
        assert c.get("/v2/models/clf", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v2/models/clf", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.get("/v2/models/clf", headers={"X-API-Key": "k1"}).status_code == 200
        r = c.post("/v2/repository/index", headers={"X-API-Key": "k1"})
        assert r.status_code == 403 and r.json()["error_type"] == "forbidden"
        assert c.post("/v2/repository/index").status_code == 401
        assert c.post("/v2/repository/index", headers={"Authorization": "Bearer root"}).status_code == 200


def test_statistics_extension_has_tritons_shape(server, triton):
    x = _rows(3)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    before = triton.get_inference_statistics("reg", "1")["model_stats"][0]
    triton.infer("reg", [inp], model_version="1")
    stats = triton.get_inference_statistics("reg", "1")["model_stats"][0]
    assert stats["name"] == "reg" and stats["version"] == "1"
    assert stats["inference_count"] == before["inference_count"] + 3
    assert stats["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert stats["inference_stats"]["success"]["ns"] > 0 and stats["execution_count"] >= 1
    assert {"queue", "compute_infer", "fail"} <= set(stats["inference_stats"])
    assert stats["batch_stats"][0]["compute_infer"]["count"] >= 1
    # perf_analyzer refuses server statistics whose compute counts differ
    inf = stats["inference_stats"]
    assert inf["compute_input"]["count"] == inf["compute_infer"]["count"] == inf["compute_output"]["count"]
    for entry in stats["batch_stats"]:
        assert entry["compute_input"]["count"] == entry["compute_infer"]["count"] == entry["compute_output"]["count"]
    everything = triton.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in everything} >= {("clf", "1"), ("clf", "2"), ("reg", "1")}
    assert len(triton.get_inference_statistics("clf")["model_stats"]) == 2
