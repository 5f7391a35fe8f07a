"""A transport-free, picklable predictor for offline batch attribution on any engine.

``Predictor`` holds only an artifact path and options; its runtime session (onnxruntime, one thread
by default, or the torch serving module) opens lazily on first use, in whatever process or worker
runs it, and is dropped when the predictor is pickled. It maps a batch -- a numpy array (n, d), a
dict of numpy columns (Ray Data's batch format) or a pandas DataFrame -- to fixed-shape diagnostic
columns, selected and sliced exactly as the server does (:func:`hjmodel.serving.select_outputs`).

Engines: :func:`hjmodel.distributed.attribute_dataset` (Ray Data) and
:func:`hjmodel.distributed.spark_map_in_pandas` (Spark ``mapInPandas``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .serving import (
    DEFAULT_OUTPUTS,
    DEFAULT_TAU,
    NUMPY_DTYPES,
    ONNX_FILE,
    TOP_K_MAX,
    check_threads,
    onnx_feeds,
    open_session,
    output_names,
    select_outputs,
    spec_of,
    tau_refusal,
)

__all__ = ["Predictor", "requested_outputs"]


def requested_outputs(task: str, outputs: Sequence[str] | str | None) -> list[str]:
    """The outputs a :class:`Predictor` (or a Spark schema) of a ``task`` model answers: ``None`` the
    server's default outputs, ``"all"`` every one, a name that one, else the names given -- each a
    name of this task's outputs, at least one, none twice (ValueError)."""
    names = output_names(task)
    if outputs is None:
        outputs = [n for n in DEFAULT_OUTPUTS if n in names]
    elif outputs == "all":
        outputs = list(names)
    elif isinstance(outputs, str):   # one name
        outputs = [outputs]
    unknown = [n for n in outputs if n not in names]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; this model has {list(names)}")
    if not outputs or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs must name one or more of this model's outputs, each once, got {list(outputs)}")
    return list(outputs)


class Predictor:
    """``Predictor(artifact)(batch) -> {output: column}`` with the server's semantics.

    ``artifact``: a version directory (``model.onnx`` and/or ``model.pt`` + ``model.json``).
    ``outputs``: output names, ``"all"``, or None for the server's default outputs. ``top_k`` (<= 10)
    and ``tau`` as the request parameters. ``input_column``: the column holding each row's feature
    vector in dict / DataFrame batches; if absent, ``feature_columns`` (default: the artifact's
    feature names) are stacked. Other columns of a dict / DataFrame batch are passed through, so rows
    stay joinable (an id column, say)."""

    def __init__(self, artifact: str | Path, outputs: Sequence[str] | str | None = None, top_k: int = 5,
                 tau: float | None = None, backend: str = "onnx", threads: int = 1, input_column: str = "input",
                 feature_columns: Sequence[str] | None = None):
        from .artifact import read_artifact_spec, verify_checksums
        from .errors import ArtifactError

        verify_checksums(artifact)   # here, once: the workers that open the session do not hash again
        self.artifact = str(artifact)
        spec = read_artifact_spec(self.artifact)
        if why := spec.unserved_because():
            raise ArtifactError(f"{artifact}: not served: {why}")
        self.task, self.n_features, self.n_outputs = spec.task, spec.n_features, spec.n_outputs
        self.class_names = spec.class_names
        self.feature_columns = list(feature_columns) if feature_columns is not None else list(spec.feature_names)
        if len(self.feature_columns) != spec.n_features:
            raise ValueError(f"feature_columns must name the model's {spec.n_features} features, "
                             f"got {len(self.feature_columns)}")
        outputs = requested_outputs(spec.task, outputs)
        largest = min(TOP_K_MAX, spec.top_k_max)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= largest:
            raise ValueError(f"top_k must be an integer in [1, {largest}], got {top_k!r}")
        if backend not in ("onnx", "torch"):
            raise ValueError("backend must be onnx or torch")
        if why := tau_refusal(spec.task, tau):   # as the server: refused, never dropped unread
            raise ValueError(f"tau {why}")
        threads = check_threads(threads)
        self.outputs, self.top_k = tuple(outputs), int(top_k)
        self.tau = DEFAULT_TAU if tau is None else float(tau)
        self.backend, self.threads, self.input_column = backend, threads, input_column
        self._runner = None
        self._lock = threading.Lock()

    # -- pickling: options travel, sessions do not ------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runner"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            if self._runner is None:
                self._runner = self._open()
            return self._runner(x)

    def _open(self):
        """The graph of the outputs asked for (and ``prediction``, for class names): the whole
        graph's values, bit for bit, without the work the others need (an onnxruntime session runs
        every node of its graph whichever outputs are fetched: :func:`hjmodel.artifact.prune_graph`)."""
        from .artifact import prune_graph

        wanted = [n for n in output_names(self.task) if n in self.outputs or n == "prediction"]
        if self.backend == "onnx":
            path = Path(self.artifact) / ONNX_FILE
            every = len(wanted) == len(output_names(self.task))
            session = open_session(path if every else prune_graph(path.read_bytes(), wanted), threads=self.threads)
            names = [o.name for o in session.get_outputs()]

            def run_onnx(x: np.ndarray) -> dict[str, np.ndarray]:
                return dict(zip(names, session.run(names, onnx_feeds(session, x, self.tau)), strict=True))
            return run_onnx
        import torch

        from .artifact import ServingModule, load_serving_module, traced_or_eager

        if self.threads:
            torch.set_num_threads(self.threads)
        module = traced_or_eager(ServingModule(load_serving_module(self.artifact, verify=False).model, wanted).eval(),
                                 str(self.artifact))

        def run_torch(x: np.ndarray) -> dict[str, np.ndarray]:
            with torch.no_grad():
                tau = torch.full((len(x), 1), self.tau, dtype=torch.float64)
                out = module(torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)), tau)
            return {k: v.numpy() for k, v in out.items()}
        return run_torch

    # -- the mapping ------------------------------------------------------------------------------

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Rows (n, d) -> the selected outputs (and ``class`` names for classification)."""
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":   # complex values lost their imaginary part to the float32 cast
            raise ValueError(f"rows must be real numbers, got dtype {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"rows must have shape (n, {self.n_features}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("rows contain NaN or infinite values")
        if len(x) == 0:   # no rows: empty columns of the contract's shapes and dtypes
            sizes = {"d": self.n_features, "K": self.n_outputs, "k": self.top_k}
            return {name: np.zeros((0, *(sizes[s] for s in spec.row_shape)), dtype=NUMPY_DTYPES[spec.datatype])
                    for name in self.outputs for spec in (spec_of(self.task, name),)}
        raw = self._run(x.astype(np.float32))
        out = select_outputs(self.task, raw, self.outputs, self.top_k)
        if self.class_names:
            out["class"] = np.asarray(self.class_names, dtype=object)[raw["prediction"].astype(np.int64)]
        return out

    def _rows(self, columns) -> np.ndarray:
        if self.input_column in columns:
            vectors = [np.asarray(v, dtype=np.float64) for v in columns[self.input_column]]
            return np.stack(vectors) if vectors else np.zeros((0, self.n_features))   # an empty batch: no rows
        missing = [c for c in self.feature_columns if c not in columns]
        if missing:
            raise ValueError(f"the batch has no {self.input_column!r} column and lacks feature columns {missing[:5]}")
        return np.column_stack([np.asarray(columns[c], dtype=np.float64) for c in self.feature_columns])

    def __call__(self, batch):
        """A batch in, the same kind of batch out: numpy (n, d) -> dict of columns; dict of numpy
        columns (Ray) -> dict; pandas DataFrame (Spark) -> DataFrame (multi-dimensional outputs as
        one list per row). Columns other than the features are passed through."""
        if isinstance(batch, np.ndarray):
            return self.predict(batch)
        is_frame = hasattr(batch, "iloc")
        out = self.predict(self._rows(batch))
        used = {self.input_column, *self.feature_columns}
        passed = {k: (batch[k].to_numpy() if is_frame else batch[k]) for k in batch if k not in used}
        result = {**passed, **out}
        if not is_frame:
            return result
        import pandas as pd

        return pd.DataFrame({k: (list(v) if np.ndim(v) > 1 else v) for k, v in result.items()}, index=batch.index)
