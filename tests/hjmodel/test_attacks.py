"""The attack every certificate claim is checked with (:mod:`hjmodel.attacks`) finds the true
boundary where it is known in closed form.

A memory head with one support point per class decides by the nearer point (equal learned
biases): its minimal adversarial L2 radius is the distance to the bisecting hyperplane, exactly.
With a small eps its probabilities are exactly 0 / 1 a short way from that plane, so an attack on
probabilities has no gradient there; the attack works on log-space class scores, starts toward
every other class, and shrinks every adversarial direction along its ray.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hjmodel.attacks import DT, minimal_attack_radius, pgd_l2
from hjmodel.models import HJModel, OODReference
from hjmodel.nn import MemoryClassifier


def _nearest_point_model(points: np.ndarray, eps: float) -> HJModel:
    d = points.shape[1]
    net = MemoryClassifier(points, np.arange(len(points)), len(points), eps=eps, mean=np.zeros(d),
                           scale=np.ones(d))
    ref = OODReference(points=torch.zeros(1, d, dtype=DT), t=1.0, eps=1.0)   # no gate: not attacked here
    return HJModel("memory", "classification", net.preprocess, [], net.head, ref).double().eval()


def _bisector_distance(x: torch.Tensor, p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Distance of each row of x to the nearest bisector between its class's point and another's."""
    own = p[c]                                                       # (n, d)
    d_own = ((x - own) ** 2).sum(-1, keepdim=True)
    d_all = ((x[:, None, :] - p[None]) ** 2).sum(-1)                 # (n, K)
    gap = (d_all - d_own) / (2.0 * (p[None] - own[:, None, :]).norm(dim=-1).clamp_min(1e-300))
    return gap.scatter(1, c[:, None], math.inf).min(1).values


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("eps", [1e-3, 1.0])
def test_attack_finds_the_nearest_point_boundary(seed, eps):
    gen = np.random.default_rng(seed)
    K, d, n = 4, 64, 24
    points = gen.normal(size=(K, d))
    model = _nearest_point_model(points, eps)
    p = torch.as_tensor(points, dtype=DT)
    x = (p[torch.as_tensor(gen.integers(0, K, n))] + 0.6 * torch.as_tensor(gen.normal(size=(n, d)), dtype=DT))
    c = model.predict(x)
    true = _bisector_distance(x, p, c)
    assert bool(torch.equal(c, ((x[:, None] - p[None]) ** 2).sum(-1).argmin(1)))
    # the certified radius only sets the attack's starting scale: start it 10x too small
    r_att = minimal_attack_radius(model, x, c, true / 10, restarts=4, steps=40, bisections=10)
    assert bool((r_att >= true * (1 - 1e-9)).all()), "an 'adversarial' point inside the true boundary"
    assert float((r_att / true).max()) < 1.02, float((r_att / true).max())


def test_pgd_in_a_ball_past_the_boundary_always_crosses_it():
    """Balls 1.05x the true radius: every point's decision is changed, even with eps so small that
    the probabilities are exactly 0 / 1 at the ball's centre."""
    gen = np.random.default_rng(7)
    points = gen.normal(size=(3, 32))
    model = _nearest_point_model(points, 1e-4)
    p = torch.as_tensor(points, dtype=DT)
    x = p[torch.as_tensor(gen.integers(0, 3, 30))] + 0.5 * torch.as_tensor(gen.normal(size=(30, 32)), dtype=DT)
    with torch.no_grad():
        probs = model.head.outputs(model.head.preactivations(model.features(x)))
        c = probs.argmax(1)
    assert float((probs.max(1).values == 1.0).double().mean()) > 0.5   # saturated in float64
    true = _bisector_distance(x, p, c)
    ok, nrm, _ = pgd_l2(model, x, 1.05 * true, c, restarts=2, steps=30)
    assert bool(ok.all())
    assert bool((nrm >= true * (1 - 1e-9)).all() and (nrm <= 1.05 * true * (1 + 1e-12)).all())
