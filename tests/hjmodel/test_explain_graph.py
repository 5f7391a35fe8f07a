"""The explanation graph (HJModel.explain, ExplainModule, explain.onnx), checked in float64 against
independent recomputation: integrated gradients against the exact adaptive closed form and their
completeness, label flips against relabelling, the HJ reading against its formulas, the eps what-if
against the model at vanishing eps; and ONNX against torch."""

from __future__ import annotations

import copy

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


@pytest.mark.parametrize("name", ["digits_deep", "digits_memory", "diabetes_lse"])
def test_integrated_gradients_against_autograd(demo_repository, name):
    """Per coordinate, against autograd's gradient of the decisive output integrated by the same rule
    (independent of the closed-form gradient the served IG uses)."""
    from hjmodel.models import IG_ORDER, IG_PANELS

    model = load_model(demo_repository / name / "1")
    x = _rows(name, 4, 7)
    c = model.evaluate(x, outputs=()).decision
    x0 = model.preprocess.mu.expand_as(x)
    nodes, weights = F.gauss_legendre(IG_PANELS, IG_ORDER)
    total = torch.zeros_like(x)
    for alpha, w in zip(nodes.tolist(), weights.tolist()):
        point = (x0 + alpha * (x - x0)).clone().requires_grad_(True)
        out = model.head.outputs(model.head.preactivations(model.features(point))).gather(1, c[:, None]).sum()
        (grad,) = torch.autograd.grad(out, point)
        total += w * grad
    autograd_ig = (x - x0) * total
    served = model.explain(x)["integrated_gradients"]
    torch.testing.assert_close(served, autograd_ig, rtol=1e-9, atol=1e-9 * float(autograd_ig.abs().max()))
