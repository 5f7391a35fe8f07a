"""Batch bodies are spooled (memory, then a file): the spool has one total limit for all jobs, its
directory is configurable, and a spool write that fails (a full disk) is a clear 507 -- never a 500,
never a pod evicted for filling its ``/tmp`` volume. Against real server processes."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from svc_helpers import run_server
from tiny_model import D

NDJSON = {"content-type": "application/x-ndjson"}
ROUTE = "/v2/models/clf/versions/1/batch-attribution"
MB = 1_000_000


def _ndjson(size: int) -> bytes:
    """NDJSON rows of the tiny model, at least ``size`` bytes."""
    line = (json.dumps(np.random.default_rng(0).standard_normal(D).round(6).tolist()) + "\n").encode()
    return line * (size // len(line) + 1)


def _spooled(server) -> float:
    """The ``hjserve_batch_spool_bytes`` gauge."""
    with server.client() as c:
        text = c.get("/metrics").text
    (value,) = [float(line.split()[1]) for line in text.splitlines() if line.startswith("hjserve_batch_spool_bytes ")]
    return value


def _wait_spooled(server, at_least: float, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    while (value := _spooled(server)) < at_least:
        assert time.monotonic() < deadline, f"spool holds {value} bytes, expected >= {at_least}"
        time.sleep(0.05)
    return value


class _HeldUpload:
    """A chunked batch upload on a raw socket: ``send`` part of the body, keep the job open, then
    ``finish`` it and read the status."""

    def __init__(self, server):
        host, port = server.host_port.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.sock.sendall(f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                          "Transfer-Encoding: chunked\r\n\r\n".encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def finish(self) -> int:
        self.sock.sendall(b"0\r\n\r\n")
        head = b""
        while b"\r\n" not in head:
            head += self.sock.recv(4096)
        self.sock.close()
        return int(head.split()[1])


def test_a_body_larger_than_the_whole_spool_is_413(tiny_repo, tmp_path):
    with run_server(tiny_repo, tmp_path, max_spool_bytes=1 * MB) as s, s.client() as c:
        declared = c.post(ROUTE, content=_ndjson(2 * MB), headers=NDJSON)
        chunked = c.post(ROUTE, content=iter([_ndjson(2 * MB)]), headers=NDJSON)   # no Content-Length
        small = c.post(ROUTE, content=_ndjson(MB // 2), headers=NDJSON)
        after = _spooled(s)
    for r in (declared, chunked):
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large", r.text
        assert "HJSERVE_MAX_SPOOL_BYTES" in r.json()["error"]
    assert small.status_code == 200 and "error" not in small.text
    assert after == 0


def test_concurrent_jobs_share_one_spool_limit(tiny_repo, tmp_path):
    """One job holds 1.5 MB of a 2 MB spool while it uploads: a second job of 1 MB is refused with
    503 spool_full and Retry-After (declared or chunked), and succeeds once the first is done."""
    with run_server(tiny_repo, tmp_path, max_spool_bytes=2 * MB, retry_after_s=3) as s, s.client() as c:
        held = _HeldUpload(s)
        held.send(_ndjson(3 * MB // 2))
        assert _wait_spooled(s, 3 * MB // 2) <= 2 * MB
        refused = [c.post(ROUTE, content=_ndjson(MB), headers=NDJSON),
                   c.post(ROUTE, content=iter([_ndjson(MB)]), headers=NDJSON)]
        assert 3 * MB // 2 <= _spooled(s) <= 2 * MB       # the refused jobs gave their bytes back
        assert held.finish() == 200
        assert _spooled(s) == 0
        retried = c.post(ROUTE, content=_ndjson(MB), headers=NDJSON)
    for r in refused:
        assert r.status_code == 503 and r.json()["error_type"] == "spool_full", r.text
        assert r.headers["retry-after"] == "3"
    assert retried.status_code == 200 and "error" not in retried.text


def _open_files_under(pid: int, directory: Path) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    links = []
    for fd in fds.iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return [link for link in links if link.startswith(str(directory))]


def test_bodies_spill_to_the_configured_spool_dir(tiny_repo, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    with run_server(tiny_repo, tmp_path, spool_dir=spool) as s:
        held = _HeldUpload(s)
        held.send(_ndjson(12 * MB))            # past the 8 MiB kept in memory
        _wait_spooled(s, 12 * MB)
        files = _open_files_under(s.proc.pid, spool)
        assert held.finish() == 200
        assert _spooled(s) == 0
        left = _open_files_under(s.proc.pid, spool)
    assert files and not left, (files, left)


def test_a_missing_spool_dir_stops_the_server_at_startup(tiny_repo, tmp_path):
    with pytest.raises(RuntimeError, match="spool_dir"), run_server(tiny_repo, tmp_path, spool_dir=tmp_path / "nope"):
        pass


# Python ignores SIGXFSZ, so past RLIMIT_FSIZE a write fails with EFBIG, as on a full disk
_LIMITED = ("-c", "import resource, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, (12 << 20, 12 << 20)); "
                  "runpy.run_module('service', run_name='__main__', alter_sys=True)")


def test_a_failing_spool_write_is_507_and_the_server_keeps_serving(tiny_repo, tmp_path):
    with run_server(tiny_repo, tmp_path, main=_LIMITED) as s, s.client() as c:
        full = c.post(ROUTE, content=_ndjson(20 * MB), headers=NDJSON)
        after = _spooled(s)
        small = c.post(ROUTE, content=_ndjson(MB), headers=NDJSON)
        infer = c.post("/v2/models/clf/infer", json={"inputs": [{"name": "input", "shape": [1, D],
                                                                  "datatype": "FP32", "data": [0.5] * D}]})
    assert full.status_code == 507, full.text
    assert full.json()["error_type"] == "insufficient_storage" and "spool" in full.json()["error"]
    assert after == 0
    assert small.status_code == 200 and "error" not in small.text
    assert infer.status_code == 200
