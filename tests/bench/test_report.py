"""bench/report.py's stage timer, which request_path.py's server and ab_training.py's trainings
read their breakdowns from."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest


@pytest.fixture(scope="module")
def report(load_bench):
    return load_bench("report")


def test_timed_adds_every_calls_seconds_and_keeps_answers_and_errors(report):
    totals: dict[str, float] = defaultdict(float)

    def nap(seconds: float, fail: bool = False) -> float:
        """a stage"""
        time.sleep(seconds)
        if fail:
            raise ValueError("stage failed")
        return seconds

    stage = report.timed(totals, "nap", nap)
    assert stage.__name__ == "nap" and stage.__doc__ == "a stage"
    assert stage(0.02) == 0.02
    with pytest.raises(ValueError, match="stage failed"):
        stage(0.03, fail=True)            # a failing call's time counts too
    assert 0.05 <= totals["nap"] < 0.5
    assert set(totals) == {"nap"}


def test_arguments_are_the_shared_command_line(report, tmp_path):
    ap = report.arguments("The title line.\nMore.", tmp_path / "out.md", repeats=7)
    assert ap.description == "The title line."
    args = ap.parse_args([])
    assert (args.models, args.repeats, args.out) == (str(report.ROOT / "models"), 7, str(tmp_path / "out.md"))
    assert ap.parse_args(["--repeats", "3", "--models", "m"]).repeats == 3


def test_the_demo_benches_take_only_and_batches_and_run_per_demo_model(report, tmp_path):
    from hjmodel.demo import DEMOS

    ap = report.arguments("Title.", tmp_path / "out.md", repeats=3, batches=(1, 4))
    args = ap.parse_args([])
    assert args.only is None and args.batches == [1, 4]
    seen, started = report.per_demo(args, lambda name, version: [(name, version)])
    assert started <= time.perf_counter()
    assert [name for name, _ in seen] == list(DEMOS)
    assert all(version == report.ROOT / "models" / name / "1" for name, version in seen)
    args = ap.parse_args(["--only", "digits_deep", "--batches", "16", "--models", str(tmp_path)])
    assert report.per_demo(args, lambda name, version: [version])[0] == [tmp_path / "digits_deep" / "1"]
    assert args.batches == [16]
    with pytest.raises(SystemExit):
        ap.parse_args(["--only", "no_such_model"])
    assert not hasattr(report.arguments("T.", tmp_path, 1).parse_args([]), "only")
