"""bench/scaling_bench.py's report carries its rows, so that ``--keep`` adds new measurements to an
earlier run's without rerunning it (its N = 60,000 memory rows take 7-20 min each)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def scaling(load_bench):
    return load_bench("scaling_bench")


def _row(kind: str, N: int, d: int, **extra) -> dict:
    return {"kind": kind, "N": N, "d": d, "epochs": 2, "accuracy": 0.9984, "train_s": 8.630627544,
            "export_s": 0.61026, "artifact_mb": 2.804442, "load_s": 0.0993194, "latency_b1_ms": 0.318335,
            "rows_per_s_b64": 48582.7531, "bare_rows_per_s_b64": 836432.8197, "peak_rss_gb": 1.026604, **extra}


def test_a_report_gives_back_its_rows_exactly(scaling):
    rows = [_row("lse", 60000, 64, revision="27b465d"), _row("memory", 1000, 784),
            {"kind": "deep", "N": 5000, "d": 64, "error": "over 3600 s"}]
    text = scaling.report(rows, 60.0)
    def key(r):
        return (r["kind"], r["N"], r["d"])
    assert sorted(scaling.kept_rows(text), key=key) == sorted(rows, key=key)
    assert "| 27b465d |" in text and "| an earlier run |" in text


def test_a_report_older_than_the_rows_block_is_read_from_its_table(scaling):
    rows = [_row("lse", 60000, 64, revision="27b465d"), _row("memory", 1000, 784)]
    table = scaling.report(rows, 60.0).split(scaling._ROWS_BEGIN)[0]
    legacy = "\n".join(line.rsplit("|", 2)[0] + "|" if line.startswith("| lse") or line.startswith("| memory")
                       else line for line in table.splitlines())        # the 15 columns before "measured at"
    for text in (table, legacy):
        got = sorted(scaling.kept_rows(text), key=lambda r: r["kind"])
        assert [(r["kind"], r["N"], r["d"]) for r in got] == [("lse", 60000, 64), ("memory", 1000, 784)]
        assert got[0]["rows_per_s_b64"] == 48583.0 and got[0]["latency_b1_ms"] == 0.32   # as the table shows them
        assert "train s / epoch" not in got[0] and "revision" not in got[0]


def test_json_lines_are_read_as_they_are(scaling):
    assert scaling.kept_rows('{"kind": "lse", "N": 1, "d": 2}\nnot a row\n') == [{"kind": "lse", "N": 1, "d": 2}]


def test_one_configuration_measures_what_the_report_reads(scaling):
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, scaling.__file__, "--one", "deep", "150", "6"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(_row("deep", 150, 6)) <= set(row) and row["epochs"] >= 2
    assert all(row[k] > 0 for k in ("train_s", "export_s", "artifact_mb", "load_s", "latency_b1_ms",
                                     "rows_per_s_b64", "bare_rows_per_s_b64", "peak_rss_gb"))
    text = scaling.report([row, _row("deep", 300, 6)], 1.0)
    assert scaling.kept_rows(text)[0] == row
