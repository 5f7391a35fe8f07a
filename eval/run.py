"""Regenerate the evaluation: ``python -m eval.run`` writes eval/RESULTS.md and the PNG plots.

Models are trained with hjmodel's trainer (seeded) and cached in eval/.cache (keyed by the full
training config); ``--fresh`` retrains. ``--fast`` runs a smaller smoke version (fewer inputs and
attack steps) and writes RESULTS_fast.md instead."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import replace
from importlib import metadata

import numpy as np
import torch

from . import attributions, certificates, eps_sweep, ood
from .common import EVAL_DIR, MODELS, dataset_arrays, get_model, machine, md_table, set_threads

OOD_RUNS = [("lse, without 8,9", "lse", [8, 9], 0), ("lse, without 3,5", "lse", [3, 5], 1),
            ("memory, without 8,9", "memory", [8, 9], 0)]


def _versions() -> str:
    out = []
    for p in ("torch", "numpy", "scikit-learn", "onnxruntime", "captum", "matplotlib"):
        try:
            out.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            out.append(f"{p} (missing)")
    return ", ".join(out)


def _service_section() -> str:
    """The service measurements need a running server: they are produced by ``bench/service_bench.py``
    (ratios against a bare uvicorn endpoint and in-process hjmodel) and ``bench/perf_analyzer.sh``
    (Triton's load generator); their latest results are included here as written."""
    root = EVAL_DIR.parent
    parts = []
    for path, how in ((root / "bench" / "results" / "service.md", "python bench/service_bench.py"),
                      (EVAL_DIR / "perf_analyzer.md", "bash bench/perf_analyzer.sh")):
        if path.exists():
            text = path.read_text().split("\n", 1)[1].strip()     # drop the file's own title
            text = text.replace("\n## ", "\n#### ").replace("\n# ", "\n### ")
            parts.append(f"### From `{how}` ({path.relative_to(root)})\n\n{text}")
        else:
            parts.append(f"`{how}` has not been run on this machine yet.")
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--only", nargs="*", choices=["certificates", "attributions", "ood", "eps"])
    args = ap.parse_args(argv)
    set_threads()
    torch.manual_seed(0)
    only = set(args.only or ["certificates", "attributions", "ood", "eps"])
    t_start = time.time()
    log = lambda *a: print(f"[{time.time() - t_start:7.1f}s]", *a, file=sys.stderr, flush=True)  # noqa: E731
    sections, timings, train_rows = [], {}, []
    models = {}
    for name, (ds, cfg) in MODELS.items():
        m, splits, metrics, secs = get_model(name, ds, replace(cfg), args.fresh)
        models[name] = (ds, m, splits)
        key = "accuracy" if "accuracy" in metrics else "r2"
        train_rows.append([name, m.kind, ds, m.head.eps, int(m.head.W.shape[0]), f"{key} {metrics[key]:.3f}", secs])
        log("model", name, metrics)
    n_cap = 120 if args.fast else None

    def test_inputs(name, n=None):
        ds, m, splits = models[name]
        X, _ = dataset_arrays(ds)
        te = np.asarray(splits["test"])
        return X[te[:n] if n else te]

    if "certificates" in only:
        t0 = time.time()
        res = []
        for name in ("digits_lse", "digits_memory", "digits_deep", "diabetes_lse"):
            res.append(certificates.evaluate_kind(name, models[name][1], test_inputs(name, n_cap), fast=args.fast))
            log("certificates", name, res[-1]["violations"], res[-1]["ratios"]["hybrid"]["median"])
        certificates.plot(res, EVAL_DIR / "cert_tightness.png")
        sections.append(("Certificates", certificates.report(res) + "\n\n![tightness](cert_tightness.png)\n\n"
                         f"Regression (diabetes) tolerance tau = {certificates.TAU_DIABETES} target units (target sd "
                         "~77). Radii are L2 in raw input space (digits: pixel values 0..16)."))
        timings["certificates"] = time.time() - t0

    if "attributions" in only:
        t0 = time.time()
        n = 40 if args.fast else 100
        ig, sal, lab = {}, {}, {}
        for name in ("digits_lse", "digits_memory", "digits_deep", "diabetes_lse"):
            X = test_inputs(name, n)
            m = models[name][1]
            # memory/deep IG runs a 256-node quadrature of full evaluations: fewer inputs keep it short
            ig[name] = attributions.ig_vs_captum(m, X if name.endswith("lse") else X[:20])
            sal[name] = attributions.saliency_vs_autograd(m, X)
            if name in ("digits_lse", "digits_memory"):
                lab[name] = attributions.label_sensitivity_vs_autograd(m, X)
            log("attributions", name)
        Xd, yd = dataset_arrays("diabetes")
        _, md, sd = models["diabetes_lse"]
        tr, te = np.asarray(sd["train"]), np.asarray(sd["test"])
        lab_exp = attributions.label_sensitivity_exponent_check(Xd[tr], yd[tr], Xd[te])
        loo = attributions.memory_loo(models["digits_memory"][1], test_inputs("digits_memory", 200))
        sections.append(("Attributions", attributions.report(ig, sal, lab, lab_exp, loo)))
        timings["attributions"] = time.time() - t0

    if "ood" in only:
        t0 = time.time()
        runs = []
        for label, kind, exclude, seed in OOD_RUNS:
            base = MODELS["digits_lse" if kind == "lse" else "digits_memory"][1]
            cfg = replace(base, exclude_classes=list(exclude), seed=seed)
            m, splits, metrics, secs = get_model(f"digits_{kind}_ood{''.join(map(str, exclude))}", "digits", cfg,
                                                 args.fresh)
            runs.append((label, ood.study(m, splits, exclude)))
            train_rows.append([f"OOD: {label}", kind, "digits", m.head.eps, int(m.head.W.shape[0]),
                               f"accuracy {metrics['accuracy']:.3f}", secs])
            log("ood", label)
        ood.plot(runs, EVAL_DIR / "ood_auroc.png", EVAL_DIR / "ood_alpha.png")
        sections.append(("OOD detection", "Digits models trained with `TrainConfig(exclude_classes=...)`; "
                         "in-distribution = their test split (kept classes only). OOD sets: every digit of the "
                         "excluded classes; uniform noise on [0,16]^64; the ID test images scaled x2 and shifted "
                         "+4 (no clipping); breast_cancer (30 features) and wine (13 features) z-scored, "
                         "resampled to 64 values by linear interpolation and mapped to pixels 8+4z clipped to "
                         "[0,16]. All scores from the same model: HJ gate = 1 - served conformal p-value; "
                         "max-softmax = -max prob; energy = -logsumexp of the class logits (s/eps); "
                         "Mahalanobis = min over classes, shared covariance, fitted on the training split's head "
                         "features; k-NN = distance to the 5th nearest training head feature. Head features = the "
                         "standardised pixels (lse, memory).\n" + ood.report(runs)
                         + "\n\n![auroc](ood_auroc.png) ![alpha](ood_alpha.png)"))
        timings["ood"] = time.time() - t0

    if "eps" in only:
        t0 = time.time()
        base = MODELS["digits_lse"][1]
        eps_star = models["digits_lse"][1].head.eps
        res = eps_sweep.sweep(replace(base), eps_star, args.fresh, epochs=30 if args.fast else 60)
        eps_sweep.plot(res, EVAL_DIR / "eps_sweep.png")
        sections.append(("eps trade-off", eps_sweep.report(res) + "\n\n![eps sweep](eps_sweep.png)"))
        timings["eps"] = time.time() - t0
        log("eps sweep done")

    sections.append(("Service", _service_section()))

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = [f"# hjserve evaluation results{' (fast smoke run)' if args.fast else ''}\n",
            f"Generated by `python -m eval.run{' --fast' if args.fast else ''}` on {now}.\n",
            f"- Machine: {machine()} (shared with other jobs; timings are indicative).",
            f"- Packages: {_versions()}.",
            f"- Wall time: {time.time() - t_start:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; "
            "model training is cached in eval/.cache, `--fresh` retrains).",
            "- Every number is reported next to its baseline, computed in the same run on the same inputs.\n",
            "## Models\n",
            "Trained by `hjmodel.train` (seeded; splits 60/20/20 train/calibration/test); metrics on the test split.\n",
            md_table(["model", "kind", "dataset", "eps", "head neurons", "test metric", "train s"], train_rows), ""]
    body = [f"## {title}\n\n{text}\n" for title, text in sections]
    (EVAL_DIR / ("RESULTS_fast.md" if args.fast else "RESULTS.md")).write_text("\n".join(head + body))
    json_path = EVAL_DIR / ".cache" / "last_run.json"
    json_path.write_text(json.dumps({"timings": timings}, indent=1))
    log("wrote", "RESULTS_fast.md" if args.fast else "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
