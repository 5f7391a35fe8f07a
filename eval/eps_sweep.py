"""The eps trade-off (Thm 8.1 / Cor 8.2): accuracy, certified radius and attribution entropy across
eps = f x eps* for the lse kind on digits."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from .certificates import radii
from .common import dataset_arrays, get_model, md_table

FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def sweep(base_cfg, eps_star: float, fresh=False, epochs=60) -> dict:
    X, y = dataset_arrays("digits")
    rows = []
    for f in FACTORS:
        cfg = replace(base_cfg, eps=f * eps_star, epochs=epochs)
        model, splits, metrics, secs = get_model(f"digits_lse_eps{f}", "digits", cfg, fresh)
        te = np.asarray(splits["test"])
        with torch.no_grad():
            out = model.evaluate(X[te], outputs=("certified_radius", "attribution_entropy", "prediction"))
            rr = radii(model, X[te])
        pieces = int(model.head.mask[0].sum())
        rows.append({"factor": f, "eps": f * eps_star, "accuracy": float((out["prediction"].numpy() == y[te]).mean()),
                     "radius_median": float(out["certified_radius"].median()),
                     "lipschitz_median": float(rr["lipschitz"].median()),
                     "eq15_median": float(rr["eq15"].median()),
                     "entropy_median": float(out["attribution_entropy"].median()),
                     "entropy_max": math.log(pieces), "train_s": secs})
    tr = np.asarray(splits["train"])
    Xs = (X.numpy() - X[tr].numpy().mean(0)) / (X[tr].numpy().std(0) + 1e-9)
    lr = LogisticRegression(max_iter=2000).fit(Xs[tr], y[tr])
    return {"rows": rows, "logreg": float(lr.score(Xs[te], y[te])), "eps_star": eps_star, "epochs": epochs}


def report(res) -> str:
    out = [f"lse kind, digits, {res['epochs']} epochs per model (the certificate models use 150), eps* = "
           f"{res['eps_star']:.3f} (median nearest-neighbour distance of the standardised training set). "
           f"Baselines: multinomial logistic regression on the same split = accuracy {res['logreg']:.3f}; "
           "radius baselines are the Lipschitz and eq. 15 radii of the same models. Entropy is of the predicted "
           "class's Gibbs weights, max log 8 = 2.08.\n"]
    rows = [[f"{r['factor']}x", r["eps"], r["accuracy"], r["radius_median"], r["lipschitz_median"], r["eq15_median"],
             r["entropy_median"]] for r in res["rows"]]
    out.append(md_table(["eps / eps*", "eps", "test accuracy", "median certified radius (hybrid)",
                         "median Lipschitz radius", "median eq. 15 radius", "median attribution entropy"], rows))
    return "\n".join(out)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    f = [r["factor"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.plot(f, [r["accuracy"] for r in rows], "o-", label="LSE (lse kind)")
    ax.axhline(res["logreg"], color="gray", ls="--", label="logistic regression")
    ax.set_ylabel("test accuracy")
    ax = axes[1]
    ax.plot(f, [r["radius_median"] for r in rows], "o-", label="hybrid (served)")
    ax.plot(f, [r["lipschitz_median"] for r in rows], "s--", label="Lipschitz m/L")
    ax.plot(f, [r["eq15_median"] for r in rows], "^:", label="paper eq. 15")
    ax.set_ylabel("median certified L2 radius (pixels)")
    ax = axes[2]
    ax.plot(f, [r["entropy_median"] for r in rows], "o-", label="median H(pi)")
    ax.axhline(rows[0]["entropy_max"], color="gray", ls="--", label="max = log 8")
    ax.set_ylabel("attribution entropy (nats)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(f, [f"{x}x" for x in f])
        ax.axvline(1.0, color="k", ls=":", lw=1)
        ax.set_xlabel("eps / eps*")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("eps trade-off on digits (lse kind): dotted line = eps*")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
