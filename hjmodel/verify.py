"""``hjmodel verify``: check an artifact's math and its two formats against each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import functional as F
from .artifact import ONNX_FILE, load_model, verify_checksums
from .serving import outputs_for

__all__ = ["DEMO_DATA", "OOD_OUTPUTS", "calibration_ties", "outputs_agree", "parity_inputs", "served_outputs",
           "served_radius_check", "tied_p_values", "verify"]

#: The demo models and the dataset each was trained on (``hjmodel.demo``).
DEMO_DATA = {"digits_lse": "digits", "digits_memory": "digits", "digits_deep": "digits",
             "breast_cancer_lse": "breast_cancer", "diabetes_lse": "diabetes"}
#: Outputs that count calibration scores (rank p-values): the same on every runtime, also on rows that
#: tie a stored calibration score (:func:`calibration_ties`), which count it whichever way each runtime
#: rounded (``models._rank_p``).
OOD_OUTPUTS = ("ood_p_value", "ood_flag", "ood_component", "hallucination_flag")


def served_outputs(directory: str | Path, x32, tau: float = 0.1, threads: int = 1) -> tuple[dict, dict]:
    """(torch ServingModule outputs, ONNX graph outputs (empty without model.onnx)) for float32 rows,
    both as the server would compute them."""
    from .artifact import load_serving_module
    from .serving import onnx_feeds, open_session

    directory = Path(directory)
    x32 = torch.as_tensor(np.asarray(x32, dtype=np.float32))
    with torch.no_grad():
        tau_t = torch.full((len(x32), 1), tau, dtype=torch.float64)
        torch_out = {k: v.numpy() for k, v in load_serving_module(directory)(x32, tau_t).items()}
    onnx_out: dict = {}
    if (directory / ONNX_FILE).exists():
        sess = open_session(directory / ONNX_FILE, threads=threads)
        onnx_out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, onnx_feeds(sess, x32.numpy(), tau))))
    return torch_out, onnx_out


def calibration_ties(model, x32: np.ndarray) -> np.ndarray:
    """Rows whose OOD component scores equal (to float64 rounding) a stored normaliser score, or whose
    combined statistic equals a stored conformal statistic (calibration points, sent again): ties,
    which the rank p-values count up to rounding (``models._rank_p``); before its margins, the two
    runtimes' last-bit differences decided them."""
    ref = model.reference
    ev = model.evaluate(torch.from_numpy(np.asarray(x32)).double(), outputs=("ood_score",))
    T = model.combined_statistic(ev.h, ev.log_probs)

    def tie(score: torch.Tensor, table: torch.Tensor) -> np.ndarray:
        if score.numel() == 0 or table.numel() == 0:
            return np.zeros(len(x32), dtype=bool)
        s, t = score.numpy()[:, None], table.numpy()[None, :]
        return (np.abs(s - t) <= 1e-12 * np.maximum(1.0, np.abs(t))).any(1)

    ambiguity = ev.ambiguity if ev.ambiguity is not None else torch.zeros(0)
    return tie(ev["ood_score"], ref.norm_unsupported) | tie(ambiguity, ref.norm_ambiguous) | tie(T, ref.combined)



#: How near (of 1 + |T|) a stored conformal statistic must lie to a row's T to count as its tie in
#: :func:`tied_p_values`: far above float64's rounding of T, below the margin the served graph counts
#: ties within (``models.STATISTIC_TIE_MARGIN``, 2^-40), so the reference never asks for more.
REFERENCE_TIE = 2.0 ** -44


def tied_p_values(model, x) -> tuple[np.ndarray, np.ndarray]:
    """The reference a served ``ood_p_value`` must not fall below: the float64 model's conformal
    p-value of every row with each tie to a stored calibration statistic counted (one within
    ``REFERENCE_TIE``), and which rows tie one (a calibration row sent again does). (n, d) ->
    (p (n,), tied (n,) bool)."""
    x = torch.as_tensor(np.asarray(x)).to(torch.float64)
    with torch.no_grad():
        T = torch.cat([model.combined_statistic(*model.decisions(x[r])) for r in model.row_blocks(len(x))])
    cal = model.reference.combined
    reach = REFERENCE_TIE * (1.0 + T.abs())
    counted = (1.0 + (cal.unsqueeze(0) >= (T - reach).unsqueeze(1)).sum(1).double()) / (1.0 + cal.numel())
    tied = ((cal.unsqueeze(0) - T.unsqueeze(1)).abs() <= reach.unsqueeze(1)).any(1)
    return counted.numpy(), tied.numpy()

def parity_inputs(name: str, n: int) -> np.ndarray:
    """n rows for demo model ``name``: dataset rows, every other one with Gaussian noise of 0.5 x the
    feature std, as float32."""
    from .data import load_dataset

    data = load_dataset(DEMO_DATA[name])
    rng = np.random.default_rng(n)
    X = data.X[rng.integers(0, len(data.X), n)]
    noisy = (np.arange(n) % 2 == 1)[:, None]
    X = X + noisy * rng.normal(size=X.shape) * 0.5 * data.X.std(0)
    return X.astype(np.float32)


def _inputs(model, n: int, seed: int) -> torch.Tensor:
    """Random raw inputs around the data: mu + A^+ z with z ~ N(0, I) in feature space."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.preprocess.A.shape[0], generator=gen, dtype=torch.float64)
    return model.preprocess.mu + z @ torch.linalg.pinv(model.preprocess.A).T


def outputs_agree(got, want) -> bool:
    """One served output of two runtimes (or devices) the same: float outputs within rtol 1e-4 / atol
    1e-5 (NaN where NaN); discrete ones (classes, flags, indices) differing on at most 2% of the rows,
    where a float64 comparison sits on a tie."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return False
    if np.issubdtype(want.dtype, np.floating):
        return bool(np.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True))
    rows = (got != want).reshape(len(want), -1).any(axis=1) if want.ndim else np.array([got != want])
    return float(rows.mean()) <= 0.02


def served_radius_check(model, x32: torch.Tensor, served: dict, tau: float = 0.1) -> dict:
    """Every served ``certified_radius`` of float32 rows ``x32`` at most the float64 model's own or
    re-proven by it (:meth:`HJModel.evaluate`'s ``prove``; a searched radius is proven by each
    runtime's own arithmetic and may lie a little above another's). Rows whose served decision differs
    from the float64 one (ties within rounding) are left out. Returns the counts: ``above_float64``,
    ``re_proven``, ``unproven`` (must be 0) and the largest relative excess."""
    x = torch.as_tensor(x32).to(torch.float64)
    r = np.asarray(served["certified_radius"], dtype=np.float64)
    with torch.no_grad():
        ev = model.evaluate(x, tau=tau, outputs=("prediction", "certified_radius"))
    r64 = ev["certified_radius"].numpy()
    same = (np.asarray(served["prediction"]) == ev["prediction"].numpy() if model.task == "classification"
            else np.ones(len(r), dtype=bool))
    above = (r > r64) & same
    proven = np.zeros(0)
    if above.any():
        with torch.no_grad():
            proven = model.evaluate(x[torch.from_numpy(above)], tau=tau, outputs=("certified_radius",),
                                    prove=torch.from_numpy(r[above]))["certified_radius"].numpy()
    excess = np.where(above, r / np.where(r64 > 0, r64, 1.0) - 1.0, 0.0)
    return {"rows": len(r), "decision_differs": int((~same).sum()), "above_float64": int(above.sum()),
            "re_proven": int((proven > 0).sum()), "unproven": int((proven == 0).sum()),
            "largest_excess": float(excess.max(initial=0.0))}


def verify(path: str | Path, n: int = 256, seed: int = 0) -> dict:
    """Theorem 4.1 identity of the head (u = |h|^2/(4t) - f), torch/ONNX parity on every output, and
    every certified radius the ONNX graph serves proven in float64 (:func:`served_radius_check`)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    checked = verify_checksums(directory)   # raises ArtifactError on a file that changed
    model = load_model(path, verify=False)
    x = _inputs(model, n, seed)
    head = model.head
    with torch.no_grad():
        h = model.features(x)
        f = F.lse_layer(h, head.W, head.b, head.eps)
        y, g = F.hj_reading(head.W, head.b, head.t)
        u = F.hopf_cole_value(h, y, g, head.t, head.eps)
        scale = 1.0 + (h * h).sum(-1) / (4 * head.t) + f.abs()
        thm41 = float(((u - ((h * h).sum(-1) / (4 * head.t) - f)).abs() / scale).max())
    report: dict = {"artifact": str(path), "n": n, "checksums": "verified" if checked else "no manifest",
                    "theorem_4_1_max_rel_error": thm41,
                    "theorem_4_1_ok": thm41 < 1e-10}
    if (directory / ONNX_FILE).exists():
        x32 = x.to(torch.float32)
        want, got = served_outputs(directory, x32, 0.1)
        parity = {}
        for spec in outputs_for(model.task):
            parity[spec.name] = outputs_agree(got[spec.name], want[spec.name])
        report["onnx_parity"] = parity
        report["onnx_parity_ok"] = all(parity.values())
        report["onnx_radius"] = served_radius_check(model, x32, got)
        report["onnx_radius_ok"] = report["onnx_radius"]["unproven"] == 0
    report["ok"] = (report["theorem_4_1_ok"] and report.get("onnx_parity_ok", True)
                    and report.get("onnx_radius_ok", True))
    return report
