"""Attributions: exact closed-form integrated gradients vs Captum, closed-form saliency and label
sensitivity vs autograd, and (memory kind) Gibbs attributions vs leave-one-out re-evaluation."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from hjmodel import functional as F

from .common import md_table, timeit


def _outputs(model, x):
    """The outputs the attributions explain: group LSE values s (lse/deep), Gibbs average yhat
    (memory), regression values."""
    return model.head.outputs(model.head.preactivations(model.features(x)))


def _decision(model, X):
    with torch.no_grad():
        out = model.evaluate(X, outputs=())
    return out.decision


def ig_vs_captum(model, X) -> dict:
    X = X.detach()
    from captum.attr import IntegratedGradients

    c = _decision(model, X)
    x0 = model.preprocess.mu.expand_as(X)
    ours = model.integrated_gradients(X)
    t_ours = timeit(lambda: model.integrated_gradients(X), repeat=2) / X.shape[0]
    with torch.no_grad():
        fx = _outputs(model, X).gather(1, c[:, None]).squeeze(1)
        f0 = _outputs(model, x0).gather(1, c[:, None]).squeeze(1)
    delta_f = (fx - f0).abs().clamp_min(1e-12)
    res = {"ours_completeness": float(((ours.sum(-1) - (fx - f0)).abs() / delta_f).median()),
           "ours_us": 1e6 * t_ours, "captum": {}}
    ig = IntegratedGradients(lambda x: _outputs(model, x))
    for steps in (20, 50, 300):
        t0 = time.perf_counter()
        cap = ig.attribute(X, baselines=x0, target=c, n_steps=steps, internal_batch_size=4096).detach()
        t = (time.perf_counter() - t0) / X.shape[0]
        rel = torch.linalg.vector_norm(cap - ours, dim=-1) / torch.linalg.vector_norm(ours, dim=-1).clamp_min(1e-300)
        res["captum"][steps] = {"rel_median": float(rel.median()), "rel_max": float(rel.max()),
                                "completeness": float(((cap.sum(-1) - (fx - f0)).abs() / delta_f).median()),
                                "us": 1e6 * t}
    return res


def memory_saliency_reference(model, X: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """grad yhat_c = sum_j pi_j (v_jc - p_c) w_j / eps of a memory classifier (one-hot labels, no
    body) in numpy's longdouble (80 bits on x86; float64 where that is all numpy has), with 1 - p_c
    summed over the other classes' Gibbs weights, so it keeps every digit where the model is sure:
    there float64's v_jc - p_c, as written and as autograd's softmax backward forms it, has none
    (1 - p_c rounds to 0). Rows X (n, d), classes c (n,) -> (gradients (n, d) float64, 1 - p_c (n,))."""
    L = np.longdouble
    A = model.preprocess.A.detach().numpy().astype(L)
    mu = model.preprocess.mu.detach().numpy().astype(L)
    W = model.head.W.detach().numpy().astype(L)
    b = model.head.b.detach().numpy().astype(L)
    V = model.head.V.detach().numpy() > 0.5
    eps = L(model.head.eps)
    grads, rests = [], []
    for x, k in zip(np.asarray(X, dtype=np.float64), np.asarray(c)):
        a = W @ ((x.astype(L) - mu) @ A) + b
        pi = np.exp((a - a.max()) / eps)
        pi /= pi.sum()
        own = V[:, int(k)]
        rest = pi[~own].sum()                                   # 1 - p_c without cancellation
        coef = np.where(own, pi * rest, -pi * pi[own].sum())    # pi_j (v_jc - p_c)
        grads.append(A @ (coef @ W / eps))                      # raw input space: h = (x - mu) A
        rests.append(rest)
    return np.asarray(grads, dtype=np.float64), np.asarray(rests, dtype=np.float64)


def saliency_vs_autograd(model, X) -> dict:
    """The closed-form and the served saliency against a reference: autograd's gradient of the same
    float64 model, except for a memory classifier, whose autograd gradient loses every digit where
    the model is sure (its softmax backward forms v_jc - p_c); there the reference is
    :func:`memory_saliency_reference`, and autograd's own error against it is reported too."""
    c = _decision(model, X)
    ours = model.output_gradient(X, c)
    t_ours = timeit(lambda: model.output_gradient(X, c)) / X.shape[0]

    def auto():
        x = X.clone().requires_grad_(True)
        y = _outputs(model, x).gather(1, c[:, None]).sum()
        return torch.autograd.grad(y, x)[0]

    g = auto()
    t_auto = timeit(auto) / X.shape[0]
    served = model.evaluate(X, outputs=("saliency",))["saliency"]
    memory = model.head.mode == "values" and model.task == "classification" and not model.body
    ref = torch.as_tensor(memory_saliency_reference(model, X.numpy(), c.numpy())[0]) if memory else g

    def rel_max(got):
        return float((torch.linalg.vector_norm(got - ref, dim=-1)
                      / torch.linalg.vector_norm(ref, dim=-1).clamp_min(1e-300)).max())

    return {"reference": "extended precision" if memory else "autograd", "rel_max": rel_max(ours),
            "served_rel_max": rel_max(served), "auto_rel_max": rel_max(g) if memory else None,
            "ours_us": 1e6 * t_ours, "auto_us": 1e6 * t_auto}


def label_sensitivity_vs_autograd(model, X) -> dict:
    """lse: d s_c / d g_j = -pi_j (g_j = -b_j - t|w_j|^2, w fixed); memory: d yhat_c / d V_jc = pi_j.
    Autograd row by row (one backward per input) against the closed form for all N neurons."""
    head = model.head
    with torch.no_grad():
        out = model.evaluate(X, outputs=("label_sensitivity", "attribution_index"))
    c, pi = out.decision, out.pi
    ours = (-pi if head.mode == "groups" else pi)
    t_ours = timeit(lambda: model.evaluate(X, outputs=("label_sensitivity",))) / X.shape[0]
    with torch.no_grad():
        h = model.features(X)

    def auto():
        rows = []
        for i in range(X.shape[0]):
            if head.mode == "groups":
                b = head.b.detach().clone().requires_grad_(True)
                a = F.preactivations(h[i:i + 1], head.W.detach(), b)
                s = F.group_lse(a, head.mask, head.eps)[0, c[i]]
                rows.append(-torch.autograd.grad(s, b)[0])          # d/dg = -d/db
            else:
                V = head.V.detach().clone().requires_grad_(True)
                pi_i = F.gibbs(head.preactivations(h[i:i + 1]), head.eps)
                y = (pi_i @ V)[0, c[i]]
                rows.append(torch.autograd.grad(y, V)[0][:, c[i]])
        return torch.stack(rows)

    g = auto()
    t_auto = timeit(auto, repeat=1) / X.shape[0]
    served = out["label_sensitivity"]
    err_all = float((ours - g).abs().max())
    err_served = float((served - g.gather(1, out["attribution_index"])).abs().max())
    return {"abs_max": err_all, "served_abs_max": err_served, "ours_us": 1e6 * t_ours, "auto_us": 1e6 * t_auto}


def label_sensitivity_exponent_check(X_tr, y_tr, X_te, eps=None, t=None, n=100) -> dict:
    """Prop F.1 with labels in the exponent (regression memory): d yhat/d g_j = pi_j (1 - (g_j -
    yhat)/eps) vs autograd, on diabetes (standardised features and target)."""
    mu, sd = X_tr.mean(0), X_tr.std(0)
    Y = (X_tr - mu) / sd
    Z = (X_te[:n] - mu) / sd
    g = torch.as_tensor((y_tr - y_tr.mean()) / y_tr.std(), dtype=torch.float64)
    eps = eps or F.eps_star(Y)
    t = t or eps / 10

    def yhat_of(gv, z):
        pi = F.gibbs(-(gv + F.squared_distances(z, Y) / (4 * t)) / eps, 1.0)
        return pi, (pi * gv).sum(-1)

    pi, yh = yhat_of(g, Z)
    ours = F.label_sensitivity_exponent(pi, g, yh, eps)
    rows = []
    for i in range(Z.shape[0]):
        gv = g.clone().requires_grad_(True)
        rows.append(torch.autograd.grad(yhat_of(gv, Z[i:i + 1])[1].sum(), gv)[0])
    auto = torch.stack(rows)
    return {"abs_max": float((ours - auto).abs().max()), "scale": float(auto.abs().max())}


@torch.no_grad()
def memory_loo(model, X, ks=(1, 5, 10), seed=0, n_rank=20) -> dict:
    """Remove the top-attributed / a random / the lowest-attributed support examples and re-evaluate
    the model (mask their neurons): which moves the predicted-class probability most?"""
    head = model.head
    gen = torch.Generator().manual_seed(seed)
    h = model.features(X)
    a = head.preactivations(h)
    pi = F.gibbs(a, head.eps)
    V = head.V
    yhat = pi @ V
    c = yhat.argmax(-1)
    p0 = yhat.gather(1, c[:, None]).squeeze(1)
    n, N = pi.shape
    order = torch.argsort(pi, dim=-1, descending=True)
    res = {}
    for k in ks:
        choice = {"top-attributed": order[:, :k], "random": torch.stack([torch.randperm(N, generator=gen)[:k]
                                                                      for _ in range(n)]),
                  "lowest-attributed": order[:, -k:]}
        for name, idx in choice.items():
            a2 = a.scatter(1, idx, -math.inf)
            y2 = F.gibbs(a2, head.eps) @ V
            p2 = y2.gather(1, c[:, None]).squeeze(1)
            # closed form of the removal (Gibbs average without the removed mass), checked too
            mass = pi.gather(1, idx).sum(-1, keepdim=True)
            pred = (yhat - torch.einsum("nk,nkc->nc", pi.gather(1, idx), V[idx])) / (1 - mass)
            ok = (1 - mass.squeeze(-1)) > 1e-6   # rows where the removed mass is not (numerically) all of it
            res[(name, k)] = {"drop_mean": float((p0 - p2).mean()), "abs_mean": float((p0 - p2).abs().mean()),
                              "flip": float((y2.argmax(-1) != c).double().mean()),
                              "closed_form_err": float((pred - y2)[ok].abs().max()) if ok.any() else float("nan")}
    # rank agreement: pi_j vs |change of p_c| when removing example j alone, every j (n_rank inputs)
    rhos = []
    for i in range(min(n_rank, n)):
        A = a[i].expand(N, N).clone()
        A.fill_diagonal_(-math.inf)
        p_loo = (F.gibbs(A, head.eps) @ V[:, c[i]])
        rho = spearmanr(pi[i].numpy(), (p0[i] - p_loo).abs().numpy()).statistic
        rhos.append(rho)
    res["spearman"] = float(np.median(rhos))
    res["n"] = n
    return res


def report(ig, sal, lab, lab_exp, loo) -> str:
    out = ["**Integrated gradients**: closed form (`HJModel.integrated_gradients`; exact 1-D quadrature of the "
           "Gibbs weights for `lse`, Gauss-Legendre quadrature of the closed-form gradient with 256 nodes for "
           "`memory` and `deep`, 20 inputs there, 100 for `lse`) vs Captum `IntegratedGradients` (Gauss-Legendre, same model, same baseline = "
           "training mean, same target). Error = |IG_captum - IG_ours| / |IG_ours| (median / max over inputs); "
           "completeness = |sum IG - (f(x) - f(x0))| / |f(x) - f(x0)| (median).\n"]
    rows = []
    for name, r in ig.items():
        rows.append([name, "closed form (ours)", "-", "-", r["ours_completeness"], r["ours_us"]])
        for steps, c in r["captum"].items():
            rows.append([name, f"Captum, n_steps={steps}", c["rel_median"], c["rel_max"], c["completeness"], c["us"]])
    out.append(md_table(["model", "method", "median rel. diff to ours", "max rel. diff", "completeness error",
                         "us / input"], rows))
    out.append("\n**Saliency** (gradient of the decisive output in raw input space): the closed form "
               "(`HJModel.output_gradient`) and the served `saliency` against autograd (forward + backward of "
               "the same float64 model) -- except for the memory classifier, where autograd's softmax backward "
               "forms v_jc - p_c and loses every digit on the rows the model is surest of (1 - p_c below "
               "float64's resolution): there the reference is the same sum in extended precision with 1 - p_c "
               "summed over the other classes (`eval.attributions.memory_saliency_reference`), and autograd's "
               "own error against it is reported.\n")
    rows = [[n, r["reference"], r["rel_max"], r["served_rel_max"],
             "-" if r["auto_rel_max"] is None else r["auto_rel_max"], r["ours_us"], r["auto_us"]]
            for n, r in sal.items()]
    out.append(md_table(["model", "reference", "max rel. error (closed form)", "max rel. error (served `saliency`)",
                         "max rel. error (autograd)", "closed form us/input", "autograd us/input"], rows))
    out.append("\n**Label sensitivity** (Prop F.1) vs autograd, all N neurons per input (`lse`: d s_c/d g_j = "
               "-pi_j; `memory`: d yhat_c/d v_jc = pi_j); autograd needs one backward per input.\n")
    rows = [[n, r["abs_max"], r["served_abs_max"], r["ours_us"], r["auto_us"]] for n, r in lab.items()]
    rows.append(["diabetes, memory with labels in the exponent (functional)", lab_exp["abs_max"], "-", "-", "-"])
    out.append(md_table(["model", "max abs error (all N)", "max abs error (served top-k)",
                         "closed form us/input (whole evaluate)", "autograd us/input"], rows))
    out.append(f"\n(largest |d yhat/d g_j| in the exponent check: {lab_exp['scale']:.3g})\n")
    out.append(f"\n**Memory model: Gibbs attributions vs leave-one-out re-evaluation** ({loo['n']} digits test "
               "inputs; remove k support examples from the memory and re-evaluate; the baseline is removing "
               "random / the lowest-attributed examples). Drop = p_c(before) - p_c(after) of the predicted class.\n")
    rows = []
    for k in (1, 5, 10):
        for name in ("top-attributed", "random", "lowest-attributed"):
            r = loo[(name, k)]
            rows.append([k, name, r["drop_mean"], r["abs_mean"], r["flip"], r["closed_form_err"]])
    out.append(md_table(["k removed", "which", "mean drop of p_c", "mean abs change", "decision flip rate",
                         "closed-form removal (yhat - sum pi_j v_j)/(1 - sum pi_j) vs re-evaluation (max abs)"], rows))
    out.append(f"\nMedian Spearman rank correlation between pi_j and |change of p_c| when example j alone is "
               f"removed (all N examples, 20 inputs): **{loo['spearman']:.3f}**.")
    return "\n".join(out)
