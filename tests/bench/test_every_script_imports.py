"""Every benchmark and evaluation script imports against today's library.

Most of them take minutes and run outside the suite, so a name they import from ``hjmodel`` or
``service`` can be renamed or removed under them without a test noticing: ``eval.run`` failed at
import for days after ``hjmodel.models._output_gradient`` went (its results file predates that).
Importing runs no script (each one's work sits behind ``if __name__ == "__main__"``); the optional
dependencies of the evaluation (Captum, matplotlib, auto_LiRPA) are imported where they are used,
so CI's environment imports every module."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = [f"{package}.{path.stem}" for package in ("bench", "eval")
           for path in sorted((ROOT / package).glob("*.py")) if path.stem != "__init__"]


def test_the_scripts_are_found():
    assert {"eval.run", "eval.attributions", "bench.hjmodel_bench", "bench.competitors"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_the_script_imports(module):
    importlib.import_module(module)
