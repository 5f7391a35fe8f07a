"""The served certified radius is never below interval bound propagation (IBP) on the same network.

IBP bounds every pre-activation over the L2 ball (the first linear map's exactly, +- r |row|), passes
the bounds through each LSE layer (increasing in every argument) and affine map (centre and |W|
half-width), and certifies when the decided class's lower LSE exceeds every other class's upper
LSE. It is cheap and sometimes beats the closed-form radius (breast_cancer_lse on about half its
test inputs, digits_deep on ~1%), so the served graph searches it above the closed form and serves
the larger (``HJModel._interval_radius``). Checked here against an independent IBP written out with
(K, N) masks and 60 bisection steps; plus the root search's own contract.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hjmodel import functional as F
from hjmodel import load_dataset, load_model
from hjmodel.attacks import DT, held_out
from hjmodel.models import ROUNDING


def _masked_lse(a: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """(n, N), (K, N) -> (n, K), written out: the reference does not share the model's group tables."""
    s = torch.where(mask, a.unsqueeze(1) / eps, -math.inf)
    top = s.amax(-1, keepdim=True).clamp_min(-1e300)
    return eps * (top.squeeze(-1) + torch.log(torch.exp(s - top).sum(-1)))


def _ibp_certifies(model, x: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    A, mu = model.preprocess.A, model.preprocess.mu
    maps = [*model.body, model.head]
    W0 = maps[0].W @ A
    a = (x - mu) @ W0.T + maps[0].b
    half = r[:, None] * W0.norm(dim=-1)
    lo, hi = a - half, a + half
    for i, layer in enumerate(model.body):
        lo, hi = _masked_lse(lo, layer.mask, layer.eps), _masked_lse(hi, layer.mask, layer.eps)
        W, b = maps[i + 1].W, maps[i + 1].b
        centre, rad = (lo + hi) / 2, (hi - lo) / 2
        lo, hi = centre @ W.T + b - rad @ W.abs().T, centre @ W.T + b + rad @ W.abs().T
    groups = model.head.mask if model.head.mode == "groups" else model.head.V.T > 0.5
    s_lo, s_hi = _masked_lse(lo, groups, model.head.eps), _masked_lse(hi, groups, model.head.eps)
    own = s_lo.gather(1, c[:, None]).squeeze(1)
    other = s_hi.scatter(1, c[:, None], -math.inf).amax(1)
    return own - other > ROUNDING * (own.abs() + other.abs())


def _ibp_radius(model, x, c, hi) -> torch.Tensor:
    lo = torch.zeros_like(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        ok = _ibp_certifies(model, x, c, mid)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


CASES = [("digits_lse", "digits"), ("digits_memory", "digits"), ("digits_deep", "digits"),
         ("breast_cancer_lse", "breast_cancer")]


@pytest.mark.parametrize(("name", "dataset"), CASES)
def test_served_radius_is_never_below_ibp(demo_repository, name, dataset):
    model = load_model(demo_repository / name / "1").double().eval()
    data = load_dataset(dataset)
    x = torch.as_tensor(data.X[held_out(model, data.X)][:120], dtype=torch.float32).to(DT)
    ev = model.evaluate(x, outputs=("certified_radius", "prediction"))
    r, c = ev["certified_radius"], ev["prediction"]
    r_ibp = _ibp_radius(model, x, c, 4.0 * r.clamp_min(1e-3))
    assert bool((r_ibp <= 1.01 * 4.0 * r.clamp_min(1e-3)).all())          # the bracket held
    gap = (r_ibp / r.clamp_min(1e-300))[r_ibp > 0]
    assert float(gap.max()) <= 1.0 + 1e-5, f"{name}: IBP reaches {float(gap.max()):.6f} x the served radius"


def test_breast_cancer_radius_gains_from_ibp(demo_repository):
    """The max is not idle: on breast_cancer_lse the IBP radius is the larger on many inputs."""
    model = load_model(demo_repository / "breast_cancer_lse" / "1").double().eval()
    data = load_dataset("breast_cancer")
    x = torch.as_tensor(data.X[held_out(model, data.X)], dtype=DT)
    ev = model.evaluate(x, outputs=("certified_radius", "prediction"))
    closed = model._certified_radius(*_closed_form_args(model, x, ev["prediction"]))
    assert float((ev["certified_radius"] > closed * (1 + 1e-9)).double().mean()) > 0.2
    assert bool((ev["certified_radius"] >= closed).all())


def _closed_form_args(model, x, c):
    _, gibbs_body, a = model.trace(x)
    grouped = model.head.grouped(a)
    return a, gibbs_body, c, None, torch.zeros(len(x), dtype=DT), grouped


def test_decreasing_root_contract():
    gen = torch.Generator().manual_seed(0)
    root = torch.rand(200, generator=gen, dtype=DT) * 10 + 0.1

    def f(r):   # decreasing, root at `root`, kinked and flat in places
        return torch.where(r < root, (root - r) ** 0.5, -(r - root) ** 2).clamp(max=2.0)

    lo = root * torch.rand(200, generator=gen, dtype=DT)
    lo[:20] = root[:20] * 1.5                     # f(lo) <= 0: lo comes back unchanged
    hi = torch.maximum(8 * lo, 2 * root)          # a bracket
    hi[20:40] = root[20:40] * 0.99                # f(hi) > 0: hi comes back
    hi[20:40] = torch.maximum(hi[20:40], lo[20:40])
    r = F.decreasing_root(f, lo, hi, 6)
    assert torch.equal(r[:20], lo[:20])
    assert torch.equal(r[20:40], hi[20:40])
    assert bool((f(r)[20:] > 0).all())                        # sound: every answer was checked positive
    assert bool((r[40:] <= root[40:]).all())

    def g(r):   # smooth like an IBP margin: a difference of LSEs of lines in r
        return torch.logaddexp(2.0 - r, 1.0 - 0.5 * r) - torch.logaddexp(-1.0 + root * 0.0 + r, r - 3.0) - root / 10
    lo = torch.full_like(root, 1e-3)
    r = F.decreasing_root(g, lo, 8 * torch.ones_like(root), 6)
    exact = _bisect(g, lo, 8 * torch.ones_like(root))
    assert bool((g(r) > 0).all()) and float(((exact - r) / exact).max()) < 1e-6


def _bisect(f, lo, hi):
    for _ in range(80):
        mid = (lo + hi) / 2
        ok = f(mid) > 0
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


def test_ibp_margin_with_infinite_bounds_never_certifies():
    own = torch.tensor([1.0, -math.inf, 2.0, -math.inf], dtype=DT)
    other = torch.tensor([-math.inf, -math.inf, 1.0, 0.0], dtype=DT)
    m = F.interval_margin(own, other, ROUNDING)
    assert not bool(m[0] > 0) and not bool(m[1] > 0) and not bool(m[3] > 0)
    np.testing.assert_allclose(float(m[2]), 1.0 - ROUNDING * 3.0)
