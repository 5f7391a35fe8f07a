"""Live check of the monitoring stack: a real Prometheus scraping a real hjserve process.

Builds the demo model repository, starts ``python -m service`` and ``prometheus`` (1 s scrape and
rule evaluation, the real alerts.yml) on loopback, sends traffic -- in-distribution-like rows, far
out-of-distribution noise, malformed requests and a batch-attribution job -- and then evaluates
every PromQL expression of the Grafana dashboard (template variables substituted) and of the rules
through Prometheus' HTTP API: each must parse and return data, and the OOD-rate panel must be > 0.
Processes are started and stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    DOCKERFILES,
    PROMETHEUS_DIR,
    REPO,
    alert_rules,
    dashboard_targets,
    final_stage,
    load_dashboard,
    parse_dockerfile,
    recording_rules,
    require_tool,
)
from proc_utils import stop_process

PYTHON = sys.executable
#: What Grafana would put for $__rate_interval here: max(4 x scrape interval, ...) = 4 s; 1m keeps
#: every sample of the short traffic burst in the window.
RATE_INTERVAL = "1m"
OOD_SCALE = 1e3

pytestmark = pytest.mark.timeout(240)


# --- processes -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: Any, timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait_until(what: str, ready, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:] if log else ''}", pytrace=False)
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{what} not ready after {timeout:.0f} s:\n{log.read_text()[-4000:] if log else ''}", pytrace=False)


def _stop(proc: subprocess.Popen) -> None:
    stop_process(proc)


@pytest.fixture(scope="module")
def model_repository(demo_repository: Path) -> Path:
    """The demo model repository (built once per session by tests/conftest.py)."""
    assert any(demo_repository.iterdir()), "hjmodel.demo wrote no models"
    return demo_repository


@pytest.fixture(scope="module")
def hjserve(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("hjserve") / "hjserve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([PYTHON, "-m", "service", "--model-repository", str(model_repository),
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until("hjserve", lambda: _get(url + "/v2/health/ready", 2)[0] == 200, 90, proc, log)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def prometheus(hjserve: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    port = _free_port()
    # The real configuration with only the target, the intervals and the rule path changed.
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        target = urllib.parse.urlsplit(hjserve).netloc if job["job_name"] == "hjserve" else f"127.0.0.1:{port}"
        for sc in job["static_configs"]:
            sc["targets"] = [target]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until("prometheus", lambda: _get(url + "/-/ready", 2)[0] == 200, 60, proc, log)
        _wait_until("first hjserve scrape", lambda: _values(url, 'up{job="hjserve"}') == [1.0], 30, proc, log)
        yield url
    finally:
        _stop(proc)


# --- Prometheus API --------------------------------------------------------------------------------

def _query(prom: str, expr: str) -> dict[str, Any]:
    status, body = _get(prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10)
    data = json.loads(body)
    assert status == 200 and data["status"] == "success", f"query failed ({status}): {expr}\n{data.get('error')}"
    return data["data"]


def _values(prom: str, expr: str) -> list[float]:
    status, body = _get(prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=5)
    data = json.loads(body)
    if data.get("status") != "success" or data["data"]["resultType"] != "vector":
        return []
    return [float(r["value"][1]) for r in data["data"]["result"]]


# --- traffic ---------------------------------------------------------------------------------------

def _choose_model(url: str) -> tuple[str, str, int]:
    status, body = _post(url + "/v2/repository/index", {})
    assert status == 200, body
    candidates = []
    for entry in json.loads(body):
        if entry.get("state", "READY") != "READY":
            continue
        name, version = entry["name"], str(entry["version"])
        status, meta = _get(f"{url}/v2/models/{name}/versions/{version}")
        assert status == 200, meta
        meta = json.loads(meta)
        classification = any(o["name"] == "probabilities" for o in meta["outputs"])
        candidates.append((not classification, name, version, meta["inputs"][0]["shape"][1]))
    assert candidates, "the demo repository has no ready model"
    _, name, version, d = min(candidates)
    return name, version, d


def _infer(url: str, model: str, version: str, rows: list[list[float]]) -> int:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(rows), len(rows[0])],
                        "data": [x for r in rows for x in r]}]}
    status, _ = _post(f"{url}/v2/models/{model}/versions/{version}/infer", body)
    return status


@pytest.fixture(scope="module")
def traffic(hjserve: str, prometheus: str) -> dict[str, Any]:
    model, version, d = _choose_model(hjserve)
    rng = random.Random(0)
    near = [[[rng.gauss(0.0, 0.5) for _ in range(d)] for _ in range(8)] for _ in range(24)]
    far = [[[rng.uniform(-1.0, 1.0) * OOD_SCALE for _ in range(d)] for _ in range(8)] for _ in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent, so the dynamic batcher batches
        statuses = list(pool.map(lambda rows: _infer(hjserve, model, version, rows), near + far))
    assert statuses == [200] * len(statuses), statuses
    # Malformed requests (one column too many) are counted as failures with a reason.
    bad = [_infer(hjserve, model, version, [[0.0] * (d + 1)]) for _ in range(3)]
    assert all(400 <= s < 500 for s in bad), bad
    # A batch-attribution job, read to the end.
    rows = [[rng.gauss(0.0, 0.5) for _ in range(d)] for _ in range(300)]
    status, body = _post(f"{hjserve}/v2/models/{model}/versions/{version}/batch-attribution", {"instances": rows},
                         timeout=60)
    assert status == 200, body[:500]
    predicted = 48 * 8
    sel = f'model="{model}", version="{version}"'
    _wait_until("the traffic in Prometheus", lambda: sum(_values(prometheus, f"hjserve_predictions_total{{{sel}}}"))
                >= predicted and sum(_values(prometheus, f"hjserve_batch_rows_total{{{sel}}}")) >= len(rows)
                and _values(prometheus, f"hjserve:ood_flags:ratio_rate5m{{{sel}}}"), 30)
    time.sleep(2.5)  # a couple more scrapes and rule evaluations
    return {"model": model, "version": version}


def _substitute(expr: str, model: str, version: str) -> str:
    # Grafana escapes regex metacharacters in single-value variables used with =~.
    return (expr.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$model", re.escape(model)).replace("$version", re.escape(version)))


# --- tests -----------------------------------------------------------------------------------------

def test_every_dashboard_query_returns_data(prometheus: str, traffic: dict[str, Any]) -> None:
    empty = []
    targets = dashboard_targets(load_dashboard())
    assert len(targets) >= 25
    for panel, target in targets:
        expr = _substitute(target["expr"], traffic["model"], traffic["version"])
        assert "$" not in expr, f"unsubstituted variable in {panel['title']!r}: {expr}"
        data = _query(prometheus, expr)
        if not data["result"]:
            empty.append(f"{panel['title']!r} {target['refId']}: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_ood_rate_panel_is_nonzero_after_ood_traffic(prometheus: str, traffic: dict[str, Any]) -> None:
    (panel,) = [p for p, _ in dashboard_targets(load_dashboard()) if p["title"] == "OOD flag rate"][:1]
    total = _substitute(panel["targets"][0]["expr"], traffic["model"], traffic["version"])
    values = [float(r["value"][1]) for r in _query(prometheus, total)["result"]]
    assert values and max(values) > 0, f"OOD rate {values} after {OOD_SCALE:g}-scale noise"
    # The far-away noise is flagged as unsupported by the data.
    by_component = _substitute(panel["targets"][1]["expr"], traffic["model"], traffic["version"])
    components = {r["metric"]["component"]: float(r["value"][1]) for r in _query(prometheus, by_component)["result"]}
    assert components.get("unsupported", 0) > 0, components


def test_template_variable_queries(prometheus: str, traffic: dict[str, Any]) -> None:
    # label_values(hjserve_model_ready, model) and label_values(hjserve_model_ready{model=~"$model"}, version)
    models = {r["metric"]["model"] for r in _query(prometheus, "hjserve_model_ready")["result"]}
    assert traffic["model"] in models
    expr = _substitute('hjserve_model_ready{model=~"$model"}', traffic["model"], traffic["version"])
    versions = {r["metric"]["version"] for r in _query(prometheus, expr)["result"]}
    assert traffic["version"] in versions


def _signal(expr: str) -> str:
    """The quantity an alert watches: its expression without the threshold, or absent()'s argument."""
    expr = expr.strip()
    m = re.fullmatch(r"absent\((.*)\)", expr, re.S)
    if m:
        return m.group(1)
    m = re.fullmatch(r"(.*?)\s*(?:>|<|>=|<=|==|!=)\s*[-+0-9.e]+", expr, re.S)
    assert m, f"alert expression is not '<signal> <op> <threshold>': {expr}"
    return m.group(1)


#: Alerts whose signal only some servers export, and where that series is shown instead.
_OPTIONAL_SIGNALS = {
    "HjserveTLSCertificateExpiresSoon": "only a server with TLS exports it: tests/service/test_tls.py reads it "
                                        "from /metrics, deploy/prometheus/alerts_test.yml fires the alert",
}


def test_every_rule_expression_evaluates_with_data(prometheus: str, traffic: dict[str, Any]) -> None:
    empty = []
    for rule in recording_rules():
        if not _query(prometheus, rule["expr"])["result"]:
            empty.append(f"record {rule['record']}: {rule['expr']}")
        if not _query(prometheus, rule["record"])["result"]:
            empty.append(f"recorded series {rule['record']} (rule evaluation)")
    for rule in alert_rules():
        _query(prometheus, rule["expr"])  # parses and evaluates (empty unless firing)
        if rule["alert"] in _OPTIONAL_SIGNALS:   # this plaintext server has no such series
            continue
        if not _query(prometheus, _signal(rule["expr"]))["result"]:
            empty.append(f"alert {rule['alert']} signal: {_signal(rule['expr'])}")
    assert not empty, "rule expressions without data:\n" + "\n".join(empty)


def test_prometheus_loaded_every_rule_healthy(prometheus: str, traffic: dict[str, Any]) -> None:
    status, body = _get(prometheus + "/api/v1/rules")
    assert status == 200
    rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
    assert len(rules) == len(recording_rules()) + len(alert_rules())
    unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy, unhealthy
    firing = [r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"]
    assert "HjserveTargetDown" not in firing and "HjserveMetricsAbsent" not in firing, firing


def test_docker_healthcheck_command_passes_against_the_server(hjserve: str) -> None:
    port = urllib.parse.urlsplit(hjserve).port
    for name, path in DOCKERFILES.items():
        (health,) = [a for i, a in final_stage(parse_dockerfile(path)) if i == "HEALTHCHECK"]
        cmd = json.loads(health.split(" CMD ", 1)[1])
        assert cmd[0] == "python"
        proc = subprocess.run([PYTHON, *cmd[1:]], env={"HJSERVE_PORT": str(port)}, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
