"""The transport-free dataplane of the Open Inference Protocol: every operation any transport serves.

Nothing here knows HTTP or gRPC. Transports decode their wire format, call one typed operation and
encode what it returns (wire models of :mod:`service.types`). Every number in an answer comes from
the model's graph / module; the dataplane validates, batches, selects outputs and slices
``attribution_*`` to top-k.

One owner for a request's life: every inference operation (V2 ``infer``, V1 ``explain``, batch
``attribute``) runs its rows through :meth:`DataPlane._run` -- version resolution, options and rows
resolved against that same version, the swap retry, the batcher -- and is counted by one
:class:`_Account` (Prometheus request metrics, Triton statistics, per-row diagnostic metrics).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hjmodel import serving
from service import __version__, tracing
from service.batching import BatcherClosed
from service.budget import ByteBudget
from service.codecs import Chunk, check_output_parameters, dumps
from service.errors import (
    BadRequest,
    EmptyBatch,
    HJServeError,
    InvalidDatatype,
    InvalidParameter,
    InvalidShape,
    InvalidValue,
    ModelLoadFailed,
    ModelNotReady,
    Overloaded,
    RequestMemoryFull,
    RequestTimeout,
    ShuttingDown,
    UnknownInput,
    UnknownOutput,
    lookup,
)
from service.explain import EXPLAIN_OUTPUTS, PREDICT_OUTPUTS, explain_rows, predict_rows
from service.logs import CURRENT_REQUEST
from service.metrics import REQUEST_MEMORY_BYTES
from service.repository import ModelRepository, ModelVersion
from service.settings import Settings, split_names
from service.types import (
    ConfigTensor,
    InferOutput,
    InferRequest,
    InferResponse,
    MetadataModelResponse,
    MetadataServerResponse,
    MetadataTensor,
    ModelConfigResponse,
    ModelIndexEntry,
    ModelIndexResponse,
    ModelReadyResponse,
    ModelStatistics,
    ModelStatsResponse,
    RepositoryIndexItem,
    RowBlock,
    V1Request,
    V1Response,
)

__all__ = ["Attribution", "DataPlane", "EXTENSIONS", "InferOptions", "REQUEST_PARAMETERS", "SERVER_NAME"]

SERVER_NAME = "hjserve"

#: Protocol extensions this server implements.
EXTENSIONS = ("binary_tensor_data", "model_configuration", "model_repository", "parameters", "statistics")

#: The request parameters this server reads (every protocol: V2 REST and gRPC, V1, batch jobs);
#: the codecs consume their own (``binary_data_output``, ``binary_data_size``) before.
#: Triton's flag for decoupled models, which may send several responses to a request and then an empty
#: one marked final; Triton's clients send it (perf_analyzer on every gRPC request). A model here
#: answers each request with one response, which is its final one: with the flag, that response
#: carries ``triton_final_response: true``, and no empty one follows.
FINAL_RESPONSE = "triton_enable_empty_final_response"
REQUEST_PARAMETERS = ("top_k", "tau", "alpha", "diagnostics", "baseline", "timeout", FINAL_RESPONSE)

_INPUT_DATATYPES = ("FP32", "FP64")
_EXPLAIN_NAMES = frozenset(o.name for o in serving.EXPLAIN_OUTPUTS)
_TRITON_TYPES = {"BOOL": "TYPE_BOOL", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64"}
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _spelt_boolean(value: Any) -> Any:
    """A boolean spelt as a string (gRPC's ``InferParameter`` carries many as ``string_param``):
    "true" / "1" / "yes" -> True, "false" / "0" / "no" -> False (any case); anything else unchanged."""
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    return value


@dataclass(frozen=True)
class InferOptions:
    """Request parameters resolved against one model version (``baseline``: integrated gradients'
    starting point, (d,) float32; None until an explanation output is asked for)."""

    outputs: tuple[str, ...]
    top_k: int
    tau: float
    timeout_s: float
    baseline: np.ndarray | None = None
    #: the serving outputs computed for the rows: the requested ones and the monitored ones
    #: (setting ``monitored_outputs``); None: every one
    computed: frozenset[str] | None = None
    #: ``triton_enable_empty_final_response`` was true: the response says it is the final one
    final_response: bool = False

    def monitored(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs of a batch that the request's own rows had computed (a batch computes what its
        requests need together): what the diagnostic metrics record, the same whichever requests
        shared its batch."""
        return outputs if self.computed is None else {k: v for k, v in outputs.items() if k in self.computed}

    @property
    def explains(self) -> bool:
        """Whether an explanation output is asked for (the baseline is resolved exactly then)."""
        return self.baseline is not None


@dataclass(frozen=True)
class Prediction:
    """Every graph output for a request's rows, from the version that computed them."""

    mv: ModelVersion
    options: InferOptions
    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    rows: int


Prepare = Callable[[ModelVersion], tuple[InferOptions, np.ndarray]]


class _Account:
    """The accounting of one operation (one request, or one whole batch job): per-row diagnostic
    metrics are recorded by :meth:`DataPlane._run` as rows are computed; the request itself is
    counted once, here, as a success (with its rows, queue and compute time) or a failure (with its
    ``error_type``) -- in Prometheus and in Triton's statistics alike."""

    def __init__(self, plane: DataPlane, name: str, version: str | None):
        self.plane, self.name, self.version = plane, name, version
        self.started = time.perf_counter()
        self.mv: ModelVersion | None = None
        self.rows = 0
        self.queue_s = 0.0
        self.compute_s = 0.0

    def add(self, done: Prediction) -> None:
        self.mv = done.mv
        self.rows += done.rows
        self.queue_s = max(self.queue_s, done.queue_s)
        self.compute_s += done.compute_s
        record = CURRENT_REQUEST.get()
        if record is not None:   # the request's access line: rows and timings
            record.rows = self.rows
            record.queue_ms = round(self.queue_s * 1000.0, 3)
            record.compute_ms = round(self.compute_s * 1000.0, 3)

    def succeed(self) -> None:
        if self.mv is not None:
            self.mv.metrics.succeeded(time.perf_counter() - self.started, self.queue_s, self.compute_s, self.rows)

    def fail(self, exc: HJServeError) -> None:
        mv = self.mv or self.plane._peek(self.name, self.version)
        if mv is not None:   # an unknown model has no series to count in
            mv.metrics.failed(lookup(exc).error_type, time.perf_counter() - self.started)


class DataPlane:
    """Answers every protocol operation against a :class:`~service.repository.ModelRepository`."""

    def __init__(self, settings: Settings, repository: ModelRepository):
        self.settings = settings
        self.repository = repository
        #: what the inference bodies being read and decoded take (REST and gRPC; :mod:`service.budget`)
        self.request_memory = ByteBudget(settings.max_request_memory_bytes, "HJSERVE_MAX_REQUEST_MEMORY_BYTES",
                                         "inference bodies", REQUEST_MEMORY_BYTES, full=RequestMemoryFull,
                                         retry_after_s=settings.retry_after_s)
        self._poller: asyncio.Task | None = None
        #: when a shutdown's grace runs out (``time.monotonic()``; None: not shutting down, :meth:`drain`)
        self.drain_deadline: float | None = None
        #: inference requests in flight, every model version's together (admitted, not yet answered)
        self.in_flight = 0
        #: of those, the ones whose transport keeps every request off the event loop (:meth:`admit`)
        self._not_inline = 0
        names = split_names(settings.default_outputs)
        self._default_outputs = None if names == ["all"] else tuple(names)
        names = split_names(settings.monitored_outputs)
        monitored = None if names == ["all"] or not settings.pruned_graphs else frozenset(names) | {"prediction"}
        # per task: (its serving outputs, those computed for every row; None: every one)
        self._computed = {task: (frozenset(serving.output_names(task)),
                                 None if monitored is None else monitored & frozenset(serving.output_names(task)))
                          for task in serving.TASKS}

    # -- life -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the repository; in ``poll`` mode also start rescanning it."""
        await self.repository.load_all()
        if self.settings.model_control_mode == "poll":
            self._poller = asyncio.get_running_loop().create_task(
                self.repository.poll(self.settings.repository_poll_s), name="hjserve-repository-poll")

    async def stop(self) -> None:
        """Stop polling and release every model (queued requests finish first)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.repository.close()

    def drain(self, grace_s: float) -> None:
        """A shutdown began (SIGTERM): not ready from now on, no more repository polls, and the work in
        flight has ``grace_s`` seconds to finish. What would outlast them ends with
        :class:`~service.errors.ShuttingDown` while there is time to say so, :data:`DRAIN_MARGIN_S`
        before: a request still waiting for its result (the batchers', ``DynamicBatcher.drain``),
        a batch stream between two blocks (:class:`Attribution`). On the event loop; a second call
        changes nothing."""
        if self.drain_deadline is not None:
            return
        self.drain_deadline = time.monotonic() + grace_s
        if self._poller is not None:
            self._poller.cancel()
        for mv in self.repository.serving_versions():
            mv.batcher.drain(grace_s - DRAIN_MARGIN_S)

    def drain_left_s(self) -> float | None:
        """Seconds left of the shutdown's grace; None while the server is not shutting down."""
        return None if self.drain_deadline is None else self.drain_deadline - time.monotonic()

    # -- health and metadata ----------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Every model loaded, and not shutting down."""
        return self.drain_deadline is None and self.repository.is_ready()

    def server_metadata(self) -> MetadataServerResponse:
        return MetadataServerResponse(name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS))

    def model_ready(self, name: str, version: str | None = None) -> ModelReadyResponse:
        """Ready, or ModelNotFound (unknown name / version) / ModelNotReady (with the reason)."""
        self.repository.get(name, version)
        return ModelReadyResponse(name=name, ready=True)

    def model_metadata(self, name: str, version: str | None = None) -> MetadataModelResponse:
        mv = self.repository.get(name, version)
        return MetadataModelResponse(
            name=name, versions=[str(v) for v in self.repository.ready_versions(name)],
            platform=mv.backend.platform,
            inputs=[MetadataTensor(name=n, datatype="FP32" if n == "input" else "FP64", shape=[-1, *dims])
                    for n, dims in self._inputs(mv)],
            outputs=[MetadataTensor(name=o.name, datatype=o.datatype, shape=[-1, *self._dims(mv, o)])
                     for o in self._specs(mv)])

    @staticmethod
    def _specs(mv: ModelVersion) -> list[serving.OutputSpec]:
        """The contract entries of every output ``mv`` produces (served, then explanation)."""
        return [serving.spec_of(mv.task, name) for name in mv.output_names]

    @staticmethod
    def _inputs(mv: ModelVersion) -> list[tuple[str, list[int]]]:
        """The model's inputs and their per-row dims: ``input`` (d), and ``tau`` (1) for regression."""
        inputs = [("input", [mv.n_features])]
        if mv.task == "regression":
            inputs.append(("tau", [1]))
        return inputs

    def _dims(self, mv: ModelVersion, o: serving.OutputSpec) -> list[int]:
        """Per-row dims of an output; top-k outputs are -1: their size is the request's top_k."""
        sizes = {"d": mv.n_features, "K": mv.spec.n_outputs, "k": -1}
        return [sizes[s] for s in o.row_shape]

    def model_config(self, name: str, version: str | None = None) -> ModelConfigResponse:
        """Triton-style model configuration (per-row scalar outputs: dims [1] reshaped to [])."""
        mv = self.repository.get(name, version)
        s, spec = self.settings, mv.spec
        k = mv.top_k_max
        outputs = []
        for o in self._specs(mv):
            dims = self._dims(mv, o)
            outputs.append(ConfigTensor(name=o.name, data_type=_TRITON_TYPES[o.datatype], dims=dims or [1],
                                        reshape=None if dims else {"shape": []}))
        params = {
            "kind": spec.kind, "task": spec.task, "eps": spec.eps, "t": spec.t,
            "top_k_max": k, "default_top_k": min(s.default_top_k, k), "default_tau": s.default_tau,
            "class_names": list(spec.class_names) or None, "alpha": spec.alpha,
            "false_flag_rate_95": None if spec.false_flag_rate is None else list(spec.false_flag_rate),
            "default_outputs": self.default_outputs(mv), "device": mv.backend.device,
            "execution": mv.backend.execution,
            "model_control_mode": s.model_control_mode,
            # computed for every row; the rest only for the batches that ask (setting pruned_graphs)
            "monitored_outputs": self.monitored_outputs(mv),
            "pruned_graphs": [list(names) for names in getattr(getattr(mv.backend, "pruned", None), "built", ())],
        }
        return ModelConfigResponse(
            name=name, platform=mv.backend.platform, backend=mv.backend.name,
            version_policy={"all": {}},   # every version on disk is loaded and addressable
            max_batch_size=s.max_batch_size,
            input=[ConfigTensor(name=n, data_type="TYPE_FP32" if n == "input" else "TYPE_FP64", dims=dims,
                                optional=None if n == "input" else True)   # tau: the tau parameter's twin
                   for n, dims in self._inputs(mv)],
            output=outputs,
            dynamic_batching={
                "max_queue_delay_microseconds": int(s.max_queue_delay_ms * 1000),
                "default_queue_policy": {"max_queue_size": s.max_queue_size,
                                         "default_timeout_microseconds": int(s.request_timeout_s * 1e6)}},
            instance_group=[{"count": 1, "kind": "KIND_GPU" if mv.backend.device == "cuda" else "KIND_CPU"}],
            parameters={key: {"string_value": value if isinstance(value, str) else dumps(value).decode()}
                        for key, value in params.items() if value is not None})

    def model_index(self) -> ModelIndexResponse:
        """The models with at least one ready version, and those versions."""
        return ModelIndexResponse(models=[
            ModelIndexEntry(name=m, versions=[str(v) for v in self.repository.ready_versions(m)])
            for m in self.repository.model_names() if self.repository.ready_versions(m)])

    def model_stats(self, name: str | None = None, version: str | None = None) -> ModelStatsResponse:
        """Triton's statistics extension: every ready version, or one model / version. Batch jobs
        count like any request (one request, all its rows)."""
        if name is None:
            versions = [self.repository.get(m, str(v)) for m in self.repository.model_names()
                        for v in self.repository.ready_versions(m)]
        elif version is None:
            self.repository.get(name)
            versions = [self.repository.get(name, str(v)) for v in self.repository.ready_versions(name)]
        else:
            versions = [self.repository.get(name, version)]
        return ModelStatsResponse(model_stats=[
            ModelStatistics(**mv.metrics.stats.as_triton(mv.name, str(mv.version))) for mv in versions])

    # -- model repository extension ---------------------------------------------------------------

    def repository_index(self, ready_only: bool = False) -> list[RepositoryIndexItem]:
        return [RepositoryIndexItem(**item) for item in self.repository.index(ready_only)]

    async def load_model(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        """(Re)load every version of ``name`` from its folder as it is; refused unless
        ``model_control_mode`` is ``explicit`` (in ``none`` nothing changes after startup, in ``poll``
        the poller owns loading). Triton's load parameters (a ``config`` or ``file:...`` override) are
        refused, never ignored."""
        self._explicit_control("load")
        if parameters:
            raise InvalidParameter(f"load parameters {sorted(parameters)[:5]} are not supported: a model loads "
                                   "from its repository folder as it is (no config or file overrides)")
        await self.repository.load(name)

    async def unload_model(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        """Unload every version of ``name``. ``unload_dependents`` (Triton's client always sends it)
        is accepted as a boolean: there are no ensembles, so nothing depends on a model."""
        self._explicit_control("unload")
        rest = dict(parameters or {})
        if not isinstance(rest.pop("unload_dependents", False), bool) or rest:
            raise InvalidParameter(f"unload takes only the boolean parameter unload_dependents, got "
                                   f"{sorted(parameters or {})[:5]}")
        await self.repository.unload(name)

    def _explicit_control(self, what: str) -> None:
        mode = self.settings.model_control_mode
        if mode != "explicit":
            why = "the repository is polled" if mode == "poll" else "set HJSERVE_MODEL_CONTROL_MODE=explicit to allow it"
            raise ModelLoadFailed(f"explicit model {what} is not allowed: model_control_mode is '{mode}' ({why})")

    # -- admission --------------------------------------------------------------------------------

    def _peek(self, name: str, version: str | None) -> ModelVersion | None:
        try:
            return self.repository.get(name, version)
        except HJServeError:
            return None

    def _full(self, mv: ModelVersion) -> bool:
        """Whether ``mv`` has ``max_queue_size`` requests in flight (the rejection is counted)."""
        if mv.in_flight < self.settings.max_queue_size:
            return False
        mv.metrics.failed(lookup(Overloaded).error_type)
        return True

    def reserve(self, name: str, version: str | None = None) -> ModelVersion | Callable[[], None] | None:
        """The connection-level form of :meth:`admit`: the full model version (the request is to be
        rejected), or a ``release`` callable holding one in-flight slot, or None when the name does
        not resolve (the transport then answers the error)."""
        mv = self._peek(name, version)
        if mv is None:
            return None
        if self._full(mv):
            return mv
        self._slot(mv, 1)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._slot(mv, -1)
        return release

    def _slot(self, mv: ModelVersion, change: int) -> None:
        """Take (1) or give back (-1) one of ``mv``'s in-flight slots, counted in the server's too."""
        mv.in_flight += change
        self.in_flight += change

    @contextlib.contextmanager
    def admit(self, name: str, version: str | None = None, *, reserved: bool = False,
              inline: bool = True) -> Iterator[ModelVersion]:
        """Admission control, before a request's body is read: at most ``max_queue_size`` requests
        per model version may be in flight (reading, decoding, queued or computing); beyond that
        the request is rejected at once (Overloaded) without reading or decoding its body.
        ``reserved``: the transport already holds this request's slot (:meth:`reserve`).

        ``inline=False``: the transport cannot show the server its other requests before the event
        loop starts them (grpc.aio accepts one call at a time on the loop), so while this request is
        in flight none runs on the event loop (service.batching): a gRPC request held there would
        keep the calls behind it from being accepted at all (``bench/results/ab_server_inline_grpc.md``)."""
        mv = self.repository.get(name, version)
        if not reserved and self._full(mv):
            raise Overloaded(f"model '{name}' has {mv.in_flight} requests in flight (max_queue_size "
                             f"{self.settings.max_queue_size}); retry later",
                             retry_after_s=self.settings.retry_after_s)
        held, kept_off = int(not reserved), int(not inline)
        self._slot(mv, held)
        self._not_inline += kept_off
        try:
            yield mv
        finally:
            self._slot(mv, -held)
            self._not_inline -= kept_off

    # -- options and rows -------------------------------------------------------------------------

    def default_outputs(self, mv: ModelVersion) -> list[str]:
        """Outputs of a request that names none (setting ``default_outputs``)."""
        if self._default_outputs is None:
            return list(mv.output_names)
        names = set(mv.output_names)
        return [n for n in self._default_outputs if n in names]

    def monitored_outputs(self, mv: ModelVersion) -> list[str]:
        """Serving outputs computed for every row whatever its request asks (setting
        ``monitored_outputs``, and ``prediction``; every one when graphs are not pruned)."""
        monitored = self._computed[mv.task][1]
        return [n for n in serving.output_names(mv.task) if monitored is None or n in monitored]

    def resolve_options(self, mv: ModelVersion, params: dict[str, Any], requested: list[str]) -> InferOptions:
        """Validate request parameters (protocol types: numbers may arrive as strings, as gRPC's
        ``InferParameter`` carries them) and the requested output names against ``mv``. A parameter
        this server does not read is refused, never ignored: a misspelt ``tau``, or Triton's
        ``sequence_id`` / ``priority``, which would promise what is not done."""
        unknown = sorted(set(params) - set(REQUEST_PARAMETERS))
        if unknown:
            raise InvalidParameter(f"unknown parameter(s) {unknown[:5]}: a request takes {list(REQUEST_PARAMETERS)} "
                                   "(no sequences or priorities)")
        s = self.settings
        top_k = _integer(params.get("top_k", min(s.default_top_k, mv.top_k_max)))
        if top_k is None or not 1 <= top_k <= mv.top_k_max:
            raise InvalidParameter(f"parameter top_k must be an integer in [1, {mv.top_k_max}], "
                                   f"got {params.get('top_k')!r}")
        tau = s.default_tau
        if "tau" in params:
            if mv.task != "regression":   # refused, never dropped: a classifier's radius reads no tolerance
                raise InvalidParameter(
                    f"parameter tau is a regression model's certificate tolerance; '{mv.name}' is a {mv.task} "
                    "model, whose certified radius is for its decision and reads no tau")
            tau = _real(params["tau"])
            if tau is None or not math.isfinite(tau) or tau <= 0:
                raise InvalidParameter(f"parameter tau must be a finite number > 0, got {params['tau']!r}")
        if "alpha" in params:
            alpha, fitted = _real(params["alpha"]), mv.spec.alpha
            if alpha is None or fitted is None or not math.isclose(alpha, fitted, rel_tol=1e-9):
                raise InvalidParameter(
                    f"parameter alpha: this model's OOD flag is calibrated at alpha={fitted}; "
                    f"other rates need a recalibrated artifact (got {params['alpha']!r})")
        timeout = s.request_timeout_s
        if "timeout" in params:  # Triton's reserved parameter, in microseconds
            micros = _integer(params["timeout"])
            if micros is None or micros <= 0:
                raise InvalidParameter(f"parameter timeout must be a positive integer (microseconds), "
                                       f"got {params['timeout']!r}")
            if micros < timeout * 1e6:   # compared before dividing: an integer past float64's range is no error
                timeout = micros / 1e6
        final = _spelt_boolean(params.get(FINAL_RESPONSE, False))
        if not isinstance(final, bool):
            raise InvalidParameter(f"parameter {FINAL_RESPONSE} must be a boolean, got {final!r}")
        outputs = list(requested) or self._diagnostic_outputs(mv, params.get("diagnostics", False))
        # beside named outputs the diagnostics parameter is read too (never asking for what is not served)
        named = self._diagnostics_named(mv, params["diagnostics"]) if requested and "diagnostics" in params else []
        unknown = [n for n in (*outputs, *named) if n not in mv.output_names]
        if unknown:
            raise UnknownOutput(f"unknown output(s) {unknown} for model '{mv.name}'; it has {list(mv.output_names)}")
        if left := [n for n in named if n not in outputs]:
            raise InvalidParameter(f"parameter diagnostics asks for {left[:5]}, which the request's outputs do not "
                                   "name: name them there, or name no outputs")
        if len(set(outputs)) != len(outputs):
            raise BadRequest("an output is requested twice")
        baseline = None
        if any(name in _EXPLAIN_NAMES for name in outputs):
            baseline = self._baseline(mv, params.get("baseline", "mean"))
        elif "baseline" in params:
            self._baseline(mv, params["baseline"])   # validated even when unused
        served, computed = self._computed[mv.task]
        if computed is not None:
            computed = computed | (served & frozenset(outputs))
            computed = None if len(computed) == len(served) else computed
        return InferOptions(tuple(outputs), int(top_k), float(tau), timeout, baseline, computed, final)

    @staticmethod
    def _baseline(mv: ModelVersion, value: Any) -> np.ndarray:
        """The ``baseline`` parameter: "mean" (the training mean, default), "zeros", or d numbers (a
        list, or a comma-separated string as gRPC carries it) -> (d,) float32."""
        d = mv.n_features
        if value == "mean":
            mean = mv.spec.input_mean
            return np.asarray(mean if mean is not None else np.zeros(d), dtype=np.float32)
        if value == "zeros":
            return np.zeros(d, dtype=np.float32)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        elif isinstance(value, list) and not all(type(v) in (int, float) for v in value):
            value = None   # a list holds JSON numbers: not true read as 1, nor "1" (a string is gRPC's form)
        try:
            row = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):   # OverflowError: an integer past float64's range
            row = None
        if row is None or row.shape != (d,) or not np.isfinite(row).all() or np.abs(row).max(initial=0) > 3.4e38:
            raise InvalidParameter(f'parameter baseline must be "mean", "zeros" or {d} finite numbers')
        return row.astype(np.float32)

    def _diagnostic_outputs(self, mv: ModelVersion, diag: Any) -> list[str]:
        """The default outputs plus what the ``diagnostics`` parameter asks for
        (:meth:`_diagnostics_named`)."""
        outputs, named = self.default_outputs(mv), self._diagnostics_named(mv, diag)
        if set(named) >= set(mv.output_names):   # every output: in the contract's order
            return list(mv.output_names)
        return outputs + [n for n in named if n not in outputs]

    @staticmethod
    def _diagnostics_named(mv: ModelVersion, diag: Any) -> list[str]:
        """The outputs the ``diagnostics`` parameter asks for: true / "all" (every output), false
        (none), or output names (a list or a comma-separated string)."""
        diag = _spelt_boolean(diag)
        if diag is True or diag == "all":
            return list(mv.output_names)
        if diag is False:
            return []
        if isinstance(diag, str) and (names := split_names(diag)):   # "," names none: refused as "" is
            return names
        if isinstance(diag, list) and diag and all(isinstance(n, str) for n in diag):
            return list(diag)
        raise InvalidParameter(
            "parameter diagnostics must be true, false, \"all\", or output names (list or comma-separated)")

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
        with np.errstate(over="ignore"):   # values beyond float32 become inf: refused just below
            rows = np.asarray(array, dtype=np.float32).reshape(shape)
        if array.dtype != np.float32 and not np.isfinite(rows).all():
            raise InvalidValue(f"input '{name}' has values outside the float32 range")
        return rows

    def select(self, mv: ModelVersion, outputs: dict[str, np.ndarray], options: InferOptions,
               request: InferRequest | None = None) -> list[InferOutput]:
        """Requested outputs, sliced to top-k and cast to the contract's datatypes
        (:func:`hjmodel.serving.select_outputs`, shared with offline predictors)."""
        wanted = {o.name: o.binary for o in (request.outputs if request else [])}
        default_binary = request.binary_output if request else False
        values = serving.select_outputs(mv.task, outputs, options.outputs, options.top_k)
        return [InferOutput(name, serving.spec_of(mv.task, name).datatype, value,
                            default_binary if wanted.get(name) is None else wanted[name])
                for name, value in values.items()]

    # -- the one run path -------------------------------------------------------------------------

    async def _run(self, name: str, version: str | None, prepare: Prepare, *, bulk: bool = False) -> Prediction:
        """Rows through the serving version: resolve the version, resolve options and validate rows
        against *that* version (``prepare``), send the rows through its batcher in
        ``max_batch_size`` chunks (``bulk``: a batch job's chunk, whose size the job bounds, as one
        job -- one graph call -- that waits for queue room and lets online requests go first), with
        the request's baseline when it names an explanation output (the batcher then runs the
        explanation graph on its rows in the same backend call), record every computed row's
        diagnostics in the metrics. A version swapped mid-request (its
        batcher closed) is retried on the new load."""
        for _ in range(3):
            mv = self.repository.get(name, version)
            options, rows = prepare(mv)
            try:
                outputs, queue_s, compute_s = await self._batches(mv, rows, options, bulk)
            except BatcherClosed:
                continue
            if tracing.enabled():   # the batch's measured times, as this request's queue / compute spans
                end = time.perf_counter()
                tracing.record(("queue", end - compute_s - queue_s, end - compute_s, {"hjserve.rows": len(rows)}),
                               ("compute", end - compute_s, end, {"hjserve.backend": mv.backend.name}))
            mv.metrics.record_rows(options.monitored(outputs), mv.task)
            return Prediction(mv, options, outputs, queue_s, compute_s, len(rows))
        raise ModelNotReady(f"model '{name}' was swapped repeatedly during the request; retry")

    async def _batches(self, mv: ModelVersion, rows: np.ndarray, options: InferOptions,
                       bulk: bool) -> tuple[dict[str, np.ndarray], float, float]:
        size = len(rows) if bulk else self.settings.max_batch_size
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        # the queue limit admits a request by its first chunk; its later chunks wait for room (a
        # request larger than the queue would otherwise never run), a few at a time: all of them
        # waiting at once held the queue full until the last ran, and every other client got 503
        # the batcher may run it on the event loop (service.batching)
        alone = self.in_flight == 1 and not self._not_inline and len(chunks) == 1
        infer = functools.partial(mv.batcher.infer, tau=options.tau, timeout_s=options.timeout_s,
                                  baseline=options.baseline, bulk=bulk, outputs=options.computed, alone=alone)
        if len(chunks) == 1:
            results = [await infer(chunks[0], wait_for_room=bulk)]
        else:
            # at most REQUEST_CHUNKS_IN_FLIGHT of them queued or computing at a time, within one deadline
            deadline = time.monotonic() + options.timeout_s
            window = asyncio.Semaphore(REQUEST_CHUNKS_IN_FLIGHT)

            async def chunk(i: int, c: np.ndarray):
                async with window:
                    if time.monotonic() >= deadline:
                        raise RequestTimeout(f"no result within the request timeout of {options.timeout_s:g} s")
                    return await infer(c, wait_for_room=bulk or i > 0, deadline=deadline)
            tasks = [asyncio.ensure_future(chunk(i, c)) for i, c in enumerate(chunks)]
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
            # each chunk's batch computed at least the request's outputs (batches shared with other
            # requests computed more): the outputs every chunk has
            outputs = {k: np.concatenate([r.outputs[k] for r in results]) for k in results[0].outputs
                       if all(k in r.outputs for r in results)}
        return outputs, max(r.queue_s for r in results), sum(r.compute_s for r in results)

    @contextlib.contextmanager
    def _account(self, name: str, version: str | None) -> Iterator[_Account]:
        account = _Account(self, name, version)
        try:
            yield account
        except HJServeError as exc:
            account.fail(exc)
            raise
        account.succeed()

    # -- operations -------------------------------------------------------------------------------

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """One V2 inference request."""
        with self._account(name, version) as account:
            tensor, tau = _inputs_of(request)

            def prepare(mv: ModelVersion) -> tuple[InferOptions, np.ndarray]:
                params = request.parameters if tau is None else _tau_input_as_parameter(mv, request.parameters, tau)
                options = self.resolve_options(mv, params, [o.name for o in request.outputs])
                for out in request.outputs:
                    check_output_parameters(out)
                return options, self.check_rows(mv, tensor.array, tensor.datatype, tensor.shape, tensor.name)

            done = await self._run(name, version, prepare)
            account.add(done)
            started = time.perf_counter()
            selected = self.select(done.mv, done.outputs, done.options, request)
            done.mv.metrics.phase["diagnostics"].observe(time.perf_counter() - started)
        return InferResponse(model_name=name, model_version=str(done.mv.version), outputs=selected, id=request.id,
                             parameters={"triton_final_response": True} if done.options.final_response else {})

    async def explain(self, name: str, request: V1Request, *, detail: bool) -> V1Response:
        """V1 ``:predict`` (``detail=False``) or ``:explain``: readable answers, each number with its
        meaning (:mod:`service.explain`)."""
        with self._account(name, None) as account:
            if not request.instances:
                raise EmptyBatch("instances has no rows")
            if len({len(row) for row in request.instances}) > 1:
                raise InvalidShape("instances must be rows of equal length")
            array = np.asarray(request.instances, dtype=np.float64).reshape(len(request.instances), -1)
            params = dict(request.parameters or {})
            names = EXPLAIN_OUTPUTS if detail else PREDICT_OUTPUTS

            def prepare(mv: ModelVersion) -> tuple[InferOptions, np.ndarray]:
                options = self.resolve_options(mv, params, [n for n in names if n in mv.output_names])
                return options, self.check_rows(mv, array, "FP64", array.shape, "instances")

            done = await self._run(name, None, prepare)
            account.add(done)
        if detail:
            return V1Response(**explain_rows(done.mv, done.outputs, done.options.top_k))
        return V1Response(**predict_rows(done.mv, done.outputs))

    def attribute(self, name: str, version: str | None, source: Iterator[Chunk], parameters: dict[str, Any],
                  outputs: list[str]) -> Attribution:
        """A batch attribution job over ``source``'s row chunks, pinned to the version serving now.
        With no outputs named (and no ``diagnostics`` parameter) every output of the serving graph is
        returned; the explanation outputs (integrated gradients, ...) when named or with
        ``diagnostics: "all"``."""
        mv = self.repository.get(name, version)
        if not outputs and "diagnostics" not in parameters:   # every served output; explanations on request
            outputs = list(serving.output_names(mv.task))
        self.resolve_options(mv, parameters, outputs)   # a bad parameter fails before any row is read
        return Attribution(self, mv, source, parameters, outputs)


#: chunks of a batch job computing (or queued at the backend) behind the block being handed out
CHUNKS_IN_FLIGHT = 2

#: batches of one online request queued or computing at a time (one computing, the next queued
#: behind it: the backend never waits for the request, and other clients' requests queue between)
REQUEST_CHUNKS_IN_FLIGHT = 2

#: a batch stream still running when the shutdown grace has less than this (plus two of its blocks'
#: time) left ends with :class:`~service.errors.ShuttingDown` instead of being cut when the grace ends
DRAIN_MARGIN_S = 0.5


class Attribution:
    """One batch attribution job: row chunks in, :class:`~service.types.RowBlock` s out, in order,
    with up to :data:`CHUNKS_IN_FLIGHT` chunks with the backend while a block is written.

    Error contract (nothing accepted is dropped): a failure before the first block -- a bad request,
    no rows, a bad row among the first chunk -- raises from :meth:`start`, before any answer. After
    that, :meth:`blocks` answers every row before the failing one and then raises the error;
    :attr:`rows_done` is the first row *not* answered. A shutdown whose grace would run out before
    the job does ends it the same way, with :class:`~service.errors.ShuttingDown`, while there is
    still time to say so (:data:`DRAIN_MARGIN_S`). The job is one request in the metrics and
    statistics (all its rows); chunks wait for queue room instead of failing."""

    def __init__(self, plane: DataPlane, mv: ModelVersion, source: Iterator[Chunk], parameters: dict[str, Any],
                 outputs: list[str]):
        self.plane, self.mv, self.source = plane, mv, source
        self.parameters, self.outputs = parameters, outputs
        self.version = str(mv.version)   # pinned: a reload of this version is retried, never another one
        self.rows_done = 0
        self._account = _Account(plane, mv.name, self.version)
        self._first: Prediction | None = None

    async def _next_chunk(self) -> Chunk | None:
        return await asyncio.to_thread(next, self.source, None)

    async def _compute(self, chunk: Chunk) -> Prediction:
        array, datatype = chunk

        def prepare(mv: ModelVersion) -> tuple[InferOptions, np.ndarray]:
            return (self.plane.resolve_options(mv, self.parameters, self.outputs),
                    self.plane.check_rows(mv, array, datatype, array.shape))

        # the chunk (chunk_rows, at most 16 x max_batch_size) is one graph call: per-call overhead
        # is amortised over the job's rows
        done = await self.plane._run(self.mv.name, self.version, prepare, bulk=True)
        self.mv = done.mv
        self.mv.metrics.batch_rows.inc(done.rows)
        self._account.add(done)
        return done

    async def start(self) -> None:
        """Compute the first chunk (its errors come before any answer; no rows is EmptyBatch)."""
        try:
            chunk = await self._next_chunk()
            if chunk is None:
                raise EmptyBatch("the batch has no rows")
            self._first = await self._compute(chunk)
        except HJServeError as exc:
            self._account.fail(exc)
            raise

    def _block(self, done: Prediction) -> RowBlock:
        mv = done.mv
        names = mv.spec.class_names if mv.task == "classification" else ()
        classes = [names[int(k)] for k in done.outputs["prediction"]] if names else None
        return RowBlock(self.rows_done, done.rows, self.plane.select(mv, done.outputs, done.options), classes)

    def _stop_if_shutting_down(self, block_s: float) -> None:
        """Raise :class:`ShuttingDown` when a shutdown's grace would run out within two blocks (the
        last one took ``block_s``) and :data:`DRAIN_MARGIN_S`: the stream then ends with its error
        line on a complete response instead of being cut off with no word of where it stopped."""
        left = self.plane.drain_left_s()
        if left is not None and left < 2 * block_s + DRAIN_MARGIN_S:
            raise ShuttingDown(f"the server is shutting down: rows from {self.rows_done} on were not "
                               "answered; send them again")

    async def blocks(self) -> AsyncIterator[RowBlock]:
        """The answered rows, block by block (after :meth:`start`); see the class's error contract.

        Up to :data:`CHUNKS_IN_FLIGHT` chunks after the one handed out are already with the backend:
        the graph runs while the caller encodes and writes a block (work that does not yield the
        loop), and the backend's thread finds the next chunk queued when it finishes one instead of
        waiting for the loop to read and validate it."""
        metrics = self.mv.metrics
        metrics.batch_jobs.inc()
        pending: collections.deque[asyncio.Task] = collections.deque()
        read_error: HJServeError | None = None
        exhausted = False
        last = time.monotonic()
        try:
            done = self._first
            while done is not None:
                while not exhausted and read_error is None and len(pending) < CHUNKS_IN_FLIGHT:
                    try:
                        nxt = await self._next_chunk()
                    except HJServeError as exc:   # a bad row: answer what was computed, then say so
                        read_error = exc
                        break
                    if nxt is None:
                        exhausted = True
                        break
                    pending.append(asyncio.ensure_future(self._compute(nxt)))
                    # one turn of the loop: the task validates the chunk and puts it on the backend's
                    # queue now, not when the caller next yields the loop (after its encoding)
                    await asyncio.sleep(0)
                yield self._block(done)
                self.rows_done += done.rows
                if not pending:
                    if read_error is not None:
                        raise read_error
                    break
                now = time.monotonic()
                self._stop_if_shutting_down(now - last)
                last = now
                done = await pending.popleft()
            self._account.succeed()
        except HJServeError as exc:
            self._account.fail(exc)
            raise
        finally:  # synchronous only: this may run inside a cancelled scope (client hung up)
            for task in pending:
                task.cancel()
                task.add_done_callback(_consume)
            metrics.batch_jobs.dec()


def _consume(task: asyncio.Task) -> None:
    """Retrieve a cancelled chunk's outcome so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _inputs_of(request: InferRequest):
    """The ``input`` tensor, and a ``tau`` input's single value (None when absent): regression graphs
    take tau as a batched input, which a client may send like any input (one value for every row)."""
    inputs = {i.name: i for i in request.inputs}
    if "input" not in inputs or len(inputs) != len(request.inputs) or set(inputs) - {"input", "tau"}:
        names = [i.name for i in request.inputs]
        raise UnknownInput(f"expected one input named 'input' (and optionally 'tau'), got {names}")
    tau = inputs.get("tau")
    if tau is None:
        return inputs["input"], None
    values = np.asarray(tau.array, dtype=np.float64).ravel() if tau.array.dtype.kind in "fiu" else None
    if values is None or values.size == 0 or not np.all(values == values[0]):
        raise InvalidParameter("input 'tau' must hold one number (the same for every row)")
    return inputs["input"], float(values[0])


def _tau_input_as_parameter(mv: ModelVersion, parameters: dict[str, Any], tau: float) -> dict[str, Any]:
    """A ``tau`` input read as the ``tau`` parameter: only a regression model has that input
    (:meth:`DataPlane._inputs`), and a request gives tau once, as one or the other."""
    if mv.task != "regression":
        raise UnknownInput(f"model '{mv.name}' has no input 'tau' (a regression model's certificate tolerance); "
                           "its one input is 'input'")
    if "tau" in parameters:
        raise InvalidParameter("tau is given both as an input and as a parameter: give it once")
    return {**parameters, "tau": tau}


def _integer(value: Any) -> int | None:
    """An integer parameter: an int, or a string of one (gRPC carries numbers as strings too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
    return None


def _real(value: Any) -> float | None:
    """A number parameter: an int or float, or a string of one (an integer past float64's range is
    +-inf, as the string of one parses)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value.strip())
    return None
