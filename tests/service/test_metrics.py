"""Prometheus metrics (service/metrics.py): per-row diagnostics and per-request outcomes, each
counted once, in one place."""

from __future__ import annotations

import numpy as np

from service import metrics
from service.metrics import VersionMetrics


def _value(metric, **labels) -> float:
    return metric.labels(**labels)._value.get()


def test_record_rows_counts_flags_by_component_and_classes():
    m = VersionMetrics("mtest", "1", ("a", "b"))
    before = {c: _value(metrics.OOD_FLAGS, model="mtest", version="1", component=c) for c in metrics.OOD_COMPONENTS}
    m.record_rows({"prediction": np.array([0, 1, 1]), "ood_flag": np.array([True, True, False]),
                   "ood_component": np.array([0, 1, 1]), "hallucination_flag": np.array([True, False, False]),
                   "certified_radius": np.array([0.1, 0.2, np.inf])}, "classification")
    after = {c: _value(metrics.OOD_FLAGS, model="mtest", version="1", component=c) for c in metrics.OOD_COMPONENTS}
    assert [after[c] - before[c] for c in metrics.OOD_COMPONENTS] == [1, 1]
    assert _value(metrics.CLASS_PREDICTIONS, model="mtest", version="1", **{"class": "b"}) >= 2


def test_requests_are_counted_in_prometheus_and_triton_statistics_together():
    m = VersionMetrics("mtest2", "1")
    m.succeeded(0.01, 0.001, 0.005, rows=7)
    m.failed("overloaded", 0.002)
    stats = m.stats.as_triton("mtest2", "1")
    assert stats["inference_count"] == 7 and stats["inference_stats"]["success"]["count"] == 1
    assert stats["inference_stats"]["fail"]["count"] == 1
    assert _value(metrics.INFERENCE_FAILURES, model="mtest2", version="1", reason="overloaded") == 1
    assert _value(metrics.INFERENCE_REQUESTS, model="mtest2", version="1", outcome="success") == 1
