"""Fixtures of the service tests: a tiny contract-honouring repository, real hjmodel artifacts and a
shared real server process (helpers live in ``svc_helpers``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from svc_helpers import Server, export_tiny, make_pki, run_server, train_artifact  # noqa: E402


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """``clf`` (versions 1 and 2), ``reg`` (1), ``broken`` (1: a corrupt model.onnx)."""
    root = tmp_path_factory.mktemp("repo")
    export_tiny(root / "clf" / "1", "classification", seed=0)
    export_tiny(root / "clf" / "2", "classification", seed=1)
    export_tiny(root / "reg" / "1", "regression", seed=2)
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx graph")
    return root


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """Test certificates (``svc_helpers.make_pki``): CAs ``ca`` and ``rogue``, ``server``, ``client``,
    ``intruder``, ``encrypted.key``."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def hj_repo(tmp_path_factory) -> Path:
    """Real hjmodel artifacts: ``iris`` (lse classification), ``iris_memory``, ``diabetes`` (lse regression)."""
    root = tmp_path_factory.mktemp("hjrepo")
    train_artifact("iris", root / "iris" / "1")
    train_artifact("iris", root / "iris_memory" / "1", kind="memory")
    train_artifact("diabetes", root / "diabetes" / "1")
    return root


@pytest.fixture(scope="session")
def server(tiny_repo: Path, tmp_path_factory) -> Iterator[Server]:
    """The shared server over the tiny repository (1 MiB body limit; load / unload allowed)."""
    with run_server(tiny_repo, tmp_path_factory.mktemp("logs"), max_body_bytes=1024 * 1024,
                    model_control_mode="explicit") as s:
        yield s


@pytest.fixture(scope="session")
def triton(server: Server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=server.host_port, network_timeout=30.0)
    yield client
    client.close()


# -- the in-process fixture chain: settings -> repository (fake backend) -> dataplane -> app -> client


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """``fclf`` (versions 1, 2), ``freg`` (1): fake model folders (tests/service/fakes.py)."""
    from fakes import write_model

    write_model(tmp_path / "fclf" / "1", "classification", seed=1)
    write_model(tmp_path / "fclf" / "2", "classification", seed=2)
    write_model(tmp_path / "freg" / "1", "regression", seed=3)
    return tmp_path


@pytest.fixture
def settings_overrides() -> dict:
    """Settings a test module changes (override this fixture)."""
    return {}


@pytest.fixture
def settings(fake_root: Path, settings_overrides: dict):
    from service.settings import Settings

    return Settings(model_repository=fake_root, max_queue_delay_ms=0.0,
                    **{"model_control_mode": "explicit", **settings_overrides})


@pytest.fixture
def loader():
    from fakes import FakeLoader

    return FakeLoader()


@pytest.fixture
def repository(settings, loader):
    from service.repository import ModelRepository

    return ModelRepository(settings, loader=loader)


@pytest.fixture
def dataplane(settings, repository):
    from service.dataplane import DataPlane

    return DataPlane(settings, repository)


@pytest.fixture
def app(dataplane):
    from service.rest.app import create_app

    return create_app(dataplane)


@pytest.fixture
def client(app):
    """An ASGI client of the app, its lifespan run (the repository loaded)."""
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
