"""Where the served graph spends its time, by the hjmodel code that wrote each node.

    python bench/graph_profile.py [--models models] [--runs 200]
        -> bench/results/graph_profile.md

Each demo model's serving graph is exported by ``hjmodel.artifact.export_onnx`` exactly as
``make models`` does, except that the tracing exporter is asked for its source locations (its
``verbose`` flag, which stores every node's Python stack in the node's ``doc_string``; onnxruntime
ignores it, the graph is otherwise the one served). The graph runs in the served session
(``hjmodel.serving.open_session``, one thread) with onnxruntime's profiler on, every output
fetched, on the model's own data set: a batch of one (the next row each call) and a batch of 256.
Every node's kernel time is charged to the step of ``HJModel.evaluate`` that created it (the function
evaluate called, or evaluate's own line) and, separately, to the innermost hjmodel function.

The profiler's per-node overhead inflates small nodes, so the shares are what to read (at batch 1
the node count is most of the cost: every node pays the runtime's fixed overhead). Nodes inside an
If that did not run cost nothing and are not counted; the If itself is.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import io
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hjmodel import load_dataset, load_model  # noqa: E402
from hjmodel.serving import onnx_feeds, session_options  # noqa: E402

OUT = ROOT / "bench" / "results" / "graph_profile.md"
MODELS = ("digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse", "diabetes_lse")
FRAME = re.compile(r"hjmodel/(\w+)\.py\((\d+)\): (\w+)")


@contextlib.contextmanager
def _with_source_locations():
    """torch.onnx.export with ``verbose=True`` (its printout discarded)."""
    import torch

    export = torch.onnx.export

    def verbose_export(*args, **kwargs):
        sys.stdout.flush()
        saved = os.dup(1)                       # the graph printout comes from C++: silence fd 1
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()):
                os.dup2(null.fileno(), 1)
                return export(*args, **{**kwargs, "verbose": True})
        finally:
            os.dup2(saved, 1)
            os.close(saved)

    torch.onnx.export = verbose_export
    try:
        yield
    finally:
        torch.onnx.export = export


def _origins(path: Path) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """node name -> (the evaluate step, the innermost hjmodel function), subgraphs included; and
    node name -> the If whose branch holds it."""
    import onnx

    origins, parent = {}, {}

    def visit(graph, owner=None):
        for node in graph.node:
            if owner is not None:
                parent[node.name] = owner
            frames = FRAME.findall(node.doc_string)          # innermost first
            inner = f"{frames[0][0]}.{frames[0][2]}" if frames else "(no source: exporter / pass)"
            step = "(outside evaluate)"
            for i, (module, line, func) in enumerate(frames):
                if module == "models" and func == "evaluate":
                    step = (f"evaluate: {frames[i - 1][2]}" if i > 0 else f"evaluate, line {line}")
                    break
            if node.op_type == "If":
                step = inner = f"If ({node.name})"
            origins[node.name] = (step, inner)
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(attr.g, node.name)

    visit(onnx.load(str(path)).graph)
    return origins, parent


def _profile(path: Path, X: np.ndarray, batch: int, runs: int, origins: dict, parent: dict[str, str]) -> dict[str, float]:
    """Per-node mean kernel microseconds per call; an If's own time is what its branch's nodes do
    not account for (the runtime times the If around the branch it runs)."""
    import onnxruntime as ort

    options = session_options(1)
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "ortprof")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = ([onnx_feeds(session, X[i:i + 1], 0.1) for i in range(min(200, len(X)))] if batch == 1
             else [onnx_feeds(session, X[:batch], 0.1)])
    for i in range(runs):
        session.run(None, feeds[i % len(feeds)])
    trace = session.end_profiling()
    events = json.loads(Path(trace).read_text())
    os.remove(trace)
    total: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[_resolve(e["name"][: -len("_kernel_time")], origins)] += e["dur"]
    for name, us in list(total.items()):
        if name in parent:
            total[parent[name]] -= us
    return {k: v / runs for k, v in total.items()}


def _resolve(name: str, origins: dict) -> str:
    """The exported node a profiled node comes from: onnxruntime names a fused node after the first
    node it fused, plus a suffix ("/serving/MatMul_2/MatmulTransposeFusion/")."""
    parts = name.split("/")
    for end in range(len(parts), 0, -1):
        if "/".join(parts[:end]) in origins:
            return "/".join(parts[:end])
    return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    from hjmodel.artifact import export_onnx

    sections = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for name in MODELS:
            version = Path(args.models) / name / "1"
            spec = json.loads((version / "model.json").read_text())
            X = load_dataset(spec["provenance"]["dataset"]).X.astype(np.float32)
            path = Path(tmpdir) / name / "model.onnx"
            with _with_source_locations():
                export_onnx(load_model(version), path)
            origins, parent = _origins(path)
            for batch in (1, 256):
                per_node = _profile(path, X, batch, args.runs if batch == 1 else max(10, args.runs // 10), origins,
                                    parent)
                sections.append(_section(name, batch, per_node, origins))
                print(name, batch, f"{sum(per_node.values()):.0f} us", flush=True)
    _write(sections, args)
    return 0


def _section(name, batch, per_node, origins) -> list[str]:
    whole = sum(per_node.values())
    lines = [f"### {name}, batch {batch}", "",
             f"Profiled kernel time {whole:.0f} us per call over {len(per_node)} nodes that ran.", ""]
    for title, index, limit in (("step of `HJModel.evaluate`", 0, 30), ("innermost hjmodel function", 1, 12)):
        time: dict[str, float] = collections.defaultdict(float)
        count: dict[str, int] = collections.Counter()
        for node, us in per_node.items():
            key = origins.get(node, ("(added by onnxruntime)", "(added by onnxruntime)"))[index]
            time[key] += us
            count[key] += 1
        lines += [f"| {title} | share of time | us per call | nodes |", "|---|---|---|---|"]
        for key, us in sorted(time.items(), key=lambda kv: -kv[1])[:limit]:
            lines.append(f"| {key} | {us / whole:.1%} | {us:.0f} | {count[key]} |")
        lines.append("")
    return lines


def _write(sections, args) -> None:
    import onnxruntime
    import torch

    lines = [
        "# The served graph's time, by the code that wrote it",
        "",
        f"Generated by `python bench/graph_profile.py --runs {args.runs}` on "
        f"{dt.datetime.now().isoformat(timespec='seconds')}; {platform.platform()}, 2 CPUs shared with other "
        f"jobs, Python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}; one thread; how nodes are attributed: the docstring of "
        "`bench/graph_profile.py`. The profiler's own per-node overhead is included, so absolute "
        "microseconds run above `bench/results/hjmodel_bench.md`'s; read the shares.",
        "",
    ]
    for section in sections:
        lines += section
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    raise SystemExit(main())
