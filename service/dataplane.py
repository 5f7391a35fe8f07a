"""Transport-free logic of the Open Inference Protocol: metadata, config, readiness and inference.

Nothing here knows HTTP. Every number in a response comes from the model's graph / module; the
dataplane only validates, batches, selects outputs and slices ``attribution_*`` to top-k.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from hjmodel import serving
from service import __version__
from service.batching import BatcherClosed
from service.codecs import DATATYPES
from service.errors import (
    BadRequest,
    EmptyBatch,
    HJServeError,
    InvalidDatatype,
    InvalidParameter,
    InvalidShape,
    InvalidValue,
    Overloaded,
    UnknownInput,
    UnknownOutput,
    lookup,
)
from service.repository import ModelRepository, ModelVersion
from service.settings import Settings
from service.types import InferOutput, InferRequest, InferResponse

__all__ = ["DataPlane", "EXTENSIONS", "InferOptions", "SERVER_NAME"]

SERVER_NAME = "hjserve"

#: Protocol extensions this server implements.
EXTENSIONS = ("binary_tensor_data", "model_configuration", "model_repository", "parameters", "statistics")

_TOPK_OUTPUTS = frozenset(o.name for o in serving.OUTPUTS if o.row_shape == ("k",))
_INPUT_DATATYPES = ("FP32", "FP64")
_TRITON_TYPES = {"BOOL": "TYPE_BOOL", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64"}


@dataclass(frozen=True)
class Prediction:
    """Every graph output for a request's rows, from the version that computed them."""

    mv: ModelVersion
    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    rows: int


@dataclass(frozen=True)
class InferOptions:
    """Resolved request parameters."""

    outputs: tuple[str, ...]
    top_k: int
    tau: float
    timeout_s: float


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _output_spec(task: str) -> dict[str, serving.OutputSpec]:
    return {o.name: o for o in serving.outputs_for(task)}


class DataPlane:
    """Answers V2 requests against a :class:`~service.repository.ModelRepository`."""

    def __init__(self, settings: Settings, repository: ModelRepository):
        self.settings = settings
        self.repository = repository

    # -- health and metadata ----------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.repository.is_ready()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        try:
            self.repository.get(name, version)
        except HJServeError:
            return False
        return True

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        mv = self.repository.get(name, version)
        return {
            "name": name,
            "versions": [str(v) for v in self.repository.ready_versions(name)],
            "platform": mv.backend.platform,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, mv.n_features]}],
            "outputs": [{"name": o.name, "datatype": o.datatype, "shape": [-1, *self._dims(mv, o)]}
                        for o in serving.outputs_for(mv.task)],
        }

    def _dims(self, mv: ModelVersion, o: serving.OutputSpec) -> list[int]:
        """Per-row dims of an output; top-k outputs are -1: their size is the request's top_k."""
        sizes = {"d": mv.n_features, "K": int(mv.spec["n_outputs"]), "k": -1}
        return [sizes[s] for s in o.row_shape]

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton-style model configuration (per-row scalar outputs: dims [1] reshaped to [])."""
        mv = self.repository.get(name, version)
        s = self.settings
        k = mv.top_k_max
        outputs = []
        for o in serving.outputs_for(mv.task):
            dims = self._dims(mv, o)
            entry: dict[str, Any] = {"name": o.name, "data_type": _TRITON_TYPES[o.datatype],
                                     "dims": dims or [1]}
            if not dims:
                entry["reshape"] = {"shape": []}
            outputs.append(entry)
        spec = mv.spec
        params = {
            "kind": spec.get("kind"), "task": spec.get("task"), "eps": spec.get("eps"), "t": spec.get("t"),
            "top_k_max": k, "default_top_k": min(s.default_top_k, k), "default_tau": s.default_tau,
            "class_names": spec.get("class_names"),
            "alpha": (spec.get("calibration") or {}).get("alpha"),
            "default_outputs": self.default_outputs(mv),
            "device": mv.backend.device,
        }
        return {
            "name": name,
            "platform": mv.backend.platform,
            "backend": mv.backend.name,
            "version_policy": {"all": {}},   # every version on disk is loaded and addressable
            "max_batch_size": s.max_batch_size,
            "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [mv.n_features]}],
            "output": outputs,
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(s.max_queue_delay_ms * 1000),
                "default_queue_policy": {"max_queue_size": s.max_queue_size,
                                         "default_timeout_microseconds": int(s.request_timeout_s * 1e6)},
            },
            "instance_group": [{"count": 1, "kind": "KIND_GPU" if mv.backend.device == "cuda" else "KIND_CPU"}],
            "parameters": {key: {"string_value": value if isinstance(value, str) else _json(value)}
                           for key, value in params.items() if value is not None},
        }

    def model_index(self) -> dict[str, Any]:
        """``GET /v2/models``: the models with at least one ready version, and those versions."""
        return {"models": [{"name": m, "versions": [str(v) for v in self.repository.ready_versions(m)]}
                           for m in self.repository.model_names() if self.repository.ready_versions(m)]}

    def model_stats(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics extension: every ready version, or one model / version."""
        if name is None:
            versions = [self.repository.get(m, str(v)) for m in self.repository.model_names()
                        for v in self.repository.ready_versions(m)]
        elif version is None:
            self.repository.get(name)
            versions = [self.repository.get(name, str(v)) for v in self.repository.ready_versions(name)]
        else:
            versions = [self.repository.get(name, version)]
        return {"model_stats": [mv.metrics.stats.as_triton(mv.name, str(mv.version)) for mv in versions]}

    # -- inference --------------------------------------------------------------------------------

    def _full(self, mv: ModelVersion) -> bool:
        """Whether ``mv`` has ``max_queue_size`` requests in flight (the rejection is counted)."""
        if mv.in_flight < self.settings.max_queue_size:
            return False
        mv.metrics.failed(lookup(Overloaded).error_type)
        return True

    def reserve(self, name: str, version: str | None = None) -> ModelVersion | Callable[[], None] | None:
        """The connection-level form of :meth:`admit`: the full model version (the request is to be
        rejected), or a ``release`` callable holding one in-flight slot, or None when the name does
        not resolve (the app then answers the error)."""
        try:
            mv = self.repository.get(name, version)
        except HJServeError:
            return None
        if self._full(mv):
            return mv
        mv.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                mv.in_flight -= 1
        return release

    @contextlib.contextmanager
    def admit(self, name: str, version: str | None = None, *, reserved: bool = False) -> Iterator[ModelVersion]:
        """Admission control, before a request's body is read: at most ``max_queue_size`` requests
        per model version may be in flight (reading, decoding, queued or computing); beyond that
        the request is rejected at once (Overloaded: 503 + Retry-After) without reading or decoding
        its body. ``reserved``: the connection protocol already holds this request's slot
        (:meth:`reserve`, used by :mod:`service.rest.guards`), so it is not counted twice."""
        mv = self.repository.get(name, version)
        if reserved:
            yield mv
            return
        if self._full(mv):
            raise Overloaded(f"model '{name}' has {mv.in_flight} requests in flight (max_queue_size "
                             f"{self.settings.max_queue_size}); retry later",
                             headers={"Retry-After": str(self.settings.retry_after_s)})
        mv.in_flight += 1
        try:
            yield mv
        finally:
            mv.in_flight -= 1

    def default_outputs(self, mv: ModelVersion) -> list[str]:
        names = set(mv.output_names)
        return [n for n in serving.DEFAULT_OUTPUTS if n in names]

    def resolve_options(self, mv: ModelVersion, params: dict[str, Any],
                        requested: list[str]) -> InferOptions:
        """Validate request parameters and the requested output names."""
        s = self.settings
        top_k = params.get("top_k", min(s.default_top_k, mv.top_k_max))
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= mv.top_k_max:
            raise InvalidParameter(f"parameter top_k must be an integer in [1, {mv.top_k_max}], got {top_k!r}")
        tau = params.get("tau", s.default_tau)
        if not _number(tau) or not math.isfinite(tau) or tau <= 0:
            raise InvalidParameter(f"parameter tau must be a finite number > 0, got {tau!r}")
        if "alpha" in params:
            alpha = params["alpha"]
            fitted = (mv.spec.get("calibration") or {}).get("alpha")
            if not _number(alpha) or fitted is None or not math.isclose(alpha, fitted, rel_tol=1e-9):
                raise InvalidParameter(
                    f"parameter alpha: this model's OOD flag is calibrated at alpha={fitted}; "
                    f"other rates need a recalibrated artifact (got {alpha!r})")
        timeout = s.request_timeout_s
        if "timeout" in params:  # Triton's reserved parameter, in microseconds
            micros = params["timeout"]
            if not isinstance(micros, int) or isinstance(micros, bool) or micros <= 0:
                raise InvalidParameter(f"parameter timeout must be a positive integer (microseconds), got {micros!r}")
            timeout = min(timeout, micros / 1e6)
        known = set(mv.output_names)
        outputs: list[str] = list(requested)
        if not outputs:
            outputs = self.default_outputs(mv)
            diag = params.get("diagnostics", False)
            if diag is True or diag == "all":
                outputs = list(mv.output_names)
            elif isinstance(diag, str) and diag:
                outputs += [n.strip() for n in diag.split(",") if n.strip() and n.strip() not in outputs]
            elif isinstance(diag, list) and all(isinstance(n, str) for n in diag):
                outputs += [n for n in diag if n not in outputs]
            elif diag is not False:
                raise InvalidParameter(
                    "parameter diagnostics must be true, false, \"all\", or output names (list or comma-separated)")
        unknown = [n for n in outputs if n not in known]
        if unknown:
            raise UnknownOutput(f"unknown output(s) {unknown} for model '{mv.name}'; it has {list(mv.output_names)}")
        if len(set(outputs)) != len(outputs):
            raise BadRequest("an output is requested twice")
        if mv.task == "classification":
            tau = s.default_tau  # the graph ignores tau for decisions: one value batches best
        return InferOptions(tuple(outputs), int(top_k), float(tau), timeout)

    def check_rows(self, mv: ModelVersion, array: np.ndarray, datatype: str, shape: tuple[int, ...],
                   name: str = "input") -> np.ndarray:
        """Validate one ``input`` tensor -> float32 (B, d)."""
        if datatype not in _INPUT_DATATYPES:
            raise InvalidDatatype(f"input '{name}' must be FP32 or FP64, got {datatype}")
        d = mv.n_features
        if len(shape) != 2 or shape[1] != d:
            raise InvalidShape(f"input '{name}' must have shape [batch, {d}], got {list(shape)}")
        if shape[0] == 0:
            raise EmptyBatch(f"input '{name}' has no rows")
        if not np.isfinite(array).all():
            raise InvalidValue(f"input '{name}' contains NaN or infinite values")
        rows = np.asarray(array, dtype=np.float32).reshape(shape)
        if array.dtype != np.float32 and not np.isfinite(rows).all():
            raise InvalidValue(f"input '{name}' has values outside the float32 range")
        return rows

    async def run_rows(self, mv: ModelVersion, rows: np.ndarray, tau: float, timeout_s: float, *,
                       wait_for_room: bool = False) -> tuple[dict[str, np.ndarray], float, float]:
        """All graph outputs for ``rows`` (split into max_batch_size chunks) -> (outputs, queue_s,
        compute_s)."""
        size = self.settings.max_batch_size
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        # the queue limit admits a request by its first chunk; its later chunks wait for room (a
        # request larger than the queue would otherwise never run)
        coros = [mv.batcher.infer(c, tau, timeout_s=timeout_s, wait_for_room=wait_for_room or i > 0)
                 for i, c in enumerate(chunks)]
        if len(coros) == 1:
            results = [await coros[0]]
        else:
            tasks = [asyncio.ensure_future(c) for c in coros]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        if len(results) == 1:
            outputs = results[0].outputs
        else:
            outputs = {k: np.concatenate([r.outputs[k] for r in results]) for k in results[0].outputs}
        return outputs, max(r.queue_s for r in results), sum(r.compute_s for r in results)

    async def predict(self, name: str, version: str | None, rows_of: Any, tau: float, timeout_s: float, *,
                      wait_for_room: bool = False) -> Prediction:
        """Run rows on the serving version, retrying on a version swapped mid-request.

        ``rows_of(mv)`` validates and returns the float32 rows for that version.
        """
        for _ in range(3):
            mv = self.repository.get(name, version)
            rows = rows_of(mv)
            try:
                outputs, queue_s, compute_s = await self.run_rows(mv, rows, tau, timeout_s,
                                                                   wait_for_room=wait_for_room)
            except BatcherClosed:
                continue
            return Prediction(mv, outputs, queue_s, compute_s, len(rows))
        raise BadRequest(f"model '{name}' was swapped repeatedly during the request; retry")

    def select(self, mv: ModelVersion, outputs: dict[str, np.ndarray], options: InferOptions,
               request: InferRequest | None = None) -> list[InferOutput]:
        """Requested outputs, sliced to top-k and cast to the contract's datatypes."""
        specs = _output_spec(mv.task)
        wanted = {o.name: o.binary for o in (request.outputs if request else [])}
        default_binary = request.binary_output if request else False
        selected = []
        for name in options.outputs:
            value = np.asarray(outputs[name])
            if name in _TOPK_OUTPUTS:
                value = value[:, :options.top_k]
            datatype = specs[name].datatype
            value = value.astype(DATATYPES[datatype], copy=False)
            binary = wanted.get(name)
            selected.append(InferOutput(name, datatype, value, default_binary if binary is None else binary))
        return selected

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """One V2 inference request."""
        start = time.perf_counter()
        mv: ModelVersion | None = None
        try:
            mv = self.repository.get(name, version)
            options = self._options_for(mv, request)
            tensor = self._input_of(request)

            def rows_of(current: ModelVersion) -> np.ndarray:
                return self.check_rows(current, tensor.array, tensor.datatype, tensor.shape, tensor.name)

            done = await self.predict(name, version, rows_of, options.tau, options.timeout_s)
            mv = done.mv
            diag_start = time.perf_counter()
            mv.metrics.record_rows(done.outputs, mv.task)
            selected = self.select(mv, done.outputs, options, request)
            mv.metrics.phase["diagnostics"].observe(time.perf_counter() - diag_start)
        except HJServeError as exc:
            if mv is not None:
                mv.metrics.failed(lookup(exc).error_type, time.perf_counter() - start)
            raise
        mv.metrics.succeeded(time.perf_counter() - start, done.queue_s, done.compute_s, done.rows)
        return InferResponse(model_name=name, model_version=str(mv.version), outputs=selected, id=request.id)

    def _options_for(self, mv: ModelVersion, request: InferRequest) -> InferOptions:
        for out in request.outputs:
            if "class_count" in out.parameters:
                raise InvalidParameter("the classification extension (class_count) is not supported; "
                                       "request the 'probabilities' output")
        return self.resolve_options(mv, request.parameters, [o.name for o in request.outputs])

    @staticmethod
    def _input_of(request: InferRequest):
        if len(request.inputs) != 1 or request.inputs[0].name != "input":
            names = [i.name for i in request.inputs]
            raise UnknownInput(f"expected exactly one input named 'input', got {names}")
        return request.inputs[0]


def _json(value: Any) -> str:
    import json

    return json.dumps(value)
