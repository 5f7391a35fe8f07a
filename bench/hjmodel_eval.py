"""hjmodel evaluation: certificate soundness and tightness per model kind, OOD detection and the
realised false-flag rate, and ONNX / torch parity. Writes ``bench/results/hjmodel.md``.

1. Soundness: a PGD-L2 attack (8 restarts x 100 steps, float64, autograd through the model's own
   forward; :mod:`hjmodel.attacks`) strictly inside the served certified
   radius (ball of radius 0.999 r) on every held-out input (>= 300 per kind): violations must be 0.
   Tightness: certified radius / smallest radius at which an attack finds a violation --
   classifiers: ``eval.certificates.strongest_attack_radius`` (the smaller of two minimal-perturbation
   attacks, 14 restarts x 100 steps each, the radius eval/CROWN.md uses); regression: grow the ball
   until the attack succeeds, then 8 bisections, 4 restarts x 50 steps each.
2. OOD: digits trained without classes 8 and 9 (lse and memory); AUROC of the conformal p-value
   (and of the combined statistic T) against the held-out classes, uniform noise, x3 scaling and a
   +4 shift; realised false-flag rate on the untouched test split and averaged over 20
   recalibrations on re-splits of the held-out pool, vs alpha.
3. Parity: ONNX vs torch ServingModule on every output, batch 4096, every demo model; and
   ``hjmodel verify``.

Usage: ``python bench/hjmodel_eval.py [--models DIR] [--quick]`` (models: ``$HJSERVE_TEST_MODELS``,
``models/`` or /tmp/demo1).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sklearn.metrics import roc_auc_score  # noqa: E402

from eval.certificates import strongest_attack_radius  # noqa: E402
from hjmodel import TrainConfig, load_dataset, load_model, save_artifact, train  # noqa: E402
from hjmodel.attacks import SHRINK, forward_outputs, friedman, held_out, minimal_attack_radius, pgd_l2  # noqa: E402
from hjmodel.serving import outputs_for  # noqa: E402
from hjmodel.train import calibrate  # noqa: E402
from hjmodel.verify import DEMO_DATA, OOD_OUTPUTS, calibration_ties, parity_inputs, served_outputs, verify  # noqa: E402

#: a deep body under a memory head (Hopf-Cole predictor over learned features), as in the tests
DEEP_MEMORY = TrainConfig(kind="deep", head="memory", hidden=[16], hidden_pieces=2, pieces=2, epochs=10,
                          memory_size=500, progress=False)
#: a two-layer deep body (the certificate linearises it layer by layer), as in the tests
DEEP_TWO = TrainConfig(kind="deep", hidden=[32, 32], epochs=10, progress=False)




DT = torch.float64


def _models_dir(arg: str | None) -> Path:
    for c in (arg, os.environ.get("HJSERVE_TEST_MODELS"), str(ROOT / "models"), "/tmp/demo1"):
        if c and (Path(c) / "DEMO_RESULTS.json").exists():
            return Path(c)
    raise SystemExit("no demo repository: run `python -m hjmodel.demo --out models` first")


def _pct(v: torch.Tensor, q: float) -> float:
    return float(torch.quantile(v, q)) if v.numel() else float("nan")


# ------------------------------------------------------------------------------------ 1. soundness


def soundness(models: Path, work: Path, quick: bool) -> list[dict]:
    cases = []
    digits = load_dataset("digits")
    for case, name in (("lse classification", "digits_lse"), ("memory classification", "digits_memory"),
                       ("deep classification", "digits_deep")):
        d = models / name / "1"
        m = load_model(d)
        idx = held_out(m, digits.X)
        cases.append((case, d, m, digits.X[idx], digits.y[idx], 0.0))
    m, rep = train(digits, DEEP_MEMORY)
    d = work / "deep_memory"
    save_artifact(m, d)
    te = np.asarray(rep.splits["test"])
    cases.append(("deep body + memory head classification (trained here)", d, m, digits.X[te], digits.y[te], 0.0))
    m, rep = train(digits, DEEP_TWO)
    d = work / "deep_two"
    save_artifact(m, d)
    te = np.asarray(rep.splits["test"])
    cases.append(("deep classification, two body layers (trained here)", d, m, digits.X[te], digits.y[te], 0.0))
    fr = friedman(2000)
    tau_fr = 0.5
    for case, cfg in (("lse regression", TrainConfig(kind="lse", pieces=8, epochs=40, progress=False)),
                      ("memory regression", TrainConfig(kind="memory", memory_size=800, progress=False))):
        m, rep = train(fr, cfg)
        d = work / case.replace(" ", "_")
        save_artifact(m, d)
        te = np.asarray(rep.splits["test"])
        cases.append((case + f" (friedman1, tau={tau_fr})", d, m, fr.X[te], fr.y[te], tau_fr))
    diab = load_dataset("diabetes")
    d = models / "diabetes_lse" / "1"
    m = load_model(d)
    cfg = TrainConfig(**m.meta["provenance"]["train_config"])
    from hjmodel.train import _split

    _, ca, te = _split(len(diab.X), cfg, np.random.default_rng(cfg.seed))
    idx = np.concatenate([te, ca])
    cases.append(("lse regression (diabetes demo, tau=5)", d, m, diab.X[idx], diab.y[idx], 5.0))

    rows = []
    for case, directory, model, X, y, tau in cases:
        t0 = time.time()
        x = torch.as_tensor(X, dtype=torch.float32).to(DT)
        if quick:
            x, y = x[:120], y[:120]
        ev = model.evaluate(x, tau=tau)
        torch_out, onnx_out = served_outputs(directory, x.to(torch.float32), tau)
        r = torch.as_tensor(torch_out["certified_radius"], dtype=DT)
        with torch.no_grad():
            y0 = forward_outputs(model, x)
        if model.task == "classification":
            target = ev["prediction"]
            acc = float((target.numpy() == y).mean())
            agree = (np.array_equal(torch_out["prediction"], target.numpy())
                     and np.array_equal(onnx_out["prediction"][(r > 0).numpy()], target.numpy()[(r > 0).numpy()]))
            quality = f"acc {acc:.4f}"
        else:
            target = y0
            pred = y0[:, 0].numpy()
            r2 = 1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
            agree = bool(np.allclose(onnx_out["prediction"], y0.numpy(), rtol=1e-5, atol=1e-5 * tau))
            quality = f"R2 {r2:.3f}"
        violated, _, _ = pgd_l2(model, x, SHRINK * r, target, task=model.task, tau=tau,
                                restarts=4 if quick else 8, steps=40 if quick else 100, seed=7)
        if model.task == "classification" and not quick:   # the reports' one attack radius (eval/CROWN.md's)
            r_att = strongest_attack_radius(model, x, target, r)
        else:
            r_att = minimal_attack_radius(model, x, target, r, task=model.task, tau=tau, restarts=4,
                                          steps=30 if quick else 50, bisections=5 if quick else 8, seed=11)
        found = r_att < math.inf
        ratio = r[found] / r_att[found]
        rows.append({"case": case, "n": x.shape[0], "violations": int(violated.sum()),
                     "beaten": int((ratio > 1).sum()), "found": float(found.double().mean()),
                     "r_med": float(r.median()), "r_att_med": float(r_att[found].median()),
                     "t_med": float(ratio.median()), "t_p10": _pct(ratio, 0.1), "t_p90": _pct(ratio, 0.9),
                     "quality": quality, "agree": agree, "seconds": time.time() - t0})
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------ 2. OOD


def ood(quick: bool) -> list[dict]:
    data = load_dataset("digits")
    exclude = [8, 9]
    keep = ~np.isin(data.y, exclude)
    out = []
    kinds = [("lse", TrainConfig(kind="lse", pieces=8, epochs=150 if not quick else 30, exclude_classes=exclude,
                                 progress=False)),
             ("memory", TrainConfig(kind="memory", exclude_classes=exclude, progress=False))]
    for kind, cfg in kinds:
        model, report = train(data, cfg)
        X_in = data.X[keep]
        sp = {k: X_in[np.asarray(v)] for k, v in report.splits.items()}
        rng = np.random.default_rng(0)
        test = sp["test"]
        shifts = {"held-out classes 8, 9": data.X[~keep],
                  "uniform noise [0, 16]": rng.uniform(0, 16, size=(1000, 64)),
                  "scaled x3": 3 * test, "shifted +4": test + 4.0}

        def scores(X, model=model):
            x = torch.as_tensor(X, dtype=torch.float32).to(DT)
            ev = model.evaluate(x)
            T = model.combined_statistic(ev.h, ev.log_probs)
            return -ev["ood_p_value"].numpy(), T.numpy(), ev["ood_score"].numpy(), ev["ood_flag"].numpy()

        s_in = scores(test)
        auroc = {}
        for name, X in shifts.items():
            s_out = scores(X)
            lab = np.r_[np.zeros(len(test)), np.ones(len(X))]
            auroc[name] = [roc_auc_score(lab, np.r_[s_in[i], s_out[i]]) for i in range(3)] + [float(s_out[3].mean())]
        # realised false-flag rate: the stored calibration on the test split, and 20 recalibrations
        fpr = {"stored": (cfg.alpha, float(s_in[3].mean()), len(test), int(model.reference.combined.numel()))}
        pool = torch.as_tensor(np.concatenate([sp["calibration"], sp["test"]]))
        noise = torch.as_tensor(shifts["uniform noise [0, 16]"])
        m2 = copy.deepcopy(model)
        for alpha in (0.01, 0.05, 0.1):
            rates, dead = [], 0
            for r in range(5 if quick else 20):
                perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(r))
                half = len(pool) // 2
                calibrate(m2, torch.as_tensor(sp["train"]), pool[perm[:half]], replace(cfg, seed=r, alpha=alpha))
                rates.append(float(m2.evaluate(pool[perm[half:]], outputs=("ood_flag",))["ood_flag"].double().mean()))
                dead += float(m2.evaluate(noise, outputs=("ood_flag",))["ood_flag"].double().mean()) < 0.5
            fpr[alpha] = (np.mean(rates), np.std(rates), len(rates), dead, len(pool) - len(pool) // 2)
        out.append({"kind": kind, "accuracy": report.metrics["accuracy"], "auroc": auroc, "fpr": fpr})
        print(out[-1], flush=True)
    return out


# ------------------------------------------------------------------------------------ 3. parity


def parity(models: Path) -> list[dict]:
    rows = []
    for name in DEMO_DATA:
        d = models / name / "1"
        model = load_model(d)
        x32 = parity_inputs(name, 4096)
        want, got = served_outputs(d, x32, threads=2)
        ties = calibration_ties(model, x32)
        max_ulp, discrete, ood_rows = 0.0, 0, 0
        for o in outputs_for(model.task):
            a, b = got[o.name], want[o.name]
            if o.name in OOD_OUTPUTS:
                diff = (a != b).reshape(len(x32), -1).any(1)
                ood_rows = max(ood_rows, int(diff.sum()))
            elif o.datatype == "FP32":
                # in ulps of the entry, entries below 1e-6 x the output's scale measured at that floor
                floor = 1e-6 * float(np.abs(b).max())
                mag = np.maximum(np.abs(b), floor).astype(np.float32)
                ulp = np.spacing(mag).astype(np.float64)
                max_ulp = max(max_ulp, float((np.abs(a.astype(np.float64) - b) / ulp).max()))
            else:
                discrete += int((a != b).sum())
        rep = verify(d, n=256)
        rows.append({"model": name, "kind": model.kind, "max_ulp": max_ulp, "discrete": discrete,
                     "ood_rows": ood_rows, "tie_rows": int(ties.sum()), "verify": rep["ok"],
                     "thm41": rep["theorem_4_1_max_rel_error"]})
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------ report


def write(path: Path, models: Path, sound: list[dict], oods: list[dict], par: list[dict], seconds: float) -> None:
    L = ["# hjmodel evaluation", "",
         f"Generated by `python bench/hjmodel_eval.py` on {dt.datetime.now().isoformat(timespec='seconds')}; "
         f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
         f"(shared with other jobs), Python {platform.python_version()}, torch {torch.__version__}, "
         f"demo models from `{models}`; {seconds:.0f} s.", "",
         "## 1. Certificate soundness and tightness", "",
         "PGD-L2 (8 restarts x 100 steps, float64, autograd through `features` + `head`) inside the served "
         "float32 certified radius (ball 0.999 r) on every held-out input. *Violations*: decision changes "
         "(classification) or an output moved by more than tau (regression). *Tightness*: certified radius / "
         "smallest radius at which an attack finds a violation (classifiers: the smaller of two minimal-perturbation "
         "attacks, 14 x 100 PGD each, `eval.certificates.strongest_attack_radius`, as in eval/CROWN.md; regression: "
         "grow, then 8 bisections of 4 x 50 PGD); "
         "*beaten*: points where the attack succeeded inside the certificate (must be 0). *Served agrees*: "
         "torch ServingModule and ONNX decisions (float32 input) equal the certificate's (float64) decision.", "",
         "| kind | n | violations | beaten | attack found | median r | median attack r | tightness median | p10 | p90 | held-out | served agrees |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sound:
        L.append(f"| {r['case']} | {r['n']} | {r['violations']} | {r['beaten']} | {r['found']:.0%} | {r['r_med']:.4g} | "
                 f"{r['r_att_med']:.4g} | {r['t_med']:.3f} | {r['t_p10']:.3f} | {r['t_p90']:.3f} | {r['quality']} | "
                 f"{'yes' if r['agree'] else 'NO'} |")
    L += ["", "Radii are in raw input units (digits pixels 0..16; Friedman features 0..1; diabetes standardised "
          "features ~0.05 scale). The served radius is the largest of the hybrid radius, the tangent-plane "
          "radius (functional.tangent_radius), for deep classifiers the linearised-body radius "
          "(functional.linearised_body_radius) and, for classifiers, the IBP radius searched above them; for memory "
          "heads the hybrid radius alone is ~25x smaller (its "
          "global curvature bound D^2/(4 eps) is huge in W = y/(2t) coordinates).", "",
          "## 2. OOD flag", "",
          "Digits trained without classes 8 and 9. AUROC vs the in-distribution test split; score = conformal "
          "p-value (lower = OOD), the combined statistic T, and the raw Hopf-Cole score u alone; *flagged* = share "
          "of the shifted set flagged at alpha = 0.05.", "",
          "| kind | held-out acc | shift | AUROC p-value | AUROC T | AUROC u | flagged |", "|---|---|---|---|---|---|---|"]
    for o in oods:
        for name, (ap, at, au, fl) in o["auroc"].items():
            L.append(f"| {o['kind']} | {o['accuracy']:.4f} | {name} | {ap:.4f} | {at:.4f} | {au:.4f} | {fl:.1%} |")
    L += ["", "Realised false-flag rate on held-out in-distribution data. *stored*: the calibration `train` wrote, "
          "on the untouched test split (sampling s.e. = sqrt(a(1-a)(1/n_test + 1/n_conformal))). Others: mean "
          "(sd) over re-splits of the held-out pool into calibration / test halves, recalibrated each time; "
          "*powerless*: recalibrations after which not even uniform noise is flagged.", "",
          "| kind | alpha | realised rate | sd / s.e. | repeats | powerless |", "|---|---|---|---|---|---|"]
    for o in oods:
        a, rate, n, m = o["fpr"]["stored"]
        se = math.sqrt(a * (1 - a) * (1 / n + 1 / m))
        L.append(f"| {o['kind']} | {a} (stored, n_test={n}) | {rate:.4f} | s.e. {se:.4f} | 1 | - |")
        for alpha in (0.01, 0.05, 0.1):
            mean, sd, reps, dead, _ = o["fpr"][alpha]
            L.append(f"| {o['kind']} | {alpha} | {mean:.4f} | sd {sd:.4f} | {reps} | {dead}/{reps} |")
    L += ["", "The score u is the Hopf-Cole value over the training points of the decided class (gauge by "
          "leave-one-out likelihood); its rank p-value against the training rows' leave-one-out scores, with "
          "ties within a rank level broken by the score, is strictly increasing in u, so the served p-value is "
          "u's conformal rank among every calibration row, and inputs beyond every calibration score stay "
          "ordered so the gate can reach alpha (the *powerless* column); the rate of one stored calibration "
          "varies with its draw by the binomial spread of its calibration rows: compare the spread over "
          "re-splits.", "",
          "## 3. ONNX vs torch parity (batch 4096) and `hjmodel verify`", "",
          "Inputs: dataset rows, half exact, half with Gaussian noise (0.5 feature sd), float32. FP32 outputs: "
          "largest difference in float32 ulps of the entry (entries below 1e-6 x the output's largest magnitude "
          "counted in ulps at that floor). Discrete outputs (class, top-k indices): entries that differ. "
          "OOD outputs: rows whose p-value / flag / component differ (must be 0); *tie rows*: rows whose score "
          "ties a stored calibration score to float64 rounding (the calibration points themselves), which "
          "count it on both runtimes whichever way each rounded (`models._rank_p`'s margins; before them "
          "the runtimes' last bits decided the count on some of these rows). A memory "
          "model's `certified_radius` is the one float output that may differ by more than a rounding "
          "step: its tangent root is searched in float32 and proven in float64, and the two runtimes' "
          "float32 exponentials differ in the last bit, so their (each proven) radii differ by a few "
          "float32 steps (docs/DESIGN.md section 3).", "",
          "| model | kind | max FP32 diff (ulp) | discrete diffs | OOD rows differing | tie rows | verify | Thm 4.1 rel err |",
          "|---|---|---|---|---|---|---|---|"]
    for p in par:
        L.append(f"| {p['model']} | {p['kind']} | {p['max_ulp']:.1f} | {p['discrete']} | {p['ood_rows']} | "
                 f"{p['tie_rows']} | {'ok' if p['verify'] else 'FAIL'} | {p['thm41']:.1e} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "hjmodel.md"))
    ap.add_argument("--quick", action="store_true", help="fewer points / restarts (smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import tempfile

    t0 = time.time()
    models = _models_dir(args.models)
    with tempfile.TemporaryDirectory() as work:
        sound = soundness(models, Path(work), args.quick)
    oods = ood(args.quick)
    par = parity(models)
    write(Path(args.out), models, sound, oods, par, time.time() - t0)
    print(f"wrote {args.out}")
    bad = sum(r["violations"] + r["beaten"] for r in sound)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
