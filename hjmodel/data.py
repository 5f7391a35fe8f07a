"""Datasets for training: scikit-learn built-ins (shipped inside the package, no downloads), .npz, .csv."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["BUILTIN", "Dataset", "load_dataset"]

#: scikit-learn loaders by name -> task
BUILTIN = {
    "digits": "classification",
    "breast_cancer": "classification",
    "wine": "classification",
    "iris": "classification",
    "diabetes": "regression",
}


@dataclass
class Dataset:
    """X: (n, d) float64, y: (n,) int (classification) or (n,)/(n, K) float (regression)."""

    X: np.ndarray
    y: np.ndarray
    task: str
    name: str
    class_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        """Hash of the data, recorded in the artifact's provenance."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.X, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(self.y).tobytes())
        return h.hexdigest()


def _infer_task(y: np.ndarray) -> str:
    if y.ndim == 1 and (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.str_)
                        or np.issubdtype(y.dtype, np.object_) or np.issubdtype(y.dtype, np.bool_)):
        return "classification"
    return "regression"


def check_rows(X, name: str, columns: int | None = None, y=None) -> np.ndarray:
    """``X`` as a float64 (n, d) array of finite numbers, n >= 1 (``columns``: d), with as many
    labels ``y`` as rows when given; else a DataError naming ``name``."""
    if np.asarray(X).dtype.kind == "c":   # the cast would drop the imaginary part
        raise DataError(f"{name}: X must be real numbers, got {np.asarray(X).dtype}")
    try:
        X = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name}: X must be an array of numbers ({e})") from e
    if X.ndim != 2 or X.shape[0] == 0:
        raise DataError(f"{name}: X must be a non-empty 2-D array, got shape {X.shape}")
    if columns is not None and X.shape[1] != columns:
        raise DataError(f"{name}: X has {X.shape[1]} columns, the model reads {columns}")
    if not np.isfinite(X).all():
        raise DataError(f"{name}: X contains NaN or Inf")
    if y is not None and len(y) != len(X):
        raise DataError(f"{name}: X has {len(X)} rows but y has {len(y)}")
    return X


def _encode(X: np.ndarray, y: np.ndarray, task: str | None, name: str,
            feature_names: list[str] | None = None) -> Dataset:
    X = check_rows(X, name, y=y)
    twice = [f for i, f in enumerate(feature_names or []) if f in feature_names[:i]]
    if twice:   # an explanation names features: two of one name could not be told apart
        raise DataError(f"{name}: feature names must differ: {twice[0]!r} twice")
    task = task or _infer_task(y)
    class_names: list[str] = []
    if np.asarray(y).ndim != 1:
        raise DataError(f"{name}: y must be one target per row, got shape {np.asarray(y).shape}")
    numeric = np.issubdtype(np.asarray(y).dtype, np.number)
    if numeric and not np.isfinite(np.asarray(y, dtype=np.float64)).all():   # a NaN target trains nothing
        raise DataError(f"{name}: y contains NaN or Inf")                     # sound, nor is it a class
    if task == "classification":
        classes, y = np.unique(y, return_inverse=True)
        class_names = [str(c) for c in classes]
        y = y.astype(np.int64)
    else:
        try:
            y = np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DataError(f"{name}: a regression target must be numbers ({e})") from e
    names = feature_names or [f"x{i}" for i in range(X.shape[1])]
    return Dataset(X, y, task, name, class_names, list(names))


def load_dataset(source: str, target: str | None = None, task: str | None = None) -> Dataset:
    """Load a built-in name (``digits``, ``breast_cancer``, ``wine``, ``iris``, ``diabetes``), an
    ``.npz`` with arrays ``X`` and ``y``, or a ``.csv`` with a header (target column ``target`` or
    the last one)."""
    if source in BUILTIN:
        import sklearn.datasets as sk

        bunch = getattr(sk, f"load_{source}")()
        ds = _encode(bunch.data, bunch.target, BUILTIN[source], source, list(map(str, bunch.feature_names)))
        if ds.task == "classification" and hasattr(bunch, "target_names"):
            ds.class_names = [str(n) for n in bunch.target_names]
        return ds
    path = Path(source)
    if not path.exists():
        raise DataError(f"no dataset {source!r}: not a built-in ({', '.join(BUILTIN)}) and no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                if "X" not in f or "y" not in f:
                    raise DataError(f"{path}: an .npz dataset needs arrays 'X' and 'y'")
                return _encode(f["X"], f["y"], task, path.stem)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable .npz ({e})") from e
    if path.suffix == ".csv":
        import csv

        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        if len(rows) < 2:
            raise DataError(f"{path}: a CSV dataset needs a header and at least one row")
        header = rows[0]
        body = [r for r in rows[1:] if any(v.strip() for v in r)]     # skip blank lines
        if not body:
            raise DataError(f"{path}: a CSV dataset needs a header and at least one row")
        for line, r in enumerate(rows[1:], start=2):
            if any(v.strip() for v in r) and len(r) != len(header):
                raise DataError(f"{path}: line {line} has {len(r)} fields, the header has {len(header)}")
        if target is not None and target not in header:
            raise DataError(f"{path}: no target column {target!r} (columns: {', '.join(header)})")
        col = header.index(target) if target else len(header) - 1
        try:
            X = np.array([[float(v) for i, v in enumerate(r) if i != col] for r in body])
        except ValueError as e:
            raise DataError(f"{path}: non-numeric feature value ({e})") from e
        raw_y = [r[col] for r in body]
        try:
            y = np.array([float(v) for v in raw_y])
            if task != "regression" and np.all(y == np.round(y)) and len(np.unique(y)) <= 50:
                y = y.astype(np.int64)
        except ValueError:
            y = np.array(raw_y)
        return _encode(X, y, task, path.stem, [h for i, h in enumerate(header) if i != col])
    raise DataError(f"{path}: unsupported dataset format {path.suffix!r} (use .npz or .csv)")
