"""The OOD battery: the served gate against the standard detectors on shifts the models never saw.

    python -m eval.ood_battery [--seeds 5] [--kinds lse,memory,deep]   -> eval/OOD_BATTERY.md + plots

Models: ``hjmodel.train`` with its defaults (the CLI's) on digits without classes {8, 9} and,
separately, without {3, 5}; every kind; ``--seeds`` seeds each (the seed draws the split, the
initialisation and the calibration). In-distribution = the model's untouched test split.

Shift categories (each the mean AUROC of its shifts):

* held-out classes: the digits of the excluded classes;
* noise: uniform noise on the pixel range, blank images (all zero, plus 1e-2 jitter);
* intensity: the test images x1.5, x3, +4 (clipped to 16);
* corruptions: 30% of the pixels zeroed (occlusion), Gaussian pixel noise (sd 4, clipped), a 3x3
  box blur, a horizontal flip;
* other datasets: breast_cancer, wine and iris mapped into the digits' input space (z-score, resample
  the feature index to 64 by linear interpolation, pixels 8 + 4 z clipped to [0, 16]).

Scores, all from the same trained model and the same head features h:

* the served gate: ``ood_p_value`` (ties broken by ``ood_score``, which orders the p-value's levels)
  and ``ood_score`` alone, from the float32 serving module (the bits the server returns);
* 1-NN and 5-NN distance to the training split's features; Mahalanobis (class means, shared
  covariance with pytorch-ood's ridge, min over classes); max-softmax probability (MSP); energy (-logsumexp of the class
  log-scores); ViM (residual outside the principal subspace holding 90% of the training variance,
  scaled by mean max logit / mean residual, minus the energy).

Calibration: the realised false-flag rate (p <= alpha on the in-distribution test split) at alpha
0.05 and 0.01 of every model, and of 10 re-splits per model of its held-out rows (calibration + test,
never trained on) into fresh calibration and test halves, recalibrated with ``hjmodel.train.calibrate``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_iris, load_wine
from sklearn.metrics import roc_auc_score

from hjmodel import TrainConfig, load_dataset, train
from hjmodel import functional as F
from hjmodel.artifact import ServingModule
from hjmodel.train import calibrate, false_flag_interval

from .common import machine, md_table

HERE = Path(__file__).resolve().parent
SPLITS = ([8, 9], [3, 5])
ALPHAS = (0.05, 0.01)
CATEGORIES = {
    "held-out classes": ["held-out classes"],
    "noise": ["uniform noise", "blank"],
    "intensity": ["x1.5", "x3", "+4"],
    "corruptions": ["occlusion 30%", "pixel noise sd 4", "blur 3x3", "flip"],
    "other datasets": ["breast_cancer", "wine", "iris"],
}
GATE = ("gate (served p-value)", "gate score u/eps")
BASELINES = ("1-NN", "5-NN", "Mahalanobis", "MSP", "energy", "ViM")


def _other_dataset(loader, n_pix: int = 64) -> np.ndarray:
    X = loader().data.astype(np.float64)
    Z = (X - X.mean(0)) / (X.std(0) + 1e-12)
    grid = np.linspace(0, Z.shape[1] - 1, n_pix)
    R = np.stack([np.interp(grid, np.arange(Z.shape[1]), row) for row in Z])
    return np.clip(8.0 + 4.0 * R, 0.0, 16.0)


def shifts(test: np.ndarray, held: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(test)
    img = test.reshape(n, 8, 8)
    occluded = test.copy()
    occluded[rng.random(test.shape) < 0.3] = 0.0
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)))
    blur = sum(padded[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3)) / 9.0
    return {
        "held-out classes": held,
        "uniform noise": rng.uniform(0, 16, (300, 64)),
        "blank": rng.uniform(0, 0.01, (50, 64)),
        "x1.5": 1.5 * test, "x3": 3.0 * test, "+4": np.minimum(test + 4.0, 16.0),
        "occlusion 30%": occluded,
        "pixel noise sd 4": np.clip(test + rng.normal(0, 4, test.shape), 0, 16),
        "blur 3x3": blur.reshape(n, 64),
        "flip": img[:, :, ::-1].reshape(n, 64),
        "breast_cancer": _other_dataset(load_breast_cancer),
        "wine": _other_dataset(load_wine),
        "iris": _other_dataset(load_iris),
    }


class Detectors:
    """The served gate and the baselines on one model; baselines fitted on its training split."""

    def __init__(self, model, X_train: np.ndarray, y_train: np.ndarray):
        self.model, self.serving = model, ServingModule(copy.deepcopy(model))
        with torch.no_grad():
            H = model.features(torch.as_tensor(X_train, dtype=torch.float64))
        self.H, K = H, model.n_outputs
        y = torch.as_tensor(y_train)
        self.means = torch.stack([H[y == c].mean(0) for c in range(K)])
        C = H - self.means[y]
        cov = C.T @ C / len(H)
        # the ridge of pytorch-ood's Mahalanobis (1e-6 on the summed scatter): zero-variance pixels
        # (digits' blank corners) then weigh heavily, which is what catches blank images
        cov = cov + 1e-6 / len(H) * torch.eye(len(cov), dtype=cov.dtype)
        self.precision = torch.linalg.inv(cov)
        self.centre = H.mean(0)
        _, S, Vt = torch.linalg.svd(H - self.centre, full_matrices=False)
        keep = int((torch.cumsum(S ** 2, 0) / (S ** 2).sum() < 0.9).sum()) + 1
        self.residual_basis = Vt[keep:].T
        logits, _ = self.class_scores(H)
        residual = ((H - self.centre) @ self.residual_basis).norm(dim=-1)
        self.vim_scale = float(logits.max(-1).values.mean() / residual.mean().clamp_min(1e-12))

    def class_scores(self, h: torch.Tensor):
        """(class log-scores s/eps, the model's class log-probabilities) of head features h."""
        head = self.model.head
        a = head.preactivations(h)
        groups = head.mask if head.mode == "groups" else head.V.T > 0.5
        return F.group_lse(a, groups, head.eps) / head.eps, head.log_probabilities(a)

    @torch.no_grad()
    def scores(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Every score, higher = more unusual, and the served p-value under ``"_p"`` (the gate's
        ranking, :func:`_gate_order`, needs both)."""
        x32 = torch.as_tensor(np.asarray(X, dtype=np.float32))
        served = self.serving(x32, torch.full((len(x32), 1), 0.1, dtype=torch.float64))
        p = served["ood_p_value"].double().numpy()
        u = served["ood_score"].double().numpy()
        h = self.model.features(x32.double())
        logits, log_probs = self.class_scores(h)
        d = torch.cdist(h, self.H).topk(5, dim=-1, largest=False).values
        diff = h.unsqueeze(1) - self.means.unsqueeze(0)
        energy = -torch.logsumexp(logits, -1)
        residual = ((h - self.centre) @ self.residual_basis).norm(dim=-1)
        return {
            GATE[1]: u, "_p": p,
            "1-NN": d[:, 0].numpy(), "5-NN": d[:, 4].numpy(),
            "Mahalanobis": torch.einsum("nkd,de,nke->nk", diff, self.precision, diff).min(-1).values.numpy(),
            "MSP": -log_probs.max(-1).values.exp().numpy(),
            "energy": energy.numpy(),
            "ViM": (self.vim_scale * residual + energy).numpy(),
        }


def auroc_fpr95(s_in: np.ndarray, s_out: np.ndarray) -> tuple[float, float]:
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    thr = np.quantile(s_in, 0.95, method="higher")
    return float(roc_auc_score(y, np.r_[s_in, s_out])), float((s_out <= thr).mean())


def _gate_order(s_in: dict, s_out: dict) -> tuple[np.ndarray, np.ndarray]:
    """The gate's ranking over the pooled rows: p-value first, ``ood_score`` within a level."""
    p = np.r_[s_in["_p"], s_out["_p"]]
    u = np.r_[s_in[GATE[1]], s_out[GATE[1]]]
    rank = np.lexsort((u, -p)).argsort().astype(float)
    return rank[:len(s_in["_p"])], rank[len(s_in["_p"]):]


def resplit_rates(model, X: np.ndarray, splits: dict, cfg: TrainConfig, repeats: int = 10) -> dict[float, list[float]]:
    """Realised false-flag rates after recalibrating on fresh halves of the held-out rows."""
    pool = np.concatenate([splits["calibration"], splits["test"]])
    X_train = torch.as_tensor(X[splits["train"]])
    rates: dict[float, list[float]] = {a: [] for a in ALPHAS}
    for r in range(repeats):
        perm = np.random.default_rng(1000 + r).permutation(len(pool))
        half = len(pool) // 2
        m = copy.deepcopy(model)
        calibrate(m, X_train, torch.as_tensor(X[pool[perm[:half]]]), replace(cfg, seed=r, alpha=min(ALPHAS)))
        p = m.evaluate(torch.as_tensor(X[pool[perm[half:]]]), outputs=("ood_p_value",))["ood_p_value"].numpy()
        for a in ALPHAS:
            rates[a].append(float((p <= a).mean()))
    return rates


def run(kinds: list[str], seeds: int) -> list[dict]:
    data = load_dataset("digits")
    runs = []
    for kind in kinds:
        for exclude in SPLITS:
            keep = ~np.isin(data.y, exclude)
            X = data.X[keep]
            remap = {c: i for i, c in enumerate(sorted(set(data.y[keep].tolist())))}
            y = np.array([remap[v] for v in data.y[keep]])
            for seed in range(seeds):
                t0 = time.time()
                cfg = TrainConfig(kind=kind, exclude_classes=list(exclude), seed=seed, progress=False)
                model, report = train(data, cfg)
                sp = {k: np.asarray(v) for k, v in report.splits.items()}
                det = Detectors(model, X[sp["train"]], y[sp["train"]])
                test = X[sp["test"]]
                s_in = det.scores(test)
                res = {"kind": kind, "exclude": list(exclude), "seed": seed, "accuracy": report.metrics["accuracy"],
                       "n_test": len(test), "n_conformal": int(model.reference.combined.numel()),
                       "auroc": {}, "fpr95": {}, "ffr": {str(a): float((s_in["_p"] <= a).mean()) for a in ALPHAS}}
                for name, Xo in shifts(test, data.X[~keep], seed).items():
                    s_out = det.scores(Xo)
                    g_in, g_out = _gate_order(s_in, s_out)
                    for meth in (*GATE, *BASELINES):
                        a, b = (g_in, g_out) if meth == GATE[0] else (s_in[meth], s_out[meth])
                        res["auroc"].setdefault(meth, {})[name], res["fpr95"].setdefault(meth, {})[name] = auroc_fpr95(a, b)
                res["resplit"] = {str(a): v for a, v in resplit_rates(model, X, sp, cfg).items()}
                runs.append(res)
                print(f"{kind} without {exclude} seed {seed}: {time.time() - t0:.1f}s, gate mean AUROC "
                      f"{np.mean(list(res['auroc'][GATE[0]].values())):.3f}, 1-NN "
                      f"{np.mean(list(res['auroc']['1-NN'].values())):.3f}", flush=True)
    return runs


def category_auroc(r: dict, meth: str, metric: str = "auroc") -> dict[str, float]:
    return {c: float(np.mean([r[metric][meth][s] for s in names])) for c, names in CATEGORIES.items()}


def report(runs: list[dict], seconds: float) -> str:
    kinds = list(dict.fromkeys(r["kind"] for r in runs))
    methods = (*GATE, *BASELINES)
    seeds = len({r["seed"] for r in runs})
    out = [f"""# OOD battery: the served gate against the standard detectors

Generated by `python -m eval.ood_battery --seeds {seeds}` ({seconds / 60:.0f} min; report written
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Machine: {machine()}.

{len(runs)} models: `hjmodel.train` defaults (what `hjmodel train` runs) per kind, on digits without
classes {{8, 9}} and without {{3, 5}}, {seeds} seeds each. In-distribution = each model's untouched test
split. Every score is computed on the same model and the same head features; the gate's numbers are
the float32 serving module's outputs. The shifts, the baselines and the re-split protocol are
described in `eval/ood_battery.py`; each category's AUROC is the mean over its shifts, each cell the
mean over the {2 * seeds} models of a kind (two class splits x {seeds} seeds).
"""]
    verdict = []
    for metric, title in (("auroc", "AUROC (OOD = positive; higher is better)"),
                          ("fpr95", "FPR at 95% TPR (lower is better)")):
        out.append(f"\n## {title}\n")
        for kind in kinds:
            rk = [r for r in runs if r["kind"] == kind]
            rows = []
            for meth in methods:
                cats = [np.mean([category_auroc(r, meth, metric)[c] for r in rk]) for c in CATEGORIES]
                overall = float(np.mean([np.mean(list(r[metric][meth].values())) for r in rk]))
                rows.append([f"**{meth}**" if meth in GATE else meth, *map(float, cats), overall])
            out.append(f"\n**{kind}**\n")
            out.append(md_table(["score", *CATEGORIES, "mean over all shifts"], rows))
            if metric == "auroc":
                gate = {row[0].strip("*"): row for row in rows}
                g = gate[GATE[0]]
                best_mean = max(BASELINES, key=lambda m: gate[m][-1])
                worst_gap = max(max(gate[m][1 + i] for m in BASELINES) - g[1 + i] for i in range(len(CATEGORIES)))
                verdict.append([kind, g[-1], f"{best_mean}: {gate[best_mean][-1]:.4f}", g[-1] - gate[best_mean][-1],
                                worst_gap])
    out.append("\n## Verdict per kind (served gate vs the best baseline)\n")
    out.append(md_table(["kind", "gate mean AUROC", "best baseline by mean", "gate - best (mean)",
                         "largest category gap behind the best baseline there"], verdict))
    out.append("\n## Per shift (AUROC, mean over the models of a kind)\n")
    names = list(runs[0]["auroc"][GATE[0]])
    for kind in kinds:
        rk = [r for r in runs if r["kind"] == kind]
        rows = [[meth, *[float(np.mean([r["auroc"][meth][s] for r in rk])) for s in names]] for meth in methods]
        out.append(f"\n**{kind}**\n")
        out.append(md_table(["score", *names], rows))
    out.append("\n## Calibration: realised false-flag rate (p <= alpha on in-distribution rows never trained on)\n")
    rows = []
    for kind in kinds:
        rk = [r for r in runs if r["kind"] == kind]
        for a in ALPHAS:
            own = [r["ffr"][str(a)] for r in rk]
            res = [v for r in rk for v in r["resplit"][str(a)]]
            n_test, n_conf = np.mean([r["n_test"] for r in rk]), np.mean([r["n_conformal"] for r in rk])
            floor = math.sqrt(a * (1 - a) * (1 / n_test + 1 / n_conf))
            half = int(np.mean([r["n_conformal"] + r["n_test"] for r in rk])) // 2
            exact = math.floor(a * (half + 1)) / (half + 1)
            _, low, high = false_flag_interval(a, int(round(n_conf)))
            rows.append([kind, a, int(n_conf), f"[{low:.4f}, {high:.4f}]", float(np.mean(own)), float(np.min(own)),
                         float(np.max(own)), float(np.mean(res)), exact, float(np.std(res)), floor, len(res)])
    out.append(md_table(["kind", "alpha", "conformal rows", "one deployment, 95% (what training reports)",
                         "models: mean", "models: min", "models: max", "re-splits: mean",
                         "re-splits: exact conformal rate", "re-splits: sd", "sd of a perfect gate (binomial)",
                         "re-splits"], rows))
    out.append("""
The gate's false-flag rate is a split-conformal guarantee in expectation over the calibration draw:
its mean over models and re-splits is what alpha controls -- for n conformal rows exactly
floor(alpha (n + 1)) / (n + 1) (ties aside), the "exact conformal rate" column for the re-splits'
halves, which the measured means match. One deployment's realised rate scatters
around alpha by the binomial spread of a finite calibration split (and the measured rate by that
of a finite test split); the last column is that spread for a gate that is exactly calibrated, so a
measured sd near it means the gate adds no error of its own. The fourth column is where one
deployment's own rate lies over its calibration draw (`hjmodel.train.false_flag_interval`, reported
by training; the models' min and max above also carry their test split's noise). More calibration
rows (`TrainConfig.calibration_fraction`, or `--alpha-tolerance` to require them) narrow it as
1/sqrt(n); `eval/OOD_DEPLOYMENTS.md` measures single deployments where rows are unlimited.

![AUROC by category](ood_battery_auroc.png)

![false-flag rates](ood_battery_alpha.png)
""")
    return "\n".join(out)


def plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in runs))
    methods = (GATE[0], *BASELINES)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.2), sharey=True)
    for ax, kind in zip(np.atleast_1d(axes), kinds):
        rk = [r for r in runs if r["kind"] == kind]
        w = 0.8 / len(methods)
        for i, meth in enumerate(methods):
            vals = [np.mean([category_auroc(r, meth)[c] for r in rk]) for c in CATEGORIES]
            ax.bar(np.arange(len(CATEGORIES)) + (i - len(methods) / 2 + 0.5) * w, vals, w,
                   label="HJ gate" if meth == GATE[0] else meth)
        ax.set_xticks(np.arange(len(CATEGORIES)), list(CATEGORIES), rotation=25, fontsize=8)
        ax.set_ylim(0.0, 1.02)
        ax.set_title(kind)
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("AUROC")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(HERE / "ood_battery_auroc.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for j, a in enumerate(ALPHAS):
        for i, kind in enumerate(kinds):
            rk = [r for r in runs if r["kind"] == kind]
            vals = [v for r in rk for v in r["resplit"][str(a)]]
            x = j * (len(kinds) + 1) + i
            ax.scatter(np.full(len(vals), x) + np.random.default_rng(0).uniform(-0.2, 0.2, len(vals)), vals, s=6, alpha=0.5)
            ax.hlines(np.mean(vals), x - 0.3, x + 0.3, color="k")
        ax.hlines(a, j * (len(kinds) + 1) - 0.5, j * (len(kinds) + 1) + len(kinds) - 0.5, color="r", ls=":")
    ax.set_xticks([j * (len(kinds) + 1) + i for j in range(len(ALPHAS)) for i in range(len(kinds))],
                  [f"{k}\nalpha {a}" for a in ALPHAS for k in kinds], fontsize=7)
    ax.set_ylabel("realised false-flag rate")
    ax.set_title("re-splits of every model (black: mean, red: alpha)")
    fig.tight_layout()
    fig.savefig(HERE / "ood_battery_alpha.png", dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--kinds", default="lse,memory,deep")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from eval/.cache")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    t0 = time.time()
    cache = HERE / ".cache" / "ood_battery.json"
    if args.report_only:
        saved = json.loads(cache.read_text())
        runs, t0 = saved["runs"], time.time() - saved["seconds"]
    else:
        runs = run(args.kinds.split(","), args.seeds)
        cache.parent.mkdir(exist_ok=True)
        cache.write_text(json.dumps({"runs": runs, "seconds": time.time() - t0}))
    plot(runs)
    text = report(runs, time.time() - t0)
    (HERE / "OOD_BATTERY.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
