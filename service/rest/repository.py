"""Model repository extension routes (admin)."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from service.codecs import first_error, parse_json
from service.errors import BadRequest
from service.rest.common import dataplane_of, json_response, read_body, wire_response
from service.types import RepositoryIndexRequest, RepositoryModelRequest

__all__ = ["index", "load", "unload"]

_LIMIT = 64 * 1024
_Body = TypeVar("_Body", RepositoryIndexRequest, RepositoryModelRequest)


async def index(request: Request) -> Response:
    body = await _body(request, RepositoryIndexRequest, "index")
    return wire_response(dataplane_of(request).repository_index(bool(body and body.ready)))


async def load(request: Request, model_name: str) -> Response:
    body = await _body(request, RepositoryModelRequest, "repository")
    await dataplane_of(request).load_model(model_name, body.parameters if body else None)
    return json_response({})


async def unload(request: Request, model_name: str) -> Response:
    body = await _body(request, RepositoryModelRequest, "repository")
    await dataplane_of(request).unload_model(model_name, body.parameters if body else None)
    return json_response({})


async def _body(request: Request, model: type[_Body], what: str) -> _Body | None:
    """A repository route's optional JSON body as ``model`` (None when the body is empty)."""
    raw = await read_body(request, _LIMIT)
    if not raw.strip():
        return None
    try:
        return model.model_validate(parse_json(raw))
    except ValidationError as exc:
        raise BadRequest(f"invalid {what} request: {first_error(exc)}") from None
