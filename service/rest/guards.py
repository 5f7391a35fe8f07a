"""Connection guards against slow or stalled clients (slowloris).

* :class:`HeaderTimeoutH11Protocol` -- uvicorn's h11 protocol, plus a deadline for the request head:
  a connection that has not sent a complete request line and headers ``header_timeout_s`` after it
  opened (or after its previous response) is closed. uvicorn's own keep-alive timer is cancelled by
  any byte received, so without this a client sending one header byte every few seconds would hold
  its connection forever.
* :class:`BodyTimeoutMiddleware` -- a deadline for the request body: every body must have arrived
  ``body_timeout_s`` after its request head, or the request fails with 408 ``body_timeout`` and the
  connection is closed.

The number of concurrent connections and requests is bounded by uvicorn's ``limit_concurrency``
(setting ``max_connections``: beyond it new requests get 503 at once).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import BodyTimeout

__all__ = ["BodyTimeoutMiddleware", "HeaderTimeoutH11Protocol", "header_timeout_protocol"]


class HeaderTimeoutH11Protocol(H11Protocol):
    """h11 protocol that closes connections idle in the middle of (or before) a request head."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._on_head_timeout)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def header_timeout_protocol(header_timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class uvicorn instantiates per connection, with this deadline."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": header_timeout_s})


class BodyTimeoutMiddleware:
    """ASGI middleware: the request body must arrive within ``timeout_s`` of the request head."""

    def __init__(self, app, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def receive_in_time():
            nonlocal body_done
            if body_done:   # after the body: e.g. a streaming response waiting for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise BodyTimeout(f"the request body did not arrive within {self.timeout_s:g} s "
                                  "(HJSERVE_BODY_TIMEOUT_S)") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, receive_in_time, send)
