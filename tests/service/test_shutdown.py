"""Shutting down: what SIGTERM (a rolling update, a scale-in, ``docker stop``) does to work in flight.

A real server process gets the signal while a batch attribution job streams and while online calls
run, on both transports. Nothing accepted may be dropped silently: a call in flight finishes, and a
batch stream that cannot finish within ``HJSERVE_SHUTDOWN_GRACE_S`` ends with the error line of its
contract (``{"error", "error_type": "shutting_down", "row": i}``: every row before ``i`` answered,
none from ``i`` on), on a complete HTTP response, before the server would have to cut it.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from svc_helpers import run_server
from tiny_model import D

pytestmark = pytest.mark.timeout(180)

GRACE_S = 2.0


def _batch_body(rows: int) -> str:
    rng = np.random.default_rng(0)
    return "\n".join(json.dumps(r) for r in rng.normal(size=(rows, D)).round(4).tolist())


def _health(target: str) -> str:
    """grpc.health.v1 Check of the whole server: SERVING, NOT_SERVING, or the call's status code."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_sigterm_ends_a_batch_stream_with_its_error_line_before_the_grace_runs_out(tiny_repo, tmp_path):
    rows = 40_000   # one row per graph call: far longer than the grace
    with run_server(tiny_repo, tmp_path, grpc=True, shutdown_grace_s=GRACE_S, log_level="info") as s:
        assert _health(s.grpc_target) == "SERVING"
        lines: list[dict] = []
        started = threading.Event()
        failure: list[BaseException] = []

        def stream() -> None:
            try:
                with httpx.Client(base_url=s.url, timeout=60) as c, c.stream(
                        "POST", "/v2/models/clf/batch-attribution?chunk_rows=1", content=_batch_body(rows),
                        headers={"content-type": "application/x-ndjson"}) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        lines.append(json.loads(line))
                        if len(lines) == 50:
                            started.set()
            except BaseException as exc:   # an incomplete chunked body is what a cut stream looks like
                failure.append(exc)
                started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60) and not failure, failure
        signalled = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # draining: not ready for new work, while the stream is still being answered
        assert _health(s.grpc_target) in ("NOT_SERVING", "UNAVAILABLE")
        reader.join(30)
        assert not reader.is_alive()
        assert not failure, f"the stream was cut: {failure[0]!r}"
        s.proc.wait(30)
        exited = time.monotonic() - signalled

    *answered, last = lines
    assert last["error_type"] == "shutting_down", last
    assert "shutting down" in last["error"]
    assert 50 <= last["row"] < rows
    assert [line["row"] for line in answered] == list(range(last["row"]))   # every row before it, in order
    assert exited < GRACE_S + 5
    log = s.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def test_calls_in_flight_at_sigterm_finish_and_later_ones_are_refused_cleanly(hj_repo, tmp_path):
    """Online calls on both transports, back to back from several clients across the signal, each
    with its own request id: each one finishes with its answer, is answered 503 ``shutting_down``
    (gRPC UNAVAILABLE), or never reached the server's handlers -- a connection refused, or one the
    closing server took in but never read (the request id is not in the access log: the classic race
    of a connection opened as a server stops, which only the client can retry). None that the
    server took is cut off or answered with another error."""
    import itertools

    x = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "parameters": {"diagnostics": True}}
    ids = itertools.count()
    outcomes: dict[str, list[tuple[str, str]]] = {"http": [], "grpc": []}   # (request id, outcome)
    stop = threading.Event()
    with run_server(hj_repo, tmp_path, grpc=True, shutdown_grace_s=GRACE_S, log_level="info") as s:
        import tritonclient.grpc as grpcclient

        def http_loop() -> None:
            while not stop.is_set():
                rid = f"h{next(ids)}"
                try:
                    with httpx.Client(base_url=s.url, timeout=30) as c:
                        r = c.post("/v2/models/iris_memory/infer", json=body, headers={"x-request-id": rid})
                    outcome = str(r.status_code) + ("" if r.status_code == 200 else " " + r.json()["error_type"])
                except httpx.ConnectError:
                    outcomes["http"].append((rid, "refused"))
                    return
                except httpx.HTTPError:   # the connection closed: maybe before it was read
                    outcome = "closed"
                outcomes["http"].append((rid, outcome))

        def grpc_loop() -> None:
            client = grpcclient.InferenceServerClient(s.grpc_target)
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            while not stop.is_set():
                rid = f"g{next(ids)}"
                try:
                    client.infer("iris_memory", [inp], parameters={"diagnostics": "true"}, client_timeout=30,
                                 headers={"x-request-id": rid})
                    outcomes["grpc"].append((rid, "OK"))
                except Exception as exc:   # tritonclient's InferenceServerException
                    status = str(getattr(exc, "status", lambda: "")())
                    if "UNAVAILABLE" in status and "shutting down" in str(exc):
                        outcomes["grpc"].append((rid, "503 shutting_down"))
                    elif "UNAVAILABLE" in status:
                        outcomes["grpc"].append((rid, "refused"))
                        return
                    else:
                        outcomes["grpc"].append((rid, "closed" if "CANCELLED" in status else f"{status}: {exc}"))

        threads = [threading.Thread(target=f) for f in (http_loop, http_loop, grpc_loop, grpc_loop)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(30)
        stop.set()
        for t in threads:
            t.join(30)
        log = s.log.read_text()
    taken = {line.split("request_id=")[1].split()[0] for line in log.splitlines() if "request_id=" in line}
    for transport, seen in outcomes.items():
        assert [o for _, o in seen].count("OK" if transport == "grpc" else "200") >= 1, (transport, seen)
        for rid, outcome in seen:
            assert outcome in ("200", "OK", "503 shutting_down", "refused", "closed"), (transport, rid, outcome)
            if outcome == "closed":   # never taken by the server, or it would say how it ended
                assert rid not in taken, (transport, rid, [line for line in log.splitlines() if rid in line])
    assert "Traceback" not in log


def test_a_call_that_would_outlast_the_grace_is_answered_503_shutting_down_not_cut(hj_repo, tmp_path):
    """A call whose rows take seconds (60,000 rows, every diagnostic of a memory model) on each
    transport at SIGTERM, grace 2 s: each is answered -- REST 503 ``shutting_down`` with
    Retry-After, gRPC UNAVAILABLE -- before the grace ends, instead of its connection being cut
    (uvicorn cancels what runs past the grace; grpcio aborts it)."""
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(2).normal(size=(60_000, 4)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "parameters": {"diagnostics": True}}
    results: dict[str, object] = {}
    with run_server(hj_repo, tmp_path, grpc=True, shutdown_grace_s=GRACE_S) as s:
        def rest() -> None:
            try:
                with httpx.Client(base_url=s.url, timeout=60) as c:
                    results["rest"] = c.post("/v2/models/iris_memory/infer", json=body)
            except httpx.HTTPError as exc:
                results["rest"] = exc

        def grpc_call() -> None:
            client = grpcclient.InferenceServerClient(s.grpc_target)
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            try:
                results["grpc"] = client.infer("iris_memory", [inp], parameters={"diagnostics": "true"},
                                               client_timeout=60)
            except Exception as exc:   # tritonclient's InferenceServerException
                results["grpc"] = exc

        threads = [threading.Thread(target=f) for f in (rest, grpc_call)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert not results, {k: getattr(v, "text", v) for k, v in results.items()}   # both still computing
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        s.proc.wait(30)
    rest_reply, grpc_reply = results["rest"], results["grpc"]
    assert isinstance(rest_reply, httpx.Response), rest_reply
    assert rest_reply.status_code == 503 and rest_reply.json()["error_type"] == "shutting_down", rest_reply.text
    assert rest_reply.headers["retry-after"] == "1"
    assert "UNAVAILABLE" in str(grpc_reply.status()) and "shutting down" in str(grpc_reply), grpc_reply
    log = s.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
