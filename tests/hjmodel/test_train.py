"""Training: seeded reproducibility, dataset loading (.csv / .npz / built-ins), classification and
regression, malformed datasets raising :class:`hjmodel.DataError`, and the demo models' held-out
accuracy (read from the built demo repository and re-measured from the artifacts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hjmodel import DataError, TrainConfig, load_dataset, load_model, read_spec, train
from hjmodel.data import Dataset
from hjmodel.train import _split

QUICK = {"lse": dict(kind="lse", pieces=3, epochs=4),
         "memory": dict(kind="memory", epochs=3),
         "deep": dict(kind="deep", hidden=[6], hidden_pieces=2, pieces=2, epochs=4)}


def _cfg(kind: str, **kw) -> TrainConfig:
    return TrainConfig(**{**QUICK[kind], "progress": False, **kw})


def _tensors(model) -> dict[str, torch.Tensor]:
    ref = model.reference
    return {**model.state_dict(), "ref.points": ref.points, "ref.nu": ref.norm_unsupported,
            "ref.na": ref.norm_ambiguous, "ref.comb": ref.combined}


# ------------------------------------------------------------------------------------ reproducibility


@pytest.mark.parametrize("kind", list(QUICK))
def test_same_seed_identical_weights(kind):
    data = load_dataset("iris")
    m1, r1 = train(data, _cfg(kind, seed=3))
    m2, r2 = train(data, _cfg(kind, seed=3))
    t1, t2 = _tensors(m1), _tensors(m2)
    assert t1.keys() == t2.keys()
    for k in t1:
        assert torch.equal(t1[k], t2[k]), k
    assert r1.metrics == r2.metrics and r1.splits == r2.splits
    assert m1.head.eps == m2.head.eps and m1.head.t == m2.head.t
    m3, r3 = train(data, _cfg(kind, seed=4))
    assert r3.splits != r1.splits
    assert not torch.equal(m3.head.b, m1.head.b)


def test_provenance_records_data_and_settings():
    data = load_dataset("iris")
    model, report = train(data, _cfg("lse", seed=1))
    prov = model.meta["provenance"]
    assert prov["data_sha256"] == data.sha256 and len(prov["data_sha256"]) == 64
    assert prov["train_config"]["seed"] == 1 and prov["train_config"]["kind"] == "lse"
    assert prov["n_train"] + prov["n_calibration"] + prov["n_test"] == len(data.X)
    assert model.meta["metrics"] == report.metrics
    # the splits are disjoint and cover the data
    idx = np.concatenate([report.splits[k] for k in ("train", "calibration", "test")])
    assert sorted(idx.tolist()) == list(range(len(data.X)))


# ------------------------------------------------------------------------------------ tasks


@pytest.mark.parametrize("kind", ["lse", "memory"])
def test_regression(kind):
    data = load_dataset("diabetes")
    model, report = train(data, TrainConfig(kind=kind, pieces=4, epochs=30, lr=0.05, progress=False))
    assert model.task == "regression" and model.n_outputs == 1
    assert report.metrics["r2"] > 0.3 and report.metrics["rmse"] < data.y.std()
    x = torch.as_tensor(data.X[:7])
    pred = model.predict(x)
    assert pred.shape == (7, 1)
    ev = model.evaluate(x, tau=5.0)
    assert bool((ev["certified_radius"] > 0).all())
    assert torch.equal(pred, ev["prediction"])   # the cheap predict path is the served prediction


def test_classification_multi_kind():
    data = load_dataset("wine")
    for kind in QUICK:
        model, report = train(data, _cfg(kind, epochs=10))
        assert model.task == "classification" and model.n_outputs == 3
        assert model.class_names == data.class_names
        assert report.metrics["accuracy"] > 0.6, (kind, report.metrics)
        x = torch.as_tensor(data.X)
        assert torch.equal(model.predict(x), model.evaluate(x)["prediction"]), kind


# ------------------------------------------------------------------------------------ file formats


def _blobs(n: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 4)) + 3.0 * np.eye(3, 4)[y]
    return X, y


def test_csv_classification_with_string_labels(tmp_path):
    X, y = _blobs()
    names = np.array(["cat", "dog", "eel"])[y]
    path = tmp_path / "animals.csv"
    lines = ["f0,f1,label,f2,f3"] + [f"{a},{b},{c},{d},{e}" for (a, b, d, e), c in zip(X, names)]
    path.write_text("\n".join(lines) + "\n\n")        # a trailing blank line is fine
    data = load_dataset(str(path), target="label")
    assert data.task == "classification" and data.class_names == ["cat", "dog", "eel"]
    assert data.feature_names == ["f0", "f1", "f2", "f3"]
    np.testing.assert_allclose(data.X, X)
    model, report = train(data, _cfg("lse", epochs=20))
    assert model.class_names == ["cat", "dog", "eel"] and report.metrics["accuracy"] > 0.8


def test_csv_regression_last_column(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=120)
    path = tmp_path / "lin.csv"
    path.write_text("a,b,c,y\n" + "\n".join(",".join(map(str, [*r, t])) for r, t in zip(X, y)) + "\n")
    data = load_dataset(str(path))
    assert data.task == "regression" and data.X.shape == (120, 3)
    model, report = train(data, _cfg("lse", epochs=30, pieces=2))
    assert model.task == "regression" and report.metrics["r2"] > 0.5


def test_npz(tmp_path):
    X, y = _blobs()
    path = tmp_path / "blobs.npz"
    np.savez(path, X=X, y=y)
    data = load_dataset(str(path))
    assert data.task == "classification" and data.name == "blobs" and len(data.class_names) == 3
    np.testing.assert_array_equal(data.y, y)
    model, report = train(data, _cfg("memory"))
    assert report.metrics["accuracy"] > 0.8
    # same file, forced regression
    assert load_dataset(str(path), task="regression").task == "regression"


# ------------------------------------------------------------------------------------ bad datasets


def _npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


BAD = {
    "missing file": (lambda p: str(p / "nope.csv"), r"no dataset .*no such file"),
    "unknown suffix": (lambda p: (p / "d.txt").write_text("1,2\n") and str(p / "d.txt"), r"unsupported dataset format '\.txt'"),
    "npz without y": (lambda p: _npz(p, X=np.ones((5, 2))), r"needs arrays 'X' and 'y'"),
    "npz object array": (lambda p: _npz(p, X=np.array([[1, "a"]], dtype=object), y=np.array([1])), r"unreadable \.npz"),
    "npz NaN": (lambda p: _npz(p, X=np.array([[1.0, np.nan], [2.0, 3.0]]), y=np.array([0, 1])), r"NaN or Inf"),
    "npz Inf": (lambda p: _npz(p, X=np.array([[1.0, np.inf], [2.0, 3.0]]), y=np.array([0, 1])), r"NaN or Inf"),
    "npz length mismatch": (lambda p: _npz(p, X=np.ones((5, 2)), y=np.zeros(4)), r"X has 5 rows but y has 4"),
    "npz 1-D X": (lambda p: _npz(p, X=np.ones(5), y=np.zeros(5)), r"non-empty 2-D array"),
    "npz empty": (lambda p: _npz(p, X=np.ones((0, 3)), y=np.zeros(0)), r"non-empty 2-D array"),
    "not an npz": (lambda p: (p / "x.npz").write_bytes(b"garbage") and str(p / "x.npz"), r"unreadable \.npz"),
    "csv header only": (lambda p: (p / "h.csv").write_text("a,b,y\n") and str(p / "h.csv"), r"header and at least one row"),
    "csv text feature": (lambda p: (p / "t.csv").write_text("a,b,y\n1,x,0\n") and str(p / "t.csv"), r"non-numeric feature value"),
    "csv short row": (lambda p: (p / "s.csv").write_text("a,b,y\n1,2,0\n3,4\n") and str(p / "s.csv"), r"line 3 has 2 fields, the header has 3"),
    "csv long row": (lambda p: (p / "l.csv").write_text("a,b,y\n1,2,0,9\n") and str(p / "l.csv"), r"line 2 has 4 fields"),
    # on 3dc841e a NaN or Inf target was taken: in a CSV it trained and wrote an artifact, in an
    # .npz it ended in a traceback (eps* of NaN targets)
    "csv NaN target": (lambda p: (p / "n.csv").write_text("a,b,y\n1,2,0.5\n3,4,nan\n") and str(p / "n.csv"),
                       r"y contains NaN or Inf"),
    "npz Inf target": (lambda p: _npz(p, X=np.ones((3, 2)), y=np.array([0.5, np.inf, 1.0])), r"y contains NaN or Inf"),
    "npz complex X": (lambda p: _npz(p, X=np.ones((3, 2), dtype=complex), y=np.zeros(3)), r"X must be real numbers, got complex128"),
    "npz 2-D target": (lambda p: _npz(p, X=np.ones((3, 2)), y=np.ones((3, 2))), r"y must be one target per row"),
    # on 00333c1 two columns of one name trained, and an explanation could not tell them apart
    "csv feature twice": (lambda p: (p / "f.csv").write_text("a,a,y\n1,2,0\n") and str(p / "f.csv"),
                          r"feature names must differ: 'a' twice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_dataset_raises_data_error(case, tmp_path):
    make, pattern = BAD[case]
    with pytest.raises(DataError, match=pattern):
        load_dataset(make(tmp_path))


@pytest.mark.parametrize("exclude, error, message", [
    # on 58a9ac3 an exclusion of a class the data has not was dropped unread ([99], [-1], a name), and
    # excluding all but one class trained a classifier of that one class (radius inf everywhere)
    ([99], "ConfigError", r"exclude_classes must list class indices in \[0, 3\), got \[99\]"),
    ([-1], "ConfigError", r"exclude_classes must list class indices in \[0, 3\), got \[-1\]"),
    (["setosa"], "ConfigError", r"got \['setosa'\]"),
    ([0, 1], "DataError", r"a classifier needs rows of two classes or more, got 1 \(virginica\)"),
])
def test_excluded_classes_are_checked(exclude, error, message):
    import hjmodel

    with pytest.raises(getattr(hjmodel, error), match=message):
        train(load_dataset("iris"), TrainConfig(epochs=1, exclude_classes=exclude, progress=False))


def test_a_dataset_of_one_class_is_refused(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("a,b,y\n" + "".join(f"{i},{i % 7},cat\n" for i in range(60)))
    with pytest.raises(DataError, match=r"a classifier needs rows of two classes or more, got 1 \(cat\)"):
        train(load_dataset(str(path)), TrainConfig(epochs=1, progress=False))


def test_csv_unknown_target_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,y\n1,2,0\n")
    with pytest.raises(DataError, match=r"no target column 'label'"):
        load_dataset(str(path), target="label")


def test_too_small_to_split():
    X, y = _blobs(12)
    with pytest.raises(DataError, match="too small to split"):
        train(Dataset(X, y, "classification", "tiny", ["0", "1", "2"]), _cfg("lse"))


def test_exclude_classes_needs_classification():
    with pytest.raises(ValueError, match="exclude_classes needs a classification dataset"):
        train(load_dataset("diabetes"), _cfg("lse", exclude_classes=[1]))


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind"):
        train(load_dataset("iris"), TrainConfig(kind="transformer", progress=False))


# ------------------------------------------------------------------------------------ demo accuracy


DEMO_FLOORS = {"digits_lse": 0.97, "digits_memory": 0.98}


@pytest.mark.parametrize("name", list(DEMO_FLOORS))
def test_demo_held_out_accuracy(name, demo_repository):
    results = json.loads((demo_repository / "DEMO_RESULTS.json").read_text())
    directory = demo_repository / name / "1"
    spec = read_spec(directory)
    assert results[name]["accuracy"] == pytest.approx(spec["metrics"]["accuracy"], abs=1e-12)
    assert spec["metrics"]["accuracy"] >= DEMO_FLOORS[name], spec["metrics"]
    # re-measured from the artifact on the same held-out split (reconstructed from the provenance)
    model = load_model(directory)
    data = load_dataset("digits")
    cfg = TrainConfig(**spec["provenance"]["train_config"])
    test = _split(len(data.X), cfg, np.random.default_rng(cfg.seed))[2]
    assert len(test) == spec["metrics"]["n"] == spec["provenance"]["n_test"]
    pred = model.predict(torch.as_tensor(data.X[test])).numpy()
    accuracy = float((pred == data.y[test]).mean())
    assert accuracy == pytest.approx(spec["metrics"]["accuracy"], abs=1e-12)
    assert spec["provenance"]["data_sha256"] == data.sha256


@pytest.mark.parametrize("name", ["digits_lse", "digits_memory", "digits_deep", "diabetes_lse"])
def test_row_blocks_change_nothing(name, demo_repository, monkeypatch):
    """A batch evaluated in row blocks (what many rows against many support points take) gives every
    output and the forward trace as in one block (to the last bits BLAS may round differently at
    another batch size; decisions and integers exactly); ``served`` and ``predict`` likewise."""
    import hjmodel.models as models

    model = load_model(demo_repository / name / "1").double()
    X = torch.as_tensor(np.random.default_rng(5).normal(8.0, 5.0, (37, model.n_features)))
    whole = model.evaluate(X, tau=torch.linspace(0.1, 3.0, 37))
    whole_pred = model.predict(X)
    monkeypatch.setattr(models, "BLOCK_ELEMENTS", 5 * model.row_elements)      # blocks of 5 rows
    assert len(model.row_blocks(37)) == 8
    blocked = model.evaluate(X, tau=torch.linspace(0.1, 3.0, 37))
    def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        if a is None or b is None:
            return a is None and b is None
        if a.is_floating_point():
            return torch.allclose(a, b, rtol=1e-9, atol=1e-15)
        return torch.equal(a, b)

    for key in whole.outputs:
        assert same(whole[key], blocked[key]), key
    for field in ("h", "a", "pi", "decision", "n_keep", "dominant", "log_probs"):
        assert same(getattr(whole, field), getattr(blocked, field)), field
    assert same(model.predict(X), whole_pred)
    served = model.served(X, ("prediction", "certified_radius", "ood_p_value"), tau=torch.linspace(0.1, 3.0, 37))
    for key, value in served.items():
        assert same(value, whole[key]), key


@pytest.mark.parametrize("name", ["digits_lse", "digits_memory", "digits_deep", "diabetes_lse", "memory regression"])
def test_decisions_are_evaluates_forward_trace(name, demo_repository, memory_regression, monkeypatch):
    """``decisions`` (what calibration asks of every training row) answers the features and class
    log-probabilities :meth:`evaluate` computes, bit for bit, in one block and in row blocks (both
    in the same blocks: BLAS may round the last bits differently at another batch size)."""
    import hjmodel.models as models

    model = memory_regression if name == "memory regression" else load_model(demo_repository / name / "1").double()
    X = torch.as_tensor(np.random.default_rng(6).normal(8.0, 5.0, (23, model.n_features)))
    for block in (None, 4):
        if block:
            monkeypatch.setattr(models, "BLOCK_ELEMENTS", block * model.row_elements)
            assert len(model.row_blocks(23)) == 6
        whole = model.evaluate(X, outputs=())
        h, log_p = model.decisions(X)
        assert torch.equal(h, whole.h)
        assert (log_p is None) == (whole.log_probs is None) == (model.task == "regression")
        assert log_p is None or torch.equal(log_p, whole.log_probs)


def test_kcenter_is_the_greedy_covering():
    """Greedy k-center against a brute-force check of its definition: each pick is the row farthest
    from the rows picked before it, the first the row nearest the mean; its covering radius is at
    most twice the optimal one (checked against all subsets of a tiny set)."""
    import itertools

    from hjmodel.train import kcenter

    g = torch.Generator().manual_seed(3)
    H = torch.randn(40, 3, generator=g, dtype=torch.float64)
    picks = kcenter(H, 6).tolist()
    assert picks[0] == int(((H - H.mean(0)) ** 2).sum(-1).argmin()) and len(set(picks)) == 6
    for i in range(1, 6):
        d = torch.cdist(H, H[picks[:i]]).min(-1).values
        assert picks[i] == int(d.argmax())
    small = H[:12]
    cover = torch.cdist(small, small[kcenter(small, 3)]).min(-1).values.max()
    best = min(float(torch.cdist(small, small[list(s)]).min(-1).values.max())
               for s in itertools.combinations(range(12), 3))
    assert float(cover) <= 2 * best + 1e-12
    assert kcenter(H, 100).tolist() == list(range(40))


def test_kcenter_support_is_a_per_class_coreset():
    """--support kcenter: memory_size support points split over the classes by their share, every
    class represented, and (on digits, 30 points) a better classifier than 30 random points."""
    from hjmodel import load_dataset

    data = load_dataset("digits")
    accs = {}
    for support in ("random", "kcenter"):
        model, report = train(data, TrainConfig(kind="memory", memory_size=30, support=support, seed=0,
                                                progress=False))
        assert model.head.W.shape[0] == 30
        accs[support] = report.metrics["accuracy"]
        if support == "kcenter":
            assert sorted(torch.unique(model.head.labels).tolist()) == list(range(10))
            assert model.meta["provenance"]["train_config"]["support"] == "kcenter"
    assert accs["kcenter"] > accs["random"] + 0.05, accs
    with pytest.raises(ValueError, match="support selection"):
        train(data, TrainConfig(kind="memory", memory_size=30, support="nearest", progress=False))


def test_row_blocks_are_larger_on_a_gpu_within_its_free_memory(monkeypatch):
    """On a GPU, where a block costs a whole call's kernel launches, a block may hold up to
    GPU_BLOCK_ELEMENTS, within 1/16 of the free device memory in float64, never less than on the CPU
    (bench/results/ab_gpu_blocks.md)."""
    import hjmodel.models as models

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert models.block_elements(cpu) == models.BLOCK_ELEMENTS
    assert models.block_elements(cpu, free_bytes=1 << 40) == models.BLOCK_ELEMENTS   # the CPU's never grows
    assert models.block_elements(cuda, free_bytes=140 << 30) == models.GPU_BLOCK_ELEMENTS
    assert models.block_elements(cuda, free_bytes=8 << 30) == (8 << 30) // (8 * 16)   # 1/16 of it in float64
    assert models.block_elements(cuda, free_bytes=1 << 20) == models.BLOCK_ELEMENTS   # a nearly full GPU
    # read from the device when not given: the driver's free memory and what torch's cache holds unused
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 12 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 << 30)
    assert models.block_elements(cuda) == (24 << 30) // (8 * 16)


_BLOCK_PEAK = """
import re, sys, numpy as np, torch
import hjmodel.models as models
from hjmodel.artifact import load_serving_module, traced_or_eager

def kib(field):   # this process's own memory (ru_maxrss would include the parent's from before exec)
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read())[1])

module = load_serving_module(sys.argv[1]).eval()
run = traced_or_eager(module, "m") if sys.argv[2] == "trace" else module
n = models.BLOCK_ELEMENTS // module.model.row_elements          # one full block
assert len(module.blocks(n)) == 1
x = torch.from_numpy(np.random.default_rng(0).normal(8, 5, (n, module.model.n_features)).astype(np.float32))
t = torch.full((n, 1), 0.1, dtype=torch.float64)
with torch.inference_mode():
    run(x[:2], t[:2])                                            # tables built on first use, not the block's
    open("/proc/self/clear_refs", "w").write("5")                # the peak from here on
    before = kib("VmRSS")
    run(x, t)
print((kib("VmHWM") - before) * 1024 / (8 * models.BLOCK_ELEMENTS))
"""


@pytest.mark.parametrize("name", ["digits_memory", "digits_lse"])
def test_a_full_row_block_peaks_well_within_sixteen_times_its_largest_tensor(name, demo_repository):
    """The GPU's block budget (1/16 of free memory for the largest tensor) rests on a block's peak
    memory staying below 16x its largest tensor in float64. The CPU runs the same operations: a
    block filled to BLOCK_ELEMENTS, eager and traced, peaks at most ~11x (digits_memory eager, the
    largest of the demo models), well inside 16."""
    for mode in ("eager", "trace"):
        run = subprocess.run([sys.executable, "-c", _BLOCK_PEAK, str(demo_repository / name / "1"), mode],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-2000:]
        ratio = float(run.stdout.strip().splitlines()[-1])
        assert 0 < ratio < 16, (name, mode, ratio)


def test_train_config_checks_ranges_and_takes_numpy_numbers():
    """Settings out of range are refused before any epoch (the CLI's cases: test_cli.ERRORS); numpy
    numbers, which a sweep over np.arange hands in, are numbers like any other."""
    from hjmodel import ConfigError

    TrainConfig(epochs=np.int64(3), lr=np.float32(0.1), pieces=np.int32(2), alpha=np.float64(0.1),
                seed=np.int64(1), hidden=[np.int64(4)], eps=np.float32(0.5))
    for bad in ({"epochs": True}, {"epochs": 2.5}, {"lr": "x"}, {"alpha": float("nan")}, {"weight_decay": -1.0},
                {"eps": -1.0}, {"hidden": [4, 0]}, {"reference_size": 0}):
        with pytest.raises(ConfigError, match=f"{next(iter(bad))} must"):
            TrainConfig(**bad)
