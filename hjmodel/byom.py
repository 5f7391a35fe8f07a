"""Bring your own LSE network: a module trained in your own code (:mod:`hjmodel.nn`), or plain
tensors, -> a calibrated serving artifact (ONNX + torch, every diagnostic in the graph).

Export fits what only data can give -- the OOD reference measure and the conformal calibration of
the OOD gate -- on data you pass, and writes the same artifact ``hjmodel train`` writes. The
network's numbers are not changed: the artifact's graph computes the module's own pre-activations.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from .artifact import save_artifact
from .data import check_rows
from .errors import CalibrationError
from .models import HJModel, OODReference
from .nn import from_state_dict
from .serving import KINDS, TASKS
from .train import TrainConfig, calibrate, evaluate_metrics

__all__ = ["export", "to_hjmodel"]


def to_hjmodel(network, *, task: str | None = None, class_names=None, feature_names=None) -> HJModel:
    """An :class:`HJModel` (uncalibrated) made of a copy of ``network``'s parts: a module of
    :mod:`hjmodel.nn` (or anything with ``preprocess``, ``body``, ``head``, ``kind``, ``task``) or a
    state dict for :func:`hjmodel.nn.from_state_dict`."""
    if isinstance(network, dict):
        network = from_state_dict(network, task)
    for part in ("preprocess", "body", "head", "kind", "task"):
        if not hasattr(network, part):
            raise TypeError(f"{type(network).__name__} has no {part!r}: build it from hjmodel.nn or pass a state dict")
    kind, task = network.kind, task or network.task
    if kind not in KINDS or task not in TASKS:
        raise ValueError(f"unknown kind/task {kind!r}/{task!r}")
    parts = copy.deepcopy(network).cpu().to(torch.float64)
    K = parts.head.n_outputs
    if task == "classification":
        names = [str(c) for c in (class_names if class_names is not None else range(K))]
        if len(names) != K:
            raise ValueError(f"{len(names)} class names for {K} outputs")
    else:
        names = []
    d = parts.preprocess.mu.shape[0]
    features = [str(f) for f in feature_names] if feature_names is not None else [f"x{i}" for i in range(d)]
    if len(features) != d:
        raise ValueError(f"{len(features)} feature names for {d} features")
    for what, listed in (("class", names), ("feature", features)):
        twice = [n for i, n in enumerate(listed) if n in listed[:i]]
        if twice:
            raise ValueError(f"{what} names must differ: {twice[0]!r} twice")
    p = parts.head.W.shape[1]
    placeholder = OODReference(points=torch.zeros(1, p, dtype=torch.float64), t=1.0, eps=1.0)
    model = HJModel(kind, task, parts.preprocess, list(parts.body), parts.head, placeholder,
                    {"class_names": names, "feature_names": features})
    model.requires_grad_(False)
    return model


#: How many more of the calibration rows may repeat a reference row than reference rows repeat one
#: another (the rate at which the data repeats rows of its own accord) before export refuses them
OVERLAP_ALLOWANCE = 0.05


def _repeats(rows: np.ndarray, among: np.ndarray | None = None) -> float:
    """The share of ``rows`` equal to a row of ``among`` (None: to another row of ``rows``)."""
    if among is None:
        _, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
        return float((counts[inverse.reshape(-1)] > 1).mean())
    seen = {row.tobytes() for row in np.ascontiguousarray(among)}
    return float(np.mean([row.tobytes() in seen for row in np.ascontiguousarray(rows)]))


def _check_disjoint(X_cal: np.ndarray, X_ref: np.ndarray) -> None:
    """Refuse calibration rows that are reference rows (CalibrationError). A row scored against a
    reference measure that holds it looks more typical than a new input can, so the calibration
    statistics come out too small and the gate flags new in-distribution rows more often than alpha:
    passing the same 1,000 rows as both took a gate's false-flag rate on new rows from 0.06 to 0.20
    at alpha 0.05 (``tests/hjmodel/test_byom.py`` measures it). Data that repeats rows of its own
    accord (discrete features) repeats them within the reference rows too, so only the excess over
    that rate counts."""
    shared, natural = _repeats(X_cal, X_ref), _repeats(X_ref)
    if shared > natural + OVERLAP_ALLOWANCE:
        raise CalibrationError(
            f"{shared:.0%} of the calibration rows are also reference rows (the reference rows repeat one another "
            f"at {natural:.0%}): calibrate on rows the reference measure does not hold, or a row looks more "
            "typical than a new input can and the gate flags in-distribution inputs more often than alpha")


def export(network, calibration_data, out: str | Path, *, reference_data=None, task: str | None = None,
           class_names=None, feature_names=None, alpha: float = 0.05, alpha_tolerance: float | None = None,
           reference_size: int = 1000, seed: int = 0,
           formats: tuple[str, ...] = ("onnx", "torch")) -> HJModel:
    """Write a serving artifact of ``network`` into the version directory ``out``; returns the model.

    ``calibration_data``: ``X`` or ``(X, y)``, in-distribution rows the network was *not* trained on
    (labels, when given, are used for held-out metrics only). ``reference_data``: rows for the OOD
    reference measure and the score normalisers (typically training rows); when None, half of
    ``calibration_data`` (a seeded split) serves as reference and the other half calibrates. The OOD
    gate's validity rests on the calibration rows being exchangeable with future in-distribution
    inputs. Raises :class:`~hjmodel.errors.CalibrationError` when ``alpha`` cannot be reached with the
    calibration rows given, or (``alpha_tolerance``) when they are too few for one deployment's
    false-flag rate to lie within alpha +- alpha_tolerance (:func:`hjmodel.train.false_flag_interval`)."""
    model = to_hjmodel(network, task=task, class_names=class_names, feature_names=feature_names)
    cfg = TrainConfig(kind=model.kind, alpha=alpha, alpha_tolerance=alpha_tolerance, reference_size=reference_size,
                      seed=seed, progress=False)   # checks them (ConfigError) before any work
    X, y = (calibration_data if isinstance(calibration_data, tuple) else (calibration_data, None))
    y = None if y is None else np.asarray(y)
    X = torch.as_tensor(check_rows(X, "calibration_data", model.n_features, y))
    if reference_data is None:
        perm = np.random.default_rng(seed).permutation(len(X))
        half = len(X) // 2
        X_ref, X_cal = X[perm[:half]], X[perm[half:]]
        y_cal = None if y is None else y[perm[half:]]
    else:
        X_ref = torch.as_tensor(check_rows(reference_data, "reference_data", model.n_features))
        X_cal, y_cal = X, y
        _check_disjoint(X_cal.numpy(), X_ref.numpy())
    model.refresh()
    calibrate(model, X_ref, X_cal, cfg)
    metrics = {"alpha": alpha, "n_reference": int(len(X_ref)), "n_calibration": int(len(X_cal))}
    if y_cal is not None:
        metrics.update({f"calibration_{k}": v for k, v in evaluate_metrics(model, X_cal, y_cal, model.task).items()})
    metrics["ood_false_flag_rate_calibration"] = float(
        model.served(X_cal, ("ood_flag",))["ood_flag"].double().mean())
    model.meta["metrics"] = metrics
    model.meta["provenance"] = {"source": "hjmodel.export", "network": type(network).__name__,
                                "torch": torch.__version__, "seed": seed}
    save_artifact(model, out, formats)
    return model
