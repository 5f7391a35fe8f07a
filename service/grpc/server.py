"""The gRPC transport: ``inference.GRPCInferenceService`` (KServe V2 / Triton) over the dataplane.

Served by grpcio's asyncio server on the HTTP server's event loop, from the same
:class:`~service.dataplane.DataPlane`: one repository, one batcher per model version, one set of
metrics. Each RPC decodes its message, calls one dataplane operation and encodes the answer.

- Errors map through the one error table (:data:`service.errors.ERROR_TABLE`): status code from its
  ``grpc`` column, the message as details, ``error-type`` (and for overload ``retry-after``) in the
  trailing metadata.
- Auth: the same keys as HTTP, from the ``authorization: Bearer <key>`` or ``x-api-key`` metadata.
- Admission: an inference RPC beyond a model version's ``max_queue_size`` in-flight requests is
  refused with UNAVAILABLE at once, like HTTP's 503.
- One access-log line per RPC (logger ``hjserve.access``), with the client's ``x-request-id``
  metadata or a new id, returned (with ``x-trace-id`` when tracing) in the trailing metadata of
  every answer, error or not. Trailing, not initial: grpc.aio sends custom initial metadata only as
  an operation of its own ahead of the reply; without it ModelInfer has 1.06-1.12x the throughput
  (``bench/ab_server.py --protocol grpc``, side by side: ``bench/results/ab_server_grpc.md``); the
  trailers travel with the status.
- ``ModelStreamInfer`` (Triton's bidirectional stream): each message is one request, with its own
  access line and count, answered in order; an error is that request's answer, not the stream's
  status (:meth:`GRPCServer.model_stream_infer`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from service import metrics, tracing
from service.auth import check_admin, check_api_key, key_from
from service.budget import Hold
from service.codecs import grpc as wire
from service.dataplane import DataPlane
from service.errors import (
    BadRequest,
    BodyTimeout,
    ErrorMapping,
    HJServeError,
    InternalError,
    ModelNotFound,
    ModelNotReady,
    NotFound,
    PayloadTooLarge,
    lookup,
)
from service.grpc import health_pb2
from service.grpc import inference_pb2 as pb
from service.logs import CURRENT_REQUEST, RequestRecord
from service.settings import MAX_C_INT, Settings

__all__ = ["GRPCServer", "HEALTH_SERVICE_NAME", "SERVICE_NAME", "STREAM_INFLIGHT"]

log = logging.getLogger("service.grpc")
access_log = logging.getLogger("hjserve.access")

#: The protocol's service name: method paths are ``/inference.GRPCInferenceService/<Method>``.
SERVICE_NAME = "inference.GRPCInferenceService"
#: gRPC's standard health checking service (Kubernetes' gRPC probes, grpc_health_probe, load balancers)
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

Handler = Callable[[Any, aio.ServicerContext], Awaitable[Any]]


#: Requests of one ModelStreamInfer stream that run at once (the stream reads its next message when one
#: is answered): enough for one stream to fill the dynamic batcher's batches, bounded so that a stream
#: never holds more than this many messages of up to ``grpc_max_message_bytes`` in the server.
STREAM_INFLIGHT = 16


def _request_id(given: str) -> str:
    """The client's request id when it is 1-128 characters of ``A-Za-z0-9._:-``, else a new one."""
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _fail(context: aio.ServicerContext, code: grpc.StatusCode, details: str, trailing: list[tuple[str, str]]) -> None:
    """End a call with ``code``: grpc sends the status, ``details`` and the trailing metadata
    in place of a reply once the handler returns."""
    context.set_code(code)
    context.set_details(details)
    context.set_trailing_metadata(tuple(trailing))


def _refuse(context: aio.ServicerContext, call: _Call, exc: HJServeError) -> None:
    """End ``call`` with ``exc``'s row of the error table: its status and message, and the call's
    ids, its error type and any retry-after as trailing metadata."""
    mapping = call.failed(exc)
    trailing = [*call.ids, ("error-type", mapping.error_type)]
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None:
        trailing.append(("retry-after", str(retry)))
    _fail(context, getattr(grpc.StatusCode, mapping.grpc), exc.message, trailing)


#: What ModelStreamInferResponse adds around its ModelInferResponse: a field tag and a length.
_STREAM_WRAPPING = 6


def _unwritten(task: asyncio.Task) -> None:
    """A stream's request whose answer will never be written (the stream ended first): cancelled if
    it still runs, and its answer's hold given back if it has one -- now, or when it returns
    (``ModelStreamInfer``'s ``_stream_one`` returns ``(answer, hold)``). A task can have returned
    when the stream that awaits it is cancelled: its result is then never read."""
    def release(done: asyncio.Task) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result()[1].release()

    task.add_done_callback(release)
    task.cancel()


def _parse(message_type: Any, data: bytes) -> Any:
    """A call's message from its bytes. Every handler parses its own (grpc is given no
    deserializer): bytes that are no such message are the client's error, INVALID_ARGUMENT --
    grpc's own parsing answered UNKNOWN naming Python's DecodeError, and logged a traceback."""
    try:
        return message_type.FromString(data)
    except DecodeError:
        raise BadRequest(f"the message is not a valid {message_type.DESCRIPTOR.name}") from None


def _metadata(context: aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class _Call:
    """One request's life on the gRPC transport (a unary RPC, or one message of a stream): its id (the
    client's when it is 1-128 characters of ``A-Za-z0-9._:-``, else a new one), its server span, its
    :class:`~service.logs.RequestRecord`, and on exit the ``hjserve_grpc_requests_total`` count and the
    access line. ``code`` is OK unless :meth:`failed` or :meth:`crashed` said otherwise, or the request
    was cancelled (CANCELLED: its client went away before its answer)."""

    def __init__(self, method: str, meta: dict[str, str], request: Any, given_id: str):
        self.method, self.request = method, request
        self.request_id = _request_id(given_id)
        self.code = "OK"
        self._span_context = tracing.server_span(f"gRPC {method}", meta, **{
            "rpc.system": "grpc", "rpc.method": method, "hjserve.request_id": self.request_id})

    def __enter__(self) -> _Call:
        self.started = time.perf_counter()
        self.record = RequestRecord()
        self._token = CURRENT_REQUEST.set(self.record)
        self.span = self._span_context.__enter__()
        self.trace_id = tracing.trace_id()
        self.ids = (("x-request-id", self.request_id),) + ((("x-trace-id", self.trace_id),) if self.trace_id else ())
        return self

    def failed(self, exc: HJServeError) -> ErrorMapping:
        """A core error ends the request: its row of the error table."""
        mapping = lookup(exc)
        self.code = mapping.grpc
        return mapping

    def crashed(self) -> ErrorMapping:
        """An unexpected exception (a bug) ends the request: logged here, INTERNAL to the client."""
        log.exception("unhandled error in gRPC %s", self.method)
        self.code = "INTERNAL"
        return lookup(InternalError)

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            self.code = "CANCELLED"         # the client went away (or its stream was cancelled) first
        if self.span is not None:
            self.span.set_attribute("rpc.grpc.status_code", self.code)
        self._span_context.__exit__(None, None, None)
        metrics.GRPC_REQUESTS.labels(self.method, self.code).inc()
        if access_log.isEnabledFor(logging.INFO):
            request = self.request
            name = getattr(request, "model_name", None) or getattr(request, "name", None) or None
            version = getattr(request, "model_version", None) or getattr(request, "version", None) or None
            access_log.info("gRPC %s %s", self.method, self.code, extra={"access": {
                "request_id": self.request_id, "method": "gRPC", "route": self.method, "model": name,
                "version": version, "status": self.code,
                "duration_ms": round((time.perf_counter() - self.started) * 1000.0, 3), **self.record.fields(),
                **({"trace_id": self.trace_id} if self.trace_id else {})}})
        CURRENT_REQUEST.reset(self._token)


class GRPCServer:
    """A :class:`~service.rest.app.Transport`: started and stopped with the HTTP app's lifespan."""

    def __init__(self, dataplane: DataPlane, host: str, port: int, credentials: grpc.ServerCredentials | None = None):
        """``credentials``: the port's TLS credentials (:meth:`service.tls.CertificateReloader.grpc_credentials`);
        None: plaintext."""
        self.credentials = credentials
        self.dataplane = dataplane
        self.settings: Settings = dataplane.settings
        self.host, self.port = host, port
        self._server: aio.Server | None = None
        self._stopping: asyncio.Future | None = None

    async def start(self) -> None:
        size = self.settings.grpc_max_message_bytes
        # at most max_connections calls at once (REST's limit too): each may hold a message of up to
        # grpc_max_message_bytes before its handler runs
        s = self.settings
        # no call holds a slot past the connection's age and grace: one that never sends its
        # message would otherwise hold it forever
        age_ms, grace_ms = int(s.grpc_max_connection_age_s * 1000), int((s.body_timeout_s + s.request_timeout_s) * 1000)
        # the gRPC side of send_timeout_s: a connection whose client reads nothing (a hung or
        # stopped client; its answers wait unsent in grpc's buffers, counted in the budget) is
        # pinged after half of it and closed when the ping is not answered within the other half
        # (grpc waits for a ping's answer by its own ping timeout, 60 s by default, not by the
        # keepalive timeout: both are set)
        ping_ms = max(1, int(s.send_timeout_s * 500))
        self._server = aio.server(maximum_concurrent_rpcs=s.max_connections,
                                  options=[("grpc.max_receive_message_length", size),
                                           ("grpc.max_send_message_length", size),
                                           ("grpc.max_connection_age_ms", age_ms),
                                           ("grpc.max_connection_age_grace_ms", grace_ms),
                                           ("grpc.keepalive_time_ms", ping_ms),
                                           ("grpc.keepalive_timeout_ms", ping_ms),
                                           ("grpc.http2.ping_timeout_ms", ping_ms),
                                           # connections, as REST's: at most max_connections (grpc
                                           # closes the ones past it at once); one that has not sent
                                           # its HTTP/2 preface within header_timeout_s is closed, and
                                           # an idle one is pinged too (by default grpc pings only
                                           # connections with calls), so a peer that answers nothing
                                           # holds its connection for send_timeout_s, not until its
                                           # age -- idle sockets used to pile up without a bound
                                           # (below a C int's largest: grpc aborts the process at it)
                                           ("grpc.max_allowed_incoming_connections", min(s.max_connections, MAX_C_INT - 1)),
                                           ("grpc.server_handshake_timeout_ms", max(1, int(s.header_timeout_s * 1000))),
                                           ("grpc.keepalive_permit_without_calls", 1),
                                           # no window growth: a message not read yet stays at the
                                           # client (with it grpc took all of it); 61 MB messages
                                           # arrive ~0.3 s slower on loopback (a 3 s call)
                                           ("grpc.http2.bdp_probe", 0),
                                           # grpcio's default would let a second process bind the
                                           # same port and take a share of its connections
                                           ("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler(SERVICE_NAME, self._handlers()),
            grpc.method_handlers_generic_handler(HEALTH_SERVICE_NAME, {"Check": grpc.unary_unary_rpc_method_handler(
                self._wrap("HealthCheck", health_pb2.HealthCheckRequest, self.health_check, "none"),
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString)})])
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.port = (self._server.add_secure_port(f"{host}:{self.port}", self.credentials)
                     if self.credentials is not None else self._server.add_insecure_port(f"{host}:{self.port}"))
        await self._server.start()
        log.info("gRPC server listening on %s:%d", self.host, self.port)
        reserved, limit = self._reception_bytes(), self.dataplane.request_memory.limit
        if (at_once := limit // reserved) < 4:
            log.warning("each gRPC ModelInfer call (and ModelStreamInfer stream) reserves %d bytes of "
                        "HJSERVE_MAX_REQUEST_MEMORY_BYTES (%d) while its (next) message arrives (twice "
                        "HJSERVE_GRPC_MAX_MESSAGE_BYTES), so only %d receive at "
                        "once and the others wait: lower HJSERVE_GRPC_MAX_MESSAGE_BYTES to the messages you expect",
                        reserved, limit, at_once)

    def drain(self, grace_s: float) -> None:
        """Stop taking calls now (new ones get UNAVAILABLE; clients are sent GOAWAY and go
        elsewhere); the calls in flight have ``grace_s`` to finish, then they are cancelled."""
        if self._server is not None and self._stopping is None:
            self._stopping = asyncio.ensure_future(self._server.stop(grace=grace_s))

    async def stop(self) -> None:
        if self._server is not None:
            self.drain(self.settings.shutdown_grace_s)
            await self._stopping
            self._server = self._stopping = None

    # -- the method table -------------------------------------------------------------------------

    def _handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        table: list[tuple[str, Any, Any, Handler, str]] = [
            ("ServerLive", pb.ServerLiveRequest, pb.ServerLiveResponse, self.server_live, "none"),
            ("ServerReady", pb.ServerReadyRequest, pb.ServerReadyResponse, self.server_ready, "none"),
            ("ServerMetadata", pb.ServerMetadataRequest, pb.ServerMetadataResponse, self.server_metadata, "none"),
            ("ModelReady", pb.ModelReadyRequest, pb.ModelReadyResponse, self.model_ready, "key"),
            ("ModelMetadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse, self.model_metadata, "key"),
            ("ModelConfig", pb.ModelConfigRequest, pb.ModelConfigResponse, self.model_config, "key"),
            ("ModelStatistics", pb.ModelStatisticsRequest, pb.ModelStatisticsResponse, self.model_statistics, "key"),
            ("RepositoryIndex", pb.RepositoryIndexRequest, pb.RepositoryIndexResponse, self.repository_index,
             "admin"),
            ("RepositoryModelLoad", pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse, self.load,
             "admin"),
            ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse, self.unload,
             "admin"),
        ]
        # no request_deserializer anywhere: the handlers parse their messages (_parse)
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._wrap(name, request, handler, access),
                                                              response_serializer=response.SerializeToString)
                    for name, request, response, handler, access in table}
        # a unary call on the wire, served as one whose message the handler reads itself: grpc would
        # read it whole before the handler runs, so nothing would bound the messages in flight
        handlers["ModelInfer"] = grpc.stream_unary_rpc_method_handler(
            self._wrap("ModelInfer", pb.ModelInferRequest, self.model_infer, "key", receive=True),
            response_serializer=pb.ModelInferResponse.SerializeToString)
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer, response_serializer=pb.ModelStreamInferResponse.SerializeToString)
        return handlers

    def _wrap(self, method: str, message_type: Any, handler: Handler, access: str, receive: bool = False) -> Handler:
        """Auth, the error table, metrics and the access line around one unary RPC handler, which is
        given its ``message_type`` message parsed from the call's bytes once the key is checked.
        With ``receive`` grpc hands over the call's messages unread: its one message is read then
        (:meth:`_receive`), and the handler is given the hold on the request-memory budget it was
        read into."""
        settings = self.settings

        async def rpc(request: Any, context: aio.ServicerContext) -> Any:
            meta = _metadata(context)
            with _Call(method, meta, None, meta.get("x-request-id", "")) as call:
                context.set_trailing_metadata(call.ids)
                try:
                    key = key_from(meta.get("authorization"), meta.get("x-api-key"))
                    if access == "key":
                        check_api_key(settings, key)
                    elif access == "admin":
                        check_admin(settings, key)
                    if not receive:
                        call.request = request = _parse(message_type, request)
                        return await handler(request, context)
                    with self.dataplane.request_memory.hold() as memory:
                        call.request = request = _parse(message_type, await self._receive(context, memory))
                        return await handler(request, context, memory)
                # A failure is the call's status, set here and sent by grpc with no reply, not
                # context.abort(): grpc keeps the AbortError on the call, and its traceback holds this
                # frame, which holds the call -- a cycle that kept each refused message (and all it
                # decoded) until Python's cyclic collector ran, ~60 MB per 30 MB message.
                except HJServeError as exc:
                    _refuse(context, call, exc)
                except Exception:   # a bug: never a crash of the server, never a stack trace to the client
                    mapping = call.crashed()
                    _fail(context, grpc.StatusCode.INTERNAL, "internal server error",
                          [*call.ids, ("error-type", mapping.error_type)])
                return None

        return rpc

    async def model_stream_infer(self, requests: AsyncIterator[pb.ModelInferRequest],
                                 context: aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's ``ModelStreamInfer``: ModelInfer requests in, one ``ModelStreamInferResponse`` out per
        request, *in the order the requests came*, over one bidirectional stream (what
        ``tritonclient.grpc``'s ``start_stream`` / ``async_stream_infer`` and ``perf_analyzer
        --streaming`` use).

        Each message is a request of its own -- admission, the dynamic batcher, metrics, access line,
        exactly as ModelInfer -- and up to :data:`STREAM_INFLIGHT` of a stream's run at once (they
        batch with each other and with every other client's); the stream reads its next message only
        when one of those is answered and room for it is reserved in the request-memory budget
        (:meth:`_receive_next`), so HTTP/2 flow control holds the rest at the client. A request
        that fails is answered in its place by ``error_message`` (with its ``id``, model and version,
        and its ``error_type`` as a parameter, in ``infer_response``), and the stream goes on. The key
        is checked once, when the stream opens (a stream without a valid one ends UNAUTHENTICATED);
        a stream silent for ``body_timeout_s`` while another call waits for room ends
        DEADLINE_EXCEEDED."""
        meta = _metadata(context)
        context.set_trailing_metadata((("x-request-id", _request_id(meta.get("x-request-id", ""))),))

        def end(exc: HJServeError) -> None:   # a failure of the stream itself: one call, counted and logged
            with _Call("ModelStreamInfer", meta, None, meta.get("x-request-id", "")) as call:
                _refuse(context, call, exc)

        try:
            check_api_key(self.settings, key_from(meta.get("authorization"), meta.get("x-api-key")))
        except HJServeError as exc:   # the stream is refused
            end(exc)
            return
        slots = asyncio.Semaphore(STREAM_INFLIGHT)      # a slot is freed when its answer is written
        window: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()   # the running requests, in order

        async def read() -> None:
            memory = None
            try:
                while True:
                    await slots.acquire()               # the next message is read only into a free slot
                    memory = self.dataplane.request_memory.hold()   # and into room in the budget
                    # read with context.read() (in _read), not the request iterator: a stream
                    # cancelled with that generator suspended kept its last message until the
                    # cyclic collector ran
                    data = await self._receive_next(context, memory)
                    if data is aio.EOF:
                        return
                    try:
                        request, unreadable = _parse(pb.ModelInferRequest, data), None
                    except BadRequest as exc:             # answered in its place; the stream goes on
                        request, unreadable = pb.ModelInferRequest(), exc
                    del data
                    task = asyncio.ensure_future(self._stream_one(request, meta, memory, unreadable))
                    # the message's hold is the task's now, given back however it ends (a task
                    # cancelled before it ran too)
                    task.add_done_callback(lambda _, held=memory: held.release())
                    # nothing of this message stays in this frame while it waits for the next one
                    memory = request = unreadable = None
                    window.put_nowait(task)
            finally:
                if memory is not None:
                    memory.release()
                window.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await window.get()) is not None:
                try:
                    answer, held = await task
                except BaseException:   # the stream was cancelled, perhaps just as its task returned
                    _unwritten(task)
                    raise
                try:
                    yield answer                  # returns once grpc has written it to the connection
                finally:
                    held.release()
                slots.release()
            try:
                await reader                      # a failure of the stream itself ends it with its status
            except HJServeError as exc:
                end(exc)
        finally:
            reader.cancel()
            while not window.empty():
                if (task := window.get_nowait()) is not None:
                    _unwritten(task)

    async def _stream_one(self, request: pb.ModelInferRequest, meta: dict[str, str], memory: Hold,
                          unreadable: BadRequest | None = None) -> tuple[pb.ModelStreamInferResponse, Hold]:
        """One request of a stream, answered whatever happens: its response, or its error in its place;
        with the answer's hold on the request-memory budget, which the stream releases once it has
        written the answer (a stream whose client stops reading holds up to its window of answers,
        counted, and the requests after them are refused while they fill the budget). ``memory``:
        the hold the message was read into (:meth:`_receive_next`); ``unreadable``: the message did
        not parse (``request`` is then empty), and this is its answer."""
        with _Call("ModelStreamInfer", meta, request, request.id) as call:
            try:
                if unreadable is not None:
                    raise unreadable
                with memory:
                    response, answer = await self._infer(request, memory)
                return pb.ModelStreamInferResponse(infer_response=response), answer
            except HJServeError as exc:
                mapping, message = call.failed(exc), exc.message
            except Exception:   # a bug: this request's answer says so, the stream and the server go on
                mapping, message = call.crashed(), "internal server error"
            failed = pb.ModelStreamInferResponse(error_message=message)
            failed.infer_response.model_name, failed.infer_response.id = request.model_name, request.id
            failed.infer_response.model_version = request.model_version
            failed.infer_response.parameters["error_type"].string_param = mapping.error_type
            return failed, self.dataplane.request_memory.hold()

    # -- health and metadata ----------------------------------------------------------------------

    async def server_live(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def server_ready(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def health_check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        """``grpc.health.v1.Health/Check``: the server (``""``) and the inference service are SERVING
        when the server is ready -- ``ServerReady``, ``/v2/health/ready``: startup done and a model
        version serving -- and NOT_SERVING otherwise; another service is NOT_FOUND, as the protocol
        says. Like the other health calls it needs no key."""
        if request.service not in ("", SERVICE_NAME):
            raise NotFound(f"no service {request.service[:200]!r} here: ask for '' (the server) or "
                           f"{SERVICE_NAME!r}")
        status = health_pb2.HealthCheckResponse
        return status(status=status.SERVING if self.dataplane.ready() else status.NOT_SERVING)

    async def server_metadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return wire.to_message(self.dataplane.server_metadata(), pb.ServerMetadataResponse())

    async def model_ready(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        """Ready or not (an unknown or unready model is ``ready: false``, as Triton answers);
        a hostile name is still INVALID_ARGUMENT."""
        try:
            self.dataplane.model_ready(request.name, request.version or None)
        except (ModelNotFound, ModelNotReady):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def model_metadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        return wire.to_message(self.dataplane.model_metadata(request.name, request.version or None),
                               pb.ModelMetadataResponse())

    async def model_config(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        config = self.dataplane.model_config(request.name, request.version or None)
        return pb.ModelConfigResponse(config=wire.to_message(config, pb.ModelConfig()))

    async def model_statistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        stats = self.dataplane.model_stats(request.name or None, request.version or None)
        return wire.to_message(stats, pb.ModelStatisticsResponse())

    # -- inference --------------------------------------------------------------------------------

    def _reception_bytes(self) -> int:
        """What a ModelInfer call (a stream) reserves while its (next) message arrives: twice the largest message
        (received, then parsed), or the whole budget when that is less."""
        return min(2 * self.settings.grpc_max_message_bytes, self.dataplane.request_memory.limit)

    async def _receive(self, context: aio.ServicerContext, memory: Hold) -> bytes:
        """A unary call's message bytes, read only once the most they may take -- twice
        ``grpc_max_message_bytes`` (received, then parsed), or the whole budget when that is less --
        fits the request-memory budget in ``memory``. Until then it is not read, and HTTP/2 flow
        control keeps it at the client. Room is waited for, then the message, each up to
        ``body_timeout_s`` (503 ``request_memory_full``, 408 ``body_timeout``, as REST's bodies).

        Read with ``context.read()``, not grpc's request iterator: that iterator is an async
        generator in a reference cycle with its owner, and one left suspended after its first
        message kept the message until Python's cyclic collector ran (~30 MB per 30 MB message)."""
        await self.dataplane.request_memory.reserve(memory, self._reception_bytes(), self.settings.body_timeout_s)
        data = await self._read(context, lambda: True)
        if data is aio.EOF:
            raise BadRequest("the call ended without its message")
        return data

    async def _receive_next(self, context: aio.ServicerContext, memory: Hold) -> Any:
        """A stream's next message bytes (or ``aio.EOF``), read as a unary call's only into room
        reserved in ``memory``; room is waited for as long as it takes (the stream holds nothing
        meanwhile, and its client's message waits at the client). While the message does not come
        the stream holds that room, for as long as no other call waits for room; once one does, a
        stream silent for ``body_timeout_s`` ends (408 ``body_timeout``, DEADLINE_EXCEEDED), so idle
        streams never keep the others out for longer than that."""
        budget = self.dataplane.request_memory
        await budget.reserve(memory, self._reception_bytes(), None)
        return await self._read(context, lambda: budget.waiting > 0)

    async def _read(self, context: aio.ServicerContext, give_up: Callable[[], bool]) -> Any:
        """The call's next message bytes (``context.read()``), looking every ``body_timeout_s``
        whether to ``give_up`` waiting for them (then 408 ``body_timeout``, DEADLINE_EXCEEDED).

        A timer on the reading task, which it cancels, rather than a task for the read (a task keeps
        its result, the message, for as long as it lives, and asyncio's tasks live in reference
        cycles) or ``asyncio.timeout`` (which can only give up, and costs ~3 us a read against the
        timer's ~1 us on uvloop: ``bench/results/ab_read_timer.md``)."""
        timeout_s = self.settings.body_timeout_s
        loop, reader, expired = asyncio.get_running_loop(), asyncio.current_task(), False

        def look() -> None:
            nonlocal timer, expired
            if give_up():
                expired = True
                reader.cancel()
            else:
                timer = loop.call_later(timeout_s, look)

        timer = loop.call_later(timeout_s, look)
        try:
            return await context.read()
        except asyncio.CancelledError:
            if expired and reader.uncancel() == 0:
                raise BodyTimeout(f"the message did not arrive within {timeout_s:g} s "
                                  "(HJSERVE_BODY_TIMEOUT_S)") from None
            raise
        finally:
            timer.cancel()

    async def model_infer(self, request: pb.ModelInferRequest, context, memory: Hold) -> pb.ModelInferResponse:
        """``memory``: the hold the message was read into (:meth:`_receive`)."""
        message, answer = await self._infer(request, memory)
        # held until grpc has sent the answer: a client that reads nothing loses its connection
        # by send_timeout_s (the keepalive in start); one that reads but opens no window keeps it
        # until its connection's age runs out. No await between the take and this: a call
        # cancelled before it ran its callbacks runs this one too.
        context.add_done_callback(lambda _: answer.release())
        return message

    async def _infer(self, request: pb.ModelInferRequest, memory: Hold) -> tuple[pb.ModelInferResponse, Hold]:
        """One inference request, whose message ``memory`` holds room for (it then holds what
        decoding it takes, until the caller releases it), and its answer's hold on the
        request-memory budget: the answer must fit the budget as REST's do
        (:func:`service.rest.common.hold_answer`), and the caller releases that hold once the
        answer has left the server."""
        name, version = request.model_name, request.model_version or None
        with self.dataplane.admit(name, version, inline=False):
            memory.resize(wire.decode_memory(request))
            with tracing.span("decode"):
                decoded = wire.decode_infer_request(request)
            response = await self.dataplane.infer(name, version, decoded)
            with tracing.span("encode"):
                message = wire.encode_infer_response(response)
            # an answer grpc would not send is refused here, as what it is (grpc failed it on its
            # way out: a stream ended there, and the call was counted OK); the room a stream's
            # wrapping takes (a tag and a length) is left for it
            limit = self.dataplane.settings.grpc_max_message_bytes
            if (size := message.ByteSize()) > limit - _STREAM_WRAPPING:
                raise PayloadTooLarge(f"the answer is {size} bytes, more than grpc_max_message_bytes ({limit}) "
                                      "allows: ask for fewer rows or outputs in one request")
            answer = self.dataplane.request_memory.hold()
            answer.take(sum(len(raw) for raw in message.raw_output_contents))
        return message, answer

    # -- model repository -------------------------------------------------------------------------

    async def repository_index(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        items = self.dataplane.repository_index(bool(request.ready))
        return wire.to_message({"models": [item.model_dump(exclude_none=True) for item in items]},
                               pb.RepositoryIndexResponse())

    async def load(self, request: pb.RepositoryModelLoadRequest, context) -> pb.RepositoryModelLoadResponse:
        await self.dataplane.load_model(request.model_name, wire.parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def unload(self, request: pb.RepositoryModelUnloadRequest, context) -> pb.RepositoryModelUnloadResponse:
        await self.dataplane.unload_model(request.model_name, wire.parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()
