"""Training of the three kinds, with the OOD reference measure and split-conformal calibration.

``train(dataset, TrainConfig(kind=...))`` splits the data into train / calibration / test, fits the
preprocessing, trains with Adam at eps = eps* (Thm 8.1) unless overridden (optionally annealing the
temperature from ``anneal`` x eps down to eps), fits the reference measure and the conformal
thresholds on the calibration split, and reports held-out metrics. Seeded and reproducible.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import functional as F
from .data import Dataset
from .errors import CalibrationError, ConfigError, DataError
from .models import GibbsHead, HJModel, LSEGroupLayer, OODReference, Preprocess
from .serving import KINDS

__all__ = ["TrainConfig", "TrainReport", "calibrate", "check_tolerance", "conformal_rows_needed",
           "false_flag_interval", "train"]


@dataclass
class TrainConfig:
    """Settings of one training run (all recorded in the artifact's provenance)."""

    kind: str = "lse"                    #: lse | memory | deep
    eps: float | None = None             #: viscosity; default eps* (Thm 8.1)
    t: float | None = None               #: gauge; memory default eps/10 (diffusion length sqrt(4 t eps) ~ 0.63 h), else 0.5
    preprocess: str = "standardize"      #: standardize | pca | none
    pca_components: int = 32
    pieces: int = 8                      #: neurons per output group (lse head)
    hidden: list[int] = field(default_factory=lambda: [64])  #: deep: units per body layer
    hidden_pieces: int = 4               #: deep: pieces per unit
    head: str = "lse"                    #: deep: lse | memory (Hopf-Cole predictor over learned features)
    memory_size: int = 2000              #: memory: at most this many support points
    support: str = "random"              #: memory: how they are chosen: random | kcenter (a coreset)
    epochs: int = 150
    lr: float = 0.02
    batch_size: int = 128
    weight_decay: float = 0.0
    anneal: float = 1.0                  #: start at anneal * eps and anneal to eps (1 = off)
    seed: int = 0
    test_fraction: float = 0.2
    calibration_fraction: float = 0.2
    alpha: float = 0.05                  #: target false-flag rate of the OOD gate
    #: refuse a calibration split whose deployment's realised false-flag rate is not within alpha
    #: +- this with 95% probability (:func:`false_flag_interval`); None: report the interval only
    alpha_tolerance: float | None = None
    reference_size: int = 1000           #: OOD reference measure size
    exclude_classes: list[int] = field(default_factory=list)  #: drop these classes (OOD studies)
    progress: bool = True

    def __post_init__(self) -> None:
        """Refuse (ConfigError) a setting outside its range before any time is spent training: an eps
        or t <= 0 would give a model no certificate holds for (:meth:`HJModel.check_parameters`),
        found only after every epoch; a count below one, a model with nothing in it; an alpha outside
        (0, 1), a gate that flags everything or nothing (and an artifact no server loads)."""
        for name in ("eps", "t"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        for name in ("lr", "anneal"):
            if not _positive(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not (_real(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not (_integer(self.epochs) and self.epochs >= 0):
            raise ConfigError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        for name in ("pca_components", "pieces", "hidden_pieces", "memory_size", "batch_size", "reference_size"):
            if not (_integer(getattr(self, name)) and getattr(self, name) >= 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (_real(self.alpha) and 0 < self.alpha < 1):
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if not (_integer(self.seed) and self.seed >= 0):
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not all(_integer(units) and units >= 1 for units in self.hidden):
            raise ConfigError(f"hidden must list integers >= 1 (units per body layer), got {self.hidden!r}")


def _real(value) -> bool:
    """A finite real number (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive(value) -> bool:
    return _real(value) and value > 0


@dataclass
class TrainReport:
    """What ``train`` measured on the held-out splits."""

    metrics: dict
    seconds: float
    splits: dict


def _split(n: int, cfg: TrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    for name in ("test_fraction", "calibration_fraction"):
        if not 0 < getattr(cfg, name) < 1:
            raise DataError(f"{name} must be in (0, 1), got {getattr(cfg, name)}")
    idx = rng.permutation(n)
    n_test = int(round(cfg.test_fraction * n))
    n_cal = int(round(cfg.calibration_fraction * n))
    if n - n_test - n_cal < 4 or n_cal < 4:
        raise DataError(f"dataset of {n} rows is too small to split into train/calibration/test")
    return idx[n_test + n_cal:], idx[n_test:n_test + n_cal], idx[:n_test]


def _fit_preprocess(X: np.ndarray, cfg: TrainConfig) -> Preprocess:
    mu = X.mean(0)
    if cfg.preprocess == "none":
        return Preprocess(torch.as_tensor(np.zeros_like(mu)), torch.eye(X.shape[1], dtype=torch.float64))
    sd = Preprocess.safe_scale(X.std(0))   # constant pixels: centred, left unscaled
    A = np.diag(1.0 / sd)
    if cfg.preprocess == "pca":
        Z = (X - mu) / sd
        _, s, vt = np.linalg.svd(Z, full_matrices=False)
        k = min(cfg.pca_components, vt.shape[0])
        A = vt[:k] @ A
    elif cfg.preprocess != "standardize":
        raise ValueError(f"unknown preprocess {cfg.preprocess!r}")
    return Preprocess(torch.as_tensor(mu), torch.as_tensor(A))


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _fit(model: HJModel, X: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, params: list,
         loss_fn, gen: torch.Generator) -> None:
    """Adam over mini-batches with optional temperature annealing (eps from anneal*eps down to eps)."""
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    layers = [*model.body, model.head]
    target_eps = [m.eps for m in layers]
    n = X.shape[0]
    for epoch in _progress(range(cfg.epochs), cfg.progress, f"train {model.kind}"):
        frac = epoch / max(cfg.epochs - 1, 1)
        scale = cfg.anneal ** (1.0 - frac)
        for m, e in zip(layers, target_eps):
            m.eps = e * scale
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            sel = perm[start:start + cfg.batch_size]
            opt.zero_grad()
            loss = loss_fn(X[sel], y[sel], sel)
            loss.backward()
            opt.step()
    for m, e in zip(layers, target_eps):
        m.eps = e


def train(data: Dataset, cfg: TrainConfig | None = None) -> tuple[HJModel, TrainReport]:
    """Train a model of ``cfg.kind`` on ``data`` and calibrate it; returns (model, report)."""
    cfg = cfg or TrainConfig()
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown kind {cfg.kind!r}")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    X_all, y_all = data.X, data.y
    class_names = list(data.class_names)
    if cfg.exclude_classes:
        if data.task != "classification":
            raise ValueError("exclude_classes needs a classification dataset")
        unknown = [k for k in cfg.exclude_classes
                   if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < len(class_names)]
        if unknown:   # an exclusion that excludes nothing would be dropped unread
            raise ConfigError(f"exclude_classes must list class indices in [0, {len(class_names)}), got {unknown!r}")
        keep = ~np.isin(y_all, cfg.exclude_classes)
        kept = [k for k in range(len(class_names)) if k not in cfg.exclude_classes]
        remap = {old: new for new, old in enumerate(kept)}
        X_all = X_all[keep]
        y_all = np.array([remap[v] for v in y_all[keep]], dtype=np.int64)
        class_names = [class_names[k] for k in kept]
    if data.task == "classification" and len(np.unique(y_all)) < 2:
        raise DataError(f"a classifier needs rows of two classes or more, got {len(np.unique(y_all))} "
                        f"({', '.join(map(str, class_names[:5]))})")
    tr, ca, te = _split(len(X_all), cfg, rng)
    # the gate's requirements on the calibration split, before any training time is spent on it
    _check_alpha(cfg.alpha, len(ca))
    check_tolerance(cfg.alpha, cfg.alpha_tolerance, len(ca), total=len(X_all))
    pre = _fit_preprocess(X_all[tr], cfg)
    X = torch.as_tensor(X_all, dtype=torch.float64)
    Z = pre(X)
    task = data.task
    if task == "classification":
        K = len(class_names)
        y = torch.as_tensor(y_all, dtype=torch.long)
    else:
        Y = np.asarray(y_all, dtype=np.float64).reshape(len(y_all), -1)
        K = Y.shape[1]
        y_mean, y_std = Y[tr].mean(0), Y[tr].std(0) + 1e-12
        y = torch.as_tensor((Y - y_mean) / y_std)
    eps = cfg.eps if cfg.eps is not None else F.eps_star(Z[tr])
    body: list[LSEGroupLayer] = []
    d_in = Z.shape[1]
    for units in (cfg.hidden if cfg.kind == "deep" else []):
        M = units * cfg.hidden_pieces
        W = torch.randn(M, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
        mask = torch.zeros(units, M, dtype=torch.bool)
        for u in range(units):
            mask[u, u * cfg.hidden_pieces:(u + 1) * cfg.hidden_pieces] = True
        body.append(LSEGroupLayer(W, torch.zeros(M, dtype=torch.float64), mask, eps if not body else 1.0))
        d_in = units
    tr_t = torch.as_tensor(tr)

    # leave-one-out (a support point may not explain itself) and a memory head's fixed rows by group
    loo = {"pos_of": None, "rows": None}
    if cfg.kind == "memory":
        supp = tr_t[_support(cfg, Z[tr_t], y[tr_t] if task == "classification" else None, gen)]
        head = _memory_head(Z[supp], y[supp], supp, K, task, eps, cfg.t)
        params = [head.b]
        loo["pos_of"], loo["rows"] = _positions(supp, len(X_all)), _fixed_rows(head)
    else:
        t = cfg.t if cfg.t is not None else 0.5
        N = K * cfg.pieces
        Wh = torch.randn(N, d_in, generator=gen, dtype=torch.float64) * (0.1 / math.sqrt(d_in))
        mask = torch.zeros(K, N, dtype=torch.bool)
        for k in range(K):
            mask[k, k * cfg.pieces:(k + 1) * cfg.pieces] = True
        head = GibbsHead(Wh, torch.zeros(N, dtype=torch.float64), eps, t, "groups", mask=mask)
        params = [head.W, head.b] + [p for layer in body for p in (layer.W, layer.b)]

    ref = OODReference(points=torch.zeros(1, d_in, dtype=torch.float64), t=1.0, eps=1.0, alpha=cfg.alpha)
    meta = {"class_names": class_names, "feature_names": data.feature_names}
    model = HJModel(cfg.kind, task, pre, body, head, ref, meta, constants=False)   # refreshed once trained

    def loss_fn(xb, yb, sel):
        head, pos_of = model.head, loo["pos_of"]
        positions = None if pos_of is None else pos_of[tr_t[sel]]
        if task == "classification" and head.groups is not None:
            # by class group, with the loss's closed-form gradient: no (n, N) tensor or its scatter
            a_g = head.preactivations_by_group(model.features(xb), loo["rows"])
            leave = None if positions is None else torch.where(
                positions >= 0, head.groups.place[positions.clamp_min(0)], head.groups.slots.numel())
            return F.grouped_nll(a_g, yb, head.eps, leave)
        a = head.preactivations(model.features(xb))
        if positions is not None:
            a = _leave_out(a, positions)
        if task == "classification":
            return torch.nn.functional.nll_loss(head.log_probabilities(a), yb)
        return torch.nn.functional.mse_loss(head.outputs(a), yb)

    if cfg.epochs > 0:
        _fit(model, X[tr], y[tr], cfg if cfg.kind != "memory" else _memory_cfg(cfg), params, loss_fn, gen)
    if cfg.kind == "deep" and cfg.head == "memory":
        # deep body + memory head: the Hopf-Cole predictor over the training examples' learned features
        with torch.no_grad():
            H_tr = model.features(X[tr_t]) if cfg.support == "kcenter" else None
        supp = tr_t[_support(cfg, H_tr, y[tr_t] if task == "classification" else None, gen, len(tr_t))]
        with torch.no_grad():
            H = model.features(X[supp])
        eps_m = cfg.eps if cfg.eps is not None else F.eps_star(H)
        model.head = _memory_head(H, y[supp], supp, K, task, eps_m, None)
        for layer in model.body:
            layer.requires_grad_(False)
        loo["pos_of"], loo["rows"] = _positions(supp, len(X_all)), _fixed_rows(model.head)
        _fit(model, X[tr], y[tr], _memory_cfg(cfg), [model.head.b], loss_fn, gen)
    with torch.no_grad():
        if task == "regression":
            _fold_target_scale(model, y_mean, y_std)
    try:
        model.refresh()   # HJModel.check_parameters: what the trained weights are
    except ValueError as e:
        raise ConfigError(f"training diverged ({e}): a smaller lr than {cfg.lr} may train") from e
    calibrate(model, X[tr], X[ca], cfg)
    metrics = evaluate_metrics(model, X[te], y_all[te], task)
    metrics["ood_false_flag_rate_test"] = float(model.served(X[te], ("ood_flag",))["ood_flag"].double().mean())
    metrics["alpha"] = cfg.alpha
    # where this deployment's realised false-flag rate lies (95% of calibration draws)
    metrics["ood_false_flag_rate_95"] = list(false_flag_interval(cfg.alpha, len(ca))[1:])
    model.meta["provenance"] = {
        "dataset": data.name, "data_sha256": data.sha256, "train_config": asdict(cfg),
        "n_train": int(len(tr)), "n_calibration": int(len(ca)), "n_test": int(len(te)),
        "torch": torch.__version__,
    }
    model.meta["metrics"] = metrics
    report = TrainReport(metrics=metrics, seconds=time.time() - t0,
                         splits={"train": tr.tolist(), "calibration": ca.tolist(), "test": te.tolist()})
    return model, report


def _memory_head(Hs: torch.Tensor, ys: torch.Tensor, supp: torch.Tensor, K: int, task: str, eps: float,
                 t: float | None) -> GibbsHead:
    """Hopf-Cole predictor over support points Hs (Prop F.1): w_j = y_j/(2t), b_j = -|y_j|^2/(4t) - g_j
    with g_j = 0 to start (trained); values one-hot labels or targets. Default gauge t = eps/10
    (diffusion length sqrt(4 t eps) ~ 0.63 h)."""
    t = t if t is not None else eps / 10.0
    if task == "classification":
        V, labels = torch.nn.functional.one_hot(ys, K).to(torch.float64), ys
    else:
        V, labels = ys.clone(), None
    W, b = Hs / (2 * t), -(Hs * Hs).sum(-1) / (4 * t)
    head = GibbsHead(W, b, eps, t, "values", V=V, labels=labels, example_ids=supp)
    head.W.requires_grad_(False)
    return head


def _positions(supp: torch.Tensor, n: int) -> torch.Tensor:
    """Row index -> position among the support points (-1 if not one)."""
    pos_of = torch.full((n,), -1, dtype=torch.long)
    pos_of[supp] = torch.arange(len(supp))
    return pos_of


def _fixed_rows(head: GibbsHead) -> torch.Tensor | None:
    """A memory head's rows by class group (its W does not train), for the training loss."""
    return None if head.groups is None else head.groups.rows(head.W.detach())


def _memory_cfg(cfg: TrainConfig) -> TrainConfig:
    """Memory models only learn their initial data g_j: fewer epochs suffice."""
    from dataclasses import replace

    return replace(cfg, epochs=min(cfg.epochs, 30), lr=min(cfg.lr, 0.05), anneal=1.0)


def _fold_target_scale(model: HJModel, mean: np.ndarray, std: np.ndarray) -> None:
    """Fold the regression target scaling y = std * f + mean into the head, exactly.

    lse: std * eps LSE(a/eps) + mean = eps' LSE(a'/eps') with eps' = std eps, a' = std a + mean
    (one output, K = 1; K > 1 needs per-output eps, so only K = 1 is supported). memory: V' = std V + mean."""
    head = model.head
    if head.mode == "values":
        head.V.mul_(torch.as_tensor(std)).add_(torch.as_tensor(mean))
        return
    if len(std) != 1:
        raise ValueError("lse regression supports one target (K = 1)")
    s, m = float(std[0]), float(mean[0])
    head.W.mul_(s)
    head.b.mul_(s).add_(m)
    head.eps *= s


def _support(cfg: TrainConfig, H: torch.Tensor | None, labels: torch.Tensor | None, gen: torch.Generator,
             n: int | None = None) -> torch.Tensor:
    """Positions of the memory head's support points among n candidate rows (features H (n, p)):
    ``random``: ``memory_size`` of them at random; ``kcenter``: a coreset -- per class, a budget
    proportional to its share, filled by greedy k-center selection (the row nearest the class mean,
    then repeatedly the row farthest from those chosen), so the chosen points cover each class's
    rows with the smallest radius greedy selection finds (within 2x of the optimal covering)."""
    if cfg.support not in ("random", "kcenter"):
        raise ValueError(f"unknown support selection {cfg.support!r} (random | kcenter)")
    n = H.shape[0] if H is not None else int(n)
    if cfg.support == "random" or cfg.memory_size >= n:
        return torch.randperm(n, generator=gen)[:cfg.memory_size]
    groups = [torch.arange(n)] if labels is None else [
        (labels == c).nonzero().squeeze(1) for c in torch.unique(labels)]
    sizes = [len(idx) for idx in groups]
    share = [cfg.memory_size * m / n for m in sizes]
    budget = [max(1, min(m, int(sh))) for m, sh in zip(sizes, share)]
    total = max(cfg.memory_size, len(groups))          # every class keeps at least one point
    while sum(budget) < total:                         # largest remainders first
        k = max((i for i in range(len(groups)) if budget[i] < sizes[i]), key=lambda i: share[i] - budget[i])
        budget[k] += 1
    while sum(budget) > total:
        budget[max(range(len(groups)), key=lambda i: budget[i])] -= 1
    return torch.cat([idx[kcenter(H[idx], b)] for idx, b in zip(groups, budget)])


def kcenter(H: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy k-center: ``size`` row positions of H (n, p), starting at the row nearest the mean and
    adding the row farthest from those chosen; O(size n p) time, O(n) memory. Its covering radius
    max_i min_j |H_i - H_j| is at most twice the optimal one."""
    n = H.shape[0]
    if size >= n:
        return torch.arange(n)
    first = int(((H - H.mean(0)) ** 2).sum(-1).argmin())
    picks = [first]
    dist = ((H - H[first]) ** 2).sum(-1)
    for _ in range(size - 1):
        j = int(dist.argmax())
        picks.append(j)
        dist = torch.minimum(dist, ((H - H[j]) ** 2).sum(-1))
    return torch.tensor(picks)


def calibrate(model: HJModel, X_train: torch.Tensor, X_cal: torch.Tensor, cfg: TrainConfig) -> None:
    """Fit the OOD reference measure and the gate's calibration (DESIGN section 4).

    * reference measure: up to ``reference_size`` training points' features, each labelled with the
      class the model assigns it (classification), and the gauge t that maximises their
      leave-one-out likelihood (:func:`functional.likelihood_gauge`, a grid of ``GAUGE_GRID`` times
      eps/4);
    * normaliser: u of every training row against its decided class, leave-one-out (a point of the
      reference measure has its own term removed: exact, O(M) per row);
    * conformal statistics: the statistic T of every calibration row as a served graph reads it
      (:func:`functional.served_input`: in float32), so that the served statistic is the same
      function of the same point.

    The gate has one component, u: with it, T is a strictly increasing function of u, so the served
    p-value is u's conformal rank among the calibration rows, valid for exchangeable inputs. (The
    ambiguity component of earlier versions needed half the calibration split for its own
    normaliser and lowered the AUROC on covariate shifts; ``eval/OOD_BATTERY.md`` has the
    measurements.) Raises CalibrationError (a ValueError) when alpha is below the smallest p-value
    the calibration rows can produce: such a gate could never fire."""
    n_cal = int(X_cal.shape[0])
    _check_alpha(cfg.alpha, n_cal)
    check_tolerance(cfg.alpha, cfg.alpha_tolerance, n_cal)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        H_tr, classes = _features_and_classes(model, X_train)
        chosen = torch.randperm(H_tr.shape[0], generator=gen)[:cfg.reference_size]
        pts = H_tr[chosen]
        labels = classes[chosen] if classes is not None else torch.zeros(0, dtype=torch.long)
        h = F.eps_star(pts)
        t = F.likelihood_gauge(pts, labels if classes is not None else None, h, h / 4.0 * GAUGE_GRID)
        model.reference = OODReference(points=pts.clone(), t=t, eps=h, alpha=cfg.alpha, labels=labels.clone())
        ref = model.reference
        own = torch.full((H_tr.shape[0],), -1, dtype=torch.long)
        own[chosen] = torch.arange(len(chosen))
        loo_u = [model.ood_unsupported(H_tr[i:i + 2048], None if classes is None else classes[i:i + 2048],
                                       own[i:i + 2048]) for i in range(0, H_tr.shape[0], 2048)]
        ref.norm_unsupported = torch.sort(torch.cat(loo_u)).values
        X_cal = F.served_input(X_cal)
        T = [model.combined_statistic(*model.decisions(X_cal[rows])) for rows in model.row_blocks(n_cal)]
        ref.combined = torch.sort(torch.cat(T)).values
    _check_gate(model, cfg.alpha)


def _check_gate(model: HJModel, alpha: float) -> None:
    """Refuse (CalibrationError) a calibrated gate that is not one: a statistic that is not a number
    on some calibration row (it would count nothing and flag every input like it), or one whose
    calibration rows already reach the largest statistic any input can have, so that no input could
    ever be flagged -- what reference rows that are too few or too alike, or far from the
    calibration rows, leave (e.g. one reference row: its quartiles coincide, and every calibration
    row lies beyond it at the same level)."""
    ref = model.reference
    T = ref.combined
    bad = int((~torch.isfinite(T)).sum())
    if bad:
        raise CalibrationError(f"the OOD statistic is not a finite number on {bad} of {len(T)} calibration rows")
    # the served p-value of an input whose unsupported score is beyond every other (u = inf)
    p = float(model._conformal(torch.tensor([math.inf], dtype=T.dtype, device=T.device), None)[0][0])
    if p > alpha:
        raise CalibrationError(
            f"the OOD gate could never fire at alpha={alpha}: {int((T >= T.max()).sum())} of its {len(T)} calibration "
            f"rows already reach the largest statistic an input can have (p-value {p:.3g} even for the most "
            f"unusual input); the reference rows ({len(ref.points)}, the typical rows the model was trained on) "
            "are too few, too alike or too far from the calibration rows")


def _features_and_classes(model: HJModel, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head features (n, p) and decided classes (n,) (None: regression)."""
    H, log_p = model.decisions(X)
    return H, (None if log_p is None else log_p.argmax(-1))


#: multiples of eps/4 (the gauge of earlier versions) that :func:`calibrate` searches for t
GAUGE_GRID = torch.logspace(-4, 1, 41, dtype=torch.float64)


#: probability of the false-flag interval reported for a deployment
FALSE_FLAG_LEVEL = 0.95


def false_flag_interval(alpha: float, n: int, level: float = FALSE_FLAG_LEVEL) -> tuple[float, float, float]:
    """The false-flag rate one deployment realises: (mean, low, high), the central ``level``
    interval over the draw of its ``n`` conformal calibration rows.

    The gate flags p <= alpha, p = (1 + #{calibration T >= T(x)}) / (1 + n): it flags exactly the
    inputs whose T exceeds the k-th largest calibration statistic, k = floor(alpha (n + 1)). For
    exchangeable in-distribution rows (continuous T) the probability mass above that order statistic
    is Beta(k, n + 1 - k) distributed: its mean k / (n + 1) <= alpha is the split-conformal guarantee,
    its spread is how far one deployment's alert volume can land from it. sd ~ sqrt(alpha / n):
    keeping 95% of deployments within +-1.5 pp takes ~900 rows at alpha = 0.05 and ~220 at 0.01
    (:func:`conformal_rows_needed`)."""
    from scipy.stats import beta

    k = math.floor(alpha * (n + 1) + 1e-9)
    if k < 1:
        return 0.0, 0.0, 0.0
    tail = (1.0 - level) / 2.0
    dist = beta(k, n + 1 - k)
    return k / (n + 1), float(dist.ppf(tail)), float(dist.ppf(1.0 - tail))


def conformal_rows_needed(alpha: float, tolerance: float, level: float = FALSE_FLAG_LEVEL) -> int | None:
    """The fewest conformal rows n such that every n' >= n keeps one deployment's false-flag
    interval (:func:`false_flag_interval`) inside alpha +- ``tolerance`` (checked up to 16 x the
    normal approximation's alpha (1 - alpha) (3 / tolerance)^2 rows; None: not below that)."""
    from scipy.stats import beta

    limit = max(1000, int(16 * alpha * (1 - alpha) * (3 / tolerance) ** 2))
    n = np.arange(1, limit + 1)
    k = np.floor(alpha * (n + 1) + 1e-9)
    ok = k >= 1
    tail = (1.0 - level) / 2.0
    a, b = np.maximum(k, 1), np.maximum(n + 1 - k, 1)
    ok &= beta.ppf(tail, a, b) >= alpha - tolerance
    ok &= beta.ppf(1.0 - tail, a, b) <= alpha + tolerance
    bad = np.flatnonzero(~ok)
    if len(bad) == 0:
        return 1
    return None if bad[-1] + 1 >= limit else int(n[bad[-1] + 1])


def check_tolerance(alpha: float, tolerance: float | None, n: int, total: int | None = None) -> None:
    """Refuse ``n`` conformal rows too few for one deployment's false-flag rate to lie within alpha
    +- ``tolerance`` (None: no requirement); ``total``: the rows training splits (the message then
    names the calibration fraction that would do)."""
    if tolerance is None:
        return
    if not 0 < tolerance < 1:
        raise CalibrationError(f"alpha_tolerance must be in (0, 1), got {tolerance}")
    _, lo, hi = false_flag_interval(alpha, n)
    if lo >= alpha - tolerance and hi <= alpha + tolerance:
        return
    need = conformal_rows_needed(alpha, tolerance)
    fraction = (f" (calibration_fraction, --calibration-fraction, >= {math.ceil(100 * need / total) / 100:.2f} of "
                f"these {total} rows)" if need and total else "")
    raise CalibrationError(
        f"with {n} conformal calibration rows one deployment's false-flag rate at alpha={alpha} lies in "
        f"[{lo:.4f}, {hi:.4f}] ({FALSE_FLAG_LEVEL:.0%} of calibration draws), not within +-{tolerance}; that needs "
        + (f"at least {need} conformal rows{fraction}" if need else "more rows than can be checked")
        + ": raise calibration_fraction or calibrate on more in-distribution data (--calibration)")


def _check_alpha(alpha: float, n: int) -> None:
    if alpha * (1 + n) < 1.0:
        raise CalibrationError(f"alpha={alpha} cannot be reached with {n} conformal calibration rows (the smallest "
                         f"p-value is 1/{n + 1}); use alpha >= {1 / (n + 1):.4g} or more calibration data "
                         "(calibration_fraction)")


def _leave_out(a: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pre-activations with row i's own support point (``positions[i]``, -1: none) removed: a
    support point may not explain itself (training loss, memory heads' ambiguity normaliser)."""
    hit = (positions >= 0).nonzero().squeeze(-1)
    a = a.clone()
    a[hit, positions[hit]] = -math.inf
    return a


def evaluate_metrics(model: HJModel, X: torch.Tensor, y: np.ndarray, task: str) -> dict:
    """Held-out accuracy (classification) or RMSE and R^2 (regression)."""
    with torch.no_grad():
        pred = model.predict(X).numpy()
    if task == "classification":
        return {"accuracy": float((pred == y).mean()), "n": int(len(y))}
    Y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    rmse = float(np.sqrt(((pred - Y) ** 2).mean()))
    r2 = float(1.0 - ((pred - Y) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum())
    return {"rmse": rmse, "r2": r2, "n": int(len(y))}
