"""The HTTP transport in process: the app over a dataplane over a fake-backend repository, through an
ASGI client (decode -> dataplane -> encode; errors through the one table, headers derived at the edge)."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import D
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.errors import ERROR_TABLE, BodyTimeout, HJServeError, Overloaded, Unauthorized, lookup
from service.rest.guards import error_parts, http_headers


def _infer(client, model="fclf", n=2, **body):
    x = np.random.default_rng(0).normal(size=(n, D)).round(3).tolist()
    payload = {"inputs": [{"name": "input", "shape": [n, D], "datatype": "FP64", "data": x}], **body}
    return client.post(f"/v2/models/{model}/infer", json=payload)


def test_metadata_config_index_ready(client):
    assert client.get("/v2/models").json() == {"models": [{"name": "fclf", "versions": ["1", "2"]},
                                                          {"name": "freg", "versions": ["1"]}]}
    meta = client.get("/v2/models/freg").json()
    assert [i["name"] for i in meta["inputs"]] == ["input", "tau"] and meta["inputs"][1]["shape"] == [-1, 1]
    config = client.get("/v2/models/freg/config").json()
    assert config["input"][1] == {"name": "tau", "data_type": "TYPE_FP64", "dims": [1], "optional": True}
    assert config["parameters"]["model_control_mode"] == {"string_value": "explicit"}
    assert config["version_policy"] == {"all": {}}
    assert client.get("/v2/models/fclf/versions/1/ready").json() == {"name": "fclf", "ready": True}
    assert client.get("/v1/models/fclf").json() == {"name": "fclf", "ready": True}
    index = client.post("/v2/repository/index").json()
    assert {"name": "fclf", "version": "1", "state": "READY", "reason": ""} in index


def test_infer_and_v1_through_the_app(client):
    r = _infer(client, outputs=[{"name": "prediction"}, {"name": "attribution_weight"}], parameters={"top_k": 2})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"]
    assert out[0]["shape"] == [2] and out[1]["shape"] == [2, 2]
    r = client.post("/v1/models/fclf:explain", json={"instances": [[0.1] * D]})
    assert r.status_code == 200 and r.json()["model_version"] == "2" and len(r.json()["explanations"]) == 1


def test_every_error_goes_through_the_one_table(client):
    r = client.get("/v2/models/nope/config")
    assert r.status_code == 404 and r.json() == {"error": "unknown model 'nope'", "error_type": "model_not_found"}
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = client.delete("/v2/models/fclf")
    assert r.status_code == 405 and r.json()["error_type"] == "method_not_allowed" and "allow" in r.headers
    r = _infer(client, parameters={"tau": "x"}, outputs=[{"name": "prediction"}])
    assert r.status_code == 400 and r.json()["error_type"] == "invalid_parameter"


def test_transport_headers_are_derived_at_the_edge_from_typed_fields():
    """Core errors carry no HTTP headers: Retry-After comes from Overloaded.retry_after_s."""
    assert http_headers(Overloaded("full", retry_after_s=7)) == {"Retry-After": "7"}
    assert http_headers(Unauthorized("no key")) == {"WWW-Authenticate": "Bearer"}
    assert http_headers(BodyTimeout("slow")) == {"Connection": "close"}
    status, headers, body = error_parts(Overloaded("full", retry_after_s=2))
    assert status == 503 and (b"retry-after", b"2") in headers and b'"error_type":"overloaded"' in body
    assert not hasattr(HJServeError("x"), "headers")


def test_the_error_table_maps_every_error_to_http_and_grpc():
    import grpc

    for cls, mapping in ERROR_TABLE.items():
        assert 400 <= mapping.status <= 599 and mapping.error_type
        assert isinstance(getattr(grpc.StatusCode, mapping.grpc), grpc.StatusCode), cls
    assert lookup(Overloaded).grpc == "UNAVAILABLE" and lookup(Unauthorized).grpc == "UNAUTHENTICATED"


@pytest.mark.parametrize("settings_overrides", [{"api_keys": "k1", "admin_key": "root"}])
def test_keys_on_the_app(client, settings_overrides):
    r = client.get("/v2/models/fclf")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v2/models/fclf", headers={"x-api-key": "k1"}).status_code == 200
    assert client.post("/v2/repository/index", headers={"x-api-key": "k1"}).status_code == 403
    assert client.post("/v2/repository/index", headers={"authorization": "Bearer root"}).status_code == 200
    assert client.get("/v2/health/ready").status_code == 200   # health stays open


@pytest.mark.parametrize("settings_overrides", [{"api_keys": "k1", "admin_key": "root"}])
def test_route_checks_come_before_any_parameter_is_read(client, settings_overrides):
    """A request without a key learns nothing about its parameters (401 before a typed query
    parameter is parsed or an unknown one refused); with the key the same queries are 400s."""
    bad = "/v2/models/fclf/batch-attribution?top_k=notanint"
    r = client.post(bad, content="[1, 2, 3, 4]", headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
    r = client.post(bad, content="[1, 2, 3, 4]", headers={"content-type": "application/x-ndjson", "x-api-key": "k1"})
    assert r.status_code == 400
    assert client.get("/v2/models/fclf?x=1").status_code == 401
    r = client.get("/v2/models/fclf?x=1", headers={"x-api-key": "k1"})
    assert r.status_code == 400 and "unknown query parameter" in r.json()["error"]
    assert client.post("/v2/repository/index?x=1", headers={"x-api-key": "k1"}).status_code == 403


@pytest.mark.parametrize("settings_overrides", [{"model_control_mode": "poll", "repository_poll_s": 60}])
def test_poll_mode_refuses_load_calls_over_http(client, settings_overrides):
    r = client.post("/v2/repository/models/fclf/load")
    assert r.status_code == 400 and "poll" in r.json()["error"]
    assert client.get("/v2/models/fclf/config").json()["parameters"]["model_control_mode"]["string_value"] == "poll"


@pytest.mark.parametrize("settings_overrides", [{"model_control_mode": "none"}])
def test_by_default_nothing_loads_or_unloads_after_startup(client, settings_overrides):
    """Triton's default mode: what loaded at startup is served, and an anonymous client cannot empty
    the server (on bcbf411 the default was explicit, and with no keys configured -- the default --
    anyone reaching the port could unload every model). The index still answers."""
    from service.settings import Settings

    assert Settings.model_fields["model_control_mode"].default == "none"
    for op in ("unload", "load"):
        r = client.post(f"/v2/repository/models/fclf/{op}")
        assert r.status_code == 400 and "HJSERVE_MODEL_CONTROL_MODE=explicit" in r.json()["error"], r.text
    assert client.get("/v2/models/fclf/ready").status_code == 200
    assert {m["name"] for m in client.post("/v2/repository/index").json()} >= {"fclf", "freg"}


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://testserver.evil.example"])
def test_repository_routes_refuse_other_sites_pages(client, origin):
    """A page on another site can send a POST to a server it cannot read (no preflight for a bodiless
    or text/plain POST): with no keys configured, on 48b0357 any site a developer visited could unload
    the models of an hjserve on their machine in explicit mode. A browser names the page's origin;
    one that is not this server's is refused, before the key check. Clients that send no Origin
    (Triton's, curl) and the server's own pages pass."""
    for op in ("unload", "load"):
        r = client.post(f"/v2/repository/models/fclf/{op}", headers={"origin": origin})
        assert r.status_code == 403 and "cross-origin" in r.json()["error"], r.text
    assert client.post("/v2/repository/index", headers={"origin": origin}).status_code == 403
    assert client.get("/v2/models/fclf/ready").status_code == 200
    assert client.post("/v2/repository/models/fclf/unload", headers={"origin": "http://testserver"}).status_code == 200
    assert client.post("/v2/repository/models/fclf/load").status_code == 200


def test_batch_attribution_streams_ndjson_rows(client):
    lines = "\n".join("[0.5, 1, 2, 3]" for _ in range(5))
    r = client.post("/v2/models/fclf/versions/1/batch-attribution?chunk_rows=2", content=lines,
                    headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 200 and r.headers["x-model-version"] == "1"
    rows = [__import__("json").loads(line) for line in r.text.splitlines()]
    assert [row["row"] for row in rows] == [0, 1, 2, 3, 4] and rows[0]["class"] in ("alpha", "beta", "gamma")
    stats = client.get("/v2/models/fclf/versions/1/stats").json()["model_stats"][0]
    assert stats["inference_count"] == 5 and stats["inference_stats"]["success"]["count"] == 1


def test_one_access_line_per_request_with_rows_and_timings(client, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="hjserve.access"):
        _infer(client, n=3, outputs=[{"name": "prediction"}], parameters={})
        client.post("/v2/models/fclf/batch-attribution", content="\n".join("[1, 2, 3, 4]" for _ in range(7)),
                    headers={"content-type": "application/x-ndjson", "x-request-id": "job-1"})
        client.get("/v2/models/nope")
    lines = [r.access for r in caplog.records if r.name == "hjserve.access"]
    infer, batch, missing = lines[-3:]
    assert infer["rows"] == 3 and infer["queue_ms"] >= 0 and infer["compute_ms"] > 0 and infer["status"] == 200
    assert batch["rows"] == 7 and batch["request_id"] == "job-1" and batch["model"] == "fclf"
    assert missing["rows"] == 0 and "queue_ms" not in missing and missing["status"] == 404


def test_routes_with_nothing_to_read_call_their_endpoint_directly():
    # FastAPI's handler solves an empty set of dependencies on every request (the largest cost of
    # the route before the endpoint runs); a route whose endpoint reads only the request and string
    # path parameters and returns a Response is called directly; every other route keeps FastAPI's
    from service.rest.app import ROUTES, _direct_handler

    direct = {r.path for r in ROUTES if _direct_handler(r) is not None}
    assert {"/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer",
            "/v1/models/{model_name}:predict", "/v2/models/{model_name}/config"} <= direct
    assert not any(p.endswith("/batch-attribution") for p in direct)   # query parameters: FastAPI reads them
    router = APIRouter()

    @router.get("/a/{n}")
    async def typed(request: Request, n: int) -> Response:      # FastAPI converts and validates n
        return Response()

    @router.get("/b")
    async def model(request: Request) -> dict:                  # FastAPI serialises the answer
        return {}

    @router.get("/c/{n}")
    def blocking(request: Request, n: str) -> Response:         # FastAPI runs it on a thread
        return Response()

    @router.get("/d/{n}")
    async def injected(request: Request, n: str, response: Response) -> Response:   # FastAPI passes response
        return response

    @router.get("/e/{n}", response_model=None)
    async def unresolved(request: Request, n: str) -> Nowhere:  # noqa: F821 -- the return type does not resolve
        return Response()

    assert [_direct_handler(r) for r in router.routes] == [None, None, None, None, None]


def test_a_direct_route_answers_with_its_path_parameters_and_checks(client, settings_overrides):
    assert client.get("/v2/models/fclf/versions/2").json()["name"] == "fclf"
    assert client.get("/v2/models/fclf/versions/9").status_code == 404     # the version reached the endpoint
    assert client.get("/v2/models/nope/versions/1").status_code == 404
    x = np.zeros((1, D)).tolist()
    r = client.post("/v2/models/fclf/versions/1/infer",
                    json={"inputs": [{"name": "input", "shape": [1, D], "datatype": "FP64", "data": x}]})
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    r = client.get("/v2/models/fclf/versions/1/ready?x=1")
    assert r.status_code == 400 and "unknown query parameter" in r.json()["error"]
