"""Shared router helpers: body reading with a size limit, API keys, JSON responses."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from service.auth import check_admin, check_api_key, key_from
from service.codecs import dumps
from service.dataplane import DataPlane
from service.errors import PayloadTooLarge
from service.rest.guards import ADMITTED
from service.settings import Settings

__all__ = ["admission", "json_response", "presented_key", "read_body", "require_admin", "require_api_key",
           "wire_response"]


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Compact JSON (non-finite floats allowed, as Triton sends them)."""
    return Response(dumps(content), status_code=status_code, media_type="application/json", headers=headers)


def wire_response(content: BaseModel | list[BaseModel] | dict[str, Any]) -> Response:
    """A dataplane answer (a wire model, a list of them, or a plain object) as JSON; fields that are
    None are left out."""
    if isinstance(content, BaseModel):
        content = content.model_dump(exclude_none=True)
    elif isinstance(content, list):
        content = [item.model_dump(exclude_none=True) for item in content]
    return json_response(content)


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def dataplane_of(request: Request) -> DataPlane:
    return request.app.state.dataplane


def admission(request: Request, model_name: str, model_version: str | None = None):
    """:meth:`DataPlane.admit` for this request, counting the in-flight slot the connection
    protocol already reserved for it (if it did) instead of a second one."""
    return dataplane_of(request).admit(model_name, model_version, reserved=bool(request.scope.get(ADMITTED)))


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or PayloadTooLarge as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def presented_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key``."""
    return key_from(request.headers.get("authorization"), request.headers.get("x-api-key"))


def require_api_key(request: Request) -> None:
    """Inference and model routes: :func:`service.auth.check_api_key`."""
    check_api_key(settings_of(request), presented_key(request))


def require_admin(request: Request) -> None:
    """Repository routes (index, load, unload): :func:`service.auth.check_admin`."""
    check_admin(settings_of(request), presented_key(request))
