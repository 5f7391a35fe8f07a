"""hjmodel: LSE networks (log-sum-exp activated) with their Hamilton-Jacobi diagnostics.

The math lives in :mod:`hjmodel.functional`; the model kinds in :mod:`hjmodel.models` (public modules for
your own training loop in :mod:`hjmodel.nn`, exported by :func:`hjmodel.export`); training and
calibration in :mod:`hjmodel.train`; artifacts (ONNX / torch) in :mod:`hjmodel.artifact`; the
serving contract in :mod:`hjmodel.serving`. No web framework is imported here.
"""

from __future__ import annotations

from . import nn
from .artifact import (
    export_onnx,
    load_model,
    load_serving_module,
    read_artifact_spec,
    read_spec,
    save_artifact,
)
from .byom import export
from .data import load_dataset
from .errors import ArtifactError, ConfigError, DataError, HJModelError, InputError
from .models import Evaluation, HJModel
from .serving import ArtifactSpec
from .train import TrainConfig, train

__all__ = [
    "ArtifactError",
    "ArtifactSpec",
    "ConfigError",
    "DataError",
    "Evaluation",
    "HJModel",
    "HJModelError",
    "InputError",
    "TrainConfig",
    "export",
    "export_onnx",
    "load_dataset",
    "load_model",
    "load_serving_module",
    "nn",
    "read_artifact_spec",
    "read_spec",
    "save_artifact",
    "train",
]

__version__ = "0.1.0"
