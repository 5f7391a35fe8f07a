"""The attacks hjmodel's certificates are checked with: PGD-L2 with restarts and a minimal-
perturbation search, in float64 through the same differentiable forward as the served graph.

Public, so the tests, the benchmarks (``bench/hjmodel_eval.py``) and anyone certifying their own
exported model use one implementation: ``pgd_l2(model, x, radius, decision)`` finds perturbations
inside the given balls that change the decision (or move a regression output by more than tau);
``minimal_attack_radius`` grows, then bisects the ball to the smallest radius at which it succeeds;
``served_bits_attack`` attacks the float32 graph a server runs, in the bits it returns;
``input_rounding_attack`` attacks it as a client that sends float64 values does (the server rounds
them to float32).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import Dataset
from .models import HJModel
from .train import TrainConfig, _split

__all__ = ["DT", "SHRINK", "decision_scores", "features", "forward_outputs", "friedman", "held_out", "minimal_attack_radius", "pgd_l2",
           "input_rounding_attack", "served_bits_attack"]

DT = torch.float64
SHRINK = 0.999          #: attack ball radius as a fraction of the certified radius


def _group_lse_fast(layer, h: torch.Tensor) -> torch.Tensor:
    """``LSEGroupLayer.forward`` in O(n M) instead of O(n H M): every piece lies in exactly one
    group, so the per-group log-sum-exp is a scatter (max-shift detached: it cancels exactly)."""
    gid = layer.mask.to(torch.long).argmax(0)                       # (M,) group of each piece
    s = (h @ layer.W.T + layer.b) / layer.eps                       # (n, M)
    n, H = s.shape[0], layer.mask.shape[0]
    top = torch.full((n, H), -math.inf, dtype=s.dtype).scatter_reduce(
        1, gid.expand(n, -1), s.detach(), "amax", include_self=True)
    e = torch.exp(s - top[:, gid])
    total = torch.zeros(n, H, dtype=s.dtype).index_add(1, gid, e)
    return layer.eps * (top + torch.log(total))


def features(model: HJModel, x: torch.Tensor) -> torch.Tensor:
    """``model.features`` (preprocess then body), with the fast group LSE for deep bodies."""
    h = model.preprocess(x)
    for layer in model.body:
        assert bool((layer.mask.sum(0) == 1).all()), "fast path needs a partition of the pieces"
        h = _group_lse_fast(layer, h)
    return h


def forward_outputs(model: HJModel, x: torch.Tensor) -> torch.Tensor:
    """Differentiable float64 forward of the served outputs: group LSE values s (lse) or Gibbs
    averages yhat (memory) -- the quantities whose argmax / values ``HJModel.evaluate`` serves.
    Built from ``model.preprocess`` / ``model.body`` / ``model.head`` (see :func:`features`; its
    agreement with ``model.features`` is asserted in the tests)."""
    h = features(model, x)
    return model.head.outputs(model.head.preactivations(h))


def decision_scores(model: HJModel, x: torch.Tensor) -> torch.Tensor:
    """Differentiable float64 class log-probabilities (n, K) (``head.log_probabilities`` on
    :func:`features`), whose argmax is the served decision.

    The attack objective is a margin of these, never of probabilities: a memory head's Gibbs
    averages saturate at 0 / 1 a short way from the support points, their gradient underflows and an
    attack on them stalls (tests/hjmodel/test_attacks.py: 14-17x the true radius on a nearest-point
    model)."""
    head = model.head
    return head.log_probabilities(head.preactivations(features(model, x)))


def _objective(model: HJModel, task: str, target: torch.Tensor, sign: torch.Tensor | None, tau: float):
    """f(x) -> (rows,) to minimise; a row is violated when f < 0 (or, for classification, when the
    argmax moves). Classification: margin s_c - max_{k != c} s_k. Regression: tau - sign (y_k - y0_k)
    for the output k and direction sign of the row (K = 1 here; every output is attacked when K > 1
    through ``target`` rows of shape (rows, K) and ``sign`` (rows, K) one-hot signed)."""

    def f(x: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective at x, whose rows are the objective's rows ``rows`` (all when None)."""
        tg = target if rows is None else target[rows]
        if task == "classification":
            out = decision_scores(model, x)
            own = out.gather(1, tg[:, None]).squeeze(1)
            other = out.scatter(1, tg[:, None], -math.inf).amax(1)
            val = own - other
            return val, (out.argmax(1) != tg) | (val < 0)
        out = forward_outputs(model, x)
        val = tau - ((sign if rows is None else sign[rows]) * (out - tg)).sum(1)
        return val, val < 0

    return f


def pgd_l2(model: HJModel, x0: torch.Tensor, rho: torch.Tensor, target: torch.Tensor, *,
           task: str = "classification", tau: float = 0.0, restarts: int = 4, steps: int = 40,
           seed: int = 0, directions: bool = False) -> tuple[torch.Tensor, ...]:
    """PGD-L2 with restarts, vectorised over points x restarts, inside the balls |delta| <= rho.

    Restart 0 starts at x0. For classification, up to half of the others are *targeted starts*: on
    the sphere, in the direction of grad (s_k - s_c) at x0 for the runner-up classes k in score
    order (each restart explores the boundary of another class); the rest start uniformly inside the
    ball. Step sizes decay (cosine) from 0.32 rho to 0.02 rho. Classification ``target`` is the
    class (n,); regression ``target`` is the reference output y0 (n, K) and restarts alternate the
    attacked output and direction.

    Every restart's smallest violating iterate is then shrunk along its ray (bisection on its scale
    in (0, 1], each accepted point checked): adversarial regions need not be star-shaped around x0
    (a memory head's regions of other classes include small islands around their support points),
    and the ray often crosses the boundary well inside the ball PGD was run on.

    Returns (violated (n,) bool, smallest |delta| of a checked violating point (n,) (+inf if none),
    smallest objective value seen (n,)), and with ``directions`` the unit direction of that
    smallest violating perturbation (n, d) (zeros where none was found)."""
    model.requires_grad_(False)
    n, d = x0.shape
    gen = torch.Generator().manual_seed(seed)
    X0 = x0.to(DT).repeat(restarts, 1)
    P = rho.to(DT).repeat(restarts)[:, None]
    direction = torch.randn(n * restarts, d, generator=gen, dtype=DT)
    direction = direction / torch.linalg.vector_norm(direction, dim=1, keepdim=True)
    radius = torch.rand(n * restarts, 1, generator=gen, dtype=DT) ** (1.0 / d)
    delta = direction * radius * P
    delta[:n] = 0.0
    if task == "classification":
        tgt, sign = target.repeat(restarts), None
        for j, start in enumerate(_targeted_starts(model, x0.to(DT), target, (restarts - 1) // 2)):
            rows = slice((j + 1) * n, (j + 2) * n)
            delta[rows] = start * P[rows]
    else:
        K = target.shape[1]
        tgt = target.to(DT).repeat(restarts, 1)
        r_id = torch.arange(restarts).repeat_interleave(n)
        sign = torch.zeros(n * restarts, K, dtype=DT)
        sign[torch.arange(n * restarts), (r_id // 2) % K] = torch.where(r_id % 2 == 0, 1.0, -1.0).to(DT)
        # restart 0 starts at x0 where |y - y0| = 0: its gradient is fine (signed, not abs)
    f = _objective(model, task, tgt, sign, tau)
    best_norm = torch.full((n * restarts,), math.inf, dtype=DT)
    best_val = torch.full((n * restarts,), math.inf, dtype=DT)
    best_delta = torch.zeros_like(X0)
    for s in range(steps + 1):
        delta = delta.detach().requires_grad_(True)
        val, bad = f(X0 + delta)
        norm = torch.linalg.vector_norm(delta.detach(), dim=1)
        best_val = torch.minimum(best_val, val.detach())
        better = bad & (norm < best_norm)
        best_norm = torch.where(better, norm, best_norm)
        best_delta = torch.where(better[:, None], delta.detach(), best_delta)
        if s == steps:
            break
        (g,) = torch.autograd.grad(val.sum(), delta)
        gn = torch.linalg.vector_norm(g, dim=1, keepdim=True)
        g = torch.where(gn > 0, g / gn.clamp_min(1e-300), torch.zeros_like(g))
        step = P * (0.02 + 0.30 * 0.5 * (1.0 + math.cos(math.pi * s / steps)))
        with torch.no_grad():
            nxt = delta - step * g
            nn_ = torch.linalg.vector_norm(nxt, dim=1, keepdim=True)
            delta = nxt * torch.clamp(P / nn_.clamp_min(1e-300), max=1.0)
    best_norm = _shrink_along_ray(f, X0, best_delta, best_norm)
    best_norm, which = best_norm.view(restarts, n).min(0)
    best_val = best_val.view(restarts, n).min(0).values
    if not directions:
        return best_norm < math.inf, best_norm, best_val
    chosen = best_delta.view(restarts, n, d)[which, torch.arange(n)]
    unit = chosen / torch.linalg.vector_norm(chosen, dim=1, keepdim=True).clamp_min(1e-300)
    return best_norm < math.inf, best_norm, best_val, torch.where((best_norm < math.inf)[:, None], unit, 0.0)


@torch.no_grad()
def _shrink_along_ray(f, X0: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor, iters: int = 24) -> torch.Tensor:
    """The smallest |s delta| (s in (0, 1]) found violating by bisection on s, for the rows with a
    violating ``delta`` (finite ``norm``); every returned norm is that of a point checked violating."""
    rows = torch.isfinite(norm)
    if not bool(rows.any()):
        return norm
    idx = rows.nonzero().squeeze(1)
    x, d = X0[idx], delta[idx]
    lo, hi = torch.zeros(len(idx), dtype=DT), torch.ones(len(idx), dtype=DT)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        _, bad = f(x + mid[:, None] * d, idx)
        hi, lo = torch.where(bad, mid, hi), torch.where(bad, lo, mid)
    out = norm.clone()
    out[idx] = torch.minimum(norm[idx], hi * torch.linalg.vector_norm(d, dim=1))
    return out


def _targeted_starts(model: HJModel, x0: torch.Tensor, target: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Unit directions (n, d) of grad (s_k - s_c) at x0 for the ``count`` best-scoring other classes k."""
    if count <= 0:
        return []
    x = x0.detach().requires_grad_(True)
    s = decision_scores(model, x)
    K = s.shape[1]
    order = s.detach().scatter(1, target[:, None], -math.inf).argsort(1, descending=True)
    starts = []
    for j in range(min(count, K - 1)):
        k = order[:, j]
        margin = (s.gather(1, k[:, None]) - s.gather(1, target[:, None])).sum()
        (g,) = torch.autograd.grad(margin, x, retain_graph=j + 1 < min(count, K - 1))
        gn = torch.linalg.vector_norm(g, dim=1, keepdim=True)
        starts.append(torch.where(gn > 0, g / gn.clamp_min(1e-300), torch.zeros_like(g)))
    return starts


def minimal_attack_radius(model: HJModel, x0: torch.Tensor, target: torch.Tensor, r_cert: torch.Tensor, *,
                          task: str = "classification", tau: float = 0.0, restarts: int = 4, steps: int = 40,
                          bisections: int = 7, seed: int = 0) -> torch.Tensor:
    """Smallest radius at which the attack finds a violation, per point (+inf if none up to
    2^10 x the certified radius): grow the ball geometrically until the attack succeeds, then
    bisect (geometric mean), keeping the norm of the smallest violating perturbation found."""
    n = x0.shape[0]
    scale = float(r_cert[r_cert > 0].median()) if bool((r_cert > 0).any()) else 1.0
    hi = torch.full((n,), math.inf, dtype=DT)
    lo = torch.where(r_cert > 0, r_cert.to(DT) * SHRINK, torch.zeros(n, dtype=DT))
    rho = torch.where(r_cert > 0, 2.0 * r_cert.to(DT), torch.full((n,), 0.1 * scale, dtype=DT))
    for i in range(10):
        todo = ~(hi < math.inf)
        if not bool(todo.any()):
            break
        ok, nrm, _ = pgd_l2(model, x0[todo], rho[todo], target[todo], task=task, tau=tau, restarts=restarts,
                            steps=steps, seed=seed + 100 + i)
        hi[todo] = torch.where(ok, nrm, hi[todo])
        lo[todo] = torch.where(ok, lo[todo], rho[todo])
        rho = rho * 2.0
    for i in range(bisections):
        todo = hi < math.inf
        mid = torch.sqrt(lo.clamp_min(1e-12 * scale) * hi)
        ok, nrm, _ = pgd_l2(model, x0[todo], mid[todo], target[todo], task=task, tau=tau, restarts=restarts,
                            steps=steps, seed=seed + 200 + i)
        hi[todo] = torch.where(ok, torch.minimum(nrm, hi[todo]), hi[todo])
        lo[todo] = torch.where(ok, lo[todo], mid[todo])
    return hi


def served_bits_attack(model: HJModel, classify, x32: np.ndarray, radius: np.ndarray, decided: np.ndarray, *,
                       steps: int = 20) -> np.ndarray:
    """Float32 inputs strictly inside each row's served radius that the *served graph* classifies
    differently: PGD-L2 on the float64 model's log-space margin, started at the gradient toward every
    other class (targeted starts), each iterate rounded to float32, pulled back toward x in float32
    where rounding left the ball, and classified by ``classify`` (float32 (n, d) -> (n,) classes: the
    served graph itself, e.g. an onnxruntime session). ``x32``: (n, d) float32 inputs, ``radius``: the
    served float32 radii, ``decided``: the served classes. Returns the rows where a violation was found
    (bool (n,)); every such row is a counterexample to the served certificate."""
    x = torch.from_numpy(np.asarray(x32, dtype=np.float32)).to(DT)
    c = torch.from_numpy(np.asarray(decided)).long()
    r = torch.from_numpy(np.asarray(radius, dtype=np.float64))
    r64, x64 = r.numpy(), x.numpy()

    def margin(z: torch.Tensor) -> torch.Tensor:   # best other class minus the decided one
        lp = model.head.log_probabilities(model.head.preactivations(model.features(z)))
        return lp.scatter(1, c[:, None], -math.inf).max(-1).values - lp.gather(1, c[:, None]).squeeze(1)

    def unit(g: torch.Tensor) -> torch.Tensor:
        return g / torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp_min(1e-300)

    found = np.zeros(len(x), dtype=bool)
    for target in range(model.n_outputs):
        delta = torch.zeros_like(x, requires_grad=True)
        lp = model.head.log_probabilities(model.head.preactivations(model.features(x + delta)))
        tt = torch.full_like(c, target)
        (g,) = torch.autograd.grad((lp.gather(1, tt[:, None]) - lp.gather(1, c[:, None])).sum(), delta)
        delta = unit(g) * r[:, None]
        for it in range(steps):
            delta = delta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(margin(x + delta).sum(), delta)
            step = 0.1 * r * 0.05 ** (it / steps)
            delta = delta.detach() + step[:, None] * unit(g)
            delta = delta * (r / torch.linalg.vector_norm(delta, dim=-1).clamp_min(1e-300)).clamp(max=1.0)[:, None]
            q = (x + delta).numpy().astype(np.float32)
            dist = np.linalg.norm(q.astype(np.float64) - x64, axis=1)
            for _ in range(4):   # rounding may leave the ball: shrink toward x, in float32
                outside = dist >= r64
                if not outside.any():
                    break
                q[outside] = (x64[outside] + 0.999 * (q[outside].astype(np.float64) - x64[outside])).astype(np.float32)
                dist = np.linalg.norm(q.astype(np.float64) - x64, axis=1)
            found |= (dist < r64) & (np.asarray(classify(q)) != np.asarray(decided))
    return found


def _rounding_cell(z32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 values that round to each float32 entry of ``z32`` (round to nearest), as closed
    intervals strictly inside the open midpoints to the neighbours (a midpoint may round either way)."""
    up = np.nextafter(z32, np.float32(np.inf)).astype(np.float64)
    down = np.nextafter(z32, np.float32(-np.inf)).astype(np.float64)
    z = z32.astype(np.float64)
    return np.nextafter((z + down) / 2, np.inf), np.nextafter((z + up) / 2, -np.inf)


def input_rounding_attack(model: HJModel, serve, x32: np.ndarray, *, iterations: int = 12,
                          bisections: int = 48, restarts: int = 8, steps: int = 40) -> dict[str, np.ndarray]:
    """Attack a served radius as a client that sends float64 values does: the server rounds every
    value to float32 before its graph runs, so a client may send any X that rounds to the row x it
    asked about and any Y that rounds to a float32 point z of another served class; the radius the
    server answers for X must then be at most |Y - X|. The smallest such |Y - X| is the distance
    between the two rounding cells (boxes of half a float32 step per coordinate), which is below
    |z - x| by up to sqrt(d) half-steps: a radius that holds for float32 perturbations of x alone
    can fail here.

    ``serve``: float64 (n, d) -> (served classes, served radii), the float32 rounding left to it (the
    server's own, over the wire; or a graph fed ``q.astype(np.float32)``). ``x32``: float32 (n, d)
    rows. For every row and rival class: a direction to the float64 boundary (the gradient of the
    log-probability margin, then ``iterations`` steps of the tangent plane at the boundary point
    along the current direction, each found by bisection; with ``restarts``, also from the direction
    of the smallest perturbation :func:`pgd_l2` finds in balls of 2 to 16 x the served radius,
    ``restarts`` x ``steps`` each, toward the class it reaches), then a bisection of the served class
    along that ray on float32 points, ``bisections`` steps; the float32 point z found just past the
    boundary gives the nearest pair (X, Y) of the two cells, each checked to round to x and z.

    Returns ``violated`` (n,) bool (|Y - X| below the radius served for X, Y served another class),
    the served ``radius`` (n,), the smallest cell distance ``distance`` (n,) (+inf where no rival was
    reached) and that pair's ``X``, ``Y`` (n, d) float64."""
    x32 = np.asarray(x32, dtype=np.float32)
    n, d = x32.shape
    c, radius = (np.asarray(v) for v in serve(x32.astype(np.float64)))
    radius = radius.astype(np.float64)
    K = model.n_outputs
    rows = np.repeat(np.arange(n), K)
    keep = np.tile(np.arange(K), n) != c[rows]
    rows, rival = rows[keep], np.tile(np.arange(K), n)[keep]
    start = None                       # None: each pair starts at its margin's gradient
    if restarts:
        # more starts: the direction of the smallest perturbation PGD-L2 finds in balls of 2, 4, 8
        # and 16 x the served radius (each shrunk along its ray to where it first crosses), toward
        # the class it reaches: a memory head's nearest boundary is often not where the gradient at
        # x leads, and PGD at one radius finds it on few rows
        xs = torch.from_numpy(x32.astype(np.float64))
        base = torch.from_numpy(np.where(radius > 0, radius, 1.0))
        best, u0 = torch.full((n,), math.inf, dtype=DT), torch.zeros_like(xs)
        for i, grow in enumerate((2.0, 4.0, 8.0, 16.0)):
            ok, norm, _, u = pgd_l2(model, xs, grow * base, torch.from_numpy(c).long(), restarts=restarts,
                                    steps=steps, seed=i, directions=True)
            better = ok & (norm < best)
            best, u0 = torch.where(better, norm, best), torch.where(better[:, None], u, u0)
        found = np.flatnonzero(np.isfinite(best.numpy()))
        with torch.no_grad():
            landed = decision_scores(model, xs[found] + best[found, None] * u0[found]).argmax(1).numpy()
        keep = landed != c[found]
        found, landed = found[keep], landed[keep]
        start = torch.cat([torch.full((len(rows), x32.shape[1]), math.nan, dtype=DT), u0[found]])
        rows, rival = np.concatenate([rows, found]), np.concatenate([rival, landed])
    x = torch.from_numpy(x32[rows].astype(np.float64))
    own, other = torch.from_numpy(c[rows]).long(), torch.from_numpy(rival).long()

    def margin(z: torch.Tensor) -> torch.Tensor:   # >= 0: the rival scores at least the decided class
        lp = decision_scores(model, z)
        return lp.gather(1, other[:, None]).squeeze(1) - lp.gather(1, own[:, None]).squeeze(1)

    def gradient(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(margin(z).sum(), z)
        return g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-300)

    def crossing(u: torch.Tensor) -> torch.Tensor:   # float64 margin's first zero along x + t u
        scale = torch.from_numpy(np.where(radius[rows] > 0, radius[rows], 1.0))
        hi = 2.0 * scale
        with torch.no_grad():
            for _ in range(40):
                short = margin(x + hi[:, None] * u) < 0
                if not bool(short.any()):
                    break
                hi = torch.where(short, 2.0 * hi, hi)
            lo = torch.zeros_like(hi)
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                past = margin(x + mid[:, None] * u) >= 0
                hi, lo = torch.where(past, mid, hi), torch.where(past, lo, mid)
        return hi

    u = gradient(x)
    if start is not None:
        u = torch.where(torch.isnan(start), u, start)
    for _ in range(iterations):
        t = crossing(u)
        normal = gradient(x + t[:, None] * u)
        u = torch.where(((normal * u).sum(1) > 0)[:, None], normal, u)
    t = crossing(u).numpy()
    u = u.numpy()
    x64 = x.numpy()
    # the served class along the ray, on float32 points: the smallest step found past the boundary
    lo, hi = 0.5 * t, 1.5 * t
    past = serve(((x64 + hi[:, None] * u).astype(np.float32)).astype(np.float64))[0] != c[rows]
    for _ in range(bisections):
        mid = 0.5 * (lo + hi)
        moved = serve(((x64 + mid[:, None] * u).astype(np.float32)).astype(np.float64))[0] != c[rows]
        hi, lo = np.where(moved & past, mid, hi), np.where(moved & past, lo, mid)
    z32 = (x64 + hi[:, None] * u).astype(np.float32)
    (xl, xh), (zl, zh) = _rounding_cell(x32[rows]), _rounding_cell(z32)
    X = np.clip(np.clip(x64, zl, zh), xl, xh)     # nearest points of the two boxes
    Y = np.clip(X, zl, zh)
    assert (X.astype(np.float32) == x32[rows]).all() and (Y.astype(np.float32) == z32).all()
    dist = np.where(past, np.linalg.norm(Y - X, axis=1), np.inf)
    out = {"violated": np.zeros(n, dtype=bool), "radius": radius, "distance": np.full(n, np.inf),
           "X": x32.astype(np.float64), "Y": np.full((n, d), np.nan)}
    inside = np.flatnonzero(past & (dist < radius[rows]))
    if len(inside):   # what the server answers for the pairs themselves
        cx, rx = serve(X[inside])
        cy, _ = serve(Y[inside])
        ok = (np.asarray(cx) == c[rows[inside]]) & (np.asarray(cy) != np.asarray(cx)) & \
            (dist[inside] < np.asarray(rx, dtype=np.float64))
        for j in inside[ok]:
            out["violated"][rows[j]] = True
    for i in range(n):
        mine = np.flatnonzero((rows == i) & past)
        if len(mine):
            j = mine[np.argmin(dist[mine])]
            out["distance"][i], out["X"][i], out["Y"][i] = dist[j], X[j], Y[j]
    return out


def held_out(spec_or_model, X: np.ndarray) -> np.ndarray:
    """Indices of the test split ``train`` used for an artifact (same seed and fractions)."""
    meta = spec_or_model.meta if isinstance(spec_or_model, HJModel) else spec_or_model
    cfg = TrainConfig(**meta["provenance"]["train_config"])
    assert not cfg.exclude_classes
    return _split(len(X), cfg, np.random.default_rng(cfg.seed))[2]


def friedman(n: int = 1500, seed: int = 0) -> Dataset:
    """A synthetic regression set (scikit-learn's Friedman #1, generated: no download)."""
    from sklearn.datasets import make_friedman1

    X, y = make_friedman1(n_samples=n, n_features=6, noise=0.3, random_state=seed)
    return Dataset(X, y, "regression", "friedman1", [], [f"x{i}" for i in range(X.shape[1])])
