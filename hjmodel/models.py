"""The three model kinds as torch modules that hold parameters and call :mod:`hjmodel.functional`.

Every model is ``preprocess -> body -> head``:

* :class:`Preprocess` -- z = (x - mu) A^T (standardize or PCA), so inputs are raw features;
* ``body`` -- zero (kinds ``lse``, ``memory``) or more (kind ``deep``) :class:`LSEGroupLayer`;
* ``head`` -- :class:`GibbsHead`, an LSE layer over N neurons read either as K grouped outputs
  (``lse``) or as a Hopf-Cole predictor with values (``memory``, Prop F.1).

All diagnostics are computed in float64 by :meth:`HJModel.evaluate`; certificates and saliency are
in raw input space (the preprocessing is folded into the first linear map for them).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from . import functional as F
from .serving import (
    DEFAULT_TAU,
    IG_ORDER,
    IG_PANELS,
    KINDS,
    OOD_COMPONENTS,
    TASKS,
    TOP_K_MAX,
    explain_rows,
    output_names,
    tau_refusal,
)

__all__ = ["Evaluation", "GibbsHead", "HJModel", "LSEGroupLayer", "OODReference", "Preprocess"]

#: Relative float rounding subtracted from every certified margin (float64 evaluation).
ROUNDING = 64 * torch.finfo(torch.float64).eps
#: the IBP radius search (functional.grid_root): up to 8x the closed-form radius, grids of 16 radii,
#: 5 rounds -- within 8^(1/16) - 1 = 14% after the first, 2e-6 (relative) below IBP's radius after the fifth
IBP_REACH, IBP_POINTS, IBP_ROUNDS = 8.0, 16, 5

#: elements of the largest (rows, K, N) block the torch path builds at once (2^24: 128 MB in float64);
#: larger batches are evaluated in row blocks (:meth:`HJModel.row_blocks`)
BLOCK_ELEMENTS = 1 << 24
#: on a GPU a block's largest tensor may hold up to 2^28 elements (2 GiB in float64), within 1/16 of the
#: device's free memory: the graph is launch-bound there, so each block costs about a whole call's
#: kernel launches (eval/RESULTS_gpu_scaling.md). A block's peak memory is at most ~11x its largest
#: tensor's (measured on the CPU, which runs the same operations: tests/hjmodel/test_train.py)
GPU_BLOCK_ELEMENTS = 1 << 28


def block_elements(device: torch.device, free_bytes: int | None = None) -> int:
    """Elements the largest tensor of a row block may hold on ``device``: ``BLOCK_ELEMENTS`` on the CPU;
    on a GPU up to ``GPU_BLOCK_ELEMENTS``, and no more than 1/16 of its free memory in float64, never
    less than the CPU's. ``free_bytes``: read from the device when not given -- what the driver has
    free plus what torch's caching allocator holds but no tensor uses (an earlier block's memory,
    which the next one reuses: counted as taken, it would shrink every later block)."""
    if device.type != "cuda":
        return BLOCK_ELEMENTS
    if free_bytes is None:
        free_bytes = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                      - torch.cuda.memory_allocated(device))
    return max(BLOCK_ELEMENTS, min(GPU_BLOCK_ELEMENTS, free_bytes // (8 * 16)))


class Preprocess(nn.Module):
    """z = (x - mu) A^T.  mu: (d,), A: (p, d)."""

    def __init__(self, mu: Tensor, A: Tensor):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float64))
        self.register_buffer("A", torch.as_tensor(A, dtype=torch.float64))

    @classmethod
    def identity(cls, d: int) -> Preprocess:
        return cls(torch.zeros(d), torch.eye(d))

    @staticmethod
    def safe_scale(scale) -> np.ndarray:
        """Feature scales for standardisation: a scale below 1e-3 x the largest (a constant pixel)
        is left at 1, so such a feature is centred but never blown up.  (d,) -> (d,)."""
        sd = np.asarray(scale, dtype=np.float64)
        return np.where(sd > 1e-3 * max(float(sd.max()), 1e-12), sd, 1.0)

    @classmethod
    def standardize(cls, mean, scale) -> Preprocess:
        """z = (x - mean) / scale, with :meth:`safe_scale`."""
        return cls(torch.as_tensor(np.asarray(mean, dtype=np.float64)),
                   torch.as_tensor(np.diag(1.0 / cls.safe_scale(scale))))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mu.to(x.dtype)) @ self.A.to(x.dtype).T


class LSEGroupLayer(nn.Module):
    """Affine pieces followed by an LSE over each group: h_k = eps log sum_{i in G_k} exp(a_i/eps).

    W: (M, d_in), b: (M,), mask: (H, M) bool (every piece in exactly one group)."""

    def __init__(self, W: Tensor, b: Tensor, mask: Tensor, eps: float):
        super().__init__()
        self.W = nn.Parameter(torch.as_tensor(W, dtype=torch.float64).clone())
        self.b = nn.Parameter(torch.as_tensor(b, dtype=torch.float64).clone())
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.bool))
        self.eps = float(eps)
        self.regroup()

    def regroup(self) -> None:
        """Rebuild the group table from ``mask`` (after changing it)."""
        self.groups = F.Groups.of(self.mask)

    def forward(self, h: Tensor) -> Tensor:
        a = F.preactivations(h, self.W.to(h.dtype), self.b.to(h.dtype))
        return F.group_lse(a, self.groups, self.eps)

    def bounds(self, W: Tensor) -> tuple[float, float]:
        """Sound global (Lipschitz, curvature) bounds of this layer for input weights ``W``.

        The Jacobian is P W with P's rows convex weights on disjoint groups, so ||P||_2 <= 1 and
        Lip <= min(||W||_2, sqrt(sum_k max_{i in G_k} |w_i|^2)). Along a unit direction e each unit
        bends by e' Cov(w) e / eps in [0, D(G_k)^2/(4 eps)] (Popoviciu), so the vector second
        derivative has norm <= sqrt(sum_k (D(G_k)^2/(4 eps))^2)."""
        W = W.detach().to(torch.float64)
        norms = torch.linalg.vector_norm(W, dim=-1)
        frob = math.sqrt(sum(norms[g].max().item() ** 2 for g in self.mask))
        lip = min(torch.linalg.matrix_norm(W, ord=2).item(), frob)
        curv = math.sqrt(sum((F.diameter(W[g]).item() ** 2 / (4 * self.eps)) ** 2 for g in self.mask))
        return lip, curv


class GibbsHead(nn.Module):
    """An LSE layer over N neurons (W: (N, p), b: (N,)) read as the model's outputs.

    mode ``"groups"`` (kind lse): output k is the LSE over group ``mask[k]`` (mask: (K, N)).
    mode ``"values"`` (kind memory): yhat = sum_j pi_j V_j with V: (N, K) (one-hot labels or
    targets); ``labels`` (N,) long for classification, ``example_ids`` (N,) long point at training
    examples. With ``labels_in_exponent`` the regression label g_j also enters the exponent (its
    part of b), which changes the label sensitivity (Prop F.1).
    """

    def __init__(self, W: Tensor, b: Tensor, eps: float, t: float, mode: str, *,
                 mask: Tensor | None = None, V: Tensor | None = None, labels: Tensor | None = None,
                 example_ids: Tensor | None = None, labels_in_exponent: bool = False):
        super().__init__()
        if mode not in ("groups", "values"):
            raise ValueError(f"unknown head mode {mode!r}")
        self.W = nn.Parameter(torch.as_tensor(W, dtype=torch.float64).clone())
        self.b = nn.Parameter(torch.as_tensor(b, dtype=torch.float64).clone())
        self.eps, self.t, self.mode = float(eps), float(t), mode
        N = self.W.shape[0]
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.bool) if mask is not None
                             else torch.ones(1, N, dtype=torch.bool))
        self.register_buffer("V", torch.as_tensor(V, dtype=torch.float64) if V is not None
                             else torch.zeros(N, 0, dtype=torch.float64))
        self.register_buffer("labels", torch.as_tensor(labels, dtype=torch.long) if labels is not None
                             else torch.full((N,), -1, dtype=torch.long))
        self.register_buffer("example_ids", torch.as_tensor(example_ids, dtype=torch.long)
                             if example_ids is not None else torch.arange(N))
        self.labels_in_exponent = bool(labels_in_exponent)
        self.regroup()

    def regroup(self) -> None:
        """Rebuild ``groups``, the class groups of the outputs (:class:`~hjmodel.functional.Groups`):
        an lse head's groups, or a memory head's classes when its values are one-hot labels (None:
        values that are not, i.e. regression targets)."""
        V = self.V
        one_hot = V.shape[1] > 0 and bool(((V == 0) | (V == 1)).all()) and bool((V.sum(1) == 1).all())
        self.groups = (F.Groups.of(self.mask) if self.mode == "groups"
                       else F.Groups.of(V.T > 0.5) if one_hot else None)

    @property
    def n_outputs(self) -> int:
        return self.mask.shape[0] if self.mode == "groups" else self.V.shape[1]

    def preactivations(self, h: Tensor) -> Tensor:
        return F.preactivations(h, self.W.to(h.dtype), self.b.to(h.dtype))

    def preactivations_by_group(self, h: Tensor, rows: Tensor | None = None) -> Tensor:
        """The pre-activations by class group (n, K, S), -inf in the padding, differentiable in the
        weights: a reshape of a when the groups are one block each (lse heads), else one product
        with the rows by group (``rows``: ``groups.rows(W)`` when the caller keeps them -- a memory
        head's rows are fixed while it trains) and the biases gathered by group, never a gather of
        an (n, N) tensor."""
        groups = self.groups
        if groups.contiguous:
            return groups.gather(self.preactivations(h))
        rows = groups.rows(self.W) if rows is None else rows
        b_g = groups.gather(self.b.to(h.dtype)).reshape(-1)
        return torch.addmm(b_g, h, rows.to(h.dtype).reshape(-1, rows.shape[-1]).T).view(h.shape[0], *groups.shape)

    def outputs(self, a: Tensor) -> Tensor:
        """Raw outputs: group LSE values s (lse) or Gibbs averages yhat (memory).  (n, N) -> (n, K)."""
        if self.mode == "groups":
            return F.group_lse(a, self.groups, self.eps)
        return F.gibbs(a, self.eps) @ self.V.to(a.dtype)

    def grouped(self, a: Tensor, a_g: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Pre-activations by class group (n, K, S), the groups' LSE values s (n, K) and their
        within-group Gibbs weights (n, K, S) (``self.groups``' layout): what the outputs, the
        log-probabilities and the certificate share. ``a_g``: the pre-activations already by group."""
        a_g = self.groups.gather(a) if a_g is None else a_g
        s, pi_g = F.lse_gibbs(a_g, self.eps)                            # the padding is -inf: empty
        return a_g, s, pi_g

    def log_probabilities(self, a: Tensor | None, s: Tensor | None = None) -> Tensor:
        """Class log-probabilities for training and serving.  (n, N) -> (n, K).

        lse: log softmax(s / eps). memory (one-hot V): log sum_{j in class k} pi_j, which is the same
        log softmax(s / eps) when the classes partition the support points (``groups``: one-hot
        labels). ``s``: the class groups' LSE values when already computed (:meth:`grouped`; ``a`` is
        then not read where the head has groups)."""
        if s is None:
            s = F.group_lse(a, self.groups if self.groups is not None else self.V.T > 0.5, self.eps)
        if self.groups is not None:
            return torch.log_softmax(s / self.eps, dim=-1)
        return (s - F.lse(a, self.eps).unsqueeze(-1)) / self.eps


@dataclass
class OODReference:
    """Reference measure of the OOD score and its split-conformal calibration (DESIGN section 3).

    points: (M, p) in-distribution support points in the head's feature space, ``labels`` (M,) the
    class the model assigns each (classification; empty: none); the score is the Hopf-Cole value
    over the points of the row's decided class, in diffusion units, u/eps = -log mean_{j in c}
    exp(-|h - y_j|^2 / (4 t eps)), with the gauge t chosen by leave-one-out likelihood.
    ``norm_*``: sorted component scores of the training split (u leave-one-out: a reference point's
    own term removed), against which each component's rank p-value is taken (an empty
    ``norm_ambiguous``: the gate has the one component u); ``combined``: sorted combined statistics
    T of the conformal calibration rows, against which the served split-conformal p-value is taken
    (see :meth:`HJModel._conformal`)."""

    points: Tensor
    t: float
    eps: float
    alpha: float = 0.05
    labels: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    norm_unsupported: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    norm_ambiguous: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    combined: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    regime_factor: float = 100.0

    def class_groups(self, n_classes: int) -> tuple[F.Groups, Tensor] | None:
        """The reference points by class (:class:`~hjmodel.functional.Groups` over the M points) and
        log of each class's count, for the class-conditional score; None without labels or when a
        class has no point (its rows fall back to every point). Cached for the current ``labels``."""
        # the cache holds the labels tensor itself (so its identity cannot be reused) and its version
        # counter (in-place edits)
        key = (self.labels, self.labels._version, n_classes)
        cached = self.__dict__.get("_class_groups")
        if cached is not None and cached[0][0] is key[0] and cached[0][1:] == key[1:]:
            return cached[1]
        value = None
        with torch.inference_mode(False):   # cached: never an inference tensor, whoever asks first
            if self.labels.numel():
                member = torch.nn.functional.one_hot(self.labels, n_classes).T.bool()     # (K, M)
                count = member.sum(-1)
                if bool((count > 0).all()):
                    value = (F.Groups.of(member), torch.log(count.to(torch.float64)))
        self.__dict__["_class_groups"] = (key, value)
        return value

    def hopf_cole_tables(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`~hjmodel.functional.hopf_cole_tables` of the points (initial values 0) at the gauge
        t, in the dtype and on the device of ``like``; cached for the current ``points`` and ``t``
        (like :meth:`class_groups`)."""
        key = (self.points, self.points._version, self.t, like.dtype, like.device)
        cached = self.__dict__.get("_hopf_cole_tables")
        if cached is not None and cached[0][0] is key[0] and cached[0][1:] == key[1:]:
            return cached[1]
        with torch.inference_mode(False):   # cached: never an inference tensor, whoever asks first
            pts = self.points.to(like)
            value = F.hopf_cole_tables(pts, pts.new_zeros(pts.shape[0]), self.t)
        self.__dict__["_hopf_cole_tables"] = (key, value)
        return value


@dataclass(frozen=True)
class Evaluation:
    """What :meth:`HJModel.evaluate` computed for n rows.

    ``outputs``: the served outputs asked for (contract names of :mod:`hjmodel.serving`, float64 /
    int64 / bool); ``ev["name"]`` reads one. The rest is the forward trace the closed forms share:
    head features ``h`` (n, p), head pre-activations ``a`` (n, N), the decisive Gibbs weights ``pi``
    (n, N) (the predicted class's group for lse heads, all neurons for memory heads), the decision
    ``decision`` (n,) (class index; 0 for regression), the decisive group's size ``n_keep`` (n,),
    the dominant neuron ``dominant`` (n,) (None unless the energy gap was computed), the class
    log-probabilities ``log_probs`` (n, K) and the OOD ambiguity component ``ambiguity`` (n,)
    (None for regression / when the OOD gate was not evaluated)."""

    outputs: dict[str, Tensor]
    h: Tensor
    a: Tensor
    pi: Tensor
    decision: Tensor
    n_keep: Tensor
    dominant: Tensor | None = None
    log_probs: Tensor | None = None
    ambiguity: Tensor | None = None

    def __getitem__(self, name: str) -> Tensor:
        return self.outputs[name]

    def __contains__(self, name: object) -> bool:
        return name in self.outputs

    @classmethod
    def concat(cls, parts: list[Evaluation]) -> Evaluation:
        """One Evaluation of the rows of ``parts`` in order (row blocks of one batch)."""
        def cat(values):
            return None if values[0] is None else torch.cat(values)

        fields = {f: cat([getattr(p, f) for p in parts])
                  for f in ("h", "a", "pi", "decision", "n_keep", "dominant", "log_probs", "ambiguity")}
        return cls(outputs={k: torch.cat([p.outputs[k] for p in parts]) for k in parts[0].outputs}, **fields)


class HJModel(nn.Module):
    """An LSE network of kind ``lse``, ``memory`` or ``deep`` with every HJ diagnostic.

    ``task`` is ``"classification"`` or ``"regression"``. ``meta`` carries class names, feature
    names, provenance and metrics into the artifact. ``constants`` False leaves :meth:`refresh`'s
    weight-only constants to the caller, who calls it before evaluating: the trainer, once the
    weights are trained (a memory head's certificate tables of the untrained weights would be
    thrown away: a minute at 60,000 support points in d = 784)."""

    def __init__(self, kind: str, task: str, preprocess: Preprocess, body: list[LSEGroupLayer],
                 head: GibbsHead, reference: OODReference, meta: dict | None = None, *, constants: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        self.kind, self.task = kind, task
        self.preprocess, self.body, self.head = preprocess, nn.ModuleList(body), head
        self.reference = reference
        self.meta = dict(meta or {})
        if constants:
            self.refresh()

    def _apply(self, fn, recurse=True):
        """``Module.to`` / ``.cuda`` move parameters and buffers; the weight-only constants that
        :meth:`refresh` caches, the group tables of the head and the body layers, and the OOD
        reference's tensors follow the parameters' device, so that a model moved to a GPU evaluates
        there (their dtypes stay: the certificates' constants are float64 by design)."""
        super()._apply(fn, recurse)
        device = self.head.W.device
        for owner in (self, self.head, *self.body, self.reference):
            for name, value in list(vars(owner).items()):
                moved = _on_device(value, device)
                if moved is not value:
                    object.__setattr__(owner, name, moved)
        # the reference's lazily built tables are rebuilt on the new device when next asked for
        for cache in ("_class_groups", "_hopf_cole_tables"):
            self.reference.__dict__.pop(cache, None)
        return self

    # ---------------------------------------------------------------- constants
    @property
    def n_features(self) -> int:
        return self.preprocess.mu.shape[0]

    @property
    def n_outputs(self) -> int:
        return self.head.n_outputs

    @property
    def class_names(self) -> list[str]:
        names = self.meta.get("class_names")
        return list(names) if names else [str(k) for k in range(self.n_outputs)]

    def features(self, x: Tensor) -> Tensor:
        """Head features h(x): (n, d) -> (n, p)."""
        h = self.preprocess(x)
        for layer in self.body:
            h = layer(h)
        return h

    def trace(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Forward pass keeping what the closed forms need: head features h (n, p), the body's
        within-group Gibbs weights (one (n, H, S) per layer in the layout of its ``groups``; the
        layer's Jacobian is ``groups.spread(P) @ W`` row by row, see :meth:`_pullback`) and the
        head's pre-activations a (n, N)."""
        return self._trace(x)[:3]

    def _trace(self, x: Tensor | None, head: bool = True, first: Tensor | None = None
               ) -> tuple[Tensor, list[Tensor], Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """:meth:`trace`, plus the first linear map's pre-activations (the first body layer's, or a
        when there is no body), which the interval bounds start from, and every body layer's
        (pre-activations, outputs), which the linearised-body radius starts from. Each body layer's
        pre-activations are formed once; its outputs and Gibbs weights come from one group LSE.
        ``head`` False: the head's pre-activations are left to the caller (a is None). ``first``: the
        first body layer's pre-activations (..., N1) formed by the caller, in place of x's."""
        h, gibbs_body, layers = self.preprocess(x) if first is None else None, [], []
        for i, layer in enumerate(self.body):
            pre = first if i == 0 and first is not None else F.preactivations(h, layer.W.to(h.dtype), layer.b.to(h.dtype))
            h, pi = F.grouped_lse_gibbs(pre, layer.groups, layer.eps)
            gibbs_body.append(pi)
            layers.append((pre, h))
        a = self.head.preactivations(h) if head else None
        return h, gibbs_body, a, layers[0][0] if layers else a, layers

    def check_parameters(self) -> None:
        """Refuse weights no certificate holds for: a ValueError naming the part, before any constant
        is computed from them (:meth:`refresh` calls it, so every way a model is made -- a state dict,
        an :mod:`hjmodel.nn` module, an imported ONNX graph, the trainer, an artifact -- is checked).

        * every eps (the head's and each body layer's) a finite number > 0: the LSE's convexity and
          its Gibbs weights, on which every certificate rests, need eps > 0 (eps < 0 is a soft
          minimum: its radii were crossed on every row tried); the head's time t likewise (the HJ
          reading divides by it);
        * every weight and buffer finite;
        * the shapes chained: mu (d,), A (p, d), each layer's W (M, its input), b (M,), its groups
          (H, M) putting every neuron in exactly one group and at least one neuron in every group (an
          empty class could never be predicted); a memory head's V (N, K) and, for classification, its
          labels (N,) class indices that agree with V's one-hot rows (the explanations name them)."""
        head, pre = self.head, self.preprocess
        layers = [*((f"body.{i}", layer) for i, layer in enumerate(self.body)), ("head", head)]
        for where, part in (("head", head),) + tuple(layers[:-1]):
            if not (math.isfinite(part.eps) and part.eps > 0):
                raise ValueError(f"{where}.eps must be a finite number > 0, got {part.eps}")
        if not (math.isfinite(head.t) and head.t > 0):
            raise ValueError(f"head.t must be a finite number > 0, got {head.t}")
        for where, part in (("preprocess", pre), *layers):
            for name, value in (*part.named_parameters(recurse=False), *part.named_buffers(recurse=False)):
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{where}.{name} holds NaN or Inf")
        if pre.A.ndim != 2 or pre.mu.shape != (pre.A.shape[1],):
            raise ValueError(f"preprocess.mu must have shape ({pre.A.shape[-1]},), got {tuple(pre.mu.shape)}")
        width, source = pre.A.shape[0], "preprocess.A"
        for where, part in layers:
            W = part.W
            if W.ndim != 2 or W.shape[0] == 0:
                raise ValueError(f"{where}.W must have shape (N, d) with N >= 1, got {tuple(W.shape)}")
            if W.shape[1] != width:
                raise ValueError(f"{source} must have {W.shape[1]} rows ({where}.W's columns), got "
                                 f"{tuple(pre.A.shape) if source == 'preprocess.A' else width}")
            M = W.shape[0]
            if part.b.shape != (M,):
                raise ValueError(f"{where}.b must have shape ({M},), got {tuple(part.b.shape)}")
            if getattr(part, "mode", "groups") == "groups":
                mask = part.mask
                if mask.ndim != 2 or mask.shape[1] != M or not bool((mask.sum(0) == 1).all()):
                    raise ValueError(f"{where}: groups must be a (K, {M}) mask putting every neuron in exactly "
                                     f"one group, got {tuple(mask.shape)}")
                empty = torch.nonzero(mask.sum(1) == 0).flatten()
                if len(empty):
                    raise ValueError(f"{where}: group {int(empty[0])} has no neurons")
                width, source = mask.shape[0], f"{where}'s groups"
        if self.task == "classification" and head.n_outputs < 2:   # its one class everywhere: nothing to certify
            raise ValueError(f"a classifier needs two classes or more, got {head.n_outputs}")
        if head.mode == "values":
            N, V, labels = head.W.shape[0], head.V, head.labels
            if V.ndim != 2 or V.shape[0] != N or V.shape[1] == 0:
                raise ValueError(f"head.V must have shape ({N}, K), got {tuple(V.shape)}")
            if labels.shape != (N,):
                raise ValueError(f"head.labels must have shape ({N},), got {tuple(labels.shape)}")
            K = V.shape[1]
            head.regroup()   # whether V is one-hot, from V itself
            if self.task == "classification":
                if int(labels.min()) < 0 or int(labels.max()) >= K:
                    raise ValueError(f"head.labels must be class indices in [0, {K})")
                if head.groups is None:   # regroup: V is not one-hot
                    # log_probabilities (the class the OOD reference conditions on, the trainer's
                    # and the attacks' decision) sums pi over V's entries above 1/2, while the served
                    # prediction is the argmax of sum_j pi_j V_j: on a Dirichlet-valued scratch model
                    # they differed on 137 of 500 rows
                    raise ValueError("head.V of a memory classifier must be the one-hot rows of its labels "
                                     "(soft values are a regression head's targets: task='regression')")
                differ = torch.nonzero(V.argmax(1) != labels).flatten()
                if len(differ):
                    j = int(differ[0])
                    raise ValueError(f"head.labels disagree with V's one-hot rows (support point {j}: "
                                     f"label {int(labels[j])}, V's class {int(V[j].argmax())})")

    def _check_constants(self) -> None:
        """After :meth:`refresh`: weights whose products overflow float64 leave infinite constants,
        and the certificates would be NaN (served as NaN, or as float32's largest value)."""
        values = [torch.tensor([self._feature_lip, self._feature_curv], dtype=torch.float64), self._A_pinv,
                  *(self._pair[3:] if self.task == "classification" else self._scalar)]
        if not all(bool(torch.isfinite(v).all()) for v in values):
            largest = max(float(p.detach().abs().max()) for p in (self.head.W, *(layer.W for layer in self.body)))
            raise ValueError(f"the weights are too large for float64: the certificate's constants overflow "
                             f"(largest |weight| {largest:.3g}, A's {float(self.preprocess.A.abs().max()):.3g})")

    def refresh(self) -> None:
        """Recompute the weight-only constants of the certificates (call after changing weights);
        :meth:`check_parameters` first, and a ValueError when a constant overflows."""
        self.check_parameters()
        with torch.no_grad():
            head = self.head
            head.regroup()
            for layer in self.body:
                layer.regroup()
            ref = self.reference
            # the p-values' binary search needs ascending references (calibration stores them sorted)
            for name in ("norm_unsupported", "norm_ambiguous", "combined"):
                setattr(ref, name, torch.sort(getattr(ref, name)).values)
            W = head.W.detach().to(torch.float64)
            A = self.preprocess.A
            self._A_pinv = torch.linalg.pinv(A.to(torch.float64))   # (d, p): z -> raw input space
            # rows in the input space of the first linear map, with the preprocessing folded in
            W_head = W @ A if len(self.body) == 0 else W
            # certificates are in raw input space: with no body the folded rows give exact constants
            # (lip = 1, curv = 0 below); with a body A is folded into the first layer's bounds
            lip, curv = 1.0, 0.0
            for i, layer in enumerate(self.body):
                Wl = layer.W.detach().to(torch.float64)
                l_lip, l_curv = layer.bounds(Wl @ A if i == 0 else Wl)
                lip, curv = l_lip * lip, l_curv * lip * lip + l_lip * curv
            self._feature_lip, self._feature_curv = lip, curv
            self._W_tangent = W_head  # rows for tangent_radius: raw input space, or h space / lip
            # interval bounds over the L2 ball of radius r (_interval_margin): the first linear map's
            # pre-activations move by at most r |row| (its rows in raw input space), by its groups
            first = self.body[0] if len(self.body) else head
            first_rows = W_head if len(self.body) == 0 else first.W.detach().to(torch.float64) @ A
            self._first_norms_by_group = (None if first.groups is None else
                                          first.groups.gather(torch.linalg.vector_norm(first_rows, dim=-1), 0.0))
            # one body layer: its rows by unit in raw input space (its Jacobian is then one batched
            # product, F.unit_jacobian) and their tables for the linearised-body radius
            self._unit_rows = self._unit_tables = None
            if len(self.body) >= 1:
                unit = self.body[0].groups
                self._unit_rows = unit.rows(first_rows)
                self._unit_tables = F.unit_tables(self._unit_rows, unit.valid, self.body[0].eps)
            # the head's rows by class group (-inf bias in the padding), in h space: after a body its
            # interval bounds, and groups that are not one block each their pre-activations, come
            # out in the group layout with no gather
            self._head_by_group = None if head.groups is None else (
                head.groups.rows(W).reshape(-1, W.shape[1]),
                head.groups.gather(head.b.detach().to(torch.float64)).reshape(-1))
            K, N = head.n_outputs, W.shape[0]
            if self.task == "classification":
                if head.mode == "groups":
                    pos = head.mask.unsqueeze(1).expand(K, K, N)
                    neg = head.mask.unsqueeze(0).expand(K, K, N)
                    shift = torch.zeros(K, K, N, dtype=torch.float64)
                else:
                    u = head.V.T.unsqueeze(1) - head.V.T.unsqueeze(0)          # (K, K, N)
                    pos, neg, shift = F.sign_reduction_biases(torch.zeros(N, dtype=torch.float64), u, head.eps)
                L, kappa = F.certificate_tables(W_head, pos, neg, head.eps)
                self._pair = (pos.contiguous(), neg.contiguous(), shift.contiguous(), L, kappa)
                # the tangent radius's root search runs in float32 when a pair's negative side is
                # wide (functional._tangent_solve), the same in the grouped and the masked layout
                self._tangent_float32 = int(neg.sum(-1).max()) >= F._TANGENT_F32_MIN
                # one group per class (lse heads; memory heads with one-hot labels): the O(n N) form,
                # with the rows by group in the certificate's coordinates (raw input space without a
                # body, so the gradients need no pullback; h space with one)
                groups = head.groups
                self._grouped = None if groups is None else groups.rows(W_head)
            else:
                self._grouped = None
                norms = torch.linalg.vector_norm(W_head, dim=-1)
                if head.mode == "groups":
                    R = torch.stack([norms[g].max() for g in head.mask])
                    D = torch.stack([F.diameter(W_head[g]) for g in head.mask])
                else:
                    R = D = F.diameter(W_head).expand(K).clone()
                self._scalar = (R, D)
        self._check_constants()

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Class indices (n,) or values (n, K): the forward pass only, no diagnostics (the same
        decision as :meth:`evaluate`'s ``prediction``), in row blocks."""
        x = torch.as_tensor(x).to(torch.float64)
        parts = []
        for rows in self.row_blocks(x.shape[0]):
            yhat = self.head.outputs(self.head.preactivations(self.features(x[rows])))
            parts.append(yhat.argmax(-1) if self.task == "classification" else yhat)
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    @property
    def row_elements(self) -> int:
        """Elements of the largest per-row tensor of an evaluation: the head's class-group table
        (K x largest group; (K, N) pair masks for a head without one, i.e. memory regression), a
        body layer's (units x largest group) Gibbs weights, a one-layer body's Jacobian (units x d)
        and its head neurons' gradients in x (K x S x d, when formed), or the OOD reference points."""
        head = self.head
        K, S = head.groups.shape if head.groups is not None else (max(1, self.n_outputs), head.W.shape[0])
        body = [layer.groups.shape[0] * layer.groups.shape[1] for layer in self.body]
        if self._unit_rows is not None:   # the body's Jacobians (a layer's pieces' too), each head neuron's gradient
            body += [layer.groups.shape[0] * layer.groups.shape[1] * self.n_features for layer in self.body]
            body += [K * S * self.n_features] if self._forms_neuron_gradients() else []
        return max([K * S, self.reference.points.shape[0], *body])

    def _forms_neuron_gradients(self) -> bool:
        """Whether the linearised-body radius forms every head neuron's gradient in x (K x S x d per
        row, within ``functional.LINEARISED_EXACT_ELEMENTS``) or bounds their spread by norms."""
        groups = self.head.groups
        return groups is not None and groups.shape[0] * groups.shape[1] * self.n_features <= F.LINEARISED_EXACT_ELEMENTS

    def row_blocks(self, n: int) -> list[slice]:
        """Row blocks of a batch of n whose largest tensors stay within :func:`block_elements` elements
        on the model's device (one block when exporting: the ONNX graph takes the batch whole)."""
        return _blocks(n, max(1, block_elements(self.head.W.device) // self.row_elements))

    def explain_blocks(self, n: int) -> list[slice]:
        """Row blocks of :meth:`explain` on n rows: the integrated gradients' (rows, nodes, width)
        tensors stay within ``serving.EXPLAIN_ELEMENTS`` (:func:`serving.explain_rows`; one block when
        exporting: the graph takes the batch whole)."""
        return _blocks(n, explain_rows(self.body[0].W.shape[0] if self.body else self.head.W.shape[0], n))

    @torch.no_grad()
    def served(self, x: Tensor, outputs: tuple[str, ...] | None = None, tau: float | Tensor = 0.1,
               top_k: int = TOP_K_MAX) -> dict[str, Tensor]:
        """The served outputs alone (no forward trace kept), in row blocks: for many rows of a model
        with many support points, where :meth:`evaluate`'s (n, N) trace would not fit."""
        x = torch.as_tensor(x).to(torch.float64)
        tau_t = _per_row(tau, x.shape[0], x.device)
        parts = [self.evaluate(x[r], tau=tau_t[r], top_k=top_k, outputs=outputs).outputs
                 for r in self.row_blocks(x.shape[0])]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    @torch.no_grad()
    def evaluate(self, x: Tensor, tau: float | Tensor = 0.1, top_k: int = TOP_K_MAX,
                 outputs: tuple[str, ...] | None = None, *, rows_by_group: bool = True,
                 prove: Tensor | None = None, float32_outputs: bool = False) -> Evaluation:
        """The served outputs of DESIGN section 3, in float64, for raw inputs x: (n, d).

        ``tau``: the regression tolerance, one value or one per row ((n,) or (n, 1)). ``outputs``:
        the contract names wanted (None: every one); only the work they need is done, so
        ``outputs=()`` is the forward trace alone. Names follow :mod:`hjmodel.serving`; certificates
        and saliency are in raw input space. ``rows_by_group``: a head whose class groups are not one
        block each (memory) forms its pre-activations by group from its rows by group (False: by a
        gather of a, for a caller that forms a anyway -- an exported graph then holds one copy of the
        rows). Returns an :class:`Evaluation`.

        ``prove`` (n,): radii found elsewhere (another runtime's served radii, say) to re-prove in
        float64: ``certified_radius`` is then ``prove`` on the rows where this model certifies it --
        at most the radius it computes itself, or a radius at which its searched bounds, evaluated
        there, hold (a class-grouped head's tangent bound for every rival, within each pair's hybrid
        radius otherwise; a deep classifier's linearised-body bound) -- and 0 on the others. A searched radius
        is a point each runtime proves with its own evaluation of the bound, so two runtimes' radii
        may differ by rounding (DESIGN section 3); this tells a radius the reference arithmetic also
        proves from one it does not. The other outputs are unchanged.

        ``float32_outputs``: a regression radius holds for the outputs as served, rounded to float32
        (tau less what that rounding can move them: :func:`functional.float32_output_tolerance`);
        the serving module asks for it. Classification is unchanged (its decision is exact)."""
        x = torch.as_tensor(x).to(torch.float64)
        n = x.shape[0]
        tau_t = _per_row(tau, n, x.device)                                      # (n,)
        blocks = self.row_blocks(n)
        if len(blocks) > 1:
            return Evaluation.concat([self.evaluate(x[r], tau_t[r], top_k, outputs, rows_by_group=rows_by_group,
                                                    prove=None if prove is None else prove[r],
                                                    float32_outputs=float32_outputs)
                                      for r in blocks])
        wanted = set(output_names(self.task) if outputs is None else outputs)
        head, eps = self.head, self.head.eps
        # a head whose class groups are not one block each (memory): its pre-activations by group
        # come from the rows by group (one product, as cheap as a's), not from a gather of a
        by_rows = rows_by_group and head.groups is not None and not head.groups.contiguous
        h, gibbs_body, a, first, layers = self._trace(x, head=not by_rows)    # a: (n, N)
        J = self._body_jacobian(gibbs_body) if wanted & {"certified_radius", "saliency"} else None
        N = int(head.W.shape[0])                                    # a constant of an exported graph
        k = min(top_k, N)
        res: dict[str, Tensor] = {}

        # which Gibbs measure decides: the predicted class's group (lse) or all neurons (memory)
        # the class groups' pre-activations, LSE values and Gibbs weights (n, K, S): shared by the
        # outputs, the log-probabilities and the certificate
        grouped = None
        if head.groups is not None:
            a_g = self._head_by_rows(h) if by_rows else None
            grouped = head.grouped(a, a_g)
            if by_rows:
                a = head.groups.spread(a_g)          # the trace's a, consistent with the decision's a_g
                first = first if self.body else a
        by_group = None        # a memory head's Gibbs weights in the groups' layout, when it has one
        if head.mode == "groups":
            s = grouped[1]                                           # (n, K)
            if self.task == "classification":
                probs = torch.softmax(s / eps, dim=-1)
                c = s.argmax(-1)
            else:
                c = torch.zeros(n, dtype=torch.long, device=a.device)
            keep = head.mask[c]                                      # (n, N)
            yhat = s
            # decisive Gibbs weights: the decided group's, zero elsewhere
            own = torch.nn.functional.one_hot(c, s.shape[-1]).to(a.dtype).unsqueeze(-1)
            pi = head.groups.spread(grouped[2] * own)
        else:
            # every neuron decides (memory heads)
            if grouped is not None and self.task == "classification":
                # one-hot labels: the classes partition the support points, so sum_{j in k} pi_j is
                # softmax(s / eps)_k over the class groups' LSEs -- (n, K) work, and the decision is the
                # argmax of the very s the certificate's margins compare -- and a neuron's Gibbs weight
                # is its weight within its class times the class's probability: the attributions stay
                # in the groups' layout, with no (n, N) softmax
                probs = yhat = torch.softmax(grouped[1] / eps, dim=-1)
                by_group = grouped[2] * probs.unsqueeze(-1)                # (n, K, S)
                pi = head.groups.spread(by_group)
            else:
                pi = F.gibbs(a, eps)
                yhat = probs = pi @ head.V
            c = yhat.argmax(-1) if self.task == "classification" else torch.zeros(n, dtype=torch.long, device=a.device)
            keep = None                                              # every neuron decides
        # the class groups' gradients in the certificate's coordinates (n, K, q): shared by the
        # certificate and a memory head's saliency
        group_grads = (F.group_gradients(grouped[2], self._grouped)
                       if self._grouped is not None and wanted & {"certified_radius", "saliency"} else None)
        n_keep = keep.sum(-1) if keep is not None else torch.full_like(c, N)
        log_probs = (head.log_probabilities(a, None if grouped is None else grouped[1])
                     if self.task == "classification" else None)

        if self.task == "classification":
            res["prediction"] = c
            res["probabilities"] = probs
        else:
            res["prediction"] = yhat

        # ---- certificate (raw input space)
        if "certified_radius" in wanted:
            proof = None if prove is None else torch.as_tensor(prove, dtype=torch.float64, device=x.device).reshape(n)
            tol = F.float32_output_tolerance(tau_t, yhat) if float32_outputs and self.task == "regression" else tau_t
            r = self._certified_radius(a, gibbs_body, c, yhat, tol, grouped, J, layers, group_grads, proof)
            if self.task == "classification" and head.groups is not None:
                r = torch.maximum(r, self._interval_radius(first, grouped, c, r))
            # a radius is certified with every smaller one (each bound covers the whole ball)
            res["certified_radius"] = r if proof is None else torch.where((proof >= 0) & (proof <= r), proof, 0.0)

        # ---- attribution, entropy, energy gap, label sensitivity
        # the Gibbs weights as the attributions read them: (n, M) slots and each slot's neuron (None:
        # slot j is neuron j; a memory head's groups' layout has padding slots, neuron N, weight 0)
        weights, neuron = ((pi, None) if by_group is None else
                           (by_group.reshape(n, -1), head.groups.slots.reshape(-1).to(a.device)))
        if wanted & {"attribution_index", "attribution_weight", "label_sensitivity"}:
            # weights below float32 resolution (zeros outside the decisive group, underflow, which
            # runtimes may flush to zero differently) tie and are ordered by neuron index,
            # deterministically (the padding, index N, after every neuron)
            idx = (torch.arange(N, device=a.device) if neuron is None else neuron).to(pi.dtype)
            order = torch.where(weights >= 1e-37, weights, -1e-300 * (idx + 1.0))
            slot = torch.topk(order, k, dim=-1).indices
            i_top = slot if neuron is None else neuron[slot]
            w_top = weights.gather(1, slot)
            res["attribution_index"] = i_top
            res["attribution_weight"] = w_top
            res["label_sensitivity"] = self._label_sensitivity(w_top, i_top, yhat)
        if "attribution_entropy" in wanted:
            res["attribution_entropy"] = (F.attribution_entropy(pi) if by_group is None else
                                          F.grouped_gibbs_entropy(grouped[0], grouped[2], log_probs, eps))
        dominant = None
        if wanted & {"energy_gap", "hallucination_flag"}:
            if by_group is None:
                delta, dominant = F.energy_gap(a if keep is None else torch.where(keep, a, -math.inf))
            else:
                delta, dominant = F.energy_gap(grouped[0].reshape(n, -1))        # the padding is -inf
                dominant = neuron[dominant]
            delta = torch.where(delta.abs() < math.inf, delta, 1e30)
            res["energy_gap"] = delta / eps

        # ---- saliency: gradient of the decisive output in raw input space
        if "saliency" in wanted:
            if group_grads is not None:
                # from the class groups' gradients G_k (the certificate's coordinates: raw input space
                # without a body): grad s_c = G_c (lse), grad yhat_c = p_c sum_k p_k (G_c - G_k) / eps
                # (memory; one-hot labels)
                G_c = F.take_class(group_grads, c)
                grad = G_c if head.mode == "groups" else F.take_class(probs, c).unsqueeze(-1) * (
                    probs.unsqueeze(1) @ (G_c.unsqueeze(1) - group_grads)).select(1, 0) / eps
                res["saliency"] = self._pullback(grad, gibbs_body, J) if self.body else grad
            else:
                grad_h = F.gradient(pi, head.W) if head.mode == "groups" else self._values_grad(pi, c, yhat)
                res["saliency"] = self._pullback(grad_h, gibbs_body, J)

        # ---- OOD and hallucination
        ambiguity = None
        if wanted & {"ood_score", "ood_flag", "ood_p_value", "ood_component", "hallucination_flag"}:
            score, ambiguity = self._ood_components(h, log_probs)
            p_value, component = self._conformal(score, ambiguity)
            flag = p_value <= self.reference.alpha
            res["ood_score"] = score
            res["ood_flag"] = flag
            res["ood_p_value"] = p_value
            res["ood_component"] = component
            if "hallucination_flag" in wanted:
                regime = res["energy_gap"] >= torch.log(
                    self.reference.regime_factor * (n_keep - 1).clamp_min(1).to(a.dtype))
                res["hallucination_flag"] = flag & (component == 0) & regime
        served = {name: res[name] for name in output_names(self.task) if name in wanted and name in res}
        return Evaluation(outputs=served, h=h, a=a, pi=pi, decision=c, n_keep=n_keep, dominant=dominant,
                          log_probs=log_probs, ambiguity=ambiguity)

    def _head_by_rows(self, h: Tensor) -> Tensor:
        """The head's pre-activations by class group (n, K, S) from its rows by group (the weight
        constants of :meth:`refresh`): one product, no gather of a."""
        rows, b_g = (t.to(h.device) for t in self._head_by_group)
        return F.preactivations(h, rows, b_g).view(h.shape[0], *self.head.groups.shape)

    @torch.no_grad()
    def decisions(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Head features h (n, p) and class log-probabilities (n, K) (None: regression) of raw
        inputs, in row blocks: :meth:`evaluate`'s forward trace up to the decision, the same numbers,
        without the Gibbs weights, the (n, N) pre-activations and the rest of the trace -- what
        calibration asks of every training row (an O(n N p) product for a memory head)."""
        x = torch.as_tensor(x).to(torch.float64)
        head, classify = self.head, self.task == "classification"
        by_rows = head.groups is not None and not head.groups.contiguous
        H, log_p = [], []
        for rows in self.row_blocks(x.shape[0]):
            h, _, a, _, _ = self._trace(x[rows], head=classify and not by_rows)
            H.append(h)
            if classify and head.groups is None:
                log_p.append(head.log_probabilities(a))
            elif classify:   # s as evaluate's head.grouped computes it
                a_g = self._head_by_rows(h) if by_rows else head.groups.gather(a)
                log_p.append(head.log_probabilities(a, F.lse(a_g, head.eps)))
        return torch.cat(H), (torch.cat(log_p) if log_p else None)

    # ---------------------------------------------------------------- pieces
    def _body_jacobian(self, gibbs_body: list[Tensor]) -> Tensor | None:
        """The body's Jacobian in raw input space (n, H, d) when it has one layer, else None (deeper
        bodies pull vectors back layer by layer, cheaper than forming the Jacobian)."""
        if len(self.body) != 1:
            return None
        return F.unit_jacobian(gibbs_body[0], self._unit_rows.to(gibbs_body[0].device))

    def _linearisation(self, gibbs_body: list[Tensor], layers: list[tuple[Tensor, Tensor]],
                       J: Tensor | None) -> tuple[Tensor, tuple]:
        """The body linearised at x for :func:`functional.linearised_body_radius`: the top layer's
        Jacobian in raw input space and each layer above the first (:func:`functional.linearised_layer`).
        ``J``: the first layer's Jacobian when already formed."""
        if len(layers) != len(self.body):
            raise ValueError("the linearisation needs every body layer's pre-activations and outputs")
        J = F.unit_jacobian(gibbs_body[0], self._unit_rows.to(gibbs_body[0].device)) if J is None else J
        upper = []
        for layer, P, (pre, h) in zip(self.body[1:], gibbs_body[1:], layers[1:]):
            J, part = F.linearised_layer(J, P, layer.W.to(J.dtype), layer.groups, pre, h, layer.eps)
            upper.append(part)
        return J, tuple(upper)

    def _pullback(self, v: Tensor, gibbs_body: list[Tensor], J: Tensor | None = None) -> Tensor:
        """Vector-Jacobian product through the body and the preprocessing: (n, [K,] p) -> (n, [K,] d).
        With one body layer, a product with its Jacobian in raw input space (``J``: (n, H, d), or
        formed here by :func:`functional.unit_jacobian`)."""
        J = self._body_jacobian(gibbs_body) if J is None else J
        if J is not None:
            return (v.unsqueeze(1) @ J).select(1, 0) if v.ndim == 2 else v @ J
        for layer, P in zip(reversed(self.body), reversed(gibbs_body)):
            # v: (n, [K,] H); P: (n, H, S) by group: piece m of unit h gets v_h P_hm
            P = P.reshape(P.shape[0], *([1] * (v.ndim - 2)), *P.shape[1:])
            v = layer.groups.spread(v.unsqueeze(-1) * P) @ layer.W.to(v.dtype)
        return v @ self.preprocess.A

    def _values_grad(self, pi: Tensor, c: Tensor, yhat: Tensor) -> Tensor:
        """grad_h of yhat_c = sum_j pi_j V_jc: Cov_pi(w, V_c)/eps, with the mean V_c under pi read
        off the outputs ``yhat`` (n, K).  -> (n, p)."""
        return (self._values_coef(pi, c, yhat) @ self.head.W) / self.head.eps

    def _values_coef(self, pi: Tensor, c: Tensor, yhat: Tensor, weights: Tensor | None = None) -> Tensor:
        """The coefficients pi_j (V_jc - yhat_c) of the head's rows in eps grad_h yhat_c, for Gibbs
        weights ``pi`` (n, [q,] N), outputs ``yhat`` (n, [q,] K) and classes ``c`` (n,).  -> (n, [q,] N).

        With ``weights`` (q,): ``pi`` (n, q, N) and ``yhat`` (n, q, K) are taken at q nodes of a path,
        and the result is the coefficients' weighted sum over the nodes, formed as one batched
        product per row (the (n, q, N) weights are read once)."""
        head = self.head
        if not head.V.shape[1]:
            return torch.zeros_like(pi if weights is None else pi[:, 0])
        # row c of V^T (a constant of the graph): one gather of contiguous rows, no (N, n) transpose
        v = head.V.T.index_select(0, c)                                  # (n, N)
        at_c = c.unsqueeze(-1) if yhat.ndim == 2 else c.view(-1, 1, 1).expand(-1, yhat.shape[1], 1)
        vbar = yhat.gather(yhat.ndim - 1, at_c)                          # sum_j pi_j V_jc
        if weights is None and pi.ndim == 3:
            v = v.unsqueeze(1)                                           # the same row at every node
        if head.groups is not None:
            # one-hot labels: v_j - p_c is 1 - p_c = sum_{k != c} p_k (summed, not subtracted: it stays
            # accurate where the model is sure, and 1 - p_c would round to 0) or -p_c
            rest = yhat.scatter(yhat.ndim - 1, at_c, 0.0).sum(-1, keepdim=True)
            if weights is None:
                return pi * torch.where(v > 0.5, rest, -vbar)
            # (n, 2, q) @ (n, q, N): the sums over the nodes of pi_qj rest_q and of pi_qj p_qc
            both = torch.cat([weights.view(1, 1, -1) * rest.transpose(1, 2),
                              weights.view(1, 1, -1) * vbar.transpose(1, 2)], 1) @ pi
            return torch.where(v > 0.5, both[:, 0], -both[:, 1])
        if weights is None:
            return pi * (v - vbar)
        both = torch.cat([weights.view(1, 1, -1).expand(vbar.shape[0], 1, -1),
                          weights.view(1, 1, -1) * vbar.transpose(1, 2)], 1) @ pi
        return v * both[:, 0] - both[:, 1]

    def _label_sensitivity(self, w: Tensor, index: Tensor, yhat: Tensor) -> Tensor:
        """d prediction / d label_j (Prop F.1) of the neurons ``index`` (n, k), whose Gibbs weights are
        ``w`` (n, k).  -> (n, k)."""
        head = self.head
        if head.mode == "groups":
            # lse kind: the neuron's initial value g_j = -b_j - t|w_j|^2 plays the label: df/dg_j = -pi_j
            return -w
        if head.labels_in_exponent and self.task == "regression":
            g = head.V[:, 0].to(w.device)[index]
            return F.label_sensitivity_exponent(w, g, yhat[:, 0], head.eps)
        return F.label_sensitivity_values(w)

    def _certified_radius(self, a, gibbs_body, c, yhat, tau, grouped=None, J=None, layers=(), group_grads=None,
                          prove: Tensor | None = None) -> Tensor:
        """The certified radius (DESIGN section 3) before the interval-bound search. ``J``: the body's
        Jacobian when it has one layer (:meth:`_body_jacobian`); ``layers``: every body layer's
        (pre-activations, outputs) (:meth:`_trace`), without which a deep classifier's radius leaves out
        the linearised-body bound (the closed forms alone, as the masked layout computes them).
        ``prove``: radii to re-prove (:meth:`evaluate`): a class-grouped classifier's radius is then at
        least ``prove`` where every rival's tangent (or hybrid) bound holds there, or a deep one's
        linearised-body bound."""
        head = self.head
        lip, curv = self._feature_lip, self._feature_curv

        def pullback(v: Tensor) -> Tensor:
            return self._pullback(v, gibbs_body, J)

        if self.task == "classification":
            pos, neg, shift, L, kappa = self._pair
            if grouped is not None and self._grouped is not None:
                a_g, s, pi_g = grouped
                rows = self._grouped
                valid = head.groups.valid.to(a.device)
                # one body layer: every neuron's gradient in x, for the hybrid radius (no pullback) and
                # the linearised-body radius, whose bounds keep the input's directions through the body
                top, upper = (None, ()) if not (self.body and layers) else self._linearisation(gibbs_body, layers, J)
                wJ, G = (None, None) if top is None else F.neuron_gradients(top, pi_g, rows,
                                                                             self._forms_neuron_gradients())
                margins = functools.partial(F.grouped_margin_radius, a_g, s, pi_g, valid, c, rows, head.eps,
                                            L, kappa, rounding=ROUNDING, pullback=pullback if self.body else None,
                                            lip=lip, curv=curv, tangent_g=rows,
                                            float32_search=self._tangent_float32, grads_x=G,
                                            grads=group_grads)
                r = margins()[0]
                if prove is not None:
                    r = torch.maximum(r, margins(prove=prove)[0])
                if top is not None:
                    tables = tuple(t.to(a.device) for t in self._unit_tables)
                    D = F.unit_spread(gibbs_body[0], tables, self.body[0].groups.valid.to(a.device))
                    args = (wJ, G, D, tables[3], a_g, s, pi_g, valid, c, rows, head.eps)
                    r = torch.maximum(r, F.linearised_body_radius(*args, rounding=ROUNDING, J=top, upper=upper))
                    if prove is not None:
                        r = torch.maximum(r, F.linearised_body_radius(*args, rounding=ROUNDING, J=top, upper=upper,
                                                                      prove=prove))
                return r
            return F.gibbs_margin_radius(a, head.W, head.eps, c, pos, neg, shift, L, kappa, rounding=ROUNDING,
                                         pullback=pullback, lip=lip, curv=curv, tangent_rows=self._W_tangent,
                                         float32_search=self._tangent_float32)[0]
        return self._regression_radius(a, pullback, yhat, tau, lip, curv)

    def _interval_radius(self, first: Tensor, grouped, c: Tensor, r0: Tensor) -> Tensor:
        """The interval-bound-propagation (IBP) radius of the decision c over the L2 ball, searched
        above the closed-form radius r0 (:func:`functional.grid_root`, up to ``IBP_REACH`` x r0):
        the served radius is the larger of the two, so it is never below the bound IBP computes on
        the same graph (DESIGN section 3). Rows where r0 is 0 or infinite keep r0.

        ``first``: the first linear map's pre-activations (n, M) (the head's, ``grouped[0]`` by
        class, when there is no body); over the ball each moves by at most r |row| (rows in raw
        input space). Bounds then pass through the body layer by layer (LSE is increasing in every
        argument; affine maps by centre and |W| half-width), and the margin's lower bound is the
        LSE of the decided class at its lower ends minus the largest other class's LSE at its upper
        ends. Only the decided class's lower bound is formed.

        IBP is checked at r0 on every row; only the rows it certifies there (where it can beat the
        closed form: a few percent, or none, of a typical batch) are gathered for the search, so
        the search costs a few batched evaluations over those rows, not over the batch."""
        if not self.body:
            a_g = grouped[0]                                             # (n, K, S)
            rows_of = (a_g, F.take_class(a_g, c), c)
        else:
            # the first layer's pre-activations by group, laid out once
            rows_of = (self.body[0].groups.gather(first), c)
        usable = (r0 > 0) & (r0 < math.inf)
        start = torch.where(usable, r0, 0.0)
        gains = usable & (self._interval_margin(rows_of, start) > 0)
        rows = gains.nonzero().squeeze(-1)                               # where IBP may beat r0
        if rows.numel() == 0 and not F.static_graph():
            return r0      # the served graph skips the search likewise (artifact._skip_empty_searches)
        # every gathered row once per grid radius (functional.grid_root evaluates a grid at once)
        grid_rows = rows.repeat_interleave(IBP_POINTS)
        sub = tuple(t.index_select(0, grid_rows) for t in rows_of)
        lo = start.index_select(0, rows)
        found = F.grid_root(lambda r: self._interval_margin(sub, r), lo, IBP_REACH, IBP_POINTS, IBP_ROUNDS)
        return r0.index_put((rows,), torch.maximum(found, lo))

    def _interval_margin(self, rows_of: tuple[Tensor, ...], r: Tensor) -> Tensor:
        """IBP's lower bound on the decision margin over the L2 balls of radius r (m,), for the rows
        whose per-row tensors are ``rows_of`` (see :meth:`_interval_radius`). (m,)."""
        groups, eps = self.head.groups, self.head.eps
        if not self.body:
            a_g, a_c, c = rows_of
            norms_g = self._first_norms_by_group                         # (K, S), 0 in the padding
            lo_c = a_c - r.unsqueeze(-1) * norms_g[c]
            hi_g = a_g + r.view(-1, 1, 1) * norms_g
        else:
            first_g, c = rows_of
            layers = list(self.body)
            half = r.view(-1, 1, 1) * self._first_norms_by_group
            lo, hi = F.lse(first_g - half, layers[0].eps), F.lse(first_g + half, layers[0].eps)
            for layer in layers[1:]:
                lo, hi = F.interval_affine(lo, hi, layer.W.to(lo.dtype), layer.b.to(lo.dtype))
                lo, hi = F.interval_lse_layer(lo, hi, layer.groups, layer.eps)
            W_g, b_g = self._head_by_group
            lo_g, hi_g = (t.view(-1, *groups.shape) for t in F.interval_affine(lo, hi, W_g, b_g))
            lo_c = F.take_class(lo_g, c)
        own = F.lse(lo_c, eps)                                           # (m,)
        other = F.lse(hi_g, eps).scatter(1, c.unsqueeze(-1), -math.inf).amax(-1)
        return F.interval_margin(own, other, ROUNDING)

    def _regression_radius(self, a, pullback, yhat, tau, lip, curv) -> Tensor:
        """Radius within which every output stays within tau (n,) (DESIGN section 3).

        lse: scalar hybrid radius per output (G exact, L = R_k, kappa = D_k^2/(4 eps)), composed with
        the body bounds. memory: yhat_k <= y0 + tau  <=>  sum_j pi_j (y0 + tau - v_jk) >= 0, an exact
        sign reduction to an LSE margin (likewise for the lower side), with L <= D, kappa <= D^2/(4 eps)
        since both groups are subsets of all neurons."""
        head, eps = self.head, self.head.eps
        R, D = self._scalar
        if head.mode == "groups":
            _, pi_g = F.grouped_lse_gibbs(a, head.groups, eps)         # (n, K, S)
            G = torch.linalg.vector_norm(pullback(F.group_gradients(pi_g, head.groups.rows(head.W))), dim=-1)
            kappa = D * D / (4 * eps) * lip * lip + R * curv
            return F.hybrid_radius(tau.unsqueeze(-1).expand_as(G), G, R * lip, kappa).min(-1).values
        radii = []
        for side in (1.0, -1.0):
            u = side * (yhat.unsqueeze(-1) + side * tau[:, None, None] - head.V.T.unsqueeze(0))  # (n, K, N); > 0 safe
            _, _, shifted = F.sign_reduction_biases(torch.zeros_like(u), u, eps)
            m, coef, never = F.sign_margin(a.unsqueeze(1) + shifted, u > 0, u < 0, eps, ROUNDING)
            G = torch.linalg.vector_norm(pullback(coef @ head.W), dim=-1)
            r = F.hybrid_radius(m, G, D * lip, D * D / (4 * eps) * lip * lip + D * curv)
            radii.append(torch.where(never, math.inf, r).min(-1).values)
        return torch.minimum(radii[0], radii[1])

    def ood_unsupported(self, h: Tensor, classes: Tensor | None = None, leave_out: Tensor | None = None) -> Tensor:
        """The OOD score u/eps: the Hopf-Cole value over the reference points of the row's class, in
        diffusion units, -log mean_{j: label_j = c_i} exp(-|h_i - y_j|^2 / (4 t eps)).  -> (n,).

        ``classes`` (n,): the class each row is scored against (the model's decision: the soft
        distance to the class the model claims); None, or a reference without labels (regression,
        legacy artifacts): every reference point. A class with no reference point falls back to all.
        ``leave_out`` (n,): row i's own reference point (its position, -1: none) is left out -- the
        exact leave-one-out score of a training row (whose class, if that point was its only one,
        falls back to every other point, as the score over the reduced reference would)."""
        ref = self.reference
        by_class = ref.class_groups(self.n_outputs) if classes is not None and leave_out is None else None
        if by_class is not None:
            # every class has reference points: the exponentials of the row's class only
            groups, log_count = by_class
            u = F.hopf_cole_value_in_group(h, ref.hopf_cole_tables(h), ref.t, ref.eps, groups, classes)
            return u / ref.eps + log_count.to(h.dtype).index_select(0, classes)
        pts = ref.points.to(h.dtype)
        M = pts.shape[0]
        member = None
        others = (torch.arange(M, device=h.device).unsqueeze(0) != leave_out.unsqueeze(-1)
                  if leave_out is not None and M > 1 else None)                           # (n, M)
        if classes is not None and ref.labels.numel():
            member = ref.labels.unsqueeze(0) == classes.unsqueeze(-1)                      # (n, M)
            if others is not None:
                member = member & others
            # a class with no reference point -- or none left once the row's own is out -- falls
            # back to every (other) point
            empty = ~member.any(-1, keepdim=True)
            member = member | (empty if others is None else empty & others)
        elif others is not None:
            member = others
        g = torch.zeros(M, dtype=h.dtype, device=h.device)
        u = F.hopf_cole_value(h, pts, g, ref.t, ref.eps, mask=member) / ref.eps
        if member is None:                                  # -log of the mean, not of the sum
            return u + math.log(M)
        return u + torch.log(member.to(h.dtype).sum(-1))

    def _ood_components(self, h: Tensor, log_probs: Tensor | None):
        """(unsupported component = the OOD score u/eps against the decided class, ambiguous component
        or None).

        The ambiguous component is log(1 - max_k p_k), computed as the log-sum-exp of the other
        classes' log-probabilities: a monotone map of 1 - max prob that does not saturate at 0. It
        takes part in the gate only for artifacts that stored its normaliser (see
        :func:`hjmodel.train.calibrate`)."""
        classes = None if log_probs is None else log_probs.argmax(-1)
        score = self.ood_unsupported(h, classes)
        return score, (None if log_probs is None else F.ambiguity(log_probs))

    def _conformal(self, comp_u: Tensor, comp_a: Tensor | None) -> tuple[Tensor, Tensor]:
        """Split-conformal p-value of the combined statistic, and which component decided it.

        Each component's score gets a rank p-value against its normaliser (training scores),
        p_c = (1 + #{normaliser >= score}) / (1 + n_c); the combined statistic is
        T = max_c -log p_c (the more surprising component decides; larger = more unusual; ties
        within a rank level broken by the score, :func:`_surprisal`), and the served p-value is T's
        rank among the calibration split's statistics, p = (1 + #{T_cal >= T}) / (1 + n_cal).

        Validity: T is the same fixed function (of the training split only) for calibration and test
        points, so for an exchangeable in-distribution input P(p <= alpha) <= alpha exactly (ties,
        up to the rounding of the kernels that compute T, count against the input: :func:`_rank_p`).
        Robustness: one training point moves any p_c by at most
        1/(1 + n_c) and one calibration point moves p by at most 1/(1 + n_cal): no single example
        can squeeze the others' scores together (the ECDF interpolation this replaces could)."""
        ref = self.reference
        s_u, s_a = self._surprisals(comp_u, comp_a)
        if s_a is None:
            T, component = s_u, torch.zeros_like(comp_u, dtype=torch.long)
        else:
            T, component = torch.maximum(s_u, s_a), (s_a > s_u).long()
        return _rank_p(ref.combined.to(comp_u.dtype), T), component

    def _surprisals(self, comp_u: Tensor, comp_a: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """-log p_c + tie-break_c of each component (None: no ambiguity component)."""
        ref = self.reference
        s_u = _surprisal(ref.norm_unsupported.to(comp_u.dtype), comp_u)
        if comp_a is None or not ref.norm_ambiguous.numel():
            return s_u, None
        return s_u, _surprisal(ref.norm_ambiguous.to(comp_u.dtype), comp_a)

    def combined_statistic(self, h: Tensor, log_probs: Tensor | None) -> Tensor:
        """T = max_c (-log p_c + tie-break_c) for calibration and evaluation (larger = more unusual):
        the more surprising component decides."""
        s_u, s_a = self._surprisals(*self._ood_components(h, log_probs))
        return s_u if s_a is None else torch.maximum(s_u, s_a)

    # ---------------------------------------------------------------- the explanation graph
    @torch.no_grad()
    def explain(self, x: Tensor, tau: float | Tensor = 0.1, baseline: Tensor | None = None,
                top_k: int = TOP_K_MAX, panels: int = IG_PANELS, order: int = IG_ORDER) -> dict[str, Tensor]:
        """The explanation outputs of :mod:`hjmodel.serving` (``explain_outputs_for``), float64, for raw
        inputs x: (n, d) -- the diagnostics that cost more than the prediction, served only on request:

        * ``integrated_gradients`` (n, d): IG of the decisive output from ``baseline`` (n, d) (default
          the preprocessing mean), composite Gauss-Legendre (``panels`` x ``order`` nodes) of the closed-
          form gradient along the path -- one fixed rule, the same in torch and ONNX; completeness
          sum IG = F(x) - F(baseline) holds to the quadrature's error (tested against the exact,
          adaptive :meth:`integrated_gradients`);
        * memory classification: ``label_flips`` (n,), ``label_flip_target`` (n,), ``label_flip_index``
          (n, k): the fewest training labels whose change flips the decision, to which class, and
          which examples (:func:`functional.label_flip_plan`; N + 1 and -1s when none does);
        * the HJ reading of the decisive group's dominant neuron j (Thm 4.1, 5.1): ``hj_initial_value``
          g_j, ``hj_value`` u(z, t) over the group, ``hopf_lax_value`` (its eps -> 0 limit), and for
          kinds without a body ``hj_support_point`` y_j mapped to raw input space (the preprocessing's
          pseudo-inverse: for memory models, the training example itself);
        * the eps what-if: ``tropical_prediction`` (the decision, or values, in the eps -> 0 limit of
          every LSE) and ``eps_decision_changes`` (whether that limit changes the decision; regression:
          moves an output by more than tau)."""
        x = torch.as_tensor(x).to(torch.float64)
        tau_t = _per_row(tau, x.shape[0], x.device)
        x0 = self.preprocess.mu.expand_as(x) if baseline is None else torch.as_tensor(baseline).to(torch.float64)
        blocks = self.explain_blocks(x.shape[0])
        if len(blocks) > 1:
            x0 = x0.expand_as(x)
            parts = [self.explain(x[r], tau_t[r], x0[r], top_k, panels, order) for r in blocks]
            return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        ev = self.evaluate(x, tau=tau_t, outputs=("prediction",), rows_by_group=False)   # a is read below
        head, eps, t = self.head, self.head.eps, self.head.t
        c, a, h = ev.decision, ev.a, ev.h
        keep = head.mask[c] if head.mode == "groups" else torch.ones_like(a, dtype=torch.bool)
        out: dict[str, Tensor] = {}
        out["integrated_gradients"] = _integrated_gradients(self, x, x0.expand_as(x), panels, order, decision=c,
                                                            closed_form=False)
        if self.task == "classification" and head.mode == "values":
            k = min(top_k, a.shape[-1])
            count, target, plan = F.label_flip_plan(ev.pi, head.labels, c, self.n_outputs, k)
            out["label_flips"], out["label_flip_target"], out["label_flip_index"] = count, target, plan
        # HJ reading (Thm 4.1): e_j = g_j + |z - y_j|^2/(4t) = |z|^2/(4t) - a_j, over the decisive group
        y, g = F.hj_reading(head.W, head.b, t)
        e = torch.where(keep, (h * h).sum(-1, keepdim=True) / (4.0 * t) - a, math.inf)
        j = e.argmin(-1)
        out["hj_initial_value"] = g[j]
        out["hj_value"] = -F.lse(-e, eps)
        out["hopf_lax_value"] = e.gather(1, j[:, None]).select(1, 0)
        if len(self.body) == 0:
            out["hj_support_point"] = self.preprocess.mu + y[j] @ self._A_pinv.T   # (n, d)
        # eps what-if: every LSE at eps -> 0 (max), the Gibbs average at its dominant support point
        a_keep = torch.where(keep, a, -math.inf)
        if head.mode == "groups":
            tropical = head.groups.gather(a).amax(-1)                                     # (n, K)
        else:
            tropical = head.V[a_keep.argmax(-1)]                                          # (n, K)
        yhat = ev["prediction"]
        if self.task == "classification":
            out["tropical_prediction"] = tropical.argmax(-1)
            out["eps_decision_changes"] = out["tropical_prediction"] != c
        else:
            out["tropical_prediction"] = tropical
            out["eps_decision_changes"] = ((tropical - yhat).abs() > tau_t.unsqueeze(-1)).any(-1)
        return out

    # ---------------------------------------------------------------- readable / offline diagnostics
    def diagnose(self, x: Tensor, top_k: int = 5, tau: float | None = None, baseline: Tensor | None = None) -> list[dict]:
        """Every diagnostic of DESIGN section 3 for each row of x (n, d) or (d,), as JSON-ready dicts.
        ``tau``: a regression model's certificate tolerance (default ``serving.DEFAULT_TAU``; refused
        on a classifier, whose radius reads none); ``baseline`` (d,) or (n, d): integrated gradients'
        (default the preprocessing mean). Raises InputError for what the server would answer with a
        400: a shape, a NaN or Inf, a top_k below 1, a tau that is not a finite number > 0."""
        x, baseline = _diagnosable(self, x, top_k, tau, baseline)
        return _diagnose(self, x, top_k, DEFAULT_TAU if tau is None else float(tau), baseline)

    @torch.no_grad()
    def integrated_gradients(self, x: Tensor, baseline: Tensor | None = None, panels: int = 32, order: int = 8,
                             decision: Tensor | None = None) -> Tensor:
        """Integrated gradients of the decisive output in raw input space: (n, d) (see
        :func:`_integrated_gradients`)."""
        return _integrated_gradients(self, x, baseline, panels, order, decision)

    @torch.no_grad()
    def output_gradient(self, x: Tensor, c: Tensor) -> Tensor:
        """Closed-form gradient of output ``c`` (n,) in raw input space: the group's LSE value for an
        lse head, yhat_c for a memory head (a regression's c = 0); a memory classifier's v_jc - p_c
        is taken without cancellation (:meth:`_values_coef`), so it keeps its digits where the model
        is sure. At the decided class this is the served ``saliency``, which :meth:`evaluate` forms
        from the certificate's shared pieces instead. (n, d) -> (n, d)."""
        _, gibbs_body, a = self.trace(x)
        return self._pullback(_head_gradient(self, a.unsqueeze(1), c).squeeze(1), gibbs_body)


def _on_device(value, device: torch.device):
    """A cached constant (a tensor, a group table, or a tuple / list of them) on ``device``; anything
    else (a module's own registries, numbers, caches keyed by device) as it is."""
    if isinstance(value, nn.Parameter) or isinstance(value, dict):
        return value
    if isinstance(value, Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, F.Groups):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        moved = [_on_device(v, device) for v in value]
        return value if all(m is v for m, v in zip(moved, value)) else type(value)(moved)
    return value


def _per_row(tau: float | Tensor, n: int, device=None) -> Tensor:
    """A tolerance per row: (n,) float64 from one value or n values ((n,) or (n, 1)), on ``device``."""
    tau_t = torch.as_tensor(tau, dtype=torch.float64, device=device).reshape(-1)
    return tau_t.expand(n) if tau_t.numel() == 1 else tau_t


#: A score s ties a reference score when their difference is at most this much of 1 + |s| (the gate's
#: first level: the OOD score against the training scores). The score is a difference of terms much
#: larger than itself, and the same row came out up to 4e-13 (1 + |s|) apart on the demo models between
#: onnxruntime and torch, and between batch shapes of one backend (summation orders); this is ~2,000x
#: that, and far below any distance an OOD gate resolves. (Exact duplicates tie: a training row not in
#: the reference measure, sent again, scores its own leave-one-out score.)
SCORE_TIE_MARGIN = 2.0 ** -30
#: The same for the statistic T against the calibration statistics (the served p-value): T is a
#: logarithm of a count plus a tie-break that moves ~1e-4 as fast as the score, so it rounds within a
#: few ulps (a row's T alone and batched: 1e-16 apart, relative); far above that, and far below the
#: closest two calibration statistics of the demo models (~6e-10).
STATISTIC_TIE_MARGIN = 2.0 ** -40


def _rank_p(sorted_ref: Tensor, s: Tensor, margin: float = STATISTIC_TIE_MARGIN) -> Tensor:
    """Upper-tail rank p-value of scores s among ascending reference scores, a reference within
    ``margin`` (1 + |s|) below s counting as a tie: (1 + #{ref >= s - margin (1 + |s|)}) / (1 + m).
    (m,), (n,) -> (n,); exportable (an unrolled binary search, :func:`functional.count_at_least`).

    Ties count against the input (a larger p-value), which is what keeps a conformal p-value valid
    where inputs repeat: a calibration row sent again ties its own statistic. In exact arithmetic that
    is ``ref >= s``; but s is computed again, by other kernels (onnxruntime, the torch trace, another
    batch shape) than the reference's, so a tie holds only up to rounding and, counted exactly, went
    either way by where the row was batched (``tests/hjmodel/test_served_precision.py``). Counting
    within the margin counts it whichever way s rounded (the margins are far above the rounding
    measured, not a proven bound): the p-value is not below the exact one, and it is the same on
    every backend and batch. NaN counts nothing; +-inf stay themselves."""
    lowered = s - margin * (1.0 + s.abs()).clamp_max(1e300)
    ge = F.count_at_least(sorted_ref, lowered).to(s.dtype)
    return (1.0 + ge) / (1.0 + float(sorted_ref.shape[0]))


def _surprisal(sorted_ref: Tensor, s: Tensor) -> Tensor:
    """-log of the rank p-value, ties within a rank level broken by the score itself.

    Scores beyond every reference score all share the smallest p-value; without a tie-break a
    calibration row that is merely beyond them would tie with an input a thousand times farther, and
    a gate at a small alpha could never fire. The tie-break adds less than half the smallest gap
    between two levels, log((m+1)/m), times a squashed robust z-score (median and interquartile
    range of the reference, which no single reference point can move far): it orders inputs within a level --
    farther stays more unusual however far -- and never across levels, so a component's levels keep
    their meaning when the two components are compared."""
    m = sorted_ref.shape[0]
    if m == 0:
        return torch.zeros_like(s)
    # robust location and scale read off the sorted reference (median, interquartile range): no
    # sort in the graph, and no single reference point moves them far
    med = sorted_ref[m // 2]
    iqr = (sorted_ref[(3 * m) // 4] - sorted_ref[m // 4]).clamp_min(torch.finfo(s.dtype).tiny)
    z = (s - med) / iqr
    within = 0.5 + 0.5 * z / (1.0 + z.abs())          # softsign: in (0, 1), increasing, exportable in float64
    # its limits where z overflows (a reference whose quartiles coincide -- rows all alike -- has an
    # interquartile range of float64's smallest normal, so z overflows for any score 4 away): inf / inf
    # was NaN, and a NaN statistic counts nothing, so every such input was flagged
    within = torch.where(torch.isinf(z), (z > 0).to(z.dtype), within)
    # float(m): a Python number, so the exporter does not trace this constant in float32
    return -torch.log(_rank_p(sorted_ref, s, SCORE_TIE_MARGIN)) + (0.5 * math.log1p(1.0 / float(m))) * within


def _diagnosable(model: HJModel, x, top_k, tau, baseline) -> tuple[Tensor, Tensor | None]:
    """:meth:`HJModel.diagnose`'s arguments checked: rows (n, d) and a baseline float64, or InputError."""
    from .errors import InputError

    def real(value, name: str) -> Tensor:   # a complex value's imaginary part would be dropped
        kind = "c" if torch.is_tensor(value) and value.is_complex() else \
            "f" if torch.is_tensor(value) else np.asarray(value).dtype.kind
        if kind not in "biuf":
            raise InputError(f"{name} must be real numbers, got {getattr(value, 'dtype', type(value).__name__)}")
        return torch.as_tensor(value, dtype=torch.float64)

    x = real(x, "input")
    if x.ndim == 1:
        x = x.unsqueeze(0)
    d = model.n_features
    if x.ndim != 2 or x.shape[1] != d:
        raise InputError(f"input must have shape (n, {d}), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("input contains NaN or Inf")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InputError(f"top_k must be an integer >= 1, got {top_k!r}")
    if why := tau_refusal(model.task, tau):
        raise InputError(f"tau {why}")
    if baseline is not None:
        baseline = real(baseline, "baseline")
        if baseline.shape not in ((d,), (x.shape[0], d)):
            raise InputError(f"baseline must have shape ({d},) or ({x.shape[0]}, {d}), got {tuple(baseline.shape)}")
        if not bool(torch.isfinite(baseline).all()):
            raise InputError("baseline contains NaN or Inf")
    return x, baseline


def _diagnose(model: HJModel, x: Tensor, top_k: int = 5, tau: float = DEFAULT_TAU,
              baseline: Tensor | None = None) -> list[dict]:
    """Every diagnostic of DESIGN section 3 for each row of x, as JSON-ready dicts."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.ndim == 1:
        x = x.unsqueeze(0)
    out = model.evaluate(x, tau=tau, top_k=top_k)
    head, eps = model.head, model.head.eps
    y, g = F.hj_reading(head.W.detach(), head.b.detach(), head.t)
    h = out.h
    u = F.hopf_cole_value(h, y, g, head.t, eps)
    hopf_lax = F.hopf_lax_value(h, y, g, head.t)
    ig = model.integrated_gradients(x, baseline, decision=out.decision)
    delta = out["energy_gap"] * eps
    bound = F.energy_gap_bound(delta, eps, int(out.n_keep.max()))
    flips = target = None
    if model.task == "classification" and head.mode == "values" and bool((head.labels >= 0).all()):
        flips, target = F.fewest_label_flips(out.pi, head.labels, out.decision, model.n_outputs)
    names = model.class_names
    rows = []
    for i in range(x.shape[0]):
        dom = int(out.dominant[i])
        idx = out["attribution_index"][i].tolist()
        attribution = []
        for j, w, ls in zip(idx, out["attribution_weight"][i].tolist(), out["label_sensitivity"][i].tolist()):
            item = {"index": j, "weight": w, "label_sensitivity": ls}
            if head.mode == "values":
                item["example_id"] = int(head.example_ids[j])
                if model.task == "classification":
                    item["label"] = names[int(head.labels[j])]
                else:
                    item["value"] = head.V[j].tolist()
            attribution.append(item)
        row = {
            "prediction": (names[int(out["prediction"][i])] if model.task == "classification"
                           else out["prediction"][i].tolist()),
            "certified_radius": float(out["certified_radius"][i]),
            "attribution": attribution,
            "attribution_entropy": float(out["attribution_entropy"][i]),
            "energy_gap": {"delta_over_eps": float(out["energy_gap"][i]), "dominant_neuron": dom,
                           "bound_f_minus_top": float(bound[i]),
                           "extrapolation_regime": bool(out["energy_gap"][i] >= math.log(
                               model.reference.regime_factor * max(int(out.n_keep[i]) - 1, 1)))},
            "ood": {"score": float(out["ood_score"][i]), "p_value": float(out["ood_p_value"][i]),
                    "alpha": model.reference.alpha,
                    "component": OOD_COMPONENTS[int(out["ood_component"][i])],
                    "flagged": bool(out["ood_flag"][i])},
            "hallucination": bool(out["hallucination_flag"][i]),
            "feature_attribution": {"saliency": out["saliency"][i].tolist(),
                                    "integrated_gradients": ig[i].tolist()},
            "hj": {"t": head.t, "eps": eps, "support_point": y[dom].tolist(), "initial_value": float(g[dom]),
                   "u": float(u[i]), "hopf_lax": float(hopf_lax[i])},
        }
        if model.task == "classification":
            row["probabilities"] = dict(zip(names, out["probabilities"][i].tolist()))
        if flips is not None:
            n = int(flips[i])
            row["label_flips"] = {"fewest_labels_to_flip": n if n <= head.W.shape[0] else None,
                                  "towards": names[int(target[i])]}
        rows.append(row)
    return rows


def _integrated_gradients(model: HJModel, x: Tensor, baseline: Tensor | None = None,
                          panels: int = 32, order: int = 8, decision: Tensor | None = None,
                          closed_form: bool = True) -> Tensor:
    """Integrated gradients of the decisive output in raw input space, from ``baseline`` (default:
    the preprocessing mean, i.e. z0 = 0). With ``closed_form``, kind lse (a grouped head on the input)
    takes the adaptive quadrature of :func:`functional.integrated_gradients`, exact to rounding;
    otherwise the fixed rule of ``panels`` x ``order`` Gauss-Legendre nodes along the first linear
    map's affine pre-activations (:func:`_affine_path_ig`)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    x0 = (model.preprocess.mu if baseline is None else torch.as_tensor(baseline, dtype=torch.float64)).expand_as(x)
    head = model.head
    if model.task == "regression":
        c = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)   # output 0 (DESIGN: the decisive output)
    else:
        c = model.predict(x) if decision is None else decision
    if closed_form and len(model.body) == 0 and head.mode == "groups":
        W = head.W.detach() @ model.preprocess.A
        b = head.b.detach() - W @ model.preprocess.mu
        return F.integrated_gradients(x, x0, W, b, head.eps, mask=head.mask, output=c, panels=panels, order=order)
    nodes, weights = F.gauss_legendre(panels, order, x.dtype, x.device)
    return _affine_path_ig(model, x, x0, c, nodes, weights)


def _blocks(n: int, step: int) -> list[slice]:
    """n rows in blocks of ``step``; one block while recording a graph (:func:`functional.static_graph`),
    which takes the batch whole."""
    if n <= step or F.static_graph():
        return [slice(0, n)]
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _affine_path_ig(model: HJModel, x: Tensor, x0: Tensor, c: Tensor, nodes: Tensor, weights: Tensor) -> Tensor:
    """Integrated gradients of output ``c`` by the rule ``nodes``, ``weights`` (q,) on [0, 1].

    Along the path x0 + s (x - x0) the first linear map's pre-activations (the head's, or the first
    body layer's) are affine, a(s) = a0 + s da, and the output's gradient in raw input space is a
    combination of that map's rows, coef(s) W A (:func:`_head_gradient`, pulled back). So the rule integrates
    the coefficients alone, (n, q, N) per row and node, with no d-wide product per node, and forms
    the gradient once: IG = (x - x0) * ((sum_q w_q coef(s_q)) W A) -- the same sum as the gradient
    taken at every node, in another order. A head on the input: its Gibbs weights' coefficients
    (an lse head's only over the decided class's group, in the :class:`~hjmodel.functional.Groups`
    layout); after a body: the layers above run on the path's (n, q, N1) pre-activations, and the
    head's gradient is pulled back to the first layer's pieces."""
    head, pre = model.head, model.preprocess
    A = pre.A.to(x.dtype)
    dz = (x - x0) @ A.T                                                            # (n, p): the linear part alone
    ends = torch.stack([torch.ones_like(nodes), nodes], 1)                         # (q, 2): a(s) = [1, s] @ [a0; da]

    def along(a0: Tensor, da: Tensor) -> Tensor:                                   # (n, N) ends -> (n, q, N)
        return ends @ torch.stack([a0, da], 1)

    if model.body:
        first = model.body[0]
        W = first.W.to(x.dtype)
        pre0 = F.preactivations(pre(x0), W, first.b.to(x.dtype))                   # (n, N1)
        _, gibbs_body, a = model._trace(None, first=along(pre0, dz @ W.T))[:3]     # (n, q, N)
        v = _head_gradient(model, a, c)                                            # (n, q, H): grad in h
        # the pullback of HJModel._pullback, layer by layer, stopped at the first layer's pieces
        for layer, P in zip(reversed(model.body[1:]), reversed(gibbs_body[1:])):
            v = layer.groups.spread(v.unsqueeze(-1) * P) @ layer.W.to(v.dtype)
        coef = first.groups.spread(v.unsqueeze(-1) * gibbs_body[0])               # (n, q, N1)
        return (x - x0) * (((weights @ coef) @ W) @ A)
    W = head.W.to(x.dtype)
    a0 = head.preactivations(pre(x0))                                              # (n, N)
    da = dz @ W.T                                                                  # (n, N)
    if head.mode == "groups":
        groups = head.groups
        a0_c = F.take_class(groups.gather(a0), c).unsqueeze(1)                     # (n, 1, S), -inf padding
        da_c = F.take_class(groups.gather(da, fill=0.0), c).unsqueeze(1)
        pi = F.lse_gibbs(a0_c + nodes.view(1, -1, 1) * da_c, head.eps)[1]          # (n, q, S)
        at_c = torch.nn.functional.one_hot(c, groups.shape[0]).to(pi.dtype)       # (n, K)
        grad_h = groups.spread(at_c.unsqueeze(-1) * (weights @ pi).unsqueeze(1)) @ W
    else:
        # softmax(a / eps), the division on the path's (n, N) ends rather than on (n, q, N)
        pi = torch.softmax(along(a0 / head.eps, da / head.eps), -1)
        grad_h = (model._values_coef(pi, c, pi @ head.V.to(x.dtype), weights) @ W) / head.eps
    return (x - x0) * (grad_h @ A)


def _head_gradient(model: HJModel, a: Tensor, c: Tensor) -> Tensor:
    """Gradient in h of output c (the group's LSE value for lse heads, yhat_c for memory heads) at
    the head's pre-activations a (n, q, N): q points per row, c (n,).  -> (n, q, p)."""
    head = model.head
    if head.mode == "groups":
        return F.gradient(F.masked_lse_gibbs(a, head.mask[c].unsqueeze(1), head.eps)[1], head.W)
    pi = F.gibbs(a, head.eps)
    return model._values_grad(pi, c, pi @ head.V)
