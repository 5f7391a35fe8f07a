"""Shared helpers of the deploy tests (tests/deploy).

The external tools these tests drive are required, not optional: a missing one fails the test that
needs it with the command that installs it (``.ci/run`` installs them all).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "hjserve.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
K8S_DIR = DEPLOY / "k8s"
KSERVE_DIR = DEPLOY / "kserve"
COMPOSE_FILE = REPO / "docker-compose.yml"

#: How each tool gets onto a CI machine (Debian 12); quoted in the failure message.
INSTALL_HINTS = {
    "promtool": "apt-get install -y prometheus",
    "prometheus": "apt-get install -y prometheus",
    "docker-compose": "apt-get install -y docker-compose",
    "kubectl": "kubectl (with its built-in kustomize >= v5) from the Kubernetes or Google Cloud SDK apt repository",
}


def require_tool(name: str) -> str:
    """The absolute path of executable ``name``; fails the test (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"required tool {name!r} is not on PATH; install it with: {INSTALL_HINTS.get(name, name)}",
                    pytrace=False)
    return path


def run(cmd: list[str], *, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to completion and return it; a non-zero exit fails the test with its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
                    pytrace=False)
    return proc


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def load_yaml_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD.open() as f:
        return json.load(f)


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query target of every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for t in p.get("targets", []):
                out.append((p, t))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for r in g["rules"] if "alert" in r]


def recording_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for r in g["rules"] if "record" in r]


DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}
EXPECTED_CMD = ["python", "-m", "service", "--model-repository", "/models", "--host", "0.0.0.0", "--port", "8000"]


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not pending):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last:]


def arg_default(instructions: list[tuple[str, str]], name: str) -> str:
    for ins, args in instructions:
        if ins == "ARG" and args.startswith(name + "="):
            return args.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}")
