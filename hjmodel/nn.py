"""Public torch modules for training LSE networks in *your own* loop (any optimiser, data loader,
device), then serving them with every diagnostic (:func:`hjmodel.export`).

Each module holds parameters and calls :mod:`hjmodel.functional` through the building blocks of
:mod:`hjmodel.models`; its parts (``preprocess``, ``body``, ``head``) are what an artifact is made
of, so export rebuilds nothing and changes no number. Parameters are float64 (the certificates are
computed in float64); inputs of any float dtype work.

    model = hjmodel.nn.LSEClassifier(64, n_classes=10, pieces=8, mean=X.mean(0), scale=X.std(0))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for xb, yb in loader:
        loss = torch.nn.functional.cross_entropy(model(xb), yb)   # logits = s / eps
        opt.zero_grad(); loss.backward(); opt.step()
    hjmodel.export(model, calibration_data=(X_cal, y_cal), out="models/mine/1")
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .models import GibbsHead, LSEGroupLayer, Preprocess

__all__ = ["LSEClassifier", "LSELayer", "LSERegressor", "MemoryClassifier", "from_state_dict"]


def _contiguous_groups(groups: int, pieces: int) -> Tensor:
    mask = torch.zeros(groups, groups * pieces, dtype=torch.bool)
    for k in range(groups):
        mask[k, k * pieces:(k + 1) * pieces] = True
    return mask


def _preprocess(in_features: int, mean, scale) -> Preprocess:
    """z = (x - mean) / scale (identity when both are None); constant features keep scale 1."""
    if mean is None and scale is None:
        return Preprocess.identity(in_features)
    return Preprocess.standardize(np.zeros(in_features) if mean is None else mean,
                                  np.ones(in_features) if scale is None else scale)


class LSELayer(LSEGroupLayer):
    """Affine pieces, then an LSE over each of ``groups`` groups of ``pieces`` contiguous pieces:
    (n, in_features) -> (n, groups). h_k = eps log sum_{i in G_k} exp((w_i . z + b_i) / eps)."""

    def __init__(self, in_features: int, groups: int, pieces: int = 4, eps: float = 1.0,
                 generator: torch.Generator | None = None):
        W = torch.randn(groups * pieces, in_features, generator=generator, dtype=torch.float64) / math.sqrt(in_features)
        super().__init__(W, torch.zeros(groups * pieces, dtype=torch.float64), _contiguous_groups(groups, pieces), eps)


class _Network(nn.Module):
    """preprocess -> body (LSE layers) -> head; the three parts an artifact holds."""

    kind: str
    task: str

    def features(self, x: Tensor) -> Tensor:
        h = self.preprocess(x.to(torch.float64))
        for layer in self.body:
            h = layer(h)
        return h

    def preactivations(self, x: Tensor) -> Tensor:
        """The head's pre-activations a(x): (n, N)."""
        return self.head.preactivations(self.features(x))


class LSEClassifier(_Network):
    """K classes, class k's logit the LSE of its own group of ``pieces`` neurons (kind ``lse``; with
    ``hidden`` LSE layers before the head, kind ``deep``). ``forward(x) -> s / eps`` (n, K): logits for
    ``cross_entropy`` (softmax(s / eps) are the served probabilities). ``mean`` / ``scale``: input
    standardisation, folded into the artifact (certificates stay in raw input units)."""

    task = "classification"

    def __init__(self, in_features: int, n_classes: int, pieces: int = 8, eps: float = 1.0, t: float = 0.5,
                 hidden: Sequence[int] = (), hidden_pieces: int = 4, mean=None, scale=None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.kind = "deep" if hidden else "lse"
        self.preprocess = _preprocess(in_features, mean, scale)
        layers, d = [], in_features
        for i, units in enumerate(hidden):
            layers.append(LSELayer(d, units, hidden_pieces, eps if i == 0 else 1.0, generator))
            d = units
        self.body = nn.ModuleList(layers)
        N = n_classes * pieces
        W = torch.randn(N, d, generator=generator, dtype=torch.float64) * (0.1 / math.sqrt(d))
        self.head = GibbsHead(W, torch.zeros(N, dtype=torch.float64), eps, t, "groups",
                              mask=_contiguous_groups(n_classes, pieces))

    def forward(self, x: Tensor) -> Tensor:
        return self.head.log_probabilities(self.preactivations(x))   # log softmax(s/eps): logits up to a constant


class LSERegressor(_Network):
    """``n_outputs`` real outputs, output k the LSE of its own group (kind ``lse``): ``forward(x) ->
    yhat`` (n, K), for a squared loss. The regression certificate serves one output (K = 1) per eps."""

    task = "regression"

    def __init__(self, in_features: int, n_outputs: int = 1, pieces: int = 8, eps: float = 1.0, t: float = 0.5,
                 mean=None, scale=None, generator: torch.Generator | None = None):
        super().__init__()
        self.kind = "lse"
        self.preprocess = _preprocess(in_features, mean, scale)
        self.body = nn.ModuleList()
        N = n_outputs * pieces
        W = torch.randn(N, in_features, generator=generator, dtype=torch.float64) / math.sqrt(in_features)
        self.head = GibbsHead(W, torch.zeros(N, dtype=torch.float64), eps, t, "groups",
                              mask=_contiguous_groups(n_outputs, pieces))

    def forward(self, x: Tensor) -> Tensor:
        return self.head.outputs(self.preactivations(x))


class MemoryClassifier(_Network):
    """The Hopf–Cole predictor over stored training examples (kind ``memory``, Prop F.1): yhat =
    sum_j pi_j onehot(y_j), pi = softmax(-(g_j + |z - z_j|^2 / (4t)) / eps). Only the initial data
    g_j (the biases) are learned; attributions point at the examples (``example_ids``, default their
    row numbers). ``forward(x) -> log yhat`` (n, K), for ``nll_loss``."""

    task = "classification"
    kind = "memory"

    def __init__(self, support: Tensor | np.ndarray, labels: Tensor | np.ndarray, n_classes: int, eps: float = 1.0,
                 t: float | None = None, example_ids=None, mean=None, scale=None):
        super().__init__()
        support = torch.as_tensor(np.asarray(support, dtype=np.float64))
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.preprocess = _preprocess(support.shape[1], mean, scale)
        self.body = nn.ModuleList()
        with torch.no_grad():
            Z = self.preprocess(support)
        t = eps / 10.0 if t is None else t
        ids = torch.arange(len(labels)) if example_ids is None else torch.as_tensor(np.asarray(example_ids))
        self.head = GibbsHead(Z / (2 * t), -(Z * Z).sum(-1) / (4 * t), eps, t, "values",
                              V=torch.nn.functional.one_hot(labels, n_classes).to(torch.float64), labels=labels,
                              example_ids=ids)
        self.head.W.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head.log_probabilities(self.preactivations(x))


def _number(state: dict, key: str, default: float | None = None) -> float:
    """``state[key]``, one number (its range is the model's check: :meth:`HJModel.check_parameters`)."""
    value = np.asarray(state[key] if default is None else state.get(key, default))
    if value.size != 1 or not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
        raise ValueError(f"{key} must be one number, got {value.tolist()!r}"[:200])
    return float(value.reshape(-1)[0])


def from_state_dict(state: dict, task: str | None = None) -> _Network:
    """A module from plain tensors: ``W`` (N, d), ``b`` (N,), ``eps``, and either ``groups`` (K, N)
    bool / ``pieces`` (contiguous groups of that size; default one group) for an LSE head, or ``V``
    (N, K) values for a Gibbs average (memory head, with ``labels`` (N,) for classification);
    optional ``t`` (gauge, default 0.5), ``mu`` (d,) and ``A`` (p, d) preprocessing (z = (x - mu) A^T).
    ``task``: default classification when there are several groups (or labels), else regression."""
    complex_ = [k for k in ("W", "b", "mu", "A", "V") if k in state and np.asarray(state[k]).dtype.kind == "c"]
    if complex_:   # the float64 cast would drop the imaginary part
        raise ValueError(f"{complex_[0]} must be real numbers, got {np.asarray(state[complex_[0]]).dtype}")
    W = torch.as_tensor(np.asarray(state["W"], dtype=np.float64))
    b = torch.as_tensor(np.asarray(state["b"], dtype=np.float64))
    eps, t = _number(state, "eps"), _number(state, "t", 0.5)
    if W.ndim != 2 or W.shape[0] == 0:
        raise ValueError(f"W must have shape (N, d) with N >= 1, got {tuple(W.shape)}")
    N, p = W.shape
    if b.shape != (N,):
        raise ValueError(f"b must have shape ({N},), got {tuple(b.shape)}")
    mu = state.get("mu")
    A = state.get("A")
    d = p if A is None else int(np.asarray(A).shape[1])
    pre = Preprocess(torch.zeros(d, dtype=torch.float64) if mu is None else torch.as_tensor(np.asarray(mu, np.float64)),
                     torch.eye(d, dtype=torch.float64) if A is None else torch.as_tensor(np.asarray(A, np.float64)))
    net = _Network()
    net.preprocess, net.body = pre, nn.ModuleList()
    if "V" in state:
        V = torch.as_tensor(np.asarray(state["V"], dtype=np.float64))
        labels = state.get("labels")
        if labels is not None:
            raw = np.asarray(labels)
            if not (np.issubdtype(raw.dtype, np.integer) or (np.issubdtype(raw.dtype, np.floating)
                                                            and bool(np.all(raw == np.round(raw))))):
                raise ValueError(f"labels must be class indices (integers), got {raw.dtype} values such as "
                                 f"{raw.reshape(-1)[:3].tolist()}")   # 0.5 would be read as class 0
        net.task = task or ("classification" if labels is not None else "regression")
        net.kind = "memory"
        net.head = GibbsHead(W, b, eps, t, "values", V=V,
                             labels=None if labels is None else torch.as_tensor(np.asarray(labels, np.int64)),
                             example_ids=torch.arange(N))
        return net
    if "groups" in state:
        mask = torch.as_tensor(np.asarray(state["groups"], dtype=bool))
    else:
        pieces = _number(state, "pieces", N)
        if not (pieces > 0 and pieces == int(pieces)):
            raise ValueError(f"pieces must be a positive integer, got {pieces:g}")
        pieces = int(pieces)
        if N % pieces:
            raise ValueError(f"{N} neurons do not split into groups of {pieces}")
        mask = _contiguous_groups(N // pieces, pieces)
    if mask.shape[1] != N or not bool((mask.sum(0) == 1).all()):
        raise ValueError("groups must be a (K, N) mask putting every neuron in exactly one group")
    net.task = task or ("classification" if mask.shape[0] > 1 else "regression")
    net.kind = "lse"
    net.head = GibbsHead(W, b, eps, t, "groups", mask=mask)
    return net
