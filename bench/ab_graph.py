"""The served graph this tree exports against another export of the same models, side by side.

    python bench/ab_graph.py --base REV [--models models] [--passes 5]
        -> bench/results/ab_graph.md
    python bench/ab_graph.py --wraps [--models models] [--passes 5]
        -> bench/results/ab_graph_wraps.md
    python bench/ab_graph.py --base REV --graph explain [--models models] [--passes 5]
        -> bench/results/ab_graph_explain.md
    (--out PATH: the report elsewhere)

Every demo model's trained artifact (``model.pt``) is exported to ONNX by this tree's
``hjmodel.artifact.export_onnx`` and by a base exporter, each run in a subprocess with this tree's
Python environment, so only the exporter and the graph it writes differ: the weights, the reference
points and the rows are the same.

* ``--base REV``: the base is REV's exporter (checked out into a temporary git worktree).
* ``--wraps``: the bases are this tree's exporter with every gathered search of the graph inside an
  If on "anything gathered", and with none (``artifact._gathered_searches`` overridden): what the
  choice that export makes per model -- which searches are wrapped -- is worth against either
  uniform choice. The outputs are the same by construction, and the table checks it.
* ``--graph explain``: the explanation graph (``explain.onnx``, written by the same export) instead
  of the serving graph, fed the preprocessing mean as its integrated-gradients baseline.

Both graphs run in the served session (``hjmodel.serving.open_session``, one thread), every output
fetched, on the model's own data set: a batch of one (the next row each call, through the first 200
rows) and a batch of 256, alternating between the two graphs ``--passes`` times. Cells are medians of
per-pass milliseconds per call; the ratio is this tree's over the base's. Before timing, the two
graphs' outputs on 512 rows and on the same rows scaled x3 are compared: *outputs* says whether they
are identical, or which differ and by how much.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hjmodel import load_dataset  # noqa: E402
from hjmodel.serving import EXPLAIN_FILE, onnx_feeds, open_session  # noqa: E402

OUT = ROOT / "bench" / "results" / "ab_graph.md"
OUT_WRAPS = ROOT / "bench" / "results" / "ab_graph_wraps.md"
OUT_EXPLAIN = ROOT / "bench" / "results" / "ab_graph_explain.md"
MODELS = ("digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse", "diabetes_lse")
EXPORT = ("import sys; from hjmodel.artifact import load_model, export_onnx; "
          "export_onnx(load_model(sys.argv[1]), sys.argv[2])")


#: export_onnx with every gathered search wrapped in an If (argv[3] "all") or none ("none")
EXPORT_WRAPS = ("import sys; import hjmodel.artifact as A; searches = A._gathered_searches; "
                "A._gathered_searches = lambda m: tuple(sys.argv[3] == 'all' for _ in searches(m)); "
                "A.export_onnx(A.load_model(sys.argv[1]), sys.argv[2])")


def export_with(tree: Path, version: Path, target: Path, wraps: str | None = None) -> None:
    """Export ``version``'s trained artifact to ``target`` with the hjmodel of the git tree ``tree``
    (``wraps``: "all" or "none" of its gathered searches in an If, instead of the model's choice)."""
    code, extra = (EXPORT, []) if wraps is None else (EXPORT_WRAPS, [wraps])
    subprocess.run([sys.executable, "-c", code, str(version), str(target), *extra], cwd=tree, check=True,
                   env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True)


def _per_call(run, calls: int) -> float:
    run(0)
    start = time.perf_counter()
    for i in range(calls):
        run(i)
    return (time.perf_counter() - start) / calls * 1e3


def _compare(sessions: dict[str, object], X: np.ndarray, baseline: np.ndarray | None = None) -> str:
    """'identical', or the outputs that differ and their largest difference."""
    differ = []
    for x in (X, 3.0 * X):
        outs = [s.run(None, onnx_feeds(s, x, 0.1, baseline)) for s in sessions.values()]
        names = [o.name for o in next(iter(sessions.values())).get_outputs()]
        for name, a, b in zip(names, *outs, strict=True):
            if not np.array_equal(a, b, equal_nan=True):
                gap = float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                differ.append(f"{name} (max |diff| {gap:.3g})")
    return "identical" if not differ else ", ".join(sorted(set(differ)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", help="the git revision whose exporter to compare with")
    which.add_argument("--wraps", action="store_true", help="compare with every / no gathered search in an If")
    ap.add_argument("--graph", choices=("serving", "explain"), default="serving",
                    help="the serving graph (model.onnx) or the explanation graph (explain.onnx)")
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--out", help="the report's path (default: by mode, the module docstring)")
    args = ap.parse_args()

    def rev(r: str) -> str:
        return subprocess.run(["git", "rev-parse", "--short", r], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()

    dirty = bool(subprocess.run(["git", "status", "--porcelain", "hjmodel"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip())
    this = f"this tree ({rev('HEAD')}{' + changes' if dirty else ''})"
    started = time.time()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if args.wraps:
            bases = {"every search in an If": (ROOT, "all"), "no search in an If": (ROOT, "none")}
            tables = {label: _compare_exports(args, tmp, {label: spec, this: (ROOT, None)})
                      for label, spec in bases.items()}
        else:
            worktree = tmp / "worktree"
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(worktree), args.base], cwd=ROOT,
                           check=True)
            try:
                base = f"base {rev(args.base)}"
                tables = {base: _compare_exports(args, tmp, {base: (worktree, None), this: (ROOT, None)})}
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    _write(tables, this, args, time.time() - started)
    return 0


def _compare_exports(args, tmp: Path, exporters: dict[str, tuple[Path, str | None]]) -> list[tuple]:
    """Every demo model exported by the two ``exporters`` (label -> (tree, wraps)), base first, timed
    side by side. One row per model and batch size."""
    labels = list(exporters)
    rows = []
    explain = args.graph == "explain"
    for name in MODELS:
        version = Path(args.models) / name / "1"
        spec = json.loads((version / "model.json").read_text())
        X = load_dataset(spec["provenance"]["dataset"]).X.astype(np.float32)
        # the explanation graph's baseline: the preprocessing mean (the served default)
        base = np.asarray(spec["input_mean"], dtype=np.float32) if explain else None
        sessions, nodes = {}, {}
        for label, (tree, wraps) in exporters.items():
            target = tmp / "".join(ch if ch.isalnum() else "_" for ch in label) / name / "model.onnx"
            export_with(tree, version, target, wraps)
            graph = target.with_name(EXPLAIN_FILE) if explain else target
            sessions[label], nodes[label] = open_session(graph, threads=1), _nodes(graph)
        outputs = _compare(sessions, X[:512], base)
        feeds1 = {label: [onnx_feeds(s, X[i:i + 1], 0.1, base) for i in range(200)] for label, s in sessions.items()}
        feeds256 = {label: onnx_feeds(s, X[:256], 0.1, base) for label, s in sessions.items()}
        # the explanation graph costs up to a second per 256 rows: fewer calls
        calls1, calls256 = (100, 3) if explain else (400, 20)
        times: dict[tuple[str, int], list[float]] = {}
        for p in range(args.passes):
            for label in (labels if p % 2 == 0 else labels[::-1]):
                s, one, many = sessions[label], feeds1[label], feeds256[label]
                times.setdefault((label, 1), []).append(
                    _per_call(lambda i, s=s, one=one: s.run(None, one[i % 200]), calls1))
                times.setdefault((label, 256), []).append(
                    _per_call(lambda i, s=s, many=many: s.run(None, many), calls256))
        for batch in (1, 256):
            b, t = (statistics.median(times[(label, batch)]) for label in labels)
            rows.append((name, batch, b, t, t / b, nodes[labels[0]], nodes[labels[1]], outputs))
        print(name, rows[-2:], flush=True)
    return rows


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path)).graph.node)


def _write(tables: dict[str, list[tuple]], this: str, args, seconds: float) -> None:
    import onnxruntime
    import torch

    command = ("--wraps" if args.wraps else f"--base {args.base}") + (
        " --graph explain" if args.graph == "explain" else "") + (
        f" --out {args.out}" if args.out else "")
    graph = "The explanation graph" if args.graph == "explain" else "The served graph"
    lines = [
        f"# {graph}: this tree's export against " + ("the same exporter with every / no gathered "
                                                     "search in an If" if args.wraps
                                                     else "an earlier revision's"),
        "",
        f"Generated by `python bench/ab_graph.py {command} --passes {args.passes}` on "
        f"{dt.datetime.now().isoformat(timespec='seconds')} ({seconds:.0f} s); {platform.platform()}, "
        f"2 CPUs shared with other jobs, Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; one thread per session; what is compared and how: the "
        "docstring of `bench/ab_graph.py`.",
        "",
    ]
    for base, rows in tables.items():
        lines += [f"| model | batch | {base} ms | {this} ms | ratio | graph nodes | outputs |",
                  "|---|---|---|---|---|---|---|"]
        for name, batch, b, t, ratio, nb, nt, outputs in rows:
            lines.append(f"| {name} | {batch} | {b:.3f} | {t:.3f} | **{ratio:.2f}x** | {nb} -> {nt} | {outputs} |")
        lines.append("")
    lines += ["*ratio*: this tree's milliseconds per call over the base's (below 1: faster). *graph nodes*: "
              "top-level nodes (a search moved into an If counts as one).", ""]
    out = Path(args.out) if args.out else OUT_WRAPS if args.wraps else OUT_EXPLAIN if args.graph == "explain" else OUT
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
