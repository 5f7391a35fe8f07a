"""What computing the OOD score one class at a time would save: the served form of the class-conditional
Hopf-Cole value against one that partitions the rows by class at run time, in process, side by side.
Writes ``bench/results/ab_ood_by_class.md``.

The served graph (:func:`hjmodel.functional.hopf_cole_value_in_group`) takes every row's affine terms
against *all* M reference points in one matrix product, (n, p) x (p, M), and then gathers the S points
of the row's decided class (S ~ M / K). At batch 256 that product is most of the OOD score's time
(``bench/results/graph_profile.md``) and does K times the arithmetic the score needs. The alternative
timed here finds each class's rows (``nonzero``), multiplies only them by that class's coefficients,
and scatters the K results back: about 1/K of the arithmetic, for ~6 more nodes per class. It is not
served; this script measures what it would buy, to weigh against adding a batch-size branch to the
graph (a trace cannot record one: the torch backend would need the branch spliced in after
recording, as ``artifact._skip_empty_traced_searches`` does for the certificate's searches).

For each demo model whose reference has every class (the classifiers; ``--only`` some): both forms exported to ONNX (opset
17) on their own and run by onnxruntime with one thread, subnormals flushed (as served), on rows of
the model's dataset at their decided classes, batch 1, 16 and 256; ``report.alternate`` rounds,
medians. The two must agree (checked to 1e-12 relative). The last columns put the difference in
terms of the served graph: the whole graph's time at that batch (every output, timed in the same
rounds), and the all-diagnostics ratio to the bare forward pass (``bench/hjmodel_bench.py``'s
*predict only*, also timed here) as served and with the per-class form instead.
Usage: ``python bench/ab_ood_by_class.py [--models DIR] [--repeats 5] [--only NAME ...] [--batches 1 16 256]``.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.hjmodel_bench import PredictOnly  # noqa: E402
from hjmodel import functional as F  # noqa: E402
from hjmodel import load_dataset, load_model, serving  # noqa: E402
from hjmodel.artifact import ONNX_FILE  # noqa: E402
from hjmodel.demo import DEMOS  # noqa: E402

OUT = ROOT / "bench" / "results" / "ab_ood_by_class.md"
BATCHES = (1, 16, 256)


class InGroup(torch.nn.Module):
    """The served form: one product over every reference point, then the row's class gathered."""

    def __init__(self, tables, groups: F.Groups, t: float, eps: float):
        super().__init__()
        self.tables, self.groups, self.t, self.eps = tables, groups, t, eps

    def forward(self, z, group):
        return F.hopf_cole_value_in_group(z, self.tables, self.t, self.eps, self.groups, group)


class ByClass(torch.nn.Module):
    """The alternative: each class's rows times that class's coefficients only, scattered back."""

    def __init__(self, tables, groups: F.Groups, t: float, eps: float):
        super().__init__()
        self.centre, coef, offset = tables
        members = [groups.slots[k][groups.valid[k]] for k in range(groups.slots.shape[0])]
        self.coef = [coef[:, m].contiguous() for m in members]
        self.offset = [offset[m].contiguous() for m in members]
        self.t, self.eps = t, eps

    def forward(self, z, group):
        zc = z - self.centre
        inside = torch.zeros(z.shape[0], dtype=z.dtype)
        for k, (coef, offset) in enumerate(zip(self.coef, self.offset)):
            rows = (group == k).nonzero().squeeze(-1)
            q = torch.addmm(offset, zc.index_select(0, rows), coef)
            inside = inside.index_put((rows,), F.lse(q, self.eps))
        return (zc * zc).sum(-1) / (4.0 * self.t) - inside


def _session(module: torch.nn.Module, example: tuple, names: list[str]):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buf, input_names=names, output_names=["out"],
                          dynamic_axes={**{n: {0: "batch"} for n in names}, "out": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return serving.open_session(buf.getvalue(), threads=1, flush_subnormals=True)


def bench_model(name: str, directory: Path, repeats: int, batches: tuple[int, ...]) -> list[tuple]:
    model = load_model(directory).double().eval()
    ref = model.reference
    by_class = ref.class_groups(model.n_outputs)
    if by_class is None:
        print(f"{name}: no class-conditional reference, skipped")
        return []
    X = load_dataset(DEMOS[name][0]).X
    with torch.no_grad():
        H = model.features(torch.as_tensor(X, dtype=torch.float64))
    whole = serving.open_session(directory / ONNX_FILE, threads=1, flush_subnormals=True)
    decided = whole.run(["prediction"], serving.onnx_feeds(whole, X.astype(np.float32), 0.1))[0]
    tables = ref.hopf_cole_tables(H)
    args = (tables, by_class[0], ref.t, ref.eps)
    example = (H[:4], torch.as_tensor(decided[:4]))
    served, per_class = _session(InGroup(*args), example, ["z", "group"]), _session(ByClass(*args), example, ["z", "group"])
    bare = _session(PredictOnly(load_model(directory)), (torch.zeros(2, model.n_features),), ["input"])
    rows = []
    for n in batches:
        pick = np.random.default_rng(n).choice(len(X), n, replace=False)
        feed = {"z": H[pick].numpy(), "group": decided[pick]}
        a, b = served.run(None, feed)[0], per_class.run(None, feed)[0]
        np.testing.assert_allclose(b, a, rtol=1e-12)
        x = X[pick].astype(np.float32)
        whole_feed = serving.onnx_feeds(whole, x, 0.1)
        sec = report.alternate({"served": lambda f=feed: served.run(None, f),
                                "by class": lambda f=feed: per_class.run(None, f),
                                "whole graph": lambda f=whole_feed: whole.run(None, f),
                                "bare": lambda x=x: bare.run(None, {"input": x})}, repeats)
        rows.append((name, int(ref.points.shape[0]), int(by_class[0].slots.shape[1]), n,
                     sec["served"] * 1e6, sec["by class"] * 1e6, sec["whole graph"] * 1e6, sec["bare"] * 1e6))
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    args, rows, start = report.demo_bench(__doc__, OUT, 5, BATCHES, bench_model)

    def cells(model, M, S, n, a, b, whole, bare):
        return (model, f"{M} / {S}", str(n), f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}x", f"{(a - b) / whole:+.1%}",
                f"{whole / bare:.1f}x", f"{(whole - a + b) / bare:.1f}x")

    report.write(args.out, "The OOD score one class at a time, against the served one product over every point",
                 f"python bench/ab_ood_by_class.py --repeats {args.repeats}", start,
                 f"onnxruntime, one thread, subnormals flushed; torch {torch.__version__}; what is timed: the "
                 "module docstring. *saves of the whole graph*: (served - by class) / the whole served graph "
                 "(every output) at that batch; the ratios are the whole graph's time over the bare forward "
                 "pass's, as served and with the per-class form in place of the served one.",
                 ("model", "reference points / largest class", "batch", "served OOD product us", "by class us",
                  "by class / served", "saves of the whole graph", "all diagnostics / bare, served",
                  "with the per-class form"),
                 (cells(*row) for row in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
