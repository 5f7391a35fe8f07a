"""The torch backend's trace with its weight-only operations folded at load, against the trace that
runs them per call, and both against onnxruntime: in process, side by side. Writes
``bench/results/ab_trace.md``.

``hjmodel.artifact.TracedModule`` records the weights as graph constants and does the operations that
read them alone once, when the model loads (``_fold_constants``: TorchScript's constant propagation,
bit for bit the values the graph would compute per call) and skips a gathered search that gathered
nothing (``_skip_empty_traced_searches``; measured alone by ``bench/ab_trace_searches.py``);
``TracedModule(fold=False)`` records the module as it is, its weights read as attributes and every
operation run per call -- the recording before either. Issue 14 asks the torch backend to stay within
2x of onnxruntime's time.

The folded recording is also timed called under ``torch.no_grad()`` instead of the inference mode
``TracedModule`` runs it in (the service's torch backend entered inference mode already; the offline
``Predictor`` and scripts called the trace under ``no_grad``, which still passes every operation
through autograd's dispatch), after checking the two modes answer the same bits.

For each demo model and batch size: every served output, the two recordings and the served
onnxruntime session (one thread, subnormals flushed, as the service runs it), timed in turn
(``--repeats`` rounds, each call's time the median-of-5 of enough calls to last 0.1 s; medians over
rounds), so a slow spell of this shared machine falls on all three. Also the operations each
recording runs (graph nodes other than constants). Usage: ``python bench/ab_trace.py [--models DIR]
[--repeats 9]``.
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

OUT = ROOT / "bench" / "results" / "ab_trace.md"
MODELS = ("digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse", "diabetes_lse")
BATCHES = (1, 64, 256)


def _operations(traced: TracedModule) -> int:
    """The recording's operations other than constants, those inside its branches included."""
    return sum(kind != "prim::Constant" for kind in traced.operations())


def bench_model(directory: Path, repeats: int) -> list[tuple]:
    module = load_serving_module(directory).eval()
    # both on the interpreter: the static runtime's small calls are ab_static_runtime.py's comparison
    folded, unfolded = TracedModule(module, static_rows=0), TracedModule(module, fold=False, static_rows=0)
    session = serving.open_session(directory / serving.ONNX_FILE, threads=1, flush_subnormals=True)
    ops = (_operations(unfolded), _operations(folded))
    rows = []
    for n in BATCHES:
        x = np.abs(np.random.default_rng(n).standard_normal((n, module.model.n_features))).astype(np.float32) * 4
        feeds = serving.onnx_feeds(session, x, 0.1)
        xt, tt = torch.from_numpy(x), torch.full((n, 1), 0.1, dtype=torch.float64)
        if len(folded.blocks(n)) != 1:   # the baseline below calls the graph on the batch whole
            raise AssertionError(f"{directory}: batch {n} runs in row blocks; the no_grad column would differ")

        def no_grad(a=xt, t=tt):   # the folded graph as a caller under no_grad ran it before
            with torch.no_grad(), torch.jit.optimized_execution(False):
                return folded.graph(a, t)
        if not all(np.array_equal(p.numpy(), q.numpy(), equal_nan=True)
                   for p, q in zip(no_grad(), folded(xt, tt).values(), strict=True)):
            raise AssertionError(f"{directory}: no_grad and inference mode answered different bits at batch {n}")
        calls = {"unfolded": lambda a=xt, t=tt: unfolded(a, t), "folded": lambda a=xt, t=tt: folded(a, t),
                 "folded, no_grad": no_grad, "onnxruntime": lambda f=feeds: session.run(None, f)}
        ms = {k: s * 1e3 for k, s in report.alternate(calls, repeats).items()}
        rows.append((directory.parent.name, n, *ops, ms["unfolded"], ms["folded"], ms["onnxruntime"],
                     ms["folded, no_grad"]))
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    args = report.arguments(__doc__, OUT, repeats=9).parse_args()
    report.as_served()
    start = time.perf_counter()
    rows = [r for m in MODELS for r in bench_model(Path(args.models) / m / "1", args.repeats)]
    report.write(args.out, "The torch trace with its weight-only operations folded at load, side by side",
                 f"python bench/ab_trace.py --repeats {args.repeats}", start,
                 f"torch {torch.__version__}, one thread; every served output; what is timed: the module docstring.",
                 ("model", "batch", "operations, unfolded -> folded", "unfolded ms", "folded ms", "unfolded / folded",
                  "onnxruntime ms", "folded / onnxruntime", "unfolded / onnxruntime", "folded ms, no_grad",
                  "folded: inference mode / no_grad"),
                 ((model, str(n), f"{before} -> {after}", f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}x", f"{o:.3f}",
                   f"{b / o:.2f}x", f"{a / o:.2f}x", f"{g:.3f}", f"{b / g:.2f}x")
                  for model, n, before, after, a, b, o, g in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
