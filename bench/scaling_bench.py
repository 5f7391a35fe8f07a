"""Scaling of training, export, artifacts and serving with the number of training rows N and the input
dimension d, for every kind. Writes ``bench/results/scaling.md``.

    python bench/scaling_bench.py [--sizes 1000,5000,20000,60000] [--dims 64,784] [--kinds lse,memory,deep]
        [--epochs 2] [--min-steps 50] [--keep bench/results/scaling.md]

``--keep`` carries an earlier report's rows into this run (a new row replaces the one of its kind, N
and d), so a slow configuration -- the memory head at N = 60,000 takes 7-20 min -- need not be rerun
with the others; each row names the commit it was measured on.

Data: synthetic, 10 classes, class means drawn N(0, 1) per coordinate, rows = mean + N(0, 1.5^2)
noise; the split is 80 / 10 / 10 so the training split has N rows. The memory kind keeps every
training row as a support point (``memory_size = N``); lse and deep use ``hjmodel train``'s settings.
Training runs ``--epochs`` epochs, or more where N is so small that they would take fewer than
``--min-steps`` optimiser steps (at N = 1,000 two epochs are 16 steps of 128 rows, and the deep kind
stopped at 25% accuracy; a model that has not learned is not the model a user serves, and its
certificate and OOD searches cost otherwise); memory heads train at most 30 epochs (they learn only
their biases). The time per epoch is reported too; the OOD reference measure keeps its default 1,000 points.

Each configuration runs in its own process (its peak RSS is that process's), one thread per runtime,
and measures: training seconds (and per epoch), export seconds (ONNX + torch, both graphs), artifact
size, load seconds (onnxruntime session + torch artifact), served latency at batch 1 and rows/s at
batch 64 through the ONNX graph with every output, and the bare forward (features -> head outputs ->
argmax, exported the same way) at batch 64 as the baseline. The growth exponents are fitted per kind
and d as the slope of log(cost) against log(N); the bare forward is O(N d) for the memory kind (its
head has one neuron per training row) and O(d) for lse and deep (fixed head size).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "results" / "scaling.md"


def synthetic(n_rows: int, d: int, seed: int = 0, classes: int = 10):
    from hjmodel.data import Dataset

    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.0, (classes, d))
    y = rng.integers(0, classes, n_rows)
    X = means[y] + rng.normal(0.0, 1.5, (n_rows, d))
    return Dataset(name=f"synthetic_{n_rows}x{d}", task="classification", X=X, y=y.astype(np.int64),
                   class_names=[str(c) for c in range(classes)], feature_names=[f"x{i}" for i in range(d)])


def build(kind: str, N: int, d: int, epochs: int, min_steps: int, out: Path) -> dict:
    """Train a ``kind`` model on :func:`synthetic` data with ``N`` training rows in ``d`` dimensions
    (``epochs`` epochs, or as many as ``min_steps`` optimiser steps take) and export it, both graphs,
    into the version directory ``out``. Returns the model, the data and what it cost: ``epochs``
    (as trained), ``accuracy``, ``train_s``, ``export_s``, ``artifact_mb``. Callers take it through
    :func:`built`."""
    import math

    from hjmodel import TrainConfig, save_artifact, train

    data = synthetic(int(round(N / 0.8)), d)
    epochs = max(epochs, math.ceil(min_steps / math.ceil(N / TrainConfig().batch_size)))
    cfg = TrainConfig(kind=kind, epochs=epochs, memory_size=N, test_fraction=0.1, calibration_fraction=0.1,
                      progress=False)
    t0 = time.perf_counter()
    model, report = train(data, cfg)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_artifact(model, out, ("onnx", "torch"))
    export_s = time.perf_counter() - t0
    return {"model": model, "data": data, "epochs": min(epochs, 30) if kind == "memory" else epochs,
            "accuracy": report.metrics["accuracy"], "train_s": train_s, "export_s": export_s,
            "artifact_mb": sum(f.stat().st_size for f in out.iterdir()) / 1e6}


@contextlib.contextmanager
def built(kind: str, N: int, d: int, epochs: int = 2, min_steps: int = 50):
    """:func:`build` into a temporary version directory: yields (the version directory, what
    :func:`build` returns); the directory is removed afterwards. The benchmarks that time a freshly
    built model (this script, ``eval/gpu.py``, ``bench/ab_gpu_blocks.py``) build it this way."""
    with tempfile.TemporaryDirectory() as tmp:
        version = Path(tmp) / "m" / "1"
        yield version, build(kind, N, d, epochs, min_steps, version)


def one(kind: str, N: int, d: int, epochs: int, min_steps: int = 0) -> dict:
    """One configuration, in this process (:func:`build`, then the measurements)."""
    import torch

    from bench.hjmodel_bench import PredictOnly, _session, _time
    from hjmodel import load_model
    from hjmodel.artifact import ONNX_FILE
    from hjmodel.serving import onnx_feeds

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with built(kind, N, d, epochs, min_steps) as (out, made):
        model, data = made["model"], made["data"]
        t0 = time.perf_counter()
        sess = _session(out / ONNX_FILE)
        load_model(out)
        load_s = time.perf_counter() - t0
        bare_path = out.parent.parent / "bare.onnx"
        torch.onnx.export(PredictOnly(model), (torch.zeros(2, d),), str(bare_path), input_names=["input"],
                          output_names=["prediction"], dynamic_axes={"input": {0: "batch"}, "prediction": {0: "batch"}},
                          opset_version=17, dynamo=False)
        bare = _session(bare_path)
        X = data.X[:64].astype(np.float32)
        lat1 = _time(lambda: sess.run(None, onnx_feeds(sess, X[:1], 0.1)), min_seconds=0.1, repeats=3)
        lat64 = _time(lambda: sess.run(None, onnx_feeds(sess, X, 0.1)), min_seconds=0.1, repeats=3)
        bare64 = _time(lambda: bare.run(None, {"input": X}), min_seconds=0.1, repeats=3)
    return {"kind": kind, "N": N, "d": d, "revision": _revision(),
            **{k: made[k] for k in ("epochs", "accuracy", "train_s", "export_s", "artifact_mb")}, "load_s": load_s,
            "latency_b1_ms": lat1 * 1e3, "rows_per_s_b64": 64 / lat64, "bare_rows_per_s_b64": 64 / bare64,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


#: The report ends with its rows as JSON lines in this comment, so that ``--keep`` can carry them
#: into a later run at full precision.
_ROWS_BEGIN, _ROWS_END = "<!-- rows (JSON lines, read by --keep)", "-->"
#: A report written before the rows block: its table's columns, in order (the ratio column derived).
_TABLE_KEYS = ("kind", "N", "d", "epochs", "accuracy", "train_s", None, "export_s", "artifact_mb", "load_s",
               "latency_b1_ms", "rows_per_s_b64", "bare_rows_per_s_b64", None, "peak_rss_gb")


def kept_rows(text: str) -> list[dict]:
    """The rows of an earlier run: JSON lines, the rows block of a report, or -- for a report older
    than that block -- its table (at the precision the table shows)."""
    if _ROWS_BEGIN in text:
        text = text.split(_ROWS_BEGIN, 1)[1].split(_ROWS_END, 1)[0]
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    if rows:
        return rows
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) not in (len(_TABLE_KEYS), len(_TABLE_KEYS) + 1) or cells[0] not in ("lse", "memory", "deep"):
            continue
        row: dict = {}
        for key, cell in zip(_TABLE_KEYS, cells):
            if key is not None:
                row[key] = cell if key == "kind" else (int(cell) if key in ("N", "d", "epochs") else float(cell))
        rows.append(row)
    return rows


def _revision() -> str:
    """The commit measured (short hash), marked when hjmodel/ differs from it."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    return head if git("diff", "--quiet", "HEAD", "--", "hjmodel").returncode == 0 else head + "+changes"


def _slope(xs, ys) -> float:
    xs, ys = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(xs, ys, 1)[0]) if len(xs) >= 2 else float("nan")


def report(rows: list[dict], seconds: float, kept: int = 0) -> str:
    kinds = ("lse", "memory", "deep")
    rows = sorted(rows, key=lambda r: (kinds.index(r["kind"]) if r["kind"] in kinds else 9, r["d"], r["N"]))
    L = [f"""# Scaling with N (training rows / support points) and d

Generated by `python bench/scaling_bench.py` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC in
{seconds / 60:.0f} min{f" ({kept} rows kept from earlier runs of this script, `--keep`)" if kept else ""};
{platform.platform()}, {os.cpu_count()} CPUs shared with other jobs, one thread per
runtime, each configuration in its own process; "measured at": the commit each row was measured
on ("an earlier run": a row from before this column). Settings and measurements: the module docstring.

| kind | N | d | epochs | accuracy | train s | train s / epoch | export s | artifact MB | load s | batch 1 ms | rows/s, batch 64 | bare forward rows/s, batch 64 | all diagnostics / bare | peak RSS GB | measured at |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"""]
    for r in rows:
        if "error" in r:
            L.append(f"| {r['kind']} | {r['N']} | {r['d']} | failed: {r['error']} |" + " |" * 11
                     + f" {r.get('revision', 'an earlier run')} |")
            continue
        L.append(f"| {r['kind']} | {r['N']} | {r['d']} | {r['epochs']} | {r['accuracy']:.3f} | {r['train_s']:.1f} | "
                 f"{r['train_s'] / max(r['epochs'], 1):.2f} | {r['export_s']:.1f} | {r['artifact_mb']:.1f} | "
                 f"{r['load_s']:.2f} | {r['latency_b1_ms']:.2f} | {r['rows_per_s_b64']:.0f} | "
                 f"{r['bare_rows_per_s_b64']:.0f} | {r['bare_rows_per_s_b64'] / r['rows_per_s_b64']:.1f}x | "
                 f"{r['peak_rss_gb']:.2f} | {r.get('revision', 'an earlier run')} |")
    L += ["", "**Growth exponents** (slope of log cost against log N, per kind and d; the bare forward's own "
          "exponent is the O(N d) reference: ~1 for memory, ~0 for lse and deep):", "",
          "| kind | d | train s / epoch | artifact MB | batch-64 s per row, all diagnostics | same, bare forward | peak RSS |",
          "|---|---|---|---|---|---|---|"]
    ok = [r for r in rows if "error" not in r]
    for kind in dict.fromkeys(r["kind"] for r in ok):
        for d in sorted({r["d"] for r in ok if r["kind"] == kind}):
            rs = sorted((r for r in ok if r["kind"] == kind and r["d"] == d), key=lambda r: r["N"])
            N = [r["N"] for r in rs]
            L.append(f"| {kind} | {d} | {_slope(N, [r['train_s'] / max(r['epochs'], 1) for r in rs]):.2f} | "
                     f"{_slope(N, [r['artifact_mb'] for r in rs]):.2f} | {_slope(N, [1 / r['rows_per_s_b64'] for r in rs]):.2f} | "
                     f"{_slope(N, [1 / r['bare_rows_per_s_b64'] for r in rs]):.2f} | {_slope(N, [r['peak_rss_gb'] for r in rs]):.2f} |")
    L += ["", _ROWS_BEGIN, *(json.dumps(r, sort_keys=True) for r in rows), _ROWS_END]
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,5000,20000,60000")
    ap.add_argument("--dims", default="64,784")
    ap.add_argument("--kinds", default="lse,memory,deep")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--min-steps", type=int, default=50, help="at least this many optimiser steps (more epochs "
                                                                 "where N is small)")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "N", "D"), help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    ap.add_argument("--keep", help="earlier rows to report with the new ones: a report this script wrote (e.g. "
                                   "bench/results/scaling.md) or JSON lines of its rows; a new row replaces an "
                                   "earlier one of the same kind, N and d")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]), args.epochs, args.min_steps)))
        return 0
    t0, rows = time.time(), []
    if args.keep:
        rows = kept_rows(Path(args.keep).read_text())
    kept = len(rows)
    for kind in args.kinds.split(","):
        for d in map(int, args.dims.split(",")):
            for N in map(int, args.sizes.split(",")):
                cmd = [sys.executable, __file__, "--one", kind, str(N), str(d), "--epochs", str(args.epochs),
                       "--min-steps", str(args.min_steps)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
                    row = json.loads(last) if proc.returncode == 0 else {
                        "kind": kind, "N": N, "d": d, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]}
                except subprocess.TimeoutExpired:
                    row = {"kind": kind, "N": N, "d": d, "error": f"over {args.timeout:.0f} s"}
                before = len(rows)
                rows = [r for r in rows if (r["kind"], r["N"], r["d"]) != (kind, N, d)] + [row]
                kept -= before + 1 - len(rows)
                print(json.dumps(row), flush=True)
                OUT.write_text(report(rows, time.time() - t0, kept))
    print(OUT.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
