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
from svc_helpers import run_server

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
