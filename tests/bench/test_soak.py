"""bench/soak.py's summary of a run: the memory once warm, at the end, at its peak, and the growth
over the second half as a least-squares slope."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def soak(load_bench):
    return load_bench("soak")


def test_a_settled_server_shows_no_growth_and_a_leak_shows_its_rate(soak):
    minutes = [0.25 * k for k in range(1, 41)]                    # 10 minutes, a sample every 15 s
    settled = [500.0 + (40.0 if m < 1 else 50.0) for m in minutes]   # grows while warming, then flat
    row = soak.summary("onnx", {"samples": list(zip(minutes, settled)), "requests": 1000, "errors": 0})
    assert row[:7] == ["onnx", "1000", "0", "550.0", "550.0", "550.0", "+0.00"]
    assert row[7] == ", ".join(["550"] * 10)
    leaking = [500.0 + 3.0 * m for m in minutes]                  # 3 MiB a minute, throughout
    row = soak.summary("torch", {"samples": list(zip(minutes, leaking)), "requests": 5, "errors": 1})
    assert row[3] == "503.0" and row[4] == "530.0" and row[6] == "+3.00"


def test_the_mix_covers_every_demo_model_both_row_counts_and_both_output_sets(soak):
    bodies = soak.requests("127.0.0.1:1")
    assert len(bodies) == len(soak.DEMOS) * 2 * 2
    assert all(b.startswith(b"POST /v2/models/") for b in bodies)
    assert sum(b'"diagnostics": true' in b for b in bodies) == len(bodies) // 2
