"""A tiny hand-made artifact that honours the serving contract (``hjmodel.serving``).

It is *not* hjmodel's math: it only produces every contract output with the right name, datatype
and shape, so the service can be tested before (and independently of) hjmodel's real models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from hjmodel import serving

D = 4
CLASSES = ["alpha", "beta", "gamma"]
PER_CLASS = 6  # neurons per output group: N = 6 K >= TOP_K_MAX


class TinyContractModel(nn.Module):
    """``forward(input (B, d) float32, tau (B, 1) float64) -> tuple`` in ``outputs_for(task)`` order
    (``tau`` of shape ``(1,)`` in a legacy export: one tolerance for the whole batch)."""

    def __init__(self, task: str, seed: int = 0, n_outputs: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.task = task
        self.k = n_outputs or (len(CLASSES) if task == "classification" else 2)
        n = self.k * PER_CLASS
        self.W = nn.Parameter(torch.randn(n, D, generator=g), requires_grad=False)
        self.b = nn.Parameter(torch.randn(n, generator=g), requires_grad=False)
        self.Y = nn.Parameter(torch.randn(8, D, generator=g), requires_grad=False)
        self.eps = 0.5

    def forward(self, x: torch.Tensor, tau: torch.Tensor):
        B = x.shape[0]
        a = x @ self.W.T + self.b  # (B, N)
        groups = a.reshape(B, self.k, PER_CLASS)
        s = self.eps * torch.logsumexp(groups / self.eps, dim=2)  # (B, K)
        pi = torch.softmax(a / self.eps, dim=1)
        weight, index = torch.topk(pi, serving.TOP_K_MAX, dim=1)
        entropy = -(pi * torch.log(pi + 1e-12)).sum(dim=1)
        top2 = torch.topk(a, 2, dim=1).values
        gap = (top2[:, 0] - top2[:, 1]) / self.eps
        dist = ((x[:, None, :] - self.Y[None]) ** 2).sum(-1)
        ood = -self.eps * torch.logsumexp(-dist / self.eps, dim=1)
        flag = ood > 3.0
        p_value = torch.exp(-torch.clamp(ood, min=0.0))
        component = (gap < 1.0).to(torch.int64)
        hallucination = flag & (gap > 2.0)
        saliency = pi @ self.W
        sens = weight * 0.5
        scale = self.W.norm(dim=1).max()
        if self.task == "classification":
            probs = torch.softmax(s / self.eps, dim=1)
            top = torch.topk(s, 2, dim=1).values
            radius = (top[:, 0] - top[:, 1]) / (2 * scale)
            pred = torch.argmax(s, dim=1)
            first = (pred, probs)
        else:
            radius = tau.reshape(-1).to(torch.float32) / scale + 0 * gap
            first = (s,)
        return (*first, radius, ood, flag, p_value, component, hallucination, gap, entropy,
                index, weight, sens, saliency)


def spec_for(task: str, model: TinyContractModel) -> dict:
    spec = {
        "format": serving.SPEC_FORMAT, "kind": "lse", "task": task, "n_features": D,
        "n_outputs": model.k, "eps": model.eps, "t": 1.0, "top_k_max": serving.TOP_K_MAX,
        "calibration": {"alpha": 0.05}, "provenance": {"source": "tests/service/tiny_model.py"},
        "metrics": {}, "structure": {"note": "hand-made test graph, not rebuildable by hjmodel"},
        serving.RADIUS_MARK: True,   # a contract fixture: its radius is no certificate either way
    }
    if task == "classification":
        spec["class_names"] = list(CLASSES)
    return spec


def export(version_dir: Path, task: str = "classification", seed: int = 0, batched_tau: bool = True) -> dict:
    """Write ``version_dir/model.onnx`` (with the spec in its metadata); returns the spec.
    ``batched_tau=False`` writes the legacy graph whose tau is one value ``(1,)`` for the batch."""
    version_dir = Path(version_dir)
    version_dir.mkdir(parents=True, exist_ok=True)
    model = TinyContractModel(task, seed).eval()
    names = list(serving.output_names(task))
    path = version_dir / "model.onnx"
    x = torch.zeros(2, D)
    tau = torch.full((2, 1), 0.1, dtype=torch.float64) if batched_tau else torch.tensor([0.1], dtype=torch.float64)
    axes = {"input": {0: "batch"}, **({"tau": {0: "batch"}} if batched_tau else {}), **{n: {0: "batch"} for n in names}}
    torch.onnx.export(
        model, (x, tau), str(path), input_names=["input", "tau"], output_names=names, dynamic_axes=axes,
        dynamo=False, opset_version=17)
    spec = spec_for(task, model)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key = serving.ONNX_SPEC_KEY
    entry.value = json.dumps(spec)
    onnx.save(proto, str(path))
    return spec


def reference(version_dir: Path, x: np.ndarray, tau: float = 0.1) -> dict[str, np.ndarray]:
    """The graph's own outputs, computed in-process with onnxruntime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(Path(version_dir) / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = serving.onnx_feeds(sess, x, tau)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))
