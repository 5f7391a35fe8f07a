"""Served certified radii against CROWN / IBP run by auto_LiRPA on the same networks.

    pip install --no-deps --target eval/.auto_lirpa <auto_LiRPA 0.7.1 source checkout>
    pip install --target eval/.auto_lirpa appdirs graphviz
    python -m eval.crown [--inputs 50]                  -> eval/CROWN.md + eval/crown_radii.png
    python -m eval.crown --inputs 10 --methods alpha-CROWN --out CROWN_alpha.md

auto_LiRPA (https://github.com/Verified-Intelligence/auto_LiRPA, release 0.7.1) bounds a network's
outputs over an L2 ball; the certified radius of a method is the largest r (bisection, 12 steps,
bracketed by doubling) at which its lower bound on every margin s_c - s_k (k != c) is positive. It has
no log-sum-exp operator, so each LSE layer is rewritten with operators it bounds:

    eps * LSE_group(a / eps)  =  eps * log(exp((a - m) / eps) @ M) + m

with M the (neurons x groups) 0/1 membership matrix and m a constant shift (the largest
pre-activation of the layer over the evaluated inputs, so exp never overflows; a group that underflows
entirely would make the bound -inf, i.e. only looser). The rewrite is exact. The preprocessing is
folded into the first linear map, so radii are in raw input space like the served ones.

For each demo classifier (digits lse / memory / deep, breast_cancer lse), on the first ``--inputs``
correctly classified inputs of its held-out test split: the served ``certified_radius`` (float32,
rounded toward zero), CROWN, IBP, and the attack radius -- the smallest verified adversarial
perturbation found by either of two minimal-perturbation attacks (an upper bound on the true minimal
radius): ``hjmodel.attacks.minimal_attack_radius`` (14 restarts x 100 steps, targeted starts at the
runner-up classes, 14 bisections) and ``eval.attacks.minimal_adversarial_radius`` (14 restarts x 100
steps, 14 bisections), both on log-space class scores and both shrinking every adversarial
direction along its ray. Tightness = radius / attack radius; time per input of one served
evaluation vs one bisection of each method.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hjmodel import functional as F
from hjmodel import load_dataset, load_model
from hjmodel.attacks import held_out

from .certificates import strongest_attack_radius
from .common import md_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET = HERE / ".auto_lirpa"
MODELS = {"digits_lse": "digits", "digits_memory": "digits", "digits_deep": "digits",
          "breast_cancer_lse": "breast_cancer"}


class LSEGroups(nn.Module):
    """s_k = eps * log(exp((W h + b - m_g)/eps) @ M)_k + m_k: one LSE layer in auto_LiRPA's operators,
    every group k shifted by its own constant m_k (exact for any constants)."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, eps: float, shift: torch.Tensor):
        super().__init__()
        M = groups.T.to(W.dtype)                                  # (neurons, groups)
        self.lin = nn.Linear(W.shape[1], W.shape[0])
        self.lin.weight.data, self.lin.bias.data = W.clone(), (b - M @ shift).clone()
        self.register_buffer("M", M.clone())
        self.register_buffer("shift", shift.clone())
        self.eps = float(eps)

    def forward(self, h):
        return self.eps * torch.log(torch.exp(self.lin(h) / self.eps) @ self.M) + self.shift


def _group_max(a: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each group's largest pre-activation at one input: (1, N), (G, N) -> (G,)."""
    return torch.where(groups, a, torch.full_like(a, -math.inf)).amax(-1)


class Rewritten(nn.Module):
    """The class scores of an HJModel (groups lse, or a memory head's class LSEs: the same decision),
    raw input -> (n, K), every group shifted by a constant: its largest pre-activation at ``x0``
    (1, d), or with ``radius`` the largest *lower end* of its pre-activations over the L2 ball of that
    radius (interval bounds, computed here), so that on the ball the sum inside each log is >= 1 at
    its lower end and auto_LiRPA's log never meets its clamp (below)."""

    def __init__(self, model, x0: torch.Tensor, radius: float | None = None):
        super().__init__()
        A, mu = model.preprocess.A, model.preprocess.mu
        layers = []
        lo = hi = None
        maps = [*model.body, model.head]
        for i, layer in enumerate(maps):
            W, b = layer.W.detach(), layer.b.detach()
            if i == 0:
                W, b = W @ A, b - W @ A @ mu
            groups = layer.mask if layer is not model.head or layer.mode == "groups" else layer.V.T > 0.5
            if i == 0:
                centre = F.preactivations(x0, W, b)
                half = (radius or 0.0) * torch.linalg.vector_norm(W, dim=-1)
                lo, hi = centre - half, centre + half
            else:
                lo, hi = F.interval_affine(lo, hi, W, b)
            layers.append(LSEGroups(W, b, groups, layer.eps, _group_max(lo, groups)))
            lo, hi = F.interval_lse_layer(lo, hi, groups, layer.eps)
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


#: auto_LiRPA 0.7.1's log clamps its argument at 1e-12 (``operators/base.py: epsilon``) in the
#: forward, the interval and the relaxation alike: where the lower end of a sum of exponentials lies
#: below it, the log's lower bound is raised to log(1e-12) -- an *unsound* bound (on digits_memory
#: it claimed s_c >= 630 on a ball where PGD finds s_c = 260). The rewrite is re-shifted for every
#: radius (``Rewritten(..., radius)``) so the clamp does not bind, and a bound where it still binds
#: -- or where a log's input bound is off for another numerical reason (:func:`_log_bounds_unsound`)
#: -- is not counted as certified.
LOG_CLAMP = 1e-12


def _log_bounds_unsound(bounded, interval: bool) -> bool:
    """True when a log's input bounds cannot be trusted: its lower end is below the clamp, or above
    the exact lower end of the sum it bounds. Each log's input is exp(.) @ M with M >= 0, whose exact
    lower end is exp(lower) @ M (no cancellation); auto_LiRPA bounds a product by centre and radius,
    ((u + l)/2) M - ((u - l)/2) M, which cancels catastrophically when u >> l (exp over a ball many
    eps wide) and can come out *larger* than the true lower end (on digits_memory: a lower bound
    on s_c of 30.5 where the value at the centre is 26.8). That exact end is for the box of
    pre-activations (``interval``: IBP); CROWN's linear bounds see the ball and may legitimately
    exceed it, so for them only the clamp is checked -- and every method's radius is compared with
    the attack radius in the report (a radius above it is provably unsound)."""
    from auto_LiRPA.operators import BoundExp, BoundLog

    for node in bounded.modules():
        if not isinstance(node, BoundLog):
            continue
        product = node.inputs[0]
        lower = getattr(product, "lower", None)
        if lower is None or bool((lower < LOG_CLAMP).any()):
            return True
        exp_node = next((i for i in product.inputs if isinstance(i, BoundExp)), None)
        matrix = next((i for i in product.inputs if not isinstance(i, BoundExp)), None)
        if exp_node is None or matrix is None:
            return True
        # exp is increasing: its lower end is exp of its input's (CROWN keeps only the latter)
        pre = getattr(exp_node.inputs[0], "lower", None)
        if pre is None:
            return True
        if interval and bool((lower > (torch.exp(pre) @ matrix.forward_value) * (1 + 1e-9)).any()):
            return True
    return False


def certified(build, x: torch.Tensor, C: torch.Tensor, method: str, r0: float) -> tuple[float, float]:
    """Largest r with lower(C f) > 0 on the L2 ball (bisection); (radius, seconds). ``build(r)``
    returns the bounded module for radius r (the rewrite's shifts depend on it)."""
    from auto_LiRPA import BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    spent = [0.0]

    def ok(r: float) -> bool:
        bounded = build(r)   # not timed: a rebuild per radius is this harness's need, not the method's
        ptb = PerturbationLpNorm(norm=2, eps=r)
        t0 = time.perf_counter()
        try:
            lb, _ = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method=method, bound_upper=False)
        except AssertionError:   # auto_LiRPA's NaN check: an exp relaxation overflowed; no bound at r
            return False
        finally:
            spent[0] += time.perf_counter() - t0
        return bool(torch.isfinite(lb).all() and (lb > 0).all()) and not _log_bounds_unsound(bounded, method == "IBP")

    lo, hi = 0.0, max(r0, 1e-6)
    while ok(hi) and hi < 1e4:
        lo, hi = hi, 2 * hi
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, spent[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=50)
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--methods", default="CROWN,IBP,CROWN-IBP", help="auto_LiRPA methods (alpha-CROWN: slow)")
    ap.add_argument("--out", default="CROWN.md")
    ap.add_argument("--only", nargs="*", help="these demo models only (default: every one)")
    args = ap.parse_args()
    if not TARGET.exists():
        print(__doc__)
        return 2
    sys.path.insert(0, str(TARGET))
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from auto_LiRPA import BoundedModule

    methods = args.methods.split(",")
    # auto_LiRPA 0.7.1's alpha-CROWN optimiser fails on float64 tensors (a dtype mismatch in its
    # best-bound bookkeeping): it runs in float32, the other methods in float64
    dtype = torch.float32 if any(m.startswith("alpha") for m in methods) else torch.float64
    rows, per_input = [], {}
    for name, dataset in MODELS.items():
        if args.only and name not in args.only:
            continue
        model = load_model(Path(args.models) / name / "1").double().eval()
        data = load_dataset(dataset)
        split = held_out(model, data.X)
        test = torch.as_tensor(data.X[split]).float().double()       # float32-representable, as served
        pred = model.predict(test)
        keep = (pred == torch.as_tensor(data.y[split])).nonzero().squeeze(-1)[:args.inputs]
        X = test[keep]
        t0 = time.perf_counter()
        ev = model.evaluate(X.float().double(), outputs=("certified_radius",))
        served_s = (time.perf_counter() - t0) / len(X)
        served = ev["certified_radius"].float().double()
        K = model.n_outputs
        res = {m: [] for m in methods}
        secs = {m: [] for m in res}
        build_s = []
        for i in range(len(X)):
            c = int(pred[keep][i])
            t0 = time.perf_counter()
            xi = X[i:i + 1].to(dtype)

            def build(r, xi=xi, x0=X[i:i + 1], model=model):
                net = Rewritten(model, x0, r).to(dtype)
                return BoundedModule(net, xi, device="cpu", bound_opts={"conv_mode": "matrix"})

            assert int(Rewritten(model, X[i:i + 1]).to(dtype)(xi).argmax(-1)) == c, "the rewrite must decide as the model does"
            build(float(served[i]))
            build_s.append(time.perf_counter() - t0)
            C = torch.zeros(1, K - 1, K, dtype=dtype)
            for j, k in enumerate(k for k in range(K) if k != c):
                C[0, j, c], C[0, j, k] = 1.0, -1.0
            for method in res:
                r, sec = certified(build, xi, C, method, float(served[i]) or 0.1)
                res[method].append(r)
                secs[method].append(sec)
        decided = pred[keep]
        attack = strongest_attack_radius(model, X, decided, served).numpy()
        assert (served.numpy() <= attack).all(), f"{name}: an attack beat the served certificate"
        s = served.numpy()
        radii = {m: np.array(v) for m, v in res.items()}
        first = radii[methods[0]]
        per_input[name] = (s, first, attack)
        rows.append([name, len(X), float(np.median(s / attack)), float(np.quantile(s / attack, 0.1)),
                     *[float(np.median(radii[m] / attack)) for m in methods],
                     *[float((s >= radii[m]).mean()) for m in methods],
                     *[int((radii[m] > attack).sum()) for m in methods], served_s * 1e3,
                     *[float(np.mean(secs[m])) * 1e3 for m in methods],
                     float(np.mean(build_s)) * 1e3, float(np.mean(secs[methods[0]]) / served_s)])
        print(rows[-1], flush=True)
    table = md_table(["model", "inputs", "served / attack, median", "served / attack, p10",
                      *[f"{m} / attack, median" for m in methods], *[f"served >= {m}" for m in methods],
                      *[f"{m} > attack (unsound)" for m in methods],
                      "served ms / input", *[f"{m} ms / input (bisection)" for m in methods],
                      "auto_LiRPA build ms / input", f"{methods[0]} time / served time"], rows)
    (HERE / args.out).write_text(f"""# Served certified radii against auto_LiRPA ({", ".join(methods)})

Generated by `python -m eval.crown --inputs {args.inputs} --methods {args.methods}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}:
auto_LiRPA 0.7.1 on the LSE rewrite described in `eval/crown.py`, {"float32" if dtype == torch.float32 else "float64"}, one thread, the demo
classifiers, the first {args.inputs} correctly classified inputs of each one's held-out test split. The attack
radius is the smallest verified adversarial perturbation either attack found (`eval/crown.py` says which);
it is an upper bound on the true minimal adversarial radius, so every ratio to it is a lower bound on
tightness.

{table}

![served vs {methods[0]}]({Path(args.out).stem.lower()}_radii.png)
""")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_input), figsize=(4.2 * len(per_input), 4))
    for ax, (name, (s, cr, _attack)) in zip(np.atleast_1d(axes), per_input.items()):
        ax.scatter(cr, s, s=10)
        top = max(cr.max(), s.max()) * 1.05
        ax.plot([0, top], [0, top], "k:")
        ax.set_xlabel(f"{methods[0]} radius")
        ax.set_ylabel("served radius")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(HERE / f"{Path(args.out).stem.lower()}_radii.png", dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
