"""Random wire fuzz, below the schema: V2 bodies (JSON and the binary extension), V1 bodies and batch
bodies through the real app in process, and gRPC ``ModelInferRequest`` messages through the decoder,
drawn from hostile values -- shapes with zero, negative, 2**31 and 2**62 dimensions or 100 of them,
datatypes the model does not take, integers past every range, NaN, typed contents wider than their
datatype, binary sizes past the body, unknown parameters and outputs. Invariant: never a 5xx (but the
fixture's corrupt model's documented 503), never an error in a batch stream that is not the
client's, never an exception from the gRPC decoder that is not a mapped error.

The schema fuzzer (``test_fuzz.py``) draws valid-looking shapes; this one found what it did not: a
zero beside a huge dimension (``[0, 2**62]``) and more than 64 dimensions answered 500 / INTERNAL,
and out-of-range typed gRPC contents INTERNAL. Fixed seeds; ``HJSERVE_TEST_FUZZ_EXAMPLES`` scales the
number of cases (default 60: 2,400 REST requests, 12,000 gRPC messages)."""

from __future__ import annotations

import json
import os
import random

import pytest

EXAMPLES = int(os.environ.get("HJSERVE_TEST_FUZZ_EXAMPLES", "60"))
DATATYPES = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT64", "FP16", "FP32", "FP64", "BF16",
             "BYTES", "X", ""]
DIMS = [0, 1, 2, 3, 4, -1, 2**31, 2**62]
VALUES = [0, 1, -1, 1.5, 1e308, -1e-320, 2**63, -(2**63) - 1, 2**64, 10**30, True, None, "1", "a", [], [1], {}]


def _shape(rng: random.Random) -> list:
    if rng.random() < 0.05:
        return [1] * 100
    if rng.random() < 0.05:
        return rng.sample([0, 2**62, rng.choice(DIMS)], 3)[: rng.choice([2, 3])]
    if rng.random() < 0.08:
        return rng.choice([None, "1", [1.0, 4], [True, 4], {}])
    return [rng.choice(DIMS) for _ in range(rng.choice([0, 1, 2, 2, 2, 3]))]


def _tensor(rng: random.Random, binary: bool) -> dict:
    tensor = {"name": rng.choice(["input", "input", "x"]), "datatype": rng.choice(DATATYPES), "shape": _shape(rng)}
    if binary:
        tensor["parameters"] = {"binary_data_size": rng.choice([0, 4, 16, 32, -1, 2**40, "4", None])}
    elif isinstance(tensor["shape"], list) and len(tensor["shape"]) > 3:
        tensor["data"] = [1.5]                          # as many values as the shape holds
    else:
        n = rng.choice([0, 1, 4, 8, 16])
        tensor["data"] = rng.choice([[rng.choice(VALUES) for _ in range(n)], [[rng.choice(VALUES)] * 4] * 2,
                                     [1.0] * 4 * rng.choice([1, 2]), "x", None, 5])
    if rng.random() < 0.1:
        tensor.setdefault("parameters", {})["binary_data"] = rng.choice([True, 1, "x"])
    return tensor


def _v2_body(rng: random.Random) -> tuple[bytes, dict[str, str]]:
    binary = rng.random() < 0.3
    obj: dict = {"inputs": [_tensor(rng, binary) for _ in range(rng.choice([0, 1, 1, 1, 2]))]}
    if rng.random() < 0.3:
        obj["parameters"] = {rng.choice(["top_k", "tau", "alpha", "diagnostics", "baseline", "timeout", "x"]):
                             rng.choice(VALUES)}
    if rng.random() < 0.3:
        obj["outputs"] = [{"name": rng.choice(["prediction", "probabilities", "nope", "certified_radius",
                                               "attribution_indices"]),
                           "parameters": rng.choice([{}, {"binary_data": rng.choice([True, 2, "no"])},
                                                     {"class_count": 2}])}]
    if rng.random() < 0.2:
        obj["instances"] = [[rng.choice(VALUES)] * 4]
    head = json.dumps(obj).encode()
    headers = {"content-type": "application/json"}
    if not binary:
        return head, headers
    headers["Inference-Header-Content-Length"] = str(rng.choice([len(head), len(head), len(head) + 3, len(head) - 1, 0]))
    return head + bytes(rng.choice([0, 4, 16, 32, 64])), headers


def _v1_body(rng: random.Random) -> bytes:
    instances = rng.choice([[[rng.choice(VALUES)] * 4], [[1.0] * 4], [[[1.0]]], [], "x", [[1.0] * 4] * 3])
    return json.dumps({"instances": instances, "parameters": rng.choice([{}, {"top_k": rng.choice(VALUES)}])}).encode()


ROUTES = ["/v2/models/clf/infer", "/v2/models/reg/infer", "/v2/models/clf/batch-attribution",
          "/v2/models/clf/versions/1/batch-attribution?layout=columns", "/v1/models/clf:predict",
          "/v1/models/reg:explain"]


@pytest.fixture(scope="module")
def app_client(tiny_repo):
    from fastapi.testclient import TestClient

    from service.dataplane import DataPlane
    from service.repository import ModelRepository
    from service.rest.app import create_app
    from service.settings import Settings

    settings = Settings(model_repository=tiny_repo, max_body_bytes=1024 * 1024, model_control_mode="explicit")
    with TestClient(create_app(DataPlane(settings, ModelRepository(settings))), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("seed", range(2))
def test_random_bodies_never_get_a_5xx(app_client, seed):
    rng = random.Random(seed)
    failures = []
    for _ in range(20 * EXAMPLES):
        route = rng.choice(ROUTES)
        body, headers = (_v1_body(rng), {"content-type": "application/json"}) if "/v1/" in route else _v2_body(rng)
        r = app_client.post(route, content=body, headers=headers)
        if r.status_code >= 500 or (r.status_code == 200 and "batch" in route and b'"internal_error"' in r.content):
            failures.append((route, r.status_code, r.text[:200], body[:300]))
    assert not failures, failures[:3]


def _message(rng: random.Random):
    from service.grpc import inference_pb2 as pb

    values = {"bool_contents": [True, False], "int_contents": [0, -1, 2**31 - 1, -(2**31), 300, -129],
              "int64_contents": [2**63 - 1, -(2**63), 0], "uint_contents": [0, 2**32 - 1, 256, 70_000],
              "uint64_contents": [2**64 - 1, 0], "fp32_contents": [float("nan"), float("inf"), 1e38, -0.0, 1.5],
              "fp64_contents": [1e308, float("nan"), -1e-320, 1.0], "bytes_contents": [b"", b"\xff" * 3, b"abc"]}
    m = pb.ModelInferRequest(model_name="clf")
    for _ in range(rng.choice([0, 1, 1, 2])):
        tensor = m.inputs.add(name=rng.choice(["input", "x", ""]), datatype=rng.choice(DATATYPES))
        tensor.shape.extend([1] * 100 if rng.random() < 0.05 else
                            [rng.choice(DIMS) for _ in range(rng.choice([0, 1, 2, 3]))])
        if rng.random() < 0.3:
            m.raw_input_contents.append(bytes(rng.randrange(0, 40)))
        else:
            field = rng.choice(list(values))
            getattr(tensor.contents, field).extend(rng.choice(values[field]) for _ in range(rng.choice([0, 1, 2, 4, 8])))
        if rng.random() < 0.1:
            tensor.parameters["binary_data_size"].int64_param = rng.choice([0, 5, -1])
    if rng.random() < 0.2:
        m.parameters[rng.choice(["top_k", "binary_data_output", "x"])].bool_param = True
    if rng.random() < 0.2:
        m.outputs.add(name="probabilities").parameters["binary_data"].bool_param = True
    return m


def test_random_grpc_messages_decode_or_fail_with_a_mapped_error():
    from service.codecs.grpc import decode_infer_request, decode_memory
    from service.errors import HJServeError

    rng = random.Random(0)
    failures = []
    for _ in range(200 * EXAMPLES):
        m = _message(rng)
        try:
            decode_memory(m)
            decode_infer_request(m)
        except HJServeError:
            pass
        except Exception as exc:  # noqa: BLE001 - the invariant is that nothing else escapes
            failures.append((type(exc).__name__, str(exc)[:120], str(m)[:200]))
    assert not failures, failures[:3]
