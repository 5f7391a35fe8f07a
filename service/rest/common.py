"""Shared router helpers: body reading with a size limit, API keys, JSON responses."""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from service.auth import check_admin, check_api_key, key_from
from service.budget import Hold
from service.codecs import PARSE_BYTES_PER_BYTE, dumps, parse_header_length
from service.dataplane import DataPlane
from service.errors import BadRequest, ClientClosedRequest, Forbidden, PayloadTooLarge, UnsupportedEncoding
from service.rest.guards import ADMITTED
from service.settings import Settings

__all__ = ["admission", "body_chunks", "body_decoder", "declared_length", "hold_answer", "json_response", "presented_key", "read_body",
           "read_inference_body", "request_memory", "require_admin", "require_api_key", "same_origin", "unless_client_leaves", "wire_response"]

T = TypeVar("T")


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


def body_decoder(request: Request, limit: int) -> Callable[[bytes], bytes]:
    """``decode(chunk) -> bytes`` for the request's ``Content-Encoding``, fed the body's non-empty
    chunks in order and then ``b""`` once (the end): identity, or gzip / deflate (what Triton's HTTP client
    sends with ``request_compression_algorithm``) inflated at most ``limit`` bytes in all -- a
    compressed body is never inflated past the limit it must meet (413), so a small bomb costs no
    memory. Another encoding is a 415; a corrupt or truncated stream a 400."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return lambda chunk: chunk
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported (identity, gzip, deflate)")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)   # a gzip or a zlib stream ("deflate" in HTTP)
    produced = 0

    def decode(chunk: bytes) -> bytes:
        nonlocal produced
        try:
            out = inflater.decompress(chunk, limit - produced + 1) if chunk else inflater.flush()
        except zlib.error as exc:
            raise BadRequest(f"the {encoding} body is corrupt: {exc}") from None
        produced += len(out)
        if produced > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes once decompressed")
        if not chunk and (not inflater.eof or inflater.unused_data):
            raise BadRequest(f"the {encoding} body is truncated or followed by other data")
        return out
    return decode


@contextlib.contextmanager
def request_memory(request: Request) -> Iterator[Hold]:
    """A hold on the dataplane's request-memory budget (``max_request_memory_bytes``) for one
    inference request, given back when the request is answered."""
    with dataplane_of(request).request_memory.hold() as hold:
        yield hold


def hold_answer(memory: Hold, answer: bytes) -> None:
    """An encoded answer joins its request's hold on the request-memory budget (413 / 503
    ``request_memory_full`` when it does not fit): an answer its client does not read stays in the
    server's memory (:mod:`service.rest.guards` counts it there once it is handed to the transport),
    so one that does not fit is refused before it is sent, not buffered."""
    memory.take(len(answer))


async def read_inference_body(request: Request, memory: Hold, header_length: str | None = None) -> bytes:
    """An inference body (V2 or V1, at most ``max_body_bytes``) with its memory held in ``memory``:
    twice the body as it arrives (:func:`read_body`), then, before it is parsed, what parsing its
    JSON part (all of it, or the part ``header_length`` names) may add:
    :data:`~service.codecs.PARSE_BYTES_PER_BYTE` per byte in all."""
    body = await read_body(request, settings_of(request).max_body_bytes, memory)
    json_bytes = parse_header_length(header_length, len(body))
    memory.take((PARSE_BYTES_PER_BYTE - 2) * (len(body) if json_bytes is None else json_bytes))
    return body


def declared_length(request: Request, limit: int) -> int | None:
    """The body's declared ``Content-Length`` (None when absent or not a number), refused at once
    (PayloadTooLarge) when it exceeds ``limit``: no byte of such a body is read."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return None
    if int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    return int(declared)


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; a client that closes the connection before its body is whole
    ends the request as :class:`ClientClosedRequest` (499: it is gone, nobody reads an answer), not as
    an error of the server's."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise ClientClosedRequest("the client closed the connection before its whole body was sent") from None


async def read_body(request: Request, limit: int, hold: Hold | None = None) -> bytes:
    """The whole body (decoded: :func:`body_decoder`), or PayloadTooLarge as soon as it exceeds
    ``limit`` bytes, sent or decoded. ``hold`` takes twice each decoded chunk as it arrives (the
    chunks and their join)."""
    declared_length(request, limit)
    decode = body_decoder(request, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in body_chunks(request):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        if chunk:
            chunks.append(decode(chunk))
            if hold is not None:
                hold.take(2 * len(chunks[-1]))
    chunks.append(decode(b""))
    if hold is not None:
        hold.take(2 * len(chunks[-1]))
    return b"".join(chunks)


def presented_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key``."""
    return key_from(request.headers.get("authorization"), request.headers.get("x-api-key"))


def require_api_key(request: Request) -> None:
    """Inference and model routes: :func:`service.auth.check_api_key`."""
    check_api_key(settings_of(request), presented_key(request))


def require_admin(request: Request) -> None:
    """Repository routes (index, load, unload): no other site's page (:func:`same_origin`), then
    :func:`service.auth.check_admin`."""
    if not same_origin(request):
        raise Forbidden(f"cross-origin request refused: a page of {request.headers['origin']!r} may not call the "
                        "repository routes of this server")
    check_admin(settings_of(request), presented_key(request))


def same_origin(request: Request) -> bool:
    """Whether the request comes from no browser page of another site: a browser names the page's
    origin in ``Origin`` on every cross-origin POST, even one it sends without a CORS preflight (no
    body, or ``text/plain``), whose answer the page cannot read but whose effect happens. No
    ``Origin`` (Triton's clients, curl) or this server's own host passes; ``null`` (a sandboxed or
    local page) does not."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower() != ""


async def unless_client_leaves(request: Request, work: Awaitable[T], rows: int) -> T:
    """Await ``work`` -- the dataplane's answer to a request whose body has been read whole -- and
    stop it if the client closes its connection first (a client timeout, a cancelled job), raising
    :class:`ClientClosedRequest`: cancelled, the request's batches that have not started never run,
    and its later ones no longer hold the model's queue against other clients. Only for a request
    of more ``rows`` than one batch (``max_batch_size``): a single batch is over about as soon as the
    watch would be set up, and the two tasks this takes cost the small requests nothing this way.
    gRPC needs none of this: grpcio cancels a call's handler when its client goes."""
    if rows <= settings_of(request).max_batch_size:
        return await work
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:   # this handler was cancelled (a shutdown's deadline): so is the work
        task.cancel()
        watch.cancel()
        raise
    if task.done():
        watch.cancel()
        return task.result()
    if watch.result():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientClosedRequest("the client closed the connection before the answer; its work was stopped")
    return await task   # the watch ended without a disconnect: nothing more to watch for


async def _client_left(request: Request) -> bool:
    """Wait for the client to close the connection (after the whole body was read the only message
    left is ``http.disconnect``) -> True; anything else -> False."""
    try:
        message = await request.receive()
    except Exception:   # noqa: BLE001 - a watch that cannot watch stops, it never fails the request
        return False
    return message.get("type") == "http.disconnect"
