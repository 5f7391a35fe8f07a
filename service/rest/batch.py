"""Batch attribution route: JSON, NDJSON or V2 binary rows in, NDJSON rows streamed out.

The body is spooled (:class:`Spool`: memory up to a few MiB, then a temporary file in
``spool_dir``; all jobs' spools together within ``max_spool_bytes``, :func:`spool_budget`), read lazily by a source of
:mod:`service.codecs.batch`, computed by the dataplane's :class:`~service.dataplane.Attribution`
job, and each answered row is written as one JSON line ``{"row": i, "class": name?, "<output>":
value, ...}`` -- or, with ``layout=columns``, each graph call's block as one line of columns
``{"rows": [first, end), "class": [...]?, "<output>": [one value per row], ...}`` (no per-row
objects to build or parse: the fast form for bulk jobs). Error contract: a failure before the first block is a plain 4xx/5xx error response
with no rows; after it the status is 200 and the stream ends with one line ``{"error", "error_type",
"row": i}`` -- every row before ``i`` has been answered, none from ``i`` on.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import anyio
import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from hjmodel import serving
from service import codecs
from service.budget import ByteBudget
from service.codecs import binary_source, json_source, ndjson_source
from service.dataplane import Attribution
from service.errors import (
    HJServeError,
    InsufficientStorage,
    InvalidParameter,
    PayloadTooLarge,
    SpoolFull,
    error_body,
    lookup,
)
from service.metrics import BATCH_SPOOL_BYTES
from service.rest.common import body_chunks, body_decoder, dataplane_of, declared_length, settings_of
from service.types import RowBlock

__all__ = ["Spool", "batch_attribution", "column_line", "ndjson_lines", "spool_budget"]

#: the ``layout`` query parameter: one line per row (default) or one line of columns per block
LAYOUTS = ("rows", "columns")

#: Bodies are spooled: in memory up to this size, then in a temporary file.
_SPOOL_BYTES = 8 * 1024 * 1024


logger = logging.getLogger(__name__)


def spool_budget(settings) -> ByteBudget:
    """The app's budget of batch bodies (``max_spool_bytes``; 503 ``spool_full`` when it is taken)."""
    return ByteBudget(settings.max_spool_bytes, "HJSERVE_MAX_SPOOL_BYTES", "batch bodies", BATCH_SPOOL_BYTES,
                      full=SpoolFull, retry_after_s=settings.retry_after_s)


class Spool:
    """One batch body: its first :data:`_SPOOL_BYTES` in memory, the rest in an unnamed temporary
    file in ``directory``; every byte written counts against ``budget`` until :meth:`close`. A write
    that fails (a full disk) is :class:`~service.errors.InsufficientStorage`."""

    def __init__(self, budget: ByteBudget, directory: str | None = None):
        self.file = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES, dir=directory)  # noqa: SIM115 - closed by close()
        self.hold = budget.hold()

    def write(self, data: bytes) -> int:
        if not data:
            return 0
        self.hold.take(len(data))
        try:
            return self.file.write(data)
        except OSError as exc:
            logger.error("batch body spool write failed: %s", exc)
            raise InsufficientStorage(f"the server could not spool the batch body ({exc.strerror}): "
                                      "retry later or send a smaller body") from None

    def close(self) -> None:
        self.file.close()
        self.hold.release()


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


async def _spool(request: Request, limit: int) -> tuple[Spool, int]:
    """The body, decoded (:func:`~service.rest.common.body_decoder`), in a :class:`Spool` within
    the app's :func:`spool_budget` (a declared ``Content-Length`` is checked against it before any
    byte is read); (spool, size)."""
    budget: ByteBudget = request.app.state.spool_budget
    declared = declared_length(request, limit)
    if declared is not None and "content-encoding" not in request.headers:   # what it will hold, as sent
        budget.check(0, declared)
    decode = body_decoder(request, limit)
    spool = Spool(budget, request.app.state.settings.spool_dir)
    sent = size = 0
    try:
        async for chunk in body_chunks(request):
            sent += len(chunk)
            if sent > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            if chunk:
                size += spool.write(decode(chunk))
        size += spool.write(decode(b""))
    except BaseException:
        spool.close()
        raise
    spool.file.seek(0)
    return spool, size


def ndjson_lines(block: RowBlock) -> bytes:
    """One NDJSON line per row, ``{"row": i, "class": name?, "<output>": value, ...}``, float32
    values in their shortest form (the float32 they are, read back exactly by a float32 parse; about
    40% fewer bytes than their float64 expansion). Each column is serialised once by orjson straight
    from its numpy array and cut into per-row pieces, and each line is one ``%`` format of a template
    over them: no per-row objects (:func:`_ndjson_by_row` writes the same bytes, an object per row).
    Every float output is finite -- the graph saturates to the float32 range -- and a block that
    somehow is not is written by the standard encoder (NaN / Infinity, as in V2 replies).
    ``bench/results/loop_work.md`` times it against the object-per-row encoder on real outputs (only
    ~6% faster: the shortest-form float32 printing both share is most of the cost);
    ``bench/results/service.md`` measures the job against the in-process predictor."""
    if not block.rows or not _finite(block) or any(o.array.ndim > 2 for o in block.outputs):
        return _ndjson_by_row(block)
    # a 2-D column's rows are written between the template's brackets: its pieces are their insides
    fields = [(b',"%s":[%%s]' if o.array.ndim == 2 else b',"%s":%%s') % o.name.replace("%", "%%").encode()
              for o in block.outputs]
    columns = [_pieces(_as_written(o), block.rows) for o in block.outputs]
    if block.classes is not None:
        fields.insert(0, b',"class":%s')
        columns.insert(0, [orjson.dumps(name) for name in block.classes])
    template = b'{"row":%d' + b"".join(fields) + b"}"
    first = block.start
    lines = [template % values for values in zip(range(first, first + block.rows), *columns)]
    return b"\n".join(lines) + b"\n"


def _pieces(array: np.ndarray, rows: int) -> list[bytes]:
    """The JSON text of each row of a 1-D numeric column, or of the inside of each row's brackets of
    a 2-D one, cut from one orjson serialisation of the whole column (numbers, ``true`` / ``false``
    and brackets only: no commas or brackets inside a value)."""
    raw = orjson.dumps(np.ascontiguousarray(array), option=orjson.OPT_SERIALIZE_NUMPY)
    if array.ndim == 1:
        pieces = raw[1:-1].split(b",")
    else:
        pieces = raw[2:-2].split(b"],[")
    if len(pieces) != rows:
        raise ValueError(f"column of {len(pieces)} rows in a block of {rows}")
    return pieces


def _ndjson_by_row(block: RowBlock) -> bytes:
    """:func:`ndjson_lines` with one object per row: the standard encoder for a block that is not
    finite, orjson from the numpy values otherwise."""
    finite = _finite(block)
    # float columns as numpy rows (orjson writes float32 in its shortest form), others as Python values
    columns = [(o.name, list(_as_written(o)) if finite and o.array.dtype.kind == "f" else o.array.tolist())
               for o in block.outputs]
    dump = _dump_numpy if finite else codecs.dumps
    lines = []
    for i in range(block.rows):
        item: dict[str, Any] = {"row": block.start + i}
        if block.classes is not None:
            item["class"] = block.classes[i]
        for name, values in columns:
            item[name] = values[i]
        lines.append(dump(item))
    return b"\n".join(lines) + b"\n" if lines else b""


def column_line(block: RowBlock) -> bytes:
    """The block as one NDJSON line of columns, ``{"rows": [first, end), "class": [...]?, "<output>":
    [...]}``, each column serialised by orjson straight from its numpy array (float32 values that read
    back exactly as the float32 they are, as in :func:`ndjson_lines`; a block that somehow is not
    finite by the standard encoder)."""
    finite = _finite(block)
    item: dict[str, Any] = {"rows": [block.start, block.start + block.rows]}
    if block.classes is not None:
        item["class"] = list(block.classes)
    for o in block.outputs:
        item[o.name] = np.ascontiguousarray(_as_written(o)) if finite else o.array.tolist()
    return (_dump_numpy(item) if finite else codecs.dumps(item)) + b"\n"


_BOUNDS = serving.ROUNDED_DOWN | serving.ROUNDED_UP


def _as_written(output) -> np.ndarray:
    """An output's values as the batch lines write them: float32 in its shortest form, except a bound
    (the certified radius, the p-value), widened to float64 so its text is the float32's exact value
    (its shortest form may read, in float64, above the radius or below the p-value)."""
    return output.array.astype(np.float64) if output.name in _BOUNDS else output.array


def _finite(block: RowBlock) -> bool:
    """Whether every float output of the block is finite (orjson's numpy path writes only those)."""
    return all(np.isfinite(o.array).all() for o in block.outputs if o.array.dtype.kind == "f")


def _dump_numpy(item: dict[str, Any]) -> bytes:
    return orjson.dumps(item, option=orjson.OPT_SERIALIZE_NUMPY)


async def _stream(job: Attribution, on_close, encode=ndjson_lines) -> AsyncIterator[bytes]:
    """The job's blocks as NDJSON (``encode``: :func:`ndjson_lines` or :func:`column_line`); a failure
    after the first block becomes the last line."""
    blocks = job.blocks()
    try:
        async for block in blocks:
            yield encode(block)
    except HJServeError as exc:
        line = {**error_body(exc.message, lookup(exc).error_type), "row": job.rows_done}
        yield codecs.dumps(line) + b"\n"
    finally:   # a client that hung up: close the job now (metrics, pending chunk), not at collection
        await blocks.aclose()
        on_close()


#: per-row elements x rows of one default batch-job graph call (2^19: a 4 MiB float64 tensor; at
#: 2^22, 32 MiB, calls ran slower per row and an online request waited twice as long behind one,
#: bench/results/ab_chunk_rows.md)
CHUNK_ELEMENTS = 1 << 19


def default_chunk_rows(spec: dict, max_batch_size: int) -> int:
    """Rows per graph call of a batch job: as many as keep the graph's largest per-row tensors (head
    neurons, reference points, body pieces; :data:`CHUNK_ELEMENTS` in all) near the cache,
    between 4 and 16 x ``max_batch_size`` (the floor spreads the per-call overhead over enough rows;
    a smaller chunk also shortens the wait of an online request behind a running job)."""
    st, cal = spec.get("structure") or {}, spec.get("calibration") or {}
    sizes = [st.get("n_neurons"), cal.get("reference_size"), *[b.get("pieces") for b in st.get("body") or []]]
    widest = max([int(v) for v in sizes if isinstance(v, int) and v > 0] or [1])
    return max(4 * max_batch_size, min(16 * max_batch_size, CHUNK_ELEMENTS // widest))


async def batch_attribution(request: Request, model_name: str, model_version: str | None = None, *,
                            top_k: int | None = None, tau: float | None = None, chunk_rows: int | None = None,
                            timeout: int | None = None, layout: str | None = None) -> Response:
    """Rows in (JSON, NDJSON or V2 binary), NDJSON rows out (see the module's error contract). Query
    parameters ``top_k``, ``tau``, ``timeout`` (microseconds) override the body's; ``chunk_rows`` sets
    how many rows go to the backend in one graph call (default :func:`default_chunk_rows`, at most
    16 x max_batch_size); ``layout`` is ``rows`` (default: one line per row) or ``columns`` (one
    line of columns per graph call)."""
    if layout not in (None, *LAYOUTS):
        raise InvalidParameter(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    encode = column_line if layout == "columns" else ndjson_lines
    settings = settings_of(request)
    dataplane = dataplane_of(request)
    query = _query_params(top_k, tau, chunk_rows, timeout)
    dataplane.model_ready(model_name, model_version)   # an unknown model fails before the body is read
    chunk_rows = query.pop("chunk_rows", None)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(dataplane.repository.get(model_name, model_version).spec.raw,
                                        settings.max_batch_size)
    if not 1 <= chunk_rows <= 16 * settings.max_batch_size:
        raise InvalidParameter(f"chunk_rows must be in [1, {16 * settings.max_batch_size}]")
    header = request.headers.get(codecs.HEADER_LENGTH)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    streamed = header is not None or "ndjson" in ctype or "jsonl" in ctype
    spool, size = await _spool(request, settings.max_stream_bytes if streamed else settings.max_body_bytes)
    memory = dataplane.request_memory.hold()   # a JSON body's parsed rows, held until the job ends

    def close() -> None:
        spool.close()
        memory.release()
    try:
        params: dict[str, Any] = {}
        outputs: list[str] = []
        if header is not None:
            source, params, outputs = await run_in_threadpool(
                binary_source, spool.file, size, header, chunk_rows, settings.batch_max_rows)
        elif streamed:
            source = ndjson_source(spool.file, chunk_rows, settings.batch_max_rows, settings.max_line_bytes)
        else:
            memory.take(codecs.PARSE_BYTES_PER_BYTE * size)
            text = await run_in_threadpool(spool.file.read)
            source, params, outputs = json_source(codecs.parse_json(text), chunk_rows, settings.batch_max_rows,
                                                  codecs.may_hold_booleans(text))
            del text
        params.update(query)
        job = dataplane.attribute(model_name, model_version, source, params, outputs)
        await job.start()
    except BaseException:
        close()
        raise
    return _ClosingStream(_stream(job, close, encode), media_type="application/x-ndjson",
                          headers={"X-Model-Version": job.version})
