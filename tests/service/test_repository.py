"""The model repository, in process (fake backend): typed specs, names, and Triton's poll mode."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from fakes import write_model

from hjmodel.serving import ArtifactSpec
from service.errors import InvalidModelName, ModelNotFound, ModelNotReady
from service.repository import ModelRepository
from service.settings import Settings


def _with_repository(repository: ModelRepository, body):
    async def main():
        await repository.load_all()
        try:
            return await body()
        finally:
            await repository.close()
    return asyncio.run(main())


def test_versions_carry_the_typed_spec(repository):
    async def body():
        mv = repository.get("fclf")
        return mv, repository.get("freg", "1")
    clf, reg = _with_repository(repository, body)
    assert isinstance(clf.spec, ArtifactSpec) and clf.version == 2
    assert clf.spec.class_names == ("alpha", "beta", "gamma") and clf.task == "classification"
    assert reg.spec.task == "regression" and reg.n_features == 4


def test_a_versions_explanations_run_in_calls_sized_by_its_first_layer(fake_root, loader, settings):
    """The batcher of a loaded version explains at most the rows the model's first linear map allows
    (hjmodel.serving.explain_rows_per_call): a memory model with 60,000 support points two rows a
    call, a small one max_batch_size."""
    spec = json.loads((fake_root / "fclf" / "1" / "model.json").read_text())
    spec["structure"] = {"n_neurons": 60_000, "body": []}
    (fake_root / "fclf" / "1" / "model.json").write_text(json.dumps(spec))

    async def body():
        return repository.get("fclf", "1").batcher.explain_rows, repository.get("freg", "1").batcher.explain_rows
    repository = ModelRepository(settings, loader=loader)
    wide, small = _with_repository(repository, body)
    assert wide == 2 and small == settings.max_batch_size


@pytest.mark.parametrize("threads, spinning, static_rows", [(0, False, 16), (3, True, 0)])
def test_the_thread_settings_reach_every_load(fake_root, loader, threads, spinning, static_rows):
    """HJSERVE_INTRA_OP_THREADS / _SPINNING / HJSERVE_TORCH_STATIC_ROWS are passed to the backend
    loader of every version."""
    seen = []

    def recording(version_dir, **kwargs):
        seen.append((kwargs["threads"], kwargs["spinning"], kwargs["static_rows"]))
        return loader(version_dir, **kwargs)
    settings = Settings(model_repository=fake_root, intra_op_threads=threads, intra_op_spinning=spinning,
                        torch_static_rows=static_rows)
    _with_repository(ModelRepository(settings, loader=recording), lambda: asyncio.sleep(0))
    assert seen and set(seen) == {(threads, spinning, static_rows)}


def test_a_bad_spec_is_reported_and_takes_nothing_down(fake_root, loader):
    spec = json.loads((fake_root / "fclf" / "1" / "model.json").read_text())
    spec["n_outputs"] = 0
    write_model(fake_root / "broken" / "1")
    (fake_root / "broken" / "1" / "model.json").write_text(json.dumps(spec))
    repository = ModelRepository(Settings(model_repository=fake_root), loader=loader)

    async def body():
        with pytest.raises(ModelNotReady, match="n_outputs must be a positive integer"):
            repository.get("broken")
        return repository.get("fclf")
    assert _with_repository(repository, body).version == 2


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b", "x" * 200, ""])
def test_hostile_names_never_resolve(repository, name):
    async def body():
        with pytest.raises((InvalidModelName, ModelNotFound)):
            repository.get(name)
    _with_repository(repository, body)


def test_poll_mode_loads_new_versions_reloads_changes_and_unloads_removals(fake_root, loader):
    """Triton's poll model control: the folder is the source of truth, no load call needed."""
    repository = ModelRepository(Settings(model_repository=fake_root), loader=loader)

    async def settle(predicate, timeout=5.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, "the poller did not pick the change up"
            await asyncio.sleep(0.02)

    async def body():
        poller = asyncio.ensure_future(repository.poll(0.05))
        try:
            write_model(fake_root / "fclf" / "3", seed=30)                  # a new version folder
            await settle(lambda: repository.ready_versions("fclf") == [1, 2, 3])
            write_model(fake_root / "fnew" / "1", seed=40)                  # a new model
            await settle(lambda: repository.ready_versions("fnew") == [1])
            (fake_root / "fclf" / "3" / "fake.seed").write_text("31")       # a new build of version 3
            await settle(lambda: loader.backends[("fclf", 3)].seed == 31)
            shutil.rmtree(fake_root / "fclf" / "1")                         # a removed version
            await settle(lambda: repository.ready_versions("fclf") == [2, 3])
            shutil.rmtree(fake_root / "freg")                               # a removed model
            await settle(lambda: repository.ready_versions("freg") == [])
            with pytest.raises(ModelNotReady):
                repository.get("freg")
        finally:
            poller.cancel()
    _with_repository(repository, body)


def test_poll_keeps_serving_when_a_changed_version_fails_to_load(fake_root, loader):
    repository = ModelRepository(Settings(model_repository=fake_root), loader=loader)

    async def body():
        poller = asyncio.ensure_future(repository.poll(0.05))
        try:
            (fake_root / "fclf" / "2" / "model.json").write_text("{ not json")
            for _ in range(100):
                if any("reload failed" in i.get("reason", "") for i in repository.index()):
                    break
                await asyncio.sleep(0.02)
            assert repository.get("fclf").version == 2    # the previous load still serves
        finally:
            poller.cancel()
    _with_repository(repository, body)


def _embedded_spec(version_dir) -> dict:
    import onnx

    from hjmodel.serving import ONNX_SPEC_KEY

    meta = {p.key: p.value for p in onnx.load(str(version_dir / "model.onnx"), load_external_data=False).metadata_props}
    return json.loads(meta[ONNX_SPEC_KEY])


@pytest.mark.parametrize("edit", ["none", "alpha", "eps", "class_names"])
def test_a_graph_serves_only_beside_the_spec_it_was_exported_with(tmp_path, edit):
    """The ONNX graph carries its spec; model.json must say the same. On bcbf411 a model.json edited
    by hand (its calibration's alpha: the server then accepted alpha=0.01 and called the flag
    calibrated at it, while the graph's threshold was fitted at 0.05), or a graph copied from another
    model, loaded and served with the other spec's claims (see the next test)."""
    from svc_helpers import export_tiny

    version = tmp_path / "m" / "1"
    export_tiny(version, "classification", seed=0)
    spec = _embedded_spec(version)
    if edit == "alpha":
        spec["calibration"]["alpha"] = 0.01
    elif edit == "eps":
        spec["eps"] = spec["eps"] * 2
    elif edit == "class_names":
        spec["class_names"] = list(reversed(spec["class_names"]))
    (version / "model.json").write_text(json.dumps(spec))
    repository = ModelRepository(Settings(model_repository=tmp_path))

    async def body():
        if edit == "none":
            return repository.get("m").spec.alpha
        with pytest.raises(ModelNotReady, match="model.onnx was exported with another spec"):
            repository.get("m")
    _with_repository(repository, body)


def test_a_graph_copied_from_another_model_is_refused(hj_repo, tmp_path):
    """iris_memory's graph in a copy of iris's folder: it loaded on bcbf411 and served a memory
    model's numbers as the lse model's (kind, structure, calibration all from model.json)."""
    shutil.copytree(hj_repo / "iris" / "1", tmp_path / "iris" / "1")
    for file in ("model.onnx", "explain.onnx"):
        shutil.copy(hj_repo / "iris_memory" / "1" / file, tmp_path / "iris" / "1" / file)
    (tmp_path / "iris" / "1" / "SHA256SUMS").unlink()   # the manifest would refuse it first (next test)
    repository = ModelRepository(Settings(model_repository=tmp_path, backend="onnx"))

    async def body():
        with pytest.raises(ModelNotReady, match=r"model.onnx was exported with another spec .*differ in .*'kind'"):
            repository.get("iris")
    _with_repository(repository, body)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_a_weight_changed_since_the_artifact_was_written_is_not_served(hj_repo, tmp_path, backend):
    """One weight of iris's graph (and of model.pt) times 1.001: the files still parse and run, and
    on bcbf411 the version loaded and served other probabilities and certificates under its name.
    The checksum manifest refuses it; the other model still serves."""
    import torch
    from onnx import load, numpy_helper, save

    for name in ("iris", "diabetes"):
        shutil.copytree(hj_repo / name / "1", tmp_path / name / "1")
    version = tmp_path / "iris" / "1"
    proto = load(str(version / "model.onnx"))
    init = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    values = numpy_helper.to_array(init).copy()
    values.flat[0] *= 1.001
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    save(proto, str(version / "model.onnx"))
    state = torch.load(version / "model.pt", weights_only=True)
    state["head.b"].mul_(1.001)
    torch.save(state, version / "model.pt")
    repository = ModelRepository(Settings(model_repository=tmp_path, backend=backend))

    async def body():
        with pytest.raises(ModelNotReady, match="SHA-256 is not the one SHA256SUMS records"):
            repository.get("iris")
        return repository.get("diabetes").version
    assert _with_repository(repository, body) == 1


def _refused_beside_a_served_model(hj_repo, tmp_path, backend: str, edit, pattern: str) -> None:
    """iris and diabetes copied, iris's version edited by ``edit(version)`` and its manifest rewritten:
    iris is refused with ``pattern`` while diabetes serves, on ``backend``."""
    from hjmodel.artifact import write_checksums

    for name in ("iris", "diabetes"):
        shutil.copytree(hj_repo / name / "1", tmp_path / name / "1")
    edit(tmp_path / "iris" / "1")
    write_checksums(tmp_path / "iris" / "1")
    repository = ModelRepository(Settings(model_repository=tmp_path, backend=backend))

    async def body():
        with pytest.raises(ModelNotReady, match=pattern):
            repository.get("iris")
        return repository.get("diabetes").version
    assert _with_repository(repository, body) == 1


def test_a_graph_that_reads_its_weights_from_another_file_is_not_served(hj_repo, tmp_path):
    """iris's graph saved with its weights as ONNX external data (``weights.bin`` beside it) and its
    manifest rewritten: the manifest covers the artifact's files, not a file a graph names, so on
    2caf15b the version loaded, and its weights could be changed without any digest noticing
    (here they are, and the graph still opens in onnxruntime); graphs cut down to fewer
    outputs, opened from bytes, would read such a file from the server's working directory. No
    hjmodel artifact has external data: such a graph is refused, and the other model still serves."""
    import onnx
    import onnxruntime as ort

    def edit(version):
        proto = onnx.load(str(version / "model.onnx"))
        onnx.save(proto, str(version / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="weights.bin", size_threshold=0)

    def changed(version):   # the manifest written next lists model.onnx, never weights.bin
        edit(version)
        weights = (version / "weights.bin").read_bytes()
        (version / "weights.bin").write_bytes(weights[:-8] + bytes(8))
        ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])   # still opens

    _refused_beside_a_served_model(hj_repo, tmp_path, "onnx", changed, r"model.onnx.*external data.*weights.bin")


def test_a_compressed_model_pt_is_not_served_and_the_others_are(hj_repo, tmp_path):
    """iris's model.pt rewritten with its entries deflated (and one more, 64 MiB of zeros in 64 KiB),
    the manifest rewritten. torch.load inflates what it reads whole: a 9 MB file holding 2 GiB of
    zeros as a tensor took 2.2 GiB (tests/hjmodel/test_artifact.py), the process and every model it
    serves killed for memory. A compressed entry is refused before torch reads the file; diabetes
    still serves on the torch backend."""
    import io
    import zipfile

    def deflate(version):
        with zipfile.ZipFile(version / "model.pt") as original:
            entries = [(info.filename, original.read(info.filename)) for info in original.infolist()]
        prefix = entries[0][0].split("/")[0]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as out:
            for name, data in entries + [(f"{prefix}/data/bomb", bytes(64 << 20))]:
                out.writestr(name, data)
        assert len(buffer.getvalue()) < 1 << 20
        (version / "model.pt").write_bytes(buffer.getvalue())

    _refused_beside_a_served_model(hj_repo, tmp_path, "torch", deflate, r"model.pt: entry .* is compressed")


def _unmarked(version) -> None:
    """``version`` as an artifact written before its served radius allowed for input rounding: the
    spec key dropped from model.json and from every graph's embedded spec, the manifest rewritten."""
    import onnx

    from hjmodel.artifact import write_checksums
    from hjmodel.serving import ONNX_SPEC_KEY, RADIUS_MARK

    spec = json.loads((version / "model.json").read_text())
    del spec[RADIUS_MARK]
    (version / "model.json").write_text(json.dumps(spec))
    for file in ("model.onnx", "explain.onnx"):
        proto = onnx.load(str(version / file))
        for prop in proto.metadata_props:
            if prop.key == ONNX_SPEC_KEY:
                prop.value = json.dumps(spec)
        onnx.save(proto, str(version / file))
    write_checksums(version)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_an_artifact_exported_before_the_input_rounding_allowance_is_not_served(hj_repo, tmp_path, backend):
    """Its graph serves a radius that a client sending float64 values can cross
    (tests/hjmodel/test_served_precision.py); it is refused with the way out, ``hjmodel rebuild``,
    whose output serves. The other model still serves."""
    import subprocess
    import sys

    from hjmodel import ArtifactError
    from hjmodel.predictor import Predictor

    for name in ("iris", "diabetes"):
        shutil.copytree(hj_repo / name / "1", tmp_path / name / "1")
    _unmarked(tmp_path / "iris" / "1")
    repository = ModelRepository(Settings(model_repository=tmp_path, backend=backend))

    async def refused():
        with pytest.raises(ModelNotReady, match=r"not served: it was exported before its certified radius "
                                                r"allowed for the rounding of inputs .*hjmodel rebuild"):
            repository.get("iris")
        return repository.get("diabetes").version
    assert _with_repository(repository, refused) == 1
    with pytest.raises(ArtifactError, match="not served: it was exported before"):   # nor offline
        Predictor(tmp_path / "iris" / "1")

    subprocess.run([sys.executable, "-m", "hjmodel.cli", "rebuild", str(tmp_path / "iris" / "1"),
                    "--out", str(tmp_path / "iris" / "2")], check=True, timeout=300, capture_output=True)
    repository = ModelRepository(Settings(model_repository=tmp_path, backend=backend))

    async def rebuilt():
        return repository.get("iris").version
    assert _with_repository(repository, rebuilt) == 2
