"""What the served radius's rounding allowances cost: the served graph against the same graph without
them, in process, side by side. Writes ``bench/results/ab_served_allowances.md``.

The serving module certifies its radius for what a client sent, not only for the float32 row the
graph reads (:func:`hjmodel.functional.input_rounding_radius`: a norm of the row and a few scalar
operations), and a regression radius for its outputs as served (:func:`hjmodel.functional.
float32_output_tolerance`, before the certificate). Both graphs here are exported by the artifact's
own exporter (``artifact._export``, with its pass that skips empty searches) from the demo model: the
served module, and one whose ``forward`` leaves the two allowances out. They run in onnxruntime with
one thread, subnormals flushed (as served), on rows of the model's dataset, batch 1, 16 and 256,
``report.alternate`` rounds, medians. Every output but ``certified_radius`` must be equal bit for
bit; the radius without the allowances must be at least the served one.
Usage: ``python bench/ab_served_allowances.py [--models DIR] [--repeats 5] [--only NAME ...] [--batches 1 16 256]``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from hjmodel import artifact, load_dataset, load_model, serving  # noqa: E402
from hjmodel.demo import DEMOS  # noqa: E402
from hjmodel.serving import TOP_K_MAX  # noqa: E402

OUT = ROOT / "bench" / "results" / "ab_served_allowances.md"
BATCHES = (1, 16, 256)


class WithoutAllowances(artifact.ServingModule):
    """The serving module as it was before the allowances: the float64 certificate, rounded down."""

    def forward(self, input, tau):  # noqa: A002 (V2 name)
        out = self.model.evaluate(input, tau=tau, top_k=TOP_K_MAX, outputs=self._names)
        return {o.name: artifact.served_form(o.name, out[o.name], o.datatype) for o in self.specs}


def _graph(module: artifact.ServingModule, model, folder: Path, name: str):
    path = folder / f"{name}.onnx"
    artifact._export(module, artifact.example_inputs(module), path, artifact.model_spec(model), 17,
                     artifact._gathered_searches(model))
    nodes = sum(n.op_type != "Constant" for n in onnx.load(str(path)).graph.node)
    return serving.open_session(path, threads=1, flush_subnormals=True), nodes


def bench_model(name: str, directory: Path, repeats: int, batches: tuple[int, ...]) -> list[tuple]:
    model = load_model(directory).double().eval()
    X = load_dataset(DEMOS[name][0]).X
    with tempfile.TemporaryDirectory() as tmp:
        (served, n_served), (bare, n_bare) = (_graph(artifact.ServingModule(model), model, Path(tmp), "served"),
                                              _graph(WithoutAllowances(model), model, Path(tmp), "without"))
    rows = []
    for n in batches:
        x = X[np.random.default_rng(n).choice(len(X), n, replace=n > len(X))].astype(np.float32)
        feed = serving.onnx_feeds(served, x, 0.1)
        names = [o.name for o in served.get_outputs()]
        a, b = (dict(zip(names, s.run(names, feed), strict=True)) for s in (served, bare))
        for k in names:
            if k != "certified_radius":
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert (a["certified_radius"] <= b["certified_radius"]).all()
        shrink = float(np.median(1.0 - a["certified_radius"] / np.where(b["certified_radius"] > 0,
                                                                         b["certified_radius"], 1.0)))
        sec = report.alternate({"served": lambda f=feed: served.run(None, f),
                                "without": lambda f=feed: bare.run(None, f)}, repeats)
        rows.append((name, n_served, n_bare, n, sec["served"] * 1e6, sec["without"] * 1e6, shrink))
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    args, rows, start = report.demo_bench(__doc__, OUT, 5, BATCHES, bench_model)

    def cells(model, n_served, n_bare, n, a, b, shrink):
        return (model, f"{n_served} / {n_bare}", str(n), f"{a:.1f}", f"{b:.1f}", f"{a / b:.3f}x", f"{shrink:.1e}")

    report.write(args.out, "The served radius's rounding allowances, against the same graph without them",
                 f"python bench/ab_served_allowances.py --repeats {args.repeats}", start,
                 f"onnxruntime, one thread, subnormals flushed; torch {torch.__version__}; what is timed: the "
                 "module docstring. *median radius given up*: 1 - served / without, over the batch's rows.",
                 ("model", "nodes that compute, served / without", "batch", "served us", "without us",
                  "served / without", "median radius given up"),
                 (cells(*row) for row in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
