"""Batch attribution route: JSON, NDJSON or V2 binary rows in, NDJSON rows streamed out.

The body is spooled (memory up to a few MiB, then a temporary file), read lazily by a source of
:mod:`service.codecs.batch`, computed by the dataplane's :class:`~service.dataplane.Attribution`
job, and each answered row is written as one JSON line ``{"row": i, "class": name?, "<output>":
value, ...}``. Error contract: a failure before the first block is a plain 4xx/5xx error response
with no rows; after it the status is 200 and the stream ends with one line ``{"error", "error_type",
"row": i}`` -- every row before ``i`` has been answered, none from ``i`` on.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import codecs
from service.codecs import binary_source, json_source, ndjson_source
from service.dataplane import Attribution
from service.errors import HJServeError, InvalidParameter, PayloadTooLarge, error_body, lookup
from service.rest.common import dataplane_of, settings_of
from service.types import RowBlock

__all__ = ["batch_attribution", "ndjson_lines"]

#: Bodies are spooled: in memory up to this size, then in a temporary file.
_SPOOL_BYTES = 8 * 1024 * 1024


class _ClosingStream(StreamingResponse):
    """Closes the body generator even when the client hangs up while it is suspended at a yield,
    so the job's cleanup (metrics, spool) runs at once instead of at garbage collection."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def _query_params(top_k: int | None, tau: float | None, chunk_rows: int | None,
                  timeout: int | None) -> dict[str, Any]:
    """The documented query parameters that were given (they override the body's parameters)."""
    given = {"top_k": top_k, "tau": tau, "chunk_rows": chunk_rows, "timeout": timeout}
    return {k: v for k, v in given.items() if v is not None}


async def _spool(request: Request, limit: int):
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115 - closed by the response
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool, size


def ndjson_lines(block: RowBlock) -> bytes:
    """One NDJSON line per row. Columns are converted once (``tolist``) and each row object is
    serialised by orjson (``bench/results/service.md`` measures the job against the in-process
    predictor; every float output is finite -- the graph saturates to the float32 range -- so nothing
    becomes null)."""
    columns = [(o.name, o.array.tolist()) for o in block.outputs]
    lines = []
    for i in range(block.rows):
        item: dict[str, Any] = {"row": block.start + i}
        if block.classes is not None:
            item["class"] = block.classes[i]
        for name, values in columns:
            item[name] = values[i]
        lines.append(orjson.dumps(item))
    return b"\n".join(lines) + b"\n" if lines else b""


async def _stream(job: Attribution, on_close) -> AsyncIterator[bytes]:
    """The job's blocks as NDJSON; a failure after the first block becomes the last line."""
    blocks = job.blocks()
    try:
        async for block in blocks:
            yield ndjson_lines(block)
    except HJServeError as exc:
        line = {**error_body(exc.message, lookup(exc).error_type), "row": job.rows_done}
        yield codecs.dumps(line) + b"\n"
    finally:   # a client that hung up: close the job now (metrics, pending chunk), not at collection
        await blocks.aclose()
        on_close()


async def batch_attribution(request: Request, model_name: str, model_version: str | None = None, *,
                            top_k: int | None = None, tau: float | None = None, chunk_rows: int | None = None,
                            timeout: int | None = None) -> Response:
    """Rows in (JSON, NDJSON or V2 binary), NDJSON rows out (see the module's error contract). Query
    parameters ``top_k``, ``tau``, ``timeout`` (microseconds) override the body's; ``chunk_rows`` sets
    how many rows go to the batcher at once."""
    settings = settings_of(request)
    dataplane = dataplane_of(request)
    query = _query_params(top_k, tau, chunk_rows, timeout)
    chunk_rows = query.pop("chunk_rows", 4 * settings.max_batch_size)
    if not 1 <= chunk_rows <= 16 * settings.max_batch_size:
        raise InvalidParameter(f"chunk_rows must be in [1, {16 * settings.max_batch_size}]")
    dataplane.model_ready(model_name, model_version)   # an unknown model fails before the body is read
    header = request.headers.get(codecs.HEADER_LENGTH)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    streamed = header is not None or "ndjson" in ctype or "jsonl" in ctype
    spool, size = await _spool(request, settings.max_stream_bytes if streamed else settings.max_body_bytes)
    try:
        params: dict[str, Any] = {}
        outputs: list[str] = []
        if header is not None:
            source, params, outputs = await run_in_threadpool(
                binary_source, spool, size, header, chunk_rows, settings.batch_max_rows)
        elif streamed:
            source = ndjson_source(spool, chunk_rows, settings.batch_max_rows, settings.max_line_bytes)
        else:
            obj = codecs.parse_json(await run_in_threadpool(spool.read))
            source, params, outputs = json_source(obj, chunk_rows, settings.batch_max_rows)
        params.update(query)
        job = dataplane.attribute(model_name, model_version, source, params, outputs)
        await job.start()
    except BaseException:
        spool.close()
        raise
    return _ClosingStream(_stream(job, spool.close), media_type="application/x-ndjson",
                          headers={"X-Model-Version": job.version})
