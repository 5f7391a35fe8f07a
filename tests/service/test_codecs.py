"""Codecs against tritonclient's own encoders and decoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.http._utils import _get_inference_request
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from service import codecs
from service.errors import BadRequest, InvalidDatatype, InvalidHeader, InvalidJSON, InvalidShape
from service.types import InferOutput, InferResponse

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
           "FP64"]


def _sample(datatype: str, shape=(2, 3), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if datatype == "BOOL":
        return rng.random(shape) > 0.5
    if datatype == "BYTES":
        return np.array([f"s{i}-é".encode() for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    dtype = codecs.DATATYPES[datatype]
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _triton_request(arrays: dict[str, np.ndarray], binary: bool, outputs=None, **kw):
    inputs = []
    for name, array in arrays.items():
        datatype = codecs.dtype_of(array)
        inp = httpclient.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array, binary_data=binary)
        inputs.append(inp)
    return _get_inference_request(inputs=inputs, request_id=kw.get("request_id", ""), outputs=outputs,
                                  sequence_id=0, sequence_start=False, sequence_end=False, priority=0,
                                  timeout=None, custom_parameters=kw.get("parameters"))


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_decode_matches_tritonclient_encoding(datatype, binary):
    array = _sample(datatype)
    body, header_length = _triton_request({"x": array}, binary)
    decoded = codecs.decode_infer_request(body, None if header_length is None else str(header_length))
    (tensor,) = decoded.inputs
    assert tensor.name == "x" and tensor.datatype == datatype and tensor.shape == array.shape
    if datatype == "BYTES":
        assert tensor.array.tolist() == array.tolist()
    else:
        np.testing.assert_array_equal(tensor.array, array)
        assert tensor.array.dtype == array.dtype


def test_several_binary_inputs_and_request_fields():
    a, b = _sample("FP32", (4, 2)), _sample("INT64", (4,))
    out = [httpclient.InferRequestedOutput("p", binary_data=True), httpclient.InferRequestedOutput("q", binary_data=False)]
    body, n = _triton_request({"a": a, "b": b}, True, outputs=out, request_id="r-1", parameters={"top_k": 3})
    req = codecs.decode_infer_request(body, str(n))
    np.testing.assert_array_equal(req.inputs[0].array, a)
    np.testing.assert_array_equal(req.inputs[1].array, b)
    assert req.id == "r-1" and req.parameters == {"top_k": 3}
    assert [(o.name, o.binary) for o in req.outputs] == [("p", True), ("q", False)]
    assert req.binary_output is False


def test_no_outputs_requests_binary_output():
    body, _ = _triton_request({"a": _sample("FP32")}, False)
    assert codecs.decode_infer_request(body).binary_output is True


def test_nested_json_data_is_accepted():
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]}]})
    (t,) = codecs.decode_infer_request(body.encode()).inputs
    np.testing.assert_array_equal(t.array, np.array([[1, 2], [3, 4.5]], np.float32))


def test_header_equal_to_body_length_means_json():
    body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1.5]}]}).encode()
    (t,) = codecs.decode_infer_request(body, str(len(body))).inputs
    assert t.array.tolist() == [1.5]


@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
@pytest.mark.parametrize("binary", [False, True])
def test_encode_is_read_by_tritonclient(datatype, binary):
    arrays = {"a": _sample(datatype, (3, 2), seed=1), "b": _sample("FP32", (3,), seed=2)}
    response = InferResponse("m", "1", [InferOutput(k, codecs.dtype_of(v), v, binary) for k, v in arrays.items()],
                             id="abc")
    body, header_length = codecs.encode_infer_response(response)
    assert (header_length is not None) == binary
    result = httpclient.InferResult.from_response_body(body, header_length=header_length)
    assert result.get_response()["id"] == "abc"
    for name, array in arrays.items():
        got = result.as_numpy(name)
        if datatype == "BYTES" and name == "a":
            assert got.tolist() == array.tolist() if binary else [x.decode() for x in array.ravel()]
        else:
            np.testing.assert_array_equal(got, array)
            assert got.shape == array.shape


def test_bytes_serialization_matches_tritonclient():
    array = _sample("BYTES", (5,))
    assert codecs.serialize_bytes(array) == serialize_byte_tensor(array).item()
    raw = serialize_byte_tensor(array).item()
    assert codecs.deserialize_bytes(raw).tolist() == deserialize_bytes_tensor(raw).tolist()


def test_bf16_binary_decodes_to_float32():
    values = np.array([1.0, -2.5, 0.15625], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    head = json.dumps({"inputs": [{"name": "x", "shape": [3], "datatype": "BF16",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    (t,) = codecs.decode_infer_request(head + raw, str(len(head))).inputs
    np.testing.assert_array_equal(t.array, values)


def _json_body(**tensor) -> bytes:
    base = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}
    base.update(tensor)
    return json.dumps({"inputs": [base]}).encode()


@pytest.mark.parametrize(("body", "header", "error", "text"), [
    (b"{not json", None, InvalidJSON, "malformed JSON"),
    (b"[1, 2]", None, InvalidJSON, "JSON object"),
    (b'{"inputs": 3}', None, BadRequest, "invalid inference request"),
    (_json_body(datatype="FP8"), None, InvalidDatatype, "unknown datatype"),
    (_json_body(shape=[3]), None, InvalidShape, "shape"),
    (_json_body(shape=[-1]), None, InvalidShape, "non-negative"),
    (_json_body(data=[[1, 2], [3]]), None, InvalidShape, "ragged"),
    (_json_body(data=["a", "b"]), None, InvalidDatatype, "does not match"),
    (_json_body(datatype="INT8", data=[1, 300]), None, InvalidDatatype, "out of range"),
    (_json_body(datatype="INT32", data=[1.5, 2]), None, InvalidDatatype, "does not match"),
    (_json_body(data=None), None, BadRequest, "neither"),
    (_json_body(), "abc", InvalidHeader, "must be an integer"),
    (_json_body(), "100000", InvalidHeader, "the body has"),
    (_json_body(), "-1", InvalidHeader, "the body has"),
])
def test_decode_errors(body, header, error, text):
    with pytest.raises(error, match=text):
        codecs.decode_infer_request(body, header)


def test_binary_size_errors():
    raw = np.zeros(2, np.float32).tobytes()
    for size, text in ((16, "runs past"), (4, "needs 8"), ("8", "non-negative integer")):
        head = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                                       "parameters": {"binary_data_size": size}}]}).encode()
        with pytest.raises(BadRequest, match=text):
            codecs.decode_infer_request(head + raw, str(len(head)))
    head = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}).encode()
    with pytest.raises(InvalidHeader, match="not claimed"):
        codecs.decode_infer_request(head + raw, str(len(head)))


def test_non_finite_floats_round_trip_through_json():
    out = InferOutput("r", "FP32", np.array([np.inf, 1.0], np.float32))
    body, _ = codecs.encode_infer_response(InferResponse("m", "1", [out]))
    result = httpclient.InferResult.from_response_body(body)
    assert result.as_numpy("r").tolist() == [np.inf, 1.0]


def test_json_floats_read_back_as_the_served_float32_values():
    """The JSON reply (orjson's fast path) carries every float32 output exactly: a float64 reader gets
    the float32 value itself, never a shorter decimal on the wrong side of it (a certified radius
    read as float64 must not exceed the float32 one the graph rounded toward zero), and the parsed
    reply equals the stdlib encoder's."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(2000), 10.0 ** rng.uniform(-40, 38, 2000)]).astype(np.float32)
    ints = rng.integers(-2**62, 2**62, 50)
    response = InferResponse("m", "1", [InferOutput("r", "FP32", values), InferOutput("i", "INT64", ints)],
                             parameters={"p": 0.1, "s": "x"})
    body, header_length = codecs.encode_infer_response(response)
    assert header_length is None
    parsed = json.loads(body)
    assert np.array_equal(np.array(parsed["outputs"][0]["data"], dtype=np.float64), values.astype(np.float64))
    assert parsed["outputs"][1]["data"] == ints.tolist()
    assert parsed == json.loads(codecs.dumps(parsed))


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32-be"])
@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT64", "UINT8"])
@pytest.mark.parametrize("data", [[1, True, 2, 3], [[1, 2], [False, 3]]], ids=["flat", "nested"])
def test_booleans_among_numbers_are_refused_in_every_encoding(encoding, datatype, data):
    """numpy reads true beside numbers as 1: the decoder looks for booleans, and skips looking only
    in a UTF-8 text without the literals (json reads UTF-16 and UTF-32 too, where they are not ASCII)."""
    body = json.dumps({"inputs": [{"name": "input", "shape": [2, 2], "datatype": datatype, "data": data}]})
    with pytest.raises(InvalidDatatype, match="'bool'"):
        codecs.decode_infer_request(body.encode(encoding))
    assert codecs.may_hold_booleans(body.encode(encoding))
    numeric = body.replace("true", "1").replace("false", "0")
    assert codecs.may_hold_booleans(numeric.encode(encoding)) == (encoding not in ("utf-8", "utf-8-sig"))
    expected = [1, 1, 2, 3] if data[0] == 1 else [1, 2, 0, 3]
    assert codecs.decode_infer_request(numeric.encode(encoding)).inputs[0].array.ravel().tolist() == expected


def _halfway_decimals(n: int, seed: int) -> list[str]:
    """Decimals exactly halfway between two neighbouring doubles, and a hair (1e-40 relative) either
    side: where a parser that is not correctly rounded picks the wrong neighbour. Doubles of every
    binade, subnormals included, and the float32 range that requests hold."""
    from decimal import Decimal, getcontext

    getcontext().prec = 1200
    rng = np.random.default_rng(seed)
    bits = rng.integers(1, 0x7FEFFFFFFFFFFFFF, n, dtype=np.int64)
    doubles = np.concatenate([bits.view(np.float64), rng.standard_normal(n) * 10.0 ** rng.uniform(-45, 38, n)])
    out = []
    for x in doubles.tolist():
        x = abs(x)
        mid = (Decimal(x) + Decimal(float(np.nextafter(x, np.inf)))) / 2
        hair = Decimal(10) ** (mid.adjusted() - 40)
        out += [f"{mid:e}", f"{mid + hair:e}", f"-{mid - hair:e}"]
    return out


def test_json_numbers_parse_to_the_correctly_rounded_doubles():
    """parse_json (orjson first) reads every decimal as the double ``float()`` reads: the served
    radius' input-rounding allowance counts on one correct rounding of a JSON decimal to float64."""
    texts = _halfway_decimals(2000, 0)
    body = ("[" + ",".join(texts) + "]").encode()
    assert codecs.parse_json(body) == [float(t) for t in texts]


@pytest.mark.parametrize(("text", "value"), [
    (b'[NaN, Infinity, -Infinity]', [float("nan"), float("inf"), -float("inf")]),   # Python's, Triton's client's
    (b'[1e400, -1e400]', [float("inf"), -float("inf")]),        # beyond float64: refused later as not finite
    (b'{"a": "\\ud800"}', {"a": "\ud800"}),                       # a lone surrogate
    ('{"a": [1.5]}'.encode("utf-16"), {"a": [1.5]}),               # UTF-16 with its BOM
    ('{"a": [1.5]}'.encode("utf-8-sig"), {"a": [1.5]}),            # UTF-8 with a BOM
    (b'{"a": 1, "a": 2}', {"a": 2}),                               # the last of a repeated key
    (b'[-0, 0.0, 1E2, 5e-324]', [0, 0.0, 100.0, 5e-324]),
])
def test_json_the_fast_parser_refuses_reads_as_the_standard_library_does(text, value):
    got = codecs.parse_json(text)
    assert json.dumps(got) == json.dumps(value) and type(got) is type(value)


@pytest.mark.parametrize("text", [b"{not json", b"[1, 2", b"", b"[" * 5000 + b"]" * 5000, b"1" * 5000,
                                  b'{"a": 1} x', b"\xff\xfe\x00"])
def test_json_malformed_bodies_are_invalid_json(text):
    with pytest.raises(InvalidJSON, match="malformed JSON"):
        codecs.parse_json(text)


def _typed_message(datatype: str, field: str, values: np.ndarray):
    from service.grpc import inference_pb2 as pb

    m = pb.ModelInferRequest(model_name="m")
    tensor = m.inputs.add(name="input", datatype=datatype, shape=list(values.shape))
    getattr(tensor.contents, field).extend(values.ravel().tolist())
    return m


@pytest.mark.parametrize(("datatype", "field", "dtype"), [("FP32", "fp32_contents", np.float32),
                                                            ("FP64", "fp64_contents", np.float64)])
def test_grpc_float_contents_are_read_from_their_wire_bytes_bit_for_bit(monkeypatch, datatype, field, dtype):
    """FP32 / FP64 typed contents are read from the field's packed little-endian bytes in one step,
    value by value never: every bit pattern as sent (subnormals, -0.0, the extremes, NaN and inf
    too, which the dataplane then refuses), and the array is the decoder's own (writable)."""
    from service.codecs import grpc as grpc_codec

    rng = np.random.default_rng(0)
    info = np.finfo(dtype)
    special = np.array([0.0, -0.0, info.tiny, info.tiny / 4, -info.smallest_subnormal, info.max, -info.max,
                        np.nan, np.inf, -np.inf, 1.5], dtype)
    values = np.concatenate([special, (rng.standard_normal(4096) * 10.0 ** rng.uniform(-30, 30, 4096)).astype(dtype)])
    message = _typed_message(datatype, field, values.reshape(-1, 1))
    monkeypatch.setattr(grpc_codec.np, "fromiter", None)        # the value-by-value reader is not used
    (t,) = grpc_codec.decode_infer_request(type(message).FromString(message.SerializeToString())).inputs
    assert t.array.dtype == dtype and t.array.flags.writeable
    assert t.array.ravel().view(f"u{values.itemsize}").tolist() == values.view(f"u{values.itemsize}").tolist()


def test_grpc_float_contents_with_fields_the_schema_lacks_are_read_value_by_value():
    """A contents message that also carries a field the schema does not know (protobuf keeps it and
    writes it back), or whose packed values came in two runs: the values are the ones sent."""
    from service.codecs import grpc as grpc_codec

    values = np.arange(12, dtype=np.float32).reshape(6, 2) / 7
    message = _typed_message("FP32", "fp32_contents", values)
    contents = message.inputs[0].contents
    contents.MergeFromString(bytes([0x98, 0x06, 0x05]))    # field 99 = 5 (key 99 << 3 as a varint): unknown
    assert grpc_codec._fixed_width_values(contents, "fp32_contents", 12) is None
    (t,) = grpc_codec.decode_infer_request(message).inputs
    np.testing.assert_array_equal(t.array, values)
    half = _typed_message("FP32", "fp32_contents", values[:3]).inputs[0].contents.SerializeToString()
    rest = _typed_message("FP32", "fp32_contents", values[3:]).inputs[0].contents.SerializeToString()
    message.inputs[0].contents.ParseFromString(half + rest)       # two packed runs: protobuf joins them
    (t,) = grpc_codec.decode_infer_request(message).inputs
    np.testing.assert_array_equal(t.array, values)
