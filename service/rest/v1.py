"""V1 routes for humans: ``{"instances": [...]}`` -> readable predictions and explanations."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from service.budget import Hold
from service.codecs import first_error, parse_json
from service.errors import InvalidJSON, ValidationFailed
from service.rest import common
from service.types import V1Request

__all__ = ["explain", "model_status", "predict"]


async def _decode(request: Request, memory: Hold) -> V1Request:
    obj = parse_json(await common.read_inference_body(request, memory))
    if not isinstance(obj, dict):
        raise InvalidJSON('the body must be a JSON object {"instances": [[...], ...]}')
    try:
        return V1Request.model_validate(obj)
    except ValidationError as exc:
        raise ValidationFailed(first_error(exc)) from None


async def _answer(request: Request, model_name: str, detail: bool) -> Response:
    with common.admission(request, model_name), common.request_memory(request) as memory:   # 503 before the body is read
        body = await _decode(request, memory)
        work = common.dataplane_of(request).explain(model_name, body, detail=detail)
        answer = await common.unless_client_leaves(request, work, len(body.instances))
        response = common.wire_response(answer)
        common.hold_answer(memory, response.body)
    return response


async def predict(request: Request, model_name: str) -> Response:
    return await _answer(request, model_name, detail=False)


async def explain(request: Request, model_name: str) -> Response:
    return await _answer(request, model_name, detail=True)


async def model_status(request: Request, model_name: str) -> Response:
    return common.wire_response(common.dataplane_of(request).model_ready(model_name))
