"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory) -> Path:
    """The demo model repository: ``$HJSERVE_TEST_MODELS`` (``make test`` builds ``models/``), else
    ``models/`` if already built, else built now into a temporary directory."""
    for candidate in (os.environ.get("HJSERVE_TEST_MODELS"), str(ROOT / "models")):
        if candidate and (Path(candidate) / "DEMO_RESULTS.json").exists():
            return Path(candidate)
    out = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, "-m", "hjmodel.demo", "--out", str(out)], check=True, timeout=600)
    return out
