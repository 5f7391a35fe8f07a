"""The FastAPI application: every route in one list, error handlers, HTTP metrics middleware."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__, metrics
from service.dataplane import DataPlane
from service.errors import HJServeError, MethodNotAllowed, NotFound, error_body, lookup
from service.repository import ModelRepository
from service.rest import batch, repository, v1, v2
from service.rest.common import json_response, require_admin, require_api_key
from service.settings import Settings
from service.types import (
    InferenceRequest,
    InferenceResponse,
    MetadataModelResponse,
    MetadataServerResponse,
    RepositoryIndexItem,
    RepositoryIndexRequest,
    V1Request,
)

__all__ = ["ROUTES", "create_app"]

log = logging.getLogger("service")

_KEY = [Depends(require_api_key)]
_ADMIN = [Depends(require_admin)]
_WIRE_MODELS = (InferenceRequest, InferenceResponse, MetadataModelResponse, MetadataServerResponse,
                RepositoryIndexItem, RepositoryIndexRequest, V1Request)


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
    "responses": {"200": {"description": "NDJSON, one object per row", "content": {
        "application/x-ndjson": {"schema": {"type": "string"}}}}}}


def _route(path: str, endpoint: Callable, methods: str = "GET", deps=None, doc=None, **kw) -> APIRoute:
    return APIRoute(path, endpoint, methods=[methods], dependencies=deps, openapi_extra=doc, **kw)


async def metrics_endpoint(request: Request) -> Response:
    payload, content_type = metrics.render()
    return Response(payload, media_type=content_type)


_M = "/v2/models/{model_name}"
_MV = "/v2/models/{model_name}/versions/{model_version}"

#: The whole URL surface.
ROUTES: list[APIRoute] = [
    _route("/v2/health/live", v2.live, tags=["health"]),
    _route("/v2/health/ready", v2.ready, tags=["health"]),
    _route("/v2", v2.server_metadata, tags=["v2"], doc=_out("MetadataServerResponse")),
    _route("/v2/models/stats", v2.model_stats, deps=_KEY, tags=["v2"]),
    _route(_M, v2.model_metadata, deps=_KEY, tags=["v2"], doc=_out("MetadataModelResponse")),
    _route(_MV, v2.model_metadata, deps=_KEY, tags=["v2"], doc=_out("MetadataModelResponse")),
    _route(_M + "/ready", v2.model_ready, deps=_KEY, tags=["v2"]),
    _route(_MV + "/ready", v2.model_ready, deps=_KEY, tags=["v2"]),
    _route(_M + "/config", v2.model_config, deps=_KEY, tags=["v2"]),
    _route(_MV + "/config", v2.model_config, deps=_KEY, tags=["v2"]),
    _route(_M + "/stats", v2.model_stats, deps=_KEY, tags=["v2"]),
    _route(_MV + "/stats", v2.model_stats, deps=_KEY, tags=["v2"]),
    _route(_M + "/infer", v2.infer, "POST", deps=_KEY, tags=["v2"], doc=_INFER_DOC),
    _route(_MV + "/infer", v2.infer, "POST", deps=_KEY, tags=["v2"], doc=_INFER_DOC),
    _route(_M + "/batch-attribution", batch.batch_attribution, "POST", deps=_KEY, tags=["batch"], doc=_BATCH_DOC),
    _route(_MV + "/batch-attribution", batch.batch_attribution, "POST", deps=_KEY, tags=["batch"],
           doc=_BATCH_DOC),
    _route("/v2/repository/index", repository.index, "POST", deps=_ADMIN, tags=["repository"],
           doc=_body("RepositoryIndexRequest")),
    _route("/v2/repository/models/{model_name}/load", repository.load, "POST", deps=_ADMIN, tags=["repository"]),
    _route("/v2/repository/models/{model_name}/unload", repository.unload, "POST", deps=_ADMIN,
           tags=["repository"]),
    _route("/v1/models/{model_name}", v1.model_status, deps=_KEY, tags=["v1"]),
    _route("/v1/models/{model_name}:predict", v1.predict, "POST", deps=_KEY, tags=["v1"], doc=_body("V1Request")),
    _route("/v1/models/{model_name}:explain", v1.explain, "POST", deps=_KEY, tags=["v1"], doc=_body("V1Request")),
    _route("/metrics", metrics_endpoint, tags=["ops"], include_in_schema=False),
]


class HTTPMetricsMiddleware:
    """Counts every HTTP request by route template (not raw path), method and status."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            metrics.HTTP_REQUESTS.labels(path, scope.get("method", ""), str(status)).inc()


def _error_response(exc: HJServeError) -> Response:
    mapping = lookup(exc)
    return json_response(error_body(exc.message, mapping.error_type), mapping.status, exc.headers or None)


async def _on_service_error(request: Request, exc: HJServeError) -> Response:
    return _error_response(exc)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404:
        return _error_response(NotFound(f"no route for {request.method} {request.url.path}"))
    if exc.status_code == 405:
        response = _error_response(MethodNotAllowed(f"method {request.method} not allowed on {request.url.path}"))
        if exc.headers:
            response.headers.update(exc.headers)
        return response
    return json_response(error_body(str(exc.detail), "http_error"), exc.status_code, exc.headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return json_response(error_body(f"{where}: {first.get('msg', 'invalid request')}", "validation_error"), 422)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return json_response(error_body("internal server error", "internal_error"), 500)


def create_app(settings: Settings | None = None, repository: ModelRepository | None = None) -> FastAPI:
    """The app for ``settings``; the repository loads at startup and is released at shutdown."""
    settings = settings or Settings()
    repository = repository or ModelRepository(settings)
    dataplane = DataPlane(settings, repository)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await repository.load_all()
        try:
            yield
        finally:
            await repository.close()

    app = FastAPI(title="hjserve", version=__version__, lifespan=lifespan, routes=list(ROUTES),
                  description="Open Inference Protocol (KServe V2) server for LSE networks with "
                              "Hamilton-Jacobi diagnostics.")
    app.state.settings = settings
    app.state.dataplane = dataplane
    app.add_exception_handler(HJServeError, _on_service_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(HTTPMetricsMiddleware)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _WIRE_MODELS:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
