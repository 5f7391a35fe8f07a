"""Batch attribution: thousands of rows in, NDJSON rows out, chunk by chunk with bounded memory.

Sources read a spooled request body (memory up to a few MiB, then a temporary file) and yield
row chunks; :func:`run_job` sends each chunk through the model's batcher (waiting for queue room
instead of failing) with one chunk computing ahead, and yields one JSON line per row:
``{"row": i, "class": name?, "<output>": value, ...}``. A failure after the stream started is
sent as a last line ``{"error": ..., "error_type": ..., "row": first row of the failed chunk}``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import IO, Any

import numpy as np

from service import codecs
from service.dataplane import DataPlane, InferOptions
from service.errors import (
    BadRequest,
    HJServeError,
    InvalidDatatype,
    InvalidHeader,
    InvalidJSON,
    InvalidShape,
    PayloadTooLarge,
    UnknownInput,
    error_body,
    lookup,
)
from service.repository import ModelVersion
from service.types import InferenceRequest

__all__ = ["BatchJob", "binary_source", "json_source", "ndjson_source", "run_job"]

Chunk = tuple[np.ndarray, str]  # rows (n, d) and their V2 datatype (FP32 | FP64)


def ndjson_source(body: IO[bytes], chunk_rows: int, max_rows: int) -> Iterator[Chunk]:
    """One row per line: ``[x1, ..., xd]`` or ``{"input": [...]}``; blank lines are skipped."""
    rows: list[Any] = []
    total = 0
    for number, line in enumerate(body, start=1):
        if not line.strip():
            continue
        item = codecs.parse_json(line)
        if isinstance(item, dict):
            item = item.get("input")
        if not isinstance(item, list):
            raise InvalidJSON(f"NDJSON line {number}: expected a JSON array of features or {{\"input\": [...]}}")
        rows.append(item)
        total += 1
        if total > max_rows:
            raise PayloadTooLarge(f"more than {max_rows} rows")
        if len(rows) == chunk_rows:
            yield _rows_array(rows), "FP64"
            rows = []
    if rows:
        yield _rows_array(rows), "FP64"


def _rows_array(rows: list[Any]) -> np.ndarray:
    if len({len(r) if isinstance(r, list) else -1 for r in rows}) != 1:
        raise InvalidShape("every row must be a list of the same number of features")
    try:
        array = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidDatatype(f"rows must hold numbers: {exc}") from None
    return array.reshape(len(rows), -1)


def json_source(obj: Any, chunk_rows: int, max_rows: int) -> tuple[Iterator[Chunk], dict[str, Any], list[str]]:
    """A whole JSON body: ``{"instances": rows}``, ``[rows]`` or a V2 request (JSON data).

    Returns (chunks, parameters, requested outputs)."""
    params: dict[str, Any] = {}
    outputs: list[str] = []
    if isinstance(obj, dict) and "inputs" in obj:
        request = codecs.decode_infer_request(json.dumps(obj).encode())
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
            params = dict(obj.get("parameters") or {})
        array, datatype = (_rows_array(rows) if rows else np.zeros((0, 0))), "FP64"
    if len(array) > max_rows:
        raise PayloadTooLarge(f"{len(array)} rows exceed the limit of {max_rows}")

    def chunks() -> Iterator[Chunk]:
        for start in range(0, len(array), chunk_rows):
            yield array[start:start + chunk_rows], datatype

    return chunks(), params, outputs


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
        array, datatype = chunk
        rows = self.dataplane.check_rows(self.mv, array, datatype, array.shape)
        outputs, _, _ = await self.dataplane.run_rows(self.mv, rows, self.options.tau, self.options.timeout_s,
                                                      wait_for_room=True)
        self.mv.metrics.record_rows(outputs, self.mv.task)
        self.mv.metrics.batch_rows.inc(len(rows))
        return outputs

    def _lines(self, outputs: dict[str, np.ndarray], start: int) -> bytes:
        selected = self.dataplane.select(self.mv, outputs, self.options)
        columns = [(o.name, o.array.tolist()) for o in selected]
        names = self.mv.spec.get("class_names") if self.mv.task == "classification" else None
        pred = outputs["prediction"] if names else None
        lines = []
        for i in range(len(columns[0][1]) if columns else 0):
            item: dict[str, Any] = {"row": start + i}
            if names is not None:
                item["class"] = str(names[int(pred[i])])
            for name, values in columns:
                item[name] = values[i]
            lines.append(json.dumps(item, separators=(",", ":"), allow_nan=True))
        return ("\n".join(lines) + "\n").encode() if lines else b""

    async def first(self) -> tuple[dict[str, np.ndarray] | None, Chunk | None]:
        """Compute the first chunk before the response starts, so its errors get a proper status."""
        chunk = await self._next_chunk()
        if chunk is None:
            return None, None
        return await self._compute(chunk), chunk

    async def stream(self, first: dict[str, np.ndarray] | None) -> AsyncIterator[bytes]:
        """NDJSON lines; one chunk computes ahead while the previous one is written."""
        metrics = self.mv.metrics
        metrics.batch_jobs.inc()
        began = time.perf_counter()
        pending: asyncio.Task | None = None
        start = 0
        try:
            if first is not None:
                n = len(next(iter(first.values())))
                nxt = await self._next_chunk()
                if nxt is not None:
                    pending = asyncio.ensure_future(self._compute(nxt))
                yield self._lines(first, start)
                start += n
            while pending is not None:
                outputs = await pending
                pending = None
                nxt = await self._next_chunk()
                if nxt is not None:
                    pending = asyncio.ensure_future(self._compute(nxt))
                yield self._lines(outputs, start)
                start += len(next(iter(outputs.values())))
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


async def run_job(job: BatchJob) -> AsyncIterator[bytes]:  # pragma: no cover - convenience
    """Compute and stream a job in one go (for in-process callers)."""
    first, _ = await job.first()
    async for part in job.stream(first):
        yield part


