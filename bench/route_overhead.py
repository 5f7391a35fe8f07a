"""What a route costs before and after its endpoint: the route handler that calls the endpoint directly
against FastAPI's request handler, in process, side by side. Writes ``bench/results/route_overhead.md``.

``service.rest.app.GuardedRoute`` calls an endpoint that reads only the request and string path
parameters, and returns a ``Response`` itself, directly (``_direct_handler``); every inference route
is one. FastAPI's request handler, which the route ran before, makes the same call after solving
the endpoint's (empty) dependencies, checking its context and wrapping its answer. Both handlers of
the same route (``GuardedRoute.get_route_handler(direct=...)``) are called in turn on the same
request -- ``--repeats`` rounds of ``--calls`` calls each, medians over rounds -- inside the app's
running lifespan with the demo repository loaded:

* ``GET /v2/health/live``: an endpoint that does almost nothing, so the difference is the handler's;
* ``POST /v2/models/digits_lse/infer``: one row, the four default outputs, onnxruntime with one
  thread -- the same difference against a whole inference request (the graph, the batcher's
  hand-off, decode and encode; no socket, no HTTP parsing, no middleware).

Usage: ``python bench/route_overhead.py [--models DIR] [--repeats 15] [--calls 300]``.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402

OUT = ROOT / "bench" / "results" / "route_overhead.md"


def _call(handler, app, route, method: str, path: str, body: bytes):
    """``handler`` (a route's ASGI app, in ``app``) on a fresh request for ``route`` -> the response status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "app": app, "route": route,
             "path_params": route.path_regex.fullmatch(path).groupdict()}
    sent, status = False, []

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    async def run():
        async with contextlib.AsyncExitStack() as stack:
            scope["fastapi_middleware_astack"] = stack
            await handler(scope, receive, send)
        return status[0]
    return run()


async def measure(models: Path, repeats: int, calls: int) -> list[tuple]:
    from fastapi.routing import request_response

    from service.__main__ import build
    from service.settings import Settings

    app = build(Settings(model_repository=models, intra_op_threads=1, log_level="warning"))
    x = np.asarray(json.loads((models / "digits_lse" / "1" / "model.json").read_text())["input_mean"], np.float32)
    infer = json.dumps({"inputs": [{"name": "input", "shape": [1, len(x)], "datatype": "FP32",
                                    "data": x.tolist()}]}).encode()
    cases = [("GET /v2/health/live", "GET", "/v2/health/live", b""),
             ("POST /v2/models/digits_lse/infer (one row, default outputs)", "POST", "/v2/models/digits_lse/infer",
              infer)]
    rows = []
    async with app.router.lifespan_context(app):
        for label, method, path, body in cases:
            route = next(r for r in app.router.routes
                         if hasattr(r, "checks") and method in r.methods and r.path_regex.fullmatch(path))
            handlers = {key: request_response(route.get_route_handler(direct=key == "direct"))
                        for key in ("direct", "fastapi")}
            times: dict[str, list[float]] = {k: [] for k in handlers}
            for handler in handlers.values():   # warm: the version's batcher thread, caches
                for _ in range(50):
                    assert await _call(handler, app, route, method, path, body) == 200
            for _ in range(repeats):
                for key, handler in handlers.items():
                    t = time.perf_counter()
                    for _ in range(calls):
                        await _call(handler, app, route, method, path, body)
                    times[key].append((time.perf_counter() - t) / calls)
            us = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            rows.append((label, us["fastapi"], us["direct"]))
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = report.arguments(__doc__, OUT, repeats=15)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    import uvloop

    start = time.perf_counter()
    rows = uvloop.run(measure(Path(args.models), args.repeats, args.calls))
    report.write(args.out, "A route's handler: the endpoint called directly against FastAPI's request handler",
                 f"python bench/route_overhead.py --repeats {args.repeats} --calls {args.calls}", start,
                 "in process, no socket; what is timed: the module docstring.",
                 ("request", "FastAPI's handler, us per call", "direct, us per call", "saved, us", "FastAPI's / direct"),
                 ((label, f"{f:.1f}", f"{d:.1f}", f"{f - d:.1f}", f"{f / d:.2f}x") for label, f, d in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
