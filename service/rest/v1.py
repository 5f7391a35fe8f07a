"""V1 routes for humans: ``{"instances": [...]}`` -> readable predictions and explanations."""

from __future__ import annotations

import time

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from service.codecs import first_error, parse_json
from service.errors import EmptyBatch, HJServeError, InvalidJSON, InvalidShape, ValidationFailed, lookup
from service.explain import EXPLAIN_OUTPUTS, PREDICT_OUTPUTS, explain_rows, predict_rows
from service.rest.common import admission, dataplane_of, json_response, read_body, settings_of
from service.types import V1Request

__all__ = ["explain", "model_status", "predict"]


async def _run(request: Request, model_name: str, outputs: tuple[str, ...]):
    dataplane = dataplane_of(request)
    with admission(request, model_name):   # 503 before the body is read
        return await _run_admitted(request, dataplane, model_name, outputs)


async def _run_admitted(request: Request, dataplane, model_name: str, outputs: tuple[str, ...]):
    start = time.perf_counter()
    body = await read_body(request, settings_of(request).max_body_bytes)
    obj = parse_json(body)
    if not isinstance(obj, dict):
        raise InvalidJSON('the body must be a JSON object {"instances": [[...], ...]}')
    try:
        payload = V1Request.model_validate(obj)
    except ValidationError as exc:
        raise ValidationFailed(first_error(exc)) from None
    mv = dataplane.repository.get(model_name)
    try:
        wanted = [n for n in outputs if n in mv.output_names]
        options = dataplane.resolve_options(mv, dict(payload.parameters or {}), wanted)
        if not payload.instances:
            raise EmptyBatch("instances has no rows")
        if len({len(row) for row in payload.instances}) > 1:
            raise InvalidShape("instances must be rows of equal length")
        array = np.asarray(payload.instances, dtype=np.float64).reshape(len(payload.instances), -1)

        def rows_of(current):
            return dataplane.check_rows(current, array, "FP64", array.shape, "instances")

        done = await dataplane.predict(model_name, None, rows_of, options.tau, options.timeout_s)
        mv = done.mv
        mv.metrics.record_rows(done.outputs, mv.task)
    except HJServeError as exc:
        mv.metrics.failed(lookup(exc).error_type, time.perf_counter() - start)
        raise
    mv.metrics.succeeded(time.perf_counter() - start, done.queue_s, done.compute_s, done.rows)
    return mv, done.outputs, options


async def predict(request: Request, model_name: str) -> Response:
    mv, outputs, _ = await _run(request, model_name, PREDICT_OUTPUTS)
    return json_response(predict_rows(mv, outputs))


async def explain(request: Request, model_name: str) -> Response:
    mv, outputs, options = await _run(request, model_name, EXPLAIN_OUTPUTS)
    return json_response(explain_rows(mv, outputs, options.top_k))


async def model_status(request: Request, model_name: str) -> Response:
    dataplane_of(request).repository.get(model_name)
    return json_response({"name": model_name, "ready": True})
