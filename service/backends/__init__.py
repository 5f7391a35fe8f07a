"""Backends behind one small protocol, chosen by name; each imports its library lazily."""

from __future__ import annotations

from pathlib import Path

from hjmodel import serving
from service.backends.base import PRUNED_GRAPH_BYTES, Backend, BackendFactory
from service.errors import ModelLoadFailed

__all__ = ["BACKENDS", "Backend", "BackendFactory", "choose_backend", "load_backend"]


def _onnx(version_dir: Path, **settings) -> Backend:
    from service.backends.onnx import load_onnx

    return load_onnx(version_dir, **settings)


def _torch(version_dir: Path, **settings) -> Backend:
    from service.backends.torch import load_torch

    return load_torch(version_dir, **settings)


#: Backend name -> loader.
BACKENDS: dict[str, BackendFactory] = {"onnx": _onnx, "torch": _torch}


def choose_backend(version_dir: Path, preference: str) -> str:
    """Backend for a version directory: the preference, or under ``auto`` ONNX when present."""
    version_dir = Path(version_dir)
    if preference in BACKENDS:
        return preference
    if preference != "auto":
        raise ModelLoadFailed(f"unknown backend {preference!r}")
    if (version_dir / serving.ONNX_FILE).is_file():
        return "onnx"
    if (version_dir / serving.TORCH_FILE).is_file():
        return "torch"
    raise ModelLoadFailed(f"{version_dir} holds neither {serving.ONNX_FILE} nor {serving.TORCH_FILE}")


def load_backend(version_dir: Path, *, preference: str = "auto", device: str = "auto",
                 threads: int = 0, spinning: bool = False, pruned_graphs: int = 0,
                 pruned_graph_bytes: int = PRUNED_GRAPH_BYTES, static_rows: int = 0) -> Backend:
    """Load ``version_dir`` with the chosen backend; raises ModelLoadFailed. ``pruned_graphs``: the
    most graphs cut down to fewer outputs it may build, holding at most ``pruned_graph_bytes``
    together (:class:`~service.backends.base.OutputGraphs`); ``static_rows``: the torch backend's
    (:func:`~service.backends.torch.load_torch`)."""
    return BACKENDS[choose_backend(version_dir, preference)](version_dir, device=device, threads=threads,
                                                             spinning=spinning, pruned_graphs=pruned_graphs,
                                                             pruned_graph_bytes=pruned_graph_bytes,
                                                             static_rows=static_rows)
