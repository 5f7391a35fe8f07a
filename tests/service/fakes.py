"""A fake backend and fake model folders for in-process service tests.

The fake is *not* hjmodel's math: it produces every contract output (``hjmodel.serving``) with the
right name, datatype and shape from a fixed random linear map, deterministically and in microseconds,
so the dataplane, repository and transports can be tested without onnxruntime or a subprocess.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

from hjmodel import serving

D = 4
CLASSES = ("alpha", "beta", "gamma")


def write_model(version_dir: Path, task: str = "classification", seed: int = 0, n_outputs: int | None = None) -> Path:
    """A version folder the fake loader understands: ``model.json`` (a valid spec) and a marker file
    naming the seed (change it to make a "new build" of the same version)."""
    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    k = n_outputs or (len(CLASSES) if task == "classification" else 2)
    spec = {"format": serving.SPEC_FORMAT, "kind": "lse", "task": task, "n_features": D, "n_outputs": k,
            "eps": 0.5, "t": 1.0, "top_k_max": serving.TOP_K_MAX, "calibration": {"alpha": 0.05},
            "structure": {"note": "fake"}, "provenance": {}, "metrics": {},
            "class_names": list(CLASSES[:k]) if task == "classification" else [],
            "feature_names": [f"f{i}" for i in range(D)], serving.RADIUS_MARK: True}
    (version_dir / serving.SPEC_FILE).write_text(json.dumps(spec))
    (version_dir / "fake.seed").write_text(str(seed))
    return version_dir


class FakeBackend:
    """Every contract output from ``logits = x W + b``; ``delay`` seconds per batch; ``gate`` blocks
    runs while cleared; ``batches`` records (rows, distinct taus) of every run."""

    name = "fake"
    device = "cpu"
    platform = "fake_platform"
    execution = "numpy"
    embedded_specs: dict[str, str | None] = {}

    def __init__(self, spec: serving.ArtifactSpec, seed: int, delay: float = 0.0):
        rng = np.random.default_rng(seed)
        self.spec, self.seed, self.delay = spec, seed, delay
        self.W = rng.normal(size=(spec.n_features, spec.n_outputs))
        self.b = rng.normal(size=spec.n_outputs)
        self.batches: list[tuple[int, tuple[float, ...]]] = []
        self.asked: list[frozenset[str] | None] = []   # the outputs each run was asked for
        self.gate = threading.Event()
        self.gate.set()
        self.closed = False

    def infer(self, input: np.ndarray, tau: np.ndarray, outputs=None, beside=False) -> dict[str, np.ndarray]:  # noqa: A002
        self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        self.batches.append((len(input), tuple(np.unique(tau).tolist())))
        self.asked.append(outputs)
        x = input.astype(np.float64)
        n, k = len(x), serving.TOP_K_MAX
        logits = x @ self.W + self.b
        top = np.sort(logits, axis=1)
        order = np.argsort(-np.abs(x), axis=1, kind="stable")
        index = np.tile(np.arange(k), (n, 1)) + self.seed
        out = {
            "certified_radius": np.abs(top[:, -1] - top[:, -2]) / 10.0 + np.asarray(tau) * 0.0,
            "ood_score": np.linalg.norm(x, axis=1), "ood_flag": np.linalg.norm(x, axis=1) > 10.0,
            "ood_p_value": 1.0 / (1.0 + np.linalg.norm(x, axis=1)), "ood_component": (logits[:, 0] > 0).astype(np.int64),
            "hallucination_flag": np.zeros(n, dtype=bool), "energy_gap": top[:, -1] - top[:, -2],
            "attribution_entropy": np.full(n, 0.5), "attribution_index": index.astype(np.int64),
            "attribution_weight": np.tile(np.linspace(0.5, 0.05, k), (n, 1)),
            "label_sensitivity": np.tile(np.linspace(-0.5, -0.05, k), (n, 1)),
            "saliency": np.take_along_axis(x, order, axis=1),
        }
        if self.spec.task == "classification":
            e = np.exp(logits - logits.max(1, keepdims=True))
            out["prediction"] = logits.argmax(1).astype(np.int64)
            out["probabilities"] = e / e.sum(1, keepdims=True)
        else:
            out["prediction"] = logits
            out["certified_radius"] = np.asarray(tau, dtype=np.float64) * np.ones(n)   # radius = tau: visible
        return {name: np.asarray(v, dtype=serving_dtype(name, self.spec.task)) for name, v in out.items()}

    def close(self) -> None:
        self.closed = True


def serving_dtype(name: str, task: str):
    datatype = next(o.datatype for o in serving.outputs_for(task) if o.name == name)
    return {"FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}[datatype]


class FakeLoader:
    """A repository loader (``loader=`` of ModelRepository) that builds :class:`FakeBackend` s and
    remembers them (``backends[(model, version)]``, the latest load)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.backends: dict[tuple[str, int], FakeBackend] = {}
        self.loads = 0

    def __call__(self, version_dir: Path, *, preference: str, device: str, threads: int, spinning: bool = False,
                 pruned_graphs: int = 0, pruned_graph_bytes: int = 0, static_rows: int = 0) -> FakeBackend:
        from service.repository import read_spec

        version_dir = Path(version_dir)
        spec = read_spec(version_dir)
        seed = int((version_dir / "fake.seed").read_text())
        backend = FakeBackend(spec, seed, self.delay)
        self.backends[(version_dir.parent.name, int(version_dir.name))] = backend
        self.loads += 1
        return backend
