"""A client that does not read its response.

A response the client does not read waits in the server's write buffer, whole: uvicorn hands it to
the transport in one write, and the transport keeps what the socket does not take. Nothing bounded
how long or how much: four connections that each sent 4.9 MB (20,000 binary rows of ``digits_lse``
with every diagnostic) and read nothing held ~460 MB of the server for as long as they stayed open
(a scratch probe at ``d626605``: 30 s, unchanged) -- a few more and the shipped pod (2Gi) is killed,
with every model it serves. Now an answer must fit the request-memory budget
(``max_request_memory_bytes``) beside the unread ones, whose buffered bytes count against it until
the socket takes them (503 ``request_memory_full`` when they leave no room), and a connection whose
client takes less than one write window in ``send_timeout_s`` is closed, which frees them."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import numpy as np
import pytest
from svc_helpers import run_server
from tiny_model import D

pytestmark = pytest.mark.timeout(180)

MB = 1_000_000


def _body(rows: int) -> tuple[dict[str, str], bytes]:
    """(headers, body) of a request for a large JSON answer: binary rows in, every diagnostic out."""
    x = np.random.default_rng(0).normal(size=(rows, D)).astype(np.float32)
    raw = x.tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": [rows, D], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"diagnostics": True}}).encode()
    return {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}, head + raw


def _stalled(port: int, rows: int) -> socket.socket:
    """A connection that sends :func:`_body`'s request and reads nothing (its receive buffer as
    small as the kernel allows)."""
    headers, body = _body(rows)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\n"
              + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
              + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return s


def _held(client) -> float:
    """The request-memory gauge: what requests hold of ``max_request_memory_bytes`` now."""
    text = client.get("/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("hjserve_request_memory_bytes ")))


def _until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_a_response_nobody_reads_counts_against_the_memory_budget_and_is_cut_off(tiny_repo, tmp_path):
    rows = 60_000   # binary rows in (1 MB), every diagnostic out as JSON: ~28 MB
    # keep_alive_s below send_timeout_s (as by default: 5 and 30): uvicorn closes the idle connection
    # first, and a closing transport still holds what it could not send (it was forgotten then)
    with run_server(tiny_repo, tmp_path, max_request_memory_bytes=40 * MB, send_timeout_s=8, keep_alive_s=1,
                    log_level="info") as s, s.client() as c:
        port = int(s.url.rsplit(":", 1)[1])
        stalled = _stalled(port, rows)
        try:
            # its unread bytes are counted (all but what the kernel's buffers took)...
            assert _until(lambda: _held(c) > 15 * MB, 20), _held(c)
            # ...so the same answer for another client does not fit beside them: refused, not buffered
            other = _stalled(port, rows)
            other.settimeout(20)
            refused = b""
            while b"}" not in refused and (chunk := other.recv(4096)):   # the head, then the JSON error
                refused += chunk
            other.close()
            assert refused.startswith(b"HTTP/1.1 503") and b"request_memory_full" in refused, refused[:300]
            # the first client takes nothing for send_timeout_s: its connection is closed, the bytes given back
            assert _until(lambda: _held(c) == 0, 25), _held(c)
            again = c.post("/v2/models/clf/infer", content=_body(rows)[1], headers=_body(rows)[0])
            assert again.status_code == 200 and again.json()["outputs"][0]["shape"] == [rows]
            # what it reads now is what the kernel's buffers held when the server let go: the
            # response is cut short of its Content-Length (a client can tell), then the connection ends
            stalled.settimeout(10)
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := stalled.recv(1 << 20):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head[:100]
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            assert len(body) < length, (len(body), length)
        finally:
            stalled.close()
    assert "took less than 65536 bytes of its response in 8 s" in s.log.read_text()


def test_a_slow_reader_that_keeps_reading_gets_its_whole_response(tiny_repo, tmp_path):
    """A client reading slowly but steadily (~4 KB every 20 ms: its receive buffer is 4 KB) for longer
    than send_timeout_s is not cut off: progress is read from the kernel's send queue, which shrinks
    with every read (the transport's buffer moves only when megabytes of the socket's are free again)."""
    with run_server(tiny_repo, tmp_path, send_timeout_s=3) as s:
        port = int(s.url.rsplit(":", 1)[1])
        reader = _stalled(port, 3_000)
        try:
            reader.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                data += reader.recv(4096)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            started = time.monotonic()
            while len(body) < length:
                body += reader.recv(64 * 1024)
                time.sleep(0.02)
            assert time.monotonic() - started > 3, "the response came faster than the timeout: no slow reader"
            assert json.loads(body)["outputs"][0]["shape"][0] == 3_000
        finally:
            reader.close()
