"""The backend protocol: load an artifact once, run ``infer`` on batches of rows."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Backend", "BackendFactory"]


@runtime_checkable
class Backend(Protocol):
    """A loaded model version.

    ``infer(input: float32 (B, d), tau: float64 (B,)) -> {output name: array with leading dim B}``
    computes every output of the serving contract (``tau``: each row's regression tolerance) (``hjmodel.serving.outputs_for(task)``). Implementations are
    thread-safe for one caller at a time and raise only :class:`service.errors.BackendError`.
    """

    name: str
    device: str
    platform: str
    #: How its graphs run, for operators (the model config's ``execution`` parameter): ``onnxruntime``;
    #: ``torchscript`` (the torch backend's traces) or ``torch eager`` (tracing failed: logged at load).
    execution: str
    #: The explanation outputs this version can compute (``hjmodel.serving.EXPLAIN_OUTPUTS``; empty for
    #: artifacts without an explanation graph).
    explain_outputs: tuple[str, ...]

    def infer(self, input: np.ndarray, tau: np.ndarray) -> dict[str, np.ndarray]: ...

    def explain(self, input: np.ndarray, tau: np.ndarray, baseline: np.ndarray) -> dict[str, np.ndarray]:
        """The explanation outputs for ``input`` (B, d), ``tau`` (B,), ``baseline`` (B, d) float32."""
        ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    """Loads a version directory; raises :class:`service.errors.ModelLoadFailed` on any failure."""

    def __call__(self, version_dir: Path, *, device: str, threads: int) -> Backend: ...
