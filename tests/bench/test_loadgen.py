"""``bench/loadgen.py``'s batch-job client against a real server: it counts every answered row in both
layouts, asks for the outputs it names (the service benchmark compares a job and the in-process
``Predictor`` on the same outputs), and raises on a job that fails. Its gRPC closed loops (unary
calls, and a stream per worker) count answers and failed requests as failed."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from service.codecs import HEADER_LENGTH
from service.testing import run_server

ASKED = ["prediction", "certified_radius", "ood_flag"]


@pytest.fixture(scope="module")
def loadgen(load_bench):
    return load_bench("loadgen")


@pytest.fixture(scope="module")
def client(demo_repository, tmp_path_factory):
    with run_server(demo_repository, tmp_path_factory.mktemp("logs")) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def rows():
    return np.abs(np.random.default_rng(3).standard_normal((700, 64))).astype(np.float32) * 3


def _lines(client, head_and_body) -> list[dict]:
    head, body = head_and_body
    r = client.post("/v2/models/digits_lse/batch-attribution", content=body,
                    headers={HEADER_LENGTH: str(len(head))}, params={"chunk_rows": 256})
    assert r.status_code == 200, r.text[:300]
    return [json.loads(line) for line in r.text.splitlines()]


def test_batch_job_counts_every_row_in_both_layouts(loadgen, client, rows):
    for layout in ("rows", "columns"):
        assert loadgen.batch_job(client, "digits_lse", rows, layout) == len(rows)
        assert loadgen.batch_job(client, "digits_lse", rows, layout, outputs=ASKED) == len(rows)


def test_batch_body_asks_for_the_outputs_it_names(loadgen, client, rows):
    every = _lines(client, loadgen.batch_body(rows))
    named = _lines(client, loadgen.batch_body(rows, ASKED))
    assert len(every) == len(named) == len(rows)
    assert set(named[0]) == {"row", "class", *ASKED}
    assert {"saliency", "attribution_index", "ood_score"} <= set(every[0])   # no outputs named: every one
    for a, b in zip(every, named, strict=True):
        assert {k: a[k] for k in b} == b


def test_batch_job_raises_on_a_failed_job(loadgen, client, rows):
    with pytest.raises(RuntimeError, match="400"):
        loadgen.batch_job(client, "digits_lse", rows, outputs=["no_such_output"])
    with pytest.raises(RuntimeError, match="400"):
        loadgen.batch_job(client, "digits_lse", rows[:, :10])


def test_large_request_answers_every_row_and_raises_on_a_failed_one(loadgen, client, rows):
    """``bench/ab_server.py --protocol large``'s request: one online request of all the rows, binary
    or JSON, with the default outputs or every one; a failed request raises instead of reading as fast."""
    for diagnostics, binary in ((False, True), (True, True), (False, False)):
        assert loadgen.large_request(client, "digits_lse", loadgen.large_body(rows, diagnostics, binary), len(rows)) > 0
    with pytest.raises(RuntimeError, match="answered"):
        loadgen.large_request(client, "digits_lse", loadgen.large_body(rows), len(rows) + 1)
    with pytest.raises(RuntimeError, match="400"):
        loadgen.large_request(client, "digits_lse", loadgen.large_body(rows[:, :10]), len(rows))
    with pytest.raises(RuntimeError, match="404"):
        loadgen.large_request(client, "no_such_model", loadgen.large_body(rows, binary=False), len(rows))


@pytest.mark.parametrize("kind", ["grpc_loop", "stream_loop"])
def test_the_grpc_loops_count_answers_and_failures(loadgen, demo_repository, tmp_path, kind):
    """Both gRPC loops answer every request of a valid message, and count every request of one the
    server refuses (an unknown model) as an error: the unary call fails with a status, the stream
    answers it with ``error_message`` in its place and goes on."""
    import asyncio

    from service.grpc import inference_pb2 as pb

    def message(model: str) -> bytes:
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
        return request.SerializeToString()

    loop = getattr(loadgen, kind)
    method = "/inference.GRPCInferenceService/" + ("ModelInfer" if kind == "grpc_loop" else "ModelStreamInfer")
    with run_server(demo_repository, tmp_path, grpc=True) as s:
        served = asyncio.run(loop(s.grpc_target, method, message("digits_lse"), 0.5, 3, warmup=2))
        refused = asyncio.run(loop(s.grpc_target, method, message("nope"), 0.5, 3, warmup=2))
    assert served["n"] > 0 and served["errors"] == 0 and served["rps"] > 0, served
    assert refused["n"] > 0 and refused["errors"] == refused["n"], refused
