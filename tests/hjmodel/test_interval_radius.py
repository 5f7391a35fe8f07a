"""The served certified radius is never below interval bound propagation (IBP) on the same network.

IBP bounds every pre-activation over the L2 ball (the first linear map's exactly, +- r |row|), passes
the bounds through each LSE layer (increasing in every argument) and affine map (centre and |W|
half-width), and certifies when the decided class's lower LSE exceeds every other class's upper
LSE. It is cheap and sometimes beats the closed-form radius (breast_cancer_lse on about half its
test inputs, digits_deep on ~1%), so the served graph searches it above the closed form and serves
the larger (``HJModel._interval_radius``). Checked here against an independent IBP written out with
(K, N) masks and 60 bisection steps; plus the root search's own contract.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hjmodel import functional as F
from hjmodel import load_dataset, load_model
from hjmodel.attacks import DT, held_out
from hjmodel.models import ROUNDING


def _masked_lse(a: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """(n, N), (K, N) -> (n, K), written out: the reference does not share the model's group tables."""
    s = torch.where(mask, a.unsqueeze(1) / eps, -math.inf)
    top = s.amax(-1, keepdim=True).clamp_min(-1e300)
    return eps * (top.squeeze(-1) + torch.log(torch.exp(s - top).sum(-1)))


def _ibp_certifies(model, x: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    A, mu = model.preprocess.A, model.preprocess.mu
    maps = [*model.body, model.head]
    W0 = maps[0].W @ A
    a = (x - mu) @ W0.T + maps[0].b
    half = r[:, None] * W0.norm(dim=-1)
    lo, hi = a - half, a + half
    for i, layer in enumerate(model.body):
        lo, hi = _masked_lse(lo, layer.mask, layer.eps), _masked_lse(hi, layer.mask, layer.eps)
        W, b = maps[i + 1].W, maps[i + 1].b
        centre, rad = (lo + hi) / 2, (hi - lo) / 2
        lo, hi = centre @ W.T + b - rad @ W.abs().T, centre @ W.T + b + rad @ W.abs().T
    groups = model.head.mask if model.head.mode == "groups" else model.head.V.T > 0.5
    s_lo, s_hi = _masked_lse(lo, groups, model.head.eps), _masked_lse(hi, groups, model.head.eps)
    own = s_lo.gather(1, c[:, None]).squeeze(1)
    other = s_hi.scatter(1, c[:, None], -math.inf).amax(1)
    return own - other > ROUNDING * (own.abs() + other.abs())


def _ibp_radius(model, x, c, hi) -> torch.Tensor:
    lo = torch.zeros_like(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        ok = _ibp_certifies(model, x, c, mid)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


CASES = [("digits_lse", "digits"), ("digits_memory", "digits"), ("digits_deep", "digits"),
         ("breast_cancer_lse", "breast_cancer")]


@pytest.mark.parametrize(("name", "dataset"), CASES)
def test_served_radius_is_never_below_ibp(demo_repository, name, dataset):
    model = load_model(demo_repository / name / "1").double().eval()
    data = load_dataset(dataset)
    x = torch.as_tensor(data.X[held_out(model, data.X)][:120], dtype=torch.float32).to(DT)
    ev = model.evaluate(x, outputs=("certified_radius", "prediction"))
    r, c = ev["certified_radius"], ev["prediction"]
    r_ibp = _ibp_radius(model, x, c, 4.0 * r.clamp_min(1e-3))
    assert bool((r_ibp <= 1.01 * 4.0 * r.clamp_min(1e-3)).all())          # the bracket held
    gap = (r_ibp / r.clamp_min(1e-300))[r_ibp > 0]
    assert float(gap.max()) <= 1.0 + 1e-5, f"{name}: IBP reaches {float(gap.max()):.6f} x the served radius"


def test_breast_cancer_radius_gains_from_ibp(demo_repository):
    """The max is not idle: on breast_cancer_lse the IBP radius is the larger on many inputs."""
    model = load_model(demo_repository / "breast_cancer_lse" / "1").double().eval()
    data = load_dataset("breast_cancer")
    x = torch.as_tensor(data.X[held_out(model, data.X)], dtype=DT)
    ev = model.evaluate(x, outputs=("certified_radius", "prediction"))
    closed = model._certified_radius(*_closed_form_args(model, x, ev["prediction"]))
    assert float((ev["certified_radius"] > closed * (1 + 1e-9)).double().mean()) > 0.2
    assert bool((ev["certified_radius"] >= closed).all())


def _closed_form_args(model, x, c):
    _, gibbs_body, a = model.trace(x)
    grouped = model.head.grouped(a)
    return a, gibbs_body, c, None, torch.zeros(len(x), dtype=DT), grouped


def _per_row(root):
    def make(fn):
        def f(r):   # radii of every row's grid, row-major: (m * G,)
            return fn(r, root.repeat_interleave(r.shape[0] // root.shape[0]))
        return f
    return make


@pytest.mark.parametrize("points, rounds", [(16, 5), (8, 3)])
def test_grid_root_contract(points, rounds):
    gen = torch.Generator().manual_seed(0)
    m = 300
    root = torch.rand(m, generator=gen, dtype=DT) * 10 + 0.1
    lo = root * (0.2 + 0.75 * torch.rand(m, generator=gen, dtype=DT))
    lo[:20] = root[:20] * 1.5                      # f(lo) <= 0: lo comes back unchanged
    lo[20:40] = root[20:40] / 20                   # the kinked root lies beyond 8 lo: 8 lo comes back
    on = _per_row(root)
    kinked = on(lambda r, q: torch.where(r < q, (q - r).clamp_min(0) ** 0.5, -(r - q) ** 2).clamp(max=2.0))
    smooth = on(lambda r, q: torch.logaddexp(2.0 - r, 1.0 - 0.5 * r) - torch.logaddexp(-1.0 + r, r - 3.0) - q / 10)
    tolerance = (8.0 ** (1 / points) - 1) / points ** (rounds - 1)
    for f, exact_of in ((kinked, lambda: root), (smooth, None)):
        r = F.grid_root(f, lo, 8.0, points, rounds)
        if exact_of:
            assert torch.equal(r[:20], lo[:20])
            assert torch.allclose(r[20:40], 8.0 * lo[20:40], rtol=1e-15)
        values = f(r.repeat_interleave(points))[::points]          # f at the answers (each row's own)
        moved = r > lo
        assert bool((values[moved] > 0).all())                     # sound: every answer was checked
        exact = exact_of() if exact_of else _bisect(f, lo, 8.0 * lo, points)
        gap = ((exact - r) / exact)[40:]
        assert bool((gap >= -1e-12).all()) and float(gap.max()) <= tolerance * (1 + 1e-9)


def _bisect(f, lo, hi, points):
    for _ in range(80):
        mid = (lo + hi) / 2
        ok = f(mid.repeat_interleave(points))[::points] > 0
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


def test_ibp_margin_with_infinite_bounds_never_certifies():
    own = torch.tensor([1.0, -math.inf, 2.0, -math.inf], dtype=DT)
    other = torch.tensor([-math.inf, -math.inf, 1.0, 0.0], dtype=DT)
    m = F.interval_margin(own, other, ROUNDING)
    assert not bool(m[0] > 0) and not bool(m[1] > 0) and not bool(m[3] > 0)
    np.testing.assert_allclose(float(m[2]), 1.0 - ROUNDING * 3.0)


@pytest.mark.parametrize(("name", "dataset"), CASES)
def test_exported_search_runs_only_on_gathered_rows_and_serves_the_same_radii(demo_repository, name, dataset):
    """The exported graph runs its gathered searches -- the tangent radius's over the class pairs
    that can decide the certificate (more than two classes), the IBP radius's over the rows where IBP
    may beat the closed form -- on gathered rows, the IBP one and, after a body, the tangent one
    inside an If on "anything gathered" (artifact ``_skip_empty_searches``; traced, they ran on
    empty tensors). Its radii, one row at a time (mostly nothing gathered) and as one batch, equal
    the torch serving module's bit for bit (to float32's search precision where the tangent root is
    searched in float32), on test rows and on rows scaled x3 (where other rows are gathered)."""
    import onnx

    from hjmodel import serving
    from hjmodel.artifact import ONNX_FILE, load_serving_module

    version = demo_repository / name / "1"
    graph = onnx.load(str(version / ONNX_FILE)).graph
    model = load_model(version)
    searches = 1 if model.n_outputs == 2 else 2
    assert sum(n.op_type == "NonZero" for n in graph.node) == searches
    wrapped = {f"skip_empty_search_{searches - 1}"}           # the IBP search
    if searches == 2 and model.body:
        wrapped.add("skip_empty_search_0")                    # the tangent search, after a body
    skip = [n for n in graph.node if n.op_type == "If"]
    assert {n.name for n in skip} == wrapped
    for node in skip:
        branches = {a.name: a.g for a in node.attribute}
        assert len(branches["then_branch"].node) > 40        # the search moved into the branch
        assert [n.op_type for n in branches["else_branch"].node] == ["Identity"]
    # a wide class group: the tangent root's float32 search, whose estimate (proven in float64) may
    # differ between the runtimes by a few float32 steps (tests/hjmodel/test_artifact.py)
    float32_search = model._tangent_float32
    X = load_dataset(dataset).X[held_out(model, load_dataset(dataset).X)][:40]
    module, sess = load_serving_module(version).eval(), serving.open_session(version / ONNX_FILE, threads=1)
    for x in (X, 3.0 * X):
        x32 = x.astype(np.float32)
        with torch.no_grad():
            want = module(torch.from_numpy(x32), torch.tensor([0.1], dtype=torch.float64))["certified_radius"].numpy()
        whole = sess.run(["certified_radius"], serving.onnx_feeds(sess, x32, 0.1))[0]
        rows = np.concatenate([sess.run(["certified_radius"], serving.onnx_feeds(sess, x32[i:i + 1], 0.1))[0]
                               for i in range(len(x32))])
        if float32_search:      # float32 sums may also round differently with the batch's size
            np.testing.assert_allclose(whole, want, rtol=2.0 ** -19, atol=0)
            np.testing.assert_allclose(rows, want, rtol=2.0 ** -19, atol=0)
        else:
            np.testing.assert_array_equal(whole, want)
            np.testing.assert_array_equal(rows, want)
