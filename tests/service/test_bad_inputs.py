"""Table-driven bad input: status, error_type, message; never a 500. The table runs in process (the
app over the dataplane over the tiny repository with its real onnxruntime backends, through an ASGI
client); a real server process replays every case and must still serve afterwards."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from tiny_model import D

from service.codecs import HEADER_LENGTH


def _v2(shape=(1, D), datatype="FP32", data=None, name="input", **extra) -> dict:
    if data is None:
        data = np.ones(shape).ravel().tolist()
    body = {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}
    body.update(extra)
    return body


def _binary(values: np.ndarray, *, size: int | None = None, header_delta: int = 0, datatype="FP32", shape=None,
            extra: dict | None = None, **parameters):
    raw = np.ascontiguousarray(values).tobytes()
    shape = list(values.shape if shape is None else shape)
    parameters["binary_data_size"] = len(raw) if size is None else size
    head = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": datatype,
                                   "parameters": parameters}], **(extra or {})}).encode()
    return head + raw, {HEADER_LENGTH: str(len(head) + header_delta)}


INFER = "/v2/models/clf/infer"
BATCH = "/v2/models/clf/batch-attribution"
REG_INFER = "/v2/models/reg/infer"   # tau is a regression model's: its values are checked there
REG_BATCH = "/v2/models/reg/batch-attribution"
TAU_INPUT = {"name": "tau", "datatype": "FP64", "shape": [1, 1], "data": [0.5]}
LOAD = "/v2/repository/models/clf/load"
NDJSON = {"content-type": "application/x-ndjson"}
INF_ROWS = np.array([[1, 2, np.inf, 4]], np.float32)
HUGE = 10 ** 400   # an integer JSON allows and no float holds
DEEP = b"[" * 100_000 + b"]" * 100_000   # far past the JSON parser's recursion limit
DEEP_500 = b"[" * 500 + b"1.0" + b"]" * 500     # parses: rejected further on, still with a 4xx
DEEP_SMALL = b"[" * 5_000 + b"]" * 5_000         # within the 64 KiB repository-body limit


def _nested(prefix: bytes, inner: bytes, suffix: bytes) -> bytes:
    return prefix + inner + suffix

# (id, method, path, body: dict | bytes | (bytes, headers), status, error_type, message substring)
CASES = [
    ("feature-count", "POST", INFER, _v2(shape=(1, D + 1)), 400, "invalid_shape", f"[batch, {D}]"),
    ("rank-1", "POST", INFER, _v2(shape=(D,)), 400, "invalid_shape", f"[batch, {D}]"),
    ("data-vs-shape", "POST", INFER, _v2(shape=(2, D), data=[1.0] * D), 400, "invalid_shape", "data has shape"),
    ("datatype-int", "POST", INFER, _v2(datatype="INT32", data=[1] * D), 400, "invalid_datatype", "FP32 or FP64"),
    ("datatype-unknown", "POST", INFER, _v2(datatype="FLOAT"), 400, "invalid_datatype", "unknown datatype"),
    ("strings-as-floats", "POST", INFER, _v2(data=["1"] * D), 400, "invalid_datatype", "does not match"),
    ("nan-json", "POST", INFER, b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,NaN,2,3]}]}',
     400, "invalid_value", "NaN or infinite"),
    ("inf-binary", "POST", INFER, _binary(INF_ROWS), 400, "invalid_value", "NaN or infinite"),
    ("fp64-overflow", "POST", INFER, _v2(datatype="FP64", data=[1e300] * D), 400, "invalid_value", "float32 range"),
    # finite JSON numbers past float32 in an FP32 tensor: "contains NaN or infinite values" on de30b48
    ("fp32-json-overflow", "POST", INFER, _v2(datatype="FP32", data=[3.5e38] * D), 400, "invalid_value",
     "outside the float32 range"),
    ("empty-batch", "POST", INFER, _v2(shape=(0, D), data=[]), 400, "empty_batch", "no rows"),
    ("oversized", "POST", INFER, b"{" + b" " * (1024 * 1024 + 10) + b"}", 413, "payload_too_large", "exceeds"),
    ("malformed-json", "POST", INFER, b'{"inputs": [', 400, "invalid_json", "malformed JSON"),
    ("json-not-object", "POST", INFER, b"[]", 400, "invalid_json", "JSON object"),
    ("no-inputs-key", "POST", INFER, b'{"id": "1"}', 400, "bad_request", "inputs"),
    ("header-past-body", "POST", INFER, _binary(np.ones((1, D), np.float32), header_delta=10_000), 400,
     "invalid_header", "the body has"),
    ("header-not-int", "POST", INFER, (_binary(np.ones((1, D), np.float32))[0], {HEADER_LENGTH: "twelve"}), 400,
     "invalid_header", "must be an integer"),
    ("binary-size-short", "POST", INFER, _binary(np.ones((1, D), np.float32), size=8), 400, "invalid_shape", "needs"),
    ("binary-size-long", "POST", INFER, _binary(np.ones((1, D), np.float32), size=64), 400, "invalid_header",
     "runs past"),
    ("header-cuts-json", "POST", INFER, _binary(np.ones((1, D), np.float32), header_delta=-5), 400, "invalid_json",
     "malformed JSON"),
    ("unknown-model", "POST", "/v2/models/nope/infer", _v2(), 404, "model_not_found", "unknown model 'nope'"),
    ("unknown-version", "POST", "/v2/models/clf/versions/9/infer", _v2(), 404, "model_not_found", "no version '9'"),
    ("version-not-number", "GET", "/v2/models/clf/versions/latest", None, 404, "model_not_found", "no version"),
    ("unknown-output", "POST", INFER, _v2(outputs=[{"name": "logits"}]), 400, "unknown_output", "logits"),
    ("output-twice", "POST", INFER, _v2(outputs=[{"name": "prediction"}, {"name": "prediction"}]), 400,
     "bad_request", "twice"),
    ("wrong-input-name", "POST", INFER, _v2(name="x"), 400, "unknown_input", "named 'input'"),
    ("two-inputs", "POST", INFER, {"inputs": [_v2()["inputs"][0]] * 2}, 400, "unknown_input", "one input named"),
    ("top-k-zero", "POST", INFER, _v2(parameters={"top_k": 0}), 400, "invalid_parameter", "top_k"),
    ("top-k-too-big", "POST", INFER, _v2(parameters={"top_k": 11}), 400, "invalid_parameter", "[1, 10]"),
    ("top-k-string", "POST", INFER, _v2(parameters={"top_k": "three"}), 400, "invalid_parameter", "top_k"),
    ("tau-negative", "POST", REG_INFER, _v2(parameters={"tau": -1}), 400, "invalid_parameter", "tau"),
    ("tau-zero", "POST", REG_INFER, _v2(parameters={"tau": 0}), 400, "invalid_parameter", "tau"),
    ("tau-string", "POST", REG_INFER, _v2(parameters={"tau": "x"}), 400, "invalid_parameter", "tau"),
    # tau on a classifier, whose radius certifies its decision and reads no tolerance: 200 on a2bc700,
    # the tau dropped unread (a client could take the radius for "the output moves by at most tau")
    ("tau-on-a-classifier", "POST", INFER, _v2(parameters={"tau": 0.5}), 400, "invalid_parameter",
     "a regression model's"),
    ("tau-input-on-a-classifier", "POST", INFER, {"inputs": [_v2()["inputs"][0], TAU_INPUT]}, 400, "unknown_input",
     "has no input 'tau'"),
    ("v1-tau-on-a-classifier", "POST", "/v1/models/clf:predict", {"instances": [[1, 2, 3, 4]],
                                                                  "parameters": {"tau": 0.5}}, 400,
     "invalid_parameter", "a regression model's"),
    ("batch-tau-on-a-classifier", "POST", BATCH + "?tau=0.5", {"instances": [[1, 2, 3, 4]]}, 400,
     "invalid_parameter", "a regression model's"),
    # tau both as an input and as a parameter: the input's value was used, the parameter's dropped
    ("tau-twice", "POST", REG_INFER, {"inputs": [_v2()["inputs"][0], TAU_INPUT], "parameters": {"tau": 0.3}}, 400,
     "invalid_parameter", "both"),
    ("alpha-other", "POST", INFER, _v2(parameters={"alpha": 0.2}), 400, "invalid_parameter", "calibrated at alpha"),
    ("diagnostics-bad", "POST", INFER, _v2(parameters={"diagnostics": 3}), 400, "invalid_parameter", "diagnostics"),
    # a list of no names: "" and [] were refused, while "," and " , " read as no diagnostics at all
    ("diagnostics-no-names", "POST", INFER, _v2(parameters={"diagnostics": ","}), 400, "invalid_parameter",
     "diagnostics"),
    ("diagnostics-blank-names", "POST", INFER, _v2(parameters={"diagnostics": " , "}), 400, "invalid_parameter",
     "diagnostics"),
    ("timeout-bad", "POST", INFER, _v2(parameters={"timeout": -5}), 400, "invalid_parameter", "timeout"),
    ("binary-flag-bad", "POST", INFER, _v2(parameters={"binary_data_output": "yes"}), 400, "bad_request",
     "boolean"),
    ("class-count", "POST", INFER, _v2(outputs=[{"name": "probabilities", "parameters": {"class_count": 2}}]), 400,
     "invalid_parameter", "class_count"),
    ("corrupt-model", "POST", "/v2/models/broken/infer", _v2(), 503, "model_not_ready", "cannot load"),
    ("corrupt-model-metadata", "GET", "/v2/models/broken", None, 503, "model_not_ready", "cannot load"),
    ("unknown-route", "GET", "/v2/nothing/here", None, 404, "not_found", "no route"),
    ("wrong-method", "GET", INFER, None, 405, "method_not_allowed", "not allowed"),
    ("v1-not-rows", "POST", "/v1/models/clf:predict", {"instances": "abc"}, 400, "validation_error", "instances"),
    ("v1-ragged", "POST", "/v1/models/clf:predict", {"instances": [[1, 2, 3, 4], [1]]}, 400, "invalid_shape",
     "equal length"),
    ("v1-nan", "POST", "/v1/models/clf:predict", b'{"instances": [[1, 2, NaN, 4]]}', 400, "invalid_value", "NaN"),
    ("v1-features", "POST", "/v1/models/clf:explain", {"instances": [[1, 2]]}, 400, "invalid_shape", "[batch, 4]"),
    ("batch-wrong-d", "POST", "/v2/models/clf/batch-attribution", (b"[1,2]\n", {"content-type": "application/x-ndjson"}),
     400, "invalid_shape", "[batch, 4]"),
    ("batch-bad-line", "POST", "/v2/models/clf/batch-attribution", (b"[1,2,3,4]\n{oops\n",
     {"content-type": "application/x-ndjson"}), 400, "invalid_json", "malformed"),
    ("batch-query", "POST", "/v2/models/clf/batch-attribution?top_k=abc", {"instances": [[1, 2, 3, 4]]}, 400,
     "validation_error", "top_k"),
    # issue 8: each of these answered 500 on the first version of main
    ("v1-empty", "POST", "/v1/models/clf:predict", {"instances": []}, 400, "empty_batch", "no rows"),
    ("v1-explain-empty", "POST", "/v1/models/clf:explain", {"instances": []}, 400, "empty_batch", "no rows"),
    ("deep-infer", "POST", INFER, DEEP, 400, "invalid_json", "nested too deeply"),
    ("deep-infer-data", "POST", INFER, _nested(b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":',
                                                DEEP, b"}]}"), 400, "invalid_json", "nested too deeply"),
    ("deep-infer-500", "POST", INFER, _nested(b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":',
                                               DEEP_500, b"}]}"), 400, "invalid_shape", "input"),
    ("deep-v1", "POST", "/v1/models/clf:predict", _nested(b'{"instances":', DEEP, b"}"), 400, "invalid_json",
     "nested too deeply"),
    ("deep-v1-500", "POST", "/v1/models/clf:predict", _nested(b'{"instances":', DEEP_500, b"}"), 400,
     "validation_error", "instances"),
    ("deep-batch", "POST", BATCH, _nested(b'{"instances":', DEEP, b"}"), 400, "invalid_json", "nested too deeply"),
    ("deep-batch-params", "POST", BATCH, _nested(b'{"instances":[[1,2,3,4]],"parameters":{"a":', DEEP, b"}}"), 400,
     "invalid_json", "nested too deeply"),
    ("deep-ndjson-line", "POST", BATCH, (b"[1,2,3,4]\n" + DEEP + b"\n", NDJSON), 400, "invalid_json",
     "nested too deeply"),
    ("deep-index", "POST", "/v2/repository/index", DEEP_SMALL, 400, "invalid_json", "nested too deeply"),
    ("batch-params-string", "POST", BATCH, {"instances": [[1, 2, 3, 4]], "parameters": "top_k=3"}, 400,
     "invalid_parameter", "parameters must be a JSON object"),
    ("batch-params-list", "POST", BATCH, {"instances": [[1, 2, 3, 4]], "parameters": [1, 2]}, 400,
     "invalid_parameter", "parameters must be a JSON object"),
    ("batch-empty-json", "POST", BATCH, {"instances": []}, 400, "empty_batch", "no rows"),
    ("batch-empty-ndjson", "POST", BATCH, (b"\n\n", NDJSON), 400, "empty_batch", "no rows"),
    ("batch-line-too-long", "POST", BATCH, (b"[" + b"1," * 600_000 + b"1]\n", NDJSON), 413, "payload_too_large",
     "HJSERVE_MAX_LINE_BYTES"),
    # hostile model names: never a path
    ("name-dotdot-infer", "POST", "/v2/models/%2e%2e/infer", _v2(), 400, "invalid_model_name", "invalid model name"),
    ("name-dot-infer", "POST", "/v2/models/%2e/infer", _v2(), 400, "invalid_model_name", "invalid model name"),
    ("name-dotdot-load", "POST", "/v2/repository/models/%2e%2e/load", None, 400, "invalid_model_name",
     "invalid model name"),
    ("name-dot-load", "POST", "/v2/repository/models/%2e/load", None, 400, "invalid_model_name", "invalid model name"),
    ("name-hidden-load", "POST", "/v2/repository/models/.hidden/load", None, 400, "invalid_model_name",
     "invalid model name"),
    ("name-dotdot-unload", "POST", "/v2/repository/models/%2e%2e/unload", None, 400, "invalid_model_name",
     "invalid model name"),
    ("name-backslash", "GET", "/v2/models/..%5c..%5cetc", None, 400, "invalid_model_name", "invalid model name"),
    ("name-nul", "GET", "/v2/models/clf%00", None, 400, "invalid_model_name", "invalid model name"),
    ("name-v1-dotdot", "POST", "/v1/models/%2e%2e:predict", {"instances": [[1, 2, 3, 4]]}, 400,
     "invalid_model_name", "invalid model name"),
    ("name-too-long", "GET", "/v2/models/" + "a" * 200, None, 400, "invalid_model_name", "invalid model name"),
    ("version-unicode-digit", "GET", "/v2/models/clf/versions/%C2%B2", None, 404, "model_not_found", "no version"),
    ("version-zero-padded", "GET", "/v2/models/clf/versions/01", None, 404, "model_not_found", "no version"),
    ("load-unknown", "POST", "/v2/repository/models/nope/load", None, 404, "model_not_found", "no model directory"),
    ("index-bad-body", "POST", "/v2/repository/index", {"ready": "maybe"}, 400, "bad_request", "index"),
    # integers past float64's range, and shapes that are not integers: each answered 500 (or was
    # silently read as another value, or dropped) on bcbf411
    ("tau-huge-int", "POST", REG_INFER, _v2(parameters={"tau": HUGE}), 400, "invalid_parameter", "tau"),
    ("alpha-huge-int", "POST", INFER, _v2(parameters={"alpha": HUGE}), 400, "invalid_parameter", "alpha"),
    ("baseline-huge-ints", "POST", INFER, _v2(parameters={"diagnostics": True, "baseline": [HUGE] * D}), 400,
     "invalid_parameter", "baseline"),
    ("v1-tau-huge-int", "POST", "/v1/models/reg:predict", {"instances": [[1, 2, 3, 4]], "parameters": {"tau": HUGE}},
     400, "invalid_parameter", "tau"),
    ("batch-tau-huge-int", "POST", REG_BATCH, {"instances": [[1, 2, 3, 4]], "parameters": {"tau": HUGE}}, 400,
     "invalid_parameter", "tau"),
    ("batch-rows-huge-int", "POST", BATCH, {"instances": [[1, 2, HUGE, 4]]}, 400, "invalid_value", "float32 range"),
    ("ndjson-huge-int", "POST", BATCH, (b"[1,2,3,4]\n[1,2,%d,4]\n" % HUGE, NDJSON), 400, "invalid_value",
     "float32 range"),
    ("ndjson-unknown-key", "POST", BATCH, (b'{"input":[1,2,3,4],"tau":0.5}\n', NDJSON), 400, "invalid_json",
     "'tau'"),
    ("batch-two-forms", "POST", BATCH, {**_v2(), "instances": [[1, 2, 3, 4]]}, 400, "invalid_json", "instances"),
    ("shape-bool", "POST", INFER, _v2(shape=(True, D), data=[1.0] * D), 400, "bad_request", "shape"),
    ("shape-string", "POST", INFER, _v2(shape=("1", D), data=[1.0] * D), 400, "bad_request", "shape"),
    ("batch-binary-negative-shape", "POST", BATCH, _binary(np.ones((1, D), np.float32), shape=(-1, -D)), 400,
     "invalid_shape", "non-negative"),
    # Triton's load overrides, read and dropped on bcbf411 (200, the files on disk loaded as they were)
    ("load-config-override", "POST", LOAD, {"parameters": {"config": "{}"}}, 400, "invalid_parameter", "config"),
    ("load-file-override", "POST", LOAD, {"parameters": {"config": "{}", "file:1/model.onnx": "AAAA"}}, 400,
     "invalid_parameter", "file:1/model.onnx"),
    ("load-not-json", "POST", LOAD, b"reload please", 400, "invalid_json", "malformed JSON"),
    ("load-unknown-key", "POST", LOAD, {"config": "{}"}, 400, "bad_request", "config"),
    ("unload-unknown-parameter", "POST", "/v2/repository/models/reg/unload", {"parameters": {"force": True}}, 400,
     "invalid_parameter", "force"),
    ("unload-dependents-not-bool", "POST", "/v2/repository/models/reg/unload",
     {"parameters": {"unload_dependents": "yes"}}, 400, "invalid_parameter", "unload_dependents"),
    # parameters nothing reads, answered 200 as if absent on bcbf411: a misspelt tau, Triton's
    # sequences and priorities, its classification extension as its clients spell it, shared memory
    ("param-misspelt", "POST", INFER, _v2(parameters={"tua": 0.5}), 400, "invalid_parameter", "'tua'"),
    ("param-sequence", "POST", INFER, _v2(parameters={"sequence_id": 7, "sequence_start": True}), 400,
     "invalid_parameter", "sequence_id"),
    ("param-priority", "POST", INFER, _v2(parameters={"priority": 1}), 400, "invalid_parameter", "priority"),
    ("v1-param-misspelt", "POST", "/v1/models/clf:predict", {"instances": [[1, 2, 3, 4]], "parameters": {"topk": 2}},
     400, "invalid_parameter", "'topk'"),
    ("batch-param-misspelt", "POST", BATCH, {"instances": [[1, 2, 3, 4]], "parameters": {"topk": 2}}, 400,
     "invalid_parameter", "'topk'"),
    ("output-classification", "POST", INFER, _v2(outputs=[{"name": "probabilities",
                                                            "parameters": {"classification": 2}}]), 400,
     "invalid_parameter", "classification extension"),
    ("output-shared-memory", "POST", INFER, _v2(outputs=[{"name": "probabilities", "parameters": {
        "shared_memory_region": "r", "shared_memory_byte_size": 40}}]), 400, "invalid_parameter",
     "shared_memory_region"),
    ("input-shared-memory", "POST", INFER, {"inputs": [{**_v2()["inputs"][0], "parameters": {
        "shared_memory_region": "r", "shared_memory_byte_size": 4 * D}}]}, 400, "invalid_parameter",
     "shared_memory_region"),
    # compressed bodies (Triton's request_compression_algorithm): read as JSON garbage on bcbf411
    ("encoding-unknown", "POST", INFER, (json.dumps(_v2()).encode(), {"content-encoding": "br"}), 415,
     "unsupported_encoding", "'br'"),
    ("gzip-corrupt", "POST", INFER, (gzip.compress(b"{}")[:10] + b"\xff" * 32, {"content-encoding": "gzip"}), 400,
     "bad_request", "corrupt"),
    ("gzip-truncated", "POST", INFER, (gzip.compress(json.dumps(_v2()).encode())[:-12], {"content-encoding": "gzip"}),
     400, "bad_request", "truncated"),
    ("gzip-bomb", "POST", INFER, (gzip.compress(b" " * (64 * 1024 * 1024)), {"content-encoding": "gzip"}), 413,
     "payload_too_large", "once decompressed"),
    # a batch body in V2 form: what its JSON-lines answer cannot honour was dropped unread (200 on
    # 42f69ae): output parameters (Triton's classification extension, unknown ones), binary outputs,
    # and the id a V2 response echoes
    ("batch-output-classification", "POST", BATCH, _v2(outputs=[{"name": "probabilities",
                                                                 "parameters": {"classification": 2}}]), 400,
     "invalid_parameter", "classification extension"),
    ("batch-output-parameter-unknown", "POST", BATCH, _v2(outputs=[{"name": "prediction", "parameters": {"foo": 1}}]),
     400, "invalid_parameter", "['foo']"),
    ("batch-output-binary", "POST", BATCH, _v2(outputs=[{"name": "prediction", "parameters": {"binary_data": True}}]),
     400, "invalid_parameter", "JSON lines"),
    ("batch-binary-data-output", "POST", BATCH, _v2(parameters={"binary_data_output": True}), 400,
     "invalid_parameter", "JSON lines"),
    ("batch-id", "POST", BATCH, _v2(id="job-1"), 400, "bad_request", "X-Request-ID"),
    ("batch-binary-body-output-classification", "POST", BATCH, _binary(np.ones((1, D), np.float32), extra={
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}), 400, "invalid_parameter",
     "classification extension"),
    ("batch-binary-body-output-binary", "POST", BATCH, _binary(np.ones((1, D), np.float32), extra={
        "outputs": [{"name": "prediction", "parameters": {"binary_data": True}}]}), 400, "invalid_parameter",
     "JSON lines"),
    ("batch-binary-body-binary-data-output", "POST", BATCH, _binary(np.ones((1, D), np.float32), extra={
        "parameters": {"binary_data_output": True}}), 400, "invalid_parameter", "JSON lines"),
    ("batch-binary-body-id", "POST", BATCH, _binary(np.ones((1, D), np.float32), extra={"id": "job-1"}), 400,
     "bad_request", "X-Request-ID"),
    ("batch-binary-input-parameter", "POST", BATCH, _binary(np.ones((1, D), np.float32), shared_memory_region="r"),
     400, "invalid_parameter", "shared_memory_region"),
    # shapes numpy cannot hold, even empty (a zero beside a huge dimension; more than 64 dimensions):
    # 500 on 2b107a5 (numpy's ValueError escaped the decoders)
    ("shape-zero-by-huge", "POST", INFER, _v2(shape=(0, 2**62), data=[]), 400, "invalid_shape", "too large"),
    ("shape-zero-by-huge-binary", "POST", INFER, _binary(np.ones((0, 1), np.float32), shape=[2**62, 2**62, 0]), 400,
     "invalid_shape", "too large"),
    ("shape-many-dims", "POST", INFER, _v2(shape=(1,) * 100, data=[1.0]), 400, "invalid_shape", "dimensions"),
    ("batch-shape-zero-by-huge", "POST", BATCH, _v2(shape=(0, 2**62), data=[]), 400, "invalid_shape", "too large"),
    ("batch-binary-shape-zero-by-huge", "POST", BATCH, _binary(np.ones((0, 1), np.float32), shape=[0, 2**62]), 400,
     "invalid_shape", "too large"),
    # fields nothing reads, and rows of strings or booleans read as numbers: 200 on f87d4bb, as if the
    # field were absent (a misspelt "parameters" served the default top_k; "binary_data" beside an
    # output's parameters answered in JSON) or the values numbers (V1 and the batch job's rows)
    ("field-misspelt", "POST", INFER, _v2(paramters={"top_k": 2}), 400, "bad_request", "'paramters'"),
    ("field-singular", "POST", INFER, _v2(output=[{"name": "prediction"}]), 400, "bad_request", "'output'"),
    ("input-field-unknown", "POST", INFER, {"inputs": [{**_v2()["inputs"][0], "contents": [1]}]}, 400,
     "bad_request", "'contents'"),
    ("output-field-unknown", "POST", INFER, _v2(outputs=[{"name": "prediction", "binary_data": True}]), 400,
     "bad_request", "'binary_data'"),
    ("binary-header-field-unknown", "POST", INFER, _binary(np.ones((1, D), np.float32), extra={"paramters": {}}),
     400, "bad_request", "'paramters'"),
    ("booleans-among-floats", "POST", INFER, _v2(data=[1.0, True, 2.0, 3.0]), 400, "invalid_datatype", "'bool'"),
    ("v1-field-unknown", "POST", "/v1/models/clf:predict", {"instances": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]},
     400, "validation_error", "'inputs'"),
    ("v1-strings", "POST", "/v1/models/clf:predict", {"instances": [["1", "2", "3", "4"]]}, 400,
     "validation_error", "number"),
    ("v1-booleans", "POST", "/v1/models/clf:explain", {"instances": [[True, 2, 3, 4]]}, 400, "validation_error",
     "number"),
    ("batch-strings", "POST", BATCH, {"instances": [["1", "2", "3", "4"]]}, 400, "invalid_datatype", "numbers"),
    ("batch-booleans", "POST", BATCH, b"[[1, 2, 3, false]]", 400, "invalid_datatype", "numbers"),
    ("ndjson-strings", "POST", BATCH, (b'[1,2,3,4]\n["1",2,3,4]\n', NDJSON), 400, "invalid_datatype",
     "NDJSON line 2"),
    ("ndjson-booleans", "POST", BATCH, (b'{"input":[true,2,3,4]}\n', NDJSON), 400, "invalid_datatype", "numbers"),
    ("batch-field-misspelt", "POST", BATCH, _v2(paramters={"top_k": 2}), 400, "bad_request", "'paramters'"),
    ("batch-binary-header-field-unknown", "POST", BATCH, _binary(np.ones((1, D), np.float32),
                                                                 extra={"output": [{"name": "prediction"}]}),
     400, "bad_request", "'output'"),
    ("baseline-booleans", "POST", INFER, _v2(parameters={"baseline": [True, 0, 0, 0]}), 400, "invalid_parameter",
     "baseline"),
    ("baseline-strings-in-a-list", "POST", INFER, _v2(parameters={"baseline": ["1", "2", "3", "4"]}), 400,
     "invalid_parameter", "baseline"),
    ("diagnostics-unknown-beside-outputs", "POST", INFER,
     _v2(outputs=[{"name": "prediction"}], parameters={"diagnostics": "prediction,saliencey"}), 400,
     "unknown_output", "saliencey"),
    ("diagnostics-beyond-outputs", "POST", INFER,
     _v2(outputs=[{"name": "prediction"}], parameters={"diagnostics": "saliency"}), 400, "invalid_parameter",
     "'saliency'"),
    ("diagnostics-bad-beside-outputs", "POST", INFER, _v2(outputs=[{"name": "prediction"}],
                                                          parameters={"diagnostics": 3}), 400, "invalid_parameter",
     "diagnostics"),
    ("index-ready-string", "POST", "/v2/repository/index", {"ready": "yes"}, 400, "bad_request", "ready"),
    ("index-field-unknown", "POST", "/v2/repository/index", {"ready": True, "all": True}, 400, "bad_request",
     "'all'"),
]


def _send(client, method, path, body):
    headers = {}
    if isinstance(body, tuple):
        body, headers = body
    if isinstance(body, dict):
        return client.request(method, path, json=body, headers=headers)
    return client.request(method, path, content=body, headers=headers)


@pytest.fixture(scope="module")
def inproc(tiny_repo):
    """settings -> repository (real backends) -> dataplane -> app -> ASGI client, like the server fixture."""
    from fastapi.testclient import TestClient

    from service.dataplane import DataPlane
    from service.repository import ModelRepository
    from service.rest.app import create_app
    from service.settings import Settings

    settings = Settings(model_repository=tiny_repo, max_body_bytes=1024 * 1024, model_control_mode="explicit")
    app = create_app(DataPlane(settings, ModelRepository(settings)))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(("method", "path", "body", "status", "error_type", "message"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(inproc, method, path, body, status, error_type, message):
    r = _send(inproc, method, path, body)
    assert r.status_code == status, r.text
    payload = r.json()
    assert set(payload) == {"error", "error_type"}, payload
    assert payload["error_type"] == error_type
    assert message in payload["error"]


def test_server_still_serves_after_bad_input(server):
    with server.client() as c:
        for case in CASES:
            _send(c, *case[1:4])
        r = c.post(INFER, json=_v2())
        metrics = c.get("/metrics").text
    assert r.status_code == 200
    assert 'status="500"' not in metrics
    assert 'hjserve_inference_failures_total{model="clf",reason="invalid_shape",version="2"}' in metrics


@pytest.mark.parametrize("timeout", [HUGE, str(HUGE)], ids=["json-integer", "string"])
def test_a_timeout_past_float64_is_the_servers_own(inproc, timeout):
    """Triton's ``timeout`` only ever shortens the server's: a positive integer too large for a float
    (as JSON, or as the string gRPC parameters carry) is no error -- it answered 500 on bcbf411."""
    r = _send(inproc, "POST", INFER, _v2(parameters={"timeout": timeout}))
    assert r.status_code == 200, r.text


def test_tritons_client_loads_and_unloads_and_hears_why_an_override_is_refused(triton):
    """tritonclient's unload always sends ``unload_dependents``; its load sends ``{}``, or the
    overrides hjserve refuses (a config override was ignored on bcbf411: 200, nothing changed)."""
    from tritonclient.utils import InferenceServerException

    triton.unload_model("reg")
    assert not triton.is_model_ready("reg")
    triton.load_model("reg")
    assert triton.is_model_ready("reg")
    with pytest.raises(InferenceServerException, match="not supported"):
        triton.load_model("reg", config=json.dumps({"max_batch_size": 1}))
    with pytest.raises(InferenceServerException, match="not supported"):
        triton.load_model("reg", config="{}", files={"file:1/model.onnx": b"not a graph"})
    assert triton.is_model_ready("reg")


def test_tritons_client_hears_what_is_not_supported(triton):
    """Triton's HTTP client spells the classification extension ``classification`` (hjserve
    refused only ``class_count``: the client got probabilities where it expected labels) and sends
    ``priority`` / ``sequence_id`` only when set; each is refused with its reason."""
    from tritonclient.http import InferInput, InferRequestedOutput
    from tritonclient.utils import InferenceServerException

    x = np.ones((1, D), np.float32)
    inp = InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    assert triton.infer("clf", [inp]).as_numpy("prediction").shape == (1,)   # the client's defaults pass
    with pytest.raises(InferenceServerException, match="classification extension"):
        triton.infer("clf", [inp], outputs=[InferRequestedOutput("probabilities", class_count=2)])
    with pytest.raises(InferenceServerException, match="priority"):
        triton.infer("clf", [inp], priority=1)
    with pytest.raises(InferenceServerException, match="sequence_id"):
        triton.infer("clf", [inp], sequence_id=3, sequence_start=True)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritons_client_may_compress_its_requests(triton, server, algorithm):
    """tritonclient's request_compression_algorithm (Content-Encoding gzip / deflate, binary tensors
    inside): the same answers as uncompressed -- on bcbf411 a 400 ('malformed JSON'). A compressed
    batch-attribution body answers the same lines as the plain one."""
    from tritonclient.http import InferInput, InferRequestedOutput

    x = np.random.default_rng(7).standard_normal((5, D)).astype(np.float32)
    inp = InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    outputs = [InferRequestedOutput(n, binary_data=True) for n in ("prediction", "probabilities", "certified_radius")]
    plain = triton.infer("clf", [inp], outputs=outputs)
    packed = triton.infer("clf", [inp], outputs=outputs, request_compression_algorithm=algorithm)
    for name in ("prediction", "probabilities", "certified_radius"):
        assert np.array_equal(plain.as_numpy(name), packed.as_numpy(name))
    rows = ("\n".join(json.dumps(r) for r in x.tolist()) + "\n").encode()
    import zlib

    body = gzip.compress(rows) if algorithm == "gzip" else zlib.compress(rows)
    with server.client() as c:
        want = c.post(BATCH, content=rows, headers=NDJSON)
        got = c.post(BATCH, content=body, headers={**NDJSON, "content-encoding": algorithm})
    assert want.status_code == got.status_code == 200, got.text
    assert got.content == want.content
