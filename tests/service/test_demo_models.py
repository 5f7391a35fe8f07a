"""End to end on the demo models (the shared ``demo_repository`` fixture): every returned tensor
equals ``hjmodel.artifact.load_serving_module`` computed in-process on the same artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from svc_helpers import assert_outputs_close, reference_outputs, run_server

from hjmodel import serving
from service.codecs import HEADER_LENGTH
from service.repository import read_spec

DEMO_MODELS = ["digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse", "diabetes_lse"]


def _latest(repo: Path, model: str) -> Path:
    versions = sorted((p for p in (repo / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return versions[-1]


@pytest.fixture(scope="module")
def demo_server(demo_repository, tmp_path_factory):
    with run_server(demo_repository, tmp_path_factory.mktemp("demo-logs")) as s:
        yield s


def _rows(spec, n, seed):
    return np.abs(np.random.default_rng(seed).standard_normal((n, spec.n_features))).astype(np.float32) * 3


_close = assert_outputs_close


@pytest.mark.parametrize("model", DEMO_MODELS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_demo_model_round_trip(demo_server, demo_repository, model, binary):
    version_dir = _latest(demo_repository, model)
    spec = read_spec(version_dir)
    model, version = version_dir.parent.name, version_dir.name
    client = httpclient.InferenceServerClient(url=demo_server.host_port)
    try:
        assert client.is_model_ready(model, version)
        x = _rows(spec, 9, seed=len(model))
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        names = serving.output_names(spec.task)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
        result = client.infer(model, [inp], model_version=version, outputs=outputs,
                              parameters={"top_k": serving.TOP_K_MAX})
        want = reference_outputs(version_dir, x)
        for name in names:
            _close(result.as_numpy(name), want[name], f"{model}/{name}")
        default = client.infer(model, [inp], model_version=version)
        returned = [o["name"] for o in default.get_response()["outputs"]]
        assert returned == [n for n in serving.DEFAULT_OUTPUTS if n in names]
    finally:
        client.close()


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_demo_model_explain(demo_server, demo_repository, model):
    version_dir = _latest(demo_repository, model)
    spec = read_spec(version_dir)
    x = _rows(spec, 2, seed=1)
    with demo_server.client() as c:
        r = c.post(f"/v1/models/{version_dir.parent.name}:explain", json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    assert len(r.json()["explanations"]) == 2


def test_demo_batch_attribution_binary(demo_server, demo_repository):
    version_dir = _latest(demo_repository, "digits_lse")
    spec = read_spec(version_dir)
    x = _rows(spec, 2000, seed=5)
    raw = x.tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    path = f"/v2/models/{version_dir.parent.name}/versions/{version_dir.name}/batch-attribution"
    with demo_server.client() as c:
        r = c.post(path, content=head + raw, headers={HEADER_LENGTH: str(len(head))})
    assert r.status_code == 200
    records = [json.loads(line) for line in r.text.splitlines()]
    want = reference_outputs(version_dir, x)
    assert len(records) == len(x)
    for name in ("prediction", "certified_radius", "ood_score", "energy_gap"):
        _close(np.asarray([rec[name] for rec in records], dtype=want[name].dtype), want[name], name)


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_demo_model_config_states_the_false_flag_interval(demo_server, demo_repository, model):
    """The model config carries where one deployment's false-flag rate lies (training's interval for
    its calibration rows, hjmodel.train.false_flag_interval): around the artifact's alpha."""
    from hjmodel.train import false_flag_interval

    version_dir = _latest(demo_repository, model)
    cal = read_spec(version_dir).raw["calibration"]
    with demo_server.client() as c:
        params = c.get(f"/v2/models/{version_dir.parent.name}/config").json()["parameters"]
    low, high = json.loads(params["false_flag_rate_95"]["string_value"])
    assert low < float(json.loads(params["alpha"]["string_value"])) < high
    assert (low, high) == pytest.approx(false_flag_interval(cal["alpha"], cal["n_conformal"])[1:])
