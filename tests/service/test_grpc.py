"""The gRPC transport end to end: a real server process, Triton's real gRPC client (tritonclient.grpc),
and raw protobuf calls for what that client never sends (typed ``contents``, hostile messages)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from svc_helpers import assert_outputs_close, metric_value, run_server
from tiny_model import D
from tritonclient.utils import InferenceServerException

from service.grpc import inference_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
METHOD = "/inference.GRPCInferenceService/"


@pytest.fixture(scope="module")
def gserver(tiny_repo, tmp_path_factory):
    with run_server(tiny_repo, tmp_path_factory.mktemp("glogs"), grpc=True) as s:
        yield s


@pytest.fixture(scope="module")
def gclient(gserver):
    client = tg.InferenceServerClient(gserver.grpc_target)
    yield client
    client.close()


def _x(n=5, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def _message(model: str, id: str, seed: int = 0, version: str = "") -> pb.ModelInferRequest:
    """A one-row ModelInfer message as raw contents."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=id)
    request.inputs.add(name="input", datatype="FP32", shape=[1, D])
    request.raw_input_contents.append(_x(1, seed=seed).tobytes())
    return request


def _grpc_infer(client, model, x, outputs=None, **params):
    inp = tg.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    requested = [tg.InferRequestedOutput(o) for o in outputs] if outputs else None
    return client.infer(model, [inp], outputs=requested, parameters=params or None)


def _raw_call(target: str, method: str, request, response_type, metadata=()):
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD + method, request_serializer=type(request).SerializeToString,
                                   response_deserializer=response_type.FromString)
        return call(request, metadata=metadata, timeout=30)


@pytest.mark.parametrize("proto", ["inference", "health"])
def test_generated_messages_match_the_proto(tmp_path, proto):
    """service/grpc/<proto>_pb2.py is exactly what grpc_tools makes of <proto>.proto."""
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
                    f"service/grpc/{proto}.proto"], cwd=ROOT, check=True, timeout=120)
    generated = (tmp_path / "service" / "grpc" / f"{proto}_pb2.py").read_text()
    assert generated == (ROOT / "service" / "grpc" / f"{proto}_pb2.py").read_text()


def test_messages_are_wire_compatible_with_triton():
    """Every field hjserve declares has the number and type of Triton's own message."""
    from tritonclient.grpc import model_config_pb2, service_pb2

    theirs = {**{m.name: m for m in service_pb2.DESCRIPTOR.message_types_by_name.values()},
              **{m.name: m for m in model_config_pb2.DESCRIPTOR.message_types_by_name.values()}}

    def check(mine, other):
        for field in mine.fields:
            match = other.fields_by_name.get(field.name)
            assert match is not None and match.number == field.number and match.type == field.type, \
                f"{mine.full_name}.{field.name}"
        for nested in mine.nested_types:
            if not nested.GetOptions().map_entry:
                check(nested, other.nested_types_by_name[nested.name])

    for name, message in pb.DESCRIPTOR.message_types_by_name.items():
        check(message, theirs[name])


def _health_check(target: str, service: str = "", metadata=()) -> int:
    """grpc.health.v1.Health/Check through the gRPC project's own client stubs (grpcio-health-checking,
    what Kubernetes' gRPC probes and grpc_health_probe speak)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         metadata=metadata, timeout=10).status


def test_the_health_messages_are_the_standard_protocols():
    """hjserve's health messages have the field numbers, types and enum values of grpc.health.v1."""
    from grpc_health.v1 import health_pb2 as theirs

    from service.grpc import health_pb2 as mine

    for name, message in mine.DESCRIPTOR.message_types_by_name.items():
        other = theirs.DESCRIPTOR.message_types_by_name[name]
        assert [(f.name, f.number, f.type) for f in message.fields] == \
            [(f.name, f.number, f.type) for f in other.fields], name
    assert mine.HealthCheckResponse.ServingStatus.items() == theirs.HealthCheckResponse.ServingStatus.items()


def test_the_standard_health_check_answers_readiness(gserver, tiny_repo, tmp_path):
    """grpc.health.v1.Health/Check (Kubernetes' gRPC probes, load balancers): the server ("") and the
    inference service are SERVING when the server is ready and NOT_SERVING while no model is, with
    no key needed (like /v2/health/*); a service it does not have is NOT_FOUND, and Watch is
    UNIMPLEMENTED (which the protocol allows). On 528016c every call was UNIMPLEMENTED."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health_check(gserver.grpc_target) == serving
    assert _health_check(gserver.grpc_target, "inference.GRPCInferenceService") == serving
    with pytest.raises(grpc.RpcError) as info:
        _health_check(gserver.grpc_target, "inference.Nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "inference.Nope" in info.value.details()
    with grpc.insecure_channel(gserver.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        next(iter(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    broken_only = tmp_path / "repo"
    (broken_only / "broken" / "1").mkdir(parents=True)
    (broken_only / "broken" / "1" / "model.onnx").write_bytes((tiny_repo / "broken" / "1" / "model.onnx").read_bytes())
    with run_server(broken_only, tmp_path, grpc=True, api_keys="k-9d1e-health") as s:
        assert _health_check(s.grpc_target) == not_serving   # live, no model ready, no key sent
        assert _health_check(s.grpc_target, "inference.GRPCInferenceService") == not_serving


def test_health_metadata_config_statistics(gserver, gclient):
    assert gclient.is_server_live() and gclient.is_server_ready()
    assert gclient.is_model_ready("clf") and gclient.is_model_ready("clf", "1")
    assert not gclient.is_model_ready("nope") and not gclient.is_model_ready("broken")
    meta = gclient.get_server_metadata(as_json=True)
    assert meta["name"] == "hjserve" and "statistics" in meta["extensions"]
    with gserver.client() as http:
        rest = http.get("/v2/models/reg").json()
        rest_config = http.get("/v2/models/clf/config").json()
    model = gclient.get_model_metadata("reg", as_json=True)
    assert model["name"] == rest["name"] and [o["name"] for o in model["outputs"]] == [o["name"] for o in rest["outputs"]]
    assert [int(s) for s in model["inputs"][1]["shape"]] == rest["inputs"][1]["shape"] == [-1, 1]
    config = gclient.get_model_config("clf", as_json=True)["config"]
    assert config["max_batch_size"] == rest_config["max_batch_size"]
    assert [o["name"] for o in config["output"]] == [o["name"] for o in rest_config["output"]]
    assert config["parameters"]["class_names"] == rest_config["parameters"]["class_names"]
    assert config["version_policy"] == {"all": {}}
    _grpc_infer(gclient, "clf", _x(3))
    stats = gclient.get_inference_statistics("clf", "2", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 3 and int(stats["inference_stats"]["success"]["count"]) >= 1


def test_grpc_and_rest_answer_the_same_bits(gserver, gclient):
    """One dataplane, two transports: every output identical, for classification and regression."""
    http = th.InferenceServerClient(gserver.host_port)
    try:
        for model, params in (("clf", {"top_k": 4, "diagnostics": True}), ("reg", {"tau": 0.3, "diagnostics": True})):
            x = _x(7, seed=3)
            via_grpc = _grpc_infer(gclient, model, x, **params)
            inp = th.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            via_rest = http.infer(model, [inp], parameters=params)
            names = [o["name"] for o in via_rest.get_response()["outputs"]]
            assert names == [o.name for o in via_grpc.get_response().outputs] and len(names) >= 13
            for name in names:
                np.testing.assert_array_equal(via_grpc.as_numpy(name), via_rest.as_numpy(name), err_msg=name)
    finally:
        http.close()


def test_parameters_keep_the_protocol_types(gclient):
    """InferParameter has bool / int64 / string / double: numbers as strings, diagnostics as a
    comma-separated string, a bool string."""
    x = _x(2)
    a = _grpc_infer(gclient, "reg", x, tau="0.5", top_k="3", diagnostics="energy_gap,attribution_index")
    b = _grpc_infer(gclient, "reg", x, tau=0.5)
    np.testing.assert_array_equal(a.as_numpy("certified_radius"), b.as_numpy("certified_radius"))
    assert a.as_numpy("attribution_index").shape == (2, 3) and a.as_numpy("energy_gap").shape == (2,)
    assert _grpc_infer(gclient, "clf", x, diagnostics="true").as_numpy("saliency").shape == (2, D)
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT.*tau"):
        _grpc_infer(gclient, "reg", x, tau="lots")


def test_typed_contents_are_decoded_like_raw_bytes(gserver, gclient):
    x = _x(4, seed=9)
    request = pb.ModelInferRequest(model_name="clf")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[4, D])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="probabilities")
    reply = _raw_call(gserver.grpc_target, "ModelInfer", request, pb.ModelInferResponse)
    probs = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(4, -1)
    np.testing.assert_array_equal(probs, _grpc_infer(gclient, "clf", x, outputs=["probabilities"]).as_numpy("probabilities"))


def test_the_rest_binary_options_are_booleans_that_change_nothing(gserver):
    """binary_data (an output's) and binary_data_output (the request's) choose REST's binary
    extension; gRPC outputs are always raw_output_contents. A client written for both transports may
    send them: accepted when they are booleans, as REST takes them. On 869dbff an output's binary_data
    was refused ("unknown parameter(s) ['binary_data'] (an output takes only binary_data ...)") and a
    binary_data_output that was not a boolean was dropped unread."""
    request = pb.ModelInferRequest(model_name="clf")
    request.inputs.add(name="input", datatype="FP32", shape=[2, D])
    request.raw_input_contents.append(_x(2).tobytes())
    request.outputs.add(name="probabilities").parameters["binary_data"].bool_param = True
    request.parameters["binary_data_output"].bool_param = False
    reply = _raw_call(gserver.grpc_target, "ModelInfer", request, pb.ModelInferResponse)
    assert [o.name for o in reply.outputs] == ["probabilities"] and len(reply.raw_output_contents) == 1
    for where in (request.outputs[0].parameters["binary_data"], request.parameters["binary_data_output"]):
        where.string_param = "yes"
        with pytest.raises(grpc.RpcError) as info:
            _raw_call(gserver.grpc_target, "ModelInfer", request, pb.ModelInferResponse)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must be a boolean" in info.value.details()
        where.bool_param = True


def _typed(request: pb.ModelInferRequest, datatype: str, field: str, values: list) -> None:
    """Send the first input as typed ``contents`` of ``datatype`` instead of raw bytes."""
    del request.raw_input_contents[:]
    request.inputs[0].datatype = datatype
    getattr(request.inputs[0].contents, field).extend(values)


@pytest.mark.parametrize("mutate, code, fragment", [
    (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
    (lambda r: setattr(r, "model_name", "../../etc"), grpc.StatusCode.INVALID_ARGUMENT, "invalid model name"),
    (lambda r: setattr(r, "model_version", "9"), grpc.StatusCode.NOT_FOUND, "no version"),
    (lambda r: setattr(r, "model_name", "broken"), grpc.StatusCode.UNAVAILABLE, "no ready version (version 1: "),
    (lambda r: r.inputs[0].shape.__setitem__(1, 5), grpc.StatusCode.INVALID_ARGUMENT, "binary_data_size"),
    (lambda r: r.raw_input_contents.__setitem__(0, np.full((2, D), np.nan, np.float32).tobytes()),
     grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    (lambda r: r.raw_input_contents.append(b"extra"), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"),
    (lambda r: r.inputs[0].__setattr__("datatype", "INT99"), grpc.StatusCode.INVALID_ARGUMENT, "datatype"),
    (lambda r: r.inputs[0].__setattr__("name", "other"), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    (lambda r: r.outputs.add(name="nope"), grpc.StatusCode.INVALID_ARGUMENT, "unknown output"),
    (lambda r: r.parameters["top_k"].__setattr__("int64_param", 999), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    # tau on a classifier, as a parameter or an input: answered OK on a2bc700, the tau dropped unread
    (lambda r: r.parameters["tau"].__setattr__("double_param", 0.5), grpc.StatusCode.INVALID_ARGUMENT,
     "a regression model's"),
    (lambda r: (r.inputs.add(name="tau", datatype="FP64", shape=[2, 1]),
                r.raw_input_contents.append(np.full((2, 1), 0.5).tobytes())), grpc.StatusCode.INVALID_ARGUMENT,
     "has no input 'tau'"),
    (lambda r: (r.inputs[0].shape.__setitem__(0, 0), r.raw_input_contents.__setitem__(0, b"")),
     grpc.StatusCode.INVALID_ARGUMENT, "no rows"),
    # typed contents wider than their datatype (int_contents carries INT8 / INT16 as int32): was INTERNAL
    (lambda r: _typed(r, "INT8", "int_contents", [300] + [1] * (2 * D - 1)), grpc.StatusCode.INVALID_ARGUMENT,
     "out of range for INT8"),
    (lambda r: _typed(r, "UINT16", "uint_contents", [70_000] + [1] * (2 * D - 1)), grpc.StatusCode.INVALID_ARGUMENT,
     "out of range for UINT16"),
    # typed contents in a field the datatype does not use: 0 values for the shape, or beside the right
    # field dropped unread (answered OK on 869dbff)
    (lambda r: _typed(r, "FP32", "fp64_contents", [1.0] * 2 * D), grpc.StatusCode.INVALID_ARGUMENT,
     "FP32 values go in fp32_contents, not fp64_contents"),
    (lambda r: (_typed(r, "FP32", "fp32_contents", [1.0] * 2 * D), r.inputs[0].contents.bool_contents.append(True)),
     grpc.StatusCode.INVALID_ARGUMENT, "FP32 values go in fp32_contents, not bool_contents"),
    # shapes numpy cannot hold, even empty: was INTERNAL
    (lambda r: (r.inputs[0].ClearField("shape"), r.inputs[0].shape.extend([0, 2**62]),
                r.raw_input_contents.__setitem__(0, b"")),
     grpc.StatusCode.INVALID_ARGUMENT, "too large"),
    (lambda r: (_typed(r, "FP32", "fp32_contents", []), r.inputs[0].shape.extend([2**62, 0])),
     grpc.StatusCode.INVALID_ARGUMENT, "too large"),
    (lambda r: (_typed(r, "FP32", "fp32_contents", [1.0]), r.inputs[0].ClearField("shape"),
                r.inputs[0].shape.extend([1] * 100)), grpc.StatusCode.INVALID_ARGUMENT, "dimensions"),
])
def test_bad_requests_get_the_mapped_status_never_internal(gserver, mutate, code, fragment):
    request = pb.ModelInferRequest(model_name="clf")
    request.inputs.add(name="input", datatype="FP32", shape=[2, D])
    request.raw_input_contents.append(_x(2).tobytes())
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(gserver.grpc_target, "ModelInfer", request, pb.ModelInferResponse)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    trailing = dict(info.value.trailing_metadata() or ())
    assert trailing.get("error-type"), trailing
    assert len(trailing.get("x-request-id", "")) == 32, trailing    # the server's id, on errors too
    with grpc.insecure_channel(gserver.grpc_target) as channel:   # and the server still serves
        live = channel.unary_unary(METHOD + "ServerLive", request_serializer=pb.ServerLiveRequest.SerializeToString,
                                   response_deserializer=pb.ServerLiveResponse.FromString)
        assert live(pb.ServerLiveRequest(), timeout=10).live


def test_unknown_methods_are_unimplemented(gserver):
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(gserver.grpc_target, "CudaSharedMemoryStatus", pb.ServerLiveRequest(), pb.ServerLiveResponse)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED




@pytest.mark.parametrize("method", ["ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata",
                                    "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
                                    "RepositoryModelUnload", "ModelInfer", "/grpc.health.v1.Health/Check"])
def test_a_message_that_is_no_protobuf_is_invalid_argument_never_internal(gserver, method):
    """Bytes that do not parse as the method's message are the client's error on every method:
    INVALID_ARGUMENT with its ``bad_request`` error type, counted and logged as a refused call, and
    no stack trace in the server's log. Before, grpc parsed them before any handler ran: UNKNOWN
    with details naming Python's DecodeError (a traceback logged per call), and ModelInfer, which
    reads its own message, answered INTERNAL as if the server had a bug."""
    path = method if method.startswith("/") else METHOD + method
    with grpc.insecure_channel(gserver.grpc_target) as channel:
        for garbage in (b"\xff\xff\xff", b"\x0a\xff", bytes(range(256))):
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(path)(garbage, metadata=(("x-request-id", "junk-1"),), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (garbage, info.value)
            assert "is not a valid" in info.value.details() and "Error" not in info.value.details(), info.value.details()
            trailing = dict(info.value.trailing_metadata())
            assert trailing["error-type"] == "bad_request" and trailing["x-request-id"] == "junk-1", trailing
    log = gserver.log.read_text()
    assert "Traceback" not in log and "raised by servicer method" not in log, log[-3000:]


def test_a_stream_message_that_is_no_protobuf_is_answered_in_its_place(gserver):
    """In a stream, bytes that do not parse are answered in their place (``error_message``, error
    type ``bad_request``) and the stream goes on to the next message (gRPC frames every message, so
    the next one is whole). Before, the stream ended UNKNOWN naming Python's DecodeError."""
    messages = [_message("clf", "m0").SerializeToString(), b"\xff\xff\xff", _message("clf", "m2").SerializeToString()]
    with grpc.insecure_channel(gserver.grpc_target) as channel:
        stream = channel.stream_stream(METHOD + "ModelStreamInfer",
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)(iter(messages), timeout=30)
        answers = list(stream)
        assert stream.code() == grpc.StatusCode.OK
    assert [a.error_message == "" for a in answers] == [True, False, True], [a.error_message for a in answers]
    assert [a.infer_response.id for a in answers] == ["m0", "", "m2"]
    assert "is not a valid" in answers[1].error_message, answers[1].error_message
    assert answers[1].infer_response.parameters["error_type"].string_param == "bad_request"


def test_keys_limits_and_overload(tiny_repo, tmp_path):
    """Same keys as HTTP (metadata), the message size limit, and overload as UNAVAILABLE with a
    retry-after trailer, on a server with max_queue_size 1."""
    with run_server(tiny_repo, tmp_path, grpc=True, api_keys="k1", admin_key="root", model_control_mode="explicit",
                    max_queue_size=1,
                    max_batch_size=1, grpc_max_message_bytes=64 * 1024) as s:
        client = tg.InferenceServerClient(s.grpc_target)
        try:
            with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
                client.get_model_metadata("clf")
            assert client.get_model_metadata("clf", headers={"x-api-key": "k1"}).name == "clf"
            assert client.is_server_live()   # health stays open
            with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
                client.get_model_repository_index(headers={"authorization": "Bearer k1"})
            index = client.get_model_repository_index(headers={"authorization": "Bearer root"}, as_json=True)
            assert {m["name"] for m in index["models"]} >= {"clf", "reg", "broken"}
            client.load_model("reg", headers={"authorization": "Bearer root"})
            with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
                client.load_model("broken", headers={"authorization": "Bearer root"})
            with pytest.raises(InferenceServerException, match="not supported"):   # never ignored
                client.load_model("reg", config="{}", headers={"authorization": "Bearer root"})
            x = np.ones((1, D), np.float32)
            inp = tg.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            with pytest.raises(InferenceServerException, match="classification extension"):   # was ignored
                client.infer("clf", [inp], outputs=[tg.InferRequestedOutput("probabilities", class_count=2)],
                             headers={"x-api-key": "k1"})
            with pytest.raises(InferenceServerException, match="priority"):   # was ignored
                client.infer("clf", [inp], priority=1, headers={"x-api-key": "k1"})
            client.unload_model("reg", headers={"authorization": "Bearer root"})   # sends unload_dependents
            assert not client.is_model_ready("reg", headers={"x-api-key": "k1"})
            client.load_model("reg", headers={"authorization": "Bearer root"})
            assert client.is_model_ready("clf", headers={"x-api-key": "k1"})
            big = np.zeros((4096, D), np.float32)   # 64 KiB of input: over the message limit
            with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED"):
                inp = tg.InferInput("input", list(big.shape), "FP32")
                inp.set_data_from_numpy(big)
                client.infer("clf", [inp], headers={"x-api-key": "k1"})
        finally:
            client.close()

        async def flood():
            import tritonclient.grpc.aio as tga

            aclient = tga.InferenceServerClient(s.grpc_target)
            x = _x(256)
            inp = tga.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            try:
                results = await asyncio.gather(*(aclient.infer("clf", [inp], headers={"x-api-key": "k1"})
                                                 for _ in range(24)), return_exceptions=True)
            finally:
                await aclient.close()
            return results
        results = asyncio.run(flood())
        refused = [r for r in results if isinstance(r, Exception)]
        assert refused and all("UNAVAILABLE" in str(r) for r in refused), refused[:3]
        assert len(refused) < len(results)   # and some were answered
        with grpc.insecure_channel(s.grpc_target) as channel:
            call = channel.unary_unary(METHOD + "ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=pb.ModelInferResponse.FromString)
            request = _message("clf", "")
            reply = call.with_call(request, metadata=(("x-api-key", "k1"), ("x-request-id", "job-7")), timeout=10)
            assert ("x-request-id", "job-7") in reply[1].trailing_metadata()
            # an id the server does not take (over 128 characters) is replaced by a new one
            reply = call.with_call(request, metadata=(("x-api-key", "k1"), ("x-request-id", "j" * 200)), timeout=10)
            given = dict(reply[1].trailing_metadata())["x-request-id"]
            assert given != "j" * 200 and len(given) == 32
            # a stream without the key ends at once as a unary call does: status, details, trailers
            stream = channel.stream_stream(METHOD + "ModelStreamInfer",
                                           request_serializer=pb.ModelInferRequest.SerializeToString,
                                           response_deserializer=pb.ModelStreamInferResponse.FromString)
            with pytest.raises(grpc.RpcError) as info:
                list(stream(iter([request]), metadata=(("x-request-id", "s-7"),), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
            assert "API key" in info.value.details(), info.value.details()
            trailing = dict(info.value.trailing_metadata())
            assert trailing["error-type"] == "unauthorized" and trailing["x-request-id"] == "s-7", trailing
        with s.client() as http:
            text = http.get("/metrics").text
        assert 'hjserve_grpc_requests_total{code="UNAVAILABLE",method="ModelInfer"}' in text
        assert 'hjserve_grpc_requests_total{code="UNAUTHENTICATED",method="ModelStreamInfer"}' in text


def test_load_failures_do_not_show_host_paths(gserver, tiny_repo):
    ready = _raw_call(gserver.grpc_target, "ModelReady", pb.ModelReadyRequest(name="broken"), pb.ModelReadyResponse)
    assert ready.ready is False
    with gserver.client() as http:
        reason = http.get("/v2/models/broken").json()["error"]
    assert "<repository>/broken/1/model.onnx" in reason and str(tiny_repo) not in reason


def test_an_unexpected_failure_is_internal_and_never_a_stack_trace(tiny_repo):
    """A bug in a handler (not a core error) answers INTERNAL with a fixed message and its
    error-type trailer; the exception stays in the server log."""
    from service.dataplane import DataPlane
    from service.grpc.server import GRPCServer
    from service.repository import ModelRepository
    from service.settings import Settings

    class Context:
        def invocation_metadata(self):
            return ()

        def set_trailing_metadata(self, metadata):
            self.trailing = dict(metadata)

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    async def broken(request, context):
        raise RuntimeError("secret internals")

    settings = Settings(model_repository=tiny_repo)
    server = GRPCServer(DataPlane(settings, ModelRepository(settings)), "127.0.0.1", 0)
    context = Context()
    assert asyncio.run(server._wrap("ServerLive", pb.ServerLiveRequest, broken, "none")(b"", context)) is None
    assert context.code == grpc.StatusCode.INTERNAL and context.details == "internal server error"
    assert context.trailing["error-type"] == "internal_error" and set(context.trailing) == {"error-type", "x-request-id"}


def test_calls_that_never_send_their_message_do_not_hold_slots_forever(tiny_repo, tmp_path):
    """At most max_connections calls at once, counted from when a call opens -- before its message
    arrives. Two calls that open and never send (max_connections=2) lock out every other call until
    their connection's age and grace (grpc_max_connection_age_s, then body_timeout_s +
    request_timeout_s) close them; then calls are served again."""
    import threading
    import time

    stop = threading.Event()

    def never():
        stop.wait(60)
        return
        yield

    with run_server(tiny_repo, tmp_path, grpc=True, max_connections=2, grpc_max_connection_age_s=1,
                    body_timeout_s=1, request_timeout_s=1) as s:
        # both calls on one connection: max_connections bounds the connections too, and the
        # probe's is the second
        channel = grpc.insecure_channel(s.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
        call = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        channels, idle = [channel], [call.future(never()) for _ in range(2)]
        time.sleep(0.5)
        probe = grpc.insecure_channel(s.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
        live = probe.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                 request_serializer=pb.ServerLiveRequest.SerializeToString,
                                 response_deserializer=pb.ServerLiveResponse.FromString)
        try:
            with pytest.raises(grpc.RpcError) as locked:
                live(pb.ServerLiveRequest(), timeout=5)
            assert locked.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            deadline = time.monotonic() + 30
            while not all(f.done() for f in idle):
                assert time.monotonic() < deadline, "the idle calls still hold their slots"
                time.sleep(0.2)
            assert live(pb.ServerLiveRequest(), timeout=5).live
        finally:
            stop.set()
            for channel in (*channels, probe):
                channel.close()


# ------------------------------------------------------------------------------------ ModelStreamInfer


def _open_stream(client, **start):
    """Start a ``tritonclient.grpc`` stream; the queue its (result, error) answers arrive on."""
    import queue

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), **start)
    return answers


def _stream(client, requests, **start):
    """Send ``requests`` ((model, x, request id, parameters) each) over one ``tritonclient.grpc``
    stream without waiting between them; (result, error) per answer, in the order they came."""
    answers = _open_stream(client, **start)
    try:
        for model, x, request_id, params in requests:
            inp = tg.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            client.async_stream_infer(model, [inp], request_id=request_id, parameters=params)
        return [answers.get(timeout=60) for _ in requests]
    finally:
        client.stop_stream()


def _first_stream_answer(client, x, model: str = "digits_memory"):
    """The first (result, error) of a stream that sends one request of ``x`` to ``model`` with no key:
    an error that ends the stream reaches the callback, and may end it before the request is sent."""
    ended = _open_stream(client)
    try:
        inp = tg.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with contextlib.suppress(InferenceServerException):   # the stream may have ended already
            client.async_stream_infer(model, [inp])
        return ended.get(timeout=30)
    finally:
        client.stop_stream()


def test_a_stream_answers_every_request_in_order_with_the_unary_bits(gserver, gclient):
    """Triton's streaming API (start_stream / async_stream_infer: the ModelStreamInfer RPC) against a
    real server: every request answered once, in the order sent; a bad one answered in its place by
    its error while the stream goes on; every output ModelInfer's for the same row (the tiny contract
    model computes in float32, and a streamed row is batched with its neighbours: floats to float32
    precision here; ``test_demo_models`` holds hjmodel's graphs to the bit)."""
    x = _x(40, seed=5)
    bad = {7: ("clf", x[7:8, :-1], "wrong shape"), 8: ("nope", x[8:9], "unknown model"),
           19: ("reg", np.full((1, D), np.nan, np.float32), "NaN")}
    requests = []
    for i in range(40):
        model, row, _ = bad.get(i, ("clf" if i % 3 else "reg", x[i:i + 1], ""))
        params = {"diagnostics": True, "top_k": 2} if i % 2 else ({"tau": 0.3} if model == "reg" else None)
        requests.append((model, row, f"req-{i}", params))
    answers = _stream(gclient, requests)
    assert len(answers) == 40
    for i, ((model, row, request_id, params), (result, error)) in enumerate(zip(requests, answers, strict=True)):
        if i in bad:
            assert result is None and error is not None, i
            continue
        assert error is None, (i, error)
        assert result.get_response().id == request_id and result.get_response().model_name == model
        unary = _grpc_infer(gclient, model, row, **(params or {}))
        names = [o.name for o in unary.get_response().outputs]
        assert names == [o.name for o in result.get_response().outputs]
        for name in names:
            assert_outputs_close(result.as_numpy(name), unary.as_numpy(name), f"{i} {name}")
    assert "must have shape" in str(answers[7][1]) and "unknown model 'nope'" in str(answers[8][1])
    assert "NaN" in str(answers[19][1])
    with gserver.client() as http:
        text = http.get("/metrics").text
    assert 'hjserve_grpc_requests_total{code="OK",method="ModelStreamInfer"}' in text
    assert 'hjserve_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelStreamInfer"}' in text


def test_a_failed_stream_request_names_itself_and_its_error_type(gserver):
    """On the wire (what a client without Triton's library reads): an error answer carries the
    request's id, model and version and its ``error_type``; the stream's own status is OK and its
    trailing metadata holds the stream's x-request-id."""
    def messages():
        for i, model in enumerate(("clf", "nope", "clf")):
            yield _message(model, f"m{i}", seed=i, version="" if i != 2 else "1")

    with grpc.insecure_channel(gserver.grpc_target) as channel:
        call = channel.stream_stream(METHOD + "ModelStreamInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                     response_deserializer=pb.ModelStreamInferResponse.FromString)
        stream = call(messages(), metadata=(("x-request-id", "stream-1"),), timeout=30)
        answers = list(stream)
        assert stream.code() == grpc.StatusCode.OK
        assert ("x-request-id", "stream-1") in stream.trailing_metadata()
    assert [a.error_message == "" for a in answers] == [True, False, True]
    assert [a.infer_response.id for a in answers] == ["m0", "m1", "m2"]
    failed = answers[1].infer_response
    assert failed.model_name == "nope" and failed.parameters["error_type"].string_param == "model_not_found"
    assert "unknown model" in answers[1].error_message and not failed.outputs
    assert answers[2].infer_response.model_version == "1" and answers[2].infer_response.outputs


def test_a_stream_holds_at_most_its_window_in_flight_and_needs_the_key(demo_repository, tmp_path):
    """One stream runs at most STREAM_INFLIGHT of its requests at once: on a server that admits
    exactly that many per model version, 60 requests of 64 rows sent back to back to a memory head
    (~5 ms each: they arrive far faster than they are computed) are all answered -- with a window of
    64 instead, the server read them ahead and refused those from the 17th on as overload (a scratch
    run); where it admits fewer, the
    overflow is answered in its place as ``overloaded`` and the stream goes on. The API key is checked
    when the stream opens."""
    from service.grpc.server import STREAM_INFLIGHT

    rows = np.random.default_rng(9).uniform(0, 16, (60, 64, 64)).astype(np.float32)
    requests = [("digits_memory", rows[i], f"w{i}", None) for i in range(60)]
    for admitted in (STREAM_INFLIGHT, 2):
        with run_server(demo_repository, tmp_path, grpc=True, api_keys="k1", max_queue_size=admitted) as s:
            client = tg.InferenceServerClient(s.grpc_target)
            try:
                keyed = _stream(client, requests, headers={"x-api-key": "k1"})
                refused = [i for i, (_, error) in enumerate(keyed) if error is not None]
                assert all("requests in flight" in str(keyed[i][1]) for i in refused), keyed[refused[0]][1]
                if admitted == STREAM_INFLIGHT:
                    assert not refused, refused
                else:
                    assert refused and len(refused) < len(requests), refused
                assert all(keyed[i][0].get_response().id == f"w{i}" for i in range(60) if i not in refused)
                result, error = _first_stream_answer(client, rows[0][:1])
                assert result is None and "UNAUTHENTICATED" in str(error), error
                if admitted == STREAM_INFLIGHT:
                    _cancel_a_stream(client, s, rows)
            finally:
                client.close()


def _cancel_a_stream(client, server, rows):
    """A stream cancelled by its client after its first answer: the requests it still had running are
    counted CANCELLED (not OK), and the server answers the next request."""
    import time

    answers = _open_stream(client, headers={"x-api-key": "k1"})
    for i in range(30):
        inp = tg.InferInput("input", [64, 64], "FP32")
        inp.set_data_from_numpy(rows[i])
        client.async_stream_infer("digits_memory", [inp], parameters={"diagnostics": True})
    assert answers.get(timeout=60)[1] is None
    client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 30
    while True:
        with server.client() as http:
            text = http.get("/metrics").text
        if metric_value(text, "hjserve_grpc_requests_total", method="ModelStreamInfer", code="CANCELLED") > 0:
            break
        assert time.monotonic() < deadline, "no cancelled stream request was counted"
        time.sleep(0.2)
    inp = tg.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(rows[0][:1])
    assert client.infer("digits_memory", [inp], headers={"x-api-key": "k1"}).as_numpy("prediction").shape == (1,)


def test_a_model_infer_call_without_exactly_its_message_is_refused_or_answered_once(gserver):
    """ModelInfer reads its message itself (GRPCServer._receive): a call that ends with no message
    is INVALID_ARGUMENT, not a hang or INTERNAL; one that sends two is answered once, for the
    first."""
    with grpc.insecure_channel(gserver.grpc_target) as channel:
        infer = channel.stream_unary(METHOD + "ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                     response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as empty:
            infer(iter(()), timeout=30)
        reply = infer(iter([_message("clf", "two0"), _message("clf", "two1", seed=1)]), timeout=30)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT, empty.value
    assert "without its message" in empty.value.details()
    assert reply.id == "two0" and reply.outputs


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_model_infer_message_is_answered_as_the_plain_one(gclient, algorithm):
    """tritonclient's ``compression_algorithm``: the message is read (GRPCServer._receive) after grpc
    has inflated it, and answered exactly as the same message sent plain."""
    x = _x(64, seed=5)
    inp = tg.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    packed = gclient.infer("clf", [inp], compression_algorithm=algorithm)
    plain = gclient.infer("clf", [inp])
    for name in ("prediction", "probabilities", "certified_radius"):
        assert packed.as_numpy(name) is not None and len(packed.as_numpy(name)) == 64, name
        np.testing.assert_array_equal(packed.as_numpy(name), plain.as_numpy(name))


def test_the_empty_final_response_flag_is_answered_not_refused(gserver):
    """Triton's ``triton_enable_empty_final_response`` (perf_analyzer sets it on every gRPC request; it
    was refused as an unknown parameter, so perf_analyzer -i grpc failed): a model here answers a
    request once, so with the flag that one answer says ``triton_final_response: true``; without it,
    nothing is added; a value that is not a boolean is INVALID_ARGUMENT. On a stream, and over REST."""
    def request(flag=None):
        message = pb.ModelInferRequest(model_name="clf", id="f")
        message.inputs.add(name="input", datatype="FP32", shape=[1, D])
        message.raw_input_contents.append(_x(1).tobytes())
        if isinstance(flag, bool):
            message.parameters["triton_enable_empty_final_response"].bool_param = flag
        elif flag is not None:
            message.parameters["triton_enable_empty_final_response"].string_param = flag
        return message

    flagged = _raw_call(gserver.grpc_target, "ModelInfer", request(True), pb.ModelInferResponse)
    assert flagged.parameters["triton_final_response"].bool_param is True and flagged.outputs
    for unflagged in (request(False), request()):
        assert "triton_final_response" not in _raw_call(gserver.grpc_target, "ModelInfer", unflagged,
                                                        pb.ModelInferResponse).parameters
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(gserver.grpc_target, "ModelInfer", request("maybe"), pb.ModelInferResponse)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must be a boolean" in info.value.details()
    with grpc.insecure_channel(gserver.grpc_target) as channel:
        call = channel.stream_stream(METHOD + "ModelStreamInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                     response_deserializer=pb.ModelStreamInferResponse.FromString)
        streamed = list(call(iter([request(True), request(False)]), timeout=30))
    assert [a.infer_response.parameters["triton_final_response"].bool_param
            if "triton_final_response" in a.infer_response.parameters else None for a in streamed] == [True, None]
    body = {"inputs": [{"name": "input", "shape": [1, D], "datatype": "FP32", "data": _x(1).ravel().tolist()}],
            "parameters": {"triton_enable_empty_final_response": True}}
    with gserver.client() as http:
        answer = http.post("/v2/models/clf/infer", json=body)
    assert answer.status_code == 200 and answer.json()["parameters"] == {"triton_final_response": True}


def test_a_grpc_port_in_use_is_refused_not_shared(tiny_repo, tmp_path):
    """grpcio listens with SO_REUSEPORT unless told otherwise: on 19ca7dd a second server given a
    taken gRPC port started, said it was listening, and the kernel shared the port's new connections
    between the two processes (another repository, version or build answering a share of the calls).
    Now the second exits at once, naming the port; the first still serves every call."""
    with run_server(tiny_repo, tmp_path, grpc=True) as first:
        with pytest.raises(RuntimeError, match=rf"cannot listen for gRPC on 127.0.0.1:{first.grpc_port}: .*in use"):
            with run_server(tiny_repo, tmp_path, env={"HJSERVE_GRPC_PORT": str(first.grpc_port)}):
                pass
        client = tg.InferenceServerClient(first.grpc_target)
        assert client.is_server_live()
        client.close()


def test_a_grpc_host_that_is_no_address_here_is_a_message_not_a_traceback(tiny_repo):
    """The same check names a host the gRPC server could not listen on (on 19ca7dd: a traceback from
    the server's startup, exit status 3)."""
    run = subprocess.run([sys.executable, "-m", "service", "--model-repository", str(tiny_repo), "--host", "999.1.1.1",
                          "--port", "0", "--grpc-port", "8001"], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 1 and "hjserve: cannot listen for gRPC on 999.1.1.1:8001" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def _closed_by_peer(sock) -> bool:
    """Whether the server has closed ``sock`` (whatever it sent before: a GOAWAY, SETTINGS)."""
    sock.setblocking(False)
    try:
        while chunk := sock.recv(65536):
            del chunk
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_grpc_connections_are_as_bounded_as_http_ones(tiny_repo, tmp_path):
    """The gRPC port took any number of connections and kept them: a socket that never sent its
    HTTP/2 preface for grpc's 120 s handshake timeout, one that sent it and nothing more until its age
    (10 min) -- ~15 kB each, 5,000 idle sockets +70-90 MiB, bounded only by the file limit, which REST
    shares. Now, as REST's: at most ``max_connections`` (the ones past it closed at once), a
    connection without its preface after ``header_timeout_s`` is closed, and so is an idle one that
    answers no ping for ``send_timeout_s``. A real client idle for several ping intervals keeps its
    connection (it answers the pings) and is served."""
    import socket

    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"   # + empty SETTINGS
    with run_server(tiny_repo, tmp_path, grpc=True, max_connections=20, header_timeout_s=1,
                    send_timeout_s=2) as s, grpc.insecure_channel(s.grpc_target) as channel:
        live = channel.unary_unary(METHOD + "ServerLive", request_serializer=pb.ServerLiveRequest.SerializeToString,
                                   response_deserializer=pb.ServerLiveResponse.FromString)
        assert live(pb.ServerLiveRequest(), timeout=10).live   # one connection of the 20: a real client's
        states = []
        channel.subscribe(states.append)
        silent = [socket.create_connection(("127.0.0.1", s.grpc_port)) for _ in range(15)]
        greeted = [socket.create_connection(("127.0.0.1", s.grpc_port)) for _ in range(15)]
        for sock in greeted:
            sock.sendall(preface)
        try:
            time.sleep(0.5)
            # past max_connections: 31 connections for 20 places, so 11 closed (the latest to come)
            assert sum(map(_closed_by_peer, silent + greeted)) == 11
            time.sleep(2.5)   # past header_timeout_s: every silent socket closed
            assert all(map(_closed_by_peer, silent))
            deadline = time.monotonic() + 6   # a ping every second, 1 s to answer it
            while not all(map(_closed_by_peer, greeted)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert all(map(_closed_by_peer, greeted))
        finally:
            for sock in silent + greeted:
                sock.close()
        assert live(pb.ServerLiveRequest(), timeout=10).live   # the real client: served,
        assert grpc.ChannelConnectivity.IDLE not in states[1:], states   # on the connection it had


def test_an_answer_larger_than_the_grpc_message_limit_is_refused_as_such(tiny_repo, tmp_path):
    """An answer past ``grpc_max_message_bytes`` (a request within it, asking for every output of many
    rows) used to be computed, counted and logged OK, then failed by grpc on its way out: the client
    got RESOURCE_EXHAUSTED "Sent message larger than max" with no error type, a stream ended there,
    and the server's log said the client had cancelled. Now it is refused as the answer too large
    (RESOURCE_EXHAUSTED, ``payload_too_large``), counted so, and a stream answers it in its place and
    goes on."""
    limit = 8192
    big = pb.ModelInferRequest(model_name="clf", id="big")
    big.inputs.add(name="input", datatype="FP32", shape=[300, D])
    big.raw_input_contents.append(_x(300).tobytes())
    big.parameters["diagnostics"].bool_param = True
    assert big.ByteSize() < limit
    with run_server(tiny_repo, tmp_path, grpc=True, grpc_max_message_bytes=limit, log_level="info") as s, \
            grpc.insecure_channel(s.grpc_target) as channel:
        infer = channel.unary_unary(METHOD + "ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as refused:
            infer(big, timeout=30)
        stream = channel.stream_stream(METHOD + "ModelStreamInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        answers = list(stream(iter([big, _message("clf", "small")]), timeout=30))
        with s.client() as c:
            metrics = c.get("/metrics").text
        log = s.log.read_text()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "grpc_max_message_bytes" in refused.value.details(), refused.value.details()
    assert dict(refused.value.trailing_metadata())["error-type"] == "payload_too_large"
    assert [a.infer_response.id for a in answers] == ["big", "small"]
    assert "grpc_max_message_bytes" in answers[0].error_message and not answers[1].error_message
    assert answers[0].infer_response.parameters["error_type"].string_param == "payload_too_large"
    assert metric_value(metrics, "hjserve_grpc_requests_total", method="ModelInfer", code="RESOURCE_EXHAUSTED") == 1
    assert metric_value(metrics, "hjserve_grpc_requests_total", method="ModelInfer", code="OK") == 0
    assert "the call ended before its answer was sent" not in log
