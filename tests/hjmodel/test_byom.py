"""Bring your own model: hjmodel.nn modules trained in a plain loop, hjmodel.export, state dicts,
third-party ONNX import, the CLI twins, and the README tutorial end to end."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import load_digits

import hjmodel
from hjmodel import ArtifactError, load_model, load_serving_module
from hjmodel.attacks import DT, pgd_l2
from hjmodel.cli import main as cli
from hjmodel.errors import CalibrationError
from hjmodel.onnx_import import import_onnx, lse_state_from_onnx

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(X))
    tr, ca, te = perm[:1000], perm[1000:1400], perm[1400:]
    return X[tr], y[tr], X[ca], y[ca], X[te], y[te]


def _fit(module, X, y, epochs=25, lr=0.02, params=None, loss=torch.nn.functional.cross_entropy):
    """A plain user loop: float32 batches, Adam."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(params if params is not None else module.parameters(), lr=lr)
    xt, yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)
    for _ in range(epochs):
        for i in range(0, len(xt), 128):
            value = loss(module(xt[i:i + 128]), yt[i:i + 128])
            opt.zero_grad()
            value.backward()
            opt.step()
    return module


@pytest.fixture(scope="module")
def exported(digits, tmp_path_factory):
    """An LSEClassifier, a deep one and a MemoryClassifier trained by the user's loop, exported."""
    Xtr, ytr, Xca, yca, _, _ = digits
    scale = {"mean": Xtr.mean(0), "scale": Xtr.std(0)}
    modules = {
        "lse": _fit(hjmodel.nn.LSEClassifier(64, 10, pieces=6, **scale), Xtr, ytr),
        "deep": _fit(hjmodel.nn.LSEClassifier(64, 10, pieces=4, hidden=[24], **scale), Xtr, ytr, epochs=15),
    }
    memory = hjmodel.nn.MemoryClassifier(Xtr[:600], ytr[:600], 10, eps=3.0, **scale)
    modules["memory"] = _fit(memory, Xtr[600:], ytr[600:], epochs=5, lr=0.05, params=[memory.head.b],
                             loss=torch.nn.functional.nll_loss)
    root = tmp_path_factory.mktemp("byom")
    out = {}
    for kind, module in modules.items():
        model = hjmodel.export(module, (Xca, yca), root / kind / "1", reference_data=Xtr)
        out[kind] = (module, model, root / kind / "1")
    return out


@pytest.mark.parametrize("kind", ["lse", "deep", "memory"])
def test_export_serves_the_modules_own_decisions(exported, digits, kind):
    module, model, directory = exported[kind]
    *_, Xte, yte = digits
    x = torch.as_tensor(Xte, dtype=torch.float32)
    with torch.no_grad():
        own = module(x).argmax(1).numpy()
    assert model.kind == kind and (own == yte).mean() > 0.85
    sess = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    served = sess.run(["prediction", "certified_radius", "ood_flag"], hjmodel.serving.onnx_feeds(sess, x.numpy()))
    np.testing.assert_array_equal(served[0], own)   # the artifact computes the module's own numbers
    with torch.no_grad():
        via_torch = load_serving_module(directory)(x, torch.full((len(x), 1), 0.1, dtype=DT))
    np.testing.assert_array_equal(via_torch["prediction"].numpy(), own)
    assert (served[1] >= 0).all() and (served[1] > 0).mean() > 0.9
    assert abs(float(served[2].mean()) - 0.05) < 0.05    # the gate was calibrated on held-out rows
    spec = hjmodel.read_artifact_spec(directory)
    assert spec.kind == kind and spec.alpha == 0.05 and spec.raw["provenance"]["source"] == "hjmodel.export"


@pytest.mark.parametrize("kind", ["lse", "memory"])
def test_exported_certificates_hold_under_attack(exported, digits, kind):
    """The exported model's certificate, attacked inside the served radius (PGD-L2, restarts)."""
    _, _, directory = exported[kind]
    model = load_model(directory)
    x = torch.as_tensor(digits[4][:60], dtype=torch.float32).to(DT)
    ev = model.evaluate(x)
    ok, _, _ = pgd_l2(model, x, ev["certified_radius"].clamp_min(1e-12), ev["prediction"], restarts=4, steps=40)
    assert not bool(ok.any()), f"{int(ok.sum())} violations inside the certified radius"


def test_state_dicts_and_their_errors(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 4))
    grouped = {"W": rng.normal(size=(6, 4)), "b": np.zeros(6), "eps": 0.5, "groups": np.kron(np.eye(3), np.ones(2)) > 0}
    model = hjmodel.export(grouped, X, tmp_path / "g" / "1", class_names=["a", "b", "c"])
    assert model.task == "classification" and model.kind == "lse"
    values = {"W": X[:20] / 2, "b": -(X[:20] ** 2).sum(1) / 4, "eps": 1.0, "t": 1.0, "V": X[:20, :1]}
    assert hjmodel.export(values, X, tmp_path / "v" / "1").kind == "memory"
    with pytest.raises(ValueError, match="exactly one group"):
        hjmodel.export({**grouped, "groups": np.ones((3, 6), bool)}, X, tmp_path / "x" / "1")
    with pytest.raises(ValueError, match="b must have shape"):
        hjmodel.export({**grouped, "b": np.zeros(5)}, X, tmp_path / "y" / "1")
    with pytest.raises(CalibrationError, match="alpha=0.01 cannot be reached"):
        hjmodel.export(grouped, X[:40], tmp_path / "z" / "1", alpha=0.01)
    with pytest.raises(TypeError, match="hjmodel.nn"):
        hjmodel.export(torch.nn.Linear(4, 2), X, tmp_path / "w" / "1")


# ------------------------------------------------------------------------------------ ONNX import


class _Grouped(torch.nn.Module):
    """(x - mu) / sd -> Linear -> (-1, K, P) -> eps * logsumexp(a / eps): K classes."""

    def __init__(self, d=6, K=3, P=4, eps=0.7):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.lin, self.K, self.P, self.eps = torch.nn.Linear(d, K * P), K, P, eps
        with torch.no_grad():   # its own weights, not the global generator's (whose state depends on test order)
            self.lin.weight.copy_(torch.randn(K * P, d, generator=g) / math.sqrt(d))
            self.lin.bias.copy_(0.1 * torch.randn(K * P, generator=g))
        self.mu, self.sd = torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.5

    def forward(self, x):
        a = self.lin((x - self.mu) / self.sd).reshape(-1, self.K, self.P)
        return self.eps * torch.logsumexp(a / self.eps, dim=2)


class _Single(torch.nn.Module):
    """x W^T (a Gemm-free MatMul), then an affine input chain folded in, one LSE: regression."""

    def __init__(self, d=5):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(d, 8))
        self.b = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        return torch.logsumexp((x * 2.0 + 1.0) @ self.W + self.b, dim=1, keepdim=True)


class _Relu(torch.nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(d, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.logsumexp(self.l2(torch.relu(self.l1(x))), dim=1)


class _Softmax(torch.nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.l1 = torch.nn.Linear(d, 3)

    def forward(self, x):
        return torch.softmax(self.l1(x), dim=1)


def _onnx(module, d, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, d),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


@pytest.mark.parametrize("module, d, task", [(_Grouped(), 6, "classification"), (_Single(), 5, "regression")])
def test_onnx_lse_networks_are_imported_exactly(module, d, task, tmp_path):
    source = _onnx(module, d, tmp_path / "third_party.onnx")
    model = import_onnx(source, np.random.default_rng(0).normal(size=(400, d)), tmp_path / "m" / "1")
    assert model.task == task
    x = np.random.default_rng(1).normal(size=(64, d)).astype(np.float32)
    want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    back = load_model(tmp_path / "m" / "1")
    with torch.no_grad():
        got = back.head.outputs(back.head.preactivations(back.features(torch.as_tensor(x, dtype=DT)))).numpy()
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)
    state = lse_state_from_onnx(source)
    assert ("mu" in state) == (task == "classification") or "A" in state


@pytest.mark.parametrize("module, node", [(_Relu(), "Relu"), (_Softmax(), "Softmax")])
def test_other_graphs_are_refused_naming_the_first_node_that_does_not_fit(module, node, tmp_path):
    source = _onnx(module, 5, tmp_path / "other.onnx")
    with pytest.raises(ArtifactError, match=rf"not an LSE network: node '[^']*' \({node}\) does not fit"):
        import_onnx(source, np.zeros((100, 5)), tmp_path / "m" / "1")


def test_corrupt_onnx_is_refused(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(ArtifactError, match="not a valid ONNX model"):
        lse_state_from_onnx(tmp_path / "bad.onnx")


def test_cli_twins(tmp_path, capsys):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 4))
    np.savez(tmp_path / "state.npz", W=rng.normal(size=(8, 4)), b=np.zeros(8), eps=np.array(0.5), pieces=np.array(4))
    np.savez(tmp_path / "cal.npz", X=X, y=rng.integers(0, 2, 300))
    assert cli(["export", "--state", str(tmp_path / "state.npz"), "--calibration", str(tmp_path / "cal.npz"),
                "--out", str(tmp_path / "a" / "1"), "--class-names", "no", "yes"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "classification" and "calibration_accuracy" in report["metrics"]
    assert hjmodel.read_artifact_spec(tmp_path / "a" / "1").class_names == ("no", "yes")
    source = _onnx(_Single(4), 4, tmp_path / "s.onnx")
    assert cli(["import-onnx", str(source), "--calibration", str(tmp_path / "cal.npz"), "--out",
                str(tmp_path / "b" / "1")]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "regression"
    assert cli(["import-onnx", str(_onnx(_Relu(4), 4, tmp_path / "r.onnx")), "--calibration",
                str(tmp_path / "cal.npz"), "--out", str(tmp_path / "c" / "1")]) == 2
    assert "Relu" in capsys.readouterr().err
    (tmp_path / "evil.pt").write_bytes(b"not a tensor file")
    assert cli(["export", "--state", str(tmp_path / "evil.pt"), "--calibration", str(tmp_path / "cal.npz"),
                "--out", str(tmp_path / "d" / "1")]) == 2


def test_readme_tutorial_runs_end_to_end(tmp_path):
    """The README's tutorial is examples/byom_tutorial.py: trains in a plain loop, exports, serves
    on a real server (REST + gRPC), queries with Triton's gRPC client."""
    source = (ROOT / "examples" / "byom_tutorial.py").read_text()
    block = re.search(r"# tutorial: begin\n(.*?)    # tutorial: end", source, re.S).group(1)
    readme = (ROOT / "README.md").read_text()
    dedented = "\n".join(line[4:] for line in block.splitlines())
    assert dedented.strip() in readme, "the README's tutorial differs from examples/byom_tutorial.py"
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "byom_tutorial.py"), "--repository", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["accuracy"] > 0.9 and summary["module_agrees"] and summary["median_certified_radius"] > 0
    assert summary["ood_flag_rate"] < 0.2


# ------------------------------------------------- weights and rows no certificate holds for


def _grouped_state(**over):
    rng = np.random.default_rng(1)
    state = {"W": rng.normal(size=(6, 4)), "b": np.zeros(6), "eps": 0.5, "groups": np.kron(np.eye(3), np.ones(2)) > 0}
    return {**state, **over}


def _memory_state(**over):
    S = np.random.default_rng(1).normal(size=(20, 4))
    state = {"W": S / 2, "b": -(S ** 2).sum(1) / 4, "eps": 1.0, "V": np.eye(3)[np.arange(20) % 3],
             "labels": np.arange(20) % 3}
    return {**state, **over}


_ROWS = np.random.default_rng(2).normal(size=(300, 4))

BAD_WEIGHTS = {
    # on 00333c1 each of these exported; a negative eps (a soft minimum, not an LSE) served radii that
    # pgd_l2 crossed on 100 of 100 rows, weights of 1e155 radii of NaN (FLT_MAX through onnxruntime,
    # whose Clip reads NaN as its upper end), a NaN in a memory head's values radii of inf
    "eps 0": (_grouped_state(eps=0.0), r"eps must be a finite number > 0, got 0\.0"),
    "eps < 0": (_grouped_state(eps=-1.0), r"eps must be a finite number > 0, got -1\.0"),
    "eps NaN": (_grouped_state(eps=math.nan), r"eps must be a finite number > 0, got nan"),
    "eps inf": (_grouped_state(eps=math.inf), r"eps must be a finite number > 0, got inf"),
    "eps two values": (_grouped_state(eps=np.array([0.5, 2.0])), r"eps must be one number, got \[0\.5, 2\.0\]"),
    "t 0": (_grouped_state(t=0.0), r"t must be a finite number > 0, got 0\.0"),
    "t < 0": (_grouped_state(t=-1.0), r"t must be a finite number > 0, got -1\.0"),
    "t NaN": (_grouped_state(t=math.nan), r"t must be a finite number > 0, got nan"),
    "W NaN": (_grouped_state(W=np.where(np.eye(6, 4) > 0, np.nan, 1.0)), r"head\.W holds NaN or Inf"),
    "b Inf": (_grouped_state(b=np.array([np.inf, 0, 0, 0, 0, 0])), r"head\.b holds NaN or Inf"),
    "mu NaN": (_grouped_state(mu=np.array([np.nan, 0, 0, 0])), r"preprocess\.mu holds NaN or Inf"),
    "A Inf": (_grouped_state(A=np.diag([np.inf, 1, 1, 1])), r"preprocess\.A holds NaN or Inf"),
    "W too large": (_grouped_state(W=1e155 * np.random.default_rng(1).normal(size=(6, 4))),
                    r"too large for float64: the certificate's constants overflow"),
    "empty group": (_grouped_state(groups=np.array([[1] * 6, [0] * 6, [0] * 6], bool)),
                    r"group 1 has no neurons"),
    "W complex": (_grouped_state(W=np.ones((6, 4)) * (1 + 1j)), r"W must be real numbers, got complex128"),
    "W one-dimensional": (_grouped_state(W=np.ones(6)), r"W must have shape \(N, d\) with N >= 1, got \(6,\)"),
    "no neurons": (_grouped_state(W=np.zeros((0, 4)), b=np.zeros(0), groups=np.zeros((3, 0), bool)),
                   r"W must have shape \(N, d\) with N >= 1, got \(0, 4\)"),
    "pieces 0": ({k: v for k, v in _grouped_state().items() if k != "groups"} | {"pieces": 0},
                 r"pieces must be a positive integer, got 0"),
    "mu shape": (_grouped_state(mu=np.zeros(3)), r"mu must have shape \(4,\), got \(3,\)"),
    "A shape": (_grouped_state(A=np.eye(5)), r"preprocess\.A must have 4 rows \(head\.W's columns\), got \(5, 5\)"),
    "V NaN": (_memory_state(V=np.where(np.eye(20, 3) > 0, np.nan, 0.0)), r"head\.V holds NaN or Inf"),
    "V rows": (_memory_state(V=np.eye(3)[np.arange(19) % 3]), r"V must have shape \(20, K\), got \(19, 3\)"),
    "labels length": (_memory_state(labels=np.arange(19) % 3), r"labels must have shape \(20,\), got \(19,\)"),
    "labels out of range": (_memory_state(labels=np.arange(20) % 3 + 5), r"labels must be class indices in \[0, 3\)"),
    "labels not integers": (_memory_state(labels=np.arange(20) % 3 + 0.5),
                            r"labels must be class indices \(integers\), got float64 values such as \[0\.5, 1\.5, 2\.5\]"),
    # soft values: the served prediction (argmax sum_j pi_j V_j) and the class the OOD reference and
    # the attacks read (head.log_probabilities, one-hot only) differed on 137 of 500 rows on 2e5ee9e
    "soft values": (_memory_state(V=np.random.default_rng(3).dirichlet(np.ones(3), size=20),
                                  labels=np.random.default_rng(3).dirichlet(np.ones(3), size=20).argmax(1)),
                    r"head\.V of a memory classifier must be the one-hot rows of its labels"),
    "labels negative": (_memory_state(labels=-np.ones(20, int)), r"labels must be class indices in \[0, 3\)"),
    "labels disagree with V": (_memory_state(labels=(np.arange(20) + 1) % 3),
                               r"labels disagree with V's one-hot rows \(support point 0: label 1, V's class 0\)"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_weights_no_certificate_holds_for_are_refused_naming_the_part(case, tmp_path):
    state, message = BAD_WEIGHTS[case]
    with pytest.raises(ValueError, match=message):
        hjmodel.export(state, _ROWS, tmp_path / "m" / "1", class_names=["a", "b", "c"])
    assert not (tmp_path / "m").exists()


def test_a_classifier_of_one_class_is_refused(tmp_path):
    """On 58a9ac3 one group exported as a classifier: its one class everywhere, radius inf."""
    with pytest.raises(ValueError, match=r"a classifier needs two classes or more, got 1"):
        hjmodel.export(_grouped_state(groups=np.ones((1, 6), bool)), _ROWS, tmp_path / "m" / "1", task="classification")


@pytest.mark.parametrize("hidden", [(), (5,)])
def test_modules_with_a_non_positive_eps_are_refused_at_export(hidden, tmp_path):
    module = hjmodel.nn.LSEClassifier(4, 3, pieces=2, eps=1.0, hidden=hidden)
    (module.body[0] if hidden else module.head).eps = -1.0
    where = "body.0" if hidden else "head"
    with pytest.raises(ValueError, match=rf"{where}\.eps must be a finite number > 0, got -1\.0"):
        hjmodel.export(module, _ROWS, tmp_path / "m" / "1")


BAD_ROWS = {
    "calibration Inf": ({"calibration_data": np.where(np.eye(300, 4) > 0, np.inf, _ROWS)},
                        r"calibration_data: X contains NaN or Inf"),
    "calibration NaN, labelled": ({"calibration_data": (np.full((300, 4), np.nan), np.zeros(300, int))},
                                  r"calibration_data: X contains NaN or Inf"),
    "reference NaN": ({"calibration_data": _ROWS, "reference_data": np.full((50, 4), np.nan)},
                      r"reference_data: X contains NaN or Inf"),
    "calibration complex": ({"calibration_data": _ROWS.astype(complex)}, r"calibration_data: X must be real numbers, got complex128"),
    "calibration columns": ({"calibration_data": _ROWS[:, :3]}, r"calibration_data: X has 3 columns, the model reads 4"),
    "reference columns": ({"calibration_data": _ROWS, "reference_data": _ROWS[:, :5].repeat(2, 1)},
                          r"reference_data: X has 8 columns, the model reads 4"),
    "calibration labels": ({"calibration_data": (_ROWS, np.zeros(299, int))},
                           r"calibration_data: X has 300 rows but y has 299"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_calibration_and_reference_rows_are_checked(case, tmp_path):
    """On 00333c1 a row of Inf among the calibration rows was taken (its p-value rank is then
    computed against an Inf statistic), and a wrong column count failed deep in torch."""
    rows, message = BAD_ROWS[case]
    with pytest.raises(hjmodel.DataError, match=message):
        hjmodel.export(_grouped_state(), out=tmp_path / "m" / "1", **rows)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("reference", ["one row", "fifty alike", "two rows"])
def test_a_gate_that_could_never_fire_is_refused(reference, tmp_path):
    """On 58a9ac3 reference rows too few or alike calibrated a gate whose statistic was NaN on 299 of
    300 calibration rows, and the served gate flagged every in-distribution row (its false-flag rate
    1.0 at alpha 0.05). Once the statistic is a number there, such a gate flags nothing, ever: its
    calibration rows already reach the largest statistic an input can have. Export refuses it."""
    rows = {"one row": _ROWS[:1], "fifty alike": np.repeat(_ROWS[:1], 50, 0), "two rows": _ROWS[:2]}[reference]
    with pytest.raises(CalibrationError, match=r"the OOD gate could never fire at alpha=0\.05: \d+ of its 300 "
                                                r"calibration rows already reach the largest statistic"):
        hjmodel.export(_grouped_state(), _ROWS, tmp_path / "m" / "1", reference_data=rows)
    assert not (tmp_path / "m").exists()


def test_calibration_rows_that_are_reference_rows_inflate_the_false_flag_rate_and_are_refused(tmp_path):
    """The gate's premise: a calibration row is scored like a new input. One that is also a
    reference row is scored against a measure that holds it, looks typical, and the gate calibrated
    on such rows flags new in-distribution rows far more often than alpha -- measured here through
    ``calibrate`` itself. On 58a9ac3 export took such rows (the same rows as both, a superset, half)
    without a word; it now refuses them, and still takes data that repeats rows of its own accord."""
    from hjmodel.byom import to_hjmodel
    from hjmodel.train import TrainConfig, calibrate

    rng = np.random.default_rng(7)
    X, fresh = rng.normal(size=(2000, 4)), rng.normal(size=(20_000, 4))
    rates = {}   # 1,000 calibration rows: one deployment's rate lies within 0.05 +- 0.014 95% of the time
    for case, (ref, cal) in {"disjoint": (X[1000:], X[:1000]), "the same rows": (X[:1000], X[:1000])}.items():
        model = to_hjmodel(_grouped_state())
        calibrate(model, torch.as_tensor(ref), torch.as_tensor(cal), TrainConfig(progress=False))
        rates[case] = float(model.served(fresh, ("ood_flag",))["ood_flag"].double().mean())
    assert rates["disjoint"] <= 0.075 and rates["the same rows"] >= 0.15, rates
    for ref in (X[:300], X, X[150:450]):
        with pytest.raises(CalibrationError, match=r"\d+% of the calibration rows are also reference rows \(the "
                                                    r"reference rows repeat one another at 0%\)"):
            hjmodel.export(_grouped_state(), X[:300], tmp_path / "m" / "1", reference_data=ref)
        assert not (tmp_path / "m").exists()
    coarse = rng.integers(0, 3, size=(900, 4)).astype(float)   # 81 possible rows: every row repeats
    hjmodel.export(_grouped_state(), coarse[:300], tmp_path / "m" / "1", reference_data=coarse[300:])


BAD_OPTIONS = {
    # on 00333c1 each of these wrote an artifact: one the server refuses to load (alpha 2, three
    # feature names for four features), a manifest and no model file (formats), or one whose
    # explanations name two classes or features alike; alpha NaN and seed -1 failed deep inside
    "alpha 2": ({"alpha": 2.0}, hjmodel.ConfigError, r"alpha must be in \(0, 1\), got 2\.0"),
    "alpha NaN": ({"alpha": math.nan}, hjmodel.ConfigError, r"alpha must be in \(0, 1\), got nan"),
    "seed -1": ({"seed": -1}, hjmodel.ConfigError, r"seed must be an integer >= 0, got -1"),
    "reference size 0": ({"reference_size": 0}, hjmodel.ConfigError, r"reference_size must be an integer >= 1, got 0"),
    "an unknown format": ({"formats": ("pickle",)}, ValueError,
                          r"formats must name one or both of 'onnx' and 'torch', got \['pickle'\]"),
    "no format": ({"formats": ()}, ValueError, r"formats must name one or both of 'onnx' and 'torch', got \[\]"),
    "class names twice": ({"class_names": ["a", "b", "a"]}, ValueError, r"class names must differ: 'a' twice"),
    "feature names, too few": ({"feature_names": ["a", "b", "c"]}, ValueError, r"3 feature names for 4 features"),
    "feature names twice": ({"feature_names": ["a", "b", "a", "c"]}, ValueError, r"feature names must differ: 'a' twice"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_export_options_are_checked_before_anything_is_written(case, tmp_path):
    options, error, message = BAD_OPTIONS[case]
    with pytest.raises(error, match=message):
        hjmodel.export(_grouped_state(), _ROWS, tmp_path / "m" / "1", **options)
    assert not (tmp_path / "m").exists()
