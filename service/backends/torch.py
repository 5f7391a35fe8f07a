"""torch backend: ``hjmodel.artifact.load_serving_module`` on CUDA when allowed and available, run as
its TorchScript trace (:class:`hjmodel.artifact.TracedModule`; eager torch when tracing fails)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

from hjmodel import serving
from hjmodel.errors import InputError
from service.backends.base import PRUNED_GRAPH_BYTES, OutputGraphs
from service.errors import BackendError, InvalidValue, ModelLoadFailed

__all__ = ["TorchBackend", "load_torch"]


class TorchBackend:
    """The serving ``nn.Module`` of a ``model.pt`` + ``model.json`` artifact, as its trace;
    ``pruned``: traces of the module cut down to the outputs a batch needs (:class:`OutputGraphs`)."""

    name = "torch"
    platform = "pytorch_torch"
    embedded_specs: dict[str, str | None] = {}   # the module is built from model.json itself

    def __init__(self, module, device: str, explain_module=None, pruned: OutputGraphs | None = None):
        import torch

        self._module = module
        self._explain = explain_module
        self.device = device
        self.pruned = pruned

        def runs(m) -> str:   # a TracedModule, or the nn.Module itself when tracing failed
            return "torch eager" if isinstance(m, torch.nn.Module) else "torchscript"

        self.execution = runs(module)
        if explain_module is not None and runs(explain_module) != self.execution:
            self.execution += f" (explanations: {runs(explain_module)})"
        self.explain_outputs = tuple(o.name for o in explain_module.specs) if explain_module is not None else ()

    @property
    def static_rows(self) -> int:
        """Serving calls (of every output) of at most this many rows run on TorchScript's static
        runtime; 0: none do (eager torch, a GPU, or the runtime not used)."""
        return getattr(self._module, "static_rows", 0)

    @property
    def static_failed(self) -> int:
        """Calls the static runtime raised on, which the interpreter answered."""
        return getattr(self._module, "static_failed", 0)

    def infer(self, input: np.ndarray, tau: np.ndarray, outputs: Collection[str] | None = None, *,
              beside: bool = False) -> dict[str, np.ndarray]:
        import torch

        pruned = self.pruned.get(outputs) if self.pruned is not None else None
        module = pruned[0] if pruned is not None else self._module
        if beside and hasattr(module, "interpret"):
            # an explanation graph runs meanwhile: the interpreter lets go of Python's lock, the static
            # runtime would hold it and the explanation's thread would wait for the whole call
            module = module.interpret
        try:
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32)).to(self.device)
                t = torch.as_tensor(np.asarray(tau, dtype=np.float64).reshape(-1, 1), device=self.device)
                out = module(x, t)
            return {name: value.detach().cpu().numpy() for name, value in out.items()}
        except Exception as exc:
            if isinstance(exc, InputError):  # hjmodel's own input validation, translated at this boundary
                raise InvalidValue(f"the model rejected the input: {exc}") from None
            raise BackendError(f"torch failed: {exc}") from None

    def explain(self, input: np.ndarray, tau: np.ndarray, baseline: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        if self._explain is None:
            raise BackendError("this artifact has no explanation outputs")
        try:
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32)).to(self.device)
                t = torch.as_tensor(np.asarray(tau, dtype=np.float64).reshape(-1, 1), device=self.device)
                base = torch.as_tensor(np.ascontiguousarray(baseline, dtype=np.float32), device=self.device)
                out = self._explain(x, t, base)
            return {name: value.detach().cpu().numpy() for name, value in out.items()}
        except Exception as exc:
            raise BackendError(f"torch failed on the explanation: {exc}") from None

    def close(self) -> None:
        if self.pruned is not None:
            self.pruned.close()
        self._module = self._explain = None


def load_torch(version_dir: Path, *, device: str = "auto", threads: int = 0, spinning: bool = False,
               pruned_graphs: int = 0, pruned_graph_bytes: int = PRUNED_GRAPH_BYTES,
               static_rows: int = 0) -> TorchBackend:
    """Rebuild the serving module of ``version_dir`` on ``device`` (auto|cpu|cuda), with up to
    ``pruned_graphs`` traces of it cut down to fewer outputs, recorded when a batch first needs them;
    serving calls of at most ``static_rows`` rows run on TorchScript's static runtime
    (:class:`hjmodel.artifact.TracedModule`; on a CPU only).
    ``spinning`` is onnxruntime's and not used here: torch's intra-op threads are OpenMP's, whose
    wait is set for the whole process by ``OMP_WAIT_POLICY`` before it starts."""
    version_dir = Path(version_dir)
    if not (version_dir / serving.TORCH_FILE).is_file():
        raise ModelLoadFailed(f"{version_dir / serving.TORCH_FILE} does not exist")
    import torch

    try:
        from hjmodel.artifact import ArtifactError, load_serving_module
    except ImportError as exc:
        raise ModelLoadFailed(f"hjmodel.artifact is not available: {exc}") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadFailed("device 'cuda' requested but torch has no CUDA device")
    target = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        from hjmodel.artifact import ExplainModule, ServingModule, traced_or_eager

        module = load_serving_module(version_dir, verify=False)   # the repository checked its files
        module = module.to(target).eval()
        model, label = module.model, f"{version_dir.parent.name}-{version_dir.name}"
        names = [o.name for o in module.specs]
        # a trace holds the module's own tensors (no copy) and the values it folded at load: only
        # those take the byte budget
        pruned = (OutputGraphs(names, lambda outputs: _with_bytes(traced_or_eager(ServingModule(model, outputs), label,
                                                                                  static_rows)),
                               pruned_graphs, pruned_graph_bytes, label) if pruned_graphs else None)
        explain = ExplainModule(module.model).to(target).eval()
        explain = explain if explain.specs else None
        module = traced_or_eager(module, str(version_dir), static_rows)
        explain = explain and traced_or_eager(explain, str(version_dir))
    except ArtifactError as exc:
        raise ModelLoadFailed(f"invalid torch artifact: {exc}") from None
    except Exception as exc:
        raise ModelLoadFailed(f"cannot load torch artifact: {type(exc).__name__}: {exc}") from None
    return TorchBackend(module, target, explain, pruned)


def _with_bytes(module) -> tuple[int, Callable[[], object]]:
    """(the bytes a graph of fewer outputs holds beyond the model's tensors -- a trace's folded
    constants, nothing for the eager module --, the graph) as :class:`OutputGraphs` builds take them."""
    return getattr(module, "folded_bytes", 0), lambda: module
