"""``hjmodel verify``: check an artifact's math and its two formats against each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import functional as F
from .artifact import ONNX_FILE, ServingModule, load_model
from .serving import outputs_for

__all__ = ["verify"]


def _inputs(model, n: int, seed: int) -> torch.Tensor:
    """Random raw inputs around the data: mu + A^+ z with z ~ N(0, I) in feature space."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.preprocess.A.shape[0], generator=gen, dtype=torch.float64)
    return model.preprocess.mu + z @ torch.linalg.pinv(model.preprocess.A).T


def verify(path: str | Path, n: int = 256, seed: int = 0) -> dict:
    """Theorem 4.1 identity of the head (u = |h|^2/(4t) - f) and torch/ONNX parity on every output."""
    path = Path(path)
    model = load_model(path)
    x = _inputs(model, n, seed)
    head = model.head
    with torch.no_grad():
        h = model.features(x)
        f = F.lse_layer(h, head.W, head.b, head.eps)
        y, g = F.hj_reading(head.W, head.b, head.t)
        u = F.hopf_cole_value(h, y, g, head.t, head.eps)
        scale = 1.0 + (h * h).sum(-1) / (4 * head.t) + f.abs()
        thm41 = float(((u - ((h * h).sum(-1) / (4 * head.t) - f)).abs() / scale).max())
    report: dict = {"artifact": str(path), "n": n, "theorem_4_1_max_rel_error": thm41,
                    "theorem_4_1_ok": thm41 < 1e-10}
    onnx_path = path / ONNX_FILE if path.is_dir() else path.parent / ONNX_FILE
    if onnx_path.exists():
        import onnxruntime as ort

        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        xf = x.to(torch.float32)
        tau = np.full((n, 1), 0.1)
        feed = {i.name: (xf.numpy() if i.name == "input" else tau) for i in sess.get_inputs()}
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        want = {k: v.numpy() for k, v in ServingModule(model)(xf, torch.as_tensor(tau)).items()}
        parity = {}
        for spec in outputs_for(model.task):
            a, b = got[spec.name], want[spec.name]
            if spec.datatype == "FP32":
                ok = bool(np.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True))
            else:
                # discrete outputs may differ only where a float64 comparison sits on a tie
                ok = float((a != b).mean()) <= 0.02
            parity[spec.name] = ok
        report["onnx_parity"] = parity
        report["onnx_parity_ok"] = all(parity.values())
    report["ok"] = report["theorem_4_1_ok"] and report.get("onnx_parity_ok", True)
    return report
