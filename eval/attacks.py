"""PGD-L2 attacks (fixed radius, with restarts) and a minimal-perturbation attack (bisection over the
radius, each step a PGD attack, plus a line search along every adversarial direction found).

All attacks work on a batch and a per-row radius; ``loss(x, rows)`` returns (n,) for the rows
``rows`` (an index tensor into the full batch) and an input is a
violation when its loss is > 0 (classification: best other log-probability minus the predicted
one; regression: |f(x + delta) - f(x)| - tau). Everything in float64, no box constraint (the
certificates are for the whole L2 ball in R^d)."""

from __future__ import annotations

import math

import torch


def _normalise(g: torch.Tensor) -> torch.Tensor:
    return g / torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp_min(1e-300)


def _project(delta: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    n = torch.linalg.vector_norm(delta, dim=-1, keepdim=True)
    return delta * torch.clamp(r.unsqueeze(-1) / n.clamp_min(1e-300), max=1.0)


def pgd_l2(loss, x: torch.Tensor, r: torch.Tensor, steps: int = 100, restarts: int = 8,
           seed: int = 0, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise ``loss`` over the L2 ball of radius r (per row). Restart 0 starts at x (so the first
    step follows the exact gradient), the others at uniform random points of the ball. Step size
    decays geometrically from 0.25 r to 0.0025 r. Returns (best loss (n,), best delta (n, d))."""
    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape
    rows = torch.arange(n) if rows is None else rows
    best = torch.full((n,), -math.inf, dtype=x.dtype)
    best_delta = torch.zeros_like(x)
    for rs in range(restarts):
        if rs == 0:   # (almost) at x: the first step follows the exact gradient; the tiny offset
            # breaks the symmetry of |f - f0| (zero gradient at delta = 0)
            delta = _normalise(torch.randn(n, d, generator=gen, dtype=x.dtype)) * (1e-6 * r).unsqueeze(-1)
        else:
            u = torch.randn(n, d, generator=gen, dtype=x.dtype)
            rad = r * torch.rand(n, generator=gen, dtype=x.dtype) ** (1.0 / d)
            delta = _normalise(u) * rad.unsqueeze(-1)
        for it in range(steps + 1):
            delta = delta.detach().requires_grad_(True)
            val = loss(x + delta, rows)
            better = val.detach() > best
            best = torch.where(better, val.detach(), best)
            best_delta = torch.where(better.unsqueeze(-1), delta.detach(), best_delta)
            if it == steps:
                break
            (g,) = torch.autograd.grad(val.sum(), delta)
            step = 0.25 * r * (0.01 ** (it / max(steps - 1, 1)))
            delta = _project(delta.detach() + step.unsqueeze(-1) * _normalise(g), r)
    return best, best_delta


def _shrink_along_ray(loss, x, delta, ok, rows, iters: int = 30) -> torch.Tensor:
    """Smallest scale s in (0, 1] with loss(x + s delta) > 0, by bisection (rows with ok only).
    Returns the adversarial norm found (inf where not ok)."""
    norm = torch.linalg.vector_norm(delta, dim=-1)
    lo = torch.zeros_like(norm)
    hi = torch.ones_like(norm)
    with torch.no_grad():
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            adv = loss(x + mid.unsqueeze(-1) * delta, rows) > 0
            hi = torch.where(adv, mid, hi)
            lo = torch.where(adv, lo, mid)
    return torch.where(ok, hi * norm, torch.full_like(norm, math.inf))


def minimal_adversarial_radius(loss, x: torch.Tensor, r_lo: torch.Tensor, steps: int = 40,
                               restarts: int = 2, bisections: int = 10, seed: int = 1) -> torch.Tensor:
    """Smallest L2 perturbation norm found that makes loss > 0 (an upper bound on the true minimal
    adversarial radius; inf where none was found up to 2^14 r_lo).

    Grows the radius from 2 r_lo by doubling until PGD succeeds, then bisects between the largest
    radius where PGD failed and the smallest adversarial norm found, shrinking every adversarial
    direction along its ray. ``r_lo`` only sets the starting scale."""
    n = x.shape[0]
    base = torch.where(r_lo > 0, r_lo, torch.full_like(r_lo, 1e-3 * float(x.abs().mean() + 1)))
    hi = torch.full((n,), math.inf, dtype=x.dtype)
    lo = torch.zeros(n, dtype=x.dtype)
    r = 2.0 * base
    for k in range(14):
        todo = hi == math.inf
        if not todo.any():
            break
        idx = todo.nonzero().squeeze(-1)
        val, delta = pgd_l2(loss, x[idx], r[idx], steps, restarts, seed + k, idx)
        found = _shrink_along_ray(loss, x[idx], delta, val > 0, idx)
        hi[todo] = torch.minimum(hi[todo], found)
        lo[todo] = torch.where(val > 0, lo[todo], r[todo])
        r = torch.where(todo, 2.0 * r, r)
    for k in range(bisections):
        todo = (hi < math.inf) & (hi - lo > 1e-3 * hi)
        if not todo.any():
            break
        mid = 0.5 * (lo[todo] + hi[todo])
        idx = todo.nonzero().squeeze(-1)
        val, delta = pgd_l2(loss, x[idx], mid, steps, restarts, seed + 100 + k, idx)
        found = _shrink_along_ray(loss, x[idx], delta, val > 0, idx)
        hi[todo] = torch.minimum(hi[todo], found)
        lo[todo] = torch.where(val > 0, lo[todo], mid)
    return hi
