"""V1 routes for humans: ``{"instances": [...]}`` -> readable predictions and explanations."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from service.budget import Hold
from service.codecs import first_error, parse_json
from service.errors import InvalidJSON, ValidationFailed
from service.rest.common import (
    admission,
    dataplane_of,
    read_inference_body,
    request_memory,
    unless_client_leaves,
    wire_response,
)
from service.types import V1Request

__all__ = ["explain", "model_status", "predict"]


async def _decode(request: Request, memory: Hold) -> V1Request:
    obj = parse_json(await read_inference_body(request, memory))
    if not isinstance(obj, dict):
        raise InvalidJSON('the body must be a JSON object {"instances": [[...], ...]}')
    try:
        return V1Request.model_validate(obj)
    except ValidationError as exc:
        raise ValidationFailed(first_error(exc)) from None


async def _answer(request: Request, model_name: str, detail: bool) -> Response:
    with admission(request, model_name), request_memory(request) as memory:   # 503 before the body is read
        body = await _decode(request, memory)
        answer = await unless_client_leaves(request, dataplane_of(request).explain(model_name, body, detail=detail),
                                            len(body.instances))
    return wire_response(answer)


async def predict(request: Request, model_name: str) -> Response:
    return await _answer(request, model_name, detail=False)


async def explain(request: Request, model_name: str) -> Response:
    return await _answer(request, model_name, detail=True)


async def model_status(request: Request, model_name: str) -> Response:
    return wire_response(dataplane_of(request).model_ready(model_name))
