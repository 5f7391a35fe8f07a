"""Batch attribution route: JSON, NDJSON or V2 binary rows in, NDJSON rows streamed out."""

from __future__ import annotations

import tempfile
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import codecs
from service.batch import BatchJob, binary_source, json_source, ndjson_source
from service.errors import HJServeError, InvalidParameter, PayloadTooLarge, lookup
from service.rest.common import dataplane_of, settings_of

__all__ = ["batch_attribution"]

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


async def batch_attribution(request: Request, model_name: str, model_version: str | None = None, *,
                            top_k: int | None = None, tau: float | None = None, chunk_rows: int | None = None,
                            timeout: int | None = None) -> Response:
    """Rows in (JSON, NDJSON or V2 binary), NDJSON rows out; see :mod:`service.batch` for the error
    contract. Query parameters ``top_k``, ``tau``, ``timeout`` (microseconds) override the body's;
    ``chunk_rows`` sets how many rows go to the batcher at once."""
    settings = settings_of(request)
    dataplane = dataplane_of(request)
    mv = dataplane.repository.get(model_name, model_version)
    query = _query_params(top_k, tau, chunk_rows, timeout)
    chunk_rows = query.pop("chunk_rows", 4 * settings.max_batch_size)
    if not 1 <= chunk_rows <= 16 * settings.max_batch_size:
        raise InvalidParameter(f"chunk_rows must be in [1, {16 * settings.max_batch_size}]")
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
        if not outputs and "diagnostics" not in params:
            outputs = list(mv.output_names)
        options = dataplane.resolve_options(mv, params, outputs)
        job = BatchJob(dataplane, mv, options, source, on_close=spool.close)
        try:
            first, _ = await job.first()
        except HJServeError as exc:
            mv.metrics.failed(lookup(exc).error_type)
            raise
    except BaseException:
        spool.close()
        raise
    return _ClosingStream(job.stream(first), media_type="application/x-ndjson",
                             headers={"X-Model-Version": str(mv.version)})
