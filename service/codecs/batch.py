"""Batch attribution sources: a spooled request body (JSON, NDJSON or V2 binary) -> row chunks.

Each source yields ``(rows (n, d), V2 datatype)`` chunks lazily, so a body of millions of rows is
never held in memory as numbers. Bad input raises the service's errors; an NDJSON source that already
yielded a chunk first yields the good rows read before a bad line, then raises (the dataplane answers
every row before the error: see :class:`service.dataplane.Attribution`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

import numpy as np
from pydantic import ValidationError

from service.codecs.tensors import (
    DATATYPES,
    bool_parameter,
    check_input_parameters,
    check_output_parameters,
    check_shape,
    first_error,
    holds_bool,
    infer_request_from,
    may_hold_booleans,
    parse_header_length,
    parse_json,
    requested_outputs,
)
from service.errors import (
    BadRequest,
    HJServeError,
    InvalidDatatype,
    InvalidHeader,
    InvalidJSON,
    InvalidParameter,
    InvalidShape,
    InvalidValue,
    PayloadTooLarge,
    UnknownInput,
)
from service.types import InferenceRequest, RequestedOutput

__all__ = ["Chunk", "binary_source", "json_source", "ndjson_source"]

Chunk = tuple[np.ndarray, str]  # rows (n, d) and their V2 datatype (FP32 | FP64)


def ndjson_source(body: IO[bytes], chunk_rows: int, max_rows: int, max_line_bytes: int) -> Iterator[Chunk]:
    """One row per line: ``[x1, ..., xd]`` or ``{"input": [...]}``; blank lines are skipped. A line
    longer than ``max_line_bytes`` is refused before it is parsed (it is never held in memory whole).

    Each line becomes its row of float64 numbers as soon as it is parsed (:func:`_numbers`), so a pending
    chunk holds d numbers per row, never a line's parsed JSON: a line of ``max_line_bytes`` can take
    ~50x its size to parse (deeply nested lists), and a chunk of such lines held as Python objects took
    gigabytes. On a bad line after at least one full chunk, the good rows read before it are yielded
    first, then the error is raised (see the module's error contract)."""
    rows: list[np.ndarray] = []
    width: int | None = None
    total = 0
    yielded = False
    number = 0

    def flush() -> Iterator[Chunk]:
        nonlocal yielded
        yielded = True
        yield np.stack(rows), "FP64"

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
                item = parse_json(line)
            except InvalidJSON as exc:
                raise InvalidJSON(f"NDJSON line {number}: {exc.message}") from None
            if isinstance(item, dict):
                if item.keys() - {"input"}:   # nothing a line carries is dropped unread
                    raise InvalidJSON(f"NDJSON line {number}: unknown key(s) {sorted(item.keys() - {'input'})}; "
                                      "a line is [x1, ..., xd] or {\"input\": [...]}")
                item = item.get("input")
            if not isinstance(item, list):
                raise InvalidJSON(f"NDJSON line {number}: expected a JSON array of features or {{\"input\": [...]}}")
            if width is not None and len(item) != width:
                raise InvalidShape(f"NDJSON line {number}: {len(item)} features, earlier rows have {width}")
            if total + 1 > max_rows:
                raise PayloadTooLarge(f"more than {max_rows} rows (HJSERVE_BATCH_MAX_ROWS)")
            try:
                row = _numbers(item, 1, may_hold_booleans(line))
            except HJServeError as exc:
                raise type(exc)(f"NDJSON line {number}: {exc.message}") from None
            del item
        except HJServeError:
            if rows and yielded:   # a chunk already went out: answer the good rows read before this line
                yield from flush()
            raise
        width = len(row)
        rows.append(row)
        total += 1
        if len(rows) == chunk_rows:
            yield from flush()
            rows = []
    if rows:
        yield from flush()


def _numbers(value: Any, ndim: int, booleans: bool = True) -> np.ndarray:
    """``value`` as float64 numbers of ``ndim`` dimensions: one row (1) or rows (2). JSON numbers
    only: strings and booleans are not read as numbers (as a V2 FP32 tensor's data is not);
    ``booleans`` False: the JSON text had no ``true`` or ``false`` (:func:`may_hold_booleans`)."""
    try:
        raw = np.asarray(value)
    except ValueError:   # ragged: a list beside a number
        raise InvalidDatatype("a row must be a flat list of numbers") from None
    if raw.dtype.kind == "O":   # integers past int64 (JSON has no bound on them), or not numbers at all
        flat = raw.ravel()
        if not all(type(v) in (int, float) for v in flat):
            raise InvalidDatatype("a row must be a flat list of numbers")
        try:
            raw = np.array(flat.tolist(), dtype=np.float64).reshape(raw.shape)
        except OverflowError:   # past float64's range
            raise InvalidValue("a row holds a number outside the float32 range") from None
    elif raw.dtype.kind not in "iuf" or (booleans and holds_bool(value)):   # "1", true (beside numbers numpy reads 1)
        raise InvalidDatatype("a row must be a flat list of numbers, not of strings or booleans")
    if raw.ndim != ndim:   # nested lists inside a row are not features: never flattened silently
        raise InvalidShape("every row must be a flat list of numbers")
    return raw.astype(np.float64, copy=False)


def _rows_array(rows: list[Any], booleans: bool) -> np.ndarray:
    if len({len(r) if isinstance(r, list) else -1 for r in rows}) != 1:
        raise InvalidShape("every row must be a list of the same number of features")
    return _numbers(rows, 2, booleans)


def json_source(obj: Any, chunk_rows: int, max_rows: int,
                booleans: bool = True) -> tuple[Iterator[Chunk], dict[str, Any], list[str]]:
    """A whole JSON body: ``{"instances": rows}``, ``[rows]`` or a V2 request (JSON data);
    ``booleans``: :func:`may_hold_booleans` of its text.

    Returns (chunks, parameters, requested outputs)."""
    params: dict[str, Any] = {}
    outputs: list[str] = []
    if isinstance(obj, dict) and "inputs" in obj:
        if "instances" in obj:
            raise InvalidJSON('a body holds its rows in "inputs" (a V2 request) or in "instances", not both')
        request = infer_request_from(obj, booleans=booleans)
        if len(request.inputs) != 1 or request.inputs[0].name != "input":
            raise UnknownInput("expected exactly one input named 'input'")
        tensor = request.inputs[0]
        if len(tensor.shape) != 2:
            raise InvalidShape(f"input must have shape [rows, d], got {list(tensor.shape)}")
        array, datatype = tensor.array, tensor.datatype
        params, outputs = request.parameters, _job_outputs(request.id, request.binary_output, request.outputs)
    else:
        rows = obj.get("instances") if isinstance(obj, dict) else obj
        if not isinstance(rows, list):
            raise InvalidJSON('expected {"instances": [[...], ...]}, a list of rows or a V2 request')
        if isinstance(obj, dict):
            if obj.keys() - {"instances", "parameters"}:   # nothing in the body is dropped unread
                raise InvalidJSON(f"unknown key(s) {sorted(obj.keys() - {'instances', 'parameters'})}; expected "
                                  '{"instances": [[...], ...], "parameters": {...}}')
            params = _parameters(obj.get("parameters"))
        array, datatype = (_rows_array(rows, booleans) if rows else np.zeros((0, 0))), "FP64"
    if len(array) > max_rows:
        raise PayloadTooLarge(f"{len(array)} rows exceed the limit of {max_rows}")

    def chunks() -> Iterator[Chunk]:
        for start in range(0, len(array), chunk_rows):
            yield array[start:start + chunk_rows], datatype

    return chunks(), params, outputs


def _job_outputs(request_id: str | None, binary_output: bool, outputs: list[RequestedOutput]) -> list[str]:
    """The output names a batch body in V2 form asks for. Its answer is JSON lines, not a V2
    response, so what only a V2 response honours is refused, never dropped: an ``id`` (a V2 response
    echoes it; a job is named by its X-Request-ID header), binary outputs (``binary_data`` or
    ``binary_data_output`` true) and the output parameters infer refuses."""
    if request_id is not None:
        raise BadRequest("a batch job answers JSON lines, which echo no request id: name the job with an "
                         "X-Request-ID header")
    if binary_output:
        raise InvalidParameter("parameter binary_data_output: a batch job answers JSON lines, never binary outputs")
    for out in outputs:
        check_output_parameters(out)
        if out.binary:
            raise InvalidParameter(f"output '{out.name}' binary_data: a batch job answers JSON lines, never "
                                   "binary outputs")
    return [out.name for out in outputs]


def _parameters(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidParameter(f"parameters must be a JSON object, got {type(value).__name__}")
    return dict(value)


def binary_source(body: IO[bytes], total: int, header_length: str, chunk_rows: int,
                  max_rows: int) -> tuple[Iterator[Chunk], dict[str, Any], list[str]]:
    """A V2 binary-extension body whose ``input`` is binary; rows are read from the file lazily."""
    length = parse_header_length(header_length, total)
    head = parse_json(body.read(length))
    try:
        wire = InferenceRequest.model_validate(head)
    except ValidationError as exc:
        raise BadRequest(f"invalid inference request header: {first_error(exc)}") from None
    if len(wire.inputs) != 1 or wire.inputs[0].name != "input":
        raise UnknownInput("expected exactly one input named 'input'")
    tensor = wire.inputs[0]
    check_input_parameters(tensor.parameters, "input")
    size = (tensor.parameters or {}).get("binary_data_size")
    if tensor.datatype not in ("FP32", "FP64"):
        raise InvalidDatatype(f"input must be FP32 or FP64, got {tensor.datatype}")
    if size is None or len(tensor.shape) != 2:
        raise InvalidHeader("the binary input needs binary_data_size and shape [rows, d]")
    itemsize = DATATYPES[tensor.datatype].itemsize
    n, d = check_shape(tensor.shape, "input")
    if size != n * d * itemsize or length + size != total:
        raise InvalidHeader(f"binary_data_size {size} does not match shape {tensor.shape} "
                            f"of {tensor.datatype} and the {total - length} bytes after the header")
    if n > max_rows:
        raise PayloadTooLarge(f"{n} rows exceed the limit of {max_rows}")
    params = dict(wire.parameters or {})
    binary_output = bool_parameter(params.pop("binary_data_output", False), "parameter binary_data_output")
    outputs = _job_outputs(wire.id, binary_output, requested_outputs(wire.outputs))

    def chunks() -> Iterator[Chunk]:
        dtype = DATATYPES[tensor.datatype]
        for start in range(0, n, chunk_rows):
            k = min(chunk_rows, n - start)
            raw = body.read(k * d * itemsize)
            yield np.frombuffer(raw, dtype=dtype).reshape(k, d), tensor.datatype

    return chunks(), params, outputs
