"""Every closed form of hjserve, once: stateless, batched torch functions (any device, any float dtype).

Conventions (DESIGN.md section 1; theorem numbers refer to "The Hamilton-Jacobi Theory of Deep
Learning"). An LSE layer has weights ``W: (N, d)``, biases ``b: (N,)`` and viscosity ``eps > 0``:

    a_j(z) = w_j . z + b_j,   f(z) = eps log sum_j exp(a_j / eps),   pi(z) = softmax(a / eps).

Inputs are batched: ``z: (n, d)``. Every log-sum-exp is max-shifted (:func:`logsumexp`), so nothing
overflows at extreme ``eps`` or large inputs. Public functions trust shapes; models validate at the edge.

Grouped layers (one LSE per output) use a boolean ``mask: (K, N)``; ``mask[k, j]`` says that neuron
``j`` belongs to output ``k``'s group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "ambiguity",
    "attribution_entropy",
    "certificate_tables",
    "count_at_least",
    "diameter",
    "energy_gap",
    "energy_gap_bound",
    "eps15_radius",
    "eps_star",
    "fewest_label_flips",
    "float32_down",
    "float32_output_tolerance",
    "float32_saturate",
    "float32_up",
    "gauss_legendre",
    "gibbs",
    "gibbs_margin_radius",
    "gradient",
    "Groups",
    "group_gibbs",
    "group_gradients",
    "group_lse",
    "grouped_gibbs_entropy",
    "grouped_lse_gibbs",
    "grouped_margin_radius",
    "grouped_nll",
    "hessian",
    "hj_reading",
    "hopf_cole_value",
    "hopf_cole_tables",
    "hopf_cole_value_in_group",
    "hopf_lax_value",
    "hybrid_radius",
    "input_rounding_radius",
    "integrated_gradients",
    "label_flip_plan",
    "label_sensitivity_exponent",
    "label_sensitivity_values",
    "linearised_body_radius",
    "linearised_layer",
    "lipschitz_radius",
    "logsumexp",
    "lse",
    "lse_gibbs",
    "lse_layer",
    "masked_lse_gibbs",
    "neuron_gradients",
    "measure_extension",
    "pairwise_distances",
    "preactivations",
    "scalar_radius",
    "served_input",
    "sign_margin",
    "sign_reduction_biases",
    "squared_distances",
    "static_graph",
    "tangent_radius",
    "unit_jacobian",
    "unit_spread",
    "unit_tables",
]

_NEG_INF = -math.inf
_EXACT_LIMIT = 1 << 22  # elements of an exact (n, m, d) difference tensor
_SLICED_GROUPS = 64     # group_distance_bounds reduces at most this many column groups by slices
_TANGENT_ITERS = 4      # regula falsi / Newton steps of tangent_radius (converges in ~2)
# linearised_body_radius's grid below its first-order radius: 0 and 8 radii geometric in [1/8, 1] of it
_LINEARISED_GRID = torch.tensor([0.0, *(8.0 ** (-k / 7) for k in range(7, -1, -1))], dtype=torch.float64)
_UP = 1.0 + 2.0 ** -40  # rounds a computed norm or curvature up, far beyond float64's error in it
_TANGENT_F32_MIN = 16   # negative sides at least this wide search tangent_radius's root in float32


# --------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------


def static_graph() -> bool:
    """Whether the caller is recording one graph for every batch (an ONNX export, or the TorchScript
    trace that the torch backend serves, :class:`hjmodel.artifact.TracedModule`) rather than running
    eagerly. Code that branches on a batch's size or contents (skipping an empty search, row blocks,
    exact small-problem forms) takes its one batch-independent form then: a trace would otherwise bake
    the example batch's branch into the graph."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def preactivations(z: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """a = z W^T + b.  z: (n, d), W: (N, d), b: (N,) -> (n, N)."""
    return z @ W.transpose(-1, -2) + b


def _finite_shift(top: Tensor) -> Tensor:
    """A row maximum made safe as the shift of a log-sum-exp: +-inf become +-(largest finite).

    An all -inf row then gives exp(-inf) = 0 and the value -inf, a +inf entry gives +inf, exactly as
    a shift of 0 there would. One Clip node in the exported graph, where ``where(|top| < inf, top,
    0)`` was three (Abs, Less, Where) -- onnxruntime spends ~0.1 ms on each over a (256, 48, 1)
    tensor, and the served graph holds some hundred of these shifts."""
    big = torch.finfo(top.dtype).max
    return top.clamp(-big, big)


def logsumexp(s: Tensor, dim: int = -1) -> Tensor:
    """log sum exp(s) along ``dim``, max-shifted by hand; -inf entries are empty (all -inf: -inf).

    Written out (max, exp, sum, log) rather than ``torch.logsumexp``: exported to ONNX that becomes
    ``ReduceLogSumExp``, and onnxruntime's kernel returns -inf for rows holding -inf entries whose
    finite entries lie below about -709 (``[-inf, -950, -inf]`` -> -inf, not -950), so the served graph
    and the torch module disagreed there (tests/hjmodel/test_functional.py)."""
    top = _finite_shift(s.amax(dim))       # no keepdim / squeeze: a squeeze of a dynamic axis
    return top + torch.log(torch.exp(s - top.unsqueeze(dim)).sum(dim))   # exports as an If node


def lse(a: Tensor, eps: float, dim: int = -1) -> Tensor:
    """eps * log sum exp(a / eps) along ``dim`` (max-shifted; -inf entries are empty)."""
    return eps * logsumexp(a / eps, dim=dim)


def lse_layer(z: Tensor, W: Tensor, b: Tensor, eps: float) -> Tensor:
    """f(z) = eps log sum_j exp((w_j . z + b_j)/eps).  (n, d) -> (n,)."""
    return lse(preactivations(z, W, b), eps)


def gibbs(a: Tensor, eps: float) -> Tensor:
    """Gibbs weights pi = softmax(a / eps): the attributions, rows sum to 1.  (n, N) -> (n, N)."""
    return torch.softmax(a / eps, dim=-1)


def lse_gibbs(a: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """LSE value and Gibbs weights of ``a`` along the last axis, -inf entries empty (the padding of
    the :class:`Groups` layout), max-shifted and NaN-free: an all -inf row has value -inf and weights 0.
    Returns (value, pi)."""
    s = a / eps
    top = _finite_shift(s.amax(-1))
    e = torch.exp(s - top.unsqueeze(-1))
    total = e.sum(-1)
    value = eps * (top + torch.log(total))
    pi = e / torch.where(total > 0, total, 1.0).unsqueeze(-1)
    return value, pi


def masked_lse_gibbs(a: Tensor, mask: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`lse_gibbs` of ``a`` restricted to ``mask`` (broadcast), along the last axis.
    Returns (value, pi)."""
    return lse_gibbs(torch.where(mask, a, _NEG_INF), eps)


class Groups:
    """K groups of N neurons as a padded table, so per-group reductions cost O(N), not O(K N).

    ``slots`` (K, S) long: group k's neuron indices in increasing order, padded with N (S = the
    largest group); ``valid`` (K, S) bool: which slots hold a neuron; ``place`` (N,) long: each
    neuron's position in the flattened (K * S) table (K * S: in no group). Built once per mask
    (:meth:`of`) and kept by the module that owns the mask, so an exported graph holds the table as
    a constant. A neuron may belong to at most one group (the layers' partitions)."""

    def __init__(self, slots: Tensor, valid: Tensor, place: Tensor):
        self.slots, self.valid, self.place = slots, valid, place
        # groups of equal size laid out one after the other (an lse layer's usual partition): the
        # table is then the neuron axis reshaped, and gather / spread are reshapes (no padding,
        # no index lookups in the exported graph)
        N = place.numel()
        self.contiguous = bool(valid.all()) and slots.numel() == N and bool(
            torch.equal(slots.reshape(-1).cpu(), torch.arange(N)))

    @classmethod
    def of(cls, mask: Tensor) -> Groups:
        """The table of a (K, N) bool mask whose groups are disjoint (ValueError otherwise)."""
        mask = torch.as_tensor(mask, dtype=torch.bool).cpu()
        K, N = mask.shape
        if bool((mask.sum(0) > 1).any()):
            raise ValueError("groups must be disjoint: a neuron belongs to more than one group")
        S = max(int(mask.sum(-1).max()) if K else 0, 1)
        slots = torch.full((K, S), N, dtype=torch.long)
        place = torch.full((N,), K * S, dtype=torch.long)
        for k in range(K):
            members = mask[k].nonzero().squeeze(-1)
            slots[k, :members.numel()] = members
            place[members] = k * S + torch.arange(members.numel())
        return cls(slots, slots < N, place)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.slots.shape)

    def to(self, device) -> Groups:
        """The same table on ``device`` (itself when it is there)."""
        if self.slots.device == torch.device(device):
            return self
        moved = object.__new__(Groups)
        moved.slots, moved.valid, moved.place = (t.to(device) for t in (self.slots, self.valid, self.place))
        moved.contiguous = self.contiguous
        return moved

    def gather(self, a: Tensor, fill: float = _NEG_INF) -> Tensor:
        """(..., N) -> (..., K, S): each group's entries, ``fill`` in the padding."""
        if self.contiguous:
            return a.reshape(*a.shape[:-1], *self.slots.shape)
        pad = torch.cat([a, torch.full_like(a[..., :1], fill)], -1)
        index = self.slots.reshape(-1).to(a.device)
        return pad.index_select(-1, index).reshape(*a.shape[:-1], *self.slots.shape)

    def rows(self, W: Tensor) -> Tensor:
        """Rows W (N, p) laid out by group: (K, S, p), zero rows in the padding."""
        pad = torch.cat([W, W.new_zeros(1, W.shape[-1])], 0)
        return pad[self.slots.to(W.device)]

    def spread(self, v: Tensor) -> Tensor:
        """The inverse of :meth:`gather`: (..., K, S) -> (..., N), 0 for a neuron in no group."""
        if self.contiguous:
            return v.reshape(*v.shape[:-2], self.place.numel())
        flat = v.reshape(*v.shape[:-2], -1)
        flat = torch.cat([flat, torch.zeros_like(flat[..., :1])], -1)
        return flat.index_select(-1, self.place.to(v.device))


def take_class(t: Tensor, c: Tensor) -> Tensor:
    """Each row's entry (or row of entries) of its class c: (n, K), (n,) -> (n,); (n, K, q) -> (n, q)."""
    if t.ndim == 2:
        return t.gather(1, c.unsqueeze(-1)).select(1, 0)
    # select, not squeeze: a squeeze of an axis whose size the exporter cannot prove is 1 exports as an
    # If node (a subgraph call per evaluation)
    return t.gather(1, c.view(-1, 1, 1).expand(-1, 1, t.shape[-1])).select(1, 0)


def group_gradients(pi_g: Tensor, W_g: Tensor) -> Tensor:
    """Gradients of every group's LSE, sum_s pi_g[n, k, s] W_g[k, s]: (n, K, S), (K, S, p) -> (n, K, p).
    One matrix product per group (a batched MatMul in the exported graph, which runs faster than
    an Einsum)."""
    return (pi_g.transpose(0, 1) @ W_g).transpose(0, 1)


def _as_groups(groups: Groups | Tensor) -> Groups:
    return groups if isinstance(groups, Groups) else Groups.of(groups)


def grouped_lse_gibbs(a: Tensor, groups: Groups | Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-group LSE values (..., K) and within-group Gibbs weights (..., K, S) of pre-activations
    a (..., N), in the layout of :class:`Groups` (``groups``: a table or a (K, N) mask)."""
    return lse_gibbs(_as_groups(groups).gather(a), eps)            # the padding is -inf: empty


def group_lse(a: Tensor, groups: Groups | Tensor, eps: float) -> Tensor:
    """Per-group LSE values s_k = eps log sum_{j in G_k} exp(a_j/eps).  (n, N), (K, N) -> (n, K).

    ``groups``: a :class:`Groups` table (O(n N)) or a (K, N) bool mask."""
    if isinstance(groups, Groups):
        return lse(groups.gather(a), eps)            # the padding is -inf: empty
    return masked_lse_gibbs(a.unsqueeze(-2), groups, eps)[0]


def grouped_nll(a_g: Tensor, labels: Tensor, eps: float, leave: Tensor | None = None) -> Tensor:
    """The training loss of a classifier whose class scores are group LSEs: the mean over rows of
    -log p_y, p = softmax(s / eps), s_k = eps LSE_{j in group k}(a_j / eps), from pre-activations by
    group a_g (n, K, S) (-inf in the padding: empty), labels (n,) long. ``leave`` (n,) long: one
    slot of each row's flattened (K * S) layout to leave out (its support point may not explain its
    own row), K * S or more for none.

    Its gradient is the closed form (Prop F.1's Gibbs weights): d loss / d a_g[i, k, s] =
    (p_ik - [k = y_i]) pi_iks / (n eps), with pi the Gibbs weights within group k -- one pass over
    the (n, K, S) tensor, where autograd through the LSEs and the log-softmax takes a dozen (and,
    through a gather of a, an (n, N) scatter). ``tests/hjmodel/test_functional.py`` checks value and
    gradient against autograd in float64."""
    return _GroupedNLL.apply(a_g, labels, float(eps), leave)


class _GroupedNLL(torch.autograd.Function):
    """:func:`grouped_nll` with its closed-form gradient."""

    @staticmethod
    def forward(ctx, a_g: Tensor, labels: Tensor, eps: float, leave: Tensor | None) -> Tensor:
        n, K, S = a_g.shape
        s = (a_g / eps).contiguous()            # a new tensor (left-out slots are set in it), viewable
        if leave is not None:
            hit = (leave < K * S).nonzero().squeeze(-1)
            s.view(n, K * S)[hit, leave[hit]] = -math.inf
        top = _finite_shift(s.amax(-1))
        pi = torch.exp(s.sub_(top.unsqueeze(-1)))
        total = pi.sum(-1)
        log_p = torch.log_softmax(top + torch.log(total), dim=-1)   # (n, K): log softmax(s / eps)
        pi.div_(torch.where(total > 0, total, 1.0).unsqueeze(-1))   # within-group Gibbs weights
        coef = log_p.exp()
        coef[torch.arange(n, device=a_g.device), labels] -= 1.0    # p_ik - [k = y_i]
        ctx.eps = eps
        ctx.save_for_backward(pi, coef)
        return -log_p.gather(1, labels.unsqueeze(-1)).mean()

    @staticmethod
    def backward(ctx, grad: Tensor):
        pi, coef = ctx.saved_tensors
        return pi * (coef * (grad / (pi.shape[0] * ctx.eps))).unsqueeze(-1), None, None, None


def group_gibbs(a: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Gibbs weights within each group (zero outside).  (n, N), (K, N) -> (n, K, N)."""
    return masked_lse_gibbs(a.unsqueeze(-2), mask, eps)[1]


def ambiguity(log_probs: Tensor) -> Tensor:
    """log(1 - max_k p_k) from log-probabilities (..., K), as the log-sum-exp of the other classes'
    log-probabilities: a monotone map of 1 - max p that does not saturate at 0.  -> (...)."""
    top = log_probs.argmax(-1, keepdim=True)
    return logsumexp(log_probs.scatter(-1, top, -math.inf), dim=-1)


def attribution_entropy(pi: Tensor) -> Tensor:
    """H(pi) = -sum pi log pi in [0, log N] (0 log 0 = 0).  (..., N) -> (...)."""
    return -(pi * torch.log(torch.where(pi > 0, pi, 1.0))).sum(-1)


def grouped_gibbs_entropy(a_g: Tensor, pi_g: Tensor, log_p: Tensor, eps: float) -> Tensor:
    """H(pi) of the Gibbs weights over every neuron from their class groups, with no logarithm per
    neuron: pi_j = p_k pi_g[k, j] for neuron j of group k (p: the groups' softmax), so
    H = sum_k p_k H_k - sum_k p_k log p_k, and within group k, whose top pre-activation m_k has the
    weight 1 / Z_k, H_k = sum_j pi_g[k, j] (m_k - a_j) / eps - log max_j pi_g[k, j] (exact for the
    top term, where (s_k - a_j) / eps would carry the rounding of s_k / eps). a_g, pi_g: (n, K, S) in
    the :class:`Groups` layout (padding: -inf, 0); log_p: (n, K) log softmax(s / eps).  -> (n,);
    equals :func:`attribution_entropy` of the weights."""
    top = a_g.amax(-1, keepdim=True)
    # the padding's gap is +inf and its weight 0: the clip keeps 0 x gap = 0 (an empty group's NaN is
    # masked below, its probability being 0)
    gap = (top - a_g).clamp(max=torch.finfo(a_g.dtype).max)
    within = (pi_g * gap).sum(-1) / eps - torch.log(pi_g.amax(-1))
    p = log_p.exp()
    return (p * torch.where(p > 0, within - log_p, 0.0)).sum(-1).clamp_min(0.0)


def energy_gap(a: Tensor) -> tuple[Tensor, Tensor]:
    """Energy gap Delta = a_(1) - a_(2) and the dominant neuron (Prop 8.5).  (n, N) -> (n,), (n,) int.

    With a single neuron the gap is +inf."""
    if a.shape[-1] < 2:
        return torch.full(a.shape[:-1], math.inf, dtype=a.dtype, device=a.device), a.argmax(-1)
    top, idx = torch.topk(a, 2, dim=-1)
    return top[..., 0] - top[..., 1], idx[..., 0]


def energy_gap_bound(delta: Tensor, eps: float, n_neurons: int) -> Tensor:
    """Upper bound on f - a_(1): eps log(1 + (N-1) exp(-Delta/eps)) (Prop 8.5), computed stably."""
    if n_neurons < 2:
        return torch.zeros_like(delta)
    x = math.log(n_neurons - 1) - delta / eps
    # softplus via logaddexp: torch's softplus turns linear above x = 20 (error up to 2e-9 eps)
    return eps * torch.logaddexp(x, torch.zeros_like(x))


# --------------------------------------------------------------------------------------------
# derivatives
# --------------------------------------------------------------------------------------------


def gradient(pi: Tensor, W: Tensor) -> Tensor:
    """grad f = sum_j pi_j w_j (a convex combination of rows, Cor 8.2).  (..., N), (N, d) -> (..., d)."""
    return pi @ W


def hessian(pi: Tensor, W: Tensor, eps: float) -> Tensor:
    """Hess f = Cov_pi(w) / eps.  (n, N), (N, d) -> (n, d, d)."""
    mean = pi @ W
    second = torch.einsum("nj,jd,je->nde", pi, W, W)
    return (second - mean.unsqueeze(-1) * mean.unsqueeze(-2)) / eps


def gauss_legendre(edges, order: int, dtype=torch.float64, device=None) -> tuple[Tensor, Tensor]:
    """Composite Gauss-Legendre nodes and weights over the panels between sorted ``edges`` (an int
    ``n`` means n equal panels on [0, 1]): (panels * order,) each."""
    import numpy as np

    e = np.linspace(0.0, 1.0, edges + 1) if isinstance(edges, int) else np.asarray(edges, dtype=np.float64)
    x, w = np.polynomial.legendre.leggauss(order)
    half, mid = 0.5 * np.diff(e), 0.5 * (e[1:] + e[:-1])
    nodes = (mid[:, None] + half[:, None] * x[None, :]).reshape(-1)
    weights = (half[:, None] * w[None, :]).reshape(-1)
    return (torch.as_tensor(nodes, dtype=dtype, device=device),
            torch.as_tensor(weights, dtype=dtype, device=device))


def integrated_gradients(z: Tensor, z0: Tensor, W: Tensor, b: Tensor, eps: float,
                         mask: Tensor | None = None, output: Tensor | None = None,
                         panels: int = 32, order: int = 8) -> Tensor:
    """Exact integrated gradients of an LSE layer along z0 -> z.

    Every a_j is affine in alpha along the path, so IG_i = (z - z0)_i * sum_j w_ji int_0^1 pi_j
    d alpha: a 1-D integral of Gibbs weights. It is done by composite Gauss-Legendre quadrature
    whose panels are graded geometrically (ratio 2) around every breakpoint of the upper envelope
    max_j a_j(alpha) (where the dominant neuron changes), starting at the transition width
    eps / |slope_j - slope_k|; the integrand is analytic on each panel, so the quadrature converges
    to rounding at any eps. Completeness: sum_i IG_i = f(z) - f(z0).

    z, z0: (n, d) (z0 may be (d,)). With ``mask: (K, N)`` the attribution is for output
    ``output: (n,)`` (long) of a grouped layer. Returns (n, d).
    """
    z0 = z0.expand_as(z)
    a0 = preactivations(z0, W, b)                       # (n, N)
    da = (z - z0) @ W.transpose(-1, -2)
    keep = torch.ones_like(a0, dtype=torch.bool) if mask is None else mask[output]  # (n, N)
    avg_pi = torch.empty_like(a0)
    for i in range(z.shape[0]):
        nodes, weights = _ig_nodes(a0[i], da[i], keep[i], eps, panels, order)
        path = a0[i] + nodes.unsqueeze(-1) * da[i]      # (q, N)
        avg_pi[i] = weights @ masked_lse_gibbs(path, keep[i], eps)[1]
    return (z - z0) * (avg_pi @ W)


def _ig_nodes(a0: Tensor, da: Tensor, keep: Tensor, eps: float, panels: int, order: int,
              grid: int = 2048) -> tuple[Tensor, Tensor]:
    """Quadrature nodes/weights on [0, 1] for int pi(a0 + alpha da) d alpha (one row)."""
    import numpy as np

    edges = set(np.linspace(0.0, 1.0, panels + 1).tolist())
    a0n, dan = a0.detach().cpu().numpy(), da.detach().cpu().numpy()
    live = keep.cpu().numpy()
    a0n, dan = a0n[live], dan[live]
    if len(a0n) > 1:
        alphas = np.linspace(0.0, 1.0, grid + 1)
        top = np.argmax(a0n[None, :] + alphas[:, None] * dan[None, :], axis=1)
        for c in np.nonzero(top[1:] != top[:-1])[0]:
            j, k = top[c], top[c + 1]
            slope = abs(dan[j] - dan[k])
            if slope == 0:
                continue
            cross = float(np.clip((a0n[k] - a0n[j]) / (dan[j] - dan[k]), alphas[c], alphas[c + 1]))
            edges.add(cross)
            step = eps / slope
            while step < 1.0:
                edges.update(e for e in (cross - step, cross + step) if 0.0 < e < 1.0)
                step *= 2.0
    e = np.array(sorted(edges))
    e = e[np.concatenate([[True], np.diff(e) > 1e-15])]
    return gauss_legendre(e, order, a0.dtype, a0.device)


# --------------------------------------------------------------------------------------------
# Hamilton-Jacobi reading (Thm 4.1, Thm 5.1)
# --------------------------------------------------------------------------------------------


def hj_reading(W: Tensor, b: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """Support points y_j = 2 t w_j and initial data g_j = -b_j - t |w_j|^2 (Thm 4.1).

    (N, d), (N,) -> (N, d), (N,)."""
    return 2.0 * t * W, -b - t * (W * W).sum(-1)


def _hj_exponent(z: Tensor, y: Tensor, g: Tensor, t: float) -> Tensor:
    """g_j + |z - y_j|^2 / (4t).  (n, d), (N, d), (N,) -> (n, N)."""
    return g + squared_distances(z, y) / (4.0 * t)


def hopf_cole_value(z: Tensor, y: Tensor, g: Tensor, t: float, eps: float,
                    mask: Tensor | None = None) -> Tensor:
    """u(z, t) = -eps log sum_j exp(-(g_j + |z - y_j|^2/(4t))/eps) (Hopf-Cole, Thm 4.1).  -> (n,).

    Equals |z|^2/(4t) - f(z) for the layer with y = 2tW, g = -b - t|W|^2. Without the heat-kernel
    prefactor it solves u_t + |grad u|^2 - eps Lap u = -eps d/(2t); u + (eps d/2) log(4 pi eps t)
    solves the viscous HJ equation exactly.

    ``mask`` (n, N) bool: row i sums over the support points with ``mask[i, j]`` only (e.g. one
    class's points, or every point but a training row's own: leave-one-out); a row with none is +inf."""
    e = -_hj_exponent(z, y, g, t)
    if mask is not None:
        e = torch.where(mask, e, -math.inf)
    return -lse(e, eps)


def hopf_cole_tables(y: Tensor, g: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor]:
    """The input-independent part of :func:`hopf_cole_value_in_group` for points y (M, p), initial
    values g (M,) and time t: (centre c (1, p), coefficients (p, M + 1), offsets (M + 1,)).

    -(g_j + |z - y_j|^2/(4t)) = q_j(z) - |z - c|^2/(4t) about the centre c of the points, with
    q_j(z) = (z - c) . (y_j - c) / (2t) - (g_j + |y_j - c|^2 / (4t)) affine in z: one matrix product
    with a bias (one Gemm in the served graph; the (n, M) subtraction and the copy that appended the
    padding column cost as much as the product itself), and an empty padding slot M (offset -inf)
    for the groups' padding. Computed once per reference (:meth:`hjmodel.models.OODReference.hopf_cole_tables`):
    eager torch would otherwise redo this (M, p) work on every call."""
    c = y.mean(0, keepdim=True)
    yc = y - c
    offset = torch.cat([-(g + (yc * yc).sum(-1) / (4.0 * t)), yc.new_full((1,), -math.inf)])      # (M + 1,)
    coef = torch.cat([yc.T / (2.0 * t), yc.new_zeros(yc.shape[1], 1)], 1)                        # (p, M + 1)
    return c, coef, offset


def hopf_cole_value_in_group(z: Tensor, tables: tuple[Tensor, Tensor, Tensor], t: float, eps: float,
                             groups: Groups, group: Tensor) -> Tensor:
    """:func:`hopf_cole_value` with row i summing over the support points of group ``group[i]`` of
    ``groups`` only (a :class:`Groups` table over the points): the masked form's value, with the
    exponentials taken over one group per row instead of every point. ``tables``: the points'
    :func:`hopf_cole_tables`.  -> (n,); +inf for an empty group."""
    # the row term |z - c|^2/(4t) leaves the log-sum-exp: the (n, M) work is the product alone, and
    # the exponentials are taken over the row's group
    c, coef, offset = tables
    zc = z - c
    q = torch.addmm(offset, zc, coef)                                                              # (n, M + 1)
    index = groups.slots.to(z.device).index_select(0, group)              # (n, S)
    return (zc * zc).sum(-1) / (4.0 * t) - lse(q.gather(-1, index), eps)


def count_at_least(sorted_ref: Tensor, s: Tensor, unrolled: bool | None = None) -> Tensor:
    """#{j: sorted_ref_j >= s_i} for ascending ``sorted_ref`` (m,) and scores s (n,) -> (n,) long.

    ``unrolled`` (default: only while exporting to ONNX): the form below, for the served graph;
    otherwise one ``torch.searchsorted`` (eager torch pays per operation, ~20 of them here; the test
    holds both forms to the direct count).

    A two-level search, so the served graph does O(n sqrt m) work rather than an (n, m) comparison,
    in a dozen nodes; NaN scores count 0 (no reference is >= NaN). The reference, padded with +inf to
    B (C + 1) entries (B = ceil(sqrt m) per block, C blocks, and one more block of +inf), is read as
    blocks: the blocks whose last entry lies below s are the ones wholly below it (the reference is
    ascending), and one gather of the next block, whose entries below s are counted, finishes the
    count of references below s. The blocks' last entries are weight-only constants of the graph.
    (An unrolled binary search took floor(log2 m) + 1 steps of an add, a gather, a comparison and a
    select: ~75 nodes per count for a thousand references, a fifth of a classifier's batch-1 time
    in `bench/results/graph_profile.md`.)"""
    m = int(sorted_ref.shape[0])                               # a Python number, also when exporting
    if m == 0:
        return torch.zeros_like(s, dtype=torch.long)
    if not (torch.onnx.is_in_onnx_export() if unrolled is None else unrolled):
        below = torch.searchsorted(sorted_ref, s, side="left")   # #{ref < s}
        return torch.where(torch.isnan(s), 0, m - below)
    B = math.isqrt(m - 1) + 1                                  # ceil(sqrt m): B * B >= m
    C = -(-m // B)                                             # blocks holding the reference
    padded = torch.cat([sorted_ref, torch.full((B * (C + 1) - m,), math.inf, dtype=sorted_ref.dtype,
                                               device=sorted_ref.device)])
    last = padded[B - 1:B * C:B]                                         # (C,) each block's last entry
    blocks = (last < s.unsqueeze(-1)).sum(-1)                            # (n,) blocks wholly below s
    offsets = torch.arange(B, device=s.device)
    block = padded.index_select(0, (blocks.unsqueeze(-1) * B + offsets).reshape(-1)).reshape(*s.shape, B)
    below = blocks * B + (block < s.unsqueeze(-1)).sum(-1)
    return torch.where(torch.isnan(s), 0, m - below)


def likelihood_gauge(points: Tensor, labels: Tensor | None, eps: float, grid: Tensor) -> float:
    """The gauge t in ``grid`` that maximises the leave-one-out log-likelihood of the reference
    measure read as a density: the heat kernel of the Hopf-Cole value, a Gaussian of variance 2 t eps
    per coordinate, centred at each reference point -- class by class when ``labels`` (M,) are given
    (row i is scored against the other points of its own class; rows alone in their class skip).

    This is kernel-density bandwidth selection by likelihood cross-validation, with the bandwidth
    expressed as the HJ gauge.  (M, p) -> float."""
    M, p = points.shape
    d2 = squared_distances(points, points)
    same = (labels.unsqueeze(0) == labels.unsqueeze(1)) if labels is not None else torch.ones_like(d2, dtype=torch.bool)
    same &= ~torch.eye(M, dtype=torch.bool)
    scored = same.any(-1)
    log_count = torch.log(same.sum(-1).clamp_min(1).to(points.dtype))
    best_t, best = float(grid[0]), -math.inf
    for t in grid.tolist():
        var = 2.0 * t * eps
        e = torch.where(same, -d2 / (2.0 * var), -math.inf)
        ll = (logsumexp(e) - log_count)[scored].sum() - 0.5 * p * math.log(2.0 * math.pi * var) * int(scored.sum())
        if float(ll) > best:
            best_t, best = t, float(ll)
    return best_t


def hopf_lax_value(z: Tensor, y: Tensor, g: Tensor, t: float) -> Tensor:
    """min_j (g_j + |z - y_j|^2/(4t)): the eps -> 0 (tropical) limit of u (Thm 5.1).  -> (n,)."""
    return _hj_exponent(z, y, g, t).min(-1).values


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """|x_i - y_j|^2.  (n, d), (m, d) -> (n, m).

    Small problems use exact differences (no cancellation). Large ones, and every ONNX export (whose
    batch is dynamic), expand |x|^2 - 2 x.y + |y|^2 about the centre of y (O(n m) memory; relative
    accuracy ~1e-16 |x - c|^2) and clamp at 0."""
    n, m, d = x.shape[-2], y.shape[-2], x.shape[-1]
    if not static_graph() and n * m * d <= _EXACT_LIMIT:
        diff = x.unsqueeze(-2) - y.unsqueeze(-3)
        return (diff * diff).sum(-1)
    c = y.mean(-2, keepdim=True)
    x, y = x - c, y - c
    sq = (x * x).sum(-1).unsqueeze(-1) - 2.0 * (x @ y.transpose(-1, -2)) + (y * y).sum(-1)
    return sq.clamp_min(0.0)


def group_distance_bounds(W: Tensor, group: Tensor, n_groups: int, chunk: int = 1024) -> Tensor:
    """Upper bounds on max_{i in A, j in B} |w_i - w_j|^2 for every pair of groups (A, B).

    ``group`` (N,) long in [0, n_groups): each row's group. -> (n_groups, n_groups), symmetric; 0
    where a group is empty (and, on the diagonal, where it has one row). Weight-only constants of the
    certificates: an upper bound must stay an upper bound, and the table must not need (N, N) memory.

    The rows are sorted by group and streamed in blocks of at most ``chunk`` rows (and 2^24 / N, so a
    block's distances take at most 128 MiB), each block against itself and the rows after it only:
    |w_i - w_j| = |w_j - w_i|, so each unordered pair is met once and the table is symmetrised at the
    end. Memory is O(chunk N), time O(N^2 p / 2) (N = 60,000 support points in d = 784: 1.4e12
    multiply-adds in the block products). Rows x = w - c are taken about the mean row c. When a
    block is small each distance is the sum of the squared differences. Otherwise a block is one
    product, |x_j|^2 - 2 x_i.x_j for every pair (``addmm``), whose maximum over each group of
    columns is taken before |x_i|^2 is added (rounding is monotone, so adding it to the maximum
    rounds to the maximum of the sums): no other pass over the block. Either way the computed
    value is within (p + 4) u (|x_i| + |x_j|)^2 of |w_i - w_j|^2, u = 2^-53 (the expansion: three
    p-term float64 sums, each off by at most p u |x_i| |x_j|, and two additions; the differences:
    x rounded off by u |x| a coordinate, each difference 2 u (|x_ik| + |x_jk|) off, its square
    4 u (|x_ik| + |x_jk|)^2, the sum p u more). Twice that, at the largest norm of each group, is
    added to each group pair's maximum, which is then rounded up: a bound, and within ~1e-13
    relative of the exact maximum."""
    N, p = W.shape
    if N < 2:
        return W.new_zeros(n_groups, n_groups)
    order = torch.argsort(group, stable=True)
    group = group[order]
    X = W[order] - W.mean(0, keepdim=True)
    sq_norm = (X * X).sum(-1)
    counts = torch.bincount(group, minlength=n_groups)
    ends = torch.cumsum(counts, 0).tolist()
    segments = [(g, e - int(c), e) for g, (c, e) in enumerate(zip(counts.tolist(), ends)) if c]
    rows_per_block = max(1, min(chunk, (1 << 24) // N))
    exact = rows_per_block * N * p <= _EXACT_LIMIT
    found = W.new_full((n_groups, n_groups), -math.inf)
    for i in range(0, N, rows_per_block):
        j = min(i + rows_per_block, N)
        cols = X[i:]                                       # this block's rows and every later row
        if exact:
            diff = X[i:j].unsqueeze(1) - cols.unsqueeze(0)
            block = (diff * diff).sum(-1)                  # (rows, N - i)
        else:
            block = torch.addmm(sq_norm[i:].unsqueeze(0), X[i:j], cols.T, alpha=-2.0)
        # the maximum over each group of columns (a slice each: the columns are sorted by group;
        # one scatter when the groups are many), then over each group of rows
        col_max = W.new_full((j - i, n_groups), -math.inf)
        if len(segments) > _SLICED_GROUPS:
            col_max.scatter_reduce_(1, group[i:].unsqueeze(0).expand(j - i, -1), block, "amax", include_self=True)
        else:
            for g, start, end in segments:
                if end > i:
                    col_max[:, g] = block[:, max(start, i) - i:end - i].amax(1)
        if not exact:
            col_max = col_max + sq_norm[i:j].unsqueeze(1)
        found.scatter_reduce_(0, group[i:j].unsqueeze(1).expand(-1, n_groups), col_max, "amax", include_self=True)
    found = torch.maximum(found, found.T)
    seen = found > -math.inf
    top = W.new_zeros(n_groups).scatter_reduce_(0, group, sq_norm.sqrt(), "amax", include_self=True)
    found = found + 2.0 * (p + 4) * 2.0 ** -53 * (top.unsqueeze(1) + top.unsqueeze(0)) ** 2
    found = torch.nextafter(found.clamp_min(0.0), torch.tensor(math.inf, dtype=found.dtype))
    found = found.diagonal_scatter(torch.where(counts == 1, 0.0, found.diagonal()))   # |w_i - w_i| = 0
    return torch.where(seen, found, 0.0)


def _groups_of(masks: Tensor) -> tuple[Tensor, int]:
    """Partition of the N rows by their membership in every mask: (group (N,), number of groups).
    masks: (..., N) bool; every mask is then a union of groups."""
    sig = masks.reshape(-1, masks.shape[-1]).T                         # (N, masks)
    _, group = torch.unique(sig, dim=0, return_inverse=True)
    return group, int(group.max()) + 1


def pairwise_distances(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distances |x_i - y_j|.  (n, d), (m, d) -> (n, m)."""
    return squared_distances(x, y).sqrt()


# --------------------------------------------------------------------------------------------
# constants and certificates (Cor 8.2 sharpened, DESIGN section 3)
# --------------------------------------------------------------------------------------------


def diameter(W: Tensor) -> Tensor:
    """D >= max_{i,j} |w_i - w_j| (a sound upper bound within ~1e-13 relative; 0 for fewer than
    two rows).  (N, d) -> scalar."""
    if W.shape[0] < 2:
        return W.new_zeros(())
    return group_distance_bounds(W, torch.zeros(W.shape[0], dtype=torch.long), 1)[0, 0].sqrt()


def hybrid_radius(m: Tensor, G: Tensor, L: Tensor, kappa: Tensor) -> Tensor:
    """Largest r with Phi(r) = int_0^r min(L, G + kappa s) ds <= m (DESIGN section 3).

    r = 2m / (G + sqrt(G^2 + 2 kappa m)) while r <= t* = (L - G)/kappa, else
    r = t* + (m - G t* - kappa t*^2 / 2) / L.  m <= 0 gives 0. All arguments broadcast.
    Dominates both m/L and the pure curvature radius.
    """
    m = torch.clamp(m, min=0.0)
    G = torch.minimum(G, L)
    curv = 2.0 * m / (G + torch.sqrt(G * G + 2.0 * kappa * m)).clamp_min(torch.finfo(m.dtype).tiny)
    t_star = (L - G) / kappa.clamp_min(torch.finfo(m.dtype).tiny)
    lin = t_star + (m - G * t_star - 0.5 * kappa * t_star * t_star) / L.clamp_min(torch.finfo(m.dtype).tiny)
    r = torch.where(curv <= t_star, curv, lin)
    return torch.where(m > 0, r, 0.0)


def lipschitz_radius(m: Tensor, L: Tensor) -> Tensor:
    """Plain Lipschitz radius m / L (baseline; always <= :func:`hybrid_radius`)."""
    return torch.clamp(m, min=0.0) / L


def eps15_radius(tau: Tensor, R: Tensor, eps: float) -> Tensor:
    """The paper's eq. 15 radius (eps/R)(sqrt(1 + 2 tau/eps) - 1) (baseline; <= tau/R)."""
    return (eps / R) * (torch.sqrt(1.0 + 2.0 * tau / eps) - 1.0)


def scalar_radius(G: Tensor, R: Tensor, D: Tensor, eps: float, tau: Tensor) -> Tensor:
    """Certified radius of an LSE output: |f(z + delta) - f(z)| <= tau whenever |delta| <= r.

    G = |grad f(z)|, R = max_j |w_j| (Lipschitz), kappa = D^2/(4 eps) (Popoviciu curvature)."""
    return hybrid_radius(tau, G, R, D * D / (4.0 * eps))


def sign_reduction_biases(b: Tensor, u: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Exact reduction of sign(sum_j pi_j u_j) to an LSE margin (DESIGN section 3).

    sign(sum_j pi_j u_j) = sign(s+ - s-), s+/- the LSE layers over {u_j > 0} / {u_j < 0} with biases
    b_j + eps log|u_j|. Returns (pos mask, neg mask, shifted biases) with the shape of ``u``.
    :func:`gibbs_margin_radius` adds the result to pre-activations that already contain b, so call
    it with ``b = 0`` there."""
    pos, neg = u > 0, u < 0
    shifted = b + eps * torch.log(u.abs().clamp_min(torch.finfo(u.dtype).tiny))
    return pos, neg, shifted


def certificate_tables(W: Tensor, pos: Tensor, neg: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Global constants of the margin s+ - s- for every (c, k) pair.

    pos, neg: (K, K, N) masks of the two LSE groups of each pair. Returns
    L: (K, K) >= max_{i in pos, j in neg} |w_i - w_j| (sharp Lipschitz constant of the margin) and
    kappa: (K, K) >= D(neg)^2 / (4 eps) (the margin bends down only through the negative group).
    Entries with an empty side are 0.

    The rows are partitioned by their membership in every mask (K groups for an lse head or a memory
    head's classes), the squared distances bounded group by group (:func:`group_distance_bounds`,
    O(N) memory), and each pair's constants read off as the max over the groups its masks hold."""
    group, G = _groups_of(torch.stack([pos, neg]))
    sq = group_distance_bounds(W, group, G)                               # (G, G)
    rep = torch.zeros(G, dtype=torch.long).scatter_(0, group, torch.arange(group.shape[0]))  # a row of each group
    P, Q = pos[..., rep], neg[..., rep]                                   # (K, K, G): the groups each mask holds
    big = sq.unsqueeze(0).unsqueeze(0)                                    # (1, 1, G, G)
    pair = (P.unsqueeze(-1) & Q.unsqueeze(-2))
    L = torch.where(pair, big, 0.0).amax((-1, -2)).sqrt()
    L = torch.nextafter(L, torch.full_like(L, math.inf)) * (L > 0)
    inside = Q.unsqueeze(-1) & Q.unsqueeze(-2)
    D2 = torch.where(inside, big, 0.0).amax((-1, -2))
    kappa = torch.where(neg.sum(-1) >= 2, D2 / (4.0 * eps), 0.0)
    return L, kappa


def _two_groups(ak: Tensor, pos: Tensor, neg: Tensor, eps: float, rounding: float | None):
    """s+ and s- (0 where either is infinite), their Gibbs weights, the rounding-floored s+
    (``target``) and where both are finite -- shared by :func:`sign_margin` and
    :func:`tangent_radius`, so the served graph evaluates the two LSE groups once."""
    sp, pip = masked_lse_gibbs(ak, pos, eps)
    sq, piq = masked_lse_gibbs(ak, neg, eps)
    finite = (sp.abs() < math.inf) & (sq.abs() < math.inf)
    sp0, sq0 = torch.where(finite, sp, 0.0), torch.where(finite, sq, 0.0)
    if rounding is None:
        rounding = 64 * torch.finfo(ak.dtype).eps
    target = sp0 - rounding * (sp0.abs() + sq0.abs())
    return target, sq0, pip, piq, finite


def sign_margin(ak: Tensor, pos: Tensor, neg: Tensor, eps: float,
                rounding: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The margin m = s+ - s- of two LSE groups of pre-activations ``ak`` and its gradient weights.

    s+/- are the LSE over ``pos`` / ``neg`` (broadcast with ``ak``, last axis = neurons). Returns
    (m, coef, never): grad m = coef @ W with coef = pi+ - pi- (the within-group Gibbs weights), and
    ``never`` marks an empty negative side (that side can never win). ``rounding`` (relative; default
    64 ulp of the dtype) times |s+| + |s-| is subtracted from m, so a margin that is 0 in exact
    arithmetic but rounds to a few ulp is not certified."""
    target, sq0, pip, piq, _ = _two_groups(ak, pos, neg, eps, rounding)
    return target - sq0, pip - piq, ~neg.any(-1)


def tangent_radius(ak: Tensor, pos: Tensor, neg: Tensor, W: Tensor, eps: float,
                   rounding: float | None = None, iters: int = _TANGENT_ITERS,
                   float32_search: bool | None = None) -> Tensor:
    """A local certificate of the margin s+ - s- that is sharp for kernel-like (memory) layers.

    s+ is convex, so s+(z + delta) >= s+(z) + g . delta with g = grad s+(z) = sum_pos pi+_j w_j; the
    margin is unchanged by subtracting g . delta from both sides, and
    s-(z + delta) - g . delta = eps LSE_neg(a_j + (w_j - g) . delta) <= eps LSE_neg(a_j + |w_j - g| r).
    So the decision holds on the ball of radius r while
        phi(r) = s+(z) - eps LSE_{j in neg}(a_j + |w_j - g| r) - rounding > 0,
    a concave decreasing function of r: its root is bracketed by min_j (s+ - a_j)/|w_j - g| and
    approached by ``iters`` steps of regula falsi from below (chords lie below a concave function,
    so every accepted iterate is sound) with Newton steps from above. For a hard nearest-neighbour rule it
    is the distance to the bisecting hyperplane.

    ak: (n, K, N) pre-activations (with shifts), pos/neg: (n, K, N), W: (N, p) rows in the coordinates
    of the certificate. ``float32_search``: see :func:`_tangent_solve`. Returns (n, K); 0 where the
    margin is not positive, +inf for an empty negative side."""
    return _tangent(ak, neg, W, eps, *_two_groups(ak, pos, neg, eps, rounding), iters=iters,
                    float32_search=float32_search)


def _tangent(ak, neg, W, eps, target, sq0, pip, piq, finite, iters: int, float32_search: bool | None = None) -> Tensor:
    """:func:`tangent_radius` from the already evaluated groups (:func:`_two_groups`)."""
    g = pip @ W                                                     # (n, K, p)
    c2 = (W * W).sum(-1) - 2.0 * (g @ W.transpose(-1, -2)) + (g * g).sum(-1, keepdim=True)
    return _tangent_solve(ak, neg, c2.clamp_min(0.0).sqrt(), eps, target, sq0, finite, iters, float32_search)


def _tangent_bracket(ak, neg, c, target) -> Tensor:
    """The upper end of the root's bracket in :func:`_tangent_solve`: min_j (target - a_j) / c_j over
    the negative side's moving neurons (the ball on which each of them alone stays below target),
    clamped at 0; +inf when none moves (a neuron at a_j = -inf never does: it adds nothing at any r).
    ``neg`` None: ``ak`` is -inf outside the negative side."""
    moving = c > 0 if neg is None else neg & (c > 0)
    return torch.where(moving, (target.unsqueeze(-1) - ak) / c, math.inf).amin(-1).clamp_min(0.0)


def _tangent_solve(ak, neg, c, eps, target, sq0, finite, iters: int, float32_search: bool | None = None,
                   bracket: Tensor | None = None) -> Tensor:
    """The root of phi(r) = target - eps LSE_neg(a_j + c_j r) of :func:`tangent_radius`, given the
    distances c_j = |w_j - g| (broadcast with ``ak``).

    Regula falsi from below and Newton from above, in eps units about target,
    phi(r) / eps = -LSE_neg((a_j - target) / eps + c_j r / eps), so that the terms near the root are
    of order one. With a wide negative side (at least ``_TANGENT_F32_MIN`` neurons: memory heads) the
    search runs in float32 and only its answer is proven, in float64 (:func:`_tangent_check`): a
    float32 exponential costs onnxruntime about a fifteenth of a float64 one (in the served
    sessions, which flush subnormals), and this search was the largest part of a memory model's
    graph; there soundness rests on the check alone, so the search may be as rough as it likes, and
    each chord steps back 2^-18 relative, several times float32's error in phi near the root, so that
    a chord just short of it is still accepted. With a narrow one (lse and deep heads: a handful of
    neurons per class) the extra nodes would cost more than they save, the search runs in float64 and
    every accepted chord is itself the proof (phi >= 0 in float64, with the rounding slack of
    ``target`` as in every other certificate). ``float32_search`` makes the choice (None: by the
    width of ``ak``; a model passes its own, so that every layout of its certificate searches alike).
    ``neg``: the negative side (a mask broadcast with ``ak``), or None where ``ak`` is -inf outside it
    (the padding of the :class:`Groups` layout), which saves the masking passes. ``bracket``: the
    caller's :func:`_tangent_bracket` of the same arguments, when it has it."""
    f32 = ak.shape[-1] >= _TANGENT_F32_MIN if float32_search is None else float32_search
    cast = float32_saturate if f32 else (lambda t: t)
    hi = _tangent_bracket(ak, neg, c, target) if bracket is None else bracket
    # no neuron of the negative side moves relative to g: the margin is constant on every ball
    static = hi == math.inf
    hi = cast(torch.where(static, 0.0, hi))
    lo = torch.zeros_like(hi)

    # the negative side's exponents about target (-inf outside it) and slopes, in eps units, once:
    # each evaluation of phi is then one pass to form the exponents, a max-shifted sum of
    # exponentials and, only where the slope is needed (at hi), one weighted sum. The float32 search
    # shares the float64 exponents a_j / eps and slopes with its check; the cast keeps -inf (only the
    # top of the range is clamped: a float32 +inf exponent would poison the shift)
    if f32:
        ak_eps, c_eps = (ak / eps if neg is None else torch.where(neg, ak / eps, -math.inf)), c / eps
        ak_e = (ak_eps - (target / eps).unsqueeze(-1)).clamp(max=FLOAT32_MAX).to(torch.float32)
        c_e = float32_saturate(c_eps)
    else:
        ak_e = (ak - target.unsqueeze(-1)) / eps
        ak_e, c_e = (ak_e if neg is None else torch.where(neg, ak_e, -math.inf)), c / eps

    def phi(r: Tensor, slope: bool = True) -> tuple[Tensor, Tensor | None]:
        v = ak_e + c_e * r.unsqueeze(-1)
        top = _finite_shift(v.amax(-1))
        e = torch.exp(v - top.unsqueeze(-1))
        total = e.sum(-1)
        value = -(top + torch.log(total))                           # phi / eps; +inf for an empty side
        if not slope:
            return value, None
        return value, -(e * c_e).sum(-1) / torch.where(total > 0, total, 1.0)

    # phi is concave: the chord from lo (phi >= 0) to hi (phi <= 0) lies below it, so the chord's
    # root is a new lo; Newton's step from hi stays at or right of the root (tangent above). Each
    # chord stays clear of the root by 1e-6 of its step and, in float32, by 2^-18 of itself: by more
    # than the precision's error in phi there, so that acceptance is robust to rounding
    # One evaluation of phi per step: a step's chord and its new hi are evaluated together (stacked),
    # the chord for the new lo and hi for the next step's chord and Newton step -- the same numbers
    # as two evaluations, in fewer graph nodes (what a batch of one pays for). The float32 search
    # proves hi, so its last chord is not evaluated.
    phi_lo = cast((target - sq0) / eps)
    phi_hi, dphi_hi = phi(hi)
    for step in range(iters):
        denom = phi_lo - phi_hi
        chord = lo + phi_lo * (hi - lo) / torch.where(denom > 0, denom, 1.0)
        chord = torch.where(denom > 0, torch.minimum(torch.maximum(chord, lo), hi), lo)
        chord = lo + (chord - lo) * (1.0 - 1e-6)
        if f32:
            chord = torch.maximum(lo, chord * (1.0 - 2.0 ** -18))
        newton = hi - phi_hi / torch.where(dphi_hi < 0, dphi_hi, -1.0)
        hi = torch.where(dphi_hi < 0, torch.minimum(torch.maximum(newton, chord), hi), hi)
        if step == iters - 1:
            if f32:
                break
            phi_c, _ = phi(chord, slope=False)
        else:
            values, slopes = phi(torch.stack([chord, hi]))
            phi_c, phi_hi, dphi_hi = values[0], values[1], slopes[1]
        better = phi_c >= 0
        lo = torch.where(better, chord, lo)
        phi_lo = torch.where(better, phi_c, phi_lo)
    r = _tangent_check(ak_eps, c_eps, eps, target, sq0, hi.to(ak.dtype)) if f32 else lo
    positive = (target - sq0 > 0) & finite
    r = torch.where(static & positive, math.inf, r)
    r = torch.where(positive, r, 0.0)
    return r if neg is None else torch.where(~neg.any(-1), math.inf, r)


def _tangent_check(ak_eps: Tensor, c_eps: Tensor, eps: float, target: Tensor, sq0: Tensor, r: Tensor) -> Tensor:
    """A radius of :func:`tangent_radius` proven in float64 from an estimate r of the root of
    phi(r) = target - eps LSE_neg(a_j + c_j r), given the negative side's a_j / eps (-inf outside it)
    and c_j / eps. Two candidates are checked in one evaluation: r lowered by 2^-20 relative, and r
    raised by 2^-3. A candidate where phi >= 0 is sound as it stands; one past the root
    (phi < 0 < phi(0) = target - s-) gives the root of the chord between (0, phi(0)) and it, which is
    sound because phi is concave and so lies above that chord -- a regula falsi step, with no
    further exponential. The larger result is served. The raised candidate covers an estimate that
    float32 left short of the root (a margin of a few float32 steps, where its error in phi is a good
    part of phi itself): phi is nearly linear there, and the chord from 0 lands close to the root.
    Rows with phi(0) <= 0 are the caller's (radius 0). Every phi here carries the rounding slack of
    ``target``, far above float64's rounding of the evaluations, as in every other certificate."""
    cand = torch.stack([r * (1.0 - 2.0 ** -20), r * (1.0 + 2.0 ** -3)])             # (2, ...)
    phi_r = target - eps * logsumexp(ak_eps + c_eps * cand.unsqueeze(-1))
    fall = (target - sq0) - phi_r
    chord = cand * (target - sq0) / torch.where(fall > 0, fall, 1.0) * (1.0 - 2.0 ** -20)
    return torch.where(phi_r >= 0, cand, torch.where(fall > 0, chord, 0.0)).amax(0)


def _pair_hybrid(m: Tensor, grad: Tensor, c: Tensor, L: Tensor, kappa: Tensor, pullback, lip: float,
                 curv: float) -> Tensor:
    """The hybrid radius of every pair (c, k) from its margin m (n, K) and gradient (n, K, p) in the
    layer's coordinates (``pullback`` maps it to the input's; ``lip`` / ``curv`` compose the feature
    map's bounds with the pair's constants, see :func:`gibbs_margin_radius`)."""
    if pullback is not None:
        grad = pullback(grad)
    G = torch.linalg.vector_norm(grad, dim=-1)          # (n, K): exact |grad m_k(x)|
    Lc, kc = L[c], kappa[c]
    return hybrid_radius(m, G, Lc * lip, kc * lip * lip + Lc * curv)


def gibbs_margin_radius(a: Tensor, W: Tensor, eps: float, c: Tensor, pos: Tensor, neg: Tensor,
                        shift: Tensor, L: Tensor, kappa: Tensor, rounding: float | None = None,
                        pullback=None, lip: float = 1.0, curv: float = 0.0,
                        tangent_rows: Tensor | None = None, float32_search: bool | None = None) -> tuple[Tensor, Tensor]:
    """Certified L2 radius of the decision ``c`` against every other class (DESIGN section 3).

    For each pair (c, k) the decision margin is m_k = s+ - s- (:func:`sign_margin`) over ``pos[c, k]``
    / ``neg[c, k]`` with pre-activations ``a + shift[c, k]``; G_k = |grad m_k| is exact, and r_k =
    :func:`hybrid_radius` with L = L[c, k], kappa = kappa[c, k]. The certificate is min_k r_k; a
    tie gives 0.

    When the layer sits on a feature map h(x) (deep bodies, preprocessing), ``pullback`` maps
    gradients in h to gradients in x (exact G) and ``lip`` / ``curv`` bound the map's Lipschitz
    constant and vector curvature: along a unit ray phi'' >= -kappa lip^2 - L curv and
    |phi'| <= L lip, so r_k uses L lip and kappa lip^2 + L curv.

    With ``tangent_rows`` (the rows W in the coordinates of the certificate, i.e. raw input space
    when there is no body) each r_k is the larger of the hybrid radius and :func:`tangent_radius`
    (divided by ``lip``: a ball of radius r in x maps into one of radius lip r in h); both are sound.

    a: (n, N) pre-activations, W: (N, p), c: (n,) long, pos/neg: (K, K, N) bool, shift: (K, K, N),
    L/kappa: (K, K). Returns (radius (n,), per-class radius (n, K) with +inf at k = c).
    """
    K = pos.shape[0]
    P, Q, S = pos[c], neg[c], shift[c]                  # (n, K, N)
    ak = a.unsqueeze(1) + S
    groups = _two_groups(ak, P, Q, eps, rounding)
    target, sq0, pip, piq, _ = groups
    m, never = target - sq0, ~Q.any(-1)
    r = _pair_hybrid(m, (pip - piq) @ W, c, L, kappa, pullback, lip, curv)
    if tangent_rows is not None:
        r = torch.maximum(r, _tangent(ak, Q, tangent_rows, eps, *groups, iters=_TANGENT_ITERS,
                                      float32_search=float32_search) / lip)
    inf = torch.full_like(r, math.inf)
    r = torch.where(never, inf, r)
    r = torch.where(torch.nn.functional.one_hot(c, K).bool(), inf, r)
    return r.min(-1).values, r


def grouped_margin_radius(a_g: Tensor, s: Tensor, pi_g: Tensor, valid: Tensor, c: Tensor, W_g: Tensor,
                          eps: float, L: Tensor, kappa: Tensor, rounding: float | None = None,
                          pullback=None, lip: float = 1.0, curv: float = 0.0,
                          tangent_g: Tensor | None = None, float32_search: bool | None = None,
                          grads_x: Tensor | None = None, grads: Tensor | None = None,
                          prune: bool = True, prove: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`gibbs_margin_radius` when each class is one group of neurons: the margin of pair (c, k)
    is s_c - s_k, the LSE of group c minus that of group k (an lse head; a memory head with one-hot
    labels, whose sign reduction has exactly these groups and no shift). The same certificate, but
    every pair's negative side is its own group, so the work is O(n N) instead of O(n K N).

    a_g: (n, K, S) pre-activations in the :class:`Groups` layout (-inf padding), s: (n, K) and
    pi_g: (n, K, S) their group LSE values and within-group Gibbs weights, valid: (K, S), W_g:
    (K, S, p) the rows by group (the gradient's coordinates, before ``pullback``), ``tangent_g``:
    (K, S, q) the rows in the certificate's coordinates for :func:`tangent_radius` (None: no
    tangent radius). L / kappa: (K, K) (:func:`certificate_tables` of the same pairs). ``grads_x``:
    every group's gradient already in the input's coordinates (n, K, d) (:func:`neuron_gradients`),
    which then replaces the pullback of the hybrid radius's gradients; ``grads``: every group's gradient
    in W_g's coordinates (n, K, p) when the caller has it (:func:`group_gradients`). ``prune``: search
    the tangent radius only for the pairs that can decide the radius (:func:`_pruned_tangent`): the
    same radius, but an unsearched pair's per-class radius is its hybrid radius alone (sound, and
    possibly below the searched one); False searches every pair, as the masked form does. Returns
    (radius (n,), per-class radius (n, K) with +inf at k = c).

    ``prove`` (n,): no tangent search; a rival's radius is ``prove`` where it is at most the pair's
    hybrid radius or the pair's tangent bound phi, evaluated at it (times ``lip``, rounded up), is
    non-negative -- as :func:`_tangent_check` accepts a radius -- else 0: the float64 re-proof of a
    radius another runtime found (:meth:`HJModel.evaluate`'s ``prove``)."""
    K = s.shape[-1]
    if rounding is None:
        rounding = 64 * torch.finfo(s.dtype).eps
    own = torch.nn.functional.one_hot(c, K).bool()                   # (n, K)
    sc = s.gather(1, c.unsqueeze(-1))                                # (n, 1): s+ of every pair
    finite = (sc.abs() < math.inf) & (s.abs() < math.inf)
    sp0, sq0 = torch.where(finite, sc.expand_as(s), 0.0), torch.where(finite, s, 0.0)
    target = sp0 - rounding * (sp0.abs() + sq0.abs())
    m = target - sq0
    never = ~valid.any(-1)                                           # (K,): an empty group never wins

    grads = group_gradients(pi_g, W_g) if grads is None else grads  # grad s_k for every group
    grad_c = take_class(grads, c)                                    # (n, p)
    if grads_x is None:
        r = _pair_hybrid(m, grad_c.unsqueeze(1) - grads, c, L, kappa, pullback, lip, curv)
    else:
        r = _pair_hybrid(m, take_class(grads_x, c).unsqueeze(1) - grads_x, c, L, kappa, None, lip, curv)
    rival = ~(never | own)
    if tangent_g is not None:
        # g = grad s_c in the certificate's coordinates; c_j = |t_j - g| for every neuron (the rows
        # are used in their one (K, S, q) layout only, so an exported graph stores them once)
        g = grad_c if tangent_g is W_g else take_class(group_gradients(pi_g, tangent_g), c)   # (n, q)
        cross = (tangent_g @ g.T).permute(2, 0, 1)                                          # (n, K, S)
        c2 = (tangent_g * tangent_g).sum(-1) - 2.0 * cross + (g * g).sum(-1)[:, None, None]
        dist = c2.clamp_min(0.0).sqrt()
        if prove is not None:
            at = prove.to(s.dtype)
            fit = (at >= 0) & (at < math.inf)                                           # NaN: not >= 0
            z = torch.where(fit, at, 0.0) * lip * (1.0 + 4.0 * torch.finfo(s.dtype).eps)   # rounded up
            phi = target - eps * torch.logsumexp((a_g + dist * z[:, None, None]) / eps, dim=-1)   # (n, K)
            held = (fit[:, None] & ((at[:, None] <= r) | (phi >= 0))) | ~rival
            proven = held.all(-1) & fit & (finite & (m > 0)).where(rival, True).all(-1)
            per = torch.where(rival, torch.where(proven[:, None], at[:, None], 0.0), math.inf)
            return torch.where(proven, at, 0.0), per
        if not prune or K == 2:             # two classes: the one rival always decides, nothing to prune
            t = _tangent_solve(a_g, None, dist, eps, target, sq0, finite, _TANGENT_ITERS, float32_search)
        else:
            t = _pruned_tangent(a_g, dist, eps, target, sq0, finite, float32_search, r, rival, lip)
        r = torch.maximum(r, t / lip)
    r = torch.where(rival, r, math.inf)
    return r.min(-1).values, r


def _pruned_tangent(a_g: Tensor, dist: Tensor, eps: float, target: Tensor, sq0: Tensor, finite: Tensor,
                    float32_search: bool | None, hybrid: Tensor, rival: Tensor, lip: float) -> Tensor:
    """The tangent radii of :func:`grouped_margin_radius` (n, K), searched only for the pairs that can
    decide the certificate; the others get 0, and the certificate min_k max(h_k, t_k / lip) is the
    same as with every pair searched (h the pairs' hybrid radii).

    A pair's tangent radius never exceeds its bracket b_k (:func:`_tangent_bracket`: phi < 0 beyond
    it; a float32 search's check is allowed 2^-10 relative above it), so U = min_k max(h_k, b_k / lip)
    over the rivals bounds the certificate from above. A pair needs no search when its bracket does
    not exceed its hybrid radius (then max(h_k, t_k / lip) = h_k) or its hybrid radius already
    reaches U (its term is at least U either way, and the certificate at most U). Skipping a pair only
    lowers its term, so the certificate stays sound whatever is skipped; these rules skip none that
    could decide it. The search's exponentials then run on the needed pairs alone, gathered (about
    two of nine pairs per row on the demo lse model, under one pair in a hundred rows on the deep
    one), and the found radii are written back."""
    bracket = _tangent_bracket(a_g, None, dist, target)                                # (n, K)
    reach = bracket * (1.0 + 2.0 ** -10) / lip
    bound = torch.where(rival, torch.maximum(hybrid, reach), math.inf).amin(-1, keepdim=True)
    need = rival & (reach > hybrid) & (hybrid < bound)
    # (n, K) -> (n K,) by a constant shape and (n, K, S) -> (n K, S) by Flatten: one node each in
    # the exported graph (flatten() of a matrix traces to four shape nodes)
    pairs = need.reshape(-1).nonzero().squeeze(-1)                                     # (m,)
    t = torch.zeros_like(target).reshape(-1)
    if pairs.numel() == 0 and not static_graph():
        return t.view_as(target)    # after a body the served graph skips it too (artifact._gathered_searches)

    def sel(x: Tensor) -> Tensor:   # (n, K, ...) -> the needed pairs' (m, ...)
        return (x.reshape(-1) if x.dim() == 2 else x.flatten(0, 1)).index_select(0, pairs)

    found = _tangent_solve(sel(a_g), None, sel(dist), eps, sel(target), sel(sq0), sel(finite),
                           _TANGENT_ITERS, float32_search, bracket=sel(bracket))
    return t.scatter(0, pairs, found).view_as(target)


def unit_tables(rows_g: Tensor, valid: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weight-only constants of a body LSE layer for :func:`unit_spread` and
    :func:`linearised_body_radius`, from its rows by unit in raw input space (rows_g: (H, S, d), zero
    rows in the padding; ``valid``: (H, S)): each unit's Gram matrix (H, S, S), its rows' squared
    norms (H, S), the rounding allowance of the Gram expansion (H,), and the curvature constants
    C_u = D(G_u)^2 / (8 eps) (H,) -- along any unit direction a unit's second derivative is
    Var_pi(a . e) / eps <= D^2 / (4 eps) (Popoviciu), so its excess over its tangent plane at x is at
    most C_u r^2 on the ball of radius r. C is rounded up."""
    gram = rows_g @ rows_g.transpose(-1, -2)
    sq = torch.where(valid, gram.diagonal(dim1=-2, dim2=-1), 0.0)
    # |a_p|^2 - 2 a_p . J_u + |J_u|^2 sums S- and d-term products of entries at most max |a|^2 (the
    # Gram entries, and J_u a convex combination of the rows): each step errs by at most its length x
    # float64's unit roundoff x max |a|^2, so 8 (S + d + 1) of them bound the whole expansion
    S, d = rows_g.shape[-2], rows_g.shape[-1]
    slack = 8.0 * (S + d + 1) * torch.finfo(rows_g.dtype).eps * sq.amax(-1)
    diam = torch.stack([diameter(rows_g[u][valid[u]]) if bool(valid[u].any()) else rows_g.new_zeros(())
                        for u in range(rows_g.shape[0])])
    return gram, sq, slack, diam * diam / (8.0 * eps) * _UP


def unit_jacobian(P: Tensor, rows_g: Tensor) -> Tensor:
    """The Jacobian of a body LSE layer at x: row u is sum_p P[u, p] a_p, its within-unit Gibbs
    weights (n, H, S) times its rows by unit (H, S, d), one batched product per unit. (n, H, d)."""
    return (P.transpose(0, 1) @ rows_g).transpose(0, 1)


def unit_spread(P: Tensor, tables: tuple[Tensor, Tensor, Tensor, Tensor], valid: Tensor) -> Tensor:
    """How far a unit's gradient can move from its value J_u at x: D_u = max_p |a_p - J_u| over its
    rows (any gradient of the unit is a convex combination of them), by the Gram expansion
    |a_p|^2 - 2 a_p . J_u + |J_u|^2 (no (n, H, S, d) difference) plus that expansion's rounding
    allowance, so an upper bound. P: (n, H, S), tables: :func:`unit_tables`. (n, H)."""
    gram, sq, slack, _ = tables
    aJ = (P.transpose(0, 1) @ gram).transpose(0, 1)                                # a_p . J_u: (n, H, S)
    JJ = (P * aJ).sum(-1, keepdim=True)                                           # |J_u|^2
    D2 = torch.where(valid, sq - 2.0 * aJ + JJ, 0.0).amax(-1) + slack
    return D2.clamp_min(0.0).sqrt() * _UP


#: per-row elements (K x S x d) up to which linearised_body_radius forms every head neuron's gradient in
#: x; a wider head (a memory head of many support points on a body) bounds their spread by norms
LINEARISED_EXACT_ELEMENTS = 1 << 16


def neuron_gradients(J: Tensor, pi_g: Tensor, W_g: Tensor, exact: bool = True) -> tuple[Tensor | None, Tensor]:
    """Through one body layer with Jacobian J (n, H, d): the gradient in x of every head neuron,
    w_j J (n, K, S, d) (None unless ``exact``: an (n, N, d) tensor), and of every class group's LSE,
    G_k = sum_j pi_kj w_j J (n, K, d), for the head's rows by group W_g (K, S, H) and within-group
    Gibbs weights pi_g (n, K, S)."""
    n, K, S = pi_g.shape
    if not exact:
        return None, group_gradients(pi_g, W_g) @ J
    wJ = (W_g.reshape(K * S, W_g.shape[-1]) @ J).view(n, K, S, J.shape[-1])
    return wJ, (pi_g.unsqueeze(-2) @ wJ).select(-2, 0)


def linearised_layer(J: Tensor, P: Tensor, W: Tensor, groups: Groups, pre: Tensor, h: Tensor,
                     eps: float) -> tuple[Tensor, tuple]:
    """One body layer above the first, linearised at x for :func:`linearised_body_radius`: from the
    layer below's Jacobian J (n, H', d), this layer's pieces' gradients in x A = W J by unit (its
    weights W: (M, H'), ``groups`` its units), its own Jacobian (n, H, d) -- a convex combination of
    them by its within-unit Gibbs weights P (n, H, S) -- and how far each piece's gradient lies from its
    unit's, rho_p = |A_p - J_u| (n, H, S). ``pre`` (n, M) / ``h`` (n, H): its pre-activations and
    outputs at x. Returns (its Jacobian, the layer's part of the bound)."""
    A = W @ J                                                                     # (n, M, d)
    A_g = groups.gather(A.transpose(1, 2), 0.0).permute(0, 2, 3, 1)               # (n, H, S, d)
    J_up = (P.unsqueeze(-2) @ A_g).select(-2, 0)                                  # (n, H, d)
    rho = torch.linalg.vector_norm(A_g - J_up.unsqueeze(-2), dim=-1) * _UP
    return J_up, (groups.gather(pre), P, rho, h, W.clamp_min(0.0).T, W.clamp_max(0.0).T, groups, eps)


def linearised_body_radius(wJ: Tensor | None, G: Tensor, D: Tensor, C: Tensor, a_g: Tensor, s: Tensor,
                           pi_g: Tensor, valid: Tensor, c: Tensor, W_g: Tensor, eps: float,
                           rounding: float | None = None, J: Tensor | None = None, upper: tuple = (),
                           prove: Tensor | None = None) -> Tensor:
    """A certified radius of the decision ``c`` of a class-grouped head on a body of LSE layers, from
    linear bounds that keep the input's directions (DESIGN section 3, "deep bodies").

    Body unit u (pre-activations affine in x, rows a_p in raw input space) is convex, so on the ball
    |x - x0| <= r it lies between its tangent plane and the same plane lifted by E_u(r):
    h(x) = h0 + J d + e with d = x - x0, J the body's Jacobian at x0 and 0 <= e_u <= E_u(r) =
    int_0^r min(D_u, 2 C_u s) ds -- the unit's gradient departs from J_u by at most D_u
    (:func:`unit_spread`), and by at most 2 C_u s at distance s (:func:`unit_tables`). The head's
    class LSEs are convex in h: s_c(h) >= s_c(h0) + g_c . (h - h0) (g_c its gradient), and each neuron
    j of group k has w_j . h <= w_j . h0 + G_k . d + r |w_j J - G_k| + w_j+ . E with G_k = g_k J, the
    gradient of s_k in x. So on the ball

        s_c - s_k >= s_c(h0) + g_c- . E(r) - eps LSE_{j in k}(a_j + r rho_j + w_j+ . E(r)) - r |G_c - G_k|

    Bodies of more layers (``upper``: :func:`linearised_layer` of each layer above the first) carry
    the same form up, with a lift that may be negative: if h = h0 + J d + e with lo <= e <= hi, the
    next layer's pre-activations are z0 + A d + W e with W e in [W+ lo + W- hi, W+ hi + W- lo], so
    its units (convex in z) get lo' = P . (W+ lo + W- hi) and hi' = eps LSE_p(z0_p + r rho_p +
    (W+ hi + W- lo)_p) - h0 (rho_p = |A_p - J'_u|), and the head reads g_c+ . lo + g_c- . hi and
    w_j+ . hi + w_j- . lo where one layer has lo = 0 and hi = E. Each stays concave (lo) or convex
    (hi) in r, so the bound stays concave.

    Here J is the top layer's Jacobian, and rho_j = |w_j J - G_k| (or, when the head is too wide to
    form every w_j J, the upper bound |w_j - g_k| ||J||_F, by the Gram expansion in h plus its rounding
    allowance). Its first-order term is the margin's exact directional derivative (a global Lipschitz
    bound of the body loses the directions); every later term only lowers it. The
    bound is concave in r (E is convex and increasing) and its root lies below the first-order radius
    min_k m_k / |G_c - G_k|: it is searched on a grid below that radius (one batched evaluation; 0 and
    eight radii geometric in [1/8, 1] of it) and refined by the chord between the largest radius
    certified there and the next grid radius, which concavity puts just below the root (within 1.2%
    of it on the demo model's test digits, 0.3% at the median). Only radii where the bound was
    evaluated positive (less the rounding slack of every margin here) are returned, so the result is
    sound whatever the search does. Two evaluations in all: few graph nodes, which is what a batch of
    one pays for.

    wJ / G: (n, K, S, d) / (n, K, d) (:func:`neuron_gradients`; wJ None: the norm bound, from ``J``
    (n, H, d)), D: (n, H) (:func:`unit_spread`), C: (H,) (:func:`unit_tables`); a_g / pi_g: (n, K, S)
    the head's pre-activations and within-group Gibbs weights, s: (n, K) its class LSEs, valid:
    (K, S), W_g: (K, S, H) the head's rows by group. Returns (n,).

    ``prove`` (n,): no search; each row's radius is ``prove`` where the bound, evaluated at it, is
    positive (the ball of that radius certified, as for a searched radius), else 0 -- the float64
    re-proof of a radius another runtime found (:meth:`HJModel.evaluate`'s ``prove``)."""
    if rounding is None:
        rounding = 64 * torch.finfo(s.dtype).eps
    n, K, S = a_g.shape
    W_flat = W_g.reshape(K * S, W_g.shape[-1])
    g = group_gradients(pi_g, W_g)                                                # grad s_k in h: (n, K, H)
    if wJ is not None:
        rho = torch.linalg.vector_norm(wJ - G.unsqueeze(-2), dim=-1) * _UP       # (n, K, S)
    else:   # |(w_j - g_k) J| <= |w_j - g_k| ||J||_2 <= |w_j - g_k| ||J||_F, with no (n, N, d) tensor
        sq = (W_g * W_g).sum(-1)                                                  # (K, S)
        wg = (W_g @ g.permute(1, 2, 0)).permute(2, 0, 1)                          # w_j . g_k: (n, K, S)
        gg = (g * g).sum(-1, keepdim=True)
        slack = 8.0 * (S + W_g.shape[-1] + 1) * torch.finfo(g.dtype).eps * sq.amax()
        frob = torch.linalg.vector_norm(J.flatten(1), dim=-1).view(n, 1, 1)
        rho = (sq - 2.0 * wg + gg + slack).clamp_min(0.0).sqrt() * frob * _UP
    lin = torch.linalg.vector_norm(take_class(G, c).unsqueeze(1) - G, dim=-1) * _UP   # (n, K)
    g_c = take_class(g, c)
    g_pos, g_neg = g_c.clamp_min(0.0), g_c.clamp_max(0.0)                         # (n, H)
    W_pos, W_neg = W_flat.clamp_min(0.0).T, W_flat.clamp_max(0.0).T               # (H, K S)
    sc = s.gather(1, c.unsqueeze(-1))                                             # (n, 1)
    finite = (sc.abs() < math.inf) & (s.abs() < math.inf)
    skip = ~finite | ~valid.any(-1) | torch.nn.functional.one_hot(c, K).bool()    # (n, K): not a rival
    turn = D / (2.0 * C).clamp_min(torch.finfo(D.dtype).tiny)                     # where E turns linear

    def bound(r: Tensor) -> Tensor:
        """The bound at radii r (m, n) -> (m, n)."""
        rr = r.unsqueeze(-1)                                                      # (m, n, 1)
        # the lift e of the top layer lies in [lo, hi]; the first layer's lo is 0 (None: no terms)
        lo, hi = None, torch.where(rr <= turn, C * rr * rr, D * rr - D * turn / 2.0)   # (m, n, H)
        for pre_g, P, rho_l, h0, Wp, Wn, groups, eps_l in upper:
            z_lo = groups.gather(hi @ Wn if lo is None else lo @ Wp + hi @ Wn, 0.0)   # (m, n, H, S)
            z_hi = groups.gather(hi @ Wp if lo is None else hi @ Wp + lo @ Wn, 0.0)
            U_l = lse(pre_g + rr.unsqueeze(-1) * rho_l + z_hi, eps_l)            # (m, n, H)
            lo = (P * z_lo).sum(-1) - rounding * (P * z_lo.abs()).sum(-1)
            hi = U_l - h0 + rounding * (U_l.abs() + h0.abs())
        own = (g_neg * hi).sum(-1, keepdim=True)                                  # (m, n, 1)
        lift = hi @ W_pos
        if lo is not None:
            own, lift = own + (g_pos * lo).sum(-1, keepdim=True), lift + lo @ W_neg
        up = a_g + rr.unsqueeze(-1) * rho + lift.view(*lift.shape[:-1], K, S)
        U = masked_lse_gibbs(up, valid, eps)[0]                                   # (m, n, K)
        m = sc + own - U - rr * lin
        m = torch.where(skip, math.inf, m - rounding * (sc.abs() + own.abs() + U.abs() + rr * lin))
        return m.amin(-1)

    # the first-order radius brackets the root from above (every later term only lowers the bound);
    # a grid below it, 0 included, in one evaluation, then the chord between the largest radius
    # certified there and the next grid radius, evaluated too (concavity puts it just below the root)
    m0 = torch.where(skip, math.inf, sc - s)
    hi = torch.where(skip, math.inf, m0 / lin).amin(-1)
    ok = (m0.amin(-1) > 0) & (hi < math.inf)
    if prove is not None:
        at = prove.to(s.dtype)
        fit = ok & (at >= 0) & (at < math.inf)                                    # NaN: not >= 0
        proven = fit & (bound(torch.where(fit, at, 0.0).unsqueeze(0))[0] > 0)
        return torch.where(proven, at, 0.0)
    hi = torch.where(ok, hi, 1.0)
    grid = _LINEARISED_GRID.to(hi).unsqueeze(-1) * hi                             # (G, n), ascending
    f = bound(grid)
    best = torch.where(f > 0, grid, -1.0).amax(0)
    ok = ok & (best >= 0)                                                         # the bound at 0 is positive
    f_best = torch.where(grid == best, f, -math.inf).amax(0)
    above = torch.where(grid > best, grid, math.inf).amin(0)
    f_above = torch.where(grid == above, f, math.inf).amin(0)
    fall = f_best - f_above
    step = torch.where((above < math.inf) & (fall > 0), (above - best) * f_best / torch.where(fall > 0, fall, 1.0), 0.0)
    chord = best + step * (1.0 - 2.0 ** -20)
    lo = torch.where(bound(chord.unsqueeze(0))[0] > 0, chord, best)
    return torch.where(ok, lo, 0.0)


def interval_lse_layer(lo: Tensor, hi: Tensor, groups: Groups | Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Bounds on a group LSE layer's outputs from bounds lo <= a <= hi on its pre-activations: the
    LSE is increasing in every argument, so [LSE(lo), LSE(hi)] (interval bound propagation)."""
    return group_lse(lo, groups, eps), group_lse(hi, groups, eps)


def interval_affine(lo: Tensor, hi: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds on h @ W.T + b for lo <= h <= hi: centre mapped exactly, half-width by |W|."""
    centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    mid = centre @ W.T + b
    spread = half @ W.abs().T
    return mid - spread, mid + spread


def interval_margin(own: Tensor, other: Tensor, rounding: float) -> Tensor:
    """A lower bound on the decision margin from a lower bound ``own`` on s_c and an upper bound
    ``other`` on max_{k != c} s_k (n,), less the rounding slack of :func:`grouped_margin_radius`:
    > 0 certifies the decision. Infinite bounds give -inf or NaN, which never certify (rows whose
    other classes can never win have an infinite closed-form radius and are not searched)."""
    return own - other - rounding * (own.abs() + other.abs())


def grid_root(f, lo: Tensor, reach: float, points: int, rounds: int) -> Tensor:
    """The largest r found in [lo, reach lo] with f(r) > 0, for f non-increasing in r, by nested
    grids evaluated all at once: ``points`` radii geometric in [lo, reach lo], then ``rounds`` - 1
    times ``points`` radii evenly spaced between the best certified radius and the next grid radius
    above it. ``f`` takes the radii of every row's grid flattened row-major, (m * points,), and
    returns (m * points,). Rows whose first grid has no certified radius get ``lo``.

    Every returned value other than ``lo`` was evaluated and found positive, so the result is sound
    whatever f's shape; for monotone f it is within (reach^(1/points) - 1) / points^(rounds - 1)
    (relative) below f's root. A grid per round is one batched evaluation -- few graph nodes, which
    is what a batch of one pays for -- and its radii are fixed by ``lo``, so the answer does not
    drift with rounding the way an iteration's would."""
    m = lo.shape[0]
    k = torch.arange(1, points + 1, dtype=lo.dtype, device=lo.device) / points      # (G,)
    grid = lo.unsqueeze(-1) * reach ** k                                              # (m, G)
    best, above = lo, lo
    for round_ in range(rounds):
        if round_:
            grid = best.unsqueeze(-1) + (above - best).unsqueeze(-1) * k
        ok = f(grid.reshape(-1)).view(m, points) > 0
        best = torch.where(ok, grid, best.unsqueeze(-1)).amax(-1)
        nxt = torch.where(grid > best.unsqueeze(-1), grid, math.inf).amin(-1)
        above = torch.where(nxt < math.inf, nxt, best)
    return best


# --------------------------------------------------------------------------------------------
# labels (Prop F.1), measure extension (Remark H.11), optimal viscosity (Thm 8.1)
# --------------------------------------------------------------------------------------------


def label_sensitivity_values(pi: Tensor) -> Tensor:
    """d yhat / d v_j = pi_j when labels enter only as values (yhat = sum_j pi_j v_j)."""
    return pi


def label_sensitivity_exponent(pi: Tensor, g: Tensor, yhat: Tensor, eps: float) -> Tensor:
    """d yhat / d g_j = pi_j (1 - (g_j - yhat)/eps) when the label g_j is also the value and enters
    the exponent (Prop F.1).  pi: (n, M), g: (M,) or (n, M) (the neurons' labels), yhat: (n,) -> (n, M)."""
    return pi * (1.0 - (g - yhat.unsqueeze(-1)) / eps)


def fewest_label_flips(pi: Tensor, labels: Tensor, c: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """Fewest training labels whose change flips a Gibbs-average classification (memory kind).

    yhat_k = sum_j pi_j [label_j = k]. To make class k overtake the predicted c, relabelling an
    example of class c to k moves the margin yhat_c - yhat_k by 2 pi_j, any other example by pi_j;
    the gains add, so taking the largest first is optimal for each k; the answer is the min over k.
    pi: (n, N), labels: (N,) long, c: (n,) long -> (count (n,) long, target class (n,) long).
    Count is N + 1 when no relabelling flips the decision."""
    n, N = pi.shape
    onehot = torch.nn.functional.one_hot(labels, n_classes).to(pi.dtype)  # (N, K)
    yhat = pi @ onehot                                                     # (n, K)
    margin = yhat.gather(1, c[:, None]) - yhat                              # (n, K)
    in_c = labels.unsqueeze(0) == c.unsqueeze(1)                            # (n, N)
    best = torch.full((n,), N + 1, dtype=torch.long, device=pi.device)
    target = c.clone()
    for k in range(n_classes):
        in_k = labels == k
        gain = torch.where(in_c, 2.0 * pi, pi).masked_fill(in_k.unsqueeze(0), 0.0)
        csum = torch.sort(gain, dim=-1, descending=True).values.cumsum(-1)   # (n, N)
        need = margin[:, k:k + 1]
        # relabelling must make yhat_k >= yhat_c (ties broken against c): csum >= margin
        ok = csum >= need
        count = torch.where(ok.any(-1), ok.float().argmax(-1) + 1, N + 1)
        count = torch.where(c == k, N + 1, count)
        better = count < best
        best = torch.where(better, count, best)
        target = torch.where(better, k, target)
    return best, target


def measure_extension(f: Tensor, a_new: Tensor, eps: float) -> Tensor:
    """Insert one neuron with pre-activation a_new: f + eps softplus((a_new - f)/eps), exact, O(1)
    (Remark H.11, Prop E.3)."""
    x = (a_new - f) / eps
    # softplus via logaddexp: torch's softplus turns linear above x = 20 (error up to 2e-9 eps)
    return f + eps * torch.logaddexp(x, torch.zeros_like(x))


def eps_star(X: Tensor) -> float:
    """Optimal viscosity eps* ~ h (Thm 8.1): the grid spacing of the N support points ``X: (N, d)``.

    h is estimated as the median nearest-neighbour distance, which scales as N^(-1/d) times the data
    scale."""
    X = X.to(torch.float64)
    if X.shape[0] < 2:
        return 1.0
    N = X.shape[0]
    n = min(N, 2000)
    idx = torch.linspace(0, N - 1, n, dtype=torch.float64).round().long()
    sub = X[idx]
    # nearest neighbour of each sampled point among ALL N points (a sub-vs-sub distance would
    # measure the spacing of n points, not N, and saturate for N > 2000); chunked over X
    nn = torch.full((n,), math.inf, dtype=X.dtype, device=X.device)
    for start in range(0, N, 4096):
        stop = min(start + 4096, N)
        dist = pairwise_distances(sub, X[start:stop])
        own = idx.unsqueeze(1) == torch.arange(start, stop, device=X.device).unsqueeze(0)
        nn = torch.minimum(nn, dist.masked_fill(own, math.inf).min(-1).values)
    h = nn.median().item()
    return float(h) if h > 0 else 1.0


# ------------------------------------------------------------------ served precision
#: Largest finite float32, as a float64 number.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: Step below a float32 value y that rounds (to nearest) to y's float32 predecessor: 0.7 spacings of
#: y's binade (|y| 2^-23 is 1-2 of them) for a normal y, 0.7 of the subnormals' one spacing 2^-149
#: below 2^-126 (:func:`float32_down`)
_F32_PRED_STEP = 0.7 * 2.0 ** -23
_F32_PRED_STEP_MIN = 0.7 * 2.0 ** -149


def float32_saturate(x: Tensor) -> Tensor:
    """float64 -> float32 rounded to nearest, with every value clamped to the finite float32 range
    (ordered: a larger float64 value never becomes a smaller float32 value; NaN stays NaN)."""
    return x.clamp(-FLOAT32_MAX, FLOAT32_MAX).to(torch.float32)


def float32_down(x: Tensor) -> Tensor:
    """float64 -> the largest float32 value <= x (for x >= 0, rounding toward zero): the served
    form of a lower bound such as a certified radius, so the served number is never larger than the
    proven one.

    Round-to-nearest y is kept where it lands at or below x. Where it lands above, its float32
    predecessor is taken, which is below x since x lies between the two: y - s with
    s = max(0.7 * 2^-23 |y|, 0.7 * 2^-149) (float64, exact enough) rounds to it. For a normal y let u
    be the spacing of y's binade (|y| in [2^e, 2^(e+1)), u = 2^(e-23)): s lies in [0.7 u, 1.4 u).
    Where the spacing below y is u, y - u is the nearest float32 (0.4 u or closer; y and y - 2u are
    0.6 u or more away); where it is u/2 (|y| a power of two, y > 0), s = 0.7 u and y - u/2 is the
    nearest (0.2 u; y - u is 0.3 u away). Below 2^-126 (subnormals, and a zero above a negative x)
    the spacing is 2^-149 and s = 0.7 of it. (Earlier forms took two relative steps, then nudged x
    itself down for subnormals: the same value for every normal y, a subnormal up to one spacing
    lower, and more nodes.) A session that flushes subnormals to zero (the served ones) makes a
    float32 subnormal 0, which is still below a positive x; below a negative x in the subnormal
    range it is not (nor, for :func:`float32_up`, above a positive one; the earlier forms failed there
    too): no served bound is there (a radius is >= 0, a p-value >= 1 / (1 + n)). Values
    above the float32 range saturate to its largest finite value (smaller: still a lower bound); only
    x < -FLOAT32_MAX, which no served bound reaches, has no float32 value below it. Exportable
    (Clip/Cast/Where/Mul only). Test: every binade's powers of two and their neighbours, subnormals,
    both signs (tests/hjmodel/test_functional.py)."""
    y = float32_saturate(x)
    y64 = y.to(x.dtype)
    step = torch.clamp(y64.abs() * _F32_PRED_STEP, min=_F32_PRED_STEP_MIN)
    return torch.where(y64 > x, float32_saturate(y64 - step), y)


def float32_up(x: Tensor) -> Tensor:
    """float64 -> the float32 value >= x: the served form of an upper bound, e.g. a conformal
    p-value (rounding it up keeps P(p <= alpha) <= alpha). Mirror of :func:`float32_down`."""
    return -float32_down(-x)


#: One client value's rounding on its way into a served graph: a decimal (JSON) read into float64,
#: then float64 rounded to float32 (round to nearest): |fl32(fl64(t)) - t| <= ROUNDING_UNIT |t| +
#: ROUNDING_FLOOR (2^-24 for the float32 step, 2^-53 for the float64 one with their product, below
#: 2^-52). The floor is float32's smallest normal number, 2^-126, not half its smallest step: a
#: served session reads float32 subnormals as 0 (it flushes subnormals, serving.open_session, and
#: the processor's DAZ mode zeroes a subnormal float32 operand of the cast to float64), so a value
#: below 2^-126 may move by all of itself.
FLOAT32_UNIT = 2.0 ** -24      #: float32's unit roundoff (rounding to nearest)
ROUNDING_UNIT = FLOAT32_UNIT + 2.0 ** -52
ROUNDING_FLOOR = 2.0 ** -126


def served_input(x: Tensor) -> Tensor:
    """Rows as a served graph reads them: rounded to float32 (its input's type), a float32 subnormal
    read as 0 (served sessions flush them; ROUNDING_FLOOR), in x's own dtype. What the build computes
    the gate's calibration statistics on, so that a served row's statistic is the same function of
    the same point (a calibration row sent again ties its own statistic)."""
    x32 = x.to(torch.float32)
    return torch.where(x32.abs() < ROUNDING_FLOOR, torch.zeros_like(x32), x32).to(x.dtype)


def input_rounding_radius(r: Tensor, x: Tensor) -> Tensor:
    """A radius certified around the float32 row ``x`` a graph reads (n,) -> the radius certified
    around every value a client may have sent for it: at most ``r`` less what rounding moves the
    client's points, rounded down.

    A served graph reads its input in float32, so a client that sends float64 values (an FP64
    tensor, or any decimal in JSON) asks about a point X that the graph sees as x = fl32(X), and a
    perturbed Y it sees as fl32(Y). The certificate holds around x: every input within ``r`` of x is
    served x's class. With u = ROUNDING_UNIT, f = ROUNDING_FLOOR sqrt(d) and rho = |Y - X|:

        |fl32(Y) - x| <= |fl32(Y) - Y| + rho + |X - x| <= u |Y| + f + rho + u |X| + f
                      <= 2u |X| + 2f + (1 + u) rho,       and |X| <= (|x| + f) / (1 - u),

    so rho < (r - 2u (|x| + f) / (1 - u) - 2f) / (1 + u) keeps fl32(Y) inside the certified ball.
    That bound is what is returned: about 1.2e-7 |x| below ``r`` (for a 64-pixel digit, ~6e-6),
    the same for a client that sends float32 values, since the server cannot tell what the next
    request will send. |x| is computed in float64 from float32 squares (exact) and inflated by
    2^-30, which covers the summation's rounding for d below 2^22; the allowance by 2^-40 and the
    result shrunk by 2^-50, which cover the few float64 roundings here; clamped at 0 (a radius 0 is
    served as 0). ``tests/hjmodel/test_served_precision.py`` attacks the served radius with
    :func:`hjmodel.attacks.input_rounding_attack`, which sends such pairs."""
    x = x.to(r.dtype)
    d = x.shape[-1]
    floor = ROUNDING_FLOOR * math.sqrt(d)
    norm = torch.sqrt((x * x).sum(-1)) * (1.0 + 2.0 ** -30)
    allowance = (2.0 * ROUNDING_UNIT * (norm + floor) / (1.0 - ROUNDING_UNIT) + 2.0 * floor) * (1.0 + 2.0 ** -40)
    return ((r - allowance) * ((1.0 - 2.0 ** -50) / (1.0 + ROUNDING_UNIT))).clamp_min(0.0)


def float32_output_tolerance(tau: Tensor, y: Tensor) -> Tensor:
    """A regression tolerance on the outputs as served (float32, rounded to nearest) -> the tolerance to
    certify the float64 outputs y (n, K) for (n,): a client compares served outputs, so |fl32(f(Y)) -
    fl32(f(X))| <= tau must hold, and each rounding moves an output by up to u |f| + f0 (u =
    FLOAT32_UNIT; f0 = ROUNDING_FLOOR, a result below float32's normal range being flushed to 0):

        |fl32(f(Y)) - fl32(f(X))| <= |f(Y) - f(X)| + u (|f(Y)| + |f(X)|) + 2 f0
                                  <= tau' (1 + u) + 2u |f(X)| + 2 f0   when |f(Y) - f(X)| <= tau',

    so tau' = (tau - 2u max_k |f_k(X)| - 2 f0) / (1 + u), shrunk by 2^-50 for this arithmetic's own
    rounding; 0 where that is negative or an output lies beyond the float32 range (served saturated).
    It is a relative loss of ~1.2e-7 |f| / tau: invisible where tau is a few of the outputs' own
    float32 steps or more, everything where tau is below one of them."""
    top = y.abs().amax(-1) if y.dim() > 1 else y.abs()
    shrunk = ((tau - 2.0 * FLOAT32_UNIT * top - 2.0 * ROUNDING_FLOOR)
              * ((1.0 - 2.0 ** -50) / (1.0 + FLOAT32_UNIT))).clamp_min(0.0)
    return torch.where(top <= FLOAT32_MAX, shrunk, torch.zeros_like(shrunk))


def label_flip_plan(pi: Tensor, labels: Tensor, c: Tensor, n_classes: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fewest_label_flips` with the plan: (count (n,), target class (n,), the first ``k``
    examples to relabel (n, k), in the order the greedy takes them, -1 past the count).

    Exportable (a loop over the K classes, one sort, cumulative sums). Count is N + 1 and the plan
    all -1 when no relabelling flips the decision.

    One sort serves every class: relabelling example j to class k gains 2 pi_j for an example of
    the decided class, pi_j otherwise, and nothing for an example already of class k; so class k's
    greedy order is the order of all gains with class k's examples left out. Its count is the number
    of examples of another class up to where the gains' running sum, class k's left out, first
    reaches the margin (at least one: a margin of 0 takes one example); its plan, the ``k`` largest
    gains outside class k (a partial selection)."""
    n, N = pi.shape
    onehot = torch.nn.functional.one_hot(labels.clamp_min(0), n_classes).to(pi.dtype)
    yhat = pi @ onehot                                                       # (n, K)
    margin = yhat.gather(1, c[:, None]) - yhat                                # (n, K)
    gain = torch.where(labels.unsqueeze(0) == c.unsqueeze(1), 2.0 * pi, pi)   # (n, N)
    ordered, order = torch.sort(gain, dim=-1, descending=True)
    sorted_labels = labels.index_select(0, order.reshape(-1)).reshape(n, N)
    best = torch.full((n,), N + 1, dtype=torch.long, device=pi.device)
    target = c.clone()
    plan = torch.full((n, k), -1, dtype=torch.long, device=pi.device)
    for cls in range(n_classes):
        other = sorted_labels != cls                                          # (n, N) in sorted order
        ok = (ordered * other).cumsum(-1) >= margin[:, cls:cls + 1]
        first = ok.to(torch.long).argmax(-1, keepdim=True)                    # where the sum first reaches it
        taken = other.to(torch.long).cumsum(-1).gather(1, first).select(1, 0).clamp_min(1)
        count = torch.where(ok.any(-1), taken, N + 1)
        count = torch.where(c == cls, N + 1, count)
        better = count < best
        best = torch.where(better, count, best)
        target = torch.where(better, cls, target)
        top = torch.topk(gain.masked_fill((labels == cls).unsqueeze(0), -1.0), k, dim=-1).indices
        taken_k = torch.arange(k, device=pi.device).unsqueeze(0) < count.unsqueeze(1)
        plan = torch.where(better.unsqueeze(1), torch.where(taken_k, top, -1), plan)
    return best, target, plan
