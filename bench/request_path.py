"""Where a request's time goes: the served request path, stage by stage, at concurrency 1.

    python bench/request_path.py [--model-dir models/digits_lse/1] [--seconds 4] [--passes 3]
        -> bench/results/request_path.md

A real server process (``python -m service``, onnxruntime with one thread, batch 1, JSON) is started
with timers wrapped around the functions that own each stage of a V2 inference request, and the
closed-loop client of ``bench/loadgen.py`` (raw sockets, pre-encoded requests) drives it at
concurrency 1. Each stage is the mean
wall time per request (microseconds) on the thread that runs it:

* *middleware, routing, route checks, admission*: from the outermost app middleware to the start of
  the body read (``service.rest.common.read_inference_body``, as ``service.rest.v2`` calls it);
* *body read*: from the start of the read to the whole body (the client writes head and body
  at once, so this is the body's way through uvicorn and the body-timeout middleware);
* *decode* (``codecs.decode_infer_request``: JSON, validation of the wire model);
* *dataplane before the batcher*: options and row validation against the serving version;
* *hand-off to the backend thread and back*: ``DynamicBatcher.infer`` minus the backend's turn it
  waits for and the split;
* *the backend's turn* (``DynamicBatcher._run``, wall time): the serving graph on the backend's
  thread with the explanation graph beside it on the version's second thread; the two graphs'
  own times are shown under it (they overlap, so they are not added). A request alone runs its
  serving graph on the event loop instead, its explanation graph beside it on the second thread
  (``DynamicBatcher._run_inline``, ``HJSERVE_INLINE_MAX_MS``): that call is its turn, and its
  hand-off is what is left of the batcher's bookkeeping (it has no split);
* *split to requests* (``DynamicBatcher._deliver``), *select* (top-k, datatypes), *diagnostic
  metrics* (``VersionMetrics.record_rows``), *encode* (``codecs.encode_infer_response``);
* *response through the middleware to the socket*;
* *outside the app*: the client's latency minus the app's time (HTTP parsing in uvicorn, the
  loopback socket, the client itself; the bare-endpoint row of ``bench/results/competitors.md``
  measures that floor with nothing behind it).

Apart from the two graphs inside the turn, stages overlap nowhere at concurrency 1, so they add up to the client's mean latency (the timers
cost a few microseconds each). A second run of the same server without timers gives the uninstrumented
req/s next to it, and a third with ``--log-level info`` the cost of the access log. The three
requests are measured in ``--passes`` alternating passes (each pass: every request's three runs), and
every cell is the median over passes: on a machine shared with other jobs one pass may fall into a
slow spell that a single run would report as the request's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "results" / "request_path.md"

#: (key, label) in request order.
STAGES = [
    ("framework", "middleware, routing, route checks, admission"),
    ("body", "body read"),
    ("decode", "decode (JSON, wire-model validation)"),
    ("prepare", "dataplane before the batcher (options, row validation)"),
    ("handoff", "hand-off to the backend thread and back (a request alone: the batcher's bookkeeping)"),
    ("turn", "the backend's turn: serving graph, explanation graph beside it (wall time)"),
    ("deliver", "split to requests (event loop)"),
    ("select", "select outputs (top-k, datatypes)"),
    ("metrics", "diagnostic metrics (record_rows)"),
    ("encode", "encode (JSON)"),
    ("send", "response through the middleware to the socket"),
]


def instrument() -> tuple[dict[str, float], list[int]]:
    """Wrap the functions that own each stage with timers (in this process) -> (seconds per stage,
    [inference requests seen]), filled as requests are served. Every wrapped name must exist:
    ``tests/bench/test_request_path.py`` runs this, so a refactor that moves a stage fails a test
    instead of the next benchmark run."""
    from bench import report
    from service import batching, codecs, dataplane, metrics
    from service.backends import onnx
    from service.rest import app, v2

    total: dict[str, float] = defaultdict(float)
    mark: dict[str, float] = {}
    requests = [0]

    def timed(key, fn):
        return report.timed(total, key, fn)

    def timed_async(key, fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                total[key] += time.perf_counter() - start
        return wrapper

    read_body = v2.read_inference_body

    async def body(*args, **kwargs):
        start = time.perf_counter()
        total["framework"] += start - mark["start"]
        try:
            return await read_body(*args, **kwargs)
        finally:
            total["body"] += time.perf_counter() - start

    encode = codecs.encode_infer_response

    def encode_timed(response):
        start = time.perf_counter()
        try:
            return encode(response)
        finally:
            mark["encoded"] = time.perf_counter()
            total["encode"] += mark["encoded"] - start

    middleware = app.HTTPMetricsMiddleware.__call__

    async def outer(self, scope, receive, send):
        if scope.get("path", "").endswith("/infer"):
            mark["start"] = time.perf_counter()
            requests[0] += 1

            async def sending(message):
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    now = time.perf_counter()
                    total["send"] += now - mark.get("encoded", now)
                    total["app"] += now - mark["start"]
            return await middleware(self, scope, receive, sending)
        return await middleware(self, scope, receive, send)

    v2.read_inference_body = body
    codecs.decode_infer_request = timed("decode", codecs.decode_infer_request)   # v2 looks both up per call
    codecs.encode_infer_response = encode_timed
    app.HTTPMetricsMiddleware.__call__ = outer
    dataplane.DataPlane.infer = timed_async("dataplane", dataplane.DataPlane.infer)
    dataplane.DataPlane.select = timed("select", dataplane.DataPlane.select)
    batching.DynamicBatcher.infer = timed_async("batcher", batching.DynamicBatcher.infer)
    batching.DynamicBatcher._deliver = timed("deliver", batching.DynamicBatcher._deliver)
    batching.DynamicBatcher._run = timed("turn", batching.DynamicBatcher._run)
    batching.DynamicBatcher._run_inline = timed_async("turn", batching.DynamicBatcher._run_inline)
    onnx.OnnxBackend.infer = timed("graph", onnx.OnnxBackend.infer)
    onnx.OnnxBackend.explain = timed("explain", onnx.OnnxBackend.explain)
    metrics.VersionMetrics.record_rows = timed("metrics", metrics.VersionMetrics.record_rows)
    return total, requests


def serve_instrumented(argv: list[str]) -> None:
    """``python -m service`` with timers; writes ``$HJSERVE_TEST_STAGES_OUT`` (JSON) at exit."""
    total, requests = instrument()

    def dump() -> None:
        Path(os.environ["HJSERVE_TEST_STAGES_OUT"]).write_text(json.dumps({"requests": requests[0], **total}))

    atexit.register(dump)
    from service.__main__ import main
    main(argv)


def run(repo: Path, log_dir: Path, body: bytes, path: str, seconds: float, *, instrument: bool,
        log_level: str = "warning") -> tuple[dict, dict]:
    """One server (instrumented or not), then the closed loop at concurrency 1 -> (client result,
    stage totals or {})."""
    from bench.loadgen import post_loop
    from service.testing import run_server

    stages = log_dir / f"stages-{time.monotonic_ns()}.json"
    main = (__file__, "--serve") if instrument else ("-m", "service")
    with run_server(repo, log_dir, main=main, env={"HJSERVE_TEST_STAGES_OUT": str(stages)}, intra_op_threads=1,
                    log_level=log_level) as server:
        result = asyncio.run(post_loop(server.url, path, body, seconds, 1))   # its warm-up is timed too
        # SIGINT: uvicorn shuts down and re-raises it as KeyboardInterrupt, so the timers' atexit
        # hook runs (after SIGTERM uvicorn re-raises a signal that ends the process without it)
        server.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=30)
    totals = json.loads(stages.read_text()) if instrument else {}
    return result, totals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "digits_lse" / "1"))
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--passes", type=int, default=3, help="alternating passes over the three requests; medians")
    args = ap.parse_args()
    import numpy as np

    from hjmodel import serving

    version = Path(args.model_dir).resolve()
    name = version.parent.name
    spec = json.loads((version / "model.json").read_text())
    row = np.abs(np.random.default_rng(0).standard_normal(spec["n_features"])).astype(np.float32).tolist()
    inp = [{"name": "input", "shape": [1, len(row)], "datatype": "FP32", "data": row}]
    bodies = {
        "four default outputs": {"inputs": inp},
        "every serving-graph diagnostic": {"inputs": inp,
                                           "parameters": {"diagnostics": list(serving.output_names(spec["task"]))}},
        "all diagnostics (diagnostics: true)": {"inputs": inp, "parameters": {"diagnostics": True}},
    }
    path = f"/v2/models/{name}/infer"
    columns: dict[str, list[dict]] = {label: [] for label in bodies}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        repo = tmp / "repo"
        shutil.copytree(version, repo / name / "1")
        for p in range(args.passes):
            for label, obj in (list(bodies.items()) if p % 2 == 0 else list(bodies.items())[::-1]):
                body = json.dumps(obj).encode()
                timed, totals = run(repo, tmp, body, path, args.seconds, instrument=True)
                plain, _ = run(repo, tmp, body, path, args.seconds, instrument=False)
                logged, _ = run(repo, tmp, body, path, args.seconds, instrument=False, log_level="info")
                columns[label].append({"timed": timed, "totals": totals, "plain": plain, "logged": logged})
                print(f"pass {p} {label}: {plain['rps']:.0f} req/s uninstrumented, {logged['rps']:.0f} with the "
                      "access log", flush=True)
    OUT.write_text(report(columns, name, args))
    print(OUT.read_text())
    return 0


def _stages(c: dict) -> dict[str, float]:
    """One pass of one request: microseconds per request by stage (and the client's mean latency)."""
    t, n = c["totals"], max(c["totals"]["requests"], 1)
    us = {k: 1e6 * t.get(k, 0.0) / n for k in ("framework", "body", "decode", "select", "metrics", "encode",
                                              "send", "deliver", "turn", "graph", "explain", "app")}
    us["handoff"] = 1e6 * (t["batcher"] - t.get("turn", 0.0)) / n - us["deliver"]
    us["prepare"] = 1e6 * (t["dataplane"] - t["batcher"]) / n - us["select"] - us["metrics"]
    us["client"] = 1e6 / c["timed"]["rps"]   # mean latency at concurrency 1
    us["other"] = us["app"] - sum(us[k] for k, _ in STAGES)
    return us


def report(passes: dict[str, list[dict]], name: str, args) -> str:
    """Medians over passes of every stage and every run's req/s."""
    labels = list(passes)
    per = {}
    for label, runs in passes.items():
        stages = [_stages(run) for run in runs]
        per[label] = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    columns = {label: {run: {"rps": statistics.median(r[run]["rps"] for r in runs)}
                       for run in ("timed", "plain", "logged")} for label, runs in passes.items()}
    L = [f"""# The request path, stage by stage

Generated by `python bench/request_path.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}:
`{name}`, onnxruntime with one thread, batch 1, JSON, a closed-loop client at concurrency 1 for
{args.seconds:g} s per run, {args.passes} alternating passes, medians; {platform.machine()}, {os.cpu_count()} cores
shared by the client and the server (load average at the end {os.getloadavg()[0]:.1f}). Mean microseconds per
request on the thread that runs each stage; method in the module docstring.

| stage | """ + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for key, label in STAGES:
        L.append(f"| {label} | " + " | ".join(f"{per[c][key]:.0f}" for c in labels) + " |")
    L.append("| of the turn: the serving graph | " + " | ".join(f"{per[c]['graph']:.0f}" for c in labels) + " |")
    L.append("| of the turn: the explanation graph (second thread, beside the serving graph) | "
             + " | ".join(f"{per[c]['explain']:.0f}" for c in labels) + " |")
    L.append("| other (between the stages: spans, response objects, accounting) | "
             + " | ".join(f"{per[c]['other']:.0f}" for c in labels) + " |")
    L.append("| **in the app** (measured) | " + " | ".join(f"**{per[c]['app']:.0f}**" for c in labels)
             + " |")
    L.append("| outside the app (the client's mean latency minus the app) | "
             + " | ".join(f"{per[c]['client'] - per[c]['app']:.0f}" for c in labels) + " |")
    L.append("| client mean latency, timers on | " + " | ".join(f"{per[c]['client']:.0f}" for c in labels) + " |")
    L += ["", "| run | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    L.append("| req/s, timers on | " + " | ".join(f"{columns[c]['timed']['rps']:.0f}" for c in labels) + " |")
    L.append("| req/s, no timers | " + " | ".join(f"{columns[c]['plain']['rps']:.0f}" for c in labels) + " |")
    L.append("| req/s, no timers, access log on (`--log-level info`) | "
             + " | ".join(f"{columns[c]['logged']['rps']:.0f}" for c in labels) + " |")
    graph = {c: per[c]["turn"] for c in labels}
    python = {c: per[c]["app"] - graph[c] for c in labels}
    L += ["", "Reading: " + "; ".join(
        f"{c}: the backend's turn (the graphs) takes {graph[c]:.0f} us of the app's {per[c]['app']:.0f} us, Python around it "
        f"{python[c]:.0f} us" for c in labels) + ". The graphs here run slower than in a tight loop "
        "(`bench/results/hjmodel_bench.md`) because the request's Python work between two calls evicts "
        "their data from the caches."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve_instrumented(sys.argv[2:])
    else:
        raise SystemExit(main())
