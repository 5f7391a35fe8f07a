"""Overload benchmark: goodput under 1x, 3x and 10x the measured capacity, side by side in one run.

1. Capacity: a closed loop (``--concurrency`` connections, each sending its next request when the
   last one is answered) against the real server on the demo ``digits_lse`` model -> req/s.
2. Open loop at 1x, 3x, 10x that rate: requests are sent on a fixed schedule whatever the server
   does (new connections when all are busy, up to ``--max-connections``), for ``--seconds`` each.
   Recorded per phase: goodput (200s per second, and as a fraction of capacity), p50/p99 latency of
   200s and of 503s, statuses (only 200 and 503 may appear; every request must be answered) and
   the server's peak RSS.

The load generator is a minimal asyncio HTTP/1.1 client over raw sockets (pre-encoded requests), run
in this process; server and generator share this machine's cores, so the ratios, not the absolute
rates, are the result. Writes ``bench/results/overload.md`` and ``overload.json``.

    python bench/overload_bench.py [--model-dir models/digits_lse/1] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "service"))

from svc_helpers import copy_version, run_server  # noqa: E402


def _request(host: str, path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, connection kept alive) of one response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, not close


class Pool:
    """Keep-alive connections, opened on demand."""

    def __init__(self, host: str, port: int, limit: int):
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def send(self, payload: bytes) -> int:
        conn = self.idle.pop() if self.idle else None
        if conn is None:
            if self.opened >= self.limit:
                return -1           # client-side limit: counted, never silently dropped
            self.opened += 1
            conn = await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        try:
            writer.write(payload)
            await writer.drain()
            status, alive = await _read_response(reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            self.opened -= 1
            return 0                # connection lost: counted as unanswered
        if alive:
            self.idle.append(conn)
        else:
            writer.close()
            self.opened -= 1
        return status


async def _closed_loop(host: str, port: int, payload: bytes, concurrency: int, seconds: float) -> float:
    pool = Pool(host, port, concurrency)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker():
        nonlocal done
        while time.perf_counter() < stop:
            if await pool.send(payload) == 200:
                done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def _open_loop(host: str, port: int, payload: bytes, rate: float, seconds: float,
                     max_connections: int) -> dict:
    pool = Pool(host, port, max_connections)
    results: list[tuple[int, float]] = []
    tasks = []

    async def one():
        t0 = time.perf_counter()
        status = await pool.send(payload)
        results.append((status, time.perf_counter() - t0))

    n = int(rate * seconds)
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one()))
    sent = time.perf_counter() - start
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    elapsed = time.perf_counter() - start
    statuses = Counter(s for s, _ in results)

    def pct(status: int, q: float) -> float | None:
        lat = [t for s, t in results if s == status]
        return float(np.percentile(lat, q) * 1000) if lat else None

    return {"offered_rps": rate, "sent": n, "send_seconds": sent, "seconds": elapsed,
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "goodput_rps": statuses.get(200, 0) / elapsed,
            "p50_200_ms": pct(200, 50), "p99_200_ms": pct(200, 99),
            "p50_503_ms": pct(503, 50), "p99_503_ms": pct(503, 99)}


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb(self.pid))
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "digits_lse" / "1"))
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-connections", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "overload.md"))
    args = ap.parse_args()

    model_dir = Path(args.model_dir)
    d = json.loads((model_dir / "model.json").read_text())["n_features"]
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, d], "datatype": "FP32",
                                   "data": np.random.default_rng(0).uniform(0, 16, d).round(2).tolist()}]}).encode()
    phases = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        copy_version(model_dir, repo / "m" / "1")
        settings = {"max_queue_size": 64, "max_connections": 4096}
        with run_server(repo, Path(tmp), **settings) as server:
            host, port = server.host_port.split(":")
            payload = _request(server.host_port, "/v2/models/m/infer", body)
            asyncio.run(_closed_loop(host, int(port), payload, args.concurrency, 1.0))   # warm up
            capacity = asyncio.run(_closed_loop(host, int(port), payload, args.concurrency, args.seconds))
            print(f"capacity (closed loop, c={args.concurrency}): {capacity:.0f} req/s", flush=True)
            for factor in (1, 3, 10):
                with PeakRSS(server.proc.pid) as rss:
                    result = asyncio.run(_open_loop(host, int(port), payload, factor * capacity, args.seconds,
                                                    args.max_connections))
                result.update(factor=factor, goodput_fraction=result["goodput_rps"] / capacity,
                              peak_rss_mb=rss.peak)
                phases.append(result)
                print(json.dumps(result), flush=True)
                time.sleep(1.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"capacity_rps": capacity, "concurrency": args.concurrency, "seconds": args.seconds,
              "settings": settings, "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "phases": phases}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    rows = ["| offered | goodput (req/s) | goodput / capacity | statuses | p50 / p99 200 (ms) | "
            "p50 / p99 503 (ms) | peak RSS (MB) |", "|---|---|---|---|---|---|---|"]

    def ms(a, b):
        return "-" if a is None else f"{a:.1f} / {b:.1f}"

    for p in phases:
        rows.append(f"| {p['factor']}x ({p['offered_rps']:.0f} req/s) | {p['goodput_rps']:.0f} | "
                    f"{p['goodput_fraction']:.2f} | {p['statuses']} | {ms(p['p50_200_ms'], p['p99_200_ms'])} | "
                    f"{ms(p['p50_503_ms'], p['p99_503_ms'])} | {p['peak_rss_mb']:.0f} |")
    text = f"""# Overload: goodput at 1x, 3x, 10x the measured capacity

Generated by `python bench/overload_bench.py` ({time.strftime('%Y-%m-%d')}, {record['machine']}; the load
generator shares the cores with the server). Model: demo `digits_lse`, V2 JSON, one row, default outputs.
Server settings: `{settings}`. Capacity = closed loop with {args.concurrency} connections:
**{capacity:.0f} req/s**. Then an open loop (fixed send schedule, new connections when all are busy) for
{args.seconds:g} s per phase. Status `0` would be a request without an answer, `-1` one the client could
not send (connection limit): neither may appear.

{chr(10).join(rows)}

Requests over a model's `max_queue_size` in flight are answered 503 + `Retry-After` *before* their body is
read or decoded (`DataPlane.admit`), so a rejection costs about one HTTP round trip of the event loop.
"""
    out.write_text(text)
    print(text)
    ok = all(set(p["statuses"]) <= {"200", "503"} for p in phases)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
