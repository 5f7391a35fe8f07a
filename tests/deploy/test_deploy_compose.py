"""docker-compose.yml: validated by a real compose implementation; every mounted file exists."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from deploy_helpers import COMPOSE_FILE, INSTALL_HINTS, REPO, load_yaml


def _compose_command() -> list[str]:
    """``docker compose`` when the client plugin works without an engine, else ``docker-compose``."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.fail("no compose implementation: install one with: " + INSTALL_HINTS["docker-compose"], pytrace=False)


def _config(*extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [*_compose_command(), "-f", str(COMPOSE_FILE), "config", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_compose_config_is_valid() -> None:
    proc = _config()
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    resolved = yaml.safe_load(proc.stdout)
    assert set(resolved["services"]) == {"hjserve", "prometheus", "grafana"}
    assert "WARNING" not in proc.stderr.upper(), proc.stderr


def test_compose_rejects_a_broken_file(tmp_path) -> None:
    """The validator is real: a misspelled key fails it."""
    broken = load_yaml(COMPOSE_FILE)
    broken["services"]["hjserve"]["portz"] = ["8000:8000"]
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    proc = subprocess.run([*_compose_command(), "-f", str(path), "config", "-q"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode != 0


def test_every_mounted_file_and_build_input_exists() -> None:
    compose = load_yaml(COMPOSE_FILE)
    named = set(compose.get("volumes", {}))
    checked = 0
    for name, svc in compose["services"].items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source in named:
                continue
            assert source.startswith("./"), f"{name}: bind mount {source} must be relative to the repository"
            assert (REPO / source).exists(), f"{name}: mounted {source} does not exist"
            checked += 1
        build = svc.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).is_file()
    assert checked >= 4


def test_stack_wiring() -> None:
    services = load_yaml(COMPOSE_FILE)["services"]
    assert "8000:8000" in services["hjserve"]["ports"]
    assert all(k.startswith("HJSERVE_") for k in services["hjserve"]["environment"])
    prom = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert services["grafana"]["depends_on"] == ["prometheus"]
    # Pinned images, no :latest.
    for svc in (prom, services["grafana"]):
        assert ":" in svc["image"] and not svc["image"].endswith(":latest")


def test_docker_waits_for_the_servers_drain() -> None:
    """docker stop / compose down kill the container stop_grace_period after SIGTERM (10 s unless
    set): the server's drain (HJSERVE_SHUTDOWN_GRACE_S) must end before it."""
    from service.settings import Settings

    service = load_yaml(COMPOSE_FILE)["services"]["hjserve"]
    grace = float(service["environment"].get("HJSERVE_SHUTDOWN_GRACE_S",
                                             Settings.model_fields["shutdown_grace_s"].default))
    period = service.get("stop_grace_period", "10s")
    assert period.endswith("s") and grace + 5 <= float(period[:-1])
