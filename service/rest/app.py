"""The FastAPI application: every route in one list, error handlers, HTTP metrics middleware."""

from __future__ import annotations

import collections
import inspect
import logging
import re
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__, metrics, tracing
from service.dataplane import DataPlane
from service.errors import (
    BadRequest,
    HJServeError,
    InternalError,
    InvalidParameter,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    ValidationFailed,
)
from service.logs import CURRENT_REQUEST, RequestRecord
from service.rest import batch, repository, v1, v2
from service.rest.common import require_admin, require_api_key
from service.rest.guards import BodyTimeoutMiddleware, error_parts, raw_error
from service.types import (
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    MetadataModelResponse,
    MetadataServerResponse,
    RepositoryIndexItem,
    RepositoryIndexRequest,
    RepositoryModelRequest,
    V1Request,
)

__all__ = ["ROUTES", "Transport", "create_app", "load_shedder"]

log = logging.getLogger("service")

_KEY = (require_api_key,)
_ADMIN = (require_admin,)
_WIRE_MODELS = (ErrorResponse, InferenceRequest, InferenceResponse, MetadataModelResponse, MetadataServerResponse,
                RepositoryIndexItem, RepositoryIndexRequest, RepositoryModelRequest, V1Request)


def _body(model: str, *types: str) -> dict[str, Any]:
    content = {t: {"schema": {"$ref": f"#/components/schemas/{model}"}} for t in types or ("application/json",)}
    return {"requestBody": {"required": False, "content": content}}


def _out(model: str) -> dict[str, Any]:
    return {"responses": {"200": {"description": "OK", "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}}}}


_INFER_DOC = {**_body("InferenceRequest", "application/json", "application/octet-stream"),
              **_out("InferenceResponse")}
_BATCH_DOC = {"requestBody": {"content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/V1Request"}},
    "application/x-ndjson": {"schema": {"type": "string", "description": "one JSON array of features per line"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "V2 binary tensor request "
                                                           "(Inference-Header-Content-Length)"}}}},
    "responses": {"200": {"description": "NDJSON, one object per row; a failure after the first chunk "
                                         "ends the stream with one {error, error_type, row} line", "content": {
        "application/x-ndjson": {"schema": {"type": "string"}}}}}}

#: Every status a route can answer besides 200, all with the ``ErrorResponse`` body.
_ERRORS = {
    400: "Bad request: malformed body, wrong shape/datatype/value, invalid parameter or model name",
    401: "Missing or invalid API key", 403: "The key is not allowed on this route",
    404: "Unknown model, version or route", 408: "The request body did not arrive in time",
    413: "Body, stream, line or row count over its limit (a compressed body: once inflated)",
    415: "A Content-Encoding other than identity, gzip or deflate, or a Transfer-Encoding other than chunked",
    431: "The request head (line and headers) over max_header_bytes (the connection is closed)",
    503: "Overloaded, the batch spool full or the server shutting down (Retry-After), or the model is not ready",
    504: "No result within the request timeout",
    507: "A batch body could not be stored (the spool's disk is full)",
    500: "Internal error (a bug: never expected)",
}
_ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in _ERRORS.items()}


def reject_unknown_query(request: Request) -> None:
    """A query parameter the route does not declare, or one given twice, is refused (400), not
    silently ignored (of ``?top_k=1&top_k=2`` one value would be dropped)."""
    if not request.scope.get("query_string"):
        return
    counts = collections.Counter(key for key, _ in request.query_params.multi_items())
    repeated = sorted(key for key, n in counts.items() if n > 1)
    if repeated:
        raise InvalidParameter(f"query parameter(s) {repeated[:8]} given more than once")
    route = request.scope.get("route")
    declared = {p.alias for p in route.dependant.query_params} if isinstance(route, APIRoute) else set()
    unknown = sorted(set(request.query_params) - declared)
    if unknown:
        allowed = f"; this route takes {sorted(declared)}" if declared else "; this route takes none"
        raise InvalidParameter(f"unknown query parameter(s) {unknown[:8]}{allowed}")


class GuardedRoute(APIRoute):
    """An APIRoute whose request checks run before FastAPI reads any parameter: the route's own
    (API key or admin key), then the unknown-query check, so a request without a key learns nothing
    about its parameters. They are plain calls rather than FastAPI dependencies, which cost more to
    solve than the checks themselves on every request."""

    def __init__(self, path: str, endpoint: Callable, *, checks: Sequence[Callable[[Request], None]] = (), **kw):
        self.checks = (*checks, reject_unknown_query)   # get_route_handler runs inside APIRoute.__init__
        super().__init__(path, endpoint, **kw)

    def get_route_handler(self, direct: bool = True) -> Callable:
        """The checks, then the endpoint: called directly where :func:`_direct_handler` allows (and
        ``direct``; ``direct=False`` is ``bench/route_overhead.py``'s baseline), else through FastAPI's
        request handler."""
        checks = self.checks
        handler = (direct and _direct_handler(self)) or super().get_route_handler()

        async def guarded(request: Request) -> Response:
            for check in checks:
                check(request)
            return await handler(request)
        return guarded


def _direct_handler(route: APIRoute) -> Callable | None:
    """``endpoint(request, **path parameters)`` for a route whose endpoint takes nothing FastAPI would
    read or validate -- the request and string path parameters, no query, header, cookie or body
    parameter, no dependency, nothing else FastAPI injects -- and returns a ``Response`` itself
    (nothing to serialise): FastAPI's request handler would make the same call after solving an empty
    set of dependencies, 15-30 us a request (``bench/results/route_overhead.md``). None for any other
    route (FastAPI's handler). The OpenAPI schema is FastAPI's either way (it reads the route, not
    the handler)."""
    d = route.dependant
    try:
        taken = set(inspect.signature(route.endpoint).parameters)
        if (d.query_params or d.header_params or d.cookie_params or d.body_params or d.dependencies
                or d.request_param_name is None or route.response_model is not None
                or taken != {d.request_param_name, *(p.name for p in d.path_params)}
                or any(p.field_info.annotation is not str or p.alias != p.name for p in d.path_params)
                or not inspect.iscoroutinefunction(route.endpoint)):
            return None
        returns = typing.get_type_hints(route.endpoint).get("return")
    except Exception:   # an annotation that does not resolve, another FastAPI's internals: its handler
        return None
    if not (isinstance(returns, type) and issubclass(returns, Response)):
        return None
    endpoint, name = route.endpoint, d.request_param_name

    async def direct(request: Request) -> Response:
        return await endpoint(**{name: request}, **request.path_params)
    return direct


def _route(path: str, endpoint: Callable, methods: str = "GET", deps=(), doc=None, **kw) -> APIRoute:
    return GuardedRoute(path, endpoint, methods=[methods], checks=deps, openapi_extra=doc, responses=_ERROR_RESPONSES,
                        **kw)


def _latest(fn: Callable) -> Callable:
    """fn(request, model_name, model_version) on a route without a version: no version parameter
    at all (not even a query parameter)."""
    async def endpoint(request: Request, model_name: str) -> Response:
        return await fn(request, model_name, None)

    endpoint.__name__, endpoint.__doc__ = fn.__name__, fn.__doc__
    return endpoint


def _versioned(fn: Callable) -> Callable:
    async def endpoint(request: Request, model_name: str, model_version: str) -> Response:
        return await fn(request, model_name, model_version)

    endpoint.__name__, endpoint.__doc__ = f"{fn.__name__}_version", fn.__doc__
    return endpoint


async def all_stats(request: Request) -> Response:
    return await v2.model_stats(request, None, None)


async def batch_latest(request: Request, model_name: str, top_k: int | None = None, tau: float | None = None,
                       chunk_rows: int | None = None, timeout: int | None = None,
                       layout: str | None = None) -> Response:
    return await batch.batch_attribution(request, model_name, None, top_k=top_k, tau=tau, chunk_rows=chunk_rows,
                                         timeout=timeout, layout=layout)


async def batch_version(request: Request, model_name: str, model_version: str, top_k: int | None = None,
                        tau: float | None = None, chunk_rows: int | None = None,
                        timeout: int | None = None, layout: str | None = None) -> Response:
    return await batch.batch_attribution(request, model_name, model_version, top_k=top_k, tau=tau,
                                         chunk_rows=chunk_rows, timeout=timeout, layout=layout)


async def metrics_endpoint(request: Request) -> Response:
    payload, content_type = metrics.render()
    return Response(payload, media_type=content_type)


_M = "/v2/models/{model_name}"
_MV = "/v2/models/{model_name}/versions/{model_version}"


def _pair(suffix: str, fn: Callable, method: str = "GET", doc=None, tags=("v2",)) -> list[APIRoute]:
    """The unversioned and the versioned route of one model operation."""
    return [_route(_M + suffix, _latest(fn), method, deps=_KEY, tags=list(tags), doc=doc),
            _route(_MV + suffix, _versioned(fn), method, deps=_KEY, tags=list(tags), doc=doc)]


#: The whole URL surface.
ROUTES: list[APIRoute] = [
    *_pair("/infer", v2.infer, "POST", doc=_INFER_DOC),   # first: the router tries routes in order
    _route("/v2/health/live", v2.live, tags=["health"]),
    _route("/v2/health/ready", v2.ready, tags=["health"]),
    _route("/v2", v2.server_metadata, tags=["v2"], doc=_out("MetadataServerResponse")),
    _route("/v2/models", v2.model_index, deps=_KEY, tags=["v2"]),
    _route("/v2/models/stats", all_stats, deps=_KEY, tags=["v2"]),
    *_pair("", v2.model_metadata, doc=_out("MetadataModelResponse")),
    *_pair("/ready", v2.model_ready),
    *_pair("/config", v2.model_config),
    *_pair("/stats", v2.model_stats),
    _route(_M + "/batch-attribution", batch_latest, "POST", deps=_KEY, tags=["batch"], doc=_BATCH_DOC),
    _route(_MV + "/batch-attribution", batch_version, "POST", deps=_KEY, tags=["batch"], doc=_BATCH_DOC),
    _route("/v2/repository/index", repository.index, "POST", deps=_ADMIN, tags=["repository"],
           doc=_body("RepositoryIndexRequest")),
    _route("/v2/repository/models/{model_name}/load", repository.load, "POST", deps=_ADMIN, tags=["repository"],
           doc=_body("RepositoryModelRequest")),
    _route("/v2/repository/models/{model_name}/unload", repository.unload, "POST", deps=_ADMIN,
           tags=["repository"], doc=_body("RepositoryModelRequest")),
    _route("/v1/models/{model_name}", v1.model_status, deps=_KEY, tags=["v1"]),
    _route("/v1/models/{model_name}:predict", v1.predict, "POST", deps=_KEY, tags=["v1"], doc=_body("V1Request")),
    _route("/v1/models/{model_name}:explain", v1.explain, "POST", deps=_KEY, tags=["v1"], doc=_body("V1Request")),
    _route("/metrics", metrics_endpoint, tags=["ops"], include_in_schema=False),
]


def _docs_routes() -> list:
    """Swagger UI at /docs with its assets from the installed swagger-ui-bundle package (works
    offline: no CDN), and the diagnostics page at /ui/ (``/`` redirects there)."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import RedirectResponse
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    async def docs(request: Request) -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="hjserve - API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    async def home(request: Request) -> Response:
        return RedirectResponse("/ui/")

    return [APIRoute("/docs", docs, methods=["GET"], include_in_schema=False),
            Mount("/docs/assets", app=StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets"),
            # the diagnostics page: static files over the public API (service/ui/)
            APIRoute("/", home, methods=["GET"], include_in_schema=False),
            Mount("/ui", app=StaticFiles(directory=Path(__file__).resolve().parents[1] / "ui", html=True), name="ui")]


#: A client-chosen request id is echoed when it matches this; otherwise the server makes one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_log = logging.getLogger("hjserve.access")


class HTTPMetricsMiddleware:
    """Per-request HTTP accounting, in one place: counts every request by route template (not raw
    path), method and status; gives it a request id (the client's ``X-Request-ID`` when it is
    1-128 characters of ``A-Za-z0-9._:-``, else a new one), returned in ``X-Request-ID``; and writes
    one access-log line (logger ``hjserve.access``: request id, method, route, model, version,
    status, duration). Requests shed by the connection protocol never reach here: they are counted
    in the metrics, not logged (a flood of 503s must not become a flood of log lines)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()
        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        method = scope.get("method", "")
        ui = scope.get("path", "").startswith("/ui")
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())} \
            if tracing.enabled() else {}

        record = RequestRecord()
        token = CURRENT_REQUEST.set(record)
        with tracing.server_span(f"HTTP {method}", carrier, **{"http.request.method": method,
                                                                "hjserve.request_id": request_id}) as span:
            trace_id = tracing.trace_id()

            async def send_status(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    extra = [(b"x-request-id", request_id.encode()), *(_UI_HEADERS if ui else _SECURITY_HEADERS)]
                    if trace_id:
                        extra.append((b"x-trace-id", trace_id.encode()))
                    message = {**message, "headers": [*message.get("headers", ()), *extra]}
                await send(message)

            try:
                await self.app(scope, receive, send_status)
            finally:
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                metrics.HTTP_REQUESTS.labels(path, method, str(status)).inc()
                params = scope.get("path_params") or {}
                if span is not None:
                    span.update_name(f"HTTP {method} {path}")
                    span.set_attributes({"http.route": path, "http.response.status_code": status,
                                         "hjserve.model": params.get("model_name") or "",
                                         "hjserve.version": params.get("model_version") or ""})
                if access_log.isEnabledFor(logging.INFO):
                    access_log.info("%s %s %d", method, path, status, extra={"access": {
                        "request_id": request_id, "method": method, "route": path,
                        "model": params.get("model_name"), "version": params.get("model_version"), "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000.0, 3), **record.fields(),
                        **({"trace_id": trace_id} if trace_id else {})}})
                CURRENT_REQUEST.reset(token)


#: On every response: no content sniffing (an error body is never read as HTML), and no page of this
#: server inside another site's frame (the diagnostics page holds an API key field: clickjacking).
_BASE_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                 (b"referrer-policy", b"no-referrer"))
_SECURITY_HEADERS = (*_BASE_HEADERS, (b"content-security-policy", b"frame-ancestors 'none'"))
#: The diagnostics page's (/ui/) policy is stricter: its own script, styles and the API only -- no
#: inline script or style, no other origin (``service/ui/`` is written for it; the browser test
#: fails on any violation).
_UI_HEADERS = (*_BASE_HEADERS, (
    b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"))


#: Routes whose requests are shed before the app when their model version is full:
#: (compiled path pattern, route template of the HTTP metric; None: the V1 operation's).
_SHED_ROUTES = [
    (re.compile(r"/v2/models/(?P<m>[^/]+)/infer"), _M + "/infer"),
    (re.compile(r"/v2/models/(?P<m>[^/]+)/versions/(?P<v>[^/]+)/infer"), _MV + "/infer"),
    (re.compile(r"/v1/models/(?P<m>[^/:]+):(?P<op>predict|explain)"), None),
]
_SHED_SUFFIXES = ("/infer", ":predict", ":explain")


def load_shedder(dataplane: DataPlane):
    """``shed(method, path)`` for :class:`~service.rest.guards.GuardedProtocol`: for an inference
    request, either a complete ready-made 503 response (its model version has ``max_queue_size``
    requests in flight) or the ``release`` of the in-flight slot reserved for it
    (:meth:`DataPlane.reserve`); None for any other request. Responses and metric children are built once per model
    version and route, so shedding costs a dictionary lookup and two counter increments."""
    settings = dataplane.settings
    responses: dict[tuple[str, int], bytes] = {}
    http_503: dict[str, Any] = {}

    def response_for(name: str, version: int) -> bytes:
        return raw_error(Overloaded(f"model '{name}' version {version} has max_queue_size "
                                    f"({settings.max_queue_size}) requests in flight; retry later",
                                    retry_after_s=settings.retry_after_s))

    def shed(method: str, path: str):
        if method != "POST" or not path.endswith(_SHED_SUFFIXES):
            return None
        for pattern, template in _SHED_ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            groups = match.groupdict()
            mv = dataplane.reserve(groups["m"], groups.get("v"))
            if mv is None or callable(mv):
                return mv   # unknown name (the app answers) or an admitted request's release
            route = template or f"/v1/models/{{model_name}}:{groups['op']}"
            counter = http_503.get(route)
            if counter is None:
                counter = http_503[route] = metrics.HTTP_REQUESTS.labels(route, method, "503")
            counter.inc()
            key = (mv.name, mv.version)
            raw = responses.get(key)
            if raw is None:
                raw = responses[key] = response_for(*key)
            return raw
        return None

    return shed


def _error_response(exc: HJServeError, extra: dict[str, str] | None = None) -> Response:
    """Every error response the app sends: :func:`~service.rest.guards.error_parts` (the one table,
    the headers the error implies) as an ASGI response."""
    status, headers, body = error_parts(exc)
    response = Response(body, status_code=status)
    response.raw_headers = [*headers, *((k.lower().encode(), v.encode()) for k, v in (extra or {}).items())]
    return response


async def _on_service_error(request: Request, exc: HJServeError) -> Response:
    return _error_response(exc)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404:
        return _error_response(NotFound(f"no route for {request.method} {request.url.path}"))
    if exc.status_code == 405:
        return _error_response(MethodNotAllowed(f"method {request.method} not allowed on {request.url.path}"),
                               exc.headers)
    # any other framework-raised status: still an error of the one table
    error = BadRequest(str(exc.detail)) if 400 <= exc.status_code < 500 else InternalError(str(exc.detail))
    return _error_response(error, exc.headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return _error_response(ValidationFailed(f"{where}: {first.get('msg', 'invalid request')}"))


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_response(InternalError("internal server error"))


class Transport(Protocol):
    """Another transport served beside HTTP from the same dataplane and event loop (gRPC)."""

    async def start(self) -> None: ...

    def drain(self, grace_s: float) -> None:
        """The server's shutdown began: take no new work, let what is in flight finish within
        ``grace_s`` (returns at once; :meth:`stop` waits)."""

    async def stop(self) -> None: ...


def create_app(dataplane: DataPlane, transports: Sequence[Transport] = ()) -> FastAPI:
    """The HTTP app over ``dataplane``. At startup the dataplane loads its repository and the other
    ``transports`` start; at shutdown they stop, then the dataplane releases every model. When the
    HTTP server's shutdown begins, before it waits for the requests in flight, it calls
    ``app.state.drain()``: the dataplane and the other transports drain for ``shutdown_grace_s``."""
    settings = dataplane.settings

    def drain() -> None:
        log.info("shutting down: not ready, draining for at most %g s (%d inference requests in flight)",
                 settings.shutdown_grace_s, dataplane.in_flight)
        dataplane.drain(settings.shutdown_grace_s)
        for transport in transports:
            transport.drain(settings.shutdown_grace_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await dataplane.start()
        started: list[Transport] = []
        try:
            for transport in transports:
                await transport.start()
                started.append(transport)
            yield
        finally:
            for transport in reversed(started):
                await transport.stop()
            await dataplane.stop()

    app = FastAPI(title="hjserve", version=__version__, lifespan=lifespan, routes=[*ROUTES, *_docs_routes()],
                  docs_url=None, redoc_url=None,
                  description="Open Inference Protocol (KServe V2) server for LSE networks with "
                              "Hamilton-Jacobi diagnostics. Every error is {error, error_type}.")
    app.state.settings = settings
    app.state.drain = drain
    app.state.dataplane = dataplane
    app.state.spool_budget = batch.spool_budget(settings)
    app.add_exception_handler(HJServeError, _on_service_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s)
    app.add_middleware(HTTPMetricsMiddleware)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            # schema failures answer 400 with the ErrorResponse body (declared on every route),
            # never FastAPI's 422 {"detail"}
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            for model in _WIRE_MODELS:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
