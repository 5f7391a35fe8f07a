"""Training time of this tree against an earlier revision's, side by side on the same data. Writes
``bench/results/ab_training.md``.

Each training runs in its own process (one thread), with ``hjmodel`` imported from this tree or from
the earlier revision (``git archive`` into a temporary directory), on the data and settings of
``bench/scaling_bench.py`` (synthetic 10-class rows, 80 / 10 / 10 split, memory heads keep every
training row as a support point, two epochs or ``--min-steps`` optimiser steps). The two sides
alternate for ``--repeats`` rounds (one round where a training takes over ten minutes) and the
medians are reported, with the time split into the optimiser's steps (``_fit``) and the calibration
(``calibrate``: every training row's decided class, the reference measure, the conformal
statistics). Both sides train the same model up to rounding: the report gives the largest
difference between their trained biases and between their conformal statistics, and both
accuracies.

Usage: ``python bench/ab_training.py --base REV [--kinds memory] [--sizes 5000,20000] [--dims 64,784]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "ab_training.md"


def child(tree: str, kind: str, N: int, d: int, min_steps: int, save: str) -> None:
    """Train one configuration with ``tree``'s hjmodel; print its times as JSON, save its weights."""
    sys.path[:0] = [tree, str(ROOT)]
    import importlib
    import math
    import warnings

    import torch

    train_module = importlib.import_module("hjmodel.train")   # (hjmodel.train, the attribute, is the function)
    from bench import report
    from bench.scaling_bench import synthetic
    from hjmodel import TrainConfig, train

    assert Path(train_module.__file__).resolve().is_relative_to(Path(tree).resolve())
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    spent = {"fit": 0.0, "calibrate": 0.0}
    train_module._fit = report.timed(spent, "fit", train_module._fit)
    train_module.calibrate = report.timed(spent, "calibrate", train_module.calibrate)
    data = synthetic(int(round(N / 0.8)), d)
    epochs = max(2, math.ceil(min_steps / math.ceil(N / TrainConfig().batch_size)))
    cfg = TrainConfig(kind=kind, epochs=epochs, memory_size=N, test_fraction=0.1, calibration_fraction=0.1,
                      progress=False)
    t = time.perf_counter()
    model, report = train(data, cfg)
    total = time.perf_counter() - t
    torch.save({"b": model.head.b.detach(), "combined": model.reference.combined}, save)
    print(json.dumps({"train_s": total, **spent, "accuracy": report.metrics["accuracy"]}))


def _run(tree: Path, kind: str, N: int, d: int, min_steps: int, save: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(tree), kind, str(N), str(d), str(min_steps),
                          str(save)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        tree, kind, N, d, steps, save = sys.argv[2:8]
        child(tree, kind, int(N), int(d), int(steps), save)
        return 0
    sys.path.insert(0, str(ROOT))
    import torch

    from bench import report
    from service.settings import split_names

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the git revision to compare with")
    ap.add_argument("--kinds", default="memory")
    ap.add_argument("--sizes", default="5000,20000")
    ap.add_argument("--dims", default="64,784")
    ap.add_argument("--min-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    head, base_rev = report.revision(), report.revision(args.base)
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.base, "hjmodel"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        sides = {"base": base, "this": ROOT}
        for kind in split_names(args.kinds):
            for d in map(int, split_names(args.dims)):
                for N in map(int, split_names(args.sizes)):
                    runs: dict[str, list[dict]] = {key: [] for key in sides}
                    for r in range(args.repeats):
                        for key, tree in sides.items():
                            runs[key].append(_run(tree, kind, N, d, args.min_steps, Path(tmp) / f"{key}.pt"))
                        if r == 0 and runs["base"][0]["train_s"] > 600:
                            break
                    saved = {key: torch.load(Path(tmp) / f"{key}.pt") for key in sides}
                    diff = {name: float((saved["base"][name] - saved["this"][name]).abs().max())
                            for name in ("b", "combined")}
                    med = {key: {m: statistics.median(x[m] for x in runs[key]) for m in ("train_s", "fit", "calibrate")}
                           for key in sides}
                    rows.append((kind, N, d, med, diff, runs["base"][0]["accuracy"], runs["this"][0]["accuracy"],
                                 len(runs["this"])))
                    print(rows[-1], flush=True)
    report.write(args.out, "Training time, side by side with an earlier revision",
                 f"python bench/ab_training.py --base {args.base} --kinds {args.kinds} --sizes {args.sizes} "
                 f"--dims {args.dims}", start,
                 f"torch {torch.__version__}, one thread, each training in its own process; this tree at {head}, "
                 f"base {base_rev}; what is timed and compared: the module docstring.",
                 ("kind", "N", "d", "base train s (fit + calibrate)", "this tree train s (fit + calibrate)",
                  "this / base: train", "fit", "calibrate", "largest difference of the trained biases",
                  "largest conformal statistic difference", "accuracy base / this", "rounds"),
                 ((kind, str(N), str(d),
                   f"{m['base']['train_s']:.1f} ({m['base']['fit']:.1f} + {m['base']['calibrate']:.1f})",
                   f"{m['this']['train_s']:.1f} ({m['this']['fit']:.1f} + {m['this']['calibrate']:.1f})",
                   f"{m['this']['train_s'] / m['base']['train_s']:.2f}x", f"{m['this']['fit'] / m['base']['fit']:.2f}x",
                   f"{m['this']['calibrate'] / m['base']['calibrate']:.2f}x", f"{diff['b']:.1e}",
                   f"{diff['combined']:.1e}", f"{acc_b:.4f} / {acc_t:.4f}", str(k))
                  for kind, N, d, m, diff, acc_b, acc_t, k in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
