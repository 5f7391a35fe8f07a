"""The explanation graph (HJModel.explain, ExplainModule, explain.onnx), checked in float64 against
independent recomputation: integrated gradients against the exact adaptive closed form and their
completeness, label flips against relabelling, the HJ reading against its formulas, the eps what-if
against the model at vanishing eps; and ONNX against torch."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from hjmodel import functional as F
from hjmodel import load_dataset, load_model, serving
from hjmodel.artifact import ExplainModule

DT = torch.float64
DEMO = ["digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse", "diabetes_lse"]
DATA = {"digits_lse": "digits", "digits_memory": "digits", "digits_deep": "digits",
        "breast_cancer_lse": "breast_cancer", "diabetes_lse": "diabetes"}


def _rows(name: str, n: int, seed: int) -> torch.Tensor:
    X = load_dataset(DATA[name]).X
    rng = np.random.default_rng(seed)
    pick = X[rng.choice(len(X), n, replace=False)]
    return torch.as_tensor(pick + rng.normal(0, 0.25, pick.shape) * X.std(0), dtype=DT)


@torch.no_grad()
def _decisive(model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """F(x): the output integrated gradients explain (the decided class's group value / Gibbs
    average; output 0 for regression)."""
    out = model.head.outputs(model.head.preactivations(model.features(x)))
    return out.gather(1, c[:, None]).squeeze(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", DEMO)
def test_integrated_gradients_are_exact_and_complete(demo_repository, name, seed):
    model = load_model(demo_repository / name / "1")
    x = _rows(name, 12, seed)
    for baseline in (None, torch.zeros_like(x)):
        out = model.explain(x, baseline=baseline)
        c = model.evaluate(x, outputs=()).decision
        x0 = model.preprocess.mu.expand_as(x) if baseline is None else baseline
        ig = out["integrated_gradients"]
        exact = model.integrated_gradients(x, x0, panels=64, order=12, decision=c)   # adaptive for lse
        scale = exact.abs().max()
        assert float((ig - exact).abs().max()) <= 1e-6 * float(scale), name
        gap = _decisive(model, x, c) - _decisive(model, x0, c)
        np.testing.assert_allclose(ig.sum(1).numpy(), gap.numpy(), rtol=1e-6, atol=1e-8 * float(gap.abs().max()))


@pytest.mark.parametrize("name", DEMO)
def test_the_hj_reading_matches_its_formulas(demo_repository, name):
    model = load_model(demo_repository / name / "1")
    x = _rows(name, 16, 3)
    out = model.explain(x)
    ev = model.evaluate(x, outputs=())
    head, t = model.head, model.head.t
    y, g = F.hj_reading(head.W.detach(), head.b.detach(), t)
    keep = head.mask[ev.decision] if head.mode == "groups" else torch.ones_like(ev.a, dtype=torch.bool)
    for i in range(len(x)):
        members = keep[i].nonzero().squeeze(1)
        z = ev.h[i:i + 1]
        u = F.hopf_cole_value(z, y[members], g[members], t, head.eps)
        lax = F.hopf_lax_value(z, y[members], g[members], t)
        np.testing.assert_allclose(float(out["hj_value"][i]), float(u), rtol=1e-10)
        np.testing.assert_allclose(float(out["hopf_lax_value"][i]), float(lax), rtol=1e-10)
        assert float(out["hopf_lax_value"][i]) >= float(out["hj_value"][i]) - 1e-9   # u <= Hopf-Lax (soft min)
        j = members[ev.a[i, members].argmax()]
        np.testing.assert_allclose(float(out["hj_initial_value"][i]), float(g[j]), rtol=1e-12)
        if "hj_support_point" in out:   # back in raw input space: the preprocessing maps it onto y_j
            np.testing.assert_allclose(model.preprocess(out["hj_support_point"][i:i + 1]).numpy()[0], y[j].numpy(),
                                       rtol=1e-9, atol=1e-9 * float(y.abs().max()))
    assert ("hj_support_point" in out) == (len(model.body) == 0)


@pytest.mark.parametrize("name", DEMO)
def test_the_eps_what_if_is_the_vanishing_eps_limit(demo_repository, name):
    model = load_model(demo_repository / name / "1")
    x = _rows(name, 40, 4)
    out = model.explain(x, tau=0.5)
    cold = copy.deepcopy(model)
    cold.head.eps = model.head.eps * 1e-9            # every head LSE / Gibbs average at eps -> 0
    with torch.no_grad():
        limit = cold.head.outputs(cold.head.preactivations(cold.features(x)))
    served = model.evaluate(x, tau=0.5, outputs=("prediction",))["prediction"]
    if model.task == "classification":
        assert torch.equal(out["tropical_prediction"], limit.argmax(1))
        assert torch.equal(out["eps_decision_changes"], limit.argmax(1) != served)
    else:
        torch.testing.assert_close(out["tropical_prediction"], limit, rtol=1e-9, atol=1e-9)
        assert torch.equal(out["eps_decision_changes"], ((limit - served).abs() > 0.5).any(1))


def _decision_after(model, pi: torch.Tensor, relabel: torch.Tensor, to_class: int) -> int:
    """The memory model's decision for Gibbs weights ``pi`` once the examples ``relabel`` carry
    ``to_class`` (ties go to the lower class index, as argmax does)."""
    labels = model.head.labels.clone()
    labels[relabel] = to_class
    return int((pi @ torch.nn.functional.one_hot(labels, model.n_outputs).to(DT)).argmax())


def test_label_flips_flip_the_decision_and_are_fewest(demo_repository):
    model = load_model(demo_repository / "digits_memory" / "1")
    x = _rows("digits_memory", 20, 5)
    out = model.explain(x, top_k=serving.TOP_K_MAX)
    ev = model.evaluate(x, outputs=())
    head = model.head
    count, target = F.fewest_label_flips(ev.pi, head.labels, ev.decision, model.n_outputs)
    assert torch.equal(out["label_flips"], count) and torch.equal(out["label_flip_target"], target)
    for i in range(len(x)):
        n, k = int(out["label_flips"][i]), int(out["label_flip_target"][i])
        if n > serving.TOP_K_MAX:
            continue
        plan = out["label_flip_index"][i]
        assert bool((plan[:n] >= 0).all()) and bool((plan[n:] == -1).all())

        flipped = _decision_after(model, ev.pi[i], plan[:n], k)
        assert flipped != int(ev.decision[i]) or flipped == k, i
        if n > 1:   # one fewer of the greedy's examples does not reach the target
            assert _decision_after(model, ev.pi[i], plan[:n - 1], k) == int(ev.decision[i]), i


@pytest.mark.parametrize("name", DEMO)
def test_explain_graph_onnx_matches_torch(demo_repository, name):
    directory = demo_repository / name / "1"
    model = load_model(directory)
    sess = ort.InferenceSession(str(directory / serving.EXPLAIN_FILE), providers=["CPUExecutionProvider"])
    x32 = _rows(name, 64, 6).to(torch.float32)
    base = model.preprocess.mu.to(torch.float32)
    names = [o.name for o in sess.get_outputs()]
    assert names == [o.name for o in serving.explain_outputs_for(model.task, model.kind)]
    got = dict(zip(names, sess.run(names, serving.onnx_feeds(sess, x32.numpy(), 0.3, base.numpy()))))
    with torch.no_grad():
        want = ExplainModule(model)(x32, torch.full((64, 1), 0.3, dtype=DT), base.expand(64, -1))
    for key in names:
        w = want[key].numpy()
        if w.dtype.kind in "biu":
            np.testing.assert_array_equal(got[key], w, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], w, rtol=2e-5, atol=1e-6 * max(1.0, float(np.abs(w).max())), err_msg=key)


def _autograd_ig(model, x: torch.Tensor, x0: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Integrated gradients of output c by the served rule (serving.IG_PANELS x IG_ORDER nodes), each
    node's gradient by autograd through the model's plain forward pass: independent of the closed
    forms the served IG uses."""
    nodes, weights = F.gauss_legendre(serving.IG_PANELS, serving.IG_ORDER)
    total = torch.zeros_like(x)
    for alpha, w in zip(nodes.tolist(), weights.tolist()):
        point = (x0 + alpha * (x - x0)).clone().requires_grad_(True)
        out = model.head.outputs(model.head.preactivations(model.features(point))).gather(1, c[:, None]).sum()
        (grad,) = torch.autograd.grad(out, point)
        total += w * grad
    return (x - x0) * total


@pytest.mark.parametrize("name", ["digits_deep", "digits_memory", "diabetes_lse"])
def test_integrated_gradients_against_autograd(demo_repository, name):
    """Per coordinate, against autograd's gradient of the decisive output integrated by the same rule
    (independent of the closed-form gradient the served IG uses)."""
    model = load_model(demo_repository / name / "1")
    x = _rows(name, 4, 7)
    c = model.evaluate(x, outputs=()).decision
    x0 = model.preprocess.mu.expand_as(x)
    autograd_ig = _autograd_ig(model, x, x0, c)
    served = model.explain(x)["integrated_gradients"]
    torch.testing.assert_close(served, autograd_ig, rtol=1e-9, atol=1e-9 * float(autograd_ig.abs().max()))


def _random_model(seed: int):
    """A random model with an affine preprocessing, and inputs and baselines: by seed, an lse head on
    the input (ragged class groups, members shuffled across them), a memory classifier (one-hot labels,
    classes shuffled across the support points), a memory regression (real-valued targets, one or two
    outputs), or a body of one or two LSE layers (ragged units) under an lse or a memory head; every
    eps from sharp to smooth."""
    from hjmodel.models import GibbsHead, HJModel, LSEGroupLayer, OODReference, Preprocess

    gen = torch.Generator().manual_seed(6_113 * seed + 17)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))   # noqa: E731
    eps = lambda: float(10 ** (-1.5 + 2.0 * torch.rand((), generator=gen, dtype=DT)))   # noqa: E731

    def partition(groups: int, members: int) -> torch.Tensor:
        owner = torch.cat([torch.arange(groups), torch.randint(0, groups, (members - groups,), generator=gen)])
        owner = owner[torch.randperm(members, generator=gen)]
        return owner[None, :] == torch.arange(groups)[:, None]

    d, p, K = draw(1, 6), draw(1, 6), draw(2, 4)
    pre = Preprocess(torch.randn(d, generator=gen, dtype=DT), torch.randn(p, d, generator=gen, dtype=DT))
    case = ("lse", "memory-classification", "memory-regression", "deep", "deep-2", "deep-memory")[seed % 6]
    body, width = [], p
    for _ in range({"deep": 1, "deep-2": 2, "deep-memory": 1}.get(case, 0)):
        H = draw(1, 5)
        N1 = draw(H, 3 * H)
        body.append(LSEGroupLayer(torch.randn(N1, width, generator=gen, dtype=DT) / math.sqrt(width),
                                  0.5 * torch.randn(N1, generator=gen, dtype=DT), partition(H, N1), eps()))
        width = H
    N = draw(K, 4 * K)
    W, b = torch.randn(N, width, generator=gen, dtype=DT), 0.5 * torch.randn(N, generator=gen, dtype=DT)
    task = "regression" if case == "memory-regression" else "classification"
    if case in ("lse", "deep", "deep-2"):
        head = GibbsHead(W, b, eps(), 1.0, "groups", mask=partition(K, N))
    elif task == "classification":
        labels = partition(K, N).to(torch.long).argmax(0)
        head = GibbsHead(W, b, eps(), 1.0, "values", V=torch.nn.functional.one_hot(labels, K).to(DT), labels=labels)
    else:
        head = GibbsHead(W, b, eps(), 1.0, "values", V=3.0 * torch.randn(N, draw(1, 2), generator=gen, dtype=DT))
    ref = OODReference(points=torch.zeros(1, width, dtype=DT), t=1.0, eps=1.0)   # no gate: not explained here
    kind = "deep" if body else case.split("-")[0]
    model = HJModel(kind, task, pre, body, head, ref).double().eval().requires_grad_(False)
    x = pre.mu + 2.0 * torch.randn(6, d, generator=gen, dtype=DT)
    return model, x, pre.mu + torch.randn(6, d, generator=gen, dtype=DT)


@pytest.mark.parametrize("seed", range(120))
def test_integrated_gradients_against_autograd_on_random_models(seed):
    """The served rule integrates the Gibbs weights' coefficients along the path's affine first
    pre-activations (``models._affine_path_ig``) rather than taking the gradient at every node: per
    coordinate, in float64, it equals autograd's gradient of the decisive output integrated by the
    same rule, on random lse heads, memory classifiers and regressions, and bodies of one and two
    layers under lse and memory heads (20 seeds each)."""
    model, x, x0 = _random_model(seed)
    c = model.evaluate(x, outputs=()).decision if model.task == "classification" else torch.zeros(6, dtype=torch.long)
    want = _autograd_ig(model, x, x0, c)
    served = model.explain(x, baseline=x0)["integrated_gradients"]
    torch.testing.assert_close(served, want, rtol=1e-9,
                               atol=1e-12 * _gradient_terms(model) * float((x - x0).abs().max()))


def _gradient_terms(model) -> float:
    """The size of an output gradient's terms, whose rounding either side may leave where they cancel
    (a sure memory head's sum_j pi_j (v_jc - p_c) w_j / eps): every map's largest row, 2 |V| / eps."""
    rows = [torch.linalg.matrix_norm(model.preprocess.A, 2)] + [m.W.norm(dim=1).max() for m in (*model.body, model.head)]
    return float(torch.stack(rows).prod()) * (2.0 * float(model.head.V.abs().max()) / model.head.eps
                                              if model.head.mode == "values" else 1.0)


@pytest.mark.parametrize("seed", range(60))
def test_output_gradient_against_autograd_for_every_class(seed):
    """``HJModel.output_gradient`` (the closed form the evaluation compares Captum and autograd
    with) is autograd's gradient of output c through the plain forward pass, for every class c, not
    only the decided one; at the decided class it is the served saliency."""
    model, x, _ = _random_model(seed)
    outputs = model.head.outputs(model.head.preactivations(model.features(x)))
    for k in range(outputs.shape[1]):
        c = torch.full((x.shape[0],), k, dtype=torch.long)
        point = x.clone().requires_grad_(True)
        with torch.enable_grad():
            out = model.head.outputs(model.head.preactivations(model.features(point)))[:, k].sum()
            (want,) = torch.autograd.grad(out, point)
        got = model.output_gradient(x, c)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * _gradient_terms(model))
    decided = model.evaluate(x, outputs=("saliency",))
    c = decided.decision if model.task == "classification" else torch.zeros(x.shape[0], dtype=torch.long)
    torch.testing.assert_close(model.output_gradient(x, c), decided["saliency"], rtol=1e-9,
                               atol=1e-12 * _gradient_terms(model))


def test_explanation_calls_stay_within_their_element_budget(demo_repository):
    """Rows per explanation call (the service's batcher takes them from the spec) keep the integrated
    gradients' (rows, nodes, width) tensors within serving.EXPLAIN_ELEMENTS: width the first body
    layer's pieces, or the head's neurons; never below one row, never above the batch."""
    nodes = serving.IG_PANELS * serving.IG_ORDER
    for name in DEMO:
        structure = json.loads((demo_repository / name / "1" / serving.SPEC_FILE).read_text())["structure"]
        model = load_model(demo_repository / name / "1")
        width = model.body[0].W.shape[0] if model.body else model.head.W.shape[0]
        rows = serving.explain_rows_per_call(structure, 10_000)
        assert rows * nodes * width <= serving.EXPLAIN_ELEMENTS, name
        assert rows == 10_000 or (rows + 1) * nodes * width > serving.EXPLAIN_ELEMENTS, name
        assert serving.explain_rows_per_call(structure, 4) == min(4, rows)
    assert serving.explain_rows_per_call({"n_neurons": 60_000, "body": []}, 64) == 2
    assert serving.explain_rows_per_call({"n_neurons": 10 ** 9}, 64) == 1
    assert serving.explain_rows_per_call({"n_neurons": 60_000, "body": [{"pieces": 192}]}, 64) == 64
    assert serving.explain_rows_per_call(None, 64) == serving.explain_rows_per_call(["not", "a", "dict"], 64) == 64


@pytest.mark.parametrize("name", ["digits_memory", "digits_deep", "diabetes_lse"])
def test_explain_runs_many_rows_in_blocks_with_the_same_answers(demo_repository, name, monkeypatch):
    """HJModel.explain on more rows than one call may hold (serving.explain_rows) runs in row blocks,
    each row with its own tau and baseline, and answers what the whole batch does in one call."""
    model = load_model(demo_repository / name / "1")
    x = _rows(name, 10, 8)
    tau = torch.linspace(0.1, 1.0, 10, dtype=DT)
    base = model.preprocess.mu + 0.1 * torch.arange(10, dtype=DT)[:, None]
    whole = model.explain(x, tau=tau, baseline=base)
    width = model.body[0].W.shape[0] if model.body else model.head.W.shape[0]
    monkeypatch.setattr(serving, "EXPLAIN_ELEMENTS", 3 * serving.IG_PANELS * serving.IG_ORDER * width)
    assert serving.explain_rows(width, 10) == 3
    calls = []
    explain = type(model).explain

    def counted(self, rows, *args, **kw):
        calls.append(len(rows))
        return explain(self, rows, *args, **kw)
    monkeypatch.setattr(type(model), "explain", counted)
    blocked = model.explain(x, tau=tau, baseline=base)
    assert calls == [10, 3, 3, 3, 1]
    assert whole.keys() == blocked.keys()
    for key, value in whole.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(blocked[key], value, rtol=1e-10, atol=1e-12 * float(value.abs().max()))
        else:
            assert torch.equal(blocked[key], value), key
