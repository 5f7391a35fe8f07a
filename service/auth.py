"""API keys, for every transport: which key a request presents is the transport's business (an HTTP
header, gRPC metadata); whether it may pass is decided here, once."""

from __future__ import annotations

import hmac

from service.errors import Forbidden, Unauthorized
from service.settings import Settings

__all__ = ["check_admin", "check_api_key", "key_from"]


def key_from(authorization: str | None, api_key: str | None) -> str | None:
    """The key from an ``Authorization: Bearer <key>`` value or an ``X-API-Key`` value."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return api_key.strip() if api_key else None


def _matches(key: str, allowed: list[str]) -> bool:
    found = False
    for candidate in allowed:  # compare against all, in constant time each
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def check_api_key(settings: Settings, key: str | None) -> None:
    """Inference and model operations: a valid API key when any is configured (the admin key also
    works); raises Unauthorized."""
    allowed = [k.get_secret_value() for k in settings.api_keys]
    if not allowed:
        return
    if settings.admin_key is not None:
        allowed.append(settings.admin_key.get_secret_value())
    if key is None:
        raise Unauthorized("missing API key (Authorization: Bearer <key> or X-API-Key)")
    if not _matches(key, allowed):
        raise Unauthorized("invalid API key")


def check_admin(settings: Settings, key: str | None) -> None:
    """Repository operations (index, load, unload): never more open than inference. With an admin
    key set, only it works (Forbidden for another valid key); without one, the API keys work (and are
    required) when any is set; only a server with no keys at all leaves them open."""
    if settings.admin_key is None:
        check_api_key(settings, key)
        return
    if key is None:
        raise Unauthorized("missing admin key")
    if not _matches(key, [settings.admin_key.get_secret_value()]):
        raise Forbidden("this route needs the admin key")
