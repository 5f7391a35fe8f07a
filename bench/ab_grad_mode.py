"""The torch trace's graph under ``torch.inference_mode()`` against ``torch.no_grad()``, in process,
side by side. Writes ``bench/results/ab_grad_mode.md``.

``hjmodel.artifact.TracedModule`` runs its graph in inference mode whoever calls it (the service's
torch backend entered it already; the offline ``Predictor`` and scripts called under ``no_grad``).
Both modes compute no gradients, but under ``no_grad`` every operation still passes autograd's
dispatch (version counters, view tracking); inference mode skips it. The graph runs ~900 small
operations at batch 1, so that bookkeeping is a visible part of its time.

For each demo model and batch size: every served output, the recorded graph called in each mode
(``--repeats`` alternating rounds, each the median-of-5 of enough calls to last 0.1 s; medians over
rounds), after checking the two answer the same bits. Usage: ``python bench/ab_grad_mode.py
[--models DIR] [--repeats 9]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from hjmodel import serving  # noqa: E402
from hjmodel.artifact import TracedModule, load_serving_module  # noqa: E402

OUT = ROOT / "bench" / "results" / "ab_grad_mode.md"
MODELS = ("digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse", "diabetes_lse")
BATCHES = (1, 64, 256)


def bench_model(directory: Path, repeats: int) -> list[tuple]:
    traced = TracedModule(load_serving_module(directory).eval())
    rows = []
    for n in BATCHES:
        x = np.abs(np.random.default_rng(n).standard_normal((n, traced.model.n_features))).astype(np.float32) * 4
        xt, tt = torch.from_numpy(x), torch.full((n, 1), 0.1, dtype=torch.float64)

        def call(mode, a=xt, t=tt):
            with mode(), torch.jit.optimized_execution(False):
                return traced.graph(a, t)
        same = all(np.array_equal(p.numpy(), q.numpy(), equal_nan=True)
                   for p, q in zip(call(torch.no_grad), call(torch.inference_mode), strict=True))
        if not same:
            raise AssertionError(f"{directory}: the two modes answered different bits at batch {n}")
        ms = {k: s * 1e3 for k, s in report.alternate(
            {"no_grad": lambda: call(torch.no_grad), "inference_mode": lambda: call(torch.inference_mode)},
            repeats).items()}
        rows.append((directory.parent.name, n, ms["no_grad"], ms["inference_mode"]))
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    args = report.arguments(__doc__, OUT, repeats=9).parse_args()
    torch.set_num_threads(1)
    serving.flush_subnormals()   # the backend's thread does (service.batching)
    start = time.perf_counter()
    rows = [r for m in MODELS for r in bench_model(Path(args.models) / m / "1", args.repeats)]
    report.write(args.out, "The torch trace under inference_mode against no_grad, side by side",
                 f"python bench/ab_grad_mode.py --repeats {args.repeats}", start,
                 f"torch {torch.__version__}, one thread; every served output, the same bits in both modes "
                 "(checked); what is timed: the module docstring.",
                 ("model", "batch", "no_grad ms", "inference_mode ms", "inference_mode / no_grad"),
                 ((model, str(n), f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}x") for model, n, a, b in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
