"""Prometheus configuration and rules: promtool checks and unit tests, operator guidance, drift."""

from __future__ import annotations

import re

import pytest
from deploy_helpers import (
    COMPOSE_FILE,
    K8S_DIR,
    KSERVE_DIR,
    PROMETHEUS_DIR,
    alert_rules,
    load_yaml,
    recording_rules,
    require_tool,
    run,
)


def test_promtool_check_config() -> None:
    promtool = require_tool("promtool")
    out = run([promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    out = run([promtool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS_DIR)
    n = len(alert_rules()) + len(recording_rules())
    assert f"SUCCESS: {n} rules found" in out.stdout + out.stderr


def test_promtool_test_rules() -> None:
    promtool = require_tool("promtool")
    out = run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in out.stdout + out.stderr


def test_config_scrapes_hjserve_and_loads_the_rules() -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    hjserve = jobs["hjserve"]
    assert hjserve.get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in hjserve["static_configs"] for t in sc["targets"]] == ["hjserve:8000"]
    # The alert rules select the target by this job name.
    assert any('up{job="hjserve"}' in r["expr"] for r in alert_rules())


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_tells_the_operator_what_to_do(rule: dict) -> None:
    assert rule["labels"]["severity"] in {"warning", "critical"}
    assert re.fullmatch(r"\d+[smh]", rule["for"]), "every alert waits a while before firing"
    ann = rule["annotations"]
    assert ann["summary"].strip()
    # A description long enough to say what is wrong and what to do about it.
    assert len(ann["description"].split()) >= 30, ann["description"]


def test_required_alerts_exist() -> None:
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    assert "hjserve:ood_flags:ratio_rate5m" in exprs["HjserveHighOODRate"]
    assert "hjserve:inference_failures:ratio_rate5m" in exprs["HjserveHighErrorRate"]
    assert "p99" in exprs["HjserveHighP99Latency"]
    assert "hjserve:queue_saturation:ratio" in exprs["HjserveQueueSaturated"]
    assert exprs["HjserveTargetDown"].strip() == 'up{job="hjserve"} == 0'
    assert exprs["HjserveMetricsAbsent"].strip() == 'absent(up{job="hjserve"})'


def test_every_alert_is_unit_tested() -> None:
    text = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    tests = load_yaml(PROMETHEUS_DIR / "alerts_test.yml")["tests"]
    firing = set(re.findall(r'alertname="(\w+)"', text))
    quiet = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])}
    for rule in alert_rules():
        assert rule["alert"] in firing, f"{rule['alert']} is never shown firing in alerts_test.yml"
    assert quiet, "alerts_test.yml checks no quiet case"
    recorded = {r["record"] for r in recording_rules()}
    tested = {e["expr"].split("{")[0].strip() for case in tests for e in case.get("promql_expr_test", [])}
    assert recorded - {"hjserve:queue_capacity:configured", "hjserve:predictions:rate5m"} <= tested | {
        "hjserve:request_duration_seconds:p99_rate5m"
    }


def test_prometheusrule_matches_alerts_yml() -> None:
    """deploy/k8s/base/prometheusrule.yaml carries exactly the groups of alerts.yml."""
    rule = load_yaml(K8S_DIR / "base" / "prometheusrule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"], (
        "prometheusrule.yaml is stale: run python tests/deploy/regen_prometheusrule.py"
    )


def test_queue_capacity_rule_matches_configured_max_queue_size() -> None:
    (capacity,) = [r["expr"] for r in recording_rules() if r["record"] == "hjserve:queue_capacity:configured"]
    m = re.fullmatch(r"vector\((\d+)\)", capacity.strip())
    assert m, capacity
    expected = m.group(1)
    compose = load_yaml(COMPOSE_FILE)
    assert compose["services"]["hjserve"]["environment"]["HJSERVE_MAX_QUEUE_SIZE"] == expected
    assert load_yaml(K8S_DIR / "base" / "configmap.yaml")["data"]["HJSERVE_MAX_QUEUE_SIZE"] == expected
    runtime = load_yaml(KSERVE_DIR / "servingruntime.yaml")
    env = {e["name"]: e.get("value") for c in runtime["spec"]["containers"] for e in c.get("env", [])}
    assert env["HJSERVE_MAX_QUEUE_SIZE"] == expected
