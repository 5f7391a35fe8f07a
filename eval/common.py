"""Shared pieces of the evaluation suite: model cache, timing, machine description, tables."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hjmodel import TrainConfig, load_dataset, train
from hjmodel.artifact import load_model, save_artifact

EVAL_DIR = Path(__file__).resolve().parent
CACHE = EVAL_DIR / ".cache"

#: name -> (dataset, settings). The digits models are the demo settings (hjmodel.demo.DEMOS).
MODELS: dict[str, tuple[str, TrainConfig]] = {
    "digits_lse": ("digits", TrainConfig(kind="lse", pieces=8, epochs=150)),
    "digits_memory": ("digits", TrainConfig(kind="memory")),
    "digits_deep": ("digits", TrainConfig(kind="deep", hidden=[48], hidden_pieces=4, pieces=4, epochs=80)),
    "diabetes_lse": ("diabetes", TrainConfig(kind="lse", pieces=8, epochs=200, lr=0.01)),
}


def set_threads() -> None:
    torch.set_num_threads(int(os.environ.get("EVAL_THREADS", "2")))


def get_model(name: str, dataset: str, cfg: TrainConfig, fresh: bool = False):
    """Train (or load from eval/.cache) a model; returns (model, splits dict, metrics, train seconds).

    The cache key is the dataset and the full training config, so changing a setting retrains."""
    cfg.progress = False
    key = json.dumps({"dataset": dataset, **asdict(cfg)}, sort_keys=True)
    import hashlib

    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    d = CACHE / f"{name}-{tag}"
    if not fresh and (d / "splits.json").exists():
        info = json.loads((d / "splits.json").read_text())
        return load_model(d / "1"), info["splits"], info["metrics"], info["seconds"]
    t0 = time.time()
    model, report = train(load_dataset(dataset), cfg)
    secs = time.time() - t0
    save_artifact(model, d / "1", ("torch",))
    (d / "splits.json").write_text(json.dumps({"splits": report.splits, "metrics": report.metrics,
                                                "seconds": secs, "config": key}))
    return load_model(d / "1"), report.splits, report.metrics, secs


def dataset_arrays(dataset: str, exclude: list[int] | None = None):
    """X, y as the trainer sees them (classes in ``exclude`` dropped and the rest re-indexed)."""
    ds = load_dataset(dataset)
    X, y = ds.X, ds.y
    if exclude:
        keep = ~np.isin(y, exclude)
        kept = [k for k in range(len(ds.class_names)) if k not in exclude]
        remap = {old: new for new, old in enumerate(kept)}
        X = X[keep]
        y = np.array([remap[v] for v in y[keep]], dtype=np.int64)
    return torch.as_tensor(X, dtype=torch.float64), y


def timeit(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores visible, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}, {platform.system()}")


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if v != v:
                return "n/a"
            if v == 0:
                return "0"
            if abs(v) >= 1e4 or abs(v) < 1e-3:
                return f"{v:.2e}"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)
