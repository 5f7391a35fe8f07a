"""One contract test run against every backend, parity between backends, and each backend end to
end, all on real hjmodel artifacts compared with ``hjmodel.artifact.load_serving_module``."""

from __future__ import annotations

import logging
import shutil
import threading
import time

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from svc_helpers import assert_outputs_close, reference_outputs, run_server

from hjmodel import serving
from service.backends import choose_backend, load_backend
from service.backends.base import OutputGraphs
from service.codecs import DATATYPES
from service.errors import ModelLoadFailed
from service.repository import read_spec

MODELS = ["iris", "iris_memory", "diabetes"]


def _rows(spec, n=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, spec.n_features)).astype(np.float32)


_close = assert_outputs_close


@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize("model", MODELS)
def test_backend_honours_the_contract(hj_repo, backend, model):
    version = hj_repo / model / "1"
    spec = read_spec(version)
    loaded = load_backend(version, preference=backend, device="cpu")
    assert loaded.name == backend and loaded.device == "cpu"
    x = _rows(spec)
    got = loaded.infer(x, np.full(len(x), 0.2))
    want = reference_outputs(version, x, tau=0.2)
    for o in serving.outputs_for(spec.task):
        assert np.asarray(got[o.name]).dtype == DATATYPES[o.datatype], o.name
        _close(np.asarray(got[o.name]), want[o.name], o.name)
    if backend == "torch":
        # the torch backend runs under inference mode; the reference's caches it filled are ordinary
        # tensors, which autograd can still use on the same model (they are filled by whoever asks first)
        cached = [v for k, v in vars(loaded._module.model.reference).items() if k.startswith("_") and v]
        tensors = [t for _, value in cached for t in (value if isinstance(value, tuple) else ())
                   if isinstance(t, torch.Tensor)]
        assert spec.task == "regression" or tensors
        assert not any(t.is_inference() for t in tensors)
    loaded.close()


def test_the_torch_backend_serves_the_trace_and_the_module_when_tracing_fails(hj_repo, monkeypatch, caplog):
    from hjmodel.artifact import ExplainModule, ServingModule, TracedModule

    version = hj_repo / "iris" / "1"
    x = _rows(read_spec(version), n=5)
    monkeypatch.setattr("hjmodel.artifact.STATIC_CALL_S", 60.0)    # all 16 rows, however busy the machine
    traced = load_backend(version, preference="torch", device="cpu", static_rows=16)
    assert isinstance(traced._module, TracedModule) and isinstance(traced._explain, TracedModule)
    assert traced.execution == "torchscript"
    # HJSERVE_TORCH_STATIC_ROWS: small serving calls on the static runtime, never an explanation's
    assert traced.static_rows == 16 and traced._module._static is not None
    assert traced._explain.static_rows == 0
    interpreted = load_backend(version, preference="torch", device="cpu", static_rows=0)
    assert interpreted.static_rows == 0 and interpreted._module._static is None
    served = interpreted.infer(x, np.full(5, 0.2))
    static_calls, run = [], traced._module._static.run
    traced._module._static.run = lambda inputs: static_calls.append(len(inputs[0])) or run(inputs)
    assert all(np.array_equal(v, served[k]) for k, v in traced.infer(x, np.full(5, 0.2)).items())
    assert static_calls == [5]
    # an explanation beside it: the interpreter, which lets the explanation's thread run meanwhile
    assert all(np.array_equal(v, served[k]) for k, v in traced.infer(x, np.full(5, 0.2), beside=True).items())
    assert static_calls == [5]
    assert traced.static_failed == interpreted.static_failed == 0
    interpreted.close()

    def refuse(module, inputs=None, **options):
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr("hjmodel.artifact.TracedModule", refuse)
    with caplog.at_level("WARNING", logger="hjmodel.artifact"):
        eager = load_backend(version, preference="torch", device="cpu")
    assert isinstance(eager._module, ServingModule) and isinstance(eager._explain, ExplainModule)
    assert eager.execution == "torch eager" and eager.static_rows == eager.static_failed == 0
    assert f"{version}: running ServingModule eagerly, tracing failed: RuntimeError: no TorchScript here" in caplog.text
    tau, base = np.full(5, 0.2), np.zeros_like(x)
    for a, b in ((traced.infer(x, tau), eager.infer(x, tau)), (traced.explain(x, tau, base), eager.explain(x, tau, base))):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    traced.close()
    eager.close()


def test_backend_choice_and_load_errors(hj_repo, tmp_path):
    assert choose_backend(hj_repo / "iris" / "1", "auto") == "onnx"
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "model.pt").write_bytes(b"x")
    assert choose_backend(tmp_path / "pt", "auto") == "torch"
    with pytest.raises(ModelLoadFailed, match="invalid torch artifact|cannot load"):
        load_backend(tmp_path / "pt", preference="torch")
    with pytest.raises(ModelLoadFailed, match="neither"):
        choose_backend(tmp_path, "auto")
    with pytest.raises(ModelLoadFailed, match="does not exist"):
        load_backend(tmp_path / "pt", preference="onnx")


def test_a_cuda_provider_that_fails_to_start_is_an_error_or_a_logged_fall_back(hj_repo, monkeypatch, caplog):
    """An onnxruntime-gpu build lists the CUDA provider even where its CUDA libraries cannot load (an
    onnxruntime-gpu built for CUDA 13 on a CUDA 12 image: docs/GPU.md); the session then opens on the
    CPU alone. Here the CPU build lists it and each session opens as that one would, on the CPU
    (real sessions; only the provider list they were asked for is cut to what would start):
    device=cuda refuses the model, device=auto serves it on the CPU and says why in the log."""
    import onnxruntime as ort

    version = hj_repo / "iris" / "1"
    listed = ["CUDAExecutionProvider", *ort.get_available_providers()]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    opened = serving.open_session

    def without_cuda(path, *, providers=("CPUExecutionProvider",), **kw):
        assert providers[0] == "CUDAExecutionProvider"      # it was asked for
        return opened(path, providers=[p for p in providers if p != "CUDAExecutionProvider"], **kw)

    monkeypatch.setattr(serving, "open_session", without_cuda)
    with pytest.raises(ModelLoadFailed, match="CUDA execution provider failed to start"):
        load_backend(version, preference="onnx", device="cuda")
    with caplog.at_level("WARNING", logger="service.backends.onnx"):
        backend = load_backend(version, preference="onnx", device="auto")
    assert backend.device == "cpu"
    assert f"{version}: onnxruntime lists the CUDA execution provider but it did not start" in caplog.text
    backend.close()


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_server_on_each_backend_matches_in_process(hj_repo, tmp_path, backend):
    with run_server(hj_repo, tmp_path, backend=backend) as s:
        client = httpclient.InferenceServerClient(url=s.host_port)
        try:
            for model in MODELS:
                spec = read_spec(hj_repo / model / "1")
                config = client.get_model_config(model)
                assert config["backend"] == backend
                assert config["parameters"]["execution"]["string_value"] == {"onnx": "onnxruntime",
                                                                             "torch": "torchscript"}[backend]
                x = _rows(spec, n=7, seed=3)
                inp = httpclient.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=True)
                names = serving.output_names(spec.task)
                outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in names]
                tau = {"tau": 0.3} if spec.task == "regression" else {}   # a classifier refuses tau
                result = client.infer(model, [inp], outputs=outputs, parameters={"top_k": serving.TOP_K_MAX, **tau})
                want = reference_outputs(hj_repo / model / "1", x, tau=0.3)
                for name in names:
                    _close(result.as_numpy(name), want[name], f"{model}/{name}")
        finally:
            client.close()


def _until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("spinning", [False, True])
def test_onnxruntime_threads_spin_only_when_asked(hj_repo, spinning):
    """Every session the onnxruntime backend opens -- the serving graph, the explanation graph and a
    graph of fewer outputs -- has the thread count it was given, and its intra-op threads busy-wait
    between operators only with ``spinning`` (onnxruntime's own default is to spin)."""
    version = hj_repo / "iris" / "1"
    spec = read_spec(version)
    loaded = load_backend(version, preference="onnx", device="cpu", threads=2, spinning=spinning, pruned_graphs=1)
    x, tau = _rows(spec, n=4), np.full(4, 0.1)
    loaded.infer(x, tau, frozenset({"prediction"}))
    _until(lambda: ("prediction",) in loaded.pruned.built, "no graph of the prediction was built")
    sessions = [loaded._session, loaded._explain, loaded.pruned.get(frozenset({"prediction"}))[0]]
    assert all(s is not None for s in sessions)
    for session in sessions:
        options = session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
    loaded.close()


@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize("model", MODELS)
def test_a_batch_runs_a_graph_of_only_the_outputs_it_needs(hj_repo, backend, model):
    """The first batch needing a set of outputs runs the whole graph while a graph of just those is
    built off its thread; later batches run that graph and get the same values, bit for bit; at most
    ``pruned_graphs`` sets get one."""
    version = hj_repo / model / "1"
    spec = read_spec(version)
    loaded = load_backend(version, preference=backend, device="cpu", pruned_graphs=2)
    x, tau = _rows(spec, n=33, seed=5), np.linspace(0.05, 0.5, 33)
    names = serving.output_names(spec.task)
    whole = loaded.infer(x, tau)
    assert set(whole) == set(names) and loaded.pruned.built == ()
    assert set(loaded.infer(x, tau, frozenset(names))) == set(names) and loaded.pruned.built == ()
    for subset in [("prediction", "ood_flag"), tuple(n for n in names if n != "certified_radius")]:
        first = loaded.infer(x, tau, frozenset(subset))
        assert set(first) == set(names)                    # no graph of these yet: the whole graph
        _until(lambda wanted=subset: wanted in loaded.pruned.built, f"no graph of {subset} was built")
        got = loaded.infer(x, tau, frozenset(subset))
        assert set(got) == set(subset)
        for name in subset:
            assert got[name].dtype == whole[name].dtype and _bits(got[name]) == _bits(whole[name]), name
    third = loaded.infer(x, tau, frozenset({"prediction", "certified_radius"}))
    time.sleep(0.3)
    assert set(third) == set(names) and len(loaded.pruned.built) == 2   # past the limit: the whole graph
    loaded.close()


def test_the_server_answers_a_few_outputs_from_a_graph_of_them(hj_repo, tmp_path):
    """Served: a request for two outputs is answered, bit for bit as by the whole graph, and the
    model config shows the graph its batches now run (those outputs and the monitored ones)."""
    import json

    model = "iris"
    spec = read_spec(hj_repo / model / "1")
    names = serving.output_names(spec.task)
    with run_server(hj_repo, tmp_path) as s:
        client = httpclient.InferenceServerClient(url=s.host_port)
        try:
            x = _rows(spec, n=9, seed=8)
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)

            def infer(wanted):
                result = client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput(n, binary_data=True)
                                                             for n in wanted])
                return {n: result.as_numpy(n) for n in wanted}

            def parameter(key):
                return json.loads(client.get_model_config(model)["parameters"][key]["string_value"])

            whole = infer(names)
            few = ["prediction", "probabilities"]
            answers = [infer(few)]
            monitored = parameter("monitored_outputs")
            graph = [n for n in names if n in {*few, *monitored}]
            assert "ood_flag" in monitored and "certified_radius" not in graph
            _until(lambda: parameter("pruned_graphs") == [graph], "the server built no graph of the outputs")
            answers.append(infer(few))
            for answer in answers:
                for n in few:
                    assert _bits(answer[n]) == _bits(whole[n]), n
        finally:
            client.close()


def test_no_graph_is_cut_from_a_model_file_changed_since_its_load(tmp_path, hj_repo, caplog):
    """The sessions a version serves come from the file as it was loaded: a file replaced since
    gives no pruned graph (logged); the whole graph, loaded before, answers."""
    version = tmp_path / "iris" / "1"
    shutil.copytree(hj_repo / "iris" / "1", version)
    spec = read_spec(version)
    loaded = load_backend(version, preference="onnx", device="cpu", pruned_graphs=2)
    x, tau = _rows(spec, n=4), np.full(4, 0.1)
    whole = loaded.infer(x, tau)
    (version / serving.ONNX_FILE).write_bytes((hj_repo / "iris_memory" / "1" / serving.ONNX_FILE).read_bytes())
    with caplog.at_level(logging.WARNING):
        got = loaded.infer(x, tau, frozenset({"prediction"}))
        _until(lambda: "changed since it was loaded" in caplog.text, "the refused build was not logged")
    assert loaded.pruned.built == () and set(loaded.infer(x, tau, frozenset({"prediction"}))) == set(whole)
    assert _bits(got["prediction"]) == _bits(whole["prediction"])
    loaded.close()


def test_a_legacy_graph_runs_one_graph_for_all_its_tau_parts(tmp_path):
    """A legacy graph (one tau per run) runs a batch per tau value: every part comes from the same
    graph, whole or pruned, and the pruned parts answer what the whole graph does."""
    from svc_helpers import export_tiny

    export_tiny(tmp_path / "legacy" / "1", "regression", seed=3, batched_tau=False)
    legacy = load_backend(tmp_path / "legacy" / "1", preference="onnx", device="cpu", pruned_graphs=1)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    tau = np.array([0.1, 0.7, 0.1, 0.3, 0.7])
    wanted = frozenset({"prediction", "certified_radius"})
    whole = legacy.infer(x, tau)
    assert set(legacy.infer(x, tau, wanted)) == set(whole)
    _until(lambda: legacy.pruned.built, "no graph was built")
    got = legacy.infer(x, tau, wanted)
    assert set(got) == wanted
    for name in wanted:
        assert _bits(got[name]) == _bits(whole[name]), name
    legacy.close()


def test_output_graphs_are_built_off_the_callers_thread_and_a_failed_build_falls_back(caplog):
    started, release, threads = threading.Event(), threading.Event(), []

    def build(names):
        threads.append(threading.current_thread())
        started.set()
        release.wait(10)
        if names == ("b",):
            raise RuntimeError("cannot cut")
        return 10, lambda: f"graph {names}"

    graphs = OutputGraphs(("a", "b", "c"), build, limit=2, label="clf-1")
    assert graphs.get(None) is None and graphs.get({"a", "b", "c"}) is None and not threads   # the whole graph
    assert graphs.get({"a", "unknown"}) is None        # the caller does not wait for the build
    assert started.wait(10) and threads[0] is not threading.current_thread()
    release.set()
    _until(lambda: graphs.built == (("a",),), "graph a was not built")
    assert graphs.get({"a"}) == ("graph ('a',)", ("a",))
    with caplog.at_level(logging.WARNING):
        assert graphs.get({"b"}) is None
        _until(lambda: "cannot cut" in caplog.text, "the failed build was not logged")
    assert graphs.get({"b"}) is None and graphs.built == (("a",),)   # not retried: the whole graph
    assert graphs.get({"c"}) is None and len(threads) == 2            # past the limit: never built
    graphs.close()
    assert graphs.get({"a"}) is None and graphs.built == ()

    # the byte budget: a graph that does not fit is not kept -- nor opened
    opened = []
    tight = OutputGraphs(("a", "b", "c"), lambda names: (60, lambda: opened.append(names) or names), limit=8,
                         max_bytes=100, label="clf-1")
    for key in ({"a"}, {"b"}, {"c"}):
        tight.get(key)
    tight._builder.submit(lambda: None).result(10)   # one builder thread, in order: the three builds ran
    assert tight.built == (("a",),) and tight.get({"b"}) is None and tight.get({"a"}) == (("a",), ("a",))
    assert opened == [("a",)]
    tight.close()


def test_a_legacy_graph_with_one_tau_per_batch_still_serves_mixed_batches(tmp_path):
    """Artifacts exported before tau had a batch dimension take one tau per run: a batch of rows with
    different tau is run once per value, each row answered at its own tolerance."""
    from svc_helpers import export_tiny

    export_tiny(tmp_path / "legacy" / "1", "regression", seed=3, batched_tau=False)
    export_tiny(tmp_path / "batched" / "1", "regression", seed=3)
    legacy = load_backend(tmp_path / "legacy" / "1", preference="onnx", device="cpu")
    batched = load_backend(tmp_path / "batched" / "1", preference="onnx", device="cpu")
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    tau = np.array([0.1, 0.7, 0.1, 0.3, 0.7])
    old, new = legacy.infer(x, tau), batched.infer(x, tau)
    for name in new:
        np.testing.assert_allclose(old[name], new[name], rtol=1e-6, err_msg=name)
    radius = old["certified_radius"]
    assert radius[0] == radius[2] and radius[1] == radius[4] and radius[1] > radius[3] > radius[0]


@pytest.mark.parametrize("explained", [False, True])
@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize("model", MODELS)
def test_a_request_run_on_the_event_loop_gets_the_bits_the_thread_serves(hj_repo, backend, model, explained):
    """A request alone may run on the event loop (service.batching); it is answered in the
    floating-point mode of the model's thread, so bit for bit what the thread answers -- on rows far
    from the data, where flushing subnormals or keeping them changes served outputs (checked too)."""
    import asyncio

    import torch

    from service.batching import DynamicBatcher

    version = hj_repo / model / "1"
    threads = []
    x = np.concatenate([_rows(read_spec(version), 16) * scale for scale in (1, 2, 10, 30, 100)])
    base = np.zeros(x.shape[1], np.float32) if explained else None   # with the explanation graph beside it

    async def served(inline_max_s: float) -> list[dict[str, np.ndarray]]:
        loaded = load_backend(version, preference=backend, device="cpu")
        infer = loaded.infer

        def recording(*args, **kwargs):
            threads.append(threading.get_ident())
            return infer(*args, **kwargs)

        loaded.infer = recording
        batcher = DynamicBatcher(loaded, max_batch_size=64, max_queue_delay_s=0.0, max_queue_size=8,
                                 inline_max_s=inline_max_s)
        try:
            await batcher.infer(x[:1], 0.2, timeout_s=30, alone=True)   # a first call measures, on the thread
            return [(await batcher.infer(x[i:i + 16], 0.2, timeout_s=30, alone=True, baseline=base)).outputs
                    for i in range(0, len(x), 16)]
        finally:
            await batcher.close()                                       # closes the backend too

    on_thread = asyncio.run(served(0.0))
    inline = asyncio.run(served(60.0))
    me = threading.get_ident()
    assert [t == me for t in threads] == [False] * 6 + [False] + [True] * 5
    for a, b in zip(on_thread, inline):
        assert a.keys() == b.keys() and (("integrated_gradients" in a) == explained)
        for name in a:
            assert _bits(a[name]) == _bits(b[name]), name
    torch.set_flush_denormal(False)
    loaded = load_backend(version, preference=backend, device="cpu")
    kept = [loaded.infer(x[i:i + 16], np.full(16, 0.2), None) for i in range(0, len(x), 16)]
    loaded.close()
    assert any(_bits(a[name]) != _bits(k[name]) for a, k in zip(on_thread, kept) for name in k), \
        "no output depends on the mode on these rows: the test would not see a wrong one"
