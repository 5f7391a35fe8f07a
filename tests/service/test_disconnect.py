"""A client that gives up: its request's work stops, and nobody else pays for it.

A request of many rows is split into batches that queue behind one another (its later batches wait
for room). When its client hangs up (a client timeout, a cancelled job), REST used to compute every
batch anyway, for nobody, holding the model's queue full meanwhile: every other client got 503 for
as long. gRPC cancels a call's handler when its client goes; REST now does the same.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from svc_helpers import metric_value, run_server

pytestmark = pytest.mark.timeout(180)


def _body(rows: int) -> dict:
    x = np.random.default_rng(2).normal(size=(rows, 4)).astype(np.float32)
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "parameters": {"diagnostics": True}}


@pytest.mark.parametrize("route", ["/v2/models/iris_memory/infer", "/v1/models/iris_memory:explain"])
def test_a_request_whose_client_hung_up_stops_and_frees_the_queue(hj_repo, tmp_path, route):
    big = _body(60_000)   # ~940 batches of 64 rows with every diagnostic: seconds of work
    if route.startswith("/v1"):
        big = {"instances": np.asarray(big["inputs"][0]["data"]).reshape(-1, 4).tolist()}
    small = _body(1)
    with run_server(hj_repo, tmp_path, log_level="info") as s, s.client() as c:
        assert c.post("/v2/models/iris_memory/infer", json=small).status_code == 200
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + route, json=big, timeout=1.5)   # the client gives up
        time.sleep(0.5)
        # the model answers others at once: the abandoned request's batches are no longer queued
        replies = [c.post("/v2/models/iris_memory/infer", json=small).status_code for _ in range(5)]
        assert replies == [200] * 5, replies
        deadline = time.monotonic() + 10
        while " 499 " not in s.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = s.log.read_text()
    (line,) = [line for line in log.splitlines() if " 499 " in line]
    assert "model=iris_memory" in line   # the access log says the client closed the request
    assert "Traceback" not in log


def test_a_large_request_does_not_lock_other_clients_out(hj_repo, tmp_path):
    """A 60,000-row request is ~940 batches. All of them used to wait for queue room at once, so
    they held the model's queue (max_queue_size) full until the last one ran: every other client got
    503 for the request's whole ~10 s. Now a request keeps only a few of its batches queued at a
    time: the others' requests queue between them and are answered, while the large one goes on."""
    import threading

    big, small = _body(60_000), _body(1)
    result: dict[str, object] = {}
    with run_server(hj_repo, tmp_path) as s, s.client() as c:
        def large() -> None:
            with httpx.Client(base_url=s.url, timeout=120) as own:
                result["large"] = own.post("/v2/models/iris_memory/infer", json=big)

        worker = threading.Thread(target=large)
        worker.start()
        time.sleep(1.0)
        replies, waits = [], []
        for _ in range(10):
            start = time.monotonic()
            replies.append(c.post("/v2/models/iris_memory/infer", json=small).status_code)
            waits.append(time.monotonic() - start)
        still_running = "large" not in result
        worker.join(120)
    assert still_running   # the others were answered while the large request was being computed
    assert replies == [200] * 10, replies
    assert max(waits) < 2.0, waits
    large_reply = result["large"]
    assert large_reply.status_code == 200
    assert large_reply.json()["outputs"][0]["shape"][0] == 60_000


def _hang_up_mid_body(host_port: str, path: str, body: bytes, headers: str = "", reset: bool = False) -> None:
    """Send a request head promising ``body`` and half of it, then close (with ``reset``: an RST)."""
    import socket
    import struct

    host, port = host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode()
                     + body[: len(body) // 2])
        time.sleep(0.05)   # the server reads the half it was sent
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_client_that_hangs_up_while_sending_its_body_is_a_499_not_a_server_error(hj_repo, tmp_path, reset):
    """A client that goes before its body is whole (a crash, a timeout mid-upload) on every route that
    reads a body: the request ends as the client closing it (499 in the access log and the metrics),
    never as an unhandled error (500, a traceback per request), and its room in the request-memory
    budget comes back."""
    import json

    rows = json.dumps(_body(2_000)).encode()
    v1 = json.dumps({"instances": np.ones((2_000, 4)).tolist()}).encode()
    ndjson = b"\n".join(json.dumps([1.0, 2.0, 3.0, 4.0]).encode() for _ in range(20_000))
    routes = [("/v2/models/iris_memory/infer", rows, "Content-Type: application/json\r\n"),
              ("/v2/models/iris_memory/versions/1/infer", rows, "Inference-Header-Content-Length: 10\r\n"),
              ("/v1/models/iris_memory:predict", v1, ""),
              ("/v1/models/iris_memory:explain", v1, ""),
              ("/v2/models/iris_memory/batch-attribution", ndjson, "Content-Type: application/x-ndjson\r\n"),
              ("/v2/repository/models/iris_memory/load", b'{"parameters": {}}' + b" " * 8_000, "")]
    with run_server(hj_repo, tmp_path, log_level="info", model_control_mode="explicit") as s, s.client() as c:
        for path, body, headers in routes:
            _hang_up_mid_body(s.host_port, path, body, headers, reset)
        deadline = time.monotonic() + 10
        while s.log.read_text().count(" 499 ") < len(routes) and time.monotonic() < deadline:
            time.sleep(0.1)
        metrics = c.get("/metrics").text
        assert c.post("/v2/models/iris_memory/infer", json=_body(1)).status_code == 200   # it serves on
        log = s.log.read_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]
    closed = [line for line in log.splitlines() if " 499 " in line]
    assert len(closed) == len(routes), closed
    assert 'status="500"' not in metrics
    assert metric_value(metrics, "hjserve_request_memory_bytes") == 0
