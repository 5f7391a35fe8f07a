"""The served certificates against an attack far stronger than the suite's, on the inputs where they
are hardest to keep.

    python -m eval.strong_attack [--rows 60] [--restarts 64] [--steps 500]  -> eval/STRONG_ATTACK.md

The suite attacks every served radius with PGD-L2 of 8 restarts x 60-100 steps (``eval.run``,
``eval.served_bits``, the tests). Someone re-measuring the certificates would spend more; this spends
it first, where a violation is most likely to hide. For each demo model (the classifiers, and
``diabetes_lse``, the regressor, at tolerance tau = 10 target units):

1. **Pool**: the input families of :mod:`eval.served_bits` (held-out test rows as they are, x0.3,
   x3, x10 and noisy, ``--pool`` rows each; and its eleven families far from the data, a tenth of
   that each: scales x1e-4 to x1e20, negated, the origin, 10 and 1,000 sds out, one feature,
   constant rows, midpoints), each row's radius as onnxruntime serves it (the float32
   bits of the served graph, run by the service's own backend), attacked at exactly that radius.
2. **Screen**: ``hjmodel.attacks.pgd_l2`` (8 restarts x 100 steps, targeted starts toward the
   runner-up classes) on every pooled row; a row's *fraction of the margin left* is the smallest
   log-probability margin the attack reached over the margin at the input (a regressor: the
   smallest tau - |f(x + delta) - f(x)| over tau): 0 means the attack reached the boundary inside
   the ball without crossing it.
3. **Strong attack** on the ``--rows`` rows of the smallest fraction left (the balls that reach
   nearest to the boundary, where the certificate is nearly exact): two independent PGD-L2
   implementations, each with ``--restarts`` restarts of ``--steps`` steps in float64, at the served
   radius itself (not shrunk): ``hjmodel.attacks.pgd_l2`` (restart 0 at the input, a targeted start
   toward every other class, the rest uniform in the ball, cosine step decay, every violating ray
   shrunk by bisection) and ``eval.attacks.pgd_l2`` (uniform starts, geometric step decay).

A **violation** is a point of the closed ball of the served radius whose float64 decision differs
from the input's (a regressor's: whose output moved by more than tau): every count must be 0. The table also gives how close the attacks came (the largest
fraction of the margin left) and the time spent. The served bits themselves (float32 iterates
classified by the served graph) are attacked in ``eval/SERVED_BITS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from hjmodel import load_dataset, load_model, serving
from hjmodel.attacks import decision_scores, forward_outputs, held_out
from hjmodel.attacks import pgd_l2 as targeted_pgd

from .attacks import pgd_l2 as uniform_pgd
from .certificates import TAU_DIABETES, decision_loss, regression_loss
from .common import machine, md_table
from .served_bits import FAR_ROWS_DIVISOR, FAR_ROWS_MIN, MODELS, families, far_families, open_backend

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: The demo models attacked -> their dataset: every classifier of eval.served_bits and the regressor.
DATASETS = {**MODELS, "diabetes_lse": "diabetes"}

HEADER = ["model", "pooled rows", "attacked rows", "families of the attacked rows", "median served radius",
          "violations (screen)", "violations (targeted PGD)", "violations (uniform PGD)", "smallest fraction of the margin left (screen)",
          "smallest fraction of the margin left (strong)", "median fraction left, attacked rows (screen)",
          "median fraction left, attacked rows (strong)", "strong attack s"]


def served_outputs(version: Path, x32: np.ndarray, tau: float) -> dict[str, np.ndarray]:
    """The outputs onnxruntime serves for the float32 rows ``x32`` (the service's own backend, as
    :func:`eval.served_bits.open_backend` opens it), at tolerance ``tau``."""
    served = open_backend(version, "onnx")
    try:
        return served.infer(x32, np.full(len(x32), tau))
    finally:
        served.close()


def attack_model(name: str, models: Path, pool: int, rows: int, restarts: int, steps: int) -> list:
    """One table row (``HEADER``) for the demo model ``name``. A classifier's ball must keep the
    float64 decision of its input; a regressor's (``diabetes_lse``, tolerance ``TAU_DIABETES``) must
    keep |f(x + delta) - f(x)| <= tau, its margin being tau."""
    version = Path(models) / name / "1"
    model = load_model(version).double().eval()
    model.requires_grad_(False)
    classifier = model.task == "classification"
    data = load_dataset(DATASETS[name])
    X = data.X[held_out(model, data.X)].astype(np.float64)
    scale = np.full(X.shape[1], 2.0) if DATASETS[name] == "digits" else 0.5 * X.std(0)
    rng = np.random.default_rng(0)
    fams = {**families(X, scale, pool, rng), **far_families(X, max(FAR_ROWS_MIN, pool // FAR_ROWS_DIVISOR), rng)}
    labels = np.concatenate([[fam] * len(v) for fam, v in fams.items()])
    x32 = np.concatenate(list(fams.values())).astype(np.float32)
    tau = 0.1 if classifier else TAU_DIABETES
    served = served_outputs(version, x32, tau)
    x = torch.from_numpy(x32).double()
    r = torch.from_numpy(served["certified_radius"].astype(np.float64))
    if classifier:
        target = decision_scores(model, x).argmax(1)   # the float64 decision the ball must keep
        keep = (r > 0) & (target == torch.from_numpy(served["prediction"]).long())
    else:
        with torch.no_grad():
            target = forward_outputs(model, x)         # the float64 value the ball must stay within tau of
        keep = r > 0
    x, r, target, labels = x[keep], r[keep], target[keep], labels[keep.numpy()]
    with torch.no_grad():   # log p_c(x) - max_{k != c} log p_k(x): minus the decision loss at x; a regressor's: tau
        m0 = -decision_loss(model, target)(x) if classifier else torch.full_like(r, tau)
    options = {"task": model.task, "tau": 0.0 if classifier else tau}

    screen_bad, _, screen_val = targeted_pgd(model, x, r, target, restarts=8, steps=100, seed=0, **options)
    screen_left = screen_val / m0
    pick = screen_left.argsort()[:rows]
    xs, rs, ts = x[pick], r[pick], target[pick]

    t0 = time.perf_counter()
    bad_targeted, _, val = targeted_pgd(model, xs, rs, ts, restarts=restarts, steps=steps, seed=1, **options)
    loss = decision_loss(model, ts) if classifier else regression_loss(model, ts[:, 0], tau)
    best_uniform, _ = uniform_pgd(loss, xs, rs, steps=steps, restarts=restarts, seed=2)
    seconds = time.perf_counter() - t0
    left = torch.minimum(val / m0[pick], -best_uniform / m0[pick])
    fam_counts = Counter(labels[pick.numpy()])
    return [name, len(x), len(xs), ", ".join(f"{k} {v}" for k, v in fam_counts.items()),
            float(rs.median()), int(screen_bad.sum()), int(bad_targeted.sum()), int((best_uniform > 0).sum()),
            float(screen_left.min()), float(left.min()), float(screen_left[pick].median()), float(left.median()),
            seconds]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=int, default=200, help="rows per input family (digits_memory: 60%%)")
    ap.add_argument("--rows", type=int, default=60, help="rows per model given the strong attack")
    ap.add_argument("--restarts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--out", default="STRONG_ATTACK.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    serving.flush_subnormals()            # this thread runs the served graph, as the service's would
    start = time.time()
    table = []
    for name in DATASETS:
        pool = int(args.pool * (0.6 if name == "digits_memory" else 1.0))
        table.append(attack_model(name, Path(args.models), pool, args.rows, args.restarts, args.steps))
        print(table[-1], flush=True)
    bad = sum(row[5] + row[6] + row[7] for row in table)
    text = f"""# The served certificates against a strong attack

Generated by `python -m eval.strong_attack --pool {args.pool} --rows {args.rows} --restarts {args.restarts} --steps {args.steps}` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC
({time.time() - start:.0f} s; {machine()}). What is attacked and how:
the module docstring of `eval/strong_attack.py`.

**{bad} violations**: {sum(row[1] for row in table)} pooled rows screened, the {sum(row[2] for row in table)} nearest the
boundary attacked with {args.restarts} restarts x {args.steps} steps by each of two attacks, all at the served
radius itself. A fraction of the margin left near 0 means an attack reached the decision boundary
inside the ball without crossing it: the certificate is exact there to the attack's resolution.

{md_table(HEADER, table)}
"""
    (HERE / args.out).write_text(text)
    print(text)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
