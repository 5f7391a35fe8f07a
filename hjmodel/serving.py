"""The serving contract: the named tensors a served hjmodel artifact produces.

Both artifact formats compute the same outputs from the same inputs:

* ``model.onnx`` -- an ONNX graph with inputs ``input`` (float32, ``(batch, d)``) and, for
  regression models, ``tau`` (float64, ``(batch, 1)``: each row's tolerance of the regression
  certificate), and the outputs below as graph outputs with these names. Every input and output has
  the batch as its first dimension, so any ONNX server can batch the graph. (Artifacts written
  before tau had a batch dimension carry ``tau`` as ``(1,)``; the service still runs them.)
* ``model.pt`` + ``model.json`` -- a torch state dict (loaded with ``weights_only=True``) and its
  JSON spec; :func:`hjmodel.artifact.load_serving_module` rebuilds the module whose
  ``forward(input, tau)`` returns a ``dict`` with the same names.

The service only moves these tensors; every number is computed by hjmodel.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError

#: Largest top-k the serving graph computes; requests slice ``attribution_*`` down to their own k.
TOP_K_MAX = 10

#: Most intra-op threads a served graph's session may be given (0: onnxruntime's default, one per
#: core). Far more than the cores only slows onnxruntime down, and each session makes its own: a
#: server given 100,000 held 32,000 threads and no longer answered SIGTERM.
MAX_THREADS = 256

#: A regression model's certificate tolerance when none is asked for.
DEFAULT_TAU = 0.1

#: Name of the ONNX metadata property that holds the JSON spec.
ONNX_SPEC_KEY = "hjmodel.spec"

#: Format tag written into every spec.
SPEC_FORMAT = "hjmodel/1"
#: The spec key an artifact carries when its served ``certified_radius`` allows for the rounding of
#: a client's values to float32 (:func:`hjmodel.functional.input_rounding_radius`). One written
#: before does not, and its radius can be unsound for a client that sends float64 values or JSON
#: decimals: the server and the offline predictor refuse it (:meth:`ArtifactSpec.unserved_because`).
RADIUS_MARK = "radius_covers_input_rounding"

#: The files of an artifact (a model repository's version directory holds them); ``explain.onnx`` is
#: the explanation graph (optional: artifacts written before it have none).
ONNX_FILE, TORCH_FILE, SPEC_FILE, EXPLAIN_FILE = "model.onnx", "model.pt", "model.json", "explain.onnx"

#: The artifact's checksum manifest: ``sha256sum``'s format (``<hex digest>  <file>`` per line, so
#: ``sha256sum -c SHA256SUMS`` checks a copy by hand), over every one of the files above that the
#: version holds; written last by :func:`hjmodel.artifact.save_artifact`, verified at every load
#: (:func:`hjmodel.artifact.verify_checksums`).
CHECKSUM_FILE = "SHA256SUMS"

#: Model kinds and tasks (DESIGN section 2).
KINDS = ("lse", "memory", "deep")
TASKS = ("classification", "regression")

#: ``ood_component`` output value -> the component's name.
OOD_COMPONENTS = ("unsupported", "ambiguous")


@dataclass(frozen=True)
class OutputSpec:
    """One named output: V2 datatype and per-row shape (``"d"`` = n_features, ``"K"`` = n_outputs,
    ``"k"`` = top-k)."""

    name: str
    datatype: str
    row_shape: tuple[str, ...]
    tasks: tuple[str, ...]
    doc: str


OUTPUTS: tuple[OutputSpec, ...] = (
    OutputSpec("prediction", "INT64", (), ("classification",), "predicted class index"),
    OutputSpec("prediction", "FP32", ("K",), ("regression",), "predicted values"),
    OutputSpec("probabilities", "FP32", ("K",), ("classification",), "class probabilities"),
    OutputSpec("certified_radius", "FP32", (), ("classification", "regression"),
               "L2 radius (raw input space) within which the decision (or each output within tau) cannot change"),
    OutputSpec("ood_score", "FP32", (), ("classification", "regression"),
               "Hopf-Cole value u over the reference points of the decided class, in diffusion units "
               "(a soft distance to the class the model claims)"),
    OutputSpec("ood_flag", "BOOL", (), ("classification", "regression"),
               "input flagged out-of-distribution at the calibrated false-positive rate alpha"),
    OutputSpec("ood_p_value", "FP32", (), ("classification", "regression"),
               "split-conformal p-value of the OOD score among the calibration rows"),
    OutputSpec("ood_component", "INT64", (), ("classification", "regression"),
               "component that decided: 0 unsupported (u); 1 ambiguous (1 - max prob) only from artifacts "
               "calibrated with that component (before the one-component gate)"),
    OutputSpec("hallucination_flag", "BOOL", (), ("classification", "regression"),
               "unsupported by the data AND in the single-neuron extrapolation regime (Prop 8.5)"),
    OutputSpec("energy_gap", "FP32", (), ("classification", "regression"),
               "Delta/eps: top pre-activation minus the second, in units of eps (Prop 8.5)"),
    OutputSpec("attribution_entropy", "FP32", (), ("classification", "regression"),
               "entropy of the Gibbs weights, in [0, log N]"),
    OutputSpec("attribution_index", "INT64", ("k",), ("classification", "regression"),
               "indices of the top-k neurons / support points by Gibbs weight"),
    OutputSpec("attribution_weight", "FP32", ("k",), ("classification", "regression"),
               "their Gibbs weights pi_j"),
    OutputSpec("label_sensitivity", "FP32", ("k",), ("classification", "regression"),
               "d prediction / d label_j of the top-k (Prop F.1)"),
    OutputSpec("saliency", "FP32", ("d",), ("classification", "regression"),
               "gradient of the decisive output with respect to the raw input"),
)

#: Outputs returned when a request lists none.
DEFAULT_OUTPUTS = ("prediction", "probabilities", "certified_radius", "ood_flag")

#: Served float32 outputs that are bounds, and the direction each is rounded in to stay one: a
#: certified radius is a lower bound (rounded down), a conformal p-value is conservative when larger
#: (rounded up). Written as text, each must be its float32's exact value (a shorter decimal that
#: reads back as the same float32 reads as a larger radius, or a smaller p-value, in float64).
ROUNDED_DOWN = frozenset({"certified_radius"})
ROUNDED_UP = frozenset({"ood_p_value"})

#: The explanation graph's outputs (``explain.onnx``, the torch ``ExplainModule``): diagnostics that
#: cost more than a prediction, computed only for requests that name them. Inputs: ``input`` (B, d)
#: float32, ``tau`` (B, 1) float64, ``baseline`` (B, d) float32 (integrated gradients' starting
#: point). ``kinds``: the model kinds that have the output.
EXPLAIN_OUTPUTS: tuple[OutputSpec, ...] = (
    OutputSpec("integrated_gradients", "FP32", ("d",), ("classification", "regression"),
               "integrated gradients of the decisive output from the baseline, raw input space (sum = F(x) - F(baseline))"),
    OutputSpec("label_flips", "INT64", (), ("classification",),
               "fewest training labels whose change flips the decision (N + 1: none does); memory models"),
    OutputSpec("label_flip_target", "INT64", (), ("classification",),
               "the class those relabellings make the decision; memory models"),
    OutputSpec("label_flip_index", "INT64", ("k",), ("classification",),
               "the support points (training examples) to relabel, in order; -1 past label_flips; memory models"),
    OutputSpec("hj_support_point", "FP32", ("d",), ("classification", "regression"),
               "support point y_j = 2t w_j of the dominant neuron, in raw input space (kinds lse, memory)"),
    OutputSpec("hj_initial_value", "FP32", (), ("classification", "regression"),
               "initial value g_j = -b_j - t|w_j|^2 of the dominant neuron (Thm 4.1)"),
    OutputSpec("hj_value", "FP32", (), ("classification", "regression"),
               "Hopf-Cole value u(z, t) over the decisive group (Thm 4.1)"),
    OutputSpec("hopf_lax_value", "FP32", (), ("classification", "regression"),
               "Hopf-Lax value min_j (g_j + |z - y_j|^2/(4t)): u in the eps -> 0 limit (Thm 5.1)"),
    OutputSpec("tropical_prediction", "INT64", (), ("classification",),
               "the decision in the eps -> 0 (tropical) limit of every LSE"),
    OutputSpec("tropical_prediction", "FP32", ("K",), ("regression",),
               "the predicted values in the eps -> 0 (tropical) limit of every LSE"),
    OutputSpec("eps_decision_changes", "BOOL", (), ("classification", "regression"),
               "whether the eps -> 0 limit changes the decision (regression: moves an output by more than tau)"),
)

#: Explanation outputs only some kinds have.
_EXPLAIN_KINDS = {"label_flips": ("memory",), "label_flip_target": ("memory",), "label_flip_index": ("memory",),
                  "hj_support_point": ("lse", "memory")}


def outputs_for(task: str) -> tuple[OutputSpec, ...]:
    """The outputs a model of ``task`` ("classification" or "regression") produces, in graph order."""
    return tuple(o for o in OUTPUTS if task in o.tasks)


def output_names(task: str) -> tuple[str, ...]:
    """Names of :func:`outputs_for`."""
    return tuple(o.name for o in outputs_for(task))


def explain_outputs_for(task: str, kind: str) -> tuple[OutputSpec, ...]:
    """The explanation outputs a model of ``task`` and ``kind`` has, in graph order."""
    return tuple(o for o in EXPLAIN_OUTPUTS if task in o.tasks and kind in _EXPLAIN_KINDS.get(o.name, KINDS))


#: The integrated gradients' rule, the same in torch and ONNX: IG_PANELS equal panels of IG_ORDER
#: Gauss-Legendre nodes on the path from the baseline.
IG_PANELS, IG_ORDER = 16, 8

#: Elements of the explanation graph's largest per-row tensors in one call (2^24: 128 MiB in float64).
EXPLAIN_ELEMENTS = 1 << 24


def explain_rows(width: int, most: int) -> int:
    """Rows per call of an explanation graph whose first linear map is ``width`` wide (the first body
    layer's pieces, or else the head's neurons: a memory model's support points): its integrated
    gradients hold (rows, IG_PANELS x IG_ORDER, width) float64 tensors, so a call stays within
    :data:`EXPLAIN_ELEMENTS`; at most ``most``, at least 1. The service's batcher explains in calls
    of this size, and :meth:`hjmodel.HJModel.explain` in row blocks of it."""
    return max(1, min(most, EXPLAIN_ELEMENTS // (IG_PANELS * IG_ORDER * max(1, width))))


def explain_rows_per_call(structure: Mapping[str, Any] | None, most: int) -> int:
    """:func:`explain_rows` for the model an artifact's spec ``structure`` describes (missing widths
    count as 1)."""
    st = structure if isinstance(structure, Mapping) else {}
    body = st.get("body") if isinstance(st.get("body"), list) else []
    width = body[0].get("pieces") if body and isinstance(body[0], Mapping) else st.get("n_neurons")
    return explain_rows(int(width) if isinstance(width, int) and width > 0 else 1, most)


_SPECS = {(task, o.name): o for o in (*OUTPUTS, *EXPLAIN_OUTPUTS) for task in o.tasks}


def spec_of(task: str, name: str) -> OutputSpec:
    """The contract entry of output ``name`` (served or explanation) for ``task`` (KeyError if none)."""
    return _SPECS[(task, name)]


@dataclass(frozen=True)
class ArtifactSpec:
    """The typed, validated spec of an artifact: what a server needs to know about a model without
    rebuilding it. ``raw`` keeps the whole JSON object (structure, provenance, metrics).

    Built only by :meth:`from_dict`, which is the one place a spec is validated."""

    kind: str
    task: str
    n_features: int
    n_outputs: int
    eps: float
    t: float
    top_k_max: int
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    alpha: float | None
    #: (low, high): where one deployment's realised false-flag rate lies, 95% of calibration draws
    #: (``calibration.false_flag_rate``; None in artifacts written before it was recorded)
    false_flag_rate: tuple[float, float] | None
    support_ids: tuple[Any, ...] | None
    support_labels: tuple[Any, ...] | None
    input_mean: tuple[float, ...] | None
    #: whether the served radius allows for input rounding (:data:`RADIUS_MARK`)
    radius_covers_input_rounding: bool
    raw: Mapping[str, Any]

    @property
    def is_classification(self) -> bool:
        return self.task == "classification"

    @classmethod
    def from_dict(cls, spec: object, where: str = "spec") -> ArtifactSpec:
        """Validate a parsed spec; raises :class:`~hjmodel.errors.ArtifactError` naming the first
        field that is wrong."""
        if not isinstance(spec, dict):
            raise ArtifactError(f"{where}: spec is not a JSON object")
        if spec.get("format") != SPEC_FORMAT:
            raise ArtifactError(f"{where}: unknown artifact format {spec.get('format')!r} (expected {SPEC_FORMAT!r})")
        if spec.get("kind") not in KINDS:
            raise ArtifactError(f"{where}: unknown model kind {spec.get('kind')!r}")
        if spec.get("task") not in TASKS:
            raise ArtifactError(f"{where}: unknown task {spec.get('task')!r}")
        for key in ("n_features", "n_outputs", "eps", "t", "structure", "calibration"):
            if key not in spec:
                raise ArtifactError(f"{where}: spec lacks {key!r}")
        for key in ("n_features", "n_outputs"):
            if not _positive_int(spec[key]):
                raise ArtifactError(f"{where}: {key} must be a positive integer")
        for key in ("eps", "t"):
            if not (_number(spec[key]) and spec[key] > 0 and math.isfinite(spec[key])):
                raise ArtifactError(f"{where}: {key} must be a positive number")
        top = spec.get("top_k_max", TOP_K_MAX)
        if not _positive_int(top):
            raise ArtifactError(f"{where}: top_k_max must be a positive integer")
        names = spec.get("class_names") or []
        if spec["task"] == "classification" and (
                not isinstance(names, list) or len(names) != spec["n_outputs"] or not all(map(_name, names))
                or len(set(names)) != len(names)):
            raise ArtifactError(f"{where}: class_names must list n_outputs distinct names")
        calibration = spec["calibration"]
        if not isinstance(calibration, dict):
            raise ArtifactError(f"{where}: calibration must be a JSON object")
        alpha = calibration.get("alpha")
        if alpha is not None and not (_number(alpha) and 0 < alpha < 1):
            raise ArtifactError(f"{where}: calibration.alpha must be in (0, 1)")
        rate = calibration.get("false_flag_rate")
        if rate is not None and not (isinstance(rate, dict) and all(
                _number(rate.get(k)) and 0 <= rate[k] <= 1 for k in ("low", "high"))):
            raise ArtifactError(f"{where}: calibration.false_flag_rate must hold low and high in [0, 1]")
        features = spec.get("feature_names") or []
        if not isinstance(features, list):
            raise ArtifactError(f"{where}: feature_names must be a list")
        if features and (len(features) != spec["n_features"] or not all(map(_name, features))
                         or len(set(features)) != len(features)):
            raise ArtifactError(f"{where}: feature_names must list n_features distinct names (or none)")
        structure = spec["structure"]
        if not isinstance(structure, dict):
            raise ArtifactError(f"{where}: structure must be a JSON object")
        body = structure.get("body", [])
        if not (isinstance(body, list) and all(isinstance(b, dict) for b in body)):
            raise ArtifactError(f"{where}: structure.body must be a list of objects")
        if "n_neurons" in structure and not _positive_int(structure["n_neurons"]):
            raise ArtifactError(f"{where}: structure.n_neurons must be a positive integer")
        ids, labels = spec.get("support_ids"), spec.get("support_labels")
        mean = spec.get("input_mean")
        if mean is not None and not (isinstance(mean, list) and len(mean) == spec["n_features"]
                                     and all(_number(v) and math.isfinite(v) for v in mean)):
            raise ArtifactError(f"{where}: input_mean must list n_features finite numbers")
        return cls(kind=spec["kind"], task=spec["task"], n_features=int(spec["n_features"]),
                   n_outputs=int(spec["n_outputs"]), eps=float(spec["eps"]), t=float(spec["t"]),
                   top_k_max=int(top), class_names=tuple(str(n) for n in names),
                   feature_names=tuple(str(n) for n in features),
                   alpha=None if alpha is None else float(alpha),
                   false_flag_rate=None if rate is None else (float(rate["low"]), float(rate["high"])),
                   support_ids=tuple(ids) if isinstance(ids, list) else None,
                   support_labels=tuple(labels) if isinstance(labels, list) else None,
                   input_mean=None if mean is None else tuple(float(v) for v in mean),
                   radius_covers_input_rounding=spec.get(RADIUS_MARK) is True,
                   raw=spec)

    def unserved_because(self) -> str | None:
        """Why this artifact must not be served (None when it may): one exported before its served
        radius allowed for the rounding of inputs to float32 answers a radius that a client sending
        float64 values (FP64 tensors, JSON decimals) can cross. ``hjmodel rebuild`` writes it again
        from its ``model.pt`` with this version's graph."""
        if not self.radius_covers_input_rounding:
            return ("it was exported before its certified radius allowed for the rounding of inputs to float32 "
                    "(a client sending float64 values could be answered an unsound radius); write it again with "
                    "`hjmodel rebuild VERSION_DIR --out NEW_VERSION_DIR`")
        return None

    def outputs(self) -> tuple[OutputSpec, ...]:
        """The contract outputs of this model (:func:`outputs_for` its task)."""
        return outputs_for(self.task)


def spec_mismatch(spec: Mapping[str, Any], embedded: str | None) -> str | None:
    """Why a graph's embedded spec (the JSON text of its :data:`ONNX_SPEC_KEY` metadata, None when
    it has none) is not ``spec`` -- the artifact's ``model.json`` -- or None when it is. A graph is
    self-contained (its calibration thresholds, eps, class order are constants in it), so a server
    that read its claims (alpha, class names, kind) from another spec would serve claims the graph
    does not keep."""
    if embedded is None:
        return f"it carries no {ONNX_SPEC_KEY!r} metadata"
    try:
        other = json.loads(embedded)
    except ValueError:
        return f"its {ONNX_SPEC_KEY!r} metadata is not JSON"
    if not isinstance(other, dict):
        return f"its {ONNX_SPEC_KEY!r} metadata is not a JSON object"

    def canonical(value: object) -> str:
        return json.dumps(value, sort_keys=True)
    differ = sorted(k for k in spec.keys() | other.keys() if canonical(spec.get(k)) != canonical(other.get(k)))
    return f"they differ in {differ[:6]}" if differ else None


def _name(value: object) -> bool:
    """A class or feature name: a string, or an integer (written as its decimal string)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_threads(threads) -> int:
    """An intra-op thread count as an int in [0, MAX_THREADS] (0: one per core), or ValueError."""
    if isinstance(threads, bool) or not isinstance(threads, int) and not hasattr(threads, "__index__") \
            or not 0 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be an integer in [0, {MAX_THREADS}] (0: one per core), got {threads!r}")
    return int(threads)


def session_options(threads: int = 0, *, spinning: bool = False) -> Any:
    """``onnxruntime.SessionOptions`` for a served graph: sequential, one inter-op thread,
    ``threads`` intra-op threads (0: onnxruntime's default, one per core). Open sessions with
    :func:`open_session`.

    ``spinning``: whether the intra-op threads busy-wait for work between operators (onnxruntime's
    default) instead of sleeping. Off unless asked for: a spinning pool keeps its cores busy between
    a graph's operators and between calls, and a server shares those cores with its event loop, its
    other models and, on small machines, its clients (served: ``bench/results/ab_server_spinning*.md``);
    on cores nothing else wants, spinning is faster (in process: ``bench/results/session_threads.md``).
    docs/ARCHITECTURE.md gives both measurements. With one thread there is no pool and nothing spins."""
    import onnxruntime as ort

    threads = check_threads(threads)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads > 0:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def tau_refusal(task: str, tau) -> str | None:
    """Why the certificate tolerance ``tau`` asked of a ``task`` model cannot be used (None: it can;
    None asks for nothing). The caller names it: ``f"{name} {reason}"``. A classifier's radius
    certifies its decision and reads no tau, so a tau given to one is refused, never dropped unread
    (a client could read the radius as "the output moves by at most tau")."""
    if tau is None:
        return None
    if task != "regression":
        return (f"is a regression model's certificate tolerance; this is a {task} model, whose certified "
                "radius is for its decision and reads no tau")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
        return f"must be a finite number > 0, got {tau!r}"
    return None


def check_self_contained(graph: bytes, where: str = "the graph") -> None:
    """Raise :class:`ArtifactError` when a serialised ONNX graph keeps any tensor outside itself (ONNX
    *external data*: an initializer, a sparse initializer, a constant or other tensor attribute, in
    the main graph, a subgraph or a function, that names a file to read its values from).

    No hjmodel graph does (the largest, N = 60,000 support points in d = 784, is ~0.4 GB, inside
    protobuf's 2 GB), and such a file would escape the artifact's checks: ``SHA256SUMS`` covers the
    artifact's own files, not files a graph names, so its weights could change with no digest
    noticing, and onnxruntime resolves the name against the model's directory when it opens a file
    but against the process's working directory when it opens bytes (the service's graphs cut down
    to fewer outputs). Also refuses bytes that are not an ONNX model."""
    import onnx

    try:
        model = onnx.load_model_from_string(graph)
    except Exception as exc:   # protobuf's DecodeError and friends
        raise ArtifactError(f"{where}: not a valid ONNX model ({type(exc).__name__})") from None
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise ArtifactError(f"{where}: tensor {tensor.name!r} reads its values from external data "
                                f"({location!r}); an hjmodel graph holds every weight itself, and "
                                f"SHA256SUMS does not cover other files")


def _tensors(model) -> Iterator[Any]:
    """Every TensorProto of an ONNX model: initializers, sparse initializers' values and indices, and
    tensor attributes, in the main graph, its subgraphs and the model's functions."""
    def of_nodes(nodes) -> Iterator[Any]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
                for sparse in attr.sparse_tensors:
                    yield from (sparse.values, sparse.indices)
                for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from of_graph(graph)

    def of_graph(graph) -> Iterator[Any]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from of_nodes(graph.node)

    yield from of_graph(model.graph)
    for function in model.functions:
        yield from of_nodes(function.node)


def open_session(path: str | Path | bytes, *, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",),
                 flush_subnormals: bool = False, spinning: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` of a served graph (the service, the offline predictor,
    ``hjmodel verify``, the tests and benchmarks all open theirs here), with :func:`session_options`.
    ``path``: the graph's file, or the serialised graph itself; either way onnxruntime opens the bytes
    :func:`check_self_contained` passed (a graph with external data is refused).

    ``spinning``: see :func:`session_options` (off: idle intra-op threads sleep).

    ``flush_subnormals``: onnxruntime's own threads flush subnormal numbers to zero
    (``session.set_denormal_as_zero``); the thread that *runs* the session must do so itself
    (:func:`flush_subnormals`: the processor's mode is per thread, and onnxruntime sets it on the
    thread that opens a session -- for good -- not at ``run``). The session is therefore opened on a
    short-lived thread of its own, so the caller's thread keeps its arithmetic: the predictor and
    ``verify`` run in their callers' threads and leave the flush off; the service, whose backend
    threads are its own, turns it on.

    The flush is for speed: far from the reference points (an OOD input) many terms of the served
    log-sum-exps fall below 2.2e-308, where the exp kernel takes a slow path -- a memory model's graph
    took 61 ms instead of 44 ms for 256 such rows (bench/results/hjmodel_bench.md, *far rows*). It
    cannot loosen a certificate: every flushed quantity is below 2.3e-308 in magnitude, a term of a
    sum whose largest term is exp(0) = 1 (every log-sum-exp is max-shifted), so results move by less
    than N x 2.3e-308 relative, some 290 orders of magnitude inside the certificates' rounding floor;
    a margin or gradient that small becomes 0, which gives radius 0. Of the rounded float32 outputs, a
    radius below float32's normal range rounds to 0 (still a lower bound) and the p-value, rounded up,
    is at least 1 / (1 + n). The served-bits soundness tests (tests/hjmodel/test_served_precision.py)
    attack flushed sessions run on a flushing thread."""
    import onnxruntime as ort

    options = session_options(threads, spinning=spinning)
    if isinstance(path, (bytes, bytearray)):
        source, where = bytes(path), "the graph"
    else:   # read once: the bytes checked are the bytes opened
        source, where = Path(path).read_bytes(), str(path)
    check_self_contained(source, where)
    if not flush_subnormals:
        return ort.InferenceSession(source, options, providers=list(providers))
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as opener:
        return opener.submit(ort.InferenceSession, source, options, providers=list(providers)).result()


def flush_subnormals() -> bool:
    """Flush subnormal numbers to zero on the calling thread (the processor's FTZ / DAZ modes, as
    ``session.set_denormal_as_zero`` does; through ``torch.set_flush_denormal``), so a served graph
    run on this thread by onnxruntime or torch gets the speed :func:`open_session` says it is for.

    Needed where a session runs on another thread than the one that opened it: onnxruntime sets
    the modes on the *opening* thread (and threads started from it afterwards), not at ``run``.
    The service calls it on each backend's thread (service.batching). False where the processor
    has no such mode (nothing changes)."""
    import torch

    return bool(torch.set_flush_denormal(True))


_SMALLEST_NORMAL, _HALF = sys.float_info.min, 0.5


def flushing_subnormals() -> bool:
    """Whether the calling thread flushes subnormal numbers to zero now (half the smallest normal
    float64, computed on this thread, comes out 0)."""
    return _SMALLEST_NORMAL * _HALF == 0.0   # variables: a literal product would be folded at compile time


@contextlib.contextmanager
def subnormals_flushed() -> Iterator[None]:
    """:func:`flush_subnormals` on the calling thread for the block, the thread's own mode restored
    after it: for a graph run on a thread that otherwise keeps subnormals (the service's event loop,
    service.batching), in the mode its backend thread runs it in, so the answer is the same bits."""
    import torch

    if flushing_subnormals():
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def onnx_feeds(session: Any, x: Any, tau: Any = 0.1, baseline: Any = None) -> dict[str, Any]:
    """The feeds of a served ONNX graph for rows ``x`` (n, d): ``input`` as float32 and, when the
    graph takes them, ``tau`` as float64 ``(n, 1)`` (one value is repeated for every row; a graph
    exported before tau had a batch dimension takes a single value, ``(1,)``) and ``baseline`` as
    float32 ``(n, d)`` (the explanation graph; one row is repeated). ``session`` is an
    ``onnxruntime.InferenceSession`` (anything with ``get_inputs()``)."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    feeds: dict[str, Any] = {"input": x}
    for spec in session.get_inputs():
        if spec.name == "baseline":
            if baseline is None:
                raise ValueError("this graph needs a baseline")
            feeds["baseline"] = np.ascontiguousarray(np.broadcast_to(np.asarray(baseline, dtype=np.float32), x.shape))
        if spec.name != "tau":
            continue
        values = np.asarray(tau, dtype=np.float64).reshape(-1)
        if len(spec.shape) == 1:   # legacy graph: one tolerance for the whole batch
            if values.size != 1 and not np.all(values == values[0]):
                raise ValueError("this graph takes one tau for the whole batch")
            feeds["tau"] = values[:1].copy()
        else:
            feeds["tau"] = np.ascontiguousarray(np.broadcast_to(values, (x.shape[0],)).reshape(-1, 1))
    return feeds


#: V2 datatype -> numpy dtype of the served outputs.
NUMPY_DTYPES = {"FP32": "float32", "INT64": "int64", "BOOL": "bool", "FP64": "float64"}


def select_outputs(task: str, outputs: Mapping[str, Any], names, top_k: int) -> dict[str, Any]:
    """The outputs ``names`` of a graph run, in their served dtypes, the top-k outputs sliced to their
    first ``top_k`` columns (the graph computes ``TOP_K_MAX``). One implementation for the server and
    for offline predictors, so a row reads the same everywhere."""
    import numpy as np

    selected = {}
    for name in names:
        spec = spec_of(task, name)
        value = np.asarray(outputs[name])
        if spec.row_shape == ("k",):
            value = value[:, :top_k]
        selected[name] = value.astype(NUMPY_DTYPES[spec.datatype], copy=False)
    return selected
