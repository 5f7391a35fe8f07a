"""V2 (Open Inference Protocol) routes: health, metadata, config, stats, infer. Each decodes, calls
one dataplane operation and encodes its answer."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service import codecs, tracing
from service.errors import ModelNotReady
from service.rest.common import (
    admission,
    dataplane_of,
    hold_answer,
    read_inference_body,
    request_memory,
    unless_client_leaves,
    wire_response,
)

__all__ = ["infer", "live", "model_config", "model_index", "model_metadata", "model_ready", "model_stats", "ready",
           "server_metadata"]

#: Bodies larger than this are decoded in a worker thread so the event loop stays responsive.
_OFFLOAD_BYTES = 256 * 1024


async def live(request: Request) -> Response:
    return wire_response({"live": dataplane_of(request).live()})


async def ready(request: Request) -> Response:
    if not dataplane_of(request).ready():
        raise ModelNotReady("the server is not ready: no model version is serving yet")
    return wire_response({"ready": True})


async def server_metadata(request: Request) -> Response:
    return wire_response(dataplane_of(request).server_metadata())


async def model_index(request: Request) -> Response:
    return wire_response(dataplane_of(request).model_index())


async def model_metadata(request: Request, model_name: str, model_version: str | None = None) -> Response:
    return wire_response(dataplane_of(request).model_metadata(model_name, model_version))


async def model_ready(request: Request, model_name: str, model_version: str | None = None) -> Response:
    return wire_response(dataplane_of(request).model_ready(model_name, model_version))


async def model_config(request: Request, model_name: str, model_version: str | None = None) -> Response:
    return wire_response(dataplane_of(request).model_config(model_name, model_version))


async def model_stats(request: Request, model_name: str | None = None,
                      model_version: str | None = None) -> Response:
    return wire_response(dataplane_of(request).model_stats(model_name, model_version))


async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    dataplane = dataplane_of(request)
    # 503 before the body is read; the body's memory held until the answer
    with admission(request, model_name, model_version), request_memory(request) as memory:
        header = request.headers.get(codecs.HEADER_LENGTH)
        body = await read_inference_body(request, memory, header)
        with tracing.span("decode", **{"hjserve.body_bytes": len(body)}):
            if len(body) > _OFFLOAD_BYTES:
                decoded = await run_in_threadpool(codecs.decode_infer_request, body, header)
            else:
                decoded = codecs.decode_infer_request(body, header)
        rows = max((i.shape[0] for i in decoded.inputs if i.shape), default=0)
        response = await unless_client_leaves(request, dataplane.infer(model_name, model_version, decoded), rows)
        with tracing.span("encode"):
            payload, header_length = codecs.encode_infer_response(response)
        hold_answer(memory, payload)
    if header_length is None:
        return Response(payload, media_type=codecs.JSON_CONTENT_TYPE)
    return Response(payload, media_type=codecs.BINARY_CONTENT_TYPE,
                    headers={codecs.HEADER_LENGTH: str(header_length)})
