"""Grafana provisioning and the hjserve dashboard: structure, datasource references, coverage."""

from __future__ import annotations

import re
from typing import Any

from deploy_helpers import (
    COMPOSE_FILE,
    DASHBOARD,
    DATASOURCES,
    GRAFANA_DIR,
    dashboard_targets,
    load_dashboard,
    load_yaml,
)


def _provisioned_uid() -> str:
    (ds,) = load_yaml(DATASOURCES)["datasources"]
    return ds["uid"]


def _all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for panel in dashboard["panels"] for p in [panel, *panel.get("panels", [])]]


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", k, v
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_datasource_provisioning() -> None:
    doc = load_yaml(DATASOURCES)
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"] == "hjserve-prometheus" and ds["isDefault"] is True
    # Prometheus is reachable under its compose service name and default port.
    compose = load_yaml(COMPOSE_FILE)
    assert "prometheus" in compose["services"]
    assert ds["url"] == "http://prometheus:9090"
    # $__rate_interval is derived from timeInterval: it must be the scrape interval.
    prom = load_yaml(GRAFANA_DIR.parent / "prometheus" / "prometheus.yml")
    assert ds["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]


def test_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    (provider,) = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "hjserve.yml")["providers"]
    assert provider["type"] == "file"
    mounts = load_yaml(COMPOSE_FILE)["services"]["grafana"]["volumes"]
    targets = {m.split(":")[1]: m.split(":")[0] for m in mounts if m.startswith("./")}
    assert targets[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    env = load_yaml(COMPOSE_FILE)["services"]["grafana"]["environment"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == provider["options"]["path"] + "/" + DASHBOARD.name
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_dashboard_is_valid_grafana_json() -> None:
    d = load_dashboard()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["uid"] == "hjserve" and d["title"]
    assert d.get("id") is None, "provisioned dashboards carry no numeric id"
    panels = _all_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["type"] and p["title"], p
        g = p["gridPos"]
        assert 0 <= g["x"] < 24 and 0 < g["w"] <= 24 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p.get("description"), f"panel {p['title']!r} has no description"
        targets = p.get("targets")
        assert targets, f"panel {p['title']!r} has no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), p["title"]
        for t in targets:
            assert t["expr"].strip(), p["title"]


def test_every_datasource_reference_uses_the_provisioned_uid() -> None:
    uid = _provisioned_uid()
    refs = [(path, v) for path, k, v in _walk(load_dashboard()) if k == "datasource"]
    assert len(refs) > 20
    for path, ref in refs:
        assert ref == {"type": "prometheus", "uid": uid}, f"{path}: {ref}"
    for p in _all_panels(load_dashboard()):
        if p["type"] != "row":
            assert p.get("datasource") == {"type": "prometheus", "uid": uid}, p["title"]
            assert all(t.get("datasource") == {"type": "prometheus", "uid": uid} for t in p["targets"])


def test_template_variables() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert set(variables) == {"model", "version"}
    assert variables["model"]["type"] == "query"
    assert variables["model"]["query"]["query"] == "label_values(hjserve_model_ready, model)"
    assert variables["version"]["query"]["query"] == 'label_values(hjserve_model_ready{model=~"$model"}, version)'
    assert variables["version"]["includeAll"] and variables["version"]["allValue"] == ".*"


def _labelled_by_model() -> set[str]:
    """Sample names of the metrics with a ``model`` label (the others are per process)."""
    from prometheus_client.metrics import MetricWrapperBase

    import service.metrics as metrics

    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase) and "model" in value._labelnames:
            names |= {value._name + s for s in ("", "_total", "_bucket", "_sum", "_count")}
    return names


def test_queries_follow_the_variables_and_rate_interval() -> None:
    by_model = _labelled_by_model()
    for panel, t in dashboard_targets(load_dashboard()):
        expr = t["expr"]
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", f"{panel['title']}: fixed window [{window}]"
        for selector in re.findall(r"(hjserve_[a-z_]+)(\{[^}]*\})?", expr):
            name, labels = selector
            if name not in by_model:   # per process (HTTP requests, request memory, spool)
                continue
            assert 'model=~"$model"' in labels and 'version=~"$version"' in labels, f"{panel['title']}: {name}{labels}"


def _titles() -> dict[str, dict[str, Any]]:
    return {p["title"]: p for p in _all_panels(load_dashboard())}


def test_dashboard_covers_what_operators_watch() -> None:
    panels = _titles()
    exprs = {title: " ".join(t["expr"] for t in p.get("targets", [])) for title, p in panels.items()}

    def panel_with(*needles: str, kind: str | None = None) -> str:
        hits = [t for t, e in exprs.items() if all(n in e for n in needles) and (kind is None or panels[t]["type"] == kind)]
        assert hits, f"no {kind or ''} panel queries {needles}"
        return hits[0]

    ood = panel_with("hjserve_ood_flags_total", "hjserve_predictions_total")
    assert panels[ood]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    panel_with("hjserve_hallucination_flags_total", "hjserve_predictions_total")
    panel_with("hjserve_certified_radius_bucket", kind="heatmap")
    quantiles = panel_with("histogram_quantile", "hjserve_certified_radius_bucket")
    for q in ("0.1", "0.5", "0.9"):
        assert f"histogram_quantile({q}," in exprs[quantiles]
    panel_with("hjserve_energy_gap_bucket", kind="heatmap")
    panel_with("hjserve_ood_score_bucket", kind="heatmap")
    panel_with("hjserve_class_predictions_total", "class")
    panel_with("hjserve_inference_requests_total", "outcome")
    panel_with("hjserve_inference_failures_total", "reason")
    latency = panel_with("histogram_quantile", "hjserve_request_duration_seconds_bucket", "phase")
    assert panels[latency]["fieldConfig"]["defaults"]["unit"] == "s"
    panel_with("hjserve_queue_size", "hjserve:queue_capacity:configured")
    panel_with("hjserve_batch_size_bucket", kind="heatmap")
    panel_with("hjserve_batch_rows_total")
    panel_with("hjserve_model_ready")
    memory = panel_with("hjserve_request_memory_bytes", "hjserve_batch_spool_bytes")
    assert panels[memory]["fieldConfig"]["defaults"]["unit"] == "bytes"


def test_heatmaps_use_histogram_buckets_per_le() -> None:
    for p in _all_panels(load_dashboard()):
        if p["type"] == "heatmap":
            assert p["options"]["calculate"] is False, p["title"]
            for t in p["targets"]:
                assert t["format"] == "heatmap" and t["legendFormat"] == "{{le}}", p["title"]
                assert t["expr"].startswith("sum by (le) (increase(") and "_bucket{" in t["expr"], p["title"]
