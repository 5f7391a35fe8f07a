"""Bench scripts loaded as modules by file path (``bench/`` is scripts, not an installed package)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench_module(name: str) -> types.ModuleType:
    """``bench/<name>.py`` as a module of its own."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_bench():
    """:func:`bench_module`, for a test module's own fixture."""
    return bench_module
