"""Batch attribution: thousands of rows in, NDJSON rows out, chunk by chunk with bounded memory.

Sources read a spooled request body (memory up to a few MiB, then a temporary file) and yield
row chunks; :class:`BatchJob` sends each chunk through the model's batcher (waiting for queue room
instead of failing) with one chunk computing ahead, and yields one JSON line per row:
``{"row": i, "class": name?, "<output>": value, ...}``.

Error contract (nothing accepted is dropped): rows are answered in order. A failure found before
the first chunk is computed -- a bad request, no rows at all, or a bad row among the first
``chunk_rows`` -- is a plain 4xx/5xx error response with no rows. After that the status is 200 and a
failure ends the stream with one last line ``{"error": ..., "error_type": ..., "row": i}``: every row
before ``i`` has been answered, no row from ``i`` on has. A bad NDJSON line ``i`` therefore answers
rows ``0 .. i-1`` (also those of its own, partly read chunk) and then the error line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import IO, Any

import numpy as np
import orjson

from service import codecs
from service.dataplane import DataPlane, InferOptions
from service.errors import (
    BadRequest,
    EmptyBatch,
    HJServeError,
    InvalidDatatype,
    InvalidHeader,
    InvalidJSON,
    InvalidParameter,
    InvalidShape,
    PayloadTooLarge,
    UnknownInput,
    error_body,
    lookup,
)
from service.repository import ModelVersion
from service.types import InferenceRequest

__all__ = ["BatchJob", "binary_source", "json_source", "ndjson_source"]

Chunk = tuple[np.ndarray, str]  # rows (n, d) and their V2 datatype (FP32 | FP64)


def ndjson_source(body: IO[bytes], chunk_rows: int, max_rows: int, max_line_bytes: int) -> Iterator[Chunk]:
    """One row per line: ``[x1, ..., xd]`` or ``{"input": [...]}``; blank lines are skipped. A line
    longer than ``max_line_bytes`` is refused before it is parsed (it is never held in memory whole).

    Rows are converted to numbers a chunk at a time; only a chunk that fails is searched for its
    first bad row. On a bad line after at least one full chunk, the good rows read before it are
    yielded first, then the error is raised (see the module's error contract)."""
    rows: list[Any] = []
    lines: list[int] = []      # the line number of each row in ``rows``
    width: int | None = None
    total = 0
    yielded = False
    number = 0

    def flush() -> Iterator[Chunk]:
        """The pending rows as a chunk; a row that is not a flat list of numbers ends the stream
        with its line number, after the good rows before it when a chunk already went out."""
        nonlocal yielded
        try:
            array = _rows_array(rows)
        except HJServeError:
            bad = next((k for k, row in enumerate(rows) if not _numeric(row)), 0)
            if yielded and bad:
                yield _rows_array(rows[:bad]), "FP64"
            raise InvalidDatatype(f"NDJSON line {lines[bad]}: a row must be a flat list of numbers") from None
        yielded = True
        yield array, "FP64"

    while True:
        line = body.readline(max_line_bytes + 1)
        if not line:
            break
        number += 1
        try:
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                raise PayloadTooLarge(f"NDJSON line {number} is longer than the limit of {max_line_bytes} bytes "
                                      "(HJSERVE_MAX_LINE_BYTES)")
            if not line.strip():
                continue
            try:
                item = codecs.parse_json(line)
            except InvalidJSON as exc:
                raise InvalidJSON(f"NDJSON line {number}: {exc.message}") from None
            if isinstance(item, dict):
                item = item.get("input")
            if not isinstance(item, list):
                raise InvalidJSON(f"NDJSON line {number}: expected a JSON array of features or {{\"input\": [...]}}")
            if width is not None and len(item) != width:
                raise InvalidShape(f"NDJSON line {number}: {len(item)} features, earlier rows have {width}")
            if total + 1 > max_rows:
                raise PayloadTooLarge(f"more than {max_rows} rows (HJSERVE_BATCH_MAX_ROWS)")
        except HJServeError:
            if rows and yielded:   # a chunk already went out: answer the good rows read before this line
                yield from flush()
            raise
        width = len(item)
        rows.append(item)
        lines.append(number)
        total += 1
        if len(rows) == chunk_rows:
            yield from flush()
            rows, lines = [], []
    if rows:
        yield from flush()


def _numeric(row: list[Any]) -> bool:
    try:
        return np.asarray(row, dtype=np.float64).ndim == 1
    except (TypeError, ValueError):
        return False


def _rows_array(rows: list[Any]) -> np.ndarray:
    if len({len(r) if isinstance(r, list) else -1 for r in rows}) != 1:
        raise InvalidShape("every row must be a list of the same number of features")
    try:
        array = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidDatatype(f"rows must hold numbers: {str(exc)[:200]}") from None
    if array.ndim != 2:   # nested lists inside a row are not features: never flattened silently
        raise InvalidShape("every row must be a flat list of numbers")
    return array


def json_source(obj: Any, chunk_rows: int, max_rows: int) -> tuple[Iterator[Chunk], dict[str, Any], list[str]]:
    """A whole JSON body: ``{"instances": rows}``, ``[rows]`` or a V2 request (JSON data).

    Returns (chunks, parameters, requested outputs)."""
    params: dict[str, Any] = {}
    outputs: list[str] = []
    if isinstance(obj, dict) and "inputs" in obj:
        request = codecs.infer_request_from(obj)
        if len(request.inputs) != 1 or request.inputs[0].name != "input":
            raise UnknownInput("expected exactly one input named 'input'")
        tensor = request.inputs[0]
        if len(tensor.shape) != 2:
            raise InvalidShape(f"input must have shape [rows, d], got {list(tensor.shape)}")
        array, datatype = tensor.array, tensor.datatype
        params, outputs = request.parameters, [o.name for o in request.outputs]
    else:
        rows = obj.get("instances") if isinstance(obj, dict) else obj
        if not isinstance(rows, list):
            raise InvalidJSON('expected {"instances": [[...], ...]}, a list of rows or a V2 request')
        if isinstance(obj, dict):
            params = _parameters(obj.get("parameters"))
        array, datatype = (_rows_array(rows) if rows else np.zeros((0, 0))), "FP64"
    if len(array) > max_rows:
        raise PayloadTooLarge(f"{len(array)} rows exceed the limit of {max_rows}")

    def chunks() -> Iterator[Chunk]:
        for start in range(0, len(array), chunk_rows):
            yield array[start:start + chunk_rows], datatype

    return chunks(), params, outputs


def _parameters(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidParameter(f"parameters must be a JSON object, got {type(value).__name__}")
    return dict(value)


def binary_source(body: IO[bytes], total: int, header_length: str, chunk_rows: int,
                  max_rows: int) -> tuple[Iterator[Chunk], dict[str, Any], list[str]]:
    """A V2 binary-extension body whose ``input`` is binary; rows are read from the file lazily."""
    length = codecs.parse_header_length(header_length, total)
    head = codecs.parse_json(body.read(length))
    try:
        wire = InferenceRequest.model_validate(head)
    except Exception as exc:
        raise BadRequest(f"invalid inference request header: {exc}") from None
    if len(wire.inputs) != 1 or wire.inputs[0].name != "input":
        raise UnknownInput("expected exactly one input named 'input'")
    tensor = wire.inputs[0]
    size = (tensor.parameters or {}).get("binary_data_size")
    if tensor.datatype not in ("FP32", "FP64"):
        raise InvalidDatatype(f"input must be FP32 or FP64, got {tensor.datatype}")
    if size is None or len(tensor.shape) != 2:
        raise InvalidHeader("the binary input needs binary_data_size and shape [rows, d]")
    itemsize = codecs.DATATYPES[tensor.datatype].itemsize
    n, d = tensor.shape
    if size != n * d * itemsize or length + size != total:
        raise InvalidHeader(f"binary_data_size {size} does not match shape {tensor.shape} "
                            f"of {tensor.datatype} and the {total - length} bytes after the header")
    if n > max_rows:
        raise PayloadTooLarge(f"{n} rows exceed the limit of {max_rows}")
    params = dict(wire.parameters or {})
    params.pop("binary_data_output", None)
    outputs = [o.name for o in wire.outputs or []]

    def chunks() -> Iterator[Chunk]:
        dtype = codecs.DATATYPES[tensor.datatype]
        for start in range(0, n, chunk_rows):
            k = min(chunk_rows, n - start)
            raw = body.read(k * d * itemsize)
            yield np.frombuffer(raw, dtype=dtype).reshape(k, d), tensor.datatype

    return chunks(), params, outputs


def _consume(task: asyncio.Task) -> None:
    """Retrieve a cancelled chunk's outcome so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


class BatchJob:
    """One batch attribution job on a pinned model version."""

    def __init__(self, dataplane: DataPlane, mv: ModelVersion, options: InferOptions,
                 source: Iterator[Chunk], on_close: Callable[[], None] | None = None):
        self.on_close = on_close or (lambda: None)
        self.dataplane = dataplane
        self.mv = mv
        self.options = options
        self.source = source
        self.rows = 0

    async def _next_chunk(self) -> Chunk | None:
        return await asyncio.to_thread(next, self.source, None)

    async def _compute(self, chunk: Chunk) -> dict[str, np.ndarray]:
        """One chunk on the job's version number; a reload of that version mid-job (its batcher
        closed) is retried on the new load, like V2 infer does (:meth:`DataPlane.predict`)."""
        array, datatype = chunk

        def rows_of(current: ModelVersion) -> np.ndarray:
            return self.dataplane.check_rows(current, array, datatype, array.shape)

        done = await self.dataplane.predict(self.mv.name, str(self.mv.version), rows_of, self.options.tau,
                                            self.options.timeout_s, wait_for_room=True)
        self.mv = done.mv
        self.mv.metrics.record_rows(done.outputs, self.mv.task)
        self.mv.metrics.batch_rows.inc(done.rows)
        return done.outputs

    def _lines(self, outputs: dict[str, np.ndarray], start: int) -> bytes:
        """One NDJSON line per row. Columns are converted once (``tolist``) and each row object is
        serialised by orjson (the standard library's encoder dominated the batch job's time:
        ``bench/results/service.md`` measures the job against the in-process predictor; every float
        output is finite -- the graph saturates to the float32 range -- so nothing becomes null)."""
        selected = self.dataplane.select(self.mv, outputs, self.options)
        columns = [(o.name, o.array.tolist()) for o in selected]
        names = self.mv.spec.get("class_names") if self.mv.task == "classification" else None
        classes = [str(names[int(k)]) for k in outputs["prediction"]] if names else None
        lines = []
        for i in range(len(columns[0][1]) if columns else 0):
            item: dict[str, Any] = {"row": start + i}
            if classes is not None:
                item["class"] = classes[i]
            for name, values in columns:
                item[name] = values[i]
            lines.append(orjson.dumps(item))
        return b"\n".join(lines) + b"\n" if lines else b""

    async def first(self) -> tuple[dict[str, np.ndarray], Chunk]:
        """Compute the first chunk before the response starts, so its errors get a proper status
        (a body with no rows is EmptyBatch, like V2 infer)."""
        chunk = await self._next_chunk()
        if chunk is None:
            raise EmptyBatch("the batch has no rows")
        return await self._compute(chunk), chunk

    async def stream(self, first: dict[str, np.ndarray]) -> AsyncIterator[bytes]:
        """NDJSON lines; one chunk computes while the next one is read and the previous one is
        written. Follows the module's error contract: rows before the error line are all answered."""
        metrics = self.mv.metrics
        metrics.batch_jobs.inc()
        began = time.perf_counter()
        pending: asyncio.Task | None = None
        start = 0
        try:
            outputs: dict[str, np.ndarray] | None = first
            while outputs is not None:
                read_error: HJServeError | None = None
                try:
                    nxt = await self._next_chunk()
                except HJServeError as exc:   # a bad row: answer what was computed, then say so
                    nxt, read_error = None, exc
                if nxt is not None:
                    pending = asyncio.ensure_future(self._compute(nxt))
                yield self._lines(outputs, start)
                start += len(next(iter(outputs.values())))
                if read_error is not None:
                    raise read_error
                if pending is None:
                    break
                outputs = await pending
                pending = None
            metrics.success.inc()  # a job is one request; its rows counted in batch_rows
        except HJServeError as exc:
            mapping = lookup(exc)
            metrics.failed(mapping.error_type, time.perf_counter() - began)
            line = {**error_body(exc.message, mapping.error_type), "row": start}
            yield codecs.dumps(line) + b"\n"
        finally:  # synchronous only: this may run inside a cancelled scope (client hung up)
            if pending is not None:
                pending.cancel()
                pending.add_done_callback(_consume)
            metrics.batch_jobs.dec()
            self.rows = start
            self.on_close()
