"""OpenTelemetry tracing (optional extra), with the SDK's in-memory exporter: a server span per
request continuing the caller's trace, children decode / queue / compute / encode, the trace id in
the response header and in the access log; nothing at all when tracing is off."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from fakes import D

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from service import tracing  # noqa: E402

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def traced():
    """The global tracer provider is set once per process (OpenTelemetry's rule); this test module
    installs its in-memory one and switches hjserve's tracing on around each test."""
    trace.set_tracer_provider(_PROVIDER)
    tracing.configure("on")
    _EXPORTER.clear()
    try:
        yield _EXPORTER
    finally:
        tracing.configure("off")


def _body(n=2):
    x = np.random.default_rng(0).normal(size=(n, D)).round(3).tolist()
    return {"inputs": [{"name": "input", "shape": [n, D], "datatype": "FP64", "data": x}]}


def test_an_http_request_is_one_trace_with_its_phases(traced, client, caplog):
    headers = {"traceparent": f"00-{CALLER_TRACE}-00f067aa0ba902b7-01", "x-request-id": "req-9"}
    with caplog.at_level(logging.INFO, logger="hjserve.access"):
        r = client.post("/v2/models/fclf/infer", json=_body(), headers=headers)
    assert r.status_code == 200 and r.headers["x-trace-id"] == CALLER_TRACE
    finished = traced.get_finished_spans()
    spans = {s.name: s for s in finished}
    by_id = {s.context.span_id: s for s in finished}
    root = spans["HTTP POST /v2/models/{model_name}/infer"]

    def under_root(span) -> bool:   # FastAPI's own spans (fastapi.endpoint) may sit in between
        while span.parent is not None:
            if span.parent.span_id == root.context.span_id:
                return True
            span = by_id.get(span.parent.span_id)
            if span is None:
                return False
        return False

    assert root.kind == trace.SpanKind.SERVER and format(root.context.trace_id, "032x") == CALLER_TRACE
    assert root.attributes["http.response.status_code"] == 200 and root.attributes["hjserve.model"] == "fclf"
    assert root.attributes["hjserve.request_id"] == "req-9"
    for phase in ("decode", "queue", "compute", "encode"):
        assert under_root(spans[phase]), phase
        assert spans[phase].context.trace_id == root.context.trace_id
    # queue, then compute: the same instant on one clock (two conversions of perf_counter to the wall
    # clock used to differ by the time between their readings, and then and again overlapped)
    assert spans["queue"].end_time == spans["compute"].start_time
    access = [r for r in caplog.records if r.name == "hjserve.access"]
    assert access and access[-1].access["trace_id"] == CALLER_TRACE


def test_errors_are_traced_too(traced, client):
    r = client.post("/v2/models/nope/infer", json=_body())
    assert r.status_code == 404 and len(r.headers["x-trace-id"]) == 32
    root = next(s for s in traced.get_finished_spans() if s.name.startswith("HTTP POST"))
    assert root.attributes["http.response.status_code"] == 404


def test_a_grpc_call_is_traced(traced, dataplane):
    from service.grpc import inference_pb2 as pb
    from service.grpc.server import GRPCServer

    class Context:   # what the handler uses of grpc.aio.ServicerContext
        def __init__(self):
            self.trailing = ()

        def invocation_metadata(self):
            return (("traceparent", f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"),)

        def set_trailing_metadata(self, metadata):
            self.trailing = metadata

        def add_done_callback(self, callback):   # the call ends with the test: nothing to run it for
            self.done = callback

        async def read(self):
            return self.message

    async def main():
        await dataplane.start()
        try:
            server = GRPCServer(dataplane, "127.0.0.1", 0)
            rpc = server._wrap("ModelInfer", pb.ModelInferRequest, server.model_infer, "key", receive=True)
            request = pb.ModelInferRequest(model_name="fclf")
            request.inputs.add(name="input", datatype="FP32", shape=[1, D])
            request.raw_input_contents.append(np.zeros((1, D), np.float32).tobytes())

            context = Context()
            context.message = request.SerializeToString()   # grpc hands ModelInfer its bytes unread
            reply = await rpc(None, context)
            return reply, dict(context.trailing)
        finally:
            await dataplane.stop()

    reply, trailing = asyncio.run(main())
    assert reply.model_name == "fclf" and trailing["x-trace-id"] == CALLER_TRACE
    names = {s.name for s in traced.get_finished_spans()}
    assert {"gRPC ModelInfer", "decode", "queue", "compute", "encode"} <= names


def test_tracing_off_costs_nothing_and_sends_no_header(client):
    tracing.configure("off")
    r = client.post("/v2/models/fclf/infer", json=_body())
    assert r.status_code == 200 and "x-trace-id" not in r.headers
    with tracing.span("anything") as s:
        assert s is None
    assert tracing.trace_id() is None
