"""What a batch that needs fewer outputs saves: the served graph cut down to them against the whole
graph, in process, side by side. Writes ``bench/results/pruned_graphs.md``.

onnxruntime runs every node of a graph whichever outputs are fetched, and the torch backend's trace
records every output, so the service runs, for a batch, a graph of the outputs its requests need
and the outputs the metrics watch (``service.backends.base.OutputGraphs``; settings
``monitored_outputs`` and ``pruned_graphs``). The output sets timed, each with the default
monitored outputs (prediction, the OOD flag, component and score, the hallucination flag, the energy
gap) added, as the service adds them:

* *default outputs*: prediction, probabilities, certified radius, OOD flag (a request naming none);
* *all but the radius*: every serving output except ``certified_radius``;
* *prediction + probabilities*: what MLServer or KServe would return.

For each demo model, batch 1 and 256, onnxruntime with one thread (the served session, subnormals
flushed) and the torch backend's TorchScript trace: milliseconds per call of the whole graph and of
the pruned one, timed alternately (``--repeats`` rounds, each the median-of-5 of enough calls to last
0.1 s; medians over rounds) so machine noise falls on both, and the ratio whole / pruned. The node
count is the ONNX graph's (Constant nodes excluded). Usage: ``python bench/pruned_graphs.py [--models
DIR] [--repeats 5]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from hjmodel import serving  # noqa: E402
from hjmodel.artifact import ServingModule, TracedModule, load_serving_module, prune_graph  # noqa: E402
from service.settings import Settings, split_names  # noqa: E402

OUT = ROOT / "bench" / "results" / "pruned_graphs.md"
MODELS = ("digits_lse", "digits_memory", "digits_deep", "diabetes_lse")
BATCHES = (1, 256)


def _nodes(graph: bytes) -> int:
    return sum(1 for n in onnx.load_from_string(graph).graph.node if n.op_type != "Constant")


def output_sets(task: str) -> dict[str, tuple[str, ...]]:
    """The timed output sets (contract order), each with the default monitored outputs added."""
    names = serving.output_names(task)
    monitored = set(split_names(Settings.model_fields["monitored_outputs"].default))
    sets = {"default outputs": set(serving.DEFAULT_OUTPUTS),
            "all but the radius": set(names) - {"certified_radius"},
            "prediction + probabilities": {"prediction", "probabilities"}}
    return {label: tuple(n for n in names if n in wanted | monitored) for label, wanted in sets.items()}


def bench_model(directory: Path, repeats: int) -> list[tuple]:
    graph = (directory / serving.ONNX_FILE).read_bytes()
    module = load_serving_module(directory).eval()
    task, d = module.model.task, module.model.n_features
    whole_session = serving.open_session(graph, threads=1, flush_subnormals=True)
    whole_trace = TracedModule(module)
    names = list(serving.output_names(task))
    rows = []
    for label, subset in output_sets(task).items():
        cut = prune_graph(graph, subset)
        session = serving.open_session(cut, threads=1, flush_subnormals=True)
        trace = TracedModule(ServingModule(module.model, subset))
        for n in BATCHES:
            x = np.abs(np.random.default_rng(n).standard_normal((n, d))).astype(np.float32) * 4
            feeds = serving.onnx_feeds(whole_session, x, 0.1)
            xt, tt = torch.from_numpy(x), torch.full((n, 1), 0.1, dtype=torch.float64)
            calls = {"onnxruntime": (lambda f=feeds: whole_session.run(names, f),
                                     lambda s=session, k=list(subset), f=feeds: s.run(k, f)),
                     "torch trace": (lambda a=xt, t=tt: whole_trace(a, t), lambda m=trace, a=xt, t=tt: m(a, t))}
            for backend, (whole, pruned) in calls.items():
                with torch.inference_mode():
                    seconds = report.alternate({"whole": whole, "pruned": pruned}, repeats)
                a, b = seconds["whole"] * 1e3, seconds["pruned"] * 1e3
                rows.append((directory.parent.name, label, len(subset), _nodes(cut), _nodes(graph), n, backend, a, b))
                print(rows[-1], flush=True)
    return rows


def main() -> int:
    args = report.arguments(__doc__, OUT, repeats=5).parse_args()
    report.as_served()
    start = time.perf_counter()
    rows = [r for m in MODELS for r in bench_model(Path(args.models) / m / "1", args.repeats)]
    report.write(args.out, "A graph of only the outputs a batch needs, against the whole graph",
                 f"python bench/pruned_graphs.py --repeats {args.repeats}", start,
                 f"torch {torch.__version__}, one thread; what is timed: the module docstring. Every output set "
                 "includes the default monitored outputs (prediction, ood_flag, ood_component, ood_score, "
                 "hallucination_flag, energy_gap).",
                 ("model", "outputs", "n outputs", "ONNX nodes (of the whole graph's)", "batch", "backend",
                  "whole graph ms", "pruned graph ms", "whole / pruned"),
                 ((model, label, str(k), f"{kept} ({total})", str(n), backend, f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}x")
                  for model, label, k, kept, total, n, backend, a, b in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
