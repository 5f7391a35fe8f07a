"""The torch backend's small calls on TorchScript's static runtime against its interpreter, and both
against onnxruntime: in process, side by side. Writes ``bench/results/ab_static_runtime.md``.

``TracedModule`` runs a serving call of at most ``STATIC_ROWS`` rows on the static runtime
(``hjmodel.artifact._StaticRuntime``: the recorded graph with its tensor constants lifted into
inputs); ``TracedModule(static_rows=0)`` runs every call on the interpreter, as before. Issue 14 asks
the torch backend to stay within 2x of onnxruntime's time; at batch 1 the interpreter's per-operation
cost was what kept it above.

The static side here takes every batch timed (``STATIC_CALL_S`` lifted while it is recorded): the
comparison is of the two runtimes. As served, a model's calls go to the static runtime only up to the
rows it ran within ``STATIC_CALL_S`` at load; the table says how many that was in this run.

For each demo model, every served output, on the model's own dataset rows (batch 1 cycles through 256
of them one row per call; batch 4 and 16 through the dataset in batches): the two recordings and the
served onnxruntime session (one thread, subnormals flushed, as the service runs it) are timed in turn
(``--repeats`` rounds, each call's time the median-of-5 of enough calls to last 0.1 s; medians over
rounds), after checking the two recordings answer the same bits on every row timed.

The price: the static runtime holds Python's lock for its whole call, the interpreter lets go of it.
*a Python thread beside it* is how far a thread that only counts gets while the calls run back to
back, as a share of how far it gets beside ``time.sleep`` calls of the same total length (1.0: it
is not slowed at all) -- what a server's event loop sees while its model's thread computes. Usage:
``python bench/ab_static_runtime.py [--models DIR] [--repeats 7] [--only M ...] [--batches 1 4 16]``.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hjmodel.artifact as artifact  # noqa: E402
from bench import report  # noqa: E402
from hjmodel import load_dataset, serving  # noqa: E402
from hjmodel.artifact import STATIC_ROWS, TracedModule, load_serving_module  # noqa: E402
from hjmodel.demo import DEMOS  # noqa: E402

OUT = ROOT / "bench" / "results" / "ab_static_runtime.md"
BATCHES = (1, 4, STATIC_ROWS)


def beside(call, seconds: float = 0.5) -> float:
    """How far a counting Python thread gets while ``call`` runs back to back for ``seconds``, over how
    far it gets beside sleeps of the same total length."""
    def counted(work) -> int:
        stop, count = threading.Event(), [0]

        def counter():
            while not stop.is_set():
                count[0] += 1
        thread = threading.Thread(target=counter)
        thread.start()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            work()
        stop.set()
        thread.join()
        return count[0]
    return counted(call) / counted(lambda: time.sleep(0.0005))


def bench_model(name: str, directory: Path, repeats: int, batches_of: tuple[int, ...]) -> list[tuple]:
    module = load_serving_module(directory).eval()
    served_rows = TracedModule(module).static_rows
    with artifact.static_call_budget(float("inf")):
        static = TracedModule(module)
    interpreted = TracedModule(module, static_rows=0)
    if static._static is None:
        print(f"{name}: the static runtime is not used (logged why)", flush=True)
        return []
    session = serving.open_session(directory / serving.ONNX_FILE, threads=1, flush_subnormals=True)
    X = load_dataset(DEMOS[name][0]).X.astype(np.float32)
    rows = []
    for n in batches_of:
        count = 256 if n == 1 else len(X) // n
        batches = [X[i * n:(i + 1) * n] for i in range(count)]
        inputs = [(torch.from_numpy(b), torch.full((len(b), 1), 0.1, dtype=torch.float64)) for b in batches]
        feeds = [serving.onnx_feeds(session, b, 0.1) for b in batches]
        for x, tau in inputs:
            for p, q in zip(static(x, tau).values(), interpreted(x, tau).values(), strict=True):
                if not np.array_equal(p.numpy(), q.numpy(), equal_nan=True):
                    raise AssertionError(f"{name}: the two runtimes answered different bits at batch {n}")

        def cycling(fn, items):
            it = itertools.cycle(items)
            return lambda: fn(*next(it))

        calls = {"interpreter": cycling(interpreted, inputs), "static": cycling(static, inputs),
                 "onnxruntime": cycling(lambda f: session.run(None, f), [(f,) for f in feeds])}
        ms = {k: s * 1e3 for k, s in report.alternate(calls, repeats).items()}
        share = (beside(calls["interpreter"]), beside(calls["static"]))
        rows.append((name, n, served_rows, ms["interpreter"], ms["static"], ms["onnxruntime"], *share))
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    args, rows, start = report.demo_bench(__doc__, OUT, 7, BATCHES, bench_model)
    report.write(args.out, "The torch trace's small calls on the static runtime, side by side",
                 f"python bench/ab_static_runtime.py --repeats {args.repeats}", start,
                 f"torch {torch.__version__}, one thread; every served output; the model's own dataset rows; "
                 "what is timed: the module docstring.",
                 ("model", "batch", "rows it takes as served (within 1 ms at load)", "interpreter ms", "static ms", "static / interpreter", "onnxruntime ms",
                  "static / onnxruntime", "interpreter / onnxruntime",
                  "a Python thread beside it: interpreter", "a Python thread beside it: static"),
                 ((model, str(n), str(k), f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}x", f"{o:.3f}", f"{b / o:.2f}x",
                   f"{a / o:.2f}x", f"{p:.2f}", f"{q:.2f}")
                  for model, n, k, a, b, o, p, q in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
