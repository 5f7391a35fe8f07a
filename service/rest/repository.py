"""Model repository extension routes (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from service.codecs import first_error, parse_json
from service.errors import BadRequest
from service.rest.common import dataplane_of, json_response, read_body, wire_response
from service.types import RepositoryIndexRequest, RepositoryModelRequest

__all__ = ["index", "load", "unload"]

_LIMIT = 64 * 1024


async def index(request: Request) -> Response:
    body = await read_body(request, _LIMIT)
    ready_only = False
    if body.strip():
        try:
            ready_only = bool(RepositoryIndexRequest.model_validate(parse_json(body)).ready)
        except ValidationError as exc:
            raise BadRequest(f"invalid index request: {exc.errors()[0]['msg']}") from None
    return wire_response(dataplane_of(request).repository_index(ready_only))


async def load(request: Request, model_name: str) -> Response:
    await dataplane_of(request).load_model(model_name, await _parameters(request))
    return json_response({})


async def unload(request: Request, model_name: str) -> Response:
    await dataplane_of(request).unload_model(model_name, await _parameters(request))
    return json_response({})


async def _parameters(request: Request) -> dict[str, Any]:
    """The ``parameters`` of a load / unload body (none when the body is empty)."""
    body = await read_body(request, _LIMIT)
    if not body.strip():
        return {}
    try:
        return RepositoryModelRequest.model_validate(parse_json(body)).parameters or {}
    except ValidationError as exc:
        raise BadRequest(f"invalid repository request: {first_error(exc)}") from None
