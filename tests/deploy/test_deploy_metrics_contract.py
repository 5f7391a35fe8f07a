"""Every metric and label the dashboard and the rules query is one the service exports."""

from __future__ import annotations

import re

import pytest
from deploy_helpers import alert_rules, dashboard_targets, load_dashboard, recording_rules


def _exported() -> dict[str, set[str]]:
    """Sample name -> label names, from the service's metric constants."""
    from prometheus_client.metrics import MetricWrapperBase

    import service.metrics as metrics

    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = set(value._labelnames)
        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[value._type]
        for s in suffixes:
            out[value._name + s] = labels | ({"le"} if s == "_bucket" else set())
    return out


def _expressions() -> list[tuple[str, str]]:
    exprs = [(f"panel {p['title']!r}", t["expr"]) for p, t in dashboard_targets(load_dashboard())]
    exprs += [(f"record {r['record']}", r["expr"]) for r in recording_rules()]
    exprs += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    return exprs


@pytest.mark.parametrize(("where", "expr"), _expressions(), ids=[w for w, _ in _expressions()])
def test_queried_metrics_and_labels_exist(where: str, expr: str) -> None:
    exported = _exported()
    names = re.findall(r"\b(hjserve_[a-z0-9_]+)\s*(\{[^}]*\})?", expr)
    recorded = {r["record"] for r in recording_rules()}
    for rec in re.findall(r"\b(hjserve:[a-z0-9_:]+)", expr):
        assert rec in recorded, f"{where}: unknown recording rule {rec}"
    used_labels: set[str] = {"instance", "job"}   # target labels Prometheus adds to every scraped series
    for name, selector in names:
        assert name in exported, f"{where}: the service exports no {name}"
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", selector):
            assert label in exported[name], f"{where}: {name} has no label {label!r}"
        used_labels |= exported[name]
    if names:
        for group in re.findall(r"\b(?:by|without|ignoring|on)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in used_labels, f"{where}: groups by {label!r}, which no queried metric has"
