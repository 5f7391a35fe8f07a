"""Prometheus metrics (service/metrics.py): per-row diagnostics and per-request outcomes, each
counted once, in one place."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

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


@pytest.mark.parametrize("seed", range(20))
def test_a_block_of_rows_is_observed_as_one_observe_per_row(seed):
    """metrics._observe counts a block's values per bucket with numpy: the exposition -- every
    bucket, the count and the sum -- is what one ``observe`` per finite value gives, for values on
    the bucket bounds exactly (a value equal to a bound counts in that bucket), between them, beyond
    the last finite bound, negative, and non-finite ones (skipped); one value, and none."""
    rng = np.random.default_rng(seed)
    bounds = metrics._RADIUS_BUCKETS
    finite_bounds = np.array([b for b in bounds if math.isfinite(b)])
    n = int(rng.integers(0, 400)) if seed else 0
    values = np.concatenate([rng.choice(finite_bounds, n // 4),                     # on a bound
                             rng.uniform(-1.0, 2.0 * finite_bounds.max(), n - n // 4),
                             [np.nan, np.inf, -np.inf][: seed % 4]]).astype(rng.choice([np.float32, np.float64]))
    if seed == 1:
        values = values[:1]
    rng.shuffle(values)
    registries = CollectorRegistry(), CollectorRegistry()
    blocked, one_by_one = (Histogram("h", "h", buckets=bounds, registry=r) for r in registries)
    metrics._observe(blocked, values)
    for v in np.asarray(values, dtype=np.float64).tolist():
        if math.isfinite(v):
            one_by_one.observe(v)

    def samples(registry):
        return {(s.name, s.labels.get("le")): s.value for m in registry.collect() for s in m.samples
                if not s.name.endswith("_created")}

    got, want = samples(registries[0]), samples(registries[1])
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key[0] == "h_sum":       # a sum of the block at once, not value by value: to rounding
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12)
        else:
            assert got[key] == value, key
