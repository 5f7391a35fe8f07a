"""Triton's statistics extension: per model version counts and cumulative durations (ns)."""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["InferenceStats"]


def _pair() -> dict[str, int]:
    return {"count": 0, "ns": 0}


class InferenceStats:
    """Counters in Triton's ``model_stats`` shape (GET ``/v2/models/{m}/stats``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_inference = 0  # ms since the epoch
        self.inference_count = 0  # rows
        self.execution_count = 0  # backend runs
        self._stats = {k: _pair() for k in ("success", "fail", "queue", "compute_input", "compute_infer",
                                            "compute_output", "cache_hit", "cache_miss")}
        self._batches: dict[int, dict[str, dict[str, int]]] = {}

    def success(self, total_s: float, queue_s: float, compute_s: float, rows: int) -> None:
        with self._lock:
            self.last_inference = int(time.time() * 1000)
            self.inference_count += rows
            # input/output copies happen inside the graph run: counted (Triton's clients, perf_analyzer
            # among them, require equal compute counts) with no separate time
            for key, seconds in (("success", total_s), ("queue", queue_s), ("compute_input", 0.0),
                                 ("compute_infer", compute_s), ("compute_output", 0.0)):
                self._stats[key]["count"] += 1
                self._stats[key]["ns"] += int(seconds * 1e9)

    def fail(self, total_s: float) -> None:
        with self._lock:
            self._stats["fail"]["count"] += 1
            self._stats["fail"]["ns"] += int(total_s * 1e9)

    def batch(self, rows: int, compute_s: float) -> None:
        with self._lock:
            self.execution_count += 1
            entry = self._batches.setdefault(rows, {k: _pair() for k in
                                                    ("compute_input", "compute_infer", "compute_output")})
            for key in ("compute_input", "compute_infer", "compute_output"):
                entry[key]["count"] += 1
            entry["compute_infer"]["ns"] += int(compute_s * 1e9)

    def as_triton(self, name: str, version: str) -> dict[str, Any]:
        with self._lock:
            return {
                "name": name, "version": version, "last_inference": self.last_inference,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {k: dict(v) for k, v in self._stats.items()},
                "batch_stats": [{"batch_size": size, **{k: dict(v) for k, v in entry.items()}}
                                for size, entry in sorted(self._batches.items())],
            }
