"""Clients that misbehave all at once, and what the server is left with. Writes ``bench/results/chaos.md``.

A real server (``service.testing.run_server``, both transports, ``model_control_mode=explicit``) on
the demo repository takes, for ``--seconds``, at once:

- **hang-ups** (3 threads): an inference request over a raw socket to a random demo model (1, 4 or
  64 rows, half of them with every output) that is abandoned -- mid-body, after the body, or after
  the answer's first bytes -- by a close or a reset;
- **clients** (2 threads): well-behaved requests to ``digits_lse``, which must be answered (200, or
  503 while the reloader has the model unloaded);
- **gRPC** (3 threads): ``ModelInfer`` with deadlines from 0.5 ms to 5 s (many expire while the call
  is computed), and ``ModelStreamInfer`` streams of 1-20 requests with deadlines from 5 ms, some
  cancelled after an answer;
- **batch jobs** (1 thread): batch attribution of 100 or 2,000 NDJSON rows, a third of them
  abandoned after the first chunk;
- **reloads** (1 thread): ``digits_lse`` or ``digits_deep`` loaded again every 0.5 s, and a fifth of
  the time unloaded and loaded.

Then, the clients gone and 3 s later, what every request left behind must be nothing: no answer of
the server's own fault (an HTTP 500, a gRPC INTERNAL or UNKNOWN), no traceback or ERROR line in its
log, the request-memory budget, the model queues, the batch jobs and the spool at 0, and both
transports still answering. With ``--base REV`` the same run is made against that revision too (a
temporary git worktree), one after the other: what the same clients did to it.

Usage: ``python bench/chaos.py [--seconds 60] [--base REV] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from service.testing import memory_mib, metric_value, run_server  # noqa: E402

OUT = ROOT / "bench" / "results" / "chaos.md"
DEMOS = ("digits_lse", "digits_deep", "digits_memory")   # the 64-feature demo models
METHOD = "/inference.GRPCInferenceService/"
#: Gauges that must be back at 0 once every client has gone (summed over their label sets).
SETTLED = ("hjserve_request_memory_bytes", "hjserve_queue_size", "hjserve_batch_jobs_in_progress",
           "hjserve_batch_spool_bytes")


@functools.cache
def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32)


def _rows(rng: random.Random, n: int) -> np.ndarray:
    x = _digits()
    return x[[rng.randrange(len(x)) for _ in range(n)]]


def _body(x: np.ndarray, every: bool) -> bytes:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if every:
        body["parameters"] = {"diagnostics": True}
    return json.dumps(body).encode()


def hang_ups(server, stop: threading.Event, seen: Counter, rng: random.Random) -> None:
    host, port = server.host_port.split(":")
    while not stop.is_set():
        body = _body(_rows(rng, rng.choice((1, 4, 64))), rng.random() < 0.5)
        head = (f"POST /v2/models/{rng.choice(DEMOS)}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        how = rng.choice(("mid-body", "after the body", "after the answer's first bytes"))
        try:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(head + (body[:rng.randrange(len(body))] if how == "mid-body" else body))
                if how.startswith("after the answer"):
                    sock.recv(100)
                if rng.random() < 0.5:   # a reset rather than a close
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            seen[f"hang-up {how}"] += 1
        except OSError as exc:
            seen[f"hang-up: {type(exc).__name__}"] += 1


def clients(server, stop: threading.Event, seen: Counter, rng: random.Random) -> None:
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as client:
        while not stop.is_set():
            try:
                answer = client.post("/v2/models/digits_lse/infer", content=_body(_rows(rng, rng.choice((1, 8))), False),
                                     headers={"content-type": "application/json"})
                seen[f"client HTTP {answer.status_code}"] += 1
            except httpx.HTTPError as exc:
                seen[f"client: {type(exc).__name__}"] += 1


def grpc_calls(server, stop: threading.Event, seen: Counter, rng: random.Random) -> None:
    import grpc

    from service.grpc import inference_pb2 as pb

    def message(n: int):
        request = pb.ModelInferRequest(model_name=rng.choice(("digits_lse", "digits_memory")))
        request.inputs.add(name="input", datatype="FP32", shape=[n, 64])
        request.raw_input_contents.append(_rows(rng, n).tobytes())
        return request

    with grpc.insecure_channel(server.grpc_target) as channel:
        infer = channel.unary_unary(METHOD + "ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        stream = channel.stream_stream(METHOD + "ModelStreamInfer",
                                       request_serializer=pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        while not stop.is_set():
            try:
                if rng.random() < 0.5:
                    infer(message(rng.choice((1, 64))), timeout=rng.choice((0.0005, 0.002, 0.01, 5)))
                    seen["gRPC ModelInfer OK"] += 1
                else:
                    answers = stream(iter([message(4) for _ in range(rng.randint(1, 20))]),
                                     timeout=rng.choice((0.005, 0.05, 5)))
                    for _ in answers:
                        if rng.random() < 0.2:
                            answers.cancel()
                            break
                    seen["gRPC stream ended"] += 1
            except grpc.RpcError as exc:
                seen[f"gRPC {exc.code().name}"] += 1


def batch_jobs(server, stop: threading.Event, seen: Counter, rng: random.Random) -> None:
    import httpx

    while not stop.is_set():
        rows = _rows(rng, rng.choice((100, 2000)))
        body = b"\n".join(json.dumps(row.tolist()).encode() for row in rows)
        try:
            with httpx.Client(base_url=server.url, timeout=30) as client, client.stream(
                    "POST", "/v2/models/digits_memory/batch-attribution", content=body,
                    headers={"content-type": "application/x-ndjson"}) as answer:
                abandon = rng.random() < 0.3
                for _ in answer.iter_bytes():
                    if abandon:
                        break
            seen[f"batch job HTTP {answer.status_code}{', abandoned' if abandon else ''}"] += 1
        except httpx.HTTPError as exc:
            seen[f"batch job: {type(exc).__name__}"] += 1


def reloads(server, stop: threading.Event, seen: Counter, rng: random.Random) -> None:
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as client:
        while not stop.is_set():
            name = rng.choice(("digits_lse", "digits_deep"))
            seen[f"load HTTP {client.post(f'/v2/repository/models/{name}/load').status_code}"] += 1
            time.sleep(0.5)
            if rng.random() < 0.2:
                seen[f"unload HTTP {client.post(f'/v2/repository/models/{name}/unload').status_code}"] += 1
                time.sleep(0.3)
                seen[f"load HTTP {client.post(f'/v2/repository/models/{name}/load').status_code}"] += 1


#: (what, function, threads)
MIX: list[tuple[str, Callable, int]] = [("hang-ups", hang_ups, 3), ("clients", clients, 2), ("gRPC", grpc_calls, 3),
                                        ("batch jobs", batch_jobs, 1), ("reloads", reloads, 1)]


def verdict(metrics: str, log: str) -> dict[str, float]:
    """What the server was left with, from its metrics and its log once the clients have gone: every
    value must be 0."""
    out = {"HTTP 500 answers": metric_value(metrics, "hjserve_http_requests_total", status="500")}
    for code in ("INTERNAL", "UNKNOWN"):
        out[f"gRPC {code} answers"] = metric_value(metrics, "hjserve_grpc_requests_total", code=code)
    out["tracebacks in the log"] = log.count("Traceback (most recent call last)")
    out["ERROR lines in the log"] = sum(" ERROR " in line for line in log.splitlines())
    for gauge in SETTLED:
        out[f"{gauge} after"] = metric_value(metrics, gauge)
    return out


def run(tree: Path, models: Path, seconds: float, seed: int) -> dict:
    """One chaos run against the server of ``tree``: what the clients saw, the verdict, memory."""
    import grpc
    import httpx

    from service.grpc import inference_pb2 as pb

    stop, seen = threading.Event(), Counter()
    with tempfile.TemporaryDirectory() as tmp, run_server(models, Path(tmp), root=tree, grpc=True,
                                                          model_control_mode="explicit", body_timeout_s=2) as server:
        before = memory_mib(server.proc.pid)["VmRSS"]
        threads = [threading.Thread(target=fn, args=(server, stop, seen, random.Random(seed * 100 + i)))
                   for i, (_, fn, count) in enumerate(MIX) for _ in range(count)]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(60)
        time.sleep(3)   # the last abandoned requests finish
        for name in ("digits_lse", "digits_deep"):   # every model back for the last check
            httpx.post(f"{server.url}/v2/repository/models/{name}/load", timeout=60)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        served = httpx.post(f"{server.url}/v2/models/digits_lse/infer", content=_body(_rows(random.Random(0), 2), True),
                            headers={"content-type": "application/json"}, timeout=30).status_code == 200
        with grpc.insecure_channel(server.grpc_target) as channel:
            live = channel.unary_unary(METHOD + "ServerLive", request_serializer=pb.ServerLiveRequest.SerializeToString,
                                       response_deserializer=pb.ServerLiveResponse.FromString)
            served = served and live(pb.ServerLiveRequest(), timeout=10).live
        memory = memory_mib(server.proc.pid)
        log = server.log.read_text(errors="replace")
    return {"seen": seen, "verdict": verdict(metrics, log), "served": served, "rss": (before, memory["VmRSS"], memory["VmHWM"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--base", help="a git revision run the same way, after this tree")
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    started = time.perf_counter()
    head = report.revision()
    runs = {f"this tree ({head})": run(ROOT, Path(args.models), args.seconds, args.seed)}
    if args.base:
        with tempfile.TemporaryDirectory() as tmp:
            worktree = Path(tmp) / "base"
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(worktree), args.base], cwd=ROOT, check=True)
            try:
                runs[f"base {args.base}"] = run(worktree, Path(args.models), args.seconds, args.seed)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    labels = list(runs)
    rows = [[what, *(f"{runs[label]['verdict'][what]:g}" for label in labels)] for what in runs[labels[0]]["verdict"]]
    rows.append(["both transports answer afterwards", *("yes" if runs[label]["served"] else "**no**" for label in labels)])
    rows.append(["resident MiB: before, after, peak",
                 *(", ".join(f"{v:.0f}" for v in runs[label]["rss"]) for label in labels)])
    for what in sorted(set().union(*(runs[label]["seen"] for label in labels))):
        rows.append([f"clients saw: {what}", *(str(runs[label]["seen"].get(what, 0)) for label in labels)])
    command = f"python bench/chaos.py --seconds {args.seconds:g}" + (f" --base {args.base}" if args.base else "")
    mix = "; ".join(f"{what} x{count}" for what, _, count in MIX)
    report.write(args.out, "Misbehaving clients, all at once: what the server is left with", command, started,
                 f"{args.seconds:g} s of: {mix} (the module docstring says what each does). Every row above "
                 "'both transports' must be 0: a 500 / INTERNAL / UNKNOWN is the server's fault, and the "
                 "gauges count what is still held once every client has gone.", ["", *labels], rows)
    bad = [label for label in labels[:1] if any(runs[label]["verdict"].values()) or not runs[label]["served"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
