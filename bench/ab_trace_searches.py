"""The torch backend's trace with its gathered searches skipped when they gather nothing, against the
trace that runs them on empty tensors, and both against onnxruntime: in process, side by side.
Writes ``bench/results/ab_trace_searches.md``.

The ONNX graph puts the certificate's gathered searches (the IBP radius's, and after a body the
tangent radius's: ``hjmodel.artifact._gathered_searches``) inside an If on "anything gathered"; a
TorchScript trace cannot record a branch, so it ran every search's operations on empty tensors when
nothing was gathered -- a single row, mostly. ``TracedModule`` now puts the same searches inside a
``prim::If`` after recording (``artifact._skip_empty_traced_searches``);
``TracedModule(skip_searches=False)`` is the recording without. Issue 14 asks the torch backend to
stay within 2x of onnxruntime's time.

For each demo model with a wrapped search, every served output, on the model's own dataset rows (the
traffic a deployment sees: most single rows gather nothing, some do): batch 1 cycles through 256 of
them, one row per call; batch 64 and 256 cycle through the dataset in batches. The two recordings and
the served onnxruntime session (one thread, subnormals flushed, as the service runs it) are timed in
turn (``--repeats`` rounds, each call's time the median-of-5 of enough calls to last 0.1 s; medians
over rounds), after checking the two recordings answer the same bits on every row timed. Also the
aten calls one call makes on the dataset's first row (``TracedModule.calls_made``).

``--device cuda`` records and runs the two traces on a GPU (each call synchronised before it is
timed), where every skipped operation is a kernel launch; onnxruntime stays the served CPU session,
the column to read beside them. ``--only`` / ``--batches`` narrow the run (a check before a lease:
``--device cpu --only digits_lse --batches 1 --repeats 1``). Usage:
``python bench/ab_trace_searches.py [--models DIR] [--repeats 7] [--device cpu] [--only M ...] [--batches 1 64 256]``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from hjmodel import load_dataset, serving  # noqa: E402
from hjmodel.artifact import TracedModule, load_serving_module  # noqa: E402
from hjmodel.demo import DEMOS  # noqa: E402

OUT = ROOT / "bench" / "results" / "ab_trace_searches.md"
BATCHES = (1, 64, 256)


def bench_model(name: str, directory: Path, repeats: int, batches_of: tuple[int, ...] = BATCHES,
                device: str = "cpu") -> list[tuple]:
    module = load_serving_module(directory).eval().to(device)
    # both on the interpreter: the static runtime's small calls are ab_static_runtime.py's comparison
    skipped, always = TracedModule(module, static_rows=0), TracedModule(module, skip_searches=False, static_rows=0)
    if not skipped.searches_skipped:
        print(f"{name}: no gathered search to skip", flush=True)
        return []
    session = serving.open_session(directory / serving.ONNX_FILE, threads=1, flush_subnormals=True)
    X = load_dataset(DEMOS[name][0]).X.astype(np.float32)

    def on_device(b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(b).to(device), torch.full((len(b), 1), 0.1, dtype=torch.float64, device=device))

    def synchronised(traced: TracedModule):
        if device == "cpu":
            return traced

        def call(*xs):
            out = traced(*xs)
            torch.cuda.synchronize()
            return out
        return call

    ops = (always.calls_made(*on_device(X[:1])), skipped.calls_made(*on_device(X[:1])))
    rows = []
    for n in batches_of:
        count = 256 if n == 1 else len(X) // n
        batches = [X[i * n:(i + 1) * n] for i in range(count)]
        inputs = [on_device(b) for b in batches]
        feeds = [serving.onnx_feeds(session, b, 0.1) for b in batches]
        for x, tau in inputs:
            for p, q in zip(skipped(x, tau).values(), always(x, tau).values(), strict=True):
                if not np.array_equal(p.cpu().numpy(), q.cpu().numpy(), equal_nan=True):
                    raise AssertionError(f"{name}: the recordings answered different bits at batch {n}")

        def cycling(fn, items):
            it = itertools.cycle(items)
            return lambda: fn(*next(it))

        calls = {"always": cycling(synchronised(always), inputs), "skipped": cycling(synchronised(skipped), inputs),
                 "onnxruntime": cycling(lambda f: session.run(None, f), [(f,) for f in feeds])}
        ms = {k: s * 1e3 for k, s in report.alternate(calls, repeats).items()}
        rows.append((name, n, *ops, ms["always"], ms["skipped"], ms["onnxruntime"]))
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = report.arguments(__doc__, OUT, repeats=7, batches=BATCHES)
    ap.add_argument("--device", default="cpu", help="where the two traces run (cpu, cuda)")
    args = ap.parse_args()
    report.as_served()
    rows, start = report.per_demo(args, lambda name, version: bench_model(name, version, args.repeats,
                                                                    tuple(args.batches), args.device))
    where = "one thread" if args.device == "cpu" else f"the traces on {args.device}, onnxruntime on the CPU"
    report.write(args.out, "The torch trace with its gathered searches skipped when empty, side by side",
                 f"python bench/ab_trace_searches.py --repeats {args.repeats}"
                 + ("" if args.device == "cpu" else f" --device {args.device}"), start,
                 f"torch {torch.__version__}, {where}; every served output; the model's own dataset rows; "
                 "what is timed: the module docstring.",
                 ("model", "batch", "aten calls on one row (profiler, nested included), always -> skipped",
                  "always ms", "skipped ms", "skipped / always", "onnxruntime ms", "skipped / onnxruntime",
                  "always / onnxruntime"),
                 ((model, str(n), f"{before} -> {after}", f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}x", f"{o:.3f}",
                   f"{b / o:.2f}x", f"{a / o:.2f}x")
                  for model, n, before, after, a, b, o in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
