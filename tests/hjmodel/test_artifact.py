"""Artifacts: ONNX vs torch parity on every served output of every demo model, ``hjmodel verify``,
save/load round trips, and every way a broken or hostile artifact must be refused with
:class:`hjmodel.ArtifactError` (never by executing code from the file)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hjmodel import (
    ArtifactError,
    TrainConfig,
    load_dataset,
    load_model,
    load_serving_module,
    read_spec,
    save_artifact,
    train,
)
from hjmodel import functional as F
from hjmodel.artifact import ONNX_FILE, SPEC_FILE, TORCH_FILE, model_spec, served_form, verify_checksums
from hjmodel.predictor import Predictor
from hjmodel.serving import CHECKSUM_FILE, EXPLAIN_FILE, outputs_for
from hjmodel.verify import DEMO_DATA, served_outputs, verify
from hjmodel.verify import parity_inputs as _parity_inputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("batch", [1, 4096])
@pytest.mark.parametrize("name", list(DEMO_DATA))
def test_onnx_matches_torch_on_every_output(name, batch, demo_repository):
    """Tolerances. Both graphs compute every output in float64 from the same float32 input and
    cast once to float32 at the end; float64 kernel differences (summation order, exp/log) are
    ~1e-16 x the output's scale, which can move a float32 result across at most one rounding step.
    So FP32 outputs must agree to 2 float32 ulps (2^-22 relative) plus 2^-40 x the output's largest
    magnitude (for entries that are sums with cancellation, e.g. saliency near 0). Discrete outputs
    (class, top-k indices) must be identical, and so must the OOD outputs, which count calibration
    scores at least the row's statistic: a row that ties one (a calibration row among the parity
    rows) counts it on both runtimes whichever way each rounded (``models._rank_p``'s margins;
    before them, these outputs were let differ on tied rows). One exception: a memory model's tangent radius searches its
    root in float32 (functional._tangent_solve) and proves the estimate in float64; the two
    runtimes' float32 exponentials differ in the last bit, so their estimates -- each proven -- may
    differ by a few float32 steps: ``certified_radius`` agrees to 2^-19 relative."""
    directory = demo_repository / name / "1"
    model = load_model(directory)
    x32 = _parity_inputs(name, batch)
    want, got = served_outputs(directory, x32, threads=2)
    specs = outputs_for(model.task)
    assert sorted(got) == sorted(want) == sorted(o.name for o in specs)
    for o in specs:
        a, b = got[o.name], want[o.name]
        assert a.shape == b.shape and a.dtype == b.dtype, (o.name, a.shape, b.shape, a.dtype, b.dtype)
        assert a.shape[0] == batch
        if o.datatype == "FP32" and o.name != "ood_p_value":
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            assert np.isfinite(a64).all() and np.isfinite(b64).all(), o.name
            scale = float(np.abs(b64).max()) if b64.size else 0.0
            rel = 2.0 ** -19 if o.name == "certified_radius" else 2.0 ** -22
            tol = rel * np.abs(b64) + 2.0 ** -40 * scale
            err = np.abs(a64 - b64)
            assert (err <= tol).all(), f"{name}.{o.name}: max err {err.max():.3e}"
        else:
            assert np.array_equal(a, b), f"{name}.{o.name}: {int((a != b).sum())} entries differ"


@pytest.mark.parametrize("name", list(DEMO_DATA))
def test_a_graph_pruned_to_some_outputs_answers_them_bit_for_bit(name, demo_repository):
    """prune_graph keeps the nodes the named outputs need and nothing else: the same values, bit for
    bit, as the whole graph, from a fraction of its nodes (onnxruntime runs every node of a graph
    whichever outputs are fetched)."""
    import onnx

    from hjmodel.artifact import prune_graph
    from hjmodel.serving import onnx_feeds, open_session

    graph = (demo_repository / name / "1" / ONNX_FILE).read_bytes()
    whole = open_session(graph, threads=1)
    names = [o.name for o in whole.get_outputs()]
    x32 = _parity_inputs(name, 64)
    tau = np.linspace(0.05, 0.5, 64)
    want = dict(zip(names, whole.run(names, onnx_feeds(whole, x32, tau))))
    rng = np.random.default_rng(len(name))
    nodes = len(onnx.load_from_string(graph).graph.node)
    for subset in [["prediction"], ["ood_flag", "prediction"], [n for n in names if n != "certified_radius"],
                   [n for n in names if rng.random() < 0.5] or ["saliency"]]:
        cut = prune_graph(graph, subset)
        session = open_session(cut, threads=1)
        assert [o.name for o in session.get_outputs()] == [n for n in names if n in subset]   # contract order
        assert [i.name for i in session.get_inputs()] == [i.name for i in whole.get_inputs()]
        got = dict(zip(subset, session.run(subset, onnx_feeds(session, x32, tau))))
        for key in subset:
            assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes(), key
        kept = len(onnx.load_from_string(cut).graph.node)
        if subset == ["prediction"]:
            assert kept * 10 < nodes
        assert kept < nodes
        if "certified_radius" not in subset and "probabilities" in names:   # a classifier's radius: most of it
            assert kept * 2 < nodes, (subset, kept, nodes)
    with pytest.raises(ArtifactError, match="no output"):
        prune_graph(graph, ["prediction", "nonsense"])


@pytest.mark.parametrize("name", list(DEMO_DATA))
def test_exporting_a_loaded_artifact_reproduces_it(name, demo_repository, tmp_path):
    """A model fresh from load_model exports the same graphs, byte for byte, as the model that
    wrote the artifact: its lazily built tables (the OOD reference's class groups and affine tables)
    enter the trace as constants, not as the nodes that build them (which had cost a re-exported
    model ~550 nodes, NonZero among them, and the If around the IBP search)."""
    from hjmodel.artifact import EXPLAIN_FILE, export_onnx

    version = demo_repository / name / "1"
    export_onnx(load_model(version), tmp_path / ONNX_FILE)
    for file in (ONNX_FILE, EXPLAIN_FILE):
        if (version / file).exists():
            assert (tmp_path / file).read_bytes() == (version / file).read_bytes(), file


def test_export_keeps_float64_constants_that_float32_cannot_tell_apart(tmp_path):
    """TorchScript's common-subexpression elimination (torch 2.13) merges scalar constants that are
    equal in float32: exporting ``x * (1 + 2**-40)`` and then ``1.0 + x`` wrote 1 + 2**-40 for both.
    In the served graphs that turned the conformal p-values' ``1 + count`` into 1 + 2**-40 once a
    certificate used a 1 + 2**-40 rounding factor (a p-value exactly at alpha then failed to flag),
    and it dropped the attribution order's -1e-300 tie-break to 0. Exports run under
    ``artifact._exact_constants``: every constant keeps its value."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from hjmodel.artifact import _exact_constants

    class Scalars(torch.nn.Module):
        def forward(self, x):
            return x * (1.0 + 2.0 ** -40), 1.0 + x, x * 0.1, x * (0.1 + 1e-12), -1e-300 * (x + 1.0)

    path = tmp_path / "scalars.onnx"
    with _exact_constants():
        torch.onnx.export(Scalars(), (torch.zeros(2, dtype=torch.float64),), str(path), dynamo=False)
    import onnx

    graph = onnx.load(str(path)).graph
    values = {float(numpy_helper.to_array(n.attribute[0].t)) for n in graph.node if n.op_type == "Constant"}
    assert {1.0 + 2.0 ** -40, 1.0, 0.1, 0.1 + 1e-12, -1e-300} <= values
    x = np.array([1.0, 3.0])
    got = ort.InferenceSession(str(path)).run(None, {graph.input[0].name: x})
    for a, b in zip(got, Scalars()(torch.from_numpy(x)), strict=True):
        assert np.array_equal(a, b.numpy())


@pytest.mark.parametrize("name", list(DEMO_DATA))
def test_verify_passes_on_demo(name, demo_repository):
    report = verify(demo_repository / name / "1", n=128)
    assert report["ok"], report
    assert report["theorem_4_1_max_rel_error"] < 1e-10
    assert report["onnx_parity_ok"] and all(report["onnx_parity"].values())
    # every radius onnxruntime serves is at most the float64 model's, or re-proven by it in float64
    radius = report["onnx_radius"]
    assert radius["unproven"] == 0 and radius["above_float64"] == radius["re_proven"], radius


def test_verify_fails_a_runtime_whose_radii_the_float64_model_cannot_prove(demo_repository, monkeypatch):
    """A runtime that served radii 1% too large (past what the bounds hold, though within parity's
    tolerance of 1e-4 only for tiny radii) fails ``verify``; one float32 step too large on a memory
    model (a searched root another runtime may well prove) is re-proven and passes."""
    import hjmodel.verify as V

    served = V.served_outputs

    def scaled(move):
        def run(directory, x32, tau=0.1, threads=1):
            want, got = served(directory, x32, tau, threads)
            return want, {**got, "certified_radius": move(got["certified_radius"])}
        return run

    version = demo_repository / "digits_memory" / "1"
    monkeypatch.setattr(V, "served_outputs", scaled(lambda r: (r.astype(np.float64) * 1.01).astype(np.float32)))
    report = V.verify(version, n=64)
    assert not report["ok"] and report["onnx_radius"]["unproven"] > 0, report["onnx_radius"]
    # one float32 step above the float64 model's own radius (the served one lies below it by the
    # input-rounding allowance, ~1e-5 relative, so its own next step is not above it)
    model = load_model(version).double().eval()

    def step_above(directory, x32, tau=0.1, threads=1):
        want, got = served(directory, x32, tau, threads)
        r64 = model.evaluate(torch.as_tensor(x32).double(), tau=tau)["certified_radius"]
        up = np.nextafter(F.float32_down(r64).numpy().astype(np.float32), np.float32(np.inf))
        return want, {**got, "certified_radius": up}

    monkeypatch.setattr(V, "served_outputs", step_above)
    report = V.verify(version, n=64)
    assert report["onnx_radius"]["re_proven"] > 0, report["onnx_radius"]


# ------------------------------------------------------------------------------------ round trip


@pytest.fixture(scope="module")
def small_artifacts(tmp_path_factory) -> dict[str, Path]:
    """Tiny models of each kind and task, trained in a second, saved in both formats."""
    iris, diabetes = load_dataset("iris"), load_dataset("diabetes")
    cases = {
        "lse": (iris, TrainConfig(kind="lse", pieces=3, epochs=3, progress=False)),
        "memory": (iris, TrainConfig(kind="memory", epochs=2, progress=False)),
        "deep": (iris, TrainConfig(kind="deep", hidden=[6], hidden_pieces=2, pieces=2, epochs=3, progress=False)),
        "lse_regression": (diabetes, TrainConfig(kind="lse", pieces=3, epochs=3, progress=False)),
        "memory_regression": (diabetes, TrainConfig(kind="memory", epochs=2, memory_size=100, progress=False)),
    }
    out = {}
    for name, (data, cfg) in cases.items():
        model, _ = train(data, cfg)
        directory = tmp_path_factory.mktemp(name)
        save_artifact(model, directory)
        out[name] = directory
        out[name + ".x"] = data.X
    return out


@pytest.mark.parametrize("name", ["lse", "memory", "deep", "lse_regression", "memory_regression"])
def test_round_trip_identical_outputs(name, small_artifacts, tmp_path):
    directory = small_artifacts[name]
    x = torch.as_tensor(small_artifacts[name + ".x"][:50], dtype=torch.float64)
    first = load_model(directory)
    save_artifact(first, tmp_path, formats=("torch",))
    second = load_model(tmp_path)
    a, b = first.evaluate(x, tau=0.3), second.evaluate(x, tau=0.3)
    assert a.outputs.keys() == b.outputs.keys()
    for key in a.outputs:
        assert torch.equal(a[key], b[key]), key
    sa, sb = first.state_dict(), second.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert model_spec(first) == model_spec(second) == read_spec(directory) == read_spec(directory / ONNX_FILE)
    assert read_spec(directory)["kind"] == first.kind
    # the serving module (float32 in) equals evaluate on the float32-rounded inputs, in the served
    # form (bounds rounded in their safe direction; the radius less the input-rounding allowance, a
    # regression radius for the outputs as served)
    served = load_serving_module(directory)(x.float(), torch.tensor([0.3], dtype=torch.float64))
    ev = dict(first.evaluate(x.float().double(), tau=0.3, float32_outputs=True).outputs)
    ev["certified_radius"] = F.input_rounding_radius(ev["certified_radius"], x.float())
    datatypes = {o.name: o.datatype for o in outputs_for(first.task)}
    for k, v in served.items():
        assert torch.equal(v, served_form(k, ev[k], datatypes[k])), k


@pytest.mark.parametrize("formats", [("onnx",), ("torch",)])
def test_writing_over_an_artifact_leaves_none_of_its_files(small_artifacts, tmp_path, formats):
    """A version directory written again holds exactly what the last write wrote. On 9fa040c an
    ONNX-only export over an artifact kept the old model.pt (and model.json), and the new manifest
    vouched for them: the torch backend served the old model under the new one's name."""
    target = tmp_path / "1"
    shutil.copytree(small_artifacts["lse"], target)
    deep = load_model(small_artifacts["deep"])
    save_artifact(deep, target, formats=formats)
    written = {"onnx": {ONNX_FILE, EXPLAIN_FILE}, "torch": {TORCH_FILE, SPEC_FILE}}[formats[0]]
    assert {p.name for p in target.iterdir()} == written | {CHECKSUM_FILE}
    assert verify_checksums(target) and read_spec(target)["kind"] == "deep"
    if "torch" in formats:
        assert load_model(target).kind == "deep"
    with pytest.raises(ValueError, match="an empty directory name"):
        save_artifact(deep, " ", formats=formats)


# ------------------------------------------------------------------------------------ refusals


def _unchecked_copy(small_artifacts, name: str, tmp_path: Path) -> Path:
    """A fresh copy of a small artifact to break, without its checksum manifest (which would refuse
    every edit before the check under test sees it; the manifest has tests of its own)."""
    target = tmp_path / "1"
    shutil.copytree(small_artifacts[name], target)
    (target / CHECKSUM_FILE).unlink()
    return target


@pytest.fixture
def artifact(small_artifacts, tmp_path) -> Path:
    """The small lse artifact, :func:`_unchecked_copy`."""
    return _unchecked_copy(small_artifacts, "lse", tmp_path)


def _edit_spec(directory: Path, **changes) -> None:
    spec = json.loads((directory / SPEC_FILE).read_text())
    spec.update(changes)
    (directory / SPEC_FILE).write_text(json.dumps(spec))


def _edit_state(directory: Path, edit) -> None:
    state = torch.load(directory / TORCH_FILE, weights_only=True)
    edit(state)
    torch.save(state, directory / TORCH_FILE)


def _raises(directory: Path, pattern: str) -> ArtifactError:
    with pytest.raises(ArtifactError, match=pattern) as info:
        load_model(directory)
    return info.value


def test_corrupt_model_pt(artifact):
    (artifact / TORCH_FILE).write_bytes(np.random.default_rng(0).bytes(4096))
    _raises(artifact, r"model\.pt is corrupt, truncated or unsafe")


def test_truncated_model_pt(artifact):
    raw = (artifact / TORCH_FILE).read_bytes()
    (artifact / TORCH_FILE).write_bytes(raw[: len(raw) // 2])
    _raises(artifact, r"model\.pt is corrupt, truncated or unsafe")


def test_empty_model_pt(artifact):
    (artifact / TORCH_FILE).write_bytes(b"")
    _raises(artifact, r"model\.pt is corrupt, truncated or unsafe")


def _deflated(path: Path, extra: tuple[str, bytes] | None = None) -> None:
    """Rewrite a torch checkpoint (a zip archive) with every entry deflated (torch.load reads it as
    before), and ``extra`` = (name, bytes) added as one more deflated entry."""
    import io
    import zipfile

    with zipfile.ZipFile(path) as original:
        entries = [(info.filename, original.read(info.filename)) for info in original.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for name, data in entries + ([extra] if extra else []):
            out.writestr(name, data)
    path.write_bytes(buffer.getvalue())


def test_a_compressed_model_pt_is_refused_before_it_is_inflated(artifact):
    """torch.save writes its archive uncompressed, and torch.load inflates a deflated entry whole into
    memory: a 9 MB model.pt whose tensor is 2 GiB of zeros, deflated, took 2.2 GiB to load (a scratch
    run; over the shipped pod's 2Gi limit: the server, and every model it serves, killed). On
    2caf15b a deflated model.pt loaded; now any compressed entry is refused before anything is
    inflated (its sizes are in the zip's directory)."""
    _deflated(artifact / TORCH_FILE)
    assert torch.load(artifact / TORCH_FILE, weights_only=True)   # torch itself would read it
    _raises(artifact, r"model\.pt: entry '.*' is compressed")


def test_missing_files(artifact):
    (artifact / SPEC_FILE).unlink()
    _raises(artifact, r"no model\.json beside model\.pt")
    (artifact / TORCH_FILE).unlink()
    _raises(artifact, r"no model\.pt")


def test_bad_json(artifact):
    (artifact / SPEC_FILE).write_text('{"format": "hjmodel/1", "kind": ')
    _raises(artifact, r"model\.json is not valid JSON")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_spec(artifact / SPEC_FILE)


def test_json_not_an_object(artifact):
    (artifact / SPEC_FILE).write_text("[1, 2, 3]")
    _raises(artifact, r"spec is not a JSON object")


def test_wrong_format(artifact):
    _edit_spec(artifact, format="hjmodel/99")
    _raises(artifact, r"unknown artifact format 'hjmodel/99'")


def test_wrong_kind(artifact):
    _edit_spec(artifact, kind="transformer")
    _raises(artifact, r"unknown model kind 'transformer'")


def test_wrong_task(artifact):
    _edit_spec(artifact, task="ranking")
    _raises(artifact, r"unknown task 'ranking'")


@pytest.mark.parametrize("eps", [0, -1.0, "big", None])
def test_bad_eps(artifact, eps):
    _edit_spec(artifact, eps=eps)
    _raises(artifact, r"eps must be a positive number")


def test_missing_spec_key(artifact):
    spec = json.loads((artifact / SPEC_FILE).read_text())
    del spec["calibration"]
    (artifact / SPEC_FILE).write_text(json.dumps(spec))
    _raises(artifact, r"spec lacks 'calibration'")


@pytest.mark.parametrize(("changes", "message"), [
    ({"class_names": [{"name": "a"}] * 3}, "class_names must list n_outputs distinct names"),
    ({"feature_names": ["only one"]}, "feature_names must list n_features distinct names"),
    ({"structure": "lse"}, "structure must be a JSON object"),
    ({"structure": {"body": ["x"]}}, "structure.body must be a list of objects"),
    ({"structure": {"n_neurons": -5}}, "structure.n_neurons must be a positive integer"),
])
def test_spec_fields_the_server_reads_are_validated(artifact, changes, message):
    """Each of these loaded on bcbf411, and one (a body entry that is not an object) answered 500 on
    every batch job of the model."""
    spec = json.loads((artifact / SPEC_FILE).read_text())
    if "class_names" in changes:
        changes = {"class_names": changes["class_names"][:1] * len(spec["class_names"])}
    if "structure" in changes and isinstance(changes["structure"], dict):
        changes = {"structure": {**spec["structure"], **changes["structure"]}}
    _edit_spec(artifact, **changes)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        read_spec(artifact)


def test_spec_feature_count_mismatch(artifact):
    _edit_spec(artifact, n_features=7)
    _raises(artifact, r"feature_names must list n_features distinct names")   # the spec validator sees it first


def test_spec_output_count_mismatch(artifact):
    _edit_spec(artifact, n_outputs=5)
    _raises(artifact, r"class_names must list n_outputs distinct names")   # the one spec validator sees it first


def test_tensor_shape_mismatch(artifact):
    _edit_state(artifact, lambda s: s.__setitem__("head.W", torch.zeros(s["head.W"].shape[0], 9, dtype=torch.float64)))
    _raises(artifact, r"inconsistent weights or spec \(preprocess\.A must have 9 rows \(head\.W's columns\), got \(4, 4\)\)")


@pytest.mark.parametrize("eps", [-1.0, 0.0])
def test_a_body_layer_eps_no_certificate_holds_for_is_refused(small_artifacts, tmp_path, eps):
    """The spec's head eps was checked, a body layer's was not: on 00333c1 a deep artifact whose
    hidden layer's eps was -1 loaded (a soft minimum there; its curvature bound turns negative)."""
    target = _unchecked_copy(small_artifacts, "deep", tmp_path)
    spec = json.loads((target / SPEC_FILE).read_text())
    spec["structure"]["body"][0]["eps"] = eps
    _edit_spec(target, structure=spec["structure"])
    _raises(target, rf"inconsistent weights or spec \(body\.0\.eps must be a finite number > 0, got {eps}\)")


def test_memory_labels_that_disagree_with_the_values_are_refused(small_artifacts, tmp_path):
    target = _unchecked_copy(small_artifacts, "memory", tmp_path)
    _edit_state(target, lambda s: s.__setitem__("head.labels", (s["head.labels"] + 1) % s["head.V"].shape[1]))
    _raises(target, r"inconsistent weights or spec \(head\.labels disagree with V's one-hot rows \(support point 0")


def test_duplicate_class_names_are_refused(artifact):
    names = json.loads((artifact / SPEC_FILE).read_text())["class_names"]
    _edit_spec(artifact, class_names=[names[0]] * len(names))
    _raises(artifact, r"class_names must list n_outputs distinct names")


def test_reference_shape_mismatch(artifact):
    _edit_state(artifact, lambda s: s.__setitem__("reference.points", torch.zeros(5, 9, dtype=torch.float64)))
    _raises(artifact, r"layer dimensions do not chain")


def test_tensor_wrong_rank(artifact):
    _edit_state(artifact, lambda s: s.__setitem__("head.b", torch.zeros(3, 3, dtype=torch.float64)))
    _raises(artifact, r"tensor 'head\.b' must be 1-D")


def test_tensor_missing(artifact):
    _edit_state(artifact, lambda s: s.pop("head.W"))
    _raises(artifact, r"weights lack tensor 'head\.W'")


def test_inconsistent_tensors(artifact):
    # mask with the wrong number of neurons: a torch error inside the rebuild becomes ArtifactError
    _edit_state(artifact, lambda s: s.__setitem__("head.mask", torch.ones(3, 2, dtype=torch.bool)))
    _raises(artifact, r"inconsistent weights or spec")


def test_overlapping_groups_are_refused(artifact):
    """The certificate's group table needs disjoint class groups: a head mask that puts a neuron in
    two classes is an inconsistent artifact, not a silently different certificate."""
    def edit(s):
        mask = s["head.mask"].clone()
        assert mask.shape[0] >= 2 and bool((mask.sum(0) == 1).all())
        mask[1] |= mask[0]
        s["head.mask"] = mask

    _edit_state(artifact, edit)
    _raises(artifact, r"inconsistent weights or spec \(groups must be disjoint")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_weights(artifact, value):
    def edit(s):
        s["head.W"][0, 0] = value

    _edit_state(artifact, edit)
    _raises(artifact, r"tensor 'head\.W' holds NaN or Inf")


def test_not_a_tensor_dict(artifact):
    torch.save([torch.zeros(3)], artifact / TORCH_FILE)
    _raises(artifact, r"does not hold a tensor dictionary")


class _Payload:
    """Pickles to a call of ``exec`` that writes a marker file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_never_runs(artifact, tmp_path):
    marker = tmp_path / "pwned"
    state = torch.load(artifact / TORCH_FILE, weights_only=True)
    state["head.W"] = _Payload(marker)
    torch.save(state, artifact / TORCH_FILE)
    # the payload is live: an unsafe load (in a separate process) runs it
    code = f"import torch; torch.load({str(artifact / TORCH_FILE)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)
    assert marker.exists()
    marker.unlink()
    err = _raises(artifact, r"model\.pt is corrupt, truncated or unsafe \(UnpicklingError")
    assert not marker.exists(), "loading the artifact executed code from the file"
    assert "weights" in str(err.__cause__).lower() or "unsupported" in str(err.__cause__).lower()
    with pytest.raises(ArtifactError):
        load_serving_module(artifact)
    assert not marker.exists()


def test_onnx_file_that_is_not_onnx(artifact):
    (artifact / ONNX_FILE).write_bytes(b"\x00\x01 this is not a protobuf \xff" * 50)
    (artifact / SPEC_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"model\.onnx: not a valid ONNX model"):
        read_spec(artifact)
    with pytest.raises(ArtifactError, match=r"not a valid ONNX model"):
        read_spec(artifact / ONNX_FILE)


def test_onnx_without_spec_metadata(tmp_path):
    path = tmp_path / ONNX_FILE
    with torch.no_grad():
        torch.onnx.export(torch.nn.Linear(3, 2).eval(), (torch.zeros(1, 3),), str(path), dynamo=False)
    with pytest.raises(ArtifactError, match=r"carries no 'hjmodel\.spec' metadata"):
        read_spec(tmp_path)


def test_onnx_with_bad_spec_metadata(artifact, tmp_path):
    import onnx

    proto = onnx.load(str(artifact / ONNX_FILE))
    for p in proto.metadata_props:
        if p.key == "hjmodel.spec":
            spec = json.loads(p.value)
            spec["kind"] = "transformer"
            p.value = json.dumps(spec)
    onnx.save(proto, str(tmp_path / ONNX_FILE))
    with pytest.raises(ArtifactError, match=r"unknown model kind 'transformer'"):
        read_spec(tmp_path / ONNX_FILE)


def test_read_spec_missing(tmp_path):
    with pytest.raises(ArtifactError, match=r"no model\.json or model\.onnx"):
        read_spec(tmp_path)
    with pytest.raises(ArtifactError, match=r"no such file"):
        read_spec(tmp_path / SPEC_FILE)


# -- the checksum manifest ---------------------------------------------------------------------------


def test_a_saved_artifact_lists_every_file_in_a_manifest_sha256sum_reads(small_artifacts):
    directory = small_artifacts["lse"]
    listed = sorted(line.split()[1] for line in (directory / CHECKSUM_FILE).read_text().splitlines())
    assert listed == sorted([EXPLAIN_FILE, ONNX_FILE, SPEC_FILE, TORCH_FILE])
    check = subprocess.run(["sha256sum", "--check", "--strict", CHECKSUM_FILE], cwd=directory,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert verify_checksums(directory) is True


def _scale_one_weight(path: Path) -> None:
    """One float of the graph's largest initializer times 1.001: the graph still parses and runs."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    init = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    values = numpy_helper.to_array(init).copy()
    values.flat[values.size // 2] *= 1.001
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(proto, str(path))


@pytest.mark.parametrize("file", [ONNX_FILE, EXPLAIN_FILE, TORCH_FILE, SPEC_FILE])
def test_a_file_changed_since_it_was_written_is_refused(small_artifacts, tmp_path, file):
    """A weight scaled by 1.001 in a graph that still parses, a tensor of model.pt, the metrics of
    model.json: each loaded on bcbf411 (where nothing recorded what the files were)."""
    directory = tmp_path / "1"
    shutil.copytree(small_artifacts["lse"], directory)
    if file.endswith(".onnx"):
        _scale_one_weight(directory / file)
    elif file == TORCH_FILE:
        _edit_state(directory, lambda s: s["head.b"].mul_(1.001))
    else:
        _edit_spec(directory, metrics={"accuracy": 1.0})
    message = "SHA-256 is not the one SHA256SUMS records"
    with pytest.raises(ArtifactError, match=message):
        verify_checksums(directory)
    with pytest.raises(ArtifactError, match=message):
        load_model(directory)
    with pytest.raises(ArtifactError, match=message):
        Predictor(directory)


@pytest.mark.parametrize(("manifest", "message"), [
    ("{digest}  ../../etc/passwd\n", "line 1 is not"),
    ("{digest}  model.pt\n{digest}  model.pt\n", "line 2 is not"),
    ("not a digest  model.pt\n", "line 1 is not"),
    ("", "does not list"),
    ("#" * (65 * 1024), "larger than"),
])
def test_a_malformed_manifest_is_refused(small_artifacts, tmp_path, manifest, message):
    directory = tmp_path / "1"
    shutil.copytree(small_artifacts["lse"], directory)
    (directory / CHECKSUM_FILE).write_text(manifest.format(digest="0" * 64))
    with pytest.raises(ArtifactError, match=message):
        verify_checksums(directory)


def test_a_listed_file_that_is_gone_is_refused_and_no_manifest_is_nothing_to_check(small_artifacts, tmp_path):
    directory = tmp_path / "1"
    shutil.copytree(small_artifacts["lse"], directory)
    (directory / EXPLAIN_FILE).unlink()
    with pytest.raises(ArtifactError, match="lists explain.onnx, which is missing"):
        verify_checksums(directory)
    (directory / CHECKSUM_FILE).unlink()     # an artifact written before manifests
    assert verify_checksums(directory) is False
    load_model(directory)


def test_the_manifest_records_what_a_loader_may_reuse(small_artifacts):
    """recorded_sha256: the digest the server's graph-cutting guard takes instead of hashing the
    verified graph again (equal to the file's own)."""
    from hjmodel.artifact import file_sha256, recorded_sha256

    directory = small_artifacts["lse"]
    assert recorded_sha256(directory, ONNX_FILE) == file_sha256(directory / ONNX_FILE)
    assert recorded_sha256(directory, "other.bin") is None


def test_spec_mismatch_names_why():
    from hjmodel.serving import ONNX_SPEC_KEY, spec_mismatch

    spec = {"kind": "lse", "eps": 0.5, "metrics": {"nan": float("nan")}}
    assert spec_mismatch(spec, json.dumps(spec)) is None          # NaN equal to itself in JSON text
    assert spec_mismatch(spec, None) == f"it carries no {ONNX_SPEC_KEY!r} metadata"
    assert "is not JSON" in spec_mismatch(spec, "{oops")
    assert "not a JSON object" in spec_mismatch(spec, "[]")
    assert spec_mismatch(spec, json.dumps({**spec, "eps": 0.25, "extra": 1})) == "they differ in ['eps', 'extra']"


def _external(tensor, location: str = "w.bin"):
    """``tensor`` (a TensorProto) as ONNX external data in ``location``."""
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "32"}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


@pytest.mark.parametrize("where", ["initializer", "constant in a subgraph", "function"])
def test_a_graph_with_external_data_never_opens(tmp_path, where):
    """Wherever a tensor names an external file -- an initializer, a Constant inside an If's branch,
    a node of a model-local function -- open_session refuses the graph, from a file and from bytes,
    before onnxruntime reads that file (whose bytes no SHA256SUMS covers); the file is there and
    would be read."""
    from onnx import TensorProto, helper, numpy_helper

    from hjmodel.serving import open_session

    (tmp_path / "w.bin").write_bytes(bytes(32))
    w = _external(numpy_helper.from_array(np.ones(8, dtype=np.float32), "w"))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])
    functions = []
    if where == "initializer":
        graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [out], [w])
    elif where == "constant in a subgraph":
        branch = helper.make_graph([helper.make_node("Constant", [], ["y"], value=w)], "b", [], [out])
        cond = numpy_helper.from_array(np.array(True), "c")
        graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                                  "g", [], [out], [cond])
    else:
        functions = [helper.make_function("local", "f", [], ["y"], [helper.make_node("Constant", [], ["y"], value=w)],
                                          [helper.make_opsetid("", 17)])]
        graph = helper.make_graph([helper.make_node("f", [], ["y"], domain="local")], "g", [], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=functions)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    for source in (tmp_path / "m.onnx", model.SerializeToString()):
        with pytest.raises(ArtifactError, match=r"tensor 'w' reads its values from external data \('w.bin'\)"):
            open_session(source)
    with pytest.raises(ArtifactError, match="not a valid ONNX model"):
        open_session(b"\x08\x01garbage")
