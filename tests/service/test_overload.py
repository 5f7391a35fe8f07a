"""More concurrent requests than the queue holds: each gets 200 or 503 + Retry-After, none hangs,
and the metrics add up."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from svc_helpers import metric_value as _counter
from svc_helpers import run_server
from tiny_model import D

CLIENTS = 48




def test_overload_rejects_fast_and_counts(tiny_repo, tmp_path):
    # A long queue delay keeps requests queued, so a queue of 4 overflows deterministically.
    settings = {"max_queue_size": 4, "max_batch_size": 64, "max_queue_delay_ms": 300, "request_timeout_s": 10}
    body = {"inputs": [{"name": "input", "shape": [1, D], "datatype": "FP32", "data": np.ones(D).tolist()}]}
    with run_server(tiny_repo, tmp_path, **settings) as s:
        before = httpx.get(s.url + "/metrics").text
        limits = httpx.Limits(max_connections=CLIENTS)
        with httpx.Client(base_url=s.url, timeout=20, limits=limits) as client:
            def call(_):
                t0 = time.perf_counter()
                r = client.post("/v2/models/clf/versions/1/infer", json=body)
                return r.status_code, r.headers.get("retry-after"), r.json(), time.perf_counter() - t0

            started = time.perf_counter()
            with ThreadPoolExecutor(CLIENTS) as pool:
                results = list(pool.map(call, range(CLIENTS)))
            elapsed = time.perf_counter() - started
        after = httpx.get(s.url + "/metrics").text

    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503}, statuses
    ok, rejected = statuses.count(200), statuses.count(503)
    assert ok >= 4 and rejected >= 1, statuses
    for status, retry_after, payload, seconds in results:
        assert seconds < 5.0  # nobody hangs
        if status == 503:
            assert retry_after == "1" and payload["error_type"] == "overloaded"
            assert seconds < 2.0  # rejected at once, not after the queue delay
        else:
            assert payload["outputs"][0]["name"] == "prediction"
    assert elapsed < 15

    def delta(name, **labels):
        return _counter(after, name, **labels) - _counter(before, name, **labels)

    mv = {"model": "clf", "version": "1"}
    assert delta("hjserve_inference_requests_total", outcome="success", **mv) == ok
    assert delta("hjserve_inference_requests_total", outcome="failure", **mv) == rejected
    assert delta("hjserve_inference_failures_total", reason="overloaded", **mv) == rejected
    assert delta("hjserve_predictions_total", **mv) == ok
    assert delta("hjserve_http_requests_total", status="503") == rejected
    assert re.search(r'hjserve_queue_size\{model="clf",version="1"\} 0\.0', after)
