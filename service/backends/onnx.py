"""onnxruntime backend (imported lazily): CUDA execution provider when allowed and present."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Collection
from pathlib import Path

import numpy as np

from hjmodel import serving
from hjmodel.artifact import file_sha256, recorded_sha256
from service.backends.base import PRUNED_GRAPH_BYTES, OutputGraphs
from service.errors import BackendError, ModelLoadFailed

__all__ = ["OnnxBackend", "load_onnx"]

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"

log = logging.getLogger(__name__)


class OnnxBackend:
    """An ``onnxruntime.InferenceSession`` over ``model.onnx``; ``pruned``: sessions of the graph cut
    down to the outputs a batch needs (:class:`OutputGraphs` of :func:`hjmodel.artifact.prune_graph`)."""

    name = "onnx"
    platform = "onnxruntime_onnx"
    execution = "onnxruntime"

    def __init__(self, session, device: str, explain_session=None):
        self._session = session
        self._explain = explain_session
        self.device = device
        self._output_names = [o.name for o in session.get_outputs()]
        self.pruned: OutputGraphs | None = None   # load_onnx's, with pruned_graphs > 0
        # a graph exported before tau had a batch dimension takes one tau per run
        self._tau_per_run = any(i.name == "tau" and len(i.shape) == 1 for i in session.get_inputs())
        self.explain_outputs = tuple(o.name for o in explain_session.get_outputs()) if explain_session else ()
        self.embedded_specs = {serving.ONNX_FILE: _embedded_spec(session)}
        if explain_session is not None:
            self.embedded_specs[serving.EXPLAIN_FILE] = _embedded_spec(explain_session)

    def infer(self, input: np.ndarray, tau: np.ndarray, outputs: Collection[str] | None = None, *,
              beside: bool = False) -> dict[str, np.ndarray]:
        # ``beside``: nothing to change, a session's run lets go of Python's lock
        tau = np.asarray(tau, dtype=np.float64).reshape(-1)
        pruned = self.pruned.get(outputs) if self.pruned is not None else None
        session, names = pruned if pruned is not None else (self._session, self._output_names)
        if self._tau_per_run and len(np.unique(tau)) > 1:   # legacy graph: one run per tau value
            parts = [(tau == value, self._run(session, names, input[tau == value], tau[tau == value]))
                     for value in np.unique(tau)]
            out = {name: np.empty((len(input), *v.shape[1:]), dtype=v.dtype) for name, v in parts[0][1].items()}
            for mask, values in parts:
                for name, v in values.items():
                    out[name][mask] = v
            return out
        return self._run(session, names, input, tau)

    @staticmethod
    def _run(session, names: list[str] | tuple[str, ...], input: np.ndarray, tau: np.ndarray) -> dict[str, np.ndarray]:
        try:
            values = session.run(names, serving.onnx_feeds(session, input, tau))
        except Exception as exc:  # onnxruntime raises its own pybind11 exception types
            raise BackendError(f"onnxruntime failed: {exc}") from None
        return dict(zip(names, values, strict=True))

    def explain(self, input: np.ndarray, tau: np.ndarray, baseline: np.ndarray) -> dict[str, np.ndarray]:
        if self._explain is None:
            raise BackendError("this artifact has no explanation graph")
        try:
            values = self._explain.run(list(self.explain_outputs), serving.onnx_feeds(self._explain, input, tau, baseline))
        except Exception as exc:  # onnxruntime raises its own pybind11 exception types
            raise BackendError(f"onnxruntime failed on the explanation graph: {exc}") from None
        return dict(zip(self.explain_outputs, values, strict=True))

    def close(self) -> None:
        if self.pruned is not None:
            self.pruned.close()
        self._session = self._explain = None


def load_onnx(version_dir: Path, *, device: str = "auto", threads: int = 0, spinning: bool = False,
              pruned_graphs: int = 0, pruned_graph_bytes: int = PRUNED_GRAPH_BYTES,
              static_rows: int = 0) -> OnnxBackend:
    """Open ``version_dir/model.onnx`` on ``device`` (auto|cpu|cuda), ``threads`` intra-op threads
    (spinning between operators only if ``spinning``: :func:`hjmodel.serving.session_options`), with
    up to ``pruned_graphs`` sessions of the graph cut down to fewer outputs (their graphs
    ``pruned_graph_bytes`` together), opened when a batch first needs them."""
    path = Path(version_dir) / serving.ONNX_FILE
    if not path.is_file():
        raise ModelLoadFailed(f"{path} does not exist")
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise ModelLoadFailed(f"onnxruntime is not installed: {exc}") from None
    available = ort.get_available_providers()
    if device == "cuda" and _CUDA not in available:
        raise ModelLoadFailed("device 'cuda' requested but onnxruntime has no CUDAExecutionProvider")
    providers = [_CUDA, _CPU] if device in ("auto", "cuda") and _CUDA in available else [_CPU]
    # every session of this version (serving, explanation, pruned graphs) opens with the same options;
    # the backend's thread flushes subnormals too (service.batching)
    open_graph = functools.partial(serving.open_session, threads=threads, spinning=spinning, providers=providers,
                                   flush_subnormals=True)
    try:
        # a pruned graph is cut from the file when it is needed (the graph is not kept in memory),
        # and only from the bytes loaded here (a file replaced since: none is cut); the manifest's
        # digest, which the repository checked the file against just before, spares a second hash
        digest = (recorded_sha256(path.parent, serving.ONNX_FILE) or file_sha256(path)) if pruned_graphs else ""
        session = open_graph(path)
        explain_path = path.parent / serving.EXPLAIN_FILE
        explain = open_graph(explain_path) if explain_path.is_file() else None
    except Exception as exc:  # corrupt or invalid graph
        raise ModelLoadFailed(f"onnxruntime cannot load {path.name} / {serving.EXPLAIN_FILE}: {exc}") from None
    used = session.get_providers()
    if _CUDA in providers and _CUDA not in used:
        # an onnxruntime-gpu build lists its CUDA provider even where the CUDA libraries it was built
        # for cannot load (docs/GPU.md); onnxruntime then opens the session on the CPU
        if device == "cuda":
            raise ModelLoadFailed("device 'cuda' requested but the CUDA execution provider failed to start "
                                  "(are the CUDA and cuDNN libraries onnxruntime-gpu was built for on the "
                                  "library path? docs/GPU.md)")
        log.warning("%s: onnxruntime lists the CUDA execution provider but it did not start (the CUDA and "
                    "cuDNN libraries onnxruntime-gpu was built for are not on the library path?): serving "
                    "on the CPU", path.parent)

    def prune(outputs: tuple[str, ...]):
        from hjmodel.artifact import prune_graph

        graph = path.read_bytes()
        if hashlib.sha256(graph).hexdigest() != digest:
            raise ModelLoadFailed(f"{path.name} changed since it was loaded")
        cut = prune_graph(graph, outputs)
        return len(cut), lambda: open_graph(cut)

    backend = OnnxBackend(session, "cuda" if _CUDA in used else "cpu", explain)
    if pruned_graphs:
        backend.pruned = OutputGraphs(backend._output_names, prune, pruned_graphs, pruned_graph_bytes,
                                      f"{path.parent.parent.name}-{path.parent.name}")
    return backend


def _embedded_spec(session) -> str | None:
    """The JSON text of the spec a graph was exported with (its metadata), or None."""
    return session.get_modelmeta().custom_metadata_map.get(serving.ONNX_SPEC_KEY)


