"""Prometheus metrics (service/metrics.py): per-row diagnostics and per-request outcomes, each
counted once, in one place."""

from __future__ import annotations

import numpy as np

from service import metrics
from service.metrics import VersionMetrics


def _value(metric, **labels) -> float:
    return metric.labels(**labels)._value.get()


def test_record_rows_counts_flags_by_component_and_classes():
    m = VersionMetrics("mtest", "1", ("a", "b", "c"))
    labels = {"model": "mtest", "version": "1"}

    def snapshot():
        return ([_value(metrics.OOD_FLAGS, **labels, component=c) for c in metrics.OOD_COMPONENTS],
                [_value(metrics.CLASS_PREDICTIONS, **labels, **{"class": k}) for k in "abc"],
                _value(metrics.HALLUCINATION_FLAGS, **labels), _value(metrics.PREDICTIONS, **labels))

    def recorded(outputs):
        before = snapshot()
        m.record_rows(outputs, "classification")
        after = snapshot()
        return ([a - b for a, b in zip(after[0], before[0])], [a - b for a, b in zip(after[1], before[1])],
                after[2] - before[2], after[3] - before[3])

    assert recorded({"prediction": np.array([0, 1, 1, 7, -1]), "ood_flag": np.array([True, True, False, True, True]),
                     "ood_component": np.array([0, 1, 1, 1, 5]),
                     "hallucination_flag": np.array([True, False, False, True, False]),
                     "certified_radius": np.array([0.1, 0.2, np.inf, 0.0, 0.3])}) == ([1, 2], [1, 2, 0], 2, 5)
    # nothing flagged; no component output (every flag is the first component's)
    assert recorded({"prediction": np.array([2]), "ood_flag": np.array([False])}) == ([0, 0], [0, 0, 1], 0, 1)
    assert recorded({"prediction": np.array([2, 2]), "ood_flag": np.array([True, True])}) == ([2, 0], [0, 0, 2], 0, 2)


def test_requests_are_counted_in_prometheus_and_triton_statistics_together():
    m = VersionMetrics("mtest2", "1")
    m.succeeded(0.01, 0.001, 0.005, rows=7)
    m.failed("overloaded", 0.002)
    stats = m.stats.as_triton("mtest2", "1")
    assert stats["inference_count"] == 7 and stats["inference_stats"]["success"]["count"] == 1
    assert stats["inference_stats"]["fail"]["count"] == 1
    assert _value(metrics.INFERENCE_FAILURES, model="mtest2", version="1", reason="overloaded") == 1
    assert _value(metrics.INFERENCE_REQUESTS, model="mtest2", version="1", outcome="success") == 1
