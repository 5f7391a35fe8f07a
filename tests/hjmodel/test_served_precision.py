"""Certificates in the bits the server returns: the float32 ``certified_radius`` of the served graph
(onnxruntime and the torch serving module) is never larger than the float64 certificate, and no
float32 input inside it -- found by an attack run on the served graph itself -- changes the served
class. The near-exact case is built on purpose: digits inputs scaled x3, where one neuron dominates
each group and the certificate is within ~1e-7 of the true boundary, so a radius rounded to
nearest (up half the time) is unsound.

Also: every served float32 output is finite for any finite float32 input (saturating casts).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from hjmodel import functional as F
from hjmodel import serving
from hjmodel.artifact import ONNX_FILE, load_model, load_serving_module
from hjmodel.attacks import input_rounding_attack, served_bits_attack
from hjmodel.serving import outputs_for

pytestmark = pytest.mark.slow
ROWS = 60


#: the served graph runs as in the service: a session opened with the subnormal flush, run on a thread
#: that flushes (serving.open_session); a thread of its own, so this process's other tests keep IEEE
#: subnormals
_SERVING_THREAD = ThreadPoolExecutor(max_workers=1, initializer=serving.flush_subnormals)


def _session(version_dir):
    return serving.open_session(version_dir / ONNX_FILE, threads=1, flush_subnormals=True)


def _module_served(module, x32: np.ndarray, tau: float = 0.1) -> dict[str, np.ndarray]:
    """:func:`_served` by the torch serving module."""
    with torch.no_grad():
        out = module(torch.from_numpy(x32), torch.tensor([tau], dtype=torch.float64))
    return {k: v.numpy() for k, v in out.items()}


def _served(sess, x32: np.ndarray, tau: float = 0.1) -> dict[str, np.ndarray]:
    def run():
        feeds = serving.onnx_feeds(sess, x32, tau)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds), strict=True))
    return _SERVING_THREAD.submit(run).result()


def _scaled_digits(model, factor: float, n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    x = load_digits().data[-n:].astype(np.float64) * factor
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def digits_lse(demo_repository):
    version = demo_repository / "digits_lse" / "1"
    return version, load_model(version).double().eval(), _session(version)


def test_served_radius_never_exceeds_the_float64_certificate(digits_lse):
    version, model, sess = digits_lse
    module = load_serving_module(version).eval()
    for factor in (1.0, 3.0, 10.0):
        x32 = _scaled_digits(model, factor, ROWS)
        r64 = model.evaluate(torch.from_numpy(x32).double())["certified_radius"].numpy()
        onnx_r = _served(sess, x32)["certified_radius"]
        torch_r = _module_served(module, x32)["certified_radius"]
        # less the allowance for the rounding of a client's values (at most 2.5e-7 |x|: about 6e-6
        # for a digit), then rounded toward zero, no further
        shrunk = F.input_rounding_radius(torch.from_numpy(r64), torch.from_numpy(x32)).numpy()
        norm = np.linalg.norm(x32.astype(np.float64), axis=1)
        assert (r64 - shrunk <= 2.5e-7 * norm).all() and (shrunk <= r64).all()
        for name, served in (("onnx", onnx_r), ("torch", torch_r)):
            assert served.dtype == np.float32, name
            assert (served.astype(np.float64) <= shrunk).all(), (name, factor, np.max(served - shrunk))
            # the largest float32 at or below the allowance's bound
            assert (shrunk - served.astype(np.float64) < np.spacing(served)).all(), (name, factor)


def _margin(model, c: torch.Tensor):
    """Best other class log-score minus the predicted one (> 0: the float64 decision left c)."""
    def loss(x: torch.Tensor) -> torch.Tensor:
        lp = model.head.log_probabilities(model.head.preactivations(model.features(x)))
        own = lp.gather(1, c[:, None]).squeeze(1)
        return lp.scatter(1, c[:, None], -math.inf).max(-1).values - own
    return loss


def _direction(model, x: torch.Tensor, c: torch.Tensor, r: torch.Tensor, steps: int = 60) -> torch.Tensor:
    """PGD-L2 at radius 1.001 r (the certificate is nearly exact here, so this flips): the unit
    direction of the adversarial example found, started at the exact gradient and at the
    gradient of every other class' margin (targeted starts)."""
    loss = _margin(model, c)
    rad = 1.001 * r
    best = torch.full_like(r, -math.inf)
    best_dir = torch.zeros_like(x)
    starts = [None, *range(model.n_outputs)]
    for target in starts:
        delta = torch.zeros_like(x, requires_grad=True)
        if target is not None:
            tt = torch.full_like(c, target)
            lp = model.head.log_probabilities(model.head.preactivations(model.features(x + delta)))
            obj = (lp.gather(1, tt[:, None]) - lp.gather(1, c[:, None])).sum()
            (g,) = torch.autograd.grad(obj, delta)
        else:
            (g,) = torch.autograd.grad(loss(x + 1e-9 * torch.randn_like(x) + delta).sum(), delta)
        delta = (g / g.norm(dim=-1, keepdim=True).clamp_min(1e-300)) * rad[:, None]
        for it in range(steps):
            delta = delta.detach().requires_grad_(True)
            val = loss(x + delta)
            better = val.detach() > best
            best = torch.where(better, val.detach(), best)
            best_dir = torch.where(better[:, None], delta.detach(), best_dir)
            (g,) = torch.autograd.grad(val.sum(), delta)
            step = 0.05 * rad * 0.02 ** (it / steps)
            delta = delta.detach() + step[:, None] * g / g.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            delta = delta * (rad / delta.norm(dim=-1).clamp_min(1e-300)).clamp(max=1.0)[:, None]
    return best_dir / best_dir.norm(dim=-1, keepdim=True).clamp_min(1e-300), best > 0


def test_no_float32_input_inside_the_served_radius_changes_the_served_class(digits_lse):
    """Attack in the served precision: along each adversarial direction, bisect the float64
    boundary, then scan float32 inputs around it through the ONNX graph itself; the nearest float32
    input with another served class must lie outside the served radius."""
    version, model, sess = digits_lse
    x32 = _scaled_digits(model, 3.0, ROWS)
    out = _served(sess, x32)
    c = torch.from_numpy(out["prediction"])
    served_r = out["certified_radius"].astype(np.float64)
    x = torch.from_numpy(x32).double()
    r64 = model.evaluate(x)["certified_radius"]
    u, flipped = _direction(model, x, c, r64)
    assert flipped.float().mean() > 0.5   # the attack finds the boundary just past the radius
    loss = _margin(model, c)
    lo, hi = torch.zeros_like(r64), 1.001 * r64
    with torch.no_grad():
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            adv = loss(x + mid[:, None] * u) > 0
            hi, lo = torch.where(adv, mid, hi), torch.where(adv, lo, mid)
    tight = 0
    for i in np.flatnonzero(flipped.numpy()):
        s = hi[i].item() * (1.0 + np.linspace(-2e-6, 2e-6, 257))
        q = (x32[i].astype(np.float64)[None, :] + s[:, None] * u[i].numpy()[None, :]).astype(np.float32)
        cls = _served(sess, q)["prediction"]
        moved = cls != out["prediction"][i]
        if not moved.any():
            continue
        dist = np.linalg.norm(q[moved].astype(np.float64) - x32[i].astype(np.float64), axis=1).min()
        tight += dist <= r64[i].item() * (1 + 1e-6)   # near-exact: against the float64 certificate
        assert dist > served_r[i], (i, dist, served_r[i], r64[i].item())
    assert tight > 0, "the case must be near-exact for this test to mean anything"


@pytest.mark.parametrize("name", ["digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse",
                                  "diabetes_lse"])
def test_extreme_inputs_give_finite_ordered_outputs(demo_repository, name):
    version = demo_repository / name / "1"
    sess = _session(version)
    d = sess.get_inputs()[0].shape[1]
    rows = np.stack([np.zeros(d), np.full(d, 1e19), np.full(d, -1e19), np.full(d, 1e30),
                     np.full(d, 3e38), np.full(d, -3e38)]).astype(np.float32)
    out = _served(sess, rows)
    for spec in outputs_for("classification" if "diabetes" not in name else "regression"):
        value = out[spec.name]
        if value.dtype.kind == "f":
            assert np.isfinite(value).all(), (name, spec.name, value)
    assert (out["certified_radius"] >= 0).all()
    # ordered: the farther input is at least as unsupported
    assert out["ood_score"][1] <= out["ood_score"][3] <= out["ood_score"][4]
    assert out["ood_flag"][1:].all(), (name, out["ood_p_value"])


@pytest.mark.parametrize("name", ["digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse"])
@pytest.mark.parametrize("factor", [1.0, 3.0])
def test_attack_inside_the_served_radius_in_served_bits(demo_repository, name, factor):
    """Every classification demo model, inputs x1 and x3: PGD-L2 (targeted starts at every other
    class, then steps) inside the served radius; each iterate is rounded to float32, pulled back
    into the ball if rounding pushed it out, and classified by the ONNX graph itself. None may
    change the served class."""
    from sklearn.datasets import load_breast_cancer

    version = demo_repository / name / "1"
    model, sess = load_model(version).double().eval(), _session(version)
    n = 20 if name == "digits_memory" else 40   # the memory graph is the slow one
    base = (load_breast_cancer().data[-n:] if name.startswith("breast") else
            _scaled_digits(model, 1.0, n).astype(np.float64))
    x32 = (base * factor).astype(np.float32)
    out = _served(sess, x32)
    c = torch.from_numpy(out["prediction"])
    r = torch.from_numpy(out["certified_radius"].astype(np.float64))
    found = served_bits_attack(model, lambda q: _served(sess, q)["prediction"], x32, r.numpy(), c.numpy())
    assert not found.any(), (name, factor, np.flatnonzero(found)[:5])


@pytest.mark.parametrize("name", ["digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse"])
def test_attack_inside_the_served_radius_far_from_the_data(demo_repository, name):
    """Inputs no demo model was fitted near (``eval.served_bits.far_families``: its rows scaled x1e-4 to
    x1e20, negated, the origin, Gaussian rows 10 and 1,000 feature sds out, a single feature, constant
    rows, midpoints of two rows), served by the ONNX graph: no served radius above the float64
    certificate unless the float64 model re-proves it, and neither the served-bits attack nor float64
    PGD-L2 (8 restarts, targeted starts) finds another class inside it. Far out, squared norms reach
    1e42 and most exponentials underflow: the certificates' arithmetic must stay sound there too."""
    from eval.served_bits import far_families
    from hjmodel.attacks import held_out, pgd_l2
    from hjmodel.data import load_dataset
    from hjmodel.verify import DEMO_DATA, served_radius_check

    version = demo_repository / name / "1"
    model, sess = load_model(version).double().eval(), _session(version)
    X = load_dataset(DEMO_DATA[name]).X
    X = X[held_out(model, X)]
    fams = far_families(X, 3 if name == "digits_memory" else 6, np.random.default_rng(7))
    x32 = np.concatenate(list(fams.values())).astype(np.float32)
    assert np.isfinite(x32).all()
    out = _served(sess, x32)
    c, r = out["prediction"], out["certified_radius"].astype(np.float64)
    assert (r > 0).mean() > 0.9, r          # the families are attacked inside radii that mean something
    proof = served_radius_check(model, x32, out)
    assert proof["unproven"] == 0, proof
    found = served_bits_attack(model, lambda q: _served(sess, q)["prediction"], x32, r, c)
    assert not found.any(), (name, np.flatnonzero(found)[:5])
    violated, _, _ = pgd_l2(model, torch.from_numpy(x32).double(), 0.999 * torch.from_numpy(r),
                            torch.from_numpy(c).long(), restarts=8, steps=60)
    assert not violated.any(), (name, np.flatnonzero(violated.numpy())[:5])


@pytest.mark.parametrize("runtime", ["interpreter", "static"])
@pytest.mark.parametrize("name", ["digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse"])
def test_attack_inside_the_torch_backends_served_radius_in_its_served_bits(demo_repository, name, runtime):
    """The same attack against the torch backend (its TorchScript trace, on a flushing thread as the
    backend's): its served float32 radius and class come from other kernels than onnxruntime's, so
    its bits are attacked in their own right (inputs x3: one neuron dominates each group and the
    certificates are nearly exact). On the interpreter, and on the static runtime that answers the
    server's small calls (``eval.served_bits.static_server``: the backend as served, every call cut
    into blocks of 1, 2, ..., 16 rows in turn, each on the runtime; an error if it took fewer)."""
    from sklearn.datasets import load_breast_cancer

    from eval.served_bits import static_server
    from hjmodel.artifact import TracedModule

    version = demo_repository / name / "1"
    model = load_model(version).double().eval()
    if runtime == "static":
        call = static_server(version)
    else:
        traced = TracedModule(load_serving_module(version).eval(), static_rows=0)

        def call(q: np.ndarray) -> dict[str, np.ndarray]:
            with torch.inference_mode():
                out = traced(torch.from_numpy(q), torch.full((len(q), 1), 0.1, dtype=torch.float64))
            return {k: v.numpy() for k, v in out.items()}

    def served(q: np.ndarray) -> dict[str, np.ndarray]:
        return _SERVING_THREAD.submit(call, q).result()

    n = 20 if name == "digits_memory" else 40
    base = (load_breast_cancer().data[-n:] if name.startswith("breast") else
            _scaled_digits(model, 1.0, n).astype(np.float64))
    x32 = (base * 3.0).astype(np.float32)
    out = served(x32)
    found = served_bits_attack(model, lambda q: served(q)["prediction"], x32,
                               out["certified_radius"].astype(np.float64), out["prediction"])
    assert not found.any(), (name, np.flatnonzero(found)[:5])


@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize("factor", [3.0, 10.0])
def test_no_float64_client_inside_the_served_radius_changes_the_served_class(digits_lse, backend, factor):
    """A client may send float64 values, which the graph reads rounded to float32: the radius served
    for X must hold for every Y it may send, whatever X and Y round to. On near-exact certificates
    (inputs x3 and x10) a radius that holds for float32 perturbations of the rounded row alone does
    not: the two rounding cells lie closer than their float32 points (``input_rounding_attack``)."""
    version, model, sess = digits_lse
    module = load_serving_module(version).eval()

    def serve(q):   # float64 rows, rounded to float32 as the server reads them
        x32 = np.asarray(q, dtype=np.float64).astype(np.float32)
        out = _served(sess, x32) if backend == "onnx" else _module_served(module, x32)
        return out["prediction"], out["certified_radius"]

    x32 = _scaled_digits(model, factor, 30)
    found = input_rounding_attack(model, serve, x32)
    assert not found["violated"].any(), np.flatnonzero(found["violated"])
    # the attack reaches the boundary: its pairs lie within 1e-4 (relative) of the radius on most
    # rows, and inside the float64 certificate rounded down alone (what was served before the
    # allowance) on some: that radius would have been answered unsound
    slack = (found["distance"] - found["radius"]) / found["radius"]
    assert np.median(slack) < 1e-4, np.median(slack)
    unshrunk = F.float32_down(model.evaluate(torch.from_numpy(x32).double())["certified_radius"]).numpy()
    assert (found["distance"] < unshrunk).sum() >= 3


def test_the_float64_client_attack_reaches_a_memory_heads_boundary(demo_repository):
    """On a memory head the gradient at x rarely leads to the nearest boundary (other classes'
    islands); the attack's PGD starts (balls of 2-16 x the radius, shrunk along their rays) do: its
    pairs come within 1e-3 of the served radius on some rows (without those starts none came nearer
    than 3.7x the radius), and none inside it."""
    version = demo_repository / "digits_memory" / "1"
    model, sess = load_model(version).double().eval(), _session(version)

    def serve(q):
        out = _served(sess, np.asarray(q, dtype=np.float64).astype(np.float32))
        return out["prediction"], out["certified_radius"]

    found = input_rounding_attack(model, serve, _scaled_digits(model, 1.0, 20))
    assert not found["violated"].any()
    slack = (found["distance"] - found["radius"]) / found["radius"]
    assert (slack < 1e-3).sum() >= 2, np.sort(slack)[:4]


def test_served_bits_attack_finds_what_lies_beyond_the_radius(demo_repository):
    """The attack has teeth: at twice the served radius of digits_lse (whose certificate is within a
    few percent of the boundary) it finds a float32 input of another served class on most rows."""
    version = demo_repository / "digits_lse" / "1"
    model, sess = load_model(version).double().eval(), _session(version)
    x32 = _scaled_digits(model, 1.0, 20)
    out = _served(sess, x32)
    r = 2.0 * out["certified_radius"].astype(np.float64)
    found = served_bits_attack(model, lambda q: _served(sess, q)["prediction"], x32, r, out["prediction"])
    assert found.mean() > 0.8, found.mean()


_UNFLUSHED = """
import sys, numpy as np
from hjmodel import serving
sess = serving.open_session(sys.argv[1], threads=1)
x = np.load(sys.argv[2])
names = [o.name for o in sess.get_outputs()]
np.savez(sys.argv[3], **dict(zip(names, sess.run(names, serving.onnx_feeds(sess, x, 0.1)))))
"""


@pytest.mark.parametrize("name", ["digits_lse", "digits_memory", "digits_deep"])
def test_flushing_subnormals_changes_no_served_answer(demo_repository, name, tmp_path):
    """The served sessions flush subnormals to zero (``serving.open_session``, for speed on OOD
    inputs). On inputs far from the data -- where the OOD score's and the memory head's exponentials
    underflow -- every output of the flushed session equals that of a session in a fresh process
    that keeps subnormals (the processor's mode is per thread and sticks, so not in this process)
    to the rounding of its dtype (decisions and flags exactly; an output below the dtype's normal
    range, e.g. a probability of 1e-39, is served as 0), and no certificate grows."""
    import subprocess
    import sys

    version = demo_repository / name / "1"
    rng = np.random.default_rng(0)
    d = load_model(version).n_features
    x32 = np.concatenate([np.abs(rng.standard_normal((40, d))) * 3, rng.standard_normal((40, d)) * 40,
                          _scaled_digits(None, 1.0, 40)]).astype(np.float32)
    np.save(tmp_path / "x.npy", x32)
    subprocess.run([sys.executable, "-c", _UNFLUSHED, str(version / ONNX_FILE), str(tmp_path / "x.npy"),
                    str(tmp_path / "want.npz")], check=True, timeout=120)
    want = dict(np.load(tmp_path / "want.npz"))
    got = _served(_session(version), x32)
    assert set(got) == set(want)
    for key, value in want.items():
        if value.dtype.kind in "biu":
            assert np.array_equal(got[key], value), key
        else:
            # a value below the dtype's normal range is itself flushed (probabilities, weights ~1e-39)
            np.testing.assert_allclose(got[key], value, rtol=4 * np.finfo(value.dtype).eps,
                                       atol=np.finfo(value.dtype).tiny, err_msg=key)
    assert (got["certified_radius"] <= want["certified_radius"]).all()


def test_opening_a_flushing_session_leaves_the_callers_arithmetic_alone(demo_repository):
    """onnxruntime sets the flush on the thread that opens a session, for good; ``open_session``
    opens it on a thread of its own, so a library caller's arithmetic keeps IEEE subnormals."""
    torch.set_flush_denormal(False)
    assert np.float64(1e-300) * np.float64(1e-10) == 1e-310
    serving.open_session(demo_repository / "digits_memory" / "1" / ONNX_FILE, threads=1, flush_subnormals=True)
    assert np.float64(1e-300) * np.float64(1e-10) == 1e-310


@pytest.mark.parametrize("name", ["digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse"])
def test_the_float64_re_proof_of_a_served_radius(demo_repository, name):
    """``HJModel.evaluate(prove=r)``: the float64 model re-proves a radius another runtime served --
    its own radius and any smaller one, NaN / inf / negative never, nor the distance at which the
    attack found another class; and (memory: a tangent root searched in float32, deep: a chord) radii
    a float32 step above its own on most rows, as a runtime with other rounding may serve them."""
    from sklearn.datasets import load_breast_cancer

    from hjmodel.attacks import minimal_attack_radius

    model = load_model(demo_repository / name / "1").double().eval()
    n = 30
    base = load_breast_cancer().data[-n:] if name.startswith("breast") else _scaled_digits(model, 1.0, n)
    x = torch.from_numpy(np.asarray(base, dtype=np.float32)).double()

    def proven(at: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.evaluate(x, outputs=("certified_radius",), prove=at)["certified_radius"]

    with torch.no_grad():
        ev = model.evaluate(x, outputs=("prediction", "certified_radius"))
    r, c = ev["certified_radius"], ev["prediction"]
    assert bool((r > 0).all())
    assert torch.equal(proven(r), r) and torch.equal(proven(0.5 * r), 0.5 * r)
    bad = torch.tensor([math.nan, math.inf, -1.0], dtype=torch.float64).repeat(n)[:n]
    assert bool((proven(bad) == 0).all())
    r_att = minimal_attack_radius(model, x, c, r, restarts=4, steps=40, bisections=6)
    found = r_att < math.inf
    assert bool(found.any()) and bool((proven(r_att)[found] == 0).all())
    step = torch.from_numpy(np.nextafter(F.float32_down(r).numpy().astype(np.float32), np.float32(np.inf))
                            .astype(np.float64))
    share = float((proven(step) > 0).double().mean())
    if model.kind in ("memory", "deep"):
        assert share > 0.8, share
    else:   # a closed form, or a float64 search that runs to its root: nothing above it is proven
        assert share < 0.5, share


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_a_regression_radius_holds_for_the_outputs_as_served(demo_repository, backend):
    """A regression radius promises that no input within it moves the output by more than tau; a
    client sees the outputs rounded to float32. With tau a few of the outputs' float32 steps (1e-4 on
    diabetes' ~150, whose step is 1.5e-5), rounding both outputs adds more than the certificate's own
    slack (rows near the origin, where the input-rounding allowance does not already cover it). Along
    the direction that moves the output fastest (its gradient, both signs), every
    float32 input inside the served radius among the 2^10 around 0.97 of it (each coordinate rounded
    either way) must be served an output within tau of the row's."""
    import itertools

    from sklearn.datasets import load_diabetes

    from hjmodel.attacks import forward_outputs

    tau = 1e-4
    version = demo_repository / "diabetes_lse" / "1"
    model = load_model(version).double().eval()
    sess, module = _session(version), load_serving_module(version).eval()

    def served(q):
        out = _served(sess, q, tau) if backend == "onnx" else _module_served(module, q, tau)
        return out["prediction"].reshape(len(q), -1)[:, 0].astype(np.float64), out["certified_radius"].astype(np.float64)

    # near the origin (the features are centred): there the input-rounding allowance (~1e-7 |x|) is
    # small against the radius, while the output-rounding one (~1e-7 |f|, f ~ 150) is not against tau
    x32 = (0.01 * load_diabetes().data[:12]).astype(np.float32)
    p, r = served(x32)
    assert (r > 0).all()
    d = x32.shape[1]
    corners = np.array(list(itertools.product((0.0, 1.0), repeat=d)))        # (1024, d)
    largest = 0.0
    for i in range(len(x32)):
        xi = torch.from_numpy(x32[i:i + 1].astype(np.float64)).requires_grad_(True)
        (g,) = torch.autograd.grad(forward_outputs(model, xi).sum(), xi)
        for sign in (1.0, -1.0):
            u = (sign * g / g.norm()).numpy()[0]
            ray = x32[i].astype(np.float64) + 0.97 * r[i] * u
            base = ray.astype(np.float32)
            step = np.where(u >= 0, np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(-np.inf)))
            q = np.where(corners > 0, step[None, :], base[None, :]).astype(np.float32)
            q = q[np.linalg.norm(q.astype(np.float64) - x32[i].astype(np.float64), axis=1) < r[i]]
            if not len(q):
                continue
            moved = np.abs(served(q)[0] - p[i])
            assert (moved <= tau).all(), (i, sign, moved.max(), tau, r[i])
            largest = max(largest, float(moved.max()))
    assert largest > 0.5 * tau, largest   # the points reach the tolerance's neighbourhood


def _dataset(name: str) -> np.ndarray:
    """Every row of demo model ``name``'s dataset, as float32."""
    from hjmodel.data import load_dataset
    from hjmodel.verify import DEMO_DATA

    return load_dataset(DEMO_DATA[name]).X.astype(np.float32)


@pytest.mark.parametrize("name", ["digits_lse", "digits_memory", "digits_deep", "breast_cancer_lse",
                                  "diabetes_lse"])
def test_a_served_p_value_counts_every_calibration_statistic_its_own_ties(demo_repository, name):
    """The gate's p-value is (1 + #{T_cal >= T}) / (1 + n): ties count against the input, which is
    what keeps P(p <= alpha) <= alpha where inputs repeat (a calibration row sent again ties its own
    statistic). The build computed T_cal in eager torch; a served graph computes T in other kernels
    and at other batch shapes, so an input's T ties only up to rounding, and rounded up it used to
    drop its own calibration row: digits_lse's row 517 was served p = 0.7722 by onnxruntime in a
    batch and 0.775 alone. So: on every row of the dataset (a calibration row among them, each tie
    found in float64 against the build's statistics), each backend -- onnxruntime and the torch trace
    (interpreter, and the static runtime that answers small calls) -- alone and in one batch of
    every row, serves a p-value no smaller than the rank with the tie counted; and the same p-value
    and flag on each, so where a row was batched no longer decides its gate."""
    from eval.served_bits import static_server
    from hjmodel.artifact import TracedModule
    from hjmodel.verify import tied_p_values

    version = demo_repository / name / "1"
    model = load_model(version).double().eval()
    x32 = _dataset(name)
    floor, ties = tied_p_values(model, x32)
    assert ties.sum() > 10, "calibration rows must be among the rows"

    sess = _session(version)
    traced = TracedModule(load_serving_module(version).eval(), static_rows=0)
    static = static_server(version)

    def interpreter(q: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = traced(torch.from_numpy(q), torch.full((len(q), 1), 0.1, dtype=torch.float64))
        return {k: v.numpy() for k, v in out.items()}

    def alone(call) -> dict[str, np.ndarray]:
        parts = [call(x32[i:i + 1]) for i in range(len(x32))]
        return {k: np.concatenate([p[k] for p in parts]) for k in ("ood_p_value", "ood_flag")}

    served = {
        "onnxruntime, one batch": _served(sess, x32),
        "onnxruntime, alone": alone(lambda q: _served(sess, q)),
        "torch interpreter, one batch": _SERVING_THREAD.submit(interpreter, x32).result(),
        "torch static runtime, alone": _SERVING_THREAD.submit(alone, static).result(),
    }
    first = served["onnxruntime, one batch"]
    for how, out in served.items():
        p = out["ood_p_value"].astype(np.float64)
        short = np.flatnonzero(p < floor)   # served rounded up: never below, if the tie counts
        assert short.size == 0, (name, how, short[:5], p[short[:5]], floor[short[:5]], int(ties.sum()))
        for key in ("ood_p_value", "ood_flag"):
            differ = np.flatnonzero(out[key] != first[key])
            assert differ.size == 0, (name, how, key, differ[:5])


@pytest.mark.parametrize("name", ["digits_lse", "digits_deep"])
def test_a_rows_gate_statistic_does_not_depend_on_its_batch(demo_repository, name):
    """The statistic T of every digits row, in float64 torch, alone and in one batch: within a few
    ulps. The 79 training rows outside the reference measure score their own leave-one-out score, a
    tie at the gate's first level, and the two batch shapes rounded 25-27 of them either way (T moved
    by a whole rank level, up to 0.8%) until ties counted up to ``SCORE_TIE_MARGIN``."""
    model = load_model(demo_repository / name / "1").double().eval()
    x = torch.from_numpy(_dataset(name)).double()
    with torch.no_grad():
        batch = model.combined_statistic(*model.decisions(x))
        alone = torch.cat([model.combined_statistic(*model.decisions(x[i:i + 1])) for i in range(len(x))])
    moved = (batch - alone).abs() / (1.0 + batch.abs())
    assert float(moved.max()) < 1e-15, (name, int((moved >= 1e-15).sum()), float(moved.max()))
