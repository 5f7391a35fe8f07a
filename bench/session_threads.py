"""What onnxruntime's thread settings cost a served graph, in process, side by side. Writes
``bench/results/session_threads.md``.

The service opens every graph with ``HJSERVE_INTRA_OP_THREADS`` intra-op threads (0, the default:
onnxruntime's choice, one per core) that sleep between operators unless ``HJSERVE_INTRA_OP_SPINNING``
is on (onnxruntime's own default is to spin). This times the three configurations an operator
chooses between -- one thread; the default count, spinning; the default count, sleeping -- on the
same graphs, opened as the service opens them (``serving.open_session``, subnormals flushed) and run
on a flushing thread, as the backend's thread runs them: the serving graph and the explanation graph
(what a request with ``diagnostics: true`` runs) at the batcher's batch sizes. Each round times every
configuration in turn (each call's time the median-of-5 of enough calls to last 0.1 s), ``--repeats``
rounds, medians, so a slow spell of this shared machine falls on all three.

In process nothing else wants the cores, which is the case most favourable to more threads and to
spinning; served, the event loop, the other models and co-located clients share them
(``bench/results/ab_server_spinning*.md`` measures that). Usage: ``python bench/session_threads.py
[--models DIR] [--repeats 7]``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from hjmodel import serving  # noqa: E402

OUT = ROOT / "bench" / "results" / "session_threads.md"
MODELS = ("digits_lse", "digits_memory", "digits_deep")
BATCHES = (1, 64)
#: (label, open_session keywords)
CONFIGS = (("one thread", {"threads": 1}), ("default threads, spinning", {"threads": 0, "spinning": True}),
           ("default threads, sleeping", {"threads": 0, "spinning": False}))


def bench_graph(path: Path, repeats: int) -> list[tuple]:
    sessions = {label: serving.open_session(path, flush_subnormals=True, **kw) for label, kw in CONFIGS}
    first = next(iter(sessions.values()))
    n_features = first.get_inputs()[0].shape[1]
    rows = []
    for n in BATCHES:
        x = np.abs(np.random.default_rng(n).standard_normal((n, n_features))).astype(np.float32) * 4
        feeds = {i.name: (x if i.name == "input" else np.zeros_like(x)) for i in first.get_inputs()}
        seconds = report.alternate({label: lambda s=session, f=feeds: s.run(None, f)
                                    for label, session in sessions.items()}, repeats)
        ms = [seconds[label] * 1e3 for label, _ in CONFIGS]
        rows.append((path.parent.parent.name, path.name, n, *ms))
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    args = report.arguments(__doc__, OUT, repeats=7).parse_args()
    serving.flush_subnormals()   # the backend's thread does (service.batching)
    start = time.perf_counter()
    rows = [r for m in MODELS for graph in (serving.ONNX_FILE, serving.EXPLAIN_FILE)
            for r in bench_graph(Path(args.models) / m / "1" / graph, args.repeats)]
    import onnxruntime as ort

    report.write(args.out, "onnxruntime's thread settings on the served graphs, in process",
                 f"python bench/session_threads.py --repeats {args.repeats}", start,
                 f"onnxruntime {ort.__version__}; the default thread count here is onnxruntime's choice for "
                 f"{os.cpu_count()} CPUs; what is timed: the module docstring.",
                 ("model", "graph", "batch", *(f"{label} ms" for label, _ in CONFIGS),
                  "spinning / one thread", "sleeping / one thread", "sleeping / spinning"),
                 ((model, graph, str(n), f"{one:.3f}", f"{spin:.3f}", f"{sleep:.3f}", f"{spin / one:.2f}x",
                   f"{sleep / one:.2f}x", f"{sleep / spin:.2f}x") for model, graph, n, one, spin, sleep in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
