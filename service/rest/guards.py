"""Connection guards: slow or stalled clients (slowloris) and load shedding before the app.

* :class:`GuardedProtocol` -- uvicorn's httptools protocol, plus

  - a deadline for the request head: a connection that has not sent a complete request line and
    headers ``header_timeout_s`` after it opened (or after its previous response) is closed;
  - a size limit for the request head: past ``max_header_bytes`` received while a head is
    incomplete, the connection gets 431 and is closed (httptools buffers an unfinished header, so
    without it one header line could grow without bound within the deadline);
    uvicorn's own keep-alive timer is cancelled by any byte received, so without this a client
    sending one header byte every few seconds would hold its connection forever;
  - load shedding and admission: as soon as the head of an inference request is parsed, ``shed``
    either reserves one of its model version's ``max_queue_size`` in-flight slots (held until the
    app is done with the request) or answers a ready-made 503 written straight to the socket.
    Reserving at the head, not inside the app, matters: one event-loop turn may parse hundreds of
    heads before any of their tasks runs. No ASGI task is created, FastAPI is never entered, the
    body is parsed and dropped without being stored or decoded, and the connection stays alive, so
    a rejection costs a few tens of microseconds of the event loop instead of a full request.
  - a response its client does not read: once the transport's buffer passes its high-water mark
    (the socket takes no more), the bytes it holds count against the request-memory budget
    (``max_request_memory_bytes``) until it drains, and a client that takes less than one write
    window (64 KiB) of it in ``send_timeout_s`` has its connection closed (aborted: the buffer is
    dropped). uvicorn hands a response to the transport in one write, so without this a client
    that read nothing held its whole response in the server's memory for as long as it kept the
    connection open;
* :class:`BodyTimeoutMiddleware` -- a deadline for the request body: every body must have arrived
  ``body_timeout_s`` after its request head, or the request fails with 408 ``body_timeout`` and the
  connection is closed.

The number of concurrent connections and requests is bounded by uvicorn's ``limit_concurrency``
(setting ``max_connections``: beyond it new requests get 503 at once).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus

import httptools
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.budget import ByteBudget, Hold
from service.codecs import dumps
from service.errors import (
    BadRequest,
    BodyTimeout,
    HeadersTooLarge,
    HJServeError,
    Overloaded,
    Unauthorized,
    UnsupportedEncoding,
    error_body,
    lookup,
)

__all__ = ["ADMITTED", "BodyTimeoutMiddleware", "GuardedProtocol", "Shed", "error_parts", "guarded_protocol", "http_headers",
           "raw_error"]

log = logging.getLogger("service.rest")

#: The ioctl that reads a TCP socket's unacknowledged send queue (SIOCOUTQ = TIOCOUTQ on Linux).
_OUTQ = getattr(termios, "TIOCOUTQ", None)

#: How much of a buffered response a client must take within ``send_timeout_s`` (uvloop's write
#: high-water mark: one window of the transport's flow control).
SEND_WINDOW_BYTES = 64 * 1024

#: ``shed(method, path)`` -> a complete HTTP/1.1 response (bytes) that answers a request head without
#: the app (it must not close the connection); or a ``release()`` callable: the request holds a
#: reserved in-flight slot until the app is done with it; or None: pass the request on untouched.
Shed = Callable[[str, str], "bytes | Callable[[], None] | None"]


class _Answered:
    """Stands in for uvicorn's request cycle of a request answered by the protocol itself: the
    response is complete, so httptools' body callbacks discard the unread body."""

    response_complete = True
    disconnected = False

    class message_event:  # noqa: N801 - mimics asyncio.Event's one method used here
        @staticmethod
        def set() -> None:
            return None


_ANSWERED = _Answered()


def http_headers(exc: HJServeError) -> dict[str, str]:
    """The HTTP headers an error implies, derived at this edge from its class and typed fields:
    ``Retry-After`` (overload), ``WWW-Authenticate`` (no or a wrong key), ``Connection: close`` (a body
    that never arrived is never read)."""
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, BodyTimeout):
        headers["Connection"] = "close"
    return headers


def error_parts(exc: HJServeError, close: bool = False) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of any error response: status and ``error_type`` from the one error
    table, headers from :func:`http_headers`, the ``{error, error_type}`` body."""
    mapping = lookup(exc)
    body = dumps(error_body(exc.message, mapping.error_type))
    extra = http_headers(exc)
    if close:
        extra["Connection"] = "close"
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in extra.items())]
    return mapping.status, headers, body


def raw_error(exc: HJServeError, close: bool = False) -> bytes:
    """:func:`error_parts` as a complete HTTP/1.1 response, to write straight to a socket."""
    status, headers, body = error_parts(exc, close)
    head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()) + head + b"\r\n" + body


def _error_app(exc: HJServeError):
    """An ASGI app that answers ``exc`` and closes the connection (reads nothing)."""
    status, headers, body = error_parts(exc, close=True)

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    return app


def _connections_full(retry_after_s: int):
    return _error_app(Overloaded("the server is at max_connections (HJSERVE_MAX_CONNECTIONS); retry later",
                                 retry_after_s=retry_after_s))


#: ASGI scope key set on requests whose in-flight slot the protocol already reserved.
ADMITTED = "hjserve.admitted"


def _holding(app, release: Callable[[], None]):
    """``app`` run with a reserved in-flight slot, released exactly once when it is done."""
    async def held(scope, receive, send):
        scope[ADMITTED] = True
        try:
            await app(scope, receive, send)
        finally:
            release()
    return held


class GuardedProtocol(HttpToolsProtocol):
    """httptools protocol with a request-head deadline and load shedding before the app."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    shed: Shed | None = None
    send_timeout_s: float = 60.0
    #: The budget a response's unread buffered bytes count against (None: not counted).
    response_memory: ByteBudget | None = None
    #: The answer beyond ``max_connections`` (uvicorn's own is plain text).
    connections_full = staticmethod(_connections_full(1))

    def data_received(self, data: bytes) -> None:
        """Parse ``data``; a read that leaves a head incomplete counts toward its size, unless a
        request ended or a head completed within it (its bytes are not all the new head's: such a
        read is left out, so a head is cut off within the limit plus one read)."""
        boundaries = self._boundaries
        super().data_received(data)
        if not self._in_head or self._boundaries != boundaries or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > type(self).max_header_bytes:
            self._refuse_head()

    def _refuse_head(self) -> None:
        limit = type(self).max_header_bytes
        self.transport.write(raw_error(HeadersTooLarge(
            f"the request head exceeds {limit} bytes (HJSERVE_MAX_HEADER_BYTES)"), close=True))
        self.transport.close()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0   # the next bytes begin the next head
        self._boundaries += 1

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._boundaries += 1
        # a whole head that arrived within a read or two is measured exactly here (the request line
        # and each header line as sent, less trailing blanks), before any app sees it
        if len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) + 16 > type(self).max_header_bytes:
            self._refuse_head()
            self.cycle = _ANSWERED   # the body that follows is parsed and dropped
            return
        codings = [c.strip().lower() for n, v in self.headers if n == b"transfer-encoding" for c in v.split(b",")]
        if codings and codings != [b"chunked"]:
            # httptools reads the chunks whatever codings precede chunked: a body that says it is
            # compressed would be read as if it were not (what a proxy that applies the coding reads)
            self.transport.write(raw_error(UnsupportedEncoding(
                f"Transfer-Encoding {b', '.join(codings).decode('latin-1')!r} is not supported: only chunked "
                "(compress a body with Content-Encoding)"), close=True))
            self.transport.close()
            self.cycle = _ANSWERED
            return
        shed = type(self).shed
        previous = self.cycle
        self._admitted = None
        if (shed is not None and (previous is None or previous.response_complete)
                and self.parser.should_keep_alive() and self.parser.get_method() == b"POST"):
            path = httptools.parse_url(self.url).path.decode("ascii", "replace")
            answer = shed("POST", urllib.parse.unquote(path) if "%" in path else path)
            if isinstance(answer, bytes):
                self.transport.write(answer)
                self.cycle = _ANSWERED   # the body that follows is parsed and dropped
                self.server_state.total_requests += 1
                self._arm_head_timer()   # the next request head must come in time (keep-alive)
                return
            self._admitted = answer      # a slot was reserved: released when the app is done
        super().on_headers_complete()

    def _start_asgi_task(self, cycle, app) -> None:
        release, self._admitted = self._admitted, None
        if app is service_unavailable:   # over max_connections: uvicorn's plain-text 503, as JSON
            app = type(self).connections_full
        elif release is not None:
            app = _holding(app, release)
        super()._start_asgi_task(cycle, app)

    def send_400_response(self, msg: str) -> None:
        """A request that is not HTTP at all: the same JSON error body as every other error."""
        self.transport.write(raw_error(BadRequest(f"malformed HTTP request: {msg}"), close=True))
        self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._admitted: Callable[[], None] | None = None   # the slot shed() reserved for the next task
        # a response the socket is not taking (between pause_writing and resume_writing): its
        # check timer, the buffer size at the client's last progress and when, its bytes' hold
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_mark, self._stall_since, self._stall_fd = 0, 0.0, -1
        self._stall_hold: Hold | None = None
        self._head_deadline = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head, self._head_bytes, self._boundaries = True, 0, 0
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        """Move the request-head deadline; the one timer re-arms itself lazily when it fires early,
        so a response costs a float assignment, not a timer."""
        self._head_deadline = self.loop.time() + self.header_timeout_s
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_deadline, self._on_head_timer)

    def _on_head_timer(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if not waiting_for_head:
            return                     # a request is running: on_response_complete re-arms
        if self.loop.time() < self._head_deadline:
            self._head_timer = self.loop.call_at(self._head_deadline, self._on_head_timer)
            return
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def pause_writing(self) -> None:
        """The transport's buffer passed its high-water mark: from now until it drains, count what it
        holds and watch that the client takes it."""
        super().pause_writing()
        if self._stall_timer is None:
            budget = type(self).response_memory
            self._stall_hold = budget.hold() if budget is not None else None
            sock = self.transport.get_extra_info("socket")
            self._stall_fd = sock.fileno() if sock is not None else -1
            self._stall_mark, self._stall_since = self._unsent()[1], self.loop.time()
            self._check_stall()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._end_stall()

    def _check_stall(self) -> None:
        """Count the buffered bytes; close the connection when its client has not taken a window of
        them within ``send_timeout_s``; else look again shortly."""
        self._stall_timer = None
        # a transport closing (keep-alive timeout, head deadline) still holds its buffer until the
        # client takes it: it is watched on, and aborted alike (connection_lost ends the watch)
        (size, unsent), now = self._unsent(), self.loop.time()
        if unsent <= self._stall_mark - SEND_WINDOW_BYTES:   # the client took a window: progress
            self._stall_mark, self._stall_since = unsent, now
        elif unsent > self._stall_mark:                       # more written since: the mark moves up
            self._stall_mark = unsent
        if self._stall_hold is not None:
            self._stall_hold.account(size)
        timeout = type(self).send_timeout_s
        if now - self._stall_since >= timeout:
            log.info("closed a connection whose client took less than %d bytes of its response in %g s "
                     "(HJSERVE_SEND_TIMEOUT_S); %d bytes were waiting", SEND_WINDOW_BYTES, timeout, size)
            self._end_stall()
            self.transport.abort()
            return
        self._stall_timer = self.loop.call_later(min(1.0, timeout / 4), self._check_stall)

    def _unsent(self) -> tuple[int, int]:
        """(bytes in the transport's buffer, those plus the bytes in the kernel's send queue that the
        client has not acknowledged). Progress is read from the second: the transport's buffer moves
        only when the socket has room for a large part of its send buffer again (megabytes), while
        the kernel's queue shrinks with every read of the client (``SIOCOUTQ``, Linux; elsewhere
        the transport's buffer alone)."""
        size = self.transport.get_write_buffer_size()
        if self._stall_fd < 0 or _OUTQ is None:
            return size, size
        try:
            queued = struct.unpack("i", fcntl.ioctl(self._stall_fd, _OUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return size, size
        return size, size + queued

    def _end_stall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._stall_hold is not None:
            self._stall_hold.release()
            self._stall_hold = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_stall()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


def guarded_protocol(header_timeout_s: float, shed: Shed | None = None,
                     retry_after_s: int = 1, max_header_bytes: int = 64 * 1024, send_timeout_s: float = 60.0,
                     response_memory: ByteBudget | None = None) -> type[GuardedProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits and shedder."""
    return type("GuardedProtocol", (GuardedProtocol,), {"header_timeout_s": header_timeout_s,
                                                       "max_header_bytes": max_header_bytes,
                                                       "send_timeout_s": send_timeout_s,
                                                       "response_memory": response_memory,
                                                       "shed": staticmethod(shed) if shed else None,
                                                       "connections_full": staticmethod(_connections_full(retry_after_s))})


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
