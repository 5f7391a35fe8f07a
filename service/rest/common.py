"""Shared router helpers: body reading with a size limit, API keys, JSON responses."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from service.codecs import dumps
from service.dataplane import DataPlane
from service.errors import Forbidden, PayloadTooLarge, Unauthorized
from service.rest.guards import ADMITTED
from service.settings import Settings

__all__ = ["admission", "json_response", "presented_key", "read_body", "require_admin", "require_api_key"]


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Compact JSON (non-finite floats allowed, as Triton sends them)."""
    return Response(dumps(content), status_code=status_code, media_type="application/json", headers=headers)


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
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


def _matches(key: str, allowed: list[str]) -> bool:
    found = False
    for candidate in allowed:  # compare against all, in constant time each
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


async def require_api_key(request: Request) -> None:
    """Inference and model routes: a valid API key when any is configured (the admin key also works)."""
    settings = settings_of(request)
    allowed = [k.get_secret_value() for k in settings.api_keys]
    if not allowed:
        return
    if settings.admin_key is not None:
        allowed.append(settings.admin_key.get_secret_value())
    key = presented_key(request)
    if key is None:
        raise Unauthorized("missing API key (Authorization: Bearer <key> or X-API-Key)",
                           headers={"WWW-Authenticate": "Bearer"})
    if not _matches(key, allowed):
        raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})


async def require_admin(request: Request) -> None:
    """Repository routes (index, load, unload): never more open than inference. With an admin key
    set, only it works; without one, the API keys work (and are required) when any is set; only a
    server with no keys at all leaves them open, like its inference routes."""
    settings = settings_of(request)
    if settings.admin_key is None:
        await require_api_key(request)
        return
    key = presented_key(request)
    if key is None:
        raise Unauthorized("missing admin key", headers={"WWW-Authenticate": "Bearer"})
    if not _matches(key, [settings.admin_key.get_secret_value()]):
        raise Forbidden("this route needs the admin key")
