"""bench/chaos.py's verdict: what a server is left with after misbehaving clients, read from its
metrics and its log -- every value 0 for a server that kept nothing and did nothing wrong."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def chaos(load_bench):
    return load_bench("chaos")


CLEAN = """\
hjserve_http_requests_total{method="POST",route="/v2/models/{model_name}/infer",status="200"} 120.0
hjserve_http_requests_total{method="POST",route="/v2/models/{model_name}/infer",status="499"} 7.0
hjserve_grpc_requests_total{code="OK",method="ModelInfer"} 30.0
hjserve_grpc_requests_total{code="DEADLINE_EXCEEDED",method="ModelInfer"} 4.0
hjserve_request_memory_bytes 0.0
hjserve_queue_size{model="digits_lse",version="1"} 0.0
hjserve_batch_jobs_in_progress{model="digits_lse",version="1"} 0.0
hjserve_batch_spool_bytes 0.0
"""
LOG = "2026-12-06 13:00:00,000 WARNING hjserve: each gRPC ModelInfer call reserves 128 bytes\n"


def test_a_server_that_kept_nothing_gets_all_zeros(chaos):
    assert set(chaos.verdict(CLEAN, LOG).values()) == {0}


@pytest.mark.parametrize("metric, log, row, value", [
    ('hjserve_http_requests_total{method="POST",route="/v2/models/{model_name}/infer",status="500"} 3.0', "",
     "HTTP 500 answers", 3),
    ('hjserve_grpc_requests_total{code="INTERNAL",method="ModelInfer"} 1.0', "", "gRPC INTERNAL answers", 1),
    ('hjserve_grpc_requests_total{code="UNKNOWN",method="ModelStreamInfer"} 2.0', "", "gRPC UNKNOWN answers", 2),
    ("", "x ERROR service: unhandled error on POST /infer\nTraceback (most recent call last):\n  ...\nKeyError: 1\n",
     "tracebacks in the log", 1),
    ("", "x ERROR grpc._cython.cygrpc: ExecuteBatchError raised in core\n", "ERROR lines in the log", 1),
])
def test_each_fault_shows_in_its_row(chaos, metric, log, row, value):
    found = chaos.verdict(CLEAN + metric + "\n", LOG + log)
    assert found[row] == value and sum(found.values()) >= value


def test_what_is_still_held_shows_in_its_gauges_row(chaos):
    held = CLEAN.replace("hjserve_request_memory_bytes 0.0", "hjserve_request_memory_bytes 8056.0") \
        .replace('hjserve_queue_size{model="digits_lse",version="1"} 0.0', 'hjserve_queue_size{model="digits_lse",version="1"} 2.0')
    found = chaos.verdict(held, LOG)
    assert found["hjserve_request_memory_bytes after"] == 8056 and found["hjserve_queue_size after"] == 2
