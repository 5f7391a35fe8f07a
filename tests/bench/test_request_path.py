"""``bench/request_path.py`` times each stage by wrapping the function that owns it; a refactor that
moves or renames one broke the script once without any test noticing (``service.rest.v2.read_body``)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_every_stage_the_request_path_benchmark_times_exists():
    """The wrapping runs in a process of its own (it patches the service's modules)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench.request_path import instrument; "
            "total, requests = instrument(); assert total == {} and requests == [0]")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
