"""Artifacts: one self-describing model, as ONNX (graph computes every diagnostic) or torch + JSON.

A version directory of a model repository holds ``model.onnx`` and/or ``model.pt`` + ``model.json``.
The spec (JSON) records the kind, eps, gauge t, task and class names, preprocessing, calibration,
provenance and held-out metrics, plus the structure needed to rebuild the module. Loading never
executes code from a file: ``torch.load(weights_only=True)``, JSON, and ONNX protobufs only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from . import functional as F
from .errors import ArtifactError
from .models import GibbsHead, HJModel, LSEGroupLayer, OODReference, Preprocess
from .serving import (
    CHECKSUM_FILE,
    EXPLAIN_FILE,
    ONNX_FILE,
    ONNX_SPEC_KEY,
    RADIUS_MARK,
    ROUNDED_DOWN,
    ROUNDED_UP,
    SPEC_FILE,
    SPEC_FORMAT,
    TOP_K_MAX,
    TORCH_FILE,
    ArtifactSpec,
    explain_outputs_for,
    outputs_for,
)
from .train import FALSE_FLAG_LEVEL, false_flag_interval

__all__ = [
    "ExplainModule",
    "ServingModule",
    "TracedModule",
    "traced_or_eager",
    "export_onnx",
    "file_sha256",
    "recorded_sha256",
    "verify_checksums",
    "write_checksums",
    "load_model",
    "load_serving_module",
    "model_spec",
    "prune_graph",
    "read_artifact_spec",
    "read_spec",
    "save_artifact",
    "save_torch",
    "served_form",
]

_TORCH_DTYPES = {"FP32": torch.float32, "INT64": torch.long, "BOOL": torch.bool}


log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ spec


def model_spec(model: HJModel) -> dict:
    """The JSON spec of ``model`` (everything but the tensors)."""
    head, ref = model.head, model.reference
    calibration = {
        "alpha": ref.alpha, "reference_size": int(ref.points.shape[0]), "reference_t": ref.t,
        "reference_eps": ref.eps, "regime_factor": ref.regime_factor,
        "n_normaliser": int(ref.norm_unsupported.numel()), "n_conformal": int(ref.combined.numel()),
    }
    if ref.alpha is not None and ref.combined.numel():
        # where one deployment's realised false-flag rate lands (over the draw of its calibration rows)
        mean, lo, hi = false_flag_interval(ref.alpha, int(ref.combined.numel()))
        calibration["false_flag_rate"] = {"mean": mean, "low": lo, "high": hi, "level": FALSE_FLAG_LEVEL}
    support = {}
    if head.mode == "values":
        # memory kind: attributions point at training examples (ids into the training dataset)
        support["support_ids"] = head.example_ids.tolist()
        if model.task == "classification":
            support["support_labels"] = [model.class_names[int(k)] for k in head.labels]
        else:
            support["support_labels"] = head.V[:, 0].tolist() if head.V.shape[1] == 1 else head.V.tolist()
    return {
        **support,
        "format": SPEC_FORMAT,
        "kind": model.kind,
        "task": model.task,
        "n_features": model.n_features,
        "n_outputs": model.n_outputs,
        "class_names": model.class_names if model.task == "classification" else [],
        "feature_names": list(model.meta.get("feature_names") or []),
        "eps": head.eps,
        "t": head.t,
        "top_k_max": TOP_K_MAX,
        # the served radius holds for what a client sent, not only for its float32 rounding
        # (functional.input_rounding_radius); artifacts written before are not served
        RADIUS_MARK: True,
        "outputs": [{"name": o.name, "datatype": o.datatype, "row_shape": list(o.row_shape), "doc": o.doc}
                    for o in outputs_for(model.task)],
        "explain_outputs": [o.name for o in explain_outputs_for(model.task, model.kind)],
        # the default baseline of integrated gradients: the preprocessing mean (the training mean)
        "input_mean": model.preprocess.mu.tolist(),
        "structure": {
            "head_mode": head.mode,
            "n_neurons": int(head.W.shape[0]),
            "labels_in_exponent": head.labels_in_exponent,
            "body": [{"eps": layer.eps, "pieces": int(layer.W.shape[0]), "units": int(layer.mask.shape[0])}
                     for layer in model.body],
            "preprocess_dim": int(model.preprocess.A.shape[0]),
        },
        "calibration": calibration,
        "provenance": model.meta.get("provenance", {}),
        "metrics": model.meta.get("metrics", {}),
    }


def _state(model: HJModel) -> dict[str, Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = model.reference
    state["reference.points"] = ref.points
    state["reference.labels"] = ref.labels
    state["reference.norm_unsupported"] = ref.norm_unsupported
    state["reference.norm_ambiguous"] = ref.norm_ambiguous
    state["reference.combined"] = ref.combined
    return {k: v.contiguous() for k, v in state.items()}


def _check_spec(spec: object, where: str) -> dict:
    """The spec itself, once :meth:`ArtifactSpec.from_dict` (the one validator) accepts it."""
    ArtifactSpec.from_dict(spec, where)
    return spec  # type: ignore[return-value]


def _model_from(spec: dict, state: dict[str, Tensor], where: str) -> HJModel:
    """Rebuild an HJModel from a validated spec and a tensor dict, checking every shape."""

    def get(name: str, ndim: int) -> Tensor:
        if name not in state:
            raise ArtifactError(f"{where}: weights lack tensor {name!r}")
        v = state[name]
        if not isinstance(v, Tensor) or v.ndim != ndim:
            raise ArtifactError(f"{where}: tensor {name!r} must be {ndim}-D")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ArtifactError(f"{where}: tensor {name!r} holds NaN or Inf")
        return v

    st = spec["structure"]
    try:
        pre = Preprocess(get("preprocess.mu", 1), get("preprocess.A", 2))
        body = []
        for i, layer in enumerate(st.get("body", [])):
            p = f"body.{i}."
            body.append(LSEGroupLayer(get(p + "W", 2), get(p + "b", 1), get(p + "mask", 2), layer["eps"]))
        head = GibbsHead(get("head.W", 2), get("head.b", 1), spec["eps"], spec["t"], st["head_mode"],
                         mask=get("head.mask", 2), V=get("head.V", 2), labels=get("head.labels", 1),
                         example_ids=get("head.example_ids", 1),
                         labels_in_exponent=bool(st.get("labels_in_exponent", False)))
        cal = spec["calibration"]
        ref = OODReference(points=get("reference.points", 2), t=float(cal["reference_t"]),
                           eps=float(cal["reference_eps"]), alpha=float(cal["alpha"]),
                           labels=get("reference.labels", 1) if "reference.labels" in state
                           else torch.zeros(0, dtype=torch.long),   # artifacts before class-conditional u
                           norm_unsupported=get("reference.norm_unsupported", 1),
                           norm_ambiguous=get("reference.norm_ambiguous", 1),
                           combined=get("reference.combined", 1),
                           regime_factor=float(cal.get("regime_factor", 100.0)))
        meta = {k: spec.get(k) for k in ("class_names", "feature_names", "provenance", "metrics")}
        model = HJModel(spec["kind"], spec["task"], pre, body, head, ref, meta)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise ArtifactError(f"{where}: inconsistent weights or spec ({e})") from e
    # shapes must agree with the spec and with each other
    d = int(spec["n_features"])
    if pre.A.shape[1] != d or pre.mu.shape[0] != d:
        raise ArtifactError(f"{where}: preprocessing expects {pre.A.shape[1]} features, spec says {d}")
    if model.n_outputs != int(spec["n_outputs"]):
        raise ArtifactError(f"{where}: head has {model.n_outputs} outputs, spec says {spec['n_outputs']}")
    dims = [pre.A.shape[0]] + [layer.mask.shape[0] for layer in body]
    ins = [layer.W.shape[1] for layer in body] + [head.W.shape[1]]
    if dims != ins or ref.points.shape[1] != dims[-1]:
        raise ArtifactError(f"{where}: layer dimensions do not chain ({dims} vs {ins})")
    labels = ref.labels
    if labels.numel() and (labels.shape[0] != ref.points.shape[0] or labels.is_floating_point()
                           or int(labels.min()) < 0 or int(labels.max()) >= model.n_outputs):
        raise ArtifactError(f"{where}: reference labels must be one class index in [0, {model.n_outputs}) "
                            f"per reference point")
    return model


# ------------------------------------------------------------------------------------ torch


def save_torch(model: HJModel, directory: str | Path) -> Path:
    """Write ``model.pt`` (tensors only) and ``model.json`` (spec) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(_state(model), directory / TORCH_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(model_spec(model), indent=2, sort_keys=True))
    return directory


def _check_uncompressed(path: Path, where: str) -> None:
    """Refuse a torch checkpoint (a zip archive) that holds a compressed entry, before torch reads it.

    ``torch.save`` stores every entry uncompressed, so no entry of an artifact it wrote is larger
    than the file; ``torch.load`` would inflate a deflated one whole into memory, and a few MB can
    deflate GBs (a zip bomb: one such file would take the server, and every model it serves, down).
    The sizes come from the archive's directory: nothing is inflated to check them. A file that is
    not a zip archive is left to ``torch.load`` (which refuses it, or reads the legacy format: no
    compression)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise ArtifactError(f"{where}: {TORCH_FILE}: entry {entry.filename!r} is compressed "
                                f"({entry.compress_size} bytes that would inflate to {entry.file_size}); "
                                "torch.save writes none, and hjmodel refuses what it would inflate")


def _load_torch(directory: Path) -> HJModel:
    where = str(directory)
    try:
        spec = json.loads((directory / SPEC_FILE).read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{where}: no {SPEC_FILE} beside {TORCH_FILE}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{where}: {SPEC_FILE} is not valid JSON ({e})") from e
    spec = _check_spec(spec, where)
    _check_uncompressed(directory / TORCH_FILE, where)
    try:
        state = torch.load(directory / TORCH_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ArtifactError(f"{where}: no {TORCH_FILE}") from e
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise ArtifactError(f"{where}: {TORCH_FILE} is corrupt, truncated or unsafe ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    if not isinstance(state, dict):
        raise ArtifactError(f"{where}: {TORCH_FILE} does not hold a tensor dictionary")
    return _model_from(spec, state, where)


# ------------------------------------------------------------------------------------ serving


# Every float32 output but the bounds (serving.ROUNDED_DOWN / ROUNDED_UP) is rounded to nearest and
# saturated to the finite float32 range.


def served_form(name: str, value: Tensor, datatype: str) -> Tensor:
    """One float64 output in its served datatype (float32 bounds rounded in their safe direction)."""
    if datatype != "FP32":
        return value.to(_TORCH_DTYPES[datatype])
    value = value.to(torch.float64)
    if name in ROUNDED_DOWN:
        return F.float32_down(value)
    if name in ROUNDED_UP:
        return F.float32_up(value)
    return F.float32_saturate(value)


class ServingModule(nn.Module):
    """forward(input: float32 (B, d), tau: float64 (B, 1)) -> dict of the served outputs (tau: each
    row's regression tolerance; a single value is broadcast to every row).

    The same module runs under torch and is exported to ONNX; all arithmetic is float64, and the
    float32 outputs are rounded so that every served bound is still a bound (see :func:`served_form`).
    ``outputs``: only these outputs of the contract (None: every one), with only the work they need
    (:meth:`HJModel.evaluate`); the same values, bit for bit, as the whole module's (tests/hjmodel/test_trace.py)."""

    def __init__(self, model: HJModel, outputs: Iterable[str] | None = None):
        super().__init__()
        self.model = model.double().eval()
        wanted = None if outputs is None else set(outputs)
        self.specs = tuple(o for o in outputs_for(model.task) if wanted is None or o.name in wanted)
        self._names = None if wanted is None else tuple(o.name for o in self.specs)

    def forward(self, input: Tensor, tau: Tensor) -> dict[str, Tensor]:  # noqa: A002 (V2 name)
        out = dict(self.model.evaluate(input, tau=tau, top_k=TOP_K_MAX, outputs=self._names,
                                       float32_outputs=True).outputs)
        if "certified_radius" in out:   # certified around the float32 row: for what a client sent
            out["certified_radius"] = F.input_rounding_radius(out["certified_radius"], input)
        return {o.name: served_form(o.name, out[o.name], o.datatype) for o in self.specs}

    def blocks(self, n: int) -> list[slice]:
        """The row blocks ``forward`` evaluates n rows in (:meth:`HJModel.row_blocks`)."""
        return self.model.row_blocks(n)


class ExplainModule(nn.Module):
    """forward(input: float32 (B, d), tau: float64 (B, 1), baseline: float32 (B, d)) -> dict of the
    explanation outputs (:meth:`HJModel.explain`), in their served datatypes (float64 arithmetic)."""

    def __init__(self, model: HJModel):
        super().__init__()
        self.model = model.double().eval()
        self.specs = explain_outputs_for(model.task, model.kind)

    def forward(self, input: Tensor, tau: Tensor, baseline: Tensor) -> dict[str, Tensor]:  # noqa: A002
        out = self.model.explain(input, tau=tau, baseline=baseline.to(torch.float64), top_k=TOP_K_MAX)
        return {o.name: served_form(o.name, out[o.name], o.datatype) for o in self.specs}

    def blocks(self, n: int) -> list[slice]:
        """The row blocks ``forward`` explains n rows in (:meth:`HJModel.explain_blocks`)."""
        return self.model.explain_blocks(n)


class _TupleOutputs(nn.Module):
    def __init__(self, serving: nn.Module):
        super().__init__()
        self.serving = serving

    def forward(self, *inputs: Tensor):
        out = self.serving(*inputs)
        return tuple(out[o.name] for o in self.serving.specs)


def example_inputs(module: ServingModule | ExplainModule, rows: int = 2) -> dict[str, Tensor]:
    """The inputs a graph of ``module`` is recorded with (an ONNX export, a trace): ``rows`` rows of
    zeros, tolerance 0.1 per row (a batched input), and the preprocessing mean as the baseline. The
    graph does not depend on them: every branch on a batch's size or contents takes its
    batch-independent form while recording (:func:`functional.static_graph`)."""
    model = module.model
    inputs = {"input": torch.zeros(rows, model.n_features, dtype=torch.float32, device=model.preprocess.mu.device),
              "tau": torch.full((rows, 1), 0.1, dtype=torch.float64, device=model.preprocess.mu.device)}
    if isinstance(module, ExplainModule):
        inputs["baseline"] = model.preprocess.mu.to(torch.float32).expand(rows, -1).contiguous()
    return inputs


class TracedModule:
    """A :class:`ServingModule` or :class:`ExplainModule` recorded once as a TorchScript graph and run
    by TorchScript's interpreter: the same aten operations eager torch runs, in the batch-independent
    form the ONNX graph has (:func:`functional.static_graph`), without Python between them. At batch 1
    eager torch spends most of a call dispatching ~600 small operations from Python; the graph takes
    about half the time (``bench/results/hjmodel_bench.md``). Called like the module: positional inputs
    in ``example_inputs`` order -> dict of the served outputs; a batch runs in the module's own row
    blocks (``module.blocks``: the graph, like an exported one, takes whatever it is given whole), so
    its tensors stay within the bounds eager torch keeps.

    The interpreter runs with its optimisation passes off, in every call's thread (the switch is
    per thread): its constant pooling and common-subexpression elimination merge float64 constants
    that are equal in float32 (seen: ``-1e-300`` became ``0``), which would silently change rounding
    allowances and directed-rounding factors of the certificates -- the hazard ``_exact_constants``
    guards the ONNX export against; with them on, the demo models served other OOD p-values and
    attribution ties. Test: tests/hjmodel/test_trace.py (bit-identical to eager torch on every demo
    model, whichever rows recorded the graph; float32-equal constants stay apart). One form differs from
    eager torch's: for a small batch eager torch forms the OOD reference's squared distances from
    exact differences, the trace (like the ONNX graph) by the centred expansion
    (:func:`functional.squared_distances`); they differ in float64's last bits, and the served float32
    outputs were the same in every test.

    ``fold`` (default): the weights are recorded as constants and the operations that read them alone
    are done once, at load (:func:`_fold_constants`; ``folded_bytes``: the memory the values folded
    hold beyond the module's own tensors), and a serving graph's gathered searches run only when they
    gathered something, as in the ONNX graph (:func:`_skip_empty_traced_searches`;
    ``searches_skipped``: how many are wrapped so; ``skip_searches=False``: none, the side-by-side
    baseline of ``bench/ab_trace_searches.py``); ``fold=False`` records the module as it is (its
    weights read as attributes, every operation run per call, no search wrapped): the side-by-side
    baseline of ``bench/ab_trace.py``.

    A call of at most ``static_rows`` rows (default: :data:`STATIC_ROWS` for a folded serving graph on a CPU,
    0 for an explanation graph, which a server runs beside the serving graph; then cut to the rows the
    runtime ran within :data:`STATIC_CALL_S` at load: the attribute says how many) runs the same graph
    on TorchScript's static runtime instead (:class:`_StaticRuntime`: the same bits, ~0.8x the time at
    batch 1, holding Python's lock while it runs); a larger one, or one made while another call is on
    the runtime, on the interpreter."""

    def __init__(self, module: ServingModule | ExplainModule, inputs: dict[str, Tensor] | None = None,
                 fold: bool = True, skip_searches: bool = True, static_rows: int | None = None):
        import warnings

        self.model, self.specs, self.blocks = module.model, module.specs, module.blocks
        self.names = tuple(o.name for o in module.specs)
        inputs = tuple((example_inputs(module) if inputs is None else inputs).values())
        outputs = _TupleOutputs(module).eval()

        def served(*xs: Tensor):
            return outputs(*xs)

        with _RECORDING, warnings.catch_warnings(), torch.no_grad(), torch.jit.optimized_execution(False):
            warnings.simplefilter("ignore")
            module(*inputs)           # lazily built weight-only tables enter the graph as constants
            if fold:
                # a function, not the module, is traced: the weights enter the graph as constants, not
                # as attribute reads, so the work that depends on them alone can be done once, here
                with _weights_as_constants(module):
                    self.graph, self.folded_bytes = _fold_constants(torch.jit.trace(served, inputs, check_trace=False))
                wrap = _gathered_searches(self.model) if skip_searches and isinstance(module, ServingModule) else ()
                self.graph, self.searches_skipped = _skip_empty_traced_searches(self.graph, wrap)
            else:
                self.graph, self.folded_bytes = torch.jit.trace(outputs, inputs, check_trace=False), 0
                self.searches_skipped = 0
            # the first call fixes each recorded function's executable graph, unoptimised; left to a
            # later caller, anything that reads the graph with the switch on (``inlined_graph``)
            # would have it optimised and cached first
            self.graph(*inputs)
        if static_rows is None:
            static_rows = STATIC_ROWS if isinstance(module, ServingModule) else 0
        if inputs[0].device.type != "cpu" or not fold:
            # the runtime's planned kernels are CPU ones; it cannot run a module's attribute reads
            static_rows = 0
        while static_rows > 0 and len(self.blocks(static_rows)) > 1:   # a static call is one row block
            static_rows -= 1
        one = _repeated(inputs, 1)
        if static_rows > 0 and _best_of(3, lambda: self.interpret(*one)) > 2 * STATIC_CALL_S:
            # one row takes the interpreter (which lets go of Python's lock) too long for the runtime
            # to fit: never prepared, so loading a costly model holds the lock for none of its calls
            static_rows = 0
        self._static = _static_runtime(self.graph, one) if static_rows > 0 else None
        self.static_rows = 0 if self._static is None else self._static.agreeing_rows(
            self._static.rows_within(STATIC_CALL_S, static_rows, inputs), inputs)
        self._static_free = threading.Lock()

    @property
    def static_failed(self) -> int:
        """Calls the static runtime raised on and the interpreter answered (0 without a runtime)."""
        return 0 if self._static is None else self._static.failed

    def operations(self) -> list[str]:
        """The recorded graph's operations by kind, those in its branches (the skipped searches)
        included, read from an inlined copy (the trace's first call fixed its executable graphs
        unoptimised, so reading changes none of its answers): what the tests and
        ``bench/ab_trace.py`` compare between recordings."""
        graph = self.graph.graph.copy()
        torch._C._jit_pass_inline(graph)

        def kinds(nodes) -> list[str]:
            return [k for node in nodes for k in [node.kind(), *(k for b in node.blocks() for k in kinds(b.nodes()))]]

        return kinds(graph.nodes())

    def calls_made(self, *inputs: Tensor) -> int:
        """How many aten calls one call of the trace on ``inputs`` makes (torch's profiler counts each
        one dispatched, the ones an operation makes inside another included): what a skipped search
        saves (tests/hjmodel/test_trace.py, ``bench/ab_trace_searches.py``)."""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            self.interpret(*inputs)
        return sum(1 for event in prof.events() if event.name.startswith("aten::"))

    def __call__(self, *inputs: Tensor) -> dict[str, Tensor]:
        # the module's own row blocks (the graph would take the batch whole, as an exported one does):
        # a large batch stays within the memory eager torch would use. Inference mode, whoever calls:
        # it skips autograd's bookkeeping on each operation (no_grad keeps it): bench/results/ab_trace.md;
        # the outputs are inference tensors (read them, do not train on them)
        # static_rows is 0 whenever there is no runtime (see __init__)
        if inputs[0].shape[0] <= self.static_rows and self._static_free.acquire(blocking=False):
            try:
                return dict(zip(self.names, self._static.run(inputs), strict=True))
            finally:
                self._static_free.release()
        return self.interpret(*inputs)

    def interpret(self, *inputs: Tensor) -> dict[str, Tensor]:
        """A call on the interpreter whatever its size: what a caller wants whose other threads must
        run meanwhile (the torch backend's serving call with its explanation beside it)."""
        n = inputs[0].shape[0]
        blocks = self.blocks(n)
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            if len(blocks) == 1:
                return dict(zip(self.names, self.graph(*inputs), strict=True))
            parts = [self.graph(*(t[r] if t.shape[0] == n else t for t in inputs)) for r in blocks]
            return {name: torch.cat([part[i] for part in parts]) for i, name in enumerate(self.names)}


#: A serving graph's calls of at most this many rows run on TorchScript's static runtime
#: (:class:`_StaticRuntime`); larger ones on the interpreter, which lets go of Python's lock while it runs.
STATIC_ROWS = 16
#: ... and only as many rows as the runtime took at most this long for when the graph was loaded: the
#: longest a thread beside the call (a server's event loop) waits for it to let go of Python's lock
STATIC_CALL_S = 1e-3


class _StaticRuntime:
    """A recorded graph on TorchScript's *static runtime* (``torch._C._jit_to_static_module``): the same
    aten operations, run without the interpreter's per-instruction dispatch and with the graph's
    intermediate tensors planned once per shape -- 0.79-0.86x the interpreter's time at batch 1 on the
    demo models (``bench/results/ab_static_runtime.md``). It holds Python's lock for the whole call
    (the interpreter releases it), so :class:`TracedModule` runs only small calls here
    (``static_rows``, :meth:`rows_within`): a thread beside it stops for about :data:`STATIC_CALL_S` at most.

    Every tensor constant of the recording is lifted into an input before the runtime sees the graph
    (``lifted``, passed after the caller's inputs on every call): its preparation passes may merge or
    rewrite constants, and a directed-rounding factor such as 1 + 2^-40 must stay apart from a 1 (the
    hazard :class:`TracedModule` turns the interpreter's optimiser off for). A runtime that fails to
    prepare, or answers its first call differently from the interpreter in any bit, is not used
    (``None`` from :func:`_static_runtime`, logged), and it takes no call of a size it answered
    differently at load (:meth:`agreeing_rows`); a call that raises is answered by the interpreter
    (the same error, if the inputs are what is wrong). One call at a time: the runtime keeps one
    planned arena, so a second concurrent caller runs the interpreter instead (``TracedModule``'s lock).
    Bit for bit what the interpreter answers, on every demo model: tests/hjmodel/test_trace.py."""

    def __init__(self, function, module, lifted: tuple[Tensor, ...]):
        self.function, self.module, self.lifted = function, module, lifted
        self.failed = 0      # calls the interpreter answered because the runtime raised (the first logged)

    def call(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The runtime's answer to ``inputs`` (what it raises is raised)."""
        return self.module(*inputs, *self.lifted)

    def run(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """A caller's call: the runtime's answer, or the interpreter's if the runtime raises."""
        try:
            return self.call(inputs)
        except Exception as exc:
            self.failed += 1
            if self.failed == 1:
                log.warning("trace: the static runtime failed a call, the interpreter answers it: %s: %s",
                            type(exc).__name__, str(exc)[:300])
            with torch.inference_mode(), torch.jit.optimized_execution(False):
                return self.function(*inputs)

    def rows_within(self, budget_s: float, rows: int, inputs: tuple[Tensor, ...], clock=None) -> int:
        """The most rows, of 1, 2, 4, ... up to ``rows`` (and ``rows`` itself), whose call took at
        most ``budget_s`` (the best of three, after one that plans the shape) on ``inputs``' rows
        repeated; 0 if one row's did not. Upwards, so that measuring holds Python's lock for about
        twice the budget at most (the first size over it). A model whose rows are costly (a memory
        head of tens of thousands of support points: ~6 ms a row at N = 5,000, d = 784) therefore
        never holds the lock long, and gains little there anyway (0.91-0.93x the interpreter's time
        at batch 1, 1.03-1.06x at 16 in a scratch run). Measured on a busy machine it only errs
        towards the interpreter. A size the runtime raises on ends the measurement (logged; it is no
        caller's call, so not counted in ``failed``). ``clock``: seconds (default ``time.perf_counter``)."""
        within, k = 0, 1
        while k <= rows:
            xs = _repeated(inputs, k)
            try:
                self.call(xs)
                took = _best_of(3, functools.partial(self.call, xs), clock)
            except Exception as exc:   # whatever it is, the runtime does not take this size
                _log_static_failure(k, exc)
                break
            if took > budget_s:
                break
            within, k = k, (rows if k < rows < 2 * k else 2 * k)
        return within

    def answers_as_interpreter(self, inputs: tuple[Tensor, ...]) -> bool:
        """Whether the runtime's answer to ``inputs`` is the interpreter's, bit for bit (what the
        runtime raises is raised)."""
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            want = self.function(*inputs)
        got = self.call(inputs)
        return len(got) == len(want) and all(map(_same_bits, got, want))

    def agreeing_rows(self, rows: int, inputs: tuple[Tensor, ...]) -> int:
        """The most rows k <= ``rows`` such that for every size 1, 2, ..., k the runtime answers
        ``inputs``' rows repeated to that size bit for bit as the interpreter does (checked once
        each, at load: the runtime plans per shape, so a shape it was never asked could differ);
        the first size that differs, or raises, is logged."""
        for k in range(1, rows + 1):
            try:
                same = self.answers_as_interpreter(_repeated(inputs, k))
            except Exception as exc:   # whatever it is, the runtime does not take this size
                _log_static_failure(k, exc)
                return k - 1
            if not same:
                log.warning("trace: the static runtime answered %d rows otherwise than the interpreter; "
                            "it takes calls of at most %d", k, k - 1)
                return k - 1
        return rows


def _log_static_failure(rows: int, exc: Exception) -> None:
    log.warning("trace: the static runtime failed on %d rows, it takes fewer: %s: %s", rows, type(exc).__name__,
                str(exc)[:300])


@contextlib.contextmanager
def static_call_budget(seconds: float) -> Iterator[None]:
    """:data:`STATIC_CALL_S` set to ``seconds`` while open: the :class:`TracedModule` recordings made
    inside measure the static runtime's rows against it (``math.inf``: every size up to their
    ``static_rows``, however busy the machine -- for a benchmark or an evaluation of the runtime
    itself). Where a call runs, never its bits; not for a server, whose other threads record too."""
    global STATIC_CALL_S
    kept, STATIC_CALL_S = STATIC_CALL_S, seconds
    try:
        yield
    finally:
        STATIC_CALL_S = kept


def _repeated(inputs: tuple[Tensor, ...], rows: int) -> tuple[Tensor, ...]:
    """``inputs`` with their rows repeated (or cut) to ``rows`` (a tensor whose first dimension is not
    the batch's is passed as it is)."""
    n = inputs[0].shape[0]
    pick = torch.arange(rows, device=inputs[0].device) % n
    return tuple(t[pick] if t.dim() and t.shape[0] == n else t for t in inputs)


def _best_of(times: int, call, clock=None) -> float:
    """The shortest of ``times`` timed calls of ``call``, in seconds of ``clock`` (default
    ``time.perf_counter``)."""
    import time

    clock = clock or time.perf_counter
    took = []
    for _ in range(times):
        start = clock()
        call()
        took.append(clock() - start)
    return min(took)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same values bit for bit (NaNs and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                torch.bfloat16: torch.int16}[a.dtype]
        a, b = a.contiguous().view(view), b.contiguous().view(view)
    return torch.equal(a, b)


def _static_runtime(function, inputs: tuple[Tensor, ...]) -> _StaticRuntime | None:
    """``function`` (a recorded graph, run by the interpreter) on the static runtime, or None (logged)
    when this torch cannot prepare it or its answer to ``inputs`` differs from the interpreter's in
    any bit (:class:`_StaticRuntime`)."""
    try:
        graph = function.graph.copy()
        torch._C._jit_pass_inline(graph)
        lifted = []
        for node in graph.findAllNodes("prim::Constant"):       # in the branches too
            if node.output().type().kind() == "TensorType":
                value = graph.addInput()
                value.setType(node.output().type())
                node.output().replaceAllUsesWith(value)
                lifted.append(node.t("value"))
                node.destroy()
        static = _StaticRuntime(function, torch._C._jit_to_static_module(graph), tuple(lifted))
        if not static.answers_as_interpreter(inputs):
            log.warning("trace: the static runtime answered otherwise than the interpreter; not used")
            return None
        return static
    except Exception as exc:   # a private runtime of TorchScript: the interpreter answers the same
        log.warning("trace: the static runtime cannot run this graph, not used: %s: %s", type(exc).__name__,
                    str(exc)[:300])
        return None


#: Held while a :class:`TracedModule` records. Recordings of the weights as constants on two threads
#: at once fail (seen: one recording's shape arithmetic failing inside another's, for modules sharing a
#: model: one thread puts back the flags another took off, and tables a model builds on first use
#: would be built inside one thread's recording and read by another's), and a server records on more
#: than one thread (models loading; modules of fewer outputs built on a thread of their own,
#: service.backends.base.OutputGraphs).
_RECORDING = threading.Lock()


@contextlib.contextmanager
def _weights_as_constants(module: nn.Module) -> Iterator[None]:
    """The module's parameters without ``requires_grad`` while it is traced (the tracer takes only
    such tensors as graph constants), as they were afterwards. Under :data:`_RECORDING`."""
    flagged = [p for p in module.parameters() if p.requires_grad]
    for p in flagged:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in flagged:
            p.requires_grad_(True)


#: Most bytes of tensor constants that :func:`_fold_constants` may add to a graph: a folded value
#: is held for the graph's life, where the unfolded graph computes it per call and lets it go.
FOLDED_BYTES = 64 << 20


def _constant_storages(graph) -> dict[int, int]:
    """The memory a graph's tensor constants hold: bytes by storage (a constant that is a view of
    another, or of a weight, holds nothing more)."""
    held = {}
    for node in graph.nodes():
        if node.kind() == "prim::Constant" and node.hasAttribute("value") and node.kindOf("value") == "t":
            storage = node.t("value").untyped_storage()
            held[storage.data_ptr()] = storage.nbytes()
    return held


def _fold_constants(function) -> tuple[object, int]:
    """(the traced ``function`` with the operations that read constants alone -- the weights and the
    tables built from them: casts, gathers of index tables, products of weights -- done once, now,
    the bytes of new constants that holds). As onnxruntime does for the exported graph when it
    opens a session: TorchScript's constant-propagation and dead-code passes, nothing else (its
    constant *pooling* merges float64 constants that are equal in float32; :class:`TracedModule` says
    why that must not run). Each folded value is what the same aten kernel computes when the graph
    runs, so the answers stay bit for bit; a served graph runs 100-340 fewer operations
    (``bench/results/ab_trace.md``). The traced function itself (0 bytes) when folding would add more
    than :data:`FOLDED_BYTES` of constants (a model with very many support points), or when this
    torch's passes fail (logged)."""
    try:
        graph = function.graph.copy()
        before = _constant_storages(graph)
        torch._C._jit_pass_constant_propagation(graph)
        torch._C._jit_pass_dce(graph)
        added = sum(size for ptr, size in _constant_storages(graph).items() if ptr not in before)
        if added > FOLDED_BYTES:
            log.info("trace: folding its constants would add %d MiB; left unfolded", added >> 20)
            return function, 0
        return torch._C._create_function_from_graph(function.name, graph), added
    except Exception as exc:   # a private pass of TorchScript: the unfolded trace answers the same
        log.warning("trace: constant folding failed, left unfolded: %s: %s", type(exc).__name__, str(exc)[:300])
        return function, 0


def traced_or_eager(module: ServingModule | ExplainModule, label: str = "",
                    static_rows: int | None = None) -> TracedModule | ServingModule | ExplainModule:
    """``module`` as its :class:`TracedModule` (the same answers, bit for bit, in about half the time
    at small batches; ``static_rows`` as there), or ``module`` itself, with a logged warning saying
    why, if tracing fails (a torch without TorchScript, an operation the tracer cannot record). How
    the torch backend and :class:`hjmodel.predictor.Predictor` run a model; ``label`` names it in the
    warning."""
    try:
        return TracedModule(module, static_rows=static_rows)
    except Exception as exc:  # the eager module still answers; say why it is slower
        log.warning("%s: running %s eagerly, tracing failed: %s: %s", label or "model", type(module).__name__,
                    type(exc).__name__, str(exc)[:300])
        return module


def _reads(node) -> list[str]:
    """The values a node reads: its inputs and, for a node with subgraphs (an If), every outer value
    those read (a subgraph names outer values without listing them as inputs: in its nodes' inputs,
    or as one of its outputs passed through)."""
    names = list(node.input)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in sub.node:
                names.extend(_reads(inner))
            names.extend(o.name for o in sub.output)
    return names


def prune_graph(graph: bytes, outputs: Iterable[str]) -> bytes:
    """A served ONNX graph (serialised ``model.onnx``) cut down to ``outputs``: the nodes those
    outputs need, the constants and initializers they read, every input kept (the feeds stay those
    of :func:`hjmodel.serving.onnx_feeds`). onnxruntime runs every node of a graph whichever outputs
    are fetched (its ``only_execute_path_to_fetches`` works in training builds only), so a server
    that wants fewer outputs, cheaper, opens a session of this graph: the nodes are the same, so
    are the values, bit for bit (tests/hjmodel/test_artifact.py). The certified radius is some 70%
    of a classifier's nodes, the OOD gate about a fifth (``bench/results/pruned_graphs.md``)."""
    import onnx

    proto = onnx.load_from_string(graph)
    g = proto.graph
    keep = set(outputs)
    missing = keep - {o.name for o in g.output}
    if missing:
        raise ArtifactError(f"the graph has no output(s) {sorted(missing)}")
    need, nodes = set(keep), []
    for node in reversed(g.node):            # topological order, read backwards: consumers first
        if any(o in need for o in node.output):
            nodes.append(node)
            need.update(_reads(node))
    kept_outputs = [o for o in g.output if o.name in keep]
    initializers = [t for t in g.initializer if t.name in need]
    value_info = [v for v in g.value_info if v.name in need]
    for field, values in ((g.node, nodes[::-1]), (g.output, kept_outputs), (g.initializer, initializers),
                          (g.value_info, value_info)):
        kept = list(values)
        del field[:]
        field.extend(kept)
    return proto.SerializeToString()


def _gathered_searches(model: HJModel) -> tuple[bool, ...]:
    """The searches of ``model``'s serving graph that run on gathered rows, in the order the graph
    computes them, and for each whether it goes inside an If on "anything gathered"
    (:func:`_skip_empty_searches`). A class-grouped classifier of more than two classes has two:

    - the tangent radius's root search over the class pairs that can decide the certificate
      (:func:`hjmodel.functional._pruned_tangent`). Wrapped only after a body: there the tangent
      radius, divided by the body's global Lipschitz constant, rarely beats the hybrid radius with
      its exact gradient (under one pair in a hundred rows of the demo deep model's data), while a
      head on the input searches one or more pairs of nearly every row, and an If that runs costs
      onnxruntime more than the few nodes it would skip. Measured both ways by ``bench/ab_graph.py
      --wraps`` (``bench/results/ab_graph_wraps.md``).
    - the IBP radius search over the rows where IBP may beat the closed form
      (:meth:`HJModel._interval_radius`): wrapped (most single rows gather nothing)."""
    if model.task != "classification" or model.head.groups is None:
        return ()
    # two classes: one rival, which is always searched, with no gathering (grouped_margin_radius)
    return (True,) if model.n_outputs == 2 else (bool(model.body), True)


def _gathered_search(nodes: list, start, reads, writes, scatter, exits: Iterable = ()) -> tuple[list, object] | None:
    """(the nodes of the gathered search that starts at ``start``, the scatter that ends it), or None:
    the one definition of a search both graph forms wrap (:func:`_skip_empty_searches` for ONNX,
    :func:`_skip_empty_traced_searches` for a TorchScript trace).

    ``nodes``: a graph's nodes in topological order; ``start``: the gathered indices (a NonZero's
    output); ``reads(node)`` / ``writes(node)``: the values a node reads (an If's branches' outer
    values included) / writes; ``scatter(node)``: (data, indices) for a node that writes values back
    by index, else None; ``exits``: the graph's outputs. A search is the nodes that depend on
    ``start`` and that the first scatter writing back with those indices into data that does not
    depend on them needs; None when there is no such scatter, or when a value of the search other
    than the scatter's result is read elsewhere (so moving it into a branch would change the graph)."""
    tainted, dependent = {start}, []
    for n in nodes:                      # topological order
        if any(i in tainted for i in reads(n)):
            dependent.append(n)
            tainted.update(writes(n))

    def writes_back(n) -> bool:
        pair = scatter(n)
        return pair is not None and pair[1] in tainted and pair[0] not in tainted

    sink = next((n for n in dependent if writes_back(n)), None)
    if sink is None:
        return None
    producer = {o: n for n in dependent for o in writes(n)}
    need, stack = set(), [sink]
    while stack:
        n = stack.pop()
        if id(n) in need:
            continue
        need.add(id(n))
        stack.extend(producer[i] for i in reads(n) if i in producer)
    search = [n for n in dependent if id(n) in need]
    produced = {o for n in search for o in writes(n)}
    escaping = {i for n in nodes if id(n) not in need for i in reads(n) if i in produced}
    escaping |= produced & set(exits)
    return (search, sink) if escaping == set(writes(sink)) else None


def _skip_empty_searches(proto, wrap: tuple[bool, ...]) -> int:
    """Put each gathered search of the serving graph marked in ``wrap`` (one flag per NonZero, in
    graph order: :func:`_gathered_searches`) inside an If, so that it runs only when it gathered
    something: traced, a search executes its hundreds of nodes on empty tensors when nothing was
    gathered. A graph with another number of NonZero nodes is left as it was.

    A search is the nodes between its NonZero (the gathered indices) and the first scatter that
    writes its results back with those indices into data that does not depend on them
    (:func:`_gathered_search`); they move into the then-branch of an If on "any index gathered", and
    the else-branch passes the scatter's data through (what writing nothing leaves). The tracing
    exporter cannot write an If itself. A NonZero whose dependants do not have that shape (a value of
    the search used elsewhere) is left as it was. Returns the number of searches wrapped
    (tests/hjmodel/test_interval_radius.py checks which Ifs each demo model's graph has)."""
    import onnx
    from onnx import TensorProto, helper

    g = proto.graph
    searches = [n.output[0] for n in g.node if n.op_type == "NonZero"]
    if len(searches) != len(wrap):
        return 0
    # the element type of every value, for the branches' outputs (the scatter's data type)
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    elem = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}

    def scatter(n):
        return (n.input[0], n.input[1]) if n.op_type in ("ScatterND", "ScatterElements") else None

    wrapped = 0
    for k, name in enumerate(searches):
        if not wrap[k]:
            continue
        nz = next((n for n in g.node if n.op_type == "NonZero" and n.output[0] == name), None)
        if nz is None:                       # moved into an earlier search's If: it runs only there
            continue
        found_search = _gathered_search(list(g.node), name, _reads, lambda n: list(n.output), scatter,
                                        exits=[o.name for o in g.output])
        if found_search is None:
            continue
        search, sink = found_search
        need = {id(n) for n in search}
        result, data = sink.output[0], sink.input[0]
        # "any index gathered" right after the NonZero; the If where the scatter was (every outer
        # value the search reads is produced before it)
        tag = f"skip_search_{k}"
        size, zero, cond, found, none = (f"{tag}_{s}" for s in ("size", "zero", "any", "found", "none"))
        gate = [helper.make_node("Size", [name], [size], name=size),
                helper.make_node("Constant", [], [zero], name=zero,
                                 value=helper.make_tensor(zero, TensorProto.INT64, [], [0])),
                helper.make_node("Greater", [size, zero], [cond], name=cond)]
        sink.output[0] = found
        dtype = elem.get(data) or TensorProto.DOUBLE
        then_g = helper.make_graph(search, "search", [], [helper.make_tensor_value_info(found, dtype, None)])
        else_g = helper.make_graph([helper.make_node("Identity", [data], [none], name=none)], "none", [],
                                   [helper.make_tensor_value_info(none, dtype, None)])
        if_node = helper.make_node("If", [cond], [result], then_branch=then_g, else_branch=else_g,
                                   name=f"skip_empty_search_{k}")
        order = []
        for n in g.node:
            if id(n) in need:
                if n is sink:
                    order.append(if_node)
                continue
            order.append(n)
            if n is nz:
                order.extend(gate)
        del g.node[:]
        g.node.extend(order)
        wrapped += 1
    return wrapped


#: The TorchScript operations a gathered search writes its results back with, and the position of
#: their indices (the data is the first input): ``scatter(self, dim, index, src)``,
#: ``index_put(self, indices, values, accumulate)``.
_TRACED_SCATTERS = {"aten::scatter": 2, "aten::index_put": 1}


def _traced_reads(node) -> list[int]:
    """The values (``Value.unique()``) a TorchScript node reads, its blocks' outer values included."""
    values = [v.unique() for v in node.inputs()]
    for block in node.blocks():
        for inner in block.nodes():
            values.extend(_traced_reads(inner))
        values.extend(v.unique() for v in block.outputs())
    return values


def _skip_empty_traced_searches(function, wrap: tuple[bool, ...]) -> tuple[object, int]:
    """(the traced ``function`` with each gathered search marked in ``wrap`` inside a ``prim::If`` on
    "any index gathered", the number wrapped): what :func:`_skip_empty_searches` does for the ONNX
    graph, so the trace, too, skips a search that gathered nothing instead of running its hundreds of
    operations on empty tensors (the IBP search of a single row, mostly: ~30% of a classifier's
    operations at batch 1). The same searches (:func:`_gathered_search`, ``wrap`` from
    :func:`_gathered_searches`); the else-branch passes the scatter's data through, which is what
    writing back nothing leaves, so the answers stay bit for bit (tests/hjmodel/test_trace.py). A
    graph that writes anything in place (the served ones write nothing so), or has another number of
    ``nonzero`` operations, is left as it was; ``function`` itself (0) when nothing is wrapped or this
    torch's graph API fails (logged)."""
    try:
        graph = function.graph.copy()
        starts = [n for n in graph.nodes() if n.kind() == "aten::nonzero"]
        # "!": an operation that writes an input in place; with one anywhere, the else-branch's
        # result (the scatter's data itself, not a copy) could be written through
        if len(starts) != len(wrap) or any("!" in n.schema() for n in graph.nodes()):
            return function, 0

        def scatter(n):
            at = _TRACED_SCATTERS.get(n.kind())
            return None if at is None else (n.inputsAt(0).unique(), n.inputsAt(at).unique())

        wrapped = 0
        for k, start in enumerate(starts):
            if not wrap[k] or start.owningBlock().owningNode() is not None:   # in an earlier search's branch
                continue
            nodes = [*graph.nodes(), graph.return_node()]      # the return node reads the graph's outputs
            found = _gathered_search(nodes, start.output().unique(), _traced_reads,
                                     lambda n: [v.unique() for v in n.outputs()], scatter)
            if found is None:
                continue
            search, sink = found
            result, data = sink.output(), sink.inputsAt(0)
            graph.setInsertPoint(sink)
            size = graph.insertNode(graph.create("aten::numel", [start.output()], 1))
            size.output().setType(torch._C.IntType.get())
            gathered = graph.insertNode(graph.create("aten::gt", [size.output(), graph.insertConstant(0)], 1))
            gathered.output().setType(torch._C.BoolType.get())
            branch = graph.insertNode(graph.create("prim::If", [gathered.output()], 1))
            branch.output().setType(result.type())
            then_block, else_block = branch.addBlock(), branch.addBlock()
            result.replaceAllUsesWith(branch.output())
            for node in search:                                 # in order: each after what it reads
                node.moveBefore(then_block.returnNode())
            then_block.registerOutput(result)
            else_block.registerOutput(data)
            wrapped += 1
        if not wrapped:
            return function, 0
        graph.lint()
        return torch._C._create_function_from_graph(function.name, graph), wrapped
    except Exception as exc:   # TorchScript's graph API: the unwrapped trace answers the same
        log.warning("trace: wrapping its searches failed, left as recorded: %s: %s", type(exc).__name__,
                    str(exc)[:300])
        return function, 0


@contextlib.contextmanager
def _exact_constants() -> Iterator[None]:
    """Turn off TorchScript's common-subexpression elimination while exporting: it merges float64
    scalar constants that are equal in float32 (torch 2.13: ``x * (1 + 2**-40)`` followed by ``1.0 + y``
    exports both constants as 1 + 2**-40), which would silently change rounding allowances and
    directed-rounding factors of the certificates, and exact values such as the p-values' 1 + count.
    onnxruntime eliminates common subexpressions itself when it loads the graph, comparing constants
    exactly. Test: tests/hjmodel/test_artifact.py."""
    cse = torch._C._jit_pass_cse
    torch._C._jit_pass_cse = lambda graph: False
    try:
        yield
    finally:
        torch._C._jit_pass_cse = cse


def _export(module: nn.Module, inputs: dict[str, Tensor], path: Path, spec: dict, opset: int,
            wrap: tuple[bool, ...] = ()) -> Path:
    """Trace ``module`` (batched inputs ``inputs``, outputs ``module.specs``) to ONNX with the spec
    embedded as metadata; ``wrap``: its gathered searches (:func:`_skip_empty_searches`)."""
    import warnings

    import onnx

    names = [o.name for o in module.specs]
    # one eager call first: the model's lazily built weight-only tables (the OOD reference's class
    # groups and affine tables) then enter the trace as constants, not as the nodes that build them
    # (a model fresh from load_model otherwise exported ~550 more nodes, NonZero among them, and
    # lost the If around the IBP search: 1.8x slower at batch 1)
    with torch.no_grad():
        module(*inputs.values())
    with warnings.catch_warnings(), _exact_constants():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TupleOutputs(module).eval(), tuple(inputs.values()), str(path),
                          input_names=list(inputs), output_names=names,
                          dynamic_axes={**{n: {0: "batch"} for n in inputs}, **{n: {0: "batch"} for n in names}},
                          opset_version=opset, dynamo=False)
    proto = onnx.load(str(path))
    _skip_empty_searches(proto, wrap)
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_SPEC_KEY, json.dumps(spec, sort_keys=True)
    proto.producer_name = "hjmodel"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def export_onnx(model: HJModel, path: str | Path, opset: int = 17) -> Path:
    """Export the serving graph (every served diagnostic as a named output) to ONNX with the spec
    embedded, and beside it the explanation graph (``explain.onnx``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = model_spec(model)
    serving = ServingModule(model)
    _export(serving, example_inputs(serving), path, spec, opset, _gathered_searches(model))
    explain = ExplainModule(model)
    if explain.specs:
        _export(explain, example_inputs(explain), path.parent / EXPLAIN_FILE, spec, opset)
    return path


def save_artifact(model: HJModel, directory: str | Path, formats: tuple[str, ...] = ("onnx", "torch")) -> Path:
    """Write the model in the requested formats into a version directory, and last its checksum
    manifest (:func:`write_checksums`). ``formats``: one or both of ``"onnx"`` and ``"torch"``.

    A directory that holds an artifact already is written over: its manifest and every artifact
    file are removed first, so it ends with this model's files only. (A ``model.pt`` left by an
    earlier export beside a new ONNX-only one was vouched for by the new manifest and served by
    the torch backend under the new model's name.) Other files in it are left alone."""
    unknown = [f for f in formats if f not in ("onnx", "torch")]
    if unknown or not formats:   # an artifact of no model file would be its manifest alone
        raise ValueError(f"formats must name one or both of 'onnx' and 'torch', got {list(formats)!r}")
    if isinstance(directory, str) and not directory.strip():   # pathlib would read it as "."
        raise ValueError("an empty directory name (it would mean the working directory): give a path")
    directory = Path(directory)
    _check_spec(model_spec(model), str(directory))   # never write what the loader would refuse
    directory.mkdir(parents=True, exist_ok=True)
    # the manifest first (a stale one would describe other files), then every artifact file: what
    # this call does not write must not stay behind under the new manifest
    for name in (CHECKSUM_FILE, *_CHECKED_FILES):
        (directory / name).unlink(missing_ok=True)
    if "torch" in formats:
        save_torch(model, directory)
    if "onnx" in formats:
        export_onnx(model, directory / ONNX_FILE)
    write_checksums(directory)
    return directory


# ------------------------------------------------------------------------------------ checksums

#: The files a checksum manifest covers (every file an artifact is read from).
_CHECKED_FILES = (EXPLAIN_FILE, SPEC_FILE, ONNX_FILE, TORCH_FILE)
_MANIFEST_LINE = re.compile(r"([0-9a-f]{64}) [ *](\S+)")
_MANIFEST_MAX_BYTES = 64 * 1024


def file_sha256(path: Path) -> str:
    """A file's SHA-256 (hex), read in blocks (a graph may be GiBs: it is never held in memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str | Path) -> Path:
    """Write ``SHA256SUMS`` over the artifact files ``directory`` holds (``sha256sum``'s format)."""
    directory = Path(directory)
    lines = [f"{file_sha256(directory / name)}  {name}\n" for name in _CHECKED_FILES if (directory / name).is_file()]
    partial = directory / (CHECKSUM_FILE + ".partial")
    partial.write_text("".join(lines))
    partial.replace(directory / CHECKSUM_FILE)
    return directory / CHECKSUM_FILE


def verify_checksums(directory: str | Path) -> bool:
    """Check an artifact's files against its ``SHA256SUMS``: True when every one matches, False
    when the artifact has no manifest (written before manifests: nothing to check). Raises
    :class:`ArtifactError` for a malformed manifest, a listed file that is missing or differs, and
    an artifact file the manifest does not list (a file changed, truncated, bit-flipped or swapped
    in since it was written: a graph that still parses would serve other numbers, and other
    certificates, under this artifact's name)."""
    directory = Path(directory)
    listed = _manifest(directory)
    if listed is None:
        return False
    where = f"{directory}/{CHECKSUM_FILE}"
    unlisted = [name for name in _CHECKED_FILES if name not in listed and (directory / name).is_file()]
    if unlisted:
        raise ArtifactError(f"{where}: does not list {unlisted}, which the artifact holds")
    for name, want in listed.items():
        if not (directory / name).is_file():
            raise ArtifactError(f"{where}: lists {name}, which is missing")
        if file_sha256(directory / name) != want:
            raise ArtifactError(f"{directory}/{name}: its SHA-256 is not the one {CHECKSUM_FILE} records "
                                "(changed since the artifact was written)")
    return True


def recorded_sha256(directory: str | Path, name: str) -> str | None:
    """The SHA-256 the artifact's manifest records for file ``name`` (None without a manifest or an
    entry): after :func:`verify_checksums`, the digest of the file as it was loaded, without hashing
    it again."""
    listed = _manifest(Path(directory))
    return None if listed is None else listed.get(name)


def _manifest(directory: Path) -> dict[str, str] | None:
    """{file: hex digest} of ``directory``'s ``SHA256SUMS`` (None when it has none); raises
    :class:`ArtifactError` when it is malformed."""
    manifest = directory / CHECKSUM_FILE
    if not manifest.is_file():
        return None
    where = f"{directory}/{CHECKSUM_FILE}"
    with manifest.open("rb") as f:
        raw = f.read(_MANIFEST_MAX_BYTES + 1)
    if len(raw) > _MANIFEST_MAX_BYTES:
        raise ArtifactError(f"{where}: larger than {_MANIFEST_MAX_BYTES} bytes")
    listed: dict[str, str] = {}
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.fullmatch(line.strip())
        if match is None or match[2] not in _CHECKED_FILES or match[2] in listed:
            raise ArtifactError(f"{where}: line {number} is not '<sha256>  <artifact file>' "
                                f"(one of {list(_CHECKED_FILES)}, once)")
        listed[match[2]] = match[1]
    return listed


def read_spec(path: str | Path) -> dict:
    """The spec of an artifact: a version directory, ``model.json``, ``model.pt`` or ``model.onnx``."""
    path = Path(path)
    if path.is_dir():
        if (path / SPEC_FILE).exists():
            path = path / SPEC_FILE
        elif (path / ONNX_FILE).exists():
            path = path / ONNX_FILE
        else:
            raise ArtifactError(f"{path}: no {SPEC_FILE} or {ONNX_FILE}")
    if path.suffix == ".pt":
        path = path.with_name(SPEC_FILE)
    if path.suffix == ".onnx":
        return _check_spec(_onnx_spec(path), str(path))
    try:
        return _check_spec(json.loads(path.read_text()), str(path))
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: no such file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e


def read_artifact_spec(path: str | Path) -> ArtifactSpec:
    """:func:`read_spec`, typed: what a server reads about an artifact."""
    return ArtifactSpec.from_dict(read_spec(path), str(path))


def _onnx_spec(path: Path) -> dict:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: no such file") from e
    except Exception as e:  # protobuf DecodeError and friends
        raise ArtifactError(f"{path}: not a valid ONNX model ({type(e).__name__})") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    if ONNX_SPEC_KEY not in meta:
        raise ArtifactError(f"{path}: ONNX model carries no {ONNX_SPEC_KEY!r} metadata (not an hjmodel artifact)")
    try:
        return json.loads(meta[ONNX_SPEC_KEY])
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: {ONNX_SPEC_KEY} metadata is not valid JSON") from e


def load_model(path: str | Path, *, verify: bool = True) -> HJModel:
    """Load an :class:`HJModel` from a version directory (or its ``model.pt`` / ``model.json``),
    its files checked against the artifact's checksum manifest first (:func:`verify_checksums`;
    ``verify=False`` for a caller that just did)."""
    path = Path(path)
    if not path.is_dir():
        path = path.parent
    if not (path / TORCH_FILE).exists():
        raise ArtifactError(f"{path}: no {TORCH_FILE} (torch artifact) here")
    if verify:
        verify_checksums(path)
    return _load_torch(path)


def load_serving_module(path: str | Path, *, verify: bool = True) -> ServingModule:
    """The torch serving module of a version directory: same outputs as its ONNX graph."""
    return ServingModule(load_model(path, verify=verify))
