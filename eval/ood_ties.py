"""The OOD gate where inputs repeat: what counting ties up to rounding changes in the served flags.

    python -m eval.ood_ties [--seeds 5] [--rows 2000] [--stream 20000]  -> eval/OOD_TIES.md

The gate's p-value is split-conformal, p = (1 + #{T_cal >= T}) / (1 + n), and its guarantee
P(p <= alpha) <= alpha holds where inputs repeat only because a tie counts against the input. Until
the tie margins (``models.SCORE_TIE_MARGIN``, ``STATISTIC_TIE_MARGIN``; DESIGN section 4), a served
graph, which computes T in other kernels and batch shapes than the build, counted an exact tie
either way. This measures what that did to the flags on an in-distribution stream with atoms.

* The in-distribution law is discrete on purpose: the uniform draw of one of the 1,797 digits rows
  (with its label), so a served input repeats a calibration or training row about as often as a
  deployment fed with known inputs would.
* Per seed and kind, one model is trained on ``--rows`` draws (the trainer's own train / calibration /
  test split) and calibrated twice: as this tree does, and with both margins 0 (as at 8d4cbdb; the
  digits rows are float32 numbers, so the float32 calibration rows change nothing here). Each is
  exported to ONNX and serves one stream of ``--stream`` fresh draws in batches of 64 (as the batch
  endpoint and the dynamic batcher hand them), in a session like the server's.
* Per stream row, the reference is the float64 model's own p-value with its ties counted
  (``hjmodel.verify.tied_p_values``: T in eager torch, a calibration statistic within 2^-44 of
  1 + |T| counted as a tie).

Reported per kind, over the seeds: the rows served below the reference (a tie dropped: the p-value too
small by a rank or more), the flags raised that the reference does not raise, and the false-flag rate
of each graph next to the reference's and the conformal bound floor(alpha (n + 1)) / (n + 1).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from hjmodel import TrainConfig, models, serving, train
from hjmodel.artifact import ONNX_FILE, export_onnx
from hjmodel.data import Dataset
from hjmodel.train import calibrate
from hjmodel.verify import tied_p_values

from .common import machine, md_table, set_threads

HERE = Path(__file__).resolve().parent
KINDS = {"lse": TrainConfig(kind="lse", pieces=8, epochs=60), "memory": TrainConfig(kind="memory"),
         "deep": TrainConfig(kind="deep", hidden=[48], hidden_pieces=4, pieces=4, epochs=30)}
BATCH = 64


@contextlib.contextmanager
def without_tie_margins():
    """The gate as it was before the tie margins: both ranks count exact ties only."""
    saved = models.SCORE_TIE_MARGIN, models._rank_p.__defaults__
    models.SCORE_TIE_MARGIN, models._rank_p.__defaults__ = 0.0, (0.0,)
    try:
        yield
    finally:
        models.SCORE_TIE_MARGIN, models._rank_p.__defaults__ = saved


def served_p(model, X: np.ndarray, directory: Path) -> np.ndarray:
    """The exported graph's ``ood_p_value`` of every row, in batches of BATCH, as the server runs it."""
    export_onnx(model, directory / ONNX_FILE)
    sess = serving.open_session(directory / ONNX_FILE, threads=1, flush_subnormals=True)
    x32 = X.astype(np.float32)
    return np.concatenate([sess.run(["ood_p_value"], serving.onnx_feeds(sess, x32[i:i + BATCH], 0.1))[0]
                           for i in range(0, len(x32), BATCH)]).astype(np.float64)


def one(kind: str, seed: int, rows: int, stream: int, pool_x: np.ndarray, pool_y: np.ndarray) -> dict:
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(pool_x), rows)
    data = Dataset(pool_x[draw], pool_y[draw], "classification", "digits, drawn with repeats",
                   [str(k) for k in range(10)], [])
    cfg = replace(KINDS[kind], seed=seed, progress=False)
    model, report = train(data, cfg)
    X = torch.as_tensor(data.X, dtype=torch.float64)
    tr, ca = report.splits["train"], report.splits["calibration"]
    before = copy.deepcopy(model)
    with without_tie_margins():
        calibrate(before, X[tr], X[ca], cfg)
    test = pool_x[rng.integers(0, len(pool_x), stream)]
    with tempfile.TemporaryDirectory() as tmp:
        now = served_p(model, test, Path(tmp) / "now")
        with without_tie_margins():
            then = served_p(before, test, Path(tmp) / "before")
    ref = tied_p_values(model, test)[0]
    alpha, n = model.reference.alpha, int(model.reference.combined.numel())
    out = {"kind": kind, "seed": seed, "n": n, "alpha": alpha, "rows": stream,
           "bound": np.floor(alpha * (n + 1)) / (n + 1), "ref_rate": float((ref <= alpha).mean())}
    for name, p in (("now", now), ("then", then)):
        out[f"{name}_below"] = int((p < ref).sum())
        out[f"{name}_drop"] = float(np.max(ref - p, initial=0.0))
        out[f"{name}_extra"] = int(((p <= alpha) & (ref > alpha)).sum())
        out[f"{name}_extra_01"] = int(((p <= 0.01) & (ref > 0.01)).sum())
        out[f"{name}_rate"] = float((p <= alpha).mean())
    return out


def report(results: list[dict], args, seconds: float) -> str:
    rows = []
    for kind in dict.fromkeys(r["kind"] for r in results):
        rs = [r for r in results if r["kind"] == kind]
        total = sum(r["rows"] for r in rs)

        def pct(key, rs=rs):
            return f"{100 * np.mean([r[key] for r in rs]):.2f}%"
        for name, label in (("then", "before (margins 0)"), ("now", "with the margins")):
            below = sum(r[f"{name}_below"] for r in rs)
            rows.append([kind, label, len(rs), f"{total:,}", f"{below:,} ({100 * below / total:.1f}%)",
                         f"{max(r[f'{name}_drop'] for r in rs):.4f}", sum(r[f"{name}_extra"] for r in rs),
                         sum(r[f"{name}_extra_01"] for r in rs), pct(f"{name}_rate"), pct("ref_rate"),
                         pct("bound")])
    table = md_table(["kind", "graph", "seeds", "stream rows", "served below the reference",
                      "largest drop", "flags (alpha 0.05) the reference does not raise",
                      "p <= 0.01 where the reference's is not", "false-flag rate", "reference's rate",
                      "conformal bound k/(n+1)"], rows)
    return (f"# The OOD gate where inputs repeat\n\nGenerated by `python -m eval.ood_ties --seeds {args.seeds} "
            f"--rows {args.rows} --stream {args.stream}` in {seconds:.0f} s; {machine()}. What is measured and "
            f"how: the module docstring.\n\n{table}\n\n*served below the reference*: stream rows whose served "
            "p-value is smaller than the float64 model's with its ties counted -- a tie dropped, at either "
            "level, by where the row was batched; *largest drop*: the most any row's p-value was served below "
            "the reference's. *before*: both margins 0, as at 8d4cbdb (calibrated and exported that way); "
            "*with the margins*: this tree. Rates: means over the seeds, each seed one deployment (its own "
            "calibration draw).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--stream", type=int, default=20_000)
    parser.add_argument("--kinds", default="lse,memory,deep")
    parser.add_argument("--out", type=Path, default=HERE / "OOD_TIES.md")
    args = parser.parse_args()
    set_threads()
    digits = load_digits()
    pool_x, pool_y = digits.data.astype(np.float64), digits.target
    t0, results = time.time(), []
    for kind in args.kinds.split(","):
        for seed in range(args.seeds):
            results.append(one(kind, seed, args.rows, args.stream, pool_x, pool_y))
            print(f"[{time.time() - t0:6.0f}s] {results[-1]}", flush=True)
    args.out.write_text(report(results, args, time.time() - t0))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
