"""A minimal HTTP/1.1 load generator: pre-encoded requests over raw asyncio sockets.

Its cost per request is a small fraction of a general-purpose client's (no request building, no
header objects), which matters where the client shares the machine's cores with the server it
measures. Used by ``bench/overload_bench.py`` (open and closed loops) and ``bench/competitors.py``
(the one client for every server). Responses with ``Content-Length`` or chunked bodies are read
whole, so a connection is never reused mid-response. :func:`grpc_loop` is the same closed loop over
one gRPC channel (grpcio's asyncio client, the request serialised once), and :func:`stream_loop` over
bidirectional streams, one per worker. They speak TLS when given a
client context / channel credentials (``bench/ab_server.py --tls``). :func:`batch_job` runs one
batch-attribution job (V2 binary rows in, NDJSON out) and counts the rows answered in the raw bytes;
:func:`large_request` one online inference request of many rows (:func:`large_body`: binary or JSON).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import statistics
import time

import numpy as np

__all__ = ["Pool", "batch_job", "batch_throughput", "closed_loop", "grpc_loop", "large_body", "large_request",
           "post_loop", "request_bytes", "stream_loop"]

#: a column line's leading row range, {"rows":[first,end]
_ROWS_RANGE = re.compile(rb'\{"rows":\[(\d+),(\d+)\]')


def request_bytes(host: str, path: str, body: bytes, content_type: str = "application/json") -> bytes:
    """One POST request, ready to write."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, connection kept alive) of one response, its body read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, close, chunked = 0, False, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value == b"close":
            close = True
        elif name == b"transfer-encoding" and value.endswith(b"chunked"):
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)     # the chunk and its CRLF (the last: just CRLF)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, not close


class Pool:
    """At most ``limit`` keep-alive connections, opened on demand; a request that finds none idle
    waits for one (as a client's connection pool does), so its latency includes that wait."""

    def __init__(self, host: str, port: int, limit: int, tls: ssl.SSLContext | None = None):
        self.host, self.port, self.tls = host, port, tls
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(limit)

    async def send(self, payload: bytes) -> int:
        """The status of ``payload``'s response; 0 when the connection was lost (unanswered)."""
        async with self.slots:
            conn = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port, ssl=self.tls)
            reader, writer = conn
            try:
                writer.write(payload)
                await writer.drain()
                status, alive = await read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                return 0
            if alive:
                self.idle.append(conn)
            else:
                writer.close()
            return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def closed_loop(host: str, port: int, payload: bytes, seconds: float, concurrency: int,
                      warmup: int = 20, tls: ssl.SSLContext | None = None) -> dict:
    """``concurrency`` keep-alive connections (TLS with ``tls``) sending ``payload`` back to back for
    ``seconds``: req/s, p50 and p99 latency (ms), errors (non-200 answers and lost connections),
    requests made."""
    pool = Pool(host, port, concurrency, tls)
    try:
        return await _loop(lambda: pool.send(payload), seconds, concurrency, warmup)
    finally:
        pool.close()


async def grpc_loop(target: str, method: str, request: bytes, seconds: float, concurrency: int,
                    warmup: int = 20, credentials=None) -> dict:
    """:func:`closed_loop` over one gRPC channel to ``target`` (``host:port``; TLS with channel
    ``credentials``): ``concurrency`` calls of ``method`` (``/package.Service/Method``) in flight, each
    sending the serialised ``request``; a call that fails counts as an error."""
    import grpc

    async with _channel(target, credentials) as channel:
        call = channel.unary_unary(method)          # bytes in, bytes out: no (de)serialising in the loop

        async def send() -> int:
            try:
                await call(request, timeout=30)
                return 200
            except grpc.aio.AioRpcError:
                return 500

        return await _loop(send, seconds, concurrency, warmup)


async def stream_loop(target: str, method: str, request: bytes, seconds: float, concurrency: int,
                      warmup: int = 20, credentials=None) -> dict:
    """:func:`grpc_loop` over ``concurrency`` bidirectional streams of ``method`` (Triton's
    ``ModelStreamInfer``), each worker on a stream of its own: it writes ``request`` and awaits its
    answer before the next. An answer that carries an ``error_message`` (field 1, serialised first)
    or a failed stream counts as an error."""
    import grpc

    async with _channel(target, credentials) as channel:
        opened = channel.stream_stream(method)
        calls = [opened(timeout=seconds + 60) for _ in range(concurrency)]
        idle: asyncio.Queue = asyncio.Queue()
        for call in calls:
            idle.put_nowait(call)

        async def send() -> int:
            call = await idle.get()
            try:
                await call.write(request)
                answer = await call.read()
                return 500 if answer is grpc.aio.EOF or answer[:1] == b"\x0a" else 200
            except grpc.aio.AioRpcError:
                return 500
            finally:
                idle.put_nowait(call)

        try:
            return await _loop(send, seconds, concurrency, warmup)
        finally:
            for call in calls:
                call.cancel()


def _channel(target: str, credentials=None):
    """An asyncio gRPC channel to ``target``: TLS with channel ``credentials``, else plaintext."""
    import grpc

    return grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)


async def _loop(send, seconds: float, concurrency: int, warmup: int) -> dict:
    """``concurrency`` workers awaiting ``send()`` (-> an HTTP-like status) back to back for ``seconds``."""
    for _ in range(warmup):
        await send()
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker():
        nonlocal errors
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            status = await send()
            latencies.append(time.perf_counter() - t0)
            errors += status != 200

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"rps": len(latencies) / elapsed, "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * float(np.quantile(latencies, 0.99)), "errors": errors, "n": len(latencies)}


async def post_loop(url: str, path: str, body: bytes, seconds: float, concurrency: int,
                    tls: ssl.SSLContext | None = None) -> dict:
    """:func:`closed_loop` POSTing JSON ``body`` to ``url`` (``http://host:port``, or ``https://``
    with the client context ``tls``) + ``path``."""
    if url.startswith("https://") and tls is None:
        raise ValueError("an https:// URL needs tls, a client context that trusts the server")
    host, port = url.removeprefix("http://").removeprefix("https://").rstrip("/").rsplit(":", 1)
    return await closed_loop(host, int(port), request_bytes(f"{host}:{port}", path, body), seconds, concurrency,
                             tls=tls if url.startswith("https://") else None)


def batch_body(x: np.ndarray, outputs: list[str] | None = None) -> tuple[bytes, bytes]:
    """The V2 binary body of a batch-attribution job over ``x`` (float32 (n, d)): (JSON head, head +
    rows). ``outputs``: the output names the head asks for; None asks for none, and the job answers
    every output of the serving graph (the endpoint's default)."""
    raw = np.ascontiguousarray(x, np.float32).tobytes()
    wire: dict = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                              "parameters": {"binary_data_size": len(raw)}}]}
    if outputs is not None:
        wire["outputs"] = [{"name": n} for n in outputs]
    head = json.dumps(wire).encode()
    return head, head + raw


def batch_job(client, name: str, x: np.ndarray, layout: str = "rows", outputs: list[str] | None = None) -> int:
    """POST ``x`` (float32 (n, d)) as one batch-attribution job with ``client`` (an ``httpx.Client``
    on the server's URL; ``outputs`` as :func:`batch_body`), read the NDJSON answer as it streams and
    return the rows answered: lines counted in the bytes (``layout=rows``) or the leading ``"rows"``
    ranges of the column lines (``layout=columns``) -- no per-line decoding, which would be most of
    what the client did. A job that answers another number of rows than ``x`` has (an error line, a
    cut stream) raises."""
    head, body = batch_body(x, outputs)
    rows, tail = 0, b""
    with client.stream("POST", f"/v2/models/{name}/batch-attribution", content=body,
                       params={"layout": layout},
                       headers={"Inference-Header-Content-Length": str(len(head))}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"batch job failed: {r.status_code} {r.read()[:300]!r}")
        for chunk in r.iter_bytes():
            if layout == "rows":
                rows += chunk.count(b"\n")
                continue
            buf = tail + chunk
            for m in _ROWS_RANGE.finditer(buf):
                if m.end() > len(tail):     # not counted with the previous chunk
                    rows += int(m[2]) - int(m[1])
            tail = buf[-64:]
    if rows != len(x):
        raise RuntimeError(f"a {layout} batch job answered {rows} of {len(x)} rows")
    return rows


def large_body(x: np.ndarray, diagnostics: bool = False, binary: bool = True) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of one online V2 inference request of all of ``x`` (float32 (n, d)): binary
    input and outputs (``binary``) or JSON both ways; the four default outputs or (``diagnostics``)
    every one. Built once, outside the timed calls."""
    params = {"diagnostics": True} if diagnostics else {}
    if not binary:
        wire = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}],
                "parameters": params}
        return json.dumps(wire).encode(), {"Content-Type": "application/json"}
    raw = np.ascontiguousarray(x, np.float32).tobytes()
    wire = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True, **params}}
    head = json.dumps(wire).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def large_request(client, name: str, body: tuple[bytes, dict[str, str]], rows: int) -> float:
    """Seconds for one online request ``body`` (:func:`large_body`) of ``rows`` rows with ``client``
    (an ``httpx.Client`` on the server's URL). A request that fails, or answers another number of
    rows, raises."""
    content, headers = body
    t0 = time.perf_counter()
    r = client.post(f"/v2/models/{name}/infer", content=content, headers=headers)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"a {rows}-row request failed: {r.status_code} {r.content[:300]!r}")
    length = r.headers.get("inference-header-content-length")
    answer = json.loads(r.content[:int(length)] if length else r.content)
    if any(o["shape"][0] != rows for o in answer["outputs"]):
        raise RuntimeError(f"a {rows}-row request answered {[o['shape'] for o in answer['outputs']]}")
    return elapsed


def batch_throughput(url: str, name: str, x: np.ndarray, layout: str, seconds: float) -> float:
    """Rows/s of back-to-back :func:`batch_job` runs on ``x`` for at least ``seconds`` (and two
    jobs), after one warm-up job of its first 1,024 rows."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as client:
        batch_job(client, name, x[:1024], layout)
        rows, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds or rows < 2 * len(x):
            rows += batch_job(client, name, x, layout)
    return rows / elapsed
