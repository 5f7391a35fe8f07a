"""The memory inference bodies take while read and decoded has one bound for all requests
(``max_request_memory_bytes``), on REST V2 / V1, the JSON batch body and gRPC.

Before it, nothing bounded it but ``max_body_bytes`` per request: the JSON parser takes up to ~31x
a body's size (deeply nested lists: ~50x as resident memory; a 64 MiB body of them ~3 GB), so one legal request could take the
shipped Kubernetes pod (2 GiB) past its memory limit, and a few concurrent ones any machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from svc_helpers import memory_mib, metric_value, run_server
from tiny_model import D

from service.codecs import PARSE_BYTES_PER_BYTE, parse_json
from service.errors import InvalidJSON

MB = 1_000_000
ROOT = Path(__file__).resolve().parents[2]
INFER = "/v2/models/clf/versions/1/infer"


def _json_body(rows: int) -> dict:
    return {"inputs": [{"name": "input", "shape": [rows, D], "datatype": "FP32",
                        "data": np.random.default_rng(0).standard_normal(rows * D).round(4).tolist()}]}


#: Run in a fresh process: for each hostile unit (a JSON line on stdin), the memory parse_json takes
#: beyond what the process held before, as the kernel counts it (the peak resident set, reset between
#: units through ``/proc/self/clear_refs``), not tracemalloc's count, which sees Python's allocator
#: only -- orjson parses through a document of its own, allocated by Rust's.
_PARSE_MEMORY = r"""
import gc, json, sys
from service.codecs import parse_json

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

size = int(sys.argv[1])
for line in sys.stdin:
    unit = json.loads(line).encode("latin-1")
    body = (b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":['
            + (unit + b",") * (size // (len(unit) + 1)) + unit + b"]}]}")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")        # the peak resident set starts again from the current one
    before = kib("VmRSS")
    try:
        parsed = parse_json(body)
    except Exception:
        pass
    print(1024 * (kib("VmHWM") - before) / len(body), flush=True)
    parsed = body = None
"""

#: Hostile shapes: many small containers, nesting (the deepest both parsers take), short values.
HOSTILE = [b"[[]]", b"{}", b'"a"', b"1", b"-1e-05", b"[[[]]]", b"true", b"[{}]", b'{"":[[]]}', b"[" * 10 + b"]" * 10,
           b"[" * 500 + b"]" * 500, b"[" * 1000 + b"]" * 1000, b"[" * 5000 + b"]" * 5000]


@pytest.fixture(scope="module")
def parse_factors() -> dict[bytes, float]:
    """Memory beyond the body per body byte, for each of :data:`HOSTILE` (a body of 8 MB each)."""
    import json

    out = subprocess.run([sys.executable, "-c", _PARSE_MEMORY, str(8 * 2**20)], capture_output=True, text=True,
                         input="".join(json.dumps(u.decode("latin-1")) + "\n" for u in HOSTILE), timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(zip(HOSTILE, map(float, out.stdout.split()), strict=True))


@pytest.mark.parametrize("unit", HOSTILE, ids=lambda u: u[:12].decode() + (f"..x{len(u)}" if len(u) > 12 else ""))
def test_the_parser_stays_within_its_memory_factor(parse_factors, unit):
    """The factor the budget charges is the parser's worst case, hostile shapes measured as the
    kernel counts them (the body itself is the factor's first 1x). With tracemalloc's count the
    deepest nesting read ~46x; as resident memory it takes ~49x beyond the body, which the factor of
    48 did not cover (on c33ded5 too, before orjson parsed first)."""
    assert parse_factors[unit] + 1 <= PARSE_BYTES_PER_BYTE, (unit[:20], parse_factors[unit])


def test_deep_nesting_is_refused_within_the_factor():
    body = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(InvalidJSON):
        parse_json(body)


def _memory(server) -> float:
    with server.client() as c:
        text = c.get("/metrics").text
    (value,) = [float(line.split()[1]) for line in text.splitlines()
                if line.startswith("hjserve_request_memory_bytes ")]
    return value


def test_a_body_too_large_to_decode_is_413_on_every_route(tiny_repo, tmp_path):
    """max_request_memory_bytes 8 MB: a 300 kB JSON body would take ~9.6 MB to parse (413, naming
    the setting), the same rows in binary ~0.5 MB (200)."""
    import tritonclient.http as httpclient

    x = np.random.default_rng(0).standard_normal((10_000, D)).astype(np.float32)
    body = _json_body(10_000)
    with run_server(tiny_repo, tmp_path, max_request_memory_bytes=8 * MB) as s, s.client() as c:
        json_v2 = c.post(INFER, json=body)
        v1 = c.post("/v1/models/clf:predict", json={"instances": x.tolist()})
        batch = c.post("/v2/models/clf/versions/1/batch-attribution", json={"instances": x.tolist()})
        client = httpclient.InferenceServerClient(s.host_port)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        binary = client.infer("clf", [tensor], model_version="1")
        client.close()
        after = _memory(s)
    for r in (json_v2, v1, batch):
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large", (r.request.url, r.text)
        assert "HJSERVE_MAX_REQUEST_MEMORY_BYTES" in r.json()["error"]
    assert binary.as_numpy("prediction").shape == (10_000,)
    assert after == 0


def test_concurrent_bodies_share_one_memory_budget(tiny_repo, tmp_path):
    """A body arriving slowly holds twice what has arrived: another request that would take the
    total past the limit gets 503 request_memory_full + Retry-After (not read further), and is
    served once the first is answered."""
    with run_server(tiny_repo, tmp_path, max_request_memory_bytes=8 * MB, retry_after_s=2) as s, s.client() as c:
        host, port = s.host_port.split(":")
        held = socket.create_connection((host, int(port)), timeout=60)
        held.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {3 * MB + 10}\r\n\r\n".encode())
        held.sendall(b" " * 3 * MB)                # 3 MB of leading whitespace: 6 MB held
        deadline = time.monotonic() + 20
        while _memory(s) < 6 * MB:
            assert time.monotonic() < deadline, _memory(s)
            time.sleep(0.05)
        refused = c.post(INFER, json=_json_body(2000))         # ~70 kB body: ~3.4 MB more
        held.sendall(b"{" + b" " * 9)    # finish: 3 MB of JSON to parse would take 144 MB -> 413
        head = b""
        while b"\r\n" not in head:
            head += held.recv(4096)
        held.close()
        deadline = time.monotonic() + 20
        while _memory(s) != 0:
            assert time.monotonic() < deadline, _memory(s)
            time.sleep(0.05)
        served = c.post(INFER, json=_json_body(100))
    assert refused.status_code == 503 and refused.json()["error_type"] == "request_memory_full", refused.text
    assert refused.headers["retry-after"] == "2"
    assert int(head.split()[1]) == 413
    assert served.status_code == 200


def test_grpc_messages_count_against_the_budget(tiny_repo, tmp_path):
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(0).standard_normal((300_000, D)).astype(np.float32)   # 4.8 MB raw
    with run_server(tiny_repo, tmp_path, grpc=True, max_request_memory_bytes=8 * MB) as s:
        client = grpcclient.InferenceServerClient(s.grpc_target)
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with pytest.raises(grpcclient.InferenceServerException) as refused:
            client.infer("clf", [tensor], model_version="1")
        small = grpcclient.InferInput("input", [100, D], "FP32")
        small.set_data_from_numpy(x[:100])
        served = client.infer("clf", [small], model_version="1")
        client.close()
        after = _memory(s)
    assert refused.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "HJSERVE_MAX_REQUEST_MEMORY_BYTES" in refused.value.message()
    assert served.as_numpy("prediction").shape == (100,)
    assert after == 0


def test_grpc_answers_count_against_the_budget_until_sent(tiny_repo, tmp_path):
    """A gRPC answer takes the budget too, until grpc has sent it (as REST's: test_slow_readers.py):
    a call whose request fits but whose answer does not is refused (it was answered, whatever the
    answer held), and a sent answer gives its bytes back."""
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(0).standard_normal((40_000, D)).astype(np.float32)   # 0.64 MB raw in
    with run_server(tiny_repo, tmp_path, grpc=True, max_request_memory_bytes=3 * MB) as s:
        client = grpcclient.InferenceServerClient(s.grpc_target)
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        every = [grpcclient.InferRequestedOutput(n) for n in EVERY]
        with pytest.raises(grpcclient.InferenceServerException) as refused:
            client.infer("clf", [tensor], model_version="1", outputs=every)   # ~1.9 MB of raw outputs
        served = client.infer("clf", [tensor], model_version="1")              # the default outputs fit
        client.close()
        after = _memory(s)
    assert refused.value.status() in (str(grpc.StatusCode.RESOURCE_EXHAUSTED), str(grpc.StatusCode.UNAVAILABLE))
    assert "HJSERVE_MAX_REQUEST_MEMORY_BYTES" in refused.value.message()
    assert served.as_numpy("prediction").shape == (40_000,)
    assert after == 0


def test_a_grpc_answer_its_client_refuses_gives_its_bytes_back(tiny_repo, tmp_path):
    """A call that ends while its answer is on its way (here the client's channel takes messages of
    at most 100 KB: it refuses the ~1.9 MB answer and resets the call) still runs the callback that
    gives the answer's bytes back: the budget returns to 0, and the next call is answered."""
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(2).standard_normal((40_000, D)).astype(np.float32)
    every = EVERY
    with run_server(tiny_repo, tmp_path, grpc=True, max_request_memory_bytes=8 * MB) as s:
        small = grpcclient.InferenceServerClient(s.grpc_target, channel_args=[("grpc.max_receive_message_length", 100_000)])
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        for _ in range(3):          # three times the budget, if the holds were never given back
            with pytest.raises(grpcclient.InferenceServerException) as refused:
                small.infer("clf", [tensor], model_version="1", outputs=[grpcclient.InferRequestedOutput(n) for n in every])
            assert refused.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED), refused.value
            assert "larger than max" in refused.value.message(), refused.value.message()
        small.close()
        deadline = time.monotonic() + 10
        while (held := _memory(s)) != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        client = grpcclient.InferenceServerClient(s.grpc_target)
        served = client.infer("clf", [tensor], model_version="1", outputs=[grpcclient.InferRequestedOutput(n) for n in every])
        client.close()
    assert held == 0
    assert served.as_numpy("saliency").shape == x.shape


#: the outputs beyond the defaults: an answer ~12 times its input on the tiny model
EVERY = ("saliency", "label_sensitivity", "probabilities")


def _raw_message(x: np.ndarray, outputs=(), id: str = ""):
    """A ModelInfer message of ``x`` for ``clf`` version 1 as raw contents, asking for ``outputs``."""
    from service.grpc import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name="clf", model_version="1", id=id)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _refused_message(seed: int):
    """A ModelInfer message of ~30 MB that the model refuses (D + 1 columns): it costs its reception
    and decoding, not a computation."""
    return _raw_message(np.random.default_rng(seed).standard_normal((30 * MB // (4 * (D + 1)), D + 1)).astype(np.float32))


def _model_infer(channel: grpc.Channel):
    """The plain unary ModelInfer callable of ``channel`` (no client library between)."""
    from service.grpc import inference_pb2 as pb

    return channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)


def _model_stream_infer(channel: grpc.Channel):
    """The plain ModelStreamInfer callable of ``channel``: messages in, stream answers out."""
    from service.grpc import inference_pb2 as pb

    return channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                 request_serializer=pb.ModelInferRequest.SerializeToString,
                                 response_deserializer=pb.ModelStreamInferResponse.FromString)


def test_grpc_messages_are_received_only_into_room_in_the_budget(tiny_repo, tmp_path):
    """A gRPC message is read only when what it may take (twice ``grpc_max_message_bytes``, or the
    whole budget if that is less) fits the request-memory budget; until then HTTP/2 flow control
    keeps it at the client. Before, grpc read every call's message whole before any handler saw it:
    a second after 12 calls of 30 MB were sent at once the server's peak was ~935 MiB above its
    resident size against a budget of 100 MB (up to 1024 such calls: ``max_connections``), and it
    refused most of them once it had them. Now each is read in turn (room for one message at a
    time): all 12 get their own answer (a shape the model refuses, so that the test measures
    reception, not compute), none the 503 of a full budget."""
    import threading


    request = _refused_message(seed=3)
    codes: list[str] = []
    with run_server(tiny_repo, tmp_path, grpc=True, max_request_memory_bytes=100 * MB,
                    grpc_max_message_bytes=32 * 2**20) as s:
        with grpc.insecure_channel(s.grpc_target, options=[("grpc.max_send_message_length", 64 * MB),
                                                            ("grpc.max_receive_message_length", 64 * MB)]) as channel:
            infer = _model_infer(channel)
            with pytest.raises(grpc.RpcError) as warm:             # the resident size of one call
                infer(request, timeout=60)
            assert warm.value.code() == grpc.StatusCode.INVALID_ARGUMENT, warm.value
            before, _ = _peak_mb(s.proc.pid)
            Path(f"/proc/{s.proc.pid}/clear_refs").write_text("5")   # the peak starts again from here

            def one() -> None:
                try:
                    infer(request, timeout=240)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)

            threads = [threading.Thread(target=one) for _ in range(12)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)         # loopback carries 12 x 30 MB well within it (~0.5 s before)
            _, peak = _peak_mb(s.proc.pid)
            for thread in threads:
                thread.join()
        after = _memory(s)
    assert peak - before < 250, (before, peak)
    assert codes == ["INVALID_ARGUMENT"] * 12, codes
    assert after == 0


def test_a_grpc_call_that_never_sends_its_message_gives_its_room_back(tiny_repo, tmp_path):
    """A ModelInfer call that opens and sends nothing holds its reservation for ``body_timeout_s``,
    then ends DEADLINE_EXCEEDED (``body_timeout``) and gives it back. Meanwhile REST is not refused
    for it: a reservation is a bound, and bodies and answers are checked against what is held. A
    budget that admits fewer than 4 such reservations is a warning at startup."""
    import queue

    from service.grpc import inference_pb2 as pb

    with run_server(tiny_repo, tmp_path, grpc=True, max_request_memory_bytes=3 * MB, body_timeout_s=2) as s:
        with grpc.insecure_channel(s.grpc_target) as channel:
            infer = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer",
                                         request_serializer=pb.ModelInferRequest.SerializeToString,
                                         response_deserializer=pb.ModelInferResponse.FromString)
            never: queue.Queue = queue.Queue()
            silent = infer.future(iter(never.get, None), timeout=30)   # headers only, no message
            deadline = time.monotonic() + 10
            while (reserved := _memory(s)) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            with s.client() as c:
                rest = c.post(INFER, json=_json_body(100))
            with pytest.raises(grpc.RpcError) as ended:
                silent.result(timeout=20)
            never.put(None)
        after = _memory(s)
    log = s.log.read_text()
    assert reserved == 3 * MB                    # the whole budget: it is less than 2 x 64 MiB
    assert "only 1 receive at once" in log, log  # and the operator is told so at startup
    assert rest.status_code == 200, rest.text
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ended.value
    assert "HJSERVE_BODY_TIMEOUT_S" in ended.value.details()
    assert after == 0


def test_a_refused_grpc_message_is_freed_when_its_call_ends(tiny_repo, tmp_path):
    """A call refused after its message was read leaves nothing behind: 12 such calls of 30 MB, one
    after another, and the server's resident size stays where it was. Before, two reference cycles
    kept each until Python's cyclic collector happened to run: grpc keeps the AbortError of
    ``context.abort`` on the call, and its traceback holds the handler's frame, which holds the call
    (~30 MB a call on 8f0594c: +410 MB after 12, one collection included); and grpc's request
    iterator, an async generator in a cycle with its owner, kept the message it was suspended on
    (another ~30 MB a call)."""

    request = _refused_message(seed=4)
    codes = []
    with run_server(tiny_repo, tmp_path, grpc=True, grpc_max_message_bytes=32 * 2**20,
                    env={"MALLOC_MMAP_THRESHOLD_": str(2**20)}) as s:   # a freed buffer leaves the process
        with grpc.insecure_channel(s.grpc_target, options=[("grpc.max_send_message_length", 64 * MB)]) as channel:
            infer = _model_infer(channel)
            for i in range(13):
                with pytest.raises(grpc.RpcError) as refused:
                    infer(request, timeout=60)
                codes.append(refused.value.code())
                if i == 0:                                     # the first call: the resident size of one
                    before, _ = _peak_mb(s.proc.pid)
            after, _ = _peak_mb(s.proc.pid)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 13
    assert after - before < 120, (before, after)


def test_grpc_decode_memory_counts_every_kind_of_content():
    """Counted from the fields' lengths (no serialisation): raw tensors twice, typed values 16 bytes
    each (the field's type and the datatype's), BYTES values twice."""
    from service.codecs.grpc import decode_memory
    from service.grpc import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name="clf")
    request.raw_input_contents.append(b"\0" * 1000)
    typed = request.inputs.add(name="a", datatype="FP32", shape=[250])
    typed.contents.fp32_contents.extend([0.5] * 250)
    ints = request.inputs.add(name="b", datatype="INT64", shape=[10])
    ints.contents.int64_contents.extend(range(10))
    strings = request.inputs.add(name="c", datatype="BYTES", shape=[2])
    strings.contents.bytes_contents.extend([b"abc", b"de"])
    assert decode_memory(request) == 2 * 1000 + 16 * 260 + 2 * 5


def _peak_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    values = memory_mib(pid)
    return values["VmRSS"], values["VmHWM"]


def test_ndjson_lines_are_never_held_as_parsed_json(tiny_repo, tmp_path):
    """Each NDJSON line becomes its row of numbers as it is read: 40 lines of ~1 MB of nested empty
    lists (within max_line_bytes, one width) are refused at the first, never held parsed together.
    On 5e8e564 a chunk's lines were held as Python lists until the chunk was full -- ~40 MB of
    objects per such line, some 1.7 GB here, and up to a chunk (256+ lines) of them per job."""
    line = b"[" + b",".join([b"[[[]]]"] * 140_000) + b"]\n"     # ~0.98 MB
    with run_server(tiny_repo, tmp_path) as s, s.client() as c:
        c.post(INFER, json=_json_body(1))                       # warm up
        before, _ = _peak_mb(s.proc.pid)
        r = c.post("/v2/models/clf/versions/1/batch-attribution", content=line * 40,
                   headers={"content-type": "application/x-ndjson"})
        _, peak = _peak_mb(s.proc.pid)
    assert r.status_code == 400 and r.json()["error_type"] == "invalid_shape", r.text
    assert "NDJSON line 1" in r.json()["error"]
    assert peak - before < 300, (before, peak)


def _stream_requests(x, count: int):
    """``count`` ModelInfer messages of ``x`` asking for every output (as raw contents)."""
    for i in range(count):
        yield _raw_message(x, EVERY, id=f"s{i}")


def _computed(server) -> float:
    """Stream requests the server has answered (computed and counted, written or not)."""
    with server.client() as c:
        return metric_value(c.get("/metrics").text, "hjserve_grpc_requests_total", method="ModelStreamInfer")


def test_grpc_stream_answers_count_against_the_budget_until_written(tiny_repo, tmp_path):
    """A ``ModelStreamInfer`` answer holds the budget from when it is computed until the stream has
    written it: a stream whose client stops reading keeps its answers (up to its window of them) in
    the server, and the other clients see them. Before, each answer left the budget when it was
    computed, so while 16 answers of ~1.9 MB waited for a client that read none of them the gauge
    said 0. Read at last, every message is answered and the budget is 0; a stream cancelled with its
    answers unread gives them back too."""

    x = np.random.default_rng(1).standard_normal((40_000, D)).astype(np.float32)
    # messages of at most 2 MiB: the stream reads its next message into 4 MiB of room beside the
    # answers it holds (with the default 64 MiB, that room would be the whole budget)
    with run_server(tiny_repo, tmp_path, grpc=True, max_request_memory_bytes=64 * MB,
                    grpc_max_message_bytes=2 * 2**20) as s:
        with grpc.insecure_channel(s.grpc_target) as channel:
            call = _model_stream_infer(channel)
            stream = call(_stream_requests(x, 16), timeout=120)       # nothing read yet
            deadline = time.monotonic() + 60
            while _computed(s) < 16:                                  # all 16 answered, none read
                assert time.monotonic() < deadline, f"{_computed(s)} of 16 stream requests computed"
                time.sleep(0.2)
            held = _memory(s)
            answers = list(stream)
            after = _memory(s)
            cancelled = call(_stream_requests(x, 16), timeout=120)    # again, then cancelled unread
            while _computed(s) < 32:
                assert time.monotonic() < deadline + 60, f"{_computed(s)} of 32 stream requests computed"
                time.sleep(0.2)
            cancelled.cancel()
            deadline = time.monotonic() + 10
            while (left := _memory(s)) != 0 and time.monotonic() < deadline:
                time.sleep(0.1)
    assert held >= 5 * MB, f"the unread stream's answers were not counted (gauge {held:.0f} bytes)"
    assert len(answers) == 16 and all(a.error_message == "" for a in answers), [a.error_message for a in answers]
    assert after == 0
    assert left == 0, f"a cancelled stream's computed answers stayed in the budget ({left:.0f} bytes)"


def test_a_grpc_call_waits_for_room_then_is_answered_or_refused(tiny_repo, tmp_path):
    """A ModelInfer call whose reception does not fit beside what the budget holds waits for room:
    up to ``body_timeout_s``, then it is refused UNAVAILABLE (``request_memory_full``, with a
    retry-after trailer); when room comes back in time, it is answered. What holds the budget here is
    a stream whose client reads none of its 11 answers (~1.9 MB each) in a 24 MB budget, beside a
    reservation of 4 MiB (twice a 2 MiB message limit)."""
    import threading


    x = np.random.default_rng(5).standard_normal((40_000, D)).astype(np.float32)
    small = _raw_message(x[:1])
    with run_server(tiny_repo, tmp_path, grpc=True, max_request_memory_bytes=24 * MB,
                    grpc_max_message_bytes=2 * 2**20, body_timeout_s=1.5) as s:
        # the client's window stays 64 KiB (no BDP probe): the unread answers stay in the server
        with grpc.insecure_channel(s.grpc_target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
            streams = _model_stream_infer(channel)
            infer = _model_infer(channel)
            full = streams(_stream_requests(x, 11), timeout=120)           # nothing read yet
            deadline = time.monotonic() + 60
            while _computed(s) < 11:
                assert time.monotonic() < deadline, f"{_computed(s)} of 11 stream requests computed"
                time.sleep(0.2)
            held = _memory(s)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                infer.with_call(small, timeout=30)
            waited = time.monotonic() - start
            answered: list = []
            later = threading.Thread(target=lambda: answered.append(infer(small, timeout=30)))
            later.start()
            time.sleep(0.5)                       # the call waits; reading the stream makes room
            first = [a.error_message for a in full]
            later.join(timeout=30)
        after = _memory(s)
    assert held + 2 * 2 * 2**20 > 24 * MB, f"the stream held {held} bytes: the test needs more"
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "HJSERVE_MAX_REQUEST_MEMORY_BYTES" in refused.value.details(), refused.value.details()
    trailing = dict(refused.value.trailing_metadata())
    assert trailing["error-type"] == "request_memory_full" and "retry-after" in trailing, trailing
    assert 1.5 <= waited < 10, waited
    assert first == [""] * 11, first
    assert len(answered) == 1 and list(answered[0].outputs[0].shape) == [1], answered
    assert after == 0


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _grpc_call_bytes(request) -> bytes:
    """A whole unary gRPC call as an HTTP/2 client with prior knowledge sends it: the preface, empty
    SETTINGS, one HEADERS frame (HPACK literals, no Huffman) and one DATA frame that ends the
    stream. Written by hand so that the client can then read nothing at all -- no window update,
    no ping or SETTINGS acknowledgement -- as a client that hangs or stops reading its socket."""
    headers = b"".join(b"\x00" + bytes([len(k)]) + k + bytes([len(v)]) + v for k, v in (
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
        (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers")))
    message = request.SerializeToString()
    data = b"\x00" + len(message).to_bytes(4, "big") + message
    frames = [data[i:i + 16_384] for i in range(0, len(data), 16_384)]   # HTTP/2's default frame size
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0, b"") + _h2_frame(1, 0x4, 1, headers)
            + b"".join(_h2_frame(0, int(i == len(frames) - 1), 1, f) for i, f in enumerate(frames)))


def test_a_grpc_client_that_reads_nothing_loses_its_connection_and_its_answer(tiny_repo, tmp_path):
    """The gRPC side of ``send_timeout_s``: an answer its client does not read is counted against the
    budget while it waits, and a client that reads nothing from its connection (here a raw HTTP/2
    client that sends one call whose answer, ~140 KB, is larger than the 64 KiB its window lets the
    server send, then never reads) has its connection closed: the server pings it every
    ``send_timeout_s / 2`` and closes it when the ping is not answered in as long, which frees the
    answer. Before, it stayed held until the connection's age ran out (10 minutes by default). A
    client that reads its connection keeps it while idle for longer than that: a stream opened
    before, idle all along, still answers."""
    import queue

    import tritonclient.grpc as grpcclient


    x = np.random.default_rng(6).standard_normal((3_000, D)).astype(np.float32)   # 48 KB in
    request = _raw_message(x, EVERY)
    with run_server(tiny_repo, tmp_path, grpc=True, send_timeout_s=2) as s:
        client = grpcclient.InferenceServerClient(s.grpc_target)   # a live client, idle meanwhile
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        host, port = s.grpc_target.rsplit(":", 1)
        idle = 2 * 64 * 2**20      # the open stream's room for its next message (twice the largest)
        deadline = time.monotonic() + 10
        while _memory(s) != idle and time.monotonic() < deadline:
            time.sleep(0.05)
        silent = socket.create_connection((host, int(port)), timeout=10)
        try:
            silent.sendall(_grpc_call_bytes(request))
            while (held := _memory(s) - idle) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            start = time.monotonic()
            while (left := _memory(s) - idle) != 0 and time.monotonic() < start + 10:
                time.sleep(0.2)
            freed_after = time.monotonic() - start
        finally:
            silent.close()
        tensor = grpcclient.InferInput("input", [1, D], "FP32")
        tensor.set_data_from_numpy(x[:1])
        client.async_stream_infer("clf", [tensor], model_version="1")   # on the stream opened before
        served, error = answers.get(timeout=30)
        client.stop_stream()
        client.close()
    assert held > 65_536, f"the unread answer was not held ({held} bytes)"
    assert left == 0, f"the answer of a client that reads nothing stayed held ({left} bytes)"
    assert freed_after < 6, freed_after
    assert error is None, error
    assert served.as_numpy("prediction").shape == (1,)


def test_grpc_stream_messages_are_received_only_into_room_in_the_budget(tiny_repo, tmp_path):
    """A ``ModelStreamInfer`` stream reads its next message only into room reserved in the budget, as
    ModelInfer does. Before, each open stream had a read waiting, into which grpc took its next
    message whole, outside any budget: 16 streams sending a 30 MB message each at once took the
    server ~400 MiB above its resident size against a budget of 100 MB (30 streams: +830 MiB; up to
    ``max_connections`` of them), and the shipped pod's 2 GiB falls to ~100 such streams. Now they are
    read in turn, and every one is answered (the shape the model refuses), none refused for room.
    (A first version kept each stream's last message in its reader while that waited for the
    next, ~+650 MiB over the same 30 streams: nothing of a message may stay there.)"""
    import threading


    request = _refused_message(seed=7)
    errors: list[str] = []
    with run_server(tiny_repo, tmp_path, grpc=True, max_request_memory_bytes=100 * MB,
                    grpc_max_message_bytes=32 * 2**20) as s:
        with grpc.insecure_channel(s.grpc_target, options=[("grpc.max_send_message_length", 64 * MB)]) as channel:
            streams = _model_stream_infer(channel)
            assert len(list(streams(iter([request]), timeout=60))) == 1     # the resident size of one
            before, _ = _peak_mb(s.proc.pid)
            Path(f"/proc/{s.proc.pid}/clear_refs").write_text("5")

            def one() -> None:
                errors.extend(a.error_message for a in streams(iter([request]), timeout=240))

            threads = [threading.Thread(target=one) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            _, peak = _peak_mb(s.proc.pid)                     # the high-water mark of them all
        after = _memory(s)
    assert peak - before < 250, (before, peak)
    assert len(errors) == 16 and all("must have shape" in e for e in errors), errors
    assert after == 0


def test_an_idle_stream_keeps_its_room_until_another_call_waits_for_it(tiny_repo, tmp_path):
    """A stream waiting for its next message holds room for it (it cannot know when it comes). With
    nobody else waiting for room it may wait as long as it likes: a message sent after more than
    ``body_timeout_s`` of silence is answered. Once another call waits for room, a stream silent for
    ``body_timeout_s`` is ended (DEADLINE_EXCEEDED, ``body_timeout``) and gives its room back: the
    waiting call is answered (here the budget holds one reception: a unary call waits for it)."""
    import queue

    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(8).standard_normal((1, D)).astype(np.float32)
    tensor = grpcclient.InferInput("input", [1, D], "FP32")
    tensor.set_data_from_numpy(x)
    with run_server(tiny_repo, tmp_path, grpc=True, max_request_memory_bytes=3 * MB, body_timeout_s=1.5) as s:
        streaming = grpcclient.InferenceServerClient(s.grpc_target)
        answers: queue.Queue = queue.Queue()
        streaming.start_stream(callback=lambda result, error: answers.put((result, error)))
        streaming.async_stream_infer("clf", [tensor], model_version="1")
        first = answers.get(timeout=30)
        time.sleep(2.5)                             # silent beyond body_timeout_s, nobody waiting
        streaming.async_stream_infer("clf", [tensor], model_version="1")
        second = answers.get(timeout=30)
        unary = grpcclient.InferenceServerClient(s.grpc_target)
        start = time.monotonic()
        served = unary.infer("clf", [tensor], model_version="1")    # waits for the stream's room
        waited = time.monotonic() - start
        ended = answers.get(timeout=30)
        unary.close()
        streaming.stop_stream()
        streaming.close()
        after = _memory(s)
    assert first[1] is None and second[1] is None, (first, second)
    assert served.as_numpy("prediction").shape == (1,)
    assert waited < 10, waited
    assert ended[0] is None and "DEADLINE_EXCEEDED" in str(ended[1]), ended
    assert "HJSERVE_BODY_TIMEOUT_S" in str(ended[1]), ended
    assert after == 0


def test_streams_cancelled_as_their_answers_come_give_every_answers_room_back(tiny_repo, tmp_path):
    """A stream cancelled (its deadline, or the client) just as a request's answer was computed, but
    before the stream took it to write: that answer's room in the budget used to stay taken for the
    server's life -- a few kB per such race, ~5 kB in 6 s of such streams, until the budget was full
    and every call was refused. Four clients open streams with short deadlines for a few seconds
    (answers of every output, a few kB each); afterwards the budget holds nothing."""
    import threading

    x = np.random.default_rng(5).standard_normal((4, D)).astype(np.float32)
    stop, outcomes = threading.Event(), []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(server.grpc_target) as channel:
            stream = _model_stream_infer(channel)
            while not stop.is_set():
                calls = stream(_stream_requests(x, int(rng.integers(1, 20))), timeout=float(rng.choice([0.005, 0.02, 0.05])))
                try:
                    for _ in calls:
                        pass
                    outcomes.append("OK")
                except grpc.RpcError as exc:
                    outcomes.append(exc.code().name)

    with run_server(tiny_repo, tmp_path, grpc=True) as server:
        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(6)
        stop.set()
        for thread in threads:
            thread.join(30)
        time.sleep(1)   # the last cancelled streams finish
        assert outcomes.count("DEADLINE_EXCEEDED") > 50, outcomes[-5:]   # the streams were cut as they ran
        assert _memory(server) == 0
