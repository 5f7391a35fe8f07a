"""The served graph this tree exports against the one an earlier revision exports, side by side.

    python bench/ab_graph.py --base REV [--models models] [--passes 5]
        -> bench/results/ab_graph.md

Every demo model's trained artifact (``model.pt``) is exported to ONNX twice: by this tree's
``hjmodel.artifact.export_onnx`` and by REV's (checked out into a temporary git worktree and run in a
subprocess with this tree's Python environment). So only the exporter and the graph it traces differ:
the weights, the reference points and the rows are the same. Both graphs run in the served session
(``hjmodel.serving.open_session``, one thread), every output fetched, on the model's own data set: a
batch of one (the next row each call, through the first 200 rows) and a batch of 256, alternating
between the two graphs ``--passes`` times. Cells are medians of per-pass milliseconds per call; the
ratio is this tree's over the base's. Before timing, the two graphs' ``certified_radius`` (and every
other output) on 512 rows and on the same rows scaled x3 are compared: *outputs* says whether they
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
from hjmodel.serving import onnx_feeds, open_session  # noqa: E402

OUT = ROOT / "bench" / "results" / "ab_graph.md"
MODELS = ("digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse", "diabetes_lse")
EXPORT = ("import sys; from hjmodel.artifact import load_model, export_onnx; "
          "export_onnx(load_model(sys.argv[1]), sys.argv[2])")


def export_with(tree: Path, version: Path, target: Path) -> None:
    """Export ``version``'s trained artifact to ``target`` with the hjmodel of the git tree ``tree``."""
    subprocess.run([sys.executable, "-c", EXPORT, str(version), str(target)], cwd=tree, check=True,
                   env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True)


def _per_call(run, calls: int) -> float:
    run(0)
    start = time.perf_counter()
    for i in range(calls):
        run(i)
    return (time.perf_counter() - start) / calls * 1e3


def _compare(sessions: dict[str, object], X: np.ndarray) -> str:
    """'identical', or the outputs that differ and their largest difference."""
    differ = []
    for x in (X, 3.0 * X):
        outs = [s.run(None, onnx_feeds(s, x, 0.1)) for s in sessions.values()]
        names = [o.name for o in next(iter(sessions.values())).get_outputs()]
        for name, a, b in zip(names, *outs, strict=True):
            if not np.array_equal(a, b, equal_nan=True):
                gap = float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                differ.append(f"{name} (max |diff| {gap:.3g})")
    return "identical" if not differ else ", ".join(sorted(set(differ)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the git revision to compare with")
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()

    def rev(r: str) -> str:
        return subprocess.run(["git", "rev-parse", "--short", r], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()

    base, head = rev(args.base), rev("HEAD")
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "hjmodel"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip())
    labels = (f"base {base}", f"this tree ({head}{' + changes' if dirty else ''})")
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        worktree = tmp / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(worktree), base], cwd=ROOT, check=True)
        try:
            for name in MODELS:
                version = Path(args.models) / name / "1"
                spec = json.loads((version / "model.json").read_text())
                X = load_dataset(spec["provenance"]["dataset"]).X.astype(np.float32)
                sessions = {}
                for label, tree in zip(labels, (worktree, ROOT), strict=True):
                    target = tmp / label.split()[0] / name / "model.onnx"
                    export_with(tree, version, target)
                    sessions[label] = open_session(target, threads=1)
                outputs = _compare(sessions, X[:512])
                nodes = {label: _nodes(tmp / label.split()[0] / name / "model.onnx") for label in labels}
                feeds1 = {label: [onnx_feeds(s, X[i:i + 1], 0.1) for i in range(200)] for label, s in sessions.items()}
                feeds256 = {label: onnx_feeds(s, X[:256], 0.1) for label, s in sessions.items()}
                times: dict[tuple[str, int], list[float]] = {}
                for p in range(args.passes):
                    for label in (labels if p % 2 == 0 else labels[::-1]):
                        s, one, many = sessions[label], feeds1[label], feeds256[label]
                        times.setdefault((label, 1), []).append(
                            _per_call(lambda i, s=s, one=one: s.run(None, one[i % 200]), 400))
                        times.setdefault((label, 256), []).append(
                            _per_call(lambda i, s=s, many=many: s.run(None, many), 20))
                for batch in (1, 256):
                    b, t = (statistics.median(times[(label, batch)]) for label in labels)
                    rows.append((name, batch, b, t, t / b, nodes[labels[0]], nodes[labels[1]], outputs))
                print(name, rows[-2:], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    _write(rows, labels, args, time.time() - started)
    return 0


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path)).graph.node)


def _write(rows, labels, args, seconds: float) -> None:
    import onnxruntime
    import torch

    lines = [
        "# The served graph: this tree's export against an earlier revision's",
        "",
        f"Generated by `python bench/ab_graph.py --base {args.base} --passes {args.passes}` on "
        f"{dt.datetime.now().isoformat(timespec='seconds')} ({seconds:.0f} s); {platform.platform()}, "
        f"2 CPUs shared with other jobs, Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; one thread per session; what is compared and how: the "
        "docstring of `bench/ab_graph.py`.",
        "",
        f"| model | batch | {labels[0]} ms | {labels[1]} ms | ratio | graph nodes | outputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, batch, b, t, ratio, nb, nt, outputs in rows:
        lines.append(f"| {name} | {batch} | {b:.3f} | {t:.3f} | **{ratio:.2f}x** | {nb} -> {nt} | {outputs} |")
    lines += ["", "*ratio*: this tree's milliseconds per call over the base's (below 1: faster). *graph nodes*: "
              "top-level nodes (a search moved into an If counts as one).", ""]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    raise SystemExit(main())
