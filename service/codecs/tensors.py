"""V2 tensors <-> numpy: JSON ``data`` (flat or nested) and the binary tensor data extension.

Binary extension (both directions): the body is a JSON header followed by raw little-endian tensor
bytes; the header's length is in ``Inference-Header-Content-Length``. A request body is binary only
when that header is present and smaller than the body; no Content-Type is required. Each binary
tensor carries ``parameters.binary_data_size``; tensors appear in the binary section in the order
they appear in the JSON. BYTES elements are a 4-byte little-endian length followed by the bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from service.errors import (
    BadRequest,
    InvalidDatatype,
    InvalidHeader,
    InvalidJSON,
    InvalidParameter,
    InvalidShape,
    InvalidValue,
)
from service.types import (
    InferenceRequest,
    InferInput,
    InferRequest,
    InferResponse,
    RequestedOutput,
)

__all__ = [
    "BINARY_CONTENT_TYPE",
    "DATATYPES",
    "HEADER_LENGTH",
    "JSON_CONTENT_TYPE",
    "PARSE_BYTES_PER_BYTE",
    "bool_parameter",
    "check_input_parameters",
    "check_output_parameters",
    "check_shape",
    "decode_infer_request",
    "decode_raw",
    "decode_tensor",
    "deserialize_bytes",
    "dtype_of",
    "dumps",
    "encode_infer_response",
    "encode_raw",
    "encode_tensor_json",
    "first_error",
    "holds_bool",
    "infer_request_from",
    "may_hold_booleans",
    "parse_header_length",
    "parse_json",
    "requested_outputs",
    "serialize_bytes",
    "split_body",
]

#: The header carrying the JSON length of a binary-extension body.
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

#: V2 datatype -> numpy dtype (little-endian). BF16 has no numpy dtype: it decodes to float32.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<f4"),
    "BYTES": np.dtype(np.object_),
}

_NUMPY_TO_V2 = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.object_): "BYTES",
}

_JSON_KINDS = {"BOOL": "b", "BYTES": "SUO"}


def dtype_of(array: np.ndarray) -> str:
    """V2 datatype of a numpy array."""
    try:
        return _NUMPY_TO_V2[array.dtype.newbyteorder("=")]
    except KeyError:
        if array.dtype.kind in "SU":
            return "BYTES"
        raise InvalidDatatype(f"no V2 datatype for numpy dtype {array.dtype}") from None


# -- bodies ---------------------------------------------------------------------------------------


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """Length of the JSON header from ``Inference-Header-Content-Length``, or None when absent."""
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        raise InvalidHeader(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None
    if length < 0 or length > body_length:
        raise InvalidHeader(
            f"{HEADER_LENGTH} is {length} but the body has {body_length} bytes")
    return length


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON part, binary part) of a request body; binary only when the header is smaller."""
    length = parse_header_length(header_length, len(body))
    if length is None or length == len(body):
        return body, memoryview(b"")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


#: The most memory :func:`parse_json` takes per byte it parses, with the body itself, for any body,
#: as resident memory: nested lists (``[[[...]]]``, 500 and 1,000 deep) take ~49x beyond the body --
#: each ``[]`` pair, 2 bytes, a list object and its slot in its parent -- against ~13x for numbers and
#: ~22x for one-letter strings (``tests/service/test_request_memory.py`` measures hostile bodies
#: against it in fresh processes; it was 48, which tracemalloc's count of ~46x suggested and the
#: kernel's count exceeds).
PARSE_BYTES_PER_BYTE = 52


def parse_json(data: bytes | str) -> Any:
    """Parse JSON (NaN/Infinity literals allowed, as Python and Triton's client produce them).
    Nesting deeper than the parser's recursion limit (~1000 levels) is malformed input, not a crash.

    orjson parses first: 4x faster than the standard library on a large body (a 59 MB V2 body held
    the event loop, and with it every other client, 1.4 s in ``json.loads``, 0.36 s in orjson), and
    its floats are the correctly rounded doubles ``float()`` reads (the certificate's input-rounding
    allowance counts on one correct rounding of a decimal; ``tests/service/test_codecs.py`` checks
    halfway cases). What orjson refuses and the standard library reads -- NaN / Infinity literals,
    numbers beyond float64's range, lone surrogates, UTF-16 / UTF-32 or a BOM -- is read by the
    standard library; so are malformed bodies, whose error message it writes (a body malformed at its
    end is parsed twice: ~1.25x the standard library's time alone, where a valid one takes 0.25-0.4x).
    One difference stays: orjson reads an integer of 2^64 or more (within float64's range) as the
    nearest float, which a tensor reads it as anyway, and which an integer parameter (``top_k``,
    ``timeout``) refuses."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidJSON(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise InvalidJSON("malformed JSON: nested too deeply") from None


def dumps(obj: Any) -> bytes:
    """Compact JSON; non-finite floats as ``NaN`` / ``Infinity`` (readable by Triton's client)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


def _fast_dumps(obj: Any) -> bytes:
    """orjson for an object whose floats are all finite (anything orjson cannot write: :func:`dumps`)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return dumps(obj)


def _finite_values(params: dict | None) -> bool:
    return not params or all(not isinstance(v, float) or math.isfinite(v) for v in params.values())


# -- tensors --------------------------------------------------------------------------------------


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor -> 4-byte little-endian length + bytes per element (row-major)."""
    parts = []
    for item in np.asarray(array, dtype=object).ravel():
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes(raw: memoryview | bytes) -> np.ndarray:
    """Inverse of :func:`serialize_bytes` -> 1-D object array of ``bytes``."""
    raw = memoryview(raw)
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidShape("truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise InvalidShape("BYTES element runs past its binary data")
        items.append(bytes(raw[pos:pos + n]))
        pos += n
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


#: The most dimensions a tensor may have (numpy holds 64; a model input here has 2).
MAX_DIMS = 32
#: The most elements the non-zero dimensions of a shape may multiply to: numpy refuses even an empty
#: array whose other dimensions overflow its sizes (``[0, 2**62]``), and no body within the limits
#: carries more.
MAX_ELEMENTS = 2**40


def check_shape(shape: Sequence[Any], name: str) -> tuple[int, ...]:
    """A tensor's shape as a tuple of non-negative integers that numpy can hold (InvalidShape
    otherwise: at most :data:`MAX_DIMS` dimensions, the non-zero ones multiplying to at most
    :data:`MAX_ELEMENTS`, so a shape never reaches numpy that would fail there)."""
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise InvalidShape(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    if len(shape) > MAX_DIMS:
        raise InvalidShape(f"input '{name}': {len(shape)} dimensions, more than the {MAX_DIMS} a tensor may have")
    if math.prod(s for s in shape if s) > MAX_ELEMENTS:
        raise InvalidShape(f"input '{name}': shape {list(shape)[:8]} is too large "
                           f"(its non-zero dimensions multiply past {MAX_ELEMENTS})")
    return tuple(shape)


def check_input_parameters(params: Any, name: str, known: tuple[str, ...] = ("binary_data_size",)) -> None:
    """An input's parameters: none but the transport's own (REST: ``binary_data_size``; gRPC: none).
    Triton's shared-memory inputs (``shared_memory_region``, ...) are refused, never ignored: the
    tensor would be read from ``data`` while the client meant its region."""
    unknown = sorted(set(params or ()) - set(known))
    if unknown:
        raise InvalidParameter(f"input '{name}': unknown parameter(s) {unknown[:5]} (no shared memory)")


def may_hold_booleans(text: bytes) -> bool:
    """Whether a JSON text may hold ``true`` or ``false``: False for a text without either literal
    (whose numbers then need no :func:`holds_bool` pass). The literals are ASCII in UTF-8 only, and
    json also reads UTF-16 and UTF-32 texts: those may always hold them."""
    return (b"true" in text or b"false" in text
            or json.detect_encoding(text) not in ("utf-8", "utf-8-sig"))


def holds_bool(data: list) -> bool:
    """Whether a JSON list (nested: numpy has read it as an array, so at most 64 levels) holds true
    or false. Beside numbers numpy reads them as 1 and 0; a JSON number tensor holds numbers only.
    One pass of ``type`` per value; :func:`may_hold_booleans` spares a text without the literals."""
    kinds = set(map(type, data))
    return bool in kinds or (list in kinds and any(holds_bool(x) for x in data if type(x) is list))


def _from_json_data(data: Any, datatype: str, shape: tuple[int, ...], name: str, booleans: bool = True) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).ravel() if isinstance(data, list) else None
        if flat is None or flat.size != count or not all(isinstance(x, str) for x in flat):
            raise InvalidShape(f"input '{name}': BYTES data must be {count} strings")
        out = np.empty(count, dtype=object)
        out[:] = [x.encode() for x in flat]
        return out.reshape(shape)
    if not isinstance(data, list):
        raise InvalidShape(f"input '{name}': data must be a list")
    try:
        raw = np.asarray(data)
    except ValueError as exc:
        raise InvalidShape(f"input '{name}': data is ragged: {exc}") from None
    if raw.size == 0:
        raw = raw.astype(DATATYPES[datatype])
    allowed = _JSON_KINDS.get(datatype, "iu" if datatype[0] in "UI" else "iuf")
    if raw.dtype.kind not in allowed or (booleans and raw.dtype.kind in "iuf" and holds_bool(data)):
        kind = "bool" if raw.dtype.kind in "iuf" else raw.dtype.name
        raise InvalidDatatype(f"input '{name}': data of kind {kind!r} does not match datatype {datatype}")
    if raw.size != count or (raw.ndim != 1 and raw.shape != shape):
        raise InvalidShape(
            f"input '{name}': data has shape {list(raw.shape)} but the tensor's shape is {list(shape)}")
    try:
        with np.errstate(over="ignore"):
            out = raw.astype(DATATYPES[datatype])
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidDatatype(f"input '{name}': cannot convert data to {datatype}: {exc}") from None
    if raw.dtype.kind in "iu" and out.dtype.kind in "iu" and not np.array_equal(out, raw):
        raise InvalidDatatype(f"input '{name}': integer data out of range for {datatype}")
    if out.dtype.kind == "f" and out.dtype != raw.dtype and not np.isfinite(out).all() and np.isfinite(raw).all():
        # finite JSON numbers the cast made infinite: say so, not "infinite values" the client never sent
        raise InvalidValue(f"input '{name}' has values outside the {out.dtype.name} range")
    return out.reshape(shape)


def decode_raw(raw: memoryview, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """One tensor from its raw little-endian bytes (the binary extension, gRPC raw contents)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        out = deserialize_bytes(raw)
        if out.size != count:
            raise InvalidShape(f"input '{name}': {out.size} BYTES elements for shape {list(shape)}")
        return out.reshape(shape)
    itemsize = 2 if datatype == "BF16" else DATATYPES[datatype].itemsize
    if len(raw) != count * itemsize:
        raise InvalidShape(
            f"input '{name}': binary_data_size is {len(raw)} bytes but shape {list(shape)} of "
            f"{datatype} needs {count * itemsize}")
    if datatype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=DATATYPES[datatype]).reshape(shape)


def decode_tensor(tensor: dict[str, Any] | Any, binary: memoryview, offset: int,
                  booleans: bool = True) -> tuple[np.ndarray, int]:
    """One V2 tensor -> (numpy array, offset of the next binary tensor).

    ``tensor`` is a :class:`~service.types.RequestInput` or its dict; ``binary`` the request's
    binary section, of which this tensor's bytes start at ``offset``; ``booleans`` False when the
    JSON it was parsed from holds no ``true`` or ``false`` (its data then need no check for them).
    """
    get = tensor.get if isinstance(tensor, dict) else (lambda key: getattr(tensor, key, None))
    name = str(get("name"))
    datatype = get("datatype")
    if datatype not in DATATYPES:
        raise InvalidDatatype(f"input '{name}': unknown datatype {datatype!r}")
    shape = check_shape(get("shape"), name)
    params = get("parameters") or {}
    check_input_parameters(params, name)
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    data = get("data")
    if size is not None:
        if data is not None:
            raise BadRequest(f"input '{name}' has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidHeader(f"input '{name}': binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidHeader(
                f"input '{name}': binary_data_size {size} runs past the binary data "
                f"({len(binary) - offset} bytes left)")
        return decode_raw(binary[offset:offset + size], datatype, shape, name), offset + size
    if data is None:
        raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
    return _from_json_data(data, datatype, shape, name, booleans), offset


def bool_parameter(value: Any, what: str) -> bool:
    """A parameter that must be a boolean (the binary extension's ``binary_data``, ``binary_data_output``)."""
    if not isinstance(value, bool):
        raise BadRequest(f"{what} must be a boolean, got {value!r}")
    return value


def decode_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """A V2 inference request body (JSON or binary extension) -> :class:`InferRequest`."""
    head, binary = split_body(body, header_length)
    return infer_request_from(parse_json(head), binary, may_hold_booleans(head))


def infer_request_from(obj: Any, binary: memoryview = memoryview(b""), booleans: bool = True) -> InferRequest:
    """A parsed V2 request object (and its binary section) -> :class:`InferRequest`. ``booleans``:
    see :func:`decode_tensor`."""
    if not isinstance(obj, dict):
        raise InvalidJSON("the inference request must be a JSON object")
    try:
        wire = InferenceRequest.model_validate(obj)
    except ValidationError as exc:
        raise BadRequest(f"invalid inference request: {first_error(exc)}") from None
    offset = 0
    inputs = []
    for tensor in wire.inputs:
        array, offset = decode_tensor(tensor, binary, offset, booleans)
        inputs.append(InferInput(tensor.name, tensor.datatype, tuple(tensor.shape), array))
    if offset != len(binary):
        raise InvalidHeader(
            f"{len(binary) - offset} bytes of binary data are not claimed by any input's binary_data_size")
    params = dict(wire.parameters or {})
    binary_output = bool_parameter(params.pop("binary_data_output", False), "parameter binary_data_output")
    return InferRequest(inputs=inputs, outputs=requested_outputs(wire.outputs), parameters=params, id=wire.id,
                        binary_output=binary_output)


def requested_outputs(outputs: list | None) -> list[RequestedOutput]:
    """A V2 request's ``outputs`` (wire models) -> :class:`RequestedOutput` s: the binary extension's
    ``binary_data`` read as a boolean, the other parameters kept for :func:`check_output_parameters`."""
    requested = []
    for out in outputs or []:
        oparams = dict(out.parameters or {})
        flag = oparams.pop("binary_data", None)
        requested.append(RequestedOutput(
            out.name, None if flag is None else bool_parameter(flag, f"output '{out.name}' binary_data"), oparams))
    return requested


def check_output_parameters(out: RequestedOutput) -> None:
    """A requested output takes no parameters but the codec's ``binary_data``: Triton's
    classification extension (``classification``; ``class_count`` in its HTTP client's API) and
    shared-memory outputs are refused, never ignored (a client would read raw probabilities as
    class labels, or its shared-memory region unwritten)."""
    if not out.parameters:
        return
    named = sorted({"classification", "class_count"} & out.parameters.keys())
    if named:
        raise InvalidParameter(f"output '{out.name}': the classification extension ({named[0]}) is not "
                               "supported; request the 'probabilities' output")
    raise InvalidParameter(f"output '{out.name}': unknown parameter(s) {sorted(out.parameters)[:5]} "
                           "(an output takes only binary_data; no shared memory)")


def first_error(exc: ValidationError) -> str:
    """The first pydantic validation error as ``loc: message`` (a field nothing reads: ``unknown
    field 'name'``, with where it sits)."""
    err = exc.errors()[0]
    *where, last = err.get("loc", ()) or ("",)
    if err.get("type") == "extra_forbidden":
        place = ".".join(str(p) for p in where)
        return f"unknown field {str(last)!r}" + (f" in {place}" if place else "")
    loc = ".".join(str(p) for p in (*where, last) if p != "")
    return f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))


def encode_tensor_json(array: np.ndarray, datatype: str) -> list[Any]:
    """Flat row-major JSON data of a tensor."""
    flat = array.ravel()
    if datatype == "BYTES":
        return [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in flat]
    return flat.tolist()


def encode_raw(array: np.ndarray, datatype: str) -> bytes:
    """A tensor as raw little-endian bytes (BYTES: length-prefixed elements)."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()


def encode_infer_response(response: InferResponse) -> tuple[bytes, int | None]:
    """:class:`InferResponse` -> (body, JSON header length or None when the body is all JSON).

    The JSON is written by orjson (the hot path of every JSON reply) unless a float in it is not
    finite: orjson would write ``null`` there, :func:`dumps` writes ``NaN`` / ``Infinity`` as
    Triton's client reads them. Floats are Python floats either way (float32 values widened
    exactly), printed as the shortest decimal that reads back to the same double."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    finite = True
    for out in response.outputs:
        item: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.array.shape)}
        if out.binary:
            raw = encode_raw(out.array, out.datatype)
            item["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            if out.array.dtype.kind == "f" and not np.isfinite(out.array).all():
                finite = False
            item["data"] = encode_tensor_json(out.array, out.datatype)
        outputs.append(item)
    head: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = response.parameters
    head["outputs"] = outputs
    header = _fast_dumps(head) if finite and _finite_values(response.parameters) else dumps(head)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


