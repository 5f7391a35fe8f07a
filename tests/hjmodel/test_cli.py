"""The ``hjmodel`` command line, run as subprocesses on a tiny dataset: train, inspect, verify,
diagnose print strict JSON; errors exit non-zero with a one-line ``error: ...`` message and no
traceback. Also: ``import hjmodel`` pulls in no web framework."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hjmodel.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _strict(text: str):
    """json.loads that refuses NaN / Infinity (not JSON)."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def hjmodel(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hjmodel.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout, cwd=ROOT, env=env)


def _assert_clean_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().startswith("error:") or "error:" in proc.stderr, proc.stderr
    assert pattern in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)   # 24 calibration rows: enough for the gate to reach alpha 0.05
    X = rng.normal(size=(120, 4)) + 3.0 * np.eye(3, 4)[y]
    path = tmp_path_factory.mktemp("data") / "tiny.csv"
    path.write_text("a,b,c,d,label\n" + "\n".join(",".join(map(str, [*r, ["x", "y", "z"][t]]))
                                                  for r, t in zip(X, y)) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tiny_csv, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("repo") / "tiny" / "1"
    proc = hjmodel("train", str(tiny_csv), "--out", str(out), "--epochs", "20", "--pieces", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out, _strict(proc.stdout)


def test_train(trained):
    out, report = trained
    assert report["artifact"] == str(out)
    assert report["metrics"]["accuracy"] > 0.8 and report["metrics"]["n"] == 24
    assert {p.name for p in out.iterdir()} == {"model.onnx", "explain.onnx", "model.pt", "model.json", "SHA256SUMS"}


def test_train_takes_a_calibration_fraction_and_notes_a_wide_false_flag_interval(tiny_csv, tmp_path):
    """--calibration-fraction sets the calibration split; with no --alpha-tolerance, a split too small
    for one deployment's false-flag rate to stay within alpha +- 1.5 pp is noted on stderr (the
    artifact is still written); with --alpha-tolerance it is refused with the fraction to use."""
    out = tmp_path / "m" / "1"
    proc = hjmodel("train", str(tiny_csv), "--out", str(out), "--epochs", "5", "--pieces", "2", "--quiet",
                   "--calibration-fraction", "0.3")
    assert proc.returncode == 0, proc.stderr
    spec = _strict(hjmodel("inspect", str(out)).stdout)
    assert spec["provenance"]["n_calibration"] == 36
    assert "note: with 36 conformal calibration rows" in proc.stderr
    assert "at least 902 conformal rows" in proc.stderr and "--alpha-tolerance refuses" in proc.stderr
    proc = hjmodel("train", str(tiny_csv), "--out", str(tmp_path / "r" / "1"), "--epochs", "5", "--quiet",
                   "--alpha-tolerance", "0.015")
    _assert_clean_error(proc, "at least 902 conformal rows")
    assert not (tmp_path / "r").exists()
    proc = hjmodel("train", str(tiny_csv), "--out", str(tmp_path / "b" / "1"), "--calibration-fraction", "0")
    _assert_clean_error(proc, "calibration_fraction must be in (0, 1)")


def test_inspect(trained, capsys):
    out, _ = trained
    proc = hjmodel("inspect", str(out))
    assert proc.returncode == 0, proc.stderr
    spec = _strict(proc.stdout)
    assert spec["format"] == "hjmodel/1" and spec["kind"] == "lse" and spec["task"] == "classification"
    assert spec["class_names"] == ["x", "y", "z"] and spec["n_features"] == 4
    assert spec["provenance"]["train_config"]["epochs"] == 20
    # the ONNX file carries the same spec (in-process: same entry point)
    assert main(["inspect", str(out / "model.onnx")]) == 0
    assert _strict(capsys.readouterr().out) == spec


def test_verify(trained):
    out, _ = trained
    proc = hjmodel("verify", str(out), "--n", "32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = _strict(proc.stdout)
    assert report["ok"] and report["onnx_parity_ok"] and report["theorem_4_1_ok"] and report["n"] == 32


def test_diagnose_rows_and_stdin(trained, tmp_path, capsys):
    out, _ = trained
    rows = [[3.0, 0.0, 0.0, 0.0], [0.1, -0.2, 2.9, 0.3]]
    proc = hjmodel("diagnose", str(out), "--input", json.dumps(rows), "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    result = _strict(proc.stdout)
    assert isinstance(result, list) and len(result) == 2
    assert [r["prediction"] for r in result] == ["x", "z"]
    for r in result:
        assert r["certified_radius"] > 0 and len(r["attribution"]) == 3
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert set(r) >= {"energy_gap", "ood", "hallucination", "feature_attribution", "hj"}
        assert len(r["feature_attribution"]["integrated_gradients"]) == 4
    # one row from stdin -> one object; a .npy file -> the same numbers
    proc = hjmodel("diagnose", str(out), "--input", "-", stdin=json.dumps(rows[0]))
    assert proc.returncode == 0, proc.stderr
    single = _strict(proc.stdout)
    assert isinstance(single, dict) and single["prediction"] == "x"
    np.save(tmp_path / "x.npy", np.array(rows))
    assert main(["diagnose", str(out), "--input", str(tmp_path / "x.npy"), "--top-k", "3"]) == 0
    assert _strict(capsys.readouterr().out) == result


ERRORS = [
    (("train", "no_such_data.csv", "--out", "/tmp/never"), "no dataset 'no_such_data.csv'"),
    (("inspect", "/nonexistent/artifact"), "no such file"),
    (("diagnose", "{out}", "--input", "[[1, 2]]"), "input must have shape (n, 4), got (1, 2)"),
    (("diagnose", "{out}", "--input", "[[1, 2"), "cannot read --input"),
    (("diagnose", "{out}", "--input", "[[NaN, 1, 2, 3]]"), "input contains NaN or Inf"),
    (("diagnose", "{out}", "--input", "[[\"a\", 1, 2, 3]]"), "could not convert string to float"),
    (("diagnose", "{out}", "--input", "missing.json"), "no such file 'missing.json'"),
    # a classifier's radius reads no tolerance: --tau was accepted and dropped unread on 42f69ae
    (("diagnose", "{out}", "--input", "[[1, 2, 3, 4]]", "--tau", "0.2"), "tau is a regression model's"),
    # settings no model has a meaning for: on 00333c1 an eps or t <= 0 trained every epoch and wrote an
    # artifact (eps < 0 is a soft minimum: its radii were crossed on every row tried), or failed after
    # training with a traceback; a negative epoch count trained nothing and said nothing
    (("train", "iris", "--out", "/tmp/never", "--eps", "-1"), "eps must be a finite number > 0, got -1.0"),
    (("train", "iris", "--out", "/tmp/never", "--eps", "0"), "eps must be a finite number > 0, got 0.0"),
    (("train", "iris", "--out", "/tmp/never", "--t", "nan"), "t must be a finite number > 0, got nan"),
    (("train", "iris", "--out", "/tmp/never", "--lr", "inf"), "lr must be a finite number > 0, got inf"),
    (("train", "iris", "--out", "/tmp/never", "--anneal", "-2"), "anneal must be a finite number > 0, got -2.0"),
    (("train", "iris", "--out", "/tmp/never", "--epochs", "-1"), "epochs must be an integer >= 0, got -1"),
    (("train", "iris", "--out", "/tmp/never", "--pieces", "0"), "pieces must be an integer >= 1, got 0"),
    (("train", "iris", "--out", "/tmp/never", "--kind", "deep", "--hidden", "8", "0"),
     "hidden must list integers >= 1 (units per body layer), got [8, 0]"),
    (("train", "iris", "--out", "/tmp/never", "--kind", "memory", "--memory-size", "0"),
     "memory_size must be an integer >= 1, got 0"),
    # a learning rate that makes the weights overflow: a traceback on 3dc841e
    (("train", "iris", "--out", "/tmp/never", "--kind", "deep", "--epochs", "3", "--lr", "1e300", "--quiet"),
     "): a smaller lr than 1e+300 may train"),
]


def test_errors_exit_nonzero_with_message_subprocess(trained):
    """Two of the error cases end to end (exit status and stderr of the real process)."""
    out, _ = trained
    _assert_clean_error(hjmodel("diagnose", str(out), "--input", "[[1, 2]]"), "input must have shape (n, 4)")
    broken = out.parent / "broken"
    broken.mkdir(exist_ok=True)
    for name in ("model.json", "model.onnx"):
        (broken / name).write_bytes((out / name).read_bytes())
    (broken / "model.pt").write_bytes(b"not a zip")
    _assert_clean_error(hjmodel("verify", str(broken)), "model.pt is corrupt, truncated or unsafe")


@pytest.mark.parametrize("args, pattern", ERRORS)
def test_errors_exit_nonzero_with_message(args, pattern, trained, capsys):
    """Every error case through the same ``main`` in-process (a subprocess each would cost ~3 s of
    torch import): exit status 2 and a one-line ``error: ...`` on stderr."""
    out, _ = trained
    assert main([a.format(out=out) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert pattern in captured.err, captured.err


def test_diagnose_reads_a_long_json_row_inline(demo_repository, capsys):
    """A JSON array is read as one, never tried as a file name first: on 00333c1 any row longer than
    a file name may be (255 bytes: one digit of 64 pixels) failed with "File name too long"."""
    from sklearn.datasets import load_digits

    row = load_digits().data[0].tolist()
    assert len(json.dumps(row)) > 255
    assert main(["diagnose", str(demo_repository / "digits_lse" / "1"), "--input", json.dumps(row)]) == 0
    assert _strict(capsys.readouterr().out)["prediction"] == "0"


def test_diagnose_reads_tau_on_a_regression_model_only(demo_repository, capsys):
    """--tau sets a regression model's certificate tolerance (a larger one, a larger radius) and must
    be a finite number > 0; a classifier refuses it (ERRORS above)."""
    from sklearn.datasets import load_diabetes

    artifact, row = str(demo_repository / "diabetes_lse" / "1"), json.dumps(load_diabetes().data[0].tolist())
    radii = []
    for tau in ("5", "20"):
        assert main(["diagnose", artifact, "--input", row, "--tau", tau]) == 0
        radii.append(_strict(capsys.readouterr().out)["certified_radius"])
    assert 0 < radii[0] < radii[1], radii
    for bad in ("-1", "0", "nan", "inf"):
        assert main(["diagnose", artifact, "--input", row, "--tau", bad]) == 2
        assert "tau must be a finite number > 0" in capsys.readouterr().err


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "x.csv", "--kind", "transformer", "--out", "o"])
    assert info.value.code == 2 and "invalid choice: 'transformer'" in capsys.readouterr().err
    # counts below one: a traceback from deep in torch on 00333c1 (--top-k -3, --n 0 and -5)
    for args in (["diagnose", "a", "--input", "[[1]]", "--top-k", "-3"], ["diagnose", "a", "--input", "[[1]]", "--top-k", "0"],
                 ["verify", "a", "--n", "0"], ["verify", "a", "--n", "-5"], ["verify", "a", "--n", "two"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2 and f"argument {args[-2]}: must be an integer >= 1, got '{args[-1]}'" in \
            capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err


def test_an_empty_path_argument_is_refused(tmp_path, monkeypatch, capsys):
    """pathlib reads "" as the working directory: on 9fa040c ``rebuild A --out ""`` wrote an artifact
    into it, among whatever files were there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    for args in (["rebuild", "models/m/1", "--out", ""], ["rebuild", " ", "--out", "o"], ["inspect", ""],
                 ["verify", ""], ["diagnose", "", "--input", "[[1]]"], ["demo", "--out", ""],
                 ["export", "--state", "", "--calibration", "c.npz", "--out", "o"],
                 ["import-onnx", "m.onnx", "--calibration", "", "--out", "o"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2 and "an empty path (it would mean the working directory)" in \
            capsys.readouterr().err, args
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_import_pulls_in_no_web_framework():
    code = ("import sys, json, hjmodel, hjmodel.cli, hjmodel.verify, hjmodel.demo, hjmodel.functional\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert "hjmodel" in loaded and "torch" in loaded
    for web in ("fastapi", "starlette", "uvicorn", "service", "prometheus_client", "pydantic_settings", "httpx"):
        assert web not in loaded, f"import hjmodel imported {web}"
