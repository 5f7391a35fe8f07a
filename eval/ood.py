"""OOD: the hjmodel gate (split-conformal over u and 1 - max prob) against max-softmax, energy,
Mahalanobis and k-NN scores computed on the same model and the same head features, on digits
models trained without some classes."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.metrics import roc_auc_score

from hjmodel import functional as F

from .common import dataset_arrays, md_table

METHODS = [("hj_gate", "**HJ gate (served p-value)**"), ("hj_u", "HJ u only (unsupported)"),
           ("msp", "max-softmax"), ("energy", "energy (-logsumexp logits)"),
           ("mahalanobis", "Mahalanobis (head features)"), ("knn", "k-NN distance (k=5, head features)")]


def _other_dataset(loader, n_pix=64, seed=0) -> torch.Tensor:
    """Another dataset mapped into the digits input space: z-score each feature, resample the row
    (linear interpolation over the feature index) to 64 values, map to pixels 8 + 4 z clipped to
    [0, 16] (the digits pixel range)."""
    X = loader().data.astype(np.float64)
    Z = (X - X.mean(0)) / (X.std(0) + 1e-12)
    grid = np.linspace(0, Z.shape[1] - 1, n_pix)
    R = np.stack([np.interp(grid, np.arange(Z.shape[1]), row) for row in Z])
    return torch.as_tensor(np.clip(8.0 + 4.0 * R, 0.0, 16.0))


def ood_sets(X_te: torch.Tensor, X_heldout: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = X_te.shape[0]
    return {
        "held-out classes": X_heldout,
        "uniform noise [0,16]": 16.0 * torch.rand(n, X_te.shape[1], generator=gen, dtype=torch.float64),
        "scaled x2": 2.0 * X_te,
        "shifted +4": X_te + 4.0,
        "breast_cancer->64": _other_dataset(load_breast_cancer),
        "wine->64": _other_dataset(load_wine),
    }


class Scorer:
    """All scores (higher = more OOD) from one model; the baselines are fitted on the training split."""

    def __init__(self, model, X_tr: torch.Tensor, y_tr: np.ndarray, k: int = 5):
        self.model, self.k = model, k
        with torch.no_grad():
            H = model.features(X_tr)
        self.H = H
        K = model.n_outputs
        y = torch.as_tensor(y_tr)
        self.means = torch.stack([H[y == c].mean(0) for c in range(K)])
        C = H - self.means[y]
        cov = C.T @ C / H.shape[0]
        cov = cov + 1e-3 * (torch.trace(cov) / cov.shape[0]) * torch.eye(cov.shape[0], dtype=cov.dtype)
        self.prec = torch.linalg.inv(cov)

    @torch.no_grad()
    def scores(self, X: torch.Tensor) -> dict[str, np.ndarray]:
        m = self.model
        out = m.evaluate(X, outputs=("ood_p_value", "ood_score", "probabilities"))
        a, h = out.a, out.h
        head = m.head
        if head.mode == "groups":
            logits = F.group_lse(a, head.mask, head.eps) / head.eps
        else:   # unnormalised class log-scores of the Gibbs average
            logits = F.group_lse(a, head.V.T > 0.5, head.eps) / head.eps
        d = h.unsqueeze(1) - self.means.unsqueeze(0)
        maha = torch.einsum("nkd,de,nke->nk", d, self.prec, d).min(-1).values
        dist = torch.cdist(h, self.H)
        knn = dist.topk(self.k, dim=-1, largest=False).values[:, -1]
        return {"hj_gate": (1.0 - out["ood_p_value"]).numpy(), "hj_u": out["ood_score"].numpy(),
                "msp": (-out["probabilities"].max(-1).values).numpy(),
                "energy": (-torch.logsumexp(logits, -1)).numpy(),
                "mahalanobis": maha.numpy(), "knn": knn.numpy(),
                "_p": out["ood_p_value"].numpy()}


def auroc_fpr95(s_in: np.ndarray, s_out: np.ndarray) -> tuple[float, float]:
    """AUROC (OOD = positive) and FPR at 95% TPR: the threshold accepts 95% of in-distribution
    test points, FPR = fraction of OOD points also accepted (missed)."""
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    auc = roc_auc_score(y, np.r_[s_in, s_out])
    thr = np.quantile(s_in, 0.95, method="higher")
    return float(auc), float((s_out <= thr).mean())


def study(model, splits, exclude: list[int], alpha_grid=(0.01, 0.05, 0.1, 0.2)) -> dict:
    X, y = dataset_arrays("digits", exclude)
    Xfull, yfull = dataset_arrays("digits")
    X_held = Xfull[np.isin(yfull, exclude)]
    tr, ca, te = (np.asarray(splits[k]) for k in ("train", "calibration", "test"))
    scorer = Scorer(model, X[tr], y[tr])
    s_in = scorer.scores(X[te])
    s_cal = scorer.scores(X[ca])
    res = {"auroc": {}, "fpr95": {}, "detect": {}, "n_in": len(te)}
    sets = ood_sets(X[te], X_held, seed=sum(exclude))
    s_out_all = {}
    for name, Xo in sets.items():
        so = scorer.scores(Xo)
        s_out_all[name] = so
        for meth, _ in METHODS:
            auc, fpr = auroc_fpr95(s_in[meth], so[meth])
            res["auroc"][(name, meth)] = auc
            res["fpr95"][(name, meth)] = fpr
        res.setdefault("n_out", {})[name] = Xo.shape[0]
    # realised false-flag rate of the served gate vs target alpha (p <= alpha flags)
    p_in = s_in["_p"]
    res["alpha"] = {a: float((p_in <= a).mean()) for a in alpha_grid}
    # at alpha = 0.05: baselines thresholded by the same split-conformal rule on the calibration split
    alpha = 0.05
    for meth, _ in METHODS:
        if meth == "hj_gate":
            flag_in = p_in <= alpha
            flags = {n: (so["_p"] <= alpha) for n, so in s_out_all.items()}
        else:
            cal = np.sort(s_cal[meth])
            kq = int(math.ceil((1 - alpha) * (len(cal) + 1))) - 1
            thr = cal[min(kq, len(cal) - 1)]
            flag_in = s_in[meth] > thr
            flags = {n: so[meth] > thr for n, so in s_out_all.items()}
        res["detect"][meth] = {"ffr": float(flag_in.mean()), **{n: float(f.mean()) for n, f in flags.items()}}
    res["sets"] = list(sets)
    return res


def report(runs: list[tuple[str, dict]]) -> str:
    """runs: (label, study result) per trained model."""
    out = []
    sets = runs[0][1]["sets"]
    for metric, title in [("auroc", "AUROC (higher is better)"), ("fpr95", "FPR at 95% TPR (lower is better)")]:
        out.append(f"\n**{title}**, mean over {len(runs)} models ({', '.join(lab for lab, _ in runs)}):\n")
        rows = []
        for meth, lab in METHODS:
            vals = [np.mean([r[metric][(s, meth)] for _, r in runs]) for s in sets]
            rows.append([lab, *vals, float(np.mean(vals))])
        out.append(md_table(["score", *sets, "mean"], rows))
    out.append("\n**Per model** (AUROC, HJ gate vs the best baseline per OOD set):\n")
    rows = []
    for label, r in runs:
        for s in sets:
            base = {m: r["auroc"][(s, m)] for m, _ in METHODS if not m.startswith("hj")}
            bm = max(base, key=base.get)
            rows.append([label, s, r["n_out"][s], r["auroc"][(s, "hj_gate")], r["auroc"][(s, "hj_u")],
                         f"{bm}: {base[bm]:.3f}"])
    out.append(md_table(["model", "OOD set", "n", "HJ gate", "HJ u", "best baseline"], rows))
    out.append("\n**Realised false-flag rate vs target alpha** (served gate, in-distribution test split; "
               "the calibration split is disjoint):\n")
    alphas = list(runs[0][1]["alpha"])
    rows = [[label, r["n_in"], *[r["alpha"][a] for a in alphas]] for label, r in runs]
    out.append(md_table(["model", "n test", *[f"alpha={a}" for a in alphas]], rows))
    out.append("\n**At alpha = 0.05, every score thresholded by the same split-conformal rule on the calibration "
               "split**: realised false-flag rate on in-distribution test, and the fraction of each OOD set flagged "
               f"(mean over {len(runs)} models):\n")
    rows = []
    for meth, lab in METHODS:
        d = [r["detect"][meth] for _, r in runs]
        rows.append([lab, float(np.mean([x["ffr"] for x in d])), *[float(np.mean([x[s] for x in d])) for s in sets]])
    out.append(md_table(["score", "false-flag rate", *sets], rows))
    return "\n".join(out)


def plot(runs, path_auc, path_alpha):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = runs[0][1]["sets"]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    w = 0.8 / len(METHODS)
    for i, (meth, lab) in enumerate(METHODS):
        vals = [np.mean([r["auroc"][(s, meth)] for _, r in runs]) for s in sets]
        ax.bar(np.arange(len(sets)) + (i - len(METHODS) / 2 + 0.5) * w, vals, w, label=lab.strip("*"))
    ax.set_xticks(np.arange(len(sets)), sets)
    ax.set_ylim(0.0, 1.02)
    ax.axhline(0.5, color="k", ls=":", lw=1)
    ax.set_ylabel("AUROC (OOD = positive)")
    ax.set_title(f"OOD detection on digits models trained without some classes (mean of {len(runs)} models)")
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.09))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_auc, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for label, r in runs:
        a = list(r["alpha"])
        ax.plot(a, [r["alpha"][x] for x in a], "o-", label=label)
    ax.plot([0, 0.22], [0, 0.22], "k:", label="target")
    ax.set_xlabel("target alpha")
    ax.set_ylabel("realised false-flag rate (ID test)")
    ax.set_title("OOD gate calibration")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_alpha, dpi=110)
    plt.close(fig)
