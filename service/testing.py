"""Run a real hjserve process on loopback: for end-to-end tests, benchmarks and load generators.

Public (benchmarks and other projects' tests use it), so it lives in the package, not in ``tests/``.
Every process started here is stopped by its PID when its context ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Server", "copy_version", "free_port", "memory_mib", "metric_value", "run_server", "stop_process"]

ROOT = Path(__file__).resolve().parents[1]


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Terminate a process we started (by its PID), then kill it if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mib(pid: int) -> dict[str, float]:
    """A running process's memory from ``/proc/<pid>/status``, MiB: ``VmRSS`` (resident now) and
    ``VmHWM`` (its peak), as the kernel reports them (Linux)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in a Prometheus exposition (a
    sample without labels counts when ``labels`` is empty)."""
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())) \
                or (not labels and line.startswith(name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def copy_version(src: Path, dst: Path) -> None:
    """Copy a version directory atomically (rename), as an operator would publish one."""
    tmp = dst.parent / f".tmp-{dst.name}"
    shutil.copytree(src, tmp)
    tmp.rename(dst)


@dataclass
class Server:
    """A running ``python -m service`` process (``grpc_port`` None: no gRPC server)."""

    url: str
    host_port: str
    proc: subprocess.Popen
    log: Path
    grpc_port: int | None = None
    tls_context: ssl.SSLContext | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def client(self, **kw):
        """An httpx client of this server (over TLS: verifying it with ``tls_context``)."""
        import httpx

        if self.tls_context is not None:
            kw.setdefault("verify", self.tls_context)
        return httpx.Client(base_url=self.url, timeout=30, **kw)


@contextlib.contextmanager
def run_server(repo: Path, log_dir: Path, *, grpc: bool = False, root: Path = ROOT,
               main: tuple[str, ...] = ("-m", "service"), env: dict[str, str] | None = None,
               tls_context: ssl.SSLContext | None = None, **settings: object) -> Iterator[Server]:
    """Start a real server (uvicorn, and gRPC when ``grpc``) on free loopback ports with
    ``HJSERVE_<KEY>`` settings; wait until it is live; stop it by PID afterwards. ``root``: the
    source tree it runs from (another revision's worktree, for a side-by-side benchmark); ``main``:
    what Python runs, with the server's command line after it (an instrumented entry point);
    ``env``: more environment variables. With ``tls_cert_file`` among the settings the server
    speaks HTTPS, and ``tls_context`` is the client side that trusts (and, for mutual TLS, presents
    a certificate to) it."""
    import httpx

    if "tls_cert_file" in settings and tls_context is None:   # the health poll could never verify it
        raise ValueError("a TLS server (tls_cert_file) needs tls_context: a client context that trusts its certificate")
    port = free_port()
    grpc_port = free_port() if grpc else None
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HJSERVE_")}
    level = str(settings.pop("log_level", "warning"))
    environ.update({f"HJSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    if grpc_port is not None:
        environ["HJSERVE_GRPC_PORT"] = str(grpc_port)
    environ["PYTHONPATH"] = str(root)
    environ.update(env or {})
    log = Path(log_dir) / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *main, "--model-repository", str(repo), "--host", "127.0.0.1",
             "--port", str(port), "--log-level", level],
            cwd=root, env=environ, stdout=out, stderr=subprocess.STDOUT)
    scheme = "https" if "tls_cert_file" in settings else "http"
    server = Server(f"{scheme}://127.0.0.1:{port}", f"127.0.0.1:{port}", proc, log, grpc_port, tls_context)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(server.url + "/v2/health/live", timeout=1,
                             verify=tls_context or True).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        stop_process(proc)
