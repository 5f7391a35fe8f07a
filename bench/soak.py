"""Memory under sustained load: does a server's resident memory settle, or grow with the requests it
answers? Writes ``bench/results/soak.md``.

For each backend in turn (``--backends``, default onnxruntime and torch), a real server
(``service.testing.run_server``) on the demo repository, one intra-op thread, answers a closed loop
of ``bench/loadgen.py`` at concurrency 4 for ``--minutes``: rounds over a mix of requests -- every demo
model, 1 and 7 rows, the default outputs and every output (``diagnostics: true``, so the explanation
graph runs too), 0.5 s of each -- with the server process's resident memory (``VmRSS``) read after every
round. Per backend: requests answered and errors, the memory after the first minute (warm: every
graph, batch shape and allocator pool has been used), at the end and at its peak, and the growth
over the second half of the run (least-squares slope, MiB per minute): about 0 for a server that
settles; a leak of a few bytes per request shows as a steady slope (1 KiB a request at this rate
would be ~10 MiB a minute).

Usage: ``python bench/soak.py [--minutes 8] [--backends onnx,torch] [--models DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.loadgen import closed_loop, request_bytes  # noqa: E402
from service.testing import memory_mib, run_server  # noqa: E402

OUT = ROOT / "bench" / "results" / "soak.md"
DEMOS = {"digits_lse": 64, "digits_memory": 64, "digits_deep": 64, "breast_cancer_lse": 30, "diabetes_lse": 10}


def requests(host_port: str) -> list[bytes]:
    """The mix: every demo model, 1 and 7 rows, default outputs and every output."""
    rng = np.random.default_rng(0)
    out = []
    for name, d in DEMOS.items():
        for n in (1, 7):
            for parameters in ({}, {"diagnostics": True}):
                x = (np.abs(rng.standard_normal((n, d))) * 3).astype(np.float32)
                body = {"inputs": [{"name": "input", "shape": [n, d], "datatype": "FP32", "data": x.ravel().tolist()}],
                        "parameters": parameters}
                out.append(request_bytes(host_port, f"/v2/models/{name}/infer", json.dumps(body).encode()))
    return out


def soak(models: Path, backend: str, minutes: float) -> dict:
    """One backend's run: samples of (minutes since the start, RSS MiB), requests, errors."""
    with tempfile.TemporaryDirectory() as tmp, run_server(models, Path(tmp), backend=backend, intra_op_threads=1) as s:
        host, port = s.host_port.split(":")
        mix = requests(s.host_port)
        start, answered, errors, samples = time.monotonic(), 0, 0, []
        while time.monotonic() - start < 60 * minutes:
            for body in mix:
                result = asyncio.run(closed_loop(host, int(port), body, 0.5, 4, warmup=0))
                answered, errors = answered + result["n"], errors + result["errors"]
            samples.append(((time.monotonic() - start) / 60, memory_mib(s.proc.pid)["VmRSS"]))
            print(f"{backend}: {samples[-1][0]:.1f} min, {samples[-1][1]:.1f} MiB, {answered} requests", flush=True)
    return {"samples": samples, "requests": answered, "errors": errors}


def summary(backend: str, run: dict) -> list[str]:
    t, mib = (np.array(v) for v in zip(*run["samples"], strict=True))
    warm = mib[np.searchsorted(t, 1.0)] if t[-1] >= 1.0 else mib[0]
    half = t >= t[-1] / 2
    slope = np.polyfit(t[half], mib[half], 1)[0] if half.sum() >= 2 else float("nan")
    per_minute = ", ".join(f"{mib[np.searchsorted(t, m)]:.0f}" for m in range(1, int(t[-1]) + 1))
    return [backend, f"{run['requests']}", f"{run['errors']}", f"{warm:.1f}", f"{mib[-1]:.1f}", f"{mib.max():.1f}",
            f"{round(slope, 2) + 0.0:+.2f}", per_minute]   # + 0.0: no "-0.00"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--backends", default="onnx,torch")
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    started = time.perf_counter()
    rows = [summary(backend, soak(Path(args.models), backend, args.minutes)) for backend in args.backends.split(",")]
    report.write(args.out, "Memory under sustained load",
                 f"python bench/soak.py --minutes {args.minutes:g} --backends {args.backends}", started,
                 "a closed loop at concurrency 4 over every demo model, 1 and 7 rows, default outputs and every "
                 "output; what is measured: the module docstring.",
                 ("backend", "requests", "errors", "RSS after 1 min, MiB", "RSS at the end, MiB", "peak RSS, MiB",
                  "growth over the second half, MiB/min", "RSS at each whole minute, MiB"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
