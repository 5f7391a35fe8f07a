"""Offline batch attribution: the picklable Predictor (same answers as the server), Ray Data on a
local loopback cluster, and the Spark mapInPandas function."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from hjmodel import load_dataset, load_serving_module, serving
from hjmodel.distributed import attribute_dataset, spark_map_in_pandas, spark_schema
from hjmodel.predictor import Predictor


@pytest.fixture(scope="module")
def artifact(demo_repository):
    return demo_repository / "digits_lse" / "1"


@pytest.fixture(scope="module")
def rows():
    X = load_dataset("digits").X
    return np.concatenate([X, X[:203] + 0.5])   # 2000 rows, not a multiple of any batch size


def test_predictor_pickles_without_its_session_and_answers_like_the_serving_module(artifact, rows):
    predictor = Predictor(artifact, outputs="all", top_k=3)
    first = predictor.predict(rows[:50])
    assert predictor._runner is not None
    clone = pickle.loads(pickle.dumps(predictor))
    assert clone._runner is None and clone.artifact == predictor.artifact
    again = clone.predict(rows[:50])
    with torch.no_grad():
        module = load_serving_module(artifact)(torch.as_tensor(rows[:50], dtype=torch.float32),
                                               torch.full((50, 1), 0.1, dtype=torch.float64))
    expected = serving.select_outputs("classification", {k: v.numpy() for k, v in module.items()},
                                      serving.output_names("classification"), 3)
    via_torch = Predictor(artifact, outputs="all", top_k=3, backend="torch").predict(rows[:50])
    for name, value in expected.items():
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
        np.testing.assert_array_equal(via_torch[name], value, err_msg=name)   # the serving module itself
        if name not in ("ood_p_value", "ood_flag", "ood_component", "hallucination_flag"):
            # onnxruntime vs torch (rank p-values may differ on a calibration row's tie: test_artifact)
            np.testing.assert_allclose(first[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
    assert first["attribution_index"].shape == (50, 3) and first["saliency"].shape == (50, 64)
    assert list(first["class"][:3]) == [str(k) for k in first["prediction"][:3]]


def test_predictor_answers_exactly_what_the_server_answers(artifact, rows, demo_repository):
    """One top-k selection for the server and the predictor: the HTTP batch endpoint's rows equal
    the predictor's, value for value."""
    from fastapi.testclient import TestClient

    from service.dataplane import DataPlane
    from service.repository import ModelRepository
    from service.rest.app import create_app
    from service.settings import Settings

    settings = Settings(model_repository=demo_repository)
    with TestClient(create_app(DataPlane(settings, ModelRepository(settings))), raise_server_exceptions=False) as c:
        body = {"instances": rows[:40].tolist(), "parameters": {"top_k": 4}}
        lines = c.post("/v2/models/digits_lse/versions/1/batch-attribution", json=body).text.splitlines()
    served = [__import__("json").loads(line) for line in lines]
    mine = Predictor(artifact, outputs="all", top_k=4).predict(rows[:40])
    for name in serving.output_names("classification"):
        # NDJSON writes float32 in its shortest form: read back as float32, the very same values
        got = np.asarray([row[name] for row in served]).astype(mine[name].dtype)
        np.testing.assert_array_equal(got, mine[name], err_msg=name)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_a_predictor_of_some_outputs_runs_their_graph_and_answers_as_the_whole_one(artifact, rows, backend):
    """A predictor asked for a few outputs runs a graph of just those (and the prediction, for class
    names): the same values, bit for bit, as a predictor of every output."""
    few = ["ood_flag", "probabilities"]
    whole = Predictor(artifact, outputs="all", top_k=3, backend=backend).predict(rows[:64])
    predictor = Predictor(artifact, outputs=few, top_k=3, backend=backend)
    part = predictor.predict(rows[:64])
    assert sorted(part) == sorted([*few, "class"])
    for name in few:
        assert part[name].tobytes() == whole[name].tobytes(), name
    assert list(part["class"]) == list(whole["class"])
    raw = predictor._runner(rows[:2].astype(np.float32))     # the graph computed nothing else
    assert sorted(raw) == sorted(["prediction", "probabilities", "ood_flag"])


def test_predictor_batches_keep_other_columns(artifact, rows):
    predictor = Predictor(artifact, outputs=["prediction", "certified_radius"])
    as_dict = predictor({"input": rows[:5], "id": np.arange(5) + 100})
    assert list(as_dict["id"]) == [100, 101, 102, 103, 104] and as_dict["prediction"].shape == (5,)
    features = load_dataset("digits").feature_names
    frame = pd.DataFrame(rows[:6], columns=features).assign(id=np.arange(6))
    out = predictor(frame)
    assert list(out.columns) == ["id", "prediction", "certified_radius", "class"] and len(out) == 6
    np.testing.assert_array_equal(out["prediction"].to_numpy(), as_dict["prediction"].tolist() + [out["prediction"][5]])
    with pytest.raises(ValueError, match="shape"):
        predictor.predict(rows[:3, :10])
    empty = Predictor(artifact, outputs="all", top_k=3).predict(rows[:0])
    full = Predictor(artifact, outputs="all", top_k=3).predict(rows[:2])
    assert {k: (v.shape[1:], v.dtype) for k, v in empty.items()} == \
        {k: (v.shape[1:], v.dtype) for k, v in full.items() if k != "class"}
    with pytest.raises(ValueError, match="NaN"):
        predictor.predict(np.full((2, 64), np.nan))
    with pytest.raises(ValueError, match="unknown output"):
        Predictor(artifact, outputs=["nope"])
    assert list(Predictor(artifact, outputs="certified_radius").predict(rows[:2])) == ["certified_radius", "class"]
    # on dcb55dc complex rows were answered for their real part (the imaginary part dropped by the
    # cast), and an empty DataFrame batch failed ("need at least one array to stack")
    with pytest.raises(ValueError, match="rows must be real numbers, got dtype complex128"):
        predictor.predict(rows[:2].astype(complex))
    assert len(predictor(pd.DataFrame({"input": [], "id": []}))) == 0


@pytest.mark.parametrize("model, options, message", [
    # on 00333c1 each of these was taken: a tau given to a classifier was dropped unread (the server
    # refuses it), a regression's tau of -1 or NaN served radii of 0 and inf radii of FLT_MAX, and
    # threads=1,000,000 had onnxruntime start a million threads
    ("digits_lse", {"tau": 0.5}, r"tau is a regression model's certificate tolerance; this is a classification model"),
    ("diabetes_lse", {"tau": -1.0}, r"tau must be a finite number > 0, got -1\.0"),
    ("diabetes_lse", {"tau": float("nan")}, r"tau must be a finite number > 0, got nan"),
    ("diabetes_lse", {"tau": float("inf")}, r"tau must be a finite number > 0, got inf"),
    ("diabetes_lse", {"tau": "0.5"}, r"tau must be a finite number > 0, got '0\.5'"),
    ("digits_lse", {"threads": 1_000_000}, r"threads must be an integer in \[0, 256\]"),
    ("digits_lse", {"threads": -1}, r"threads must be an integer in \[0, 256\]"),
    # and these were read as something else: top_k 2.7 as 2, True as 1, "3" as 3; no outputs answered
    # only the class names, an output named twice once, feature columns of the wrong count later
    ("digits_lse", {"top_k": 2.7}, r"top_k must be an integer in \[1, 10\], got 2\.7"),
    ("digits_lse", {"top_k": True}, r"top_k must be an integer in \[1, 10\], got True"),
    ("digits_lse", {"top_k": "3"}, r"top_k must be an integer in \[1, 10\], got '3'"),
    ("digits_lse", {"top_k": 11}, r"top_k must be an integer in \[1, 10\], got 11"),
    ("digits_lse", {"outputs": []}, r"outputs must name one or more of this model's outputs, each once, got \[\]"),
    ("digits_lse", {"outputs": ["prediction", "prediction"]}, r"each once, got \['prediction', 'prediction'\]"),
    ("digits_lse", {"feature_columns": ["a"]}, r"feature_columns must name the model's 64 features, got 1"),
])
def test_predictor_options_are_checked_as_the_server_checks_them(demo_repository, model, options, message):
    with pytest.raises(ValueError, match=message):
        Predictor(demo_repository / model / "1", **options)


def test_a_regression_predictor_reads_its_tau(demo_repository):
    from sklearn.datasets import load_diabetes

    rows, version = load_diabetes().data[:20], demo_repository / "diabetes_lse" / "1"
    default, given = (Predictor(version, outputs=["certified_radius"], **kw).predict(rows)["certified_radius"]
                      for kw in ({}, {"tau": 20.0}))
    np.testing.assert_array_equal(default, Predictor(version, outputs=["certified_radius"], tau=serving.DEFAULT_TAU)
                                  .predict(rows)["certified_radius"])
    assert (given > default).all()


def test_spark_map_in_pandas_function(artifact, rows):
    outputs = ["prediction", "ood_flag", "attribution_index"]
    fn = spark_map_in_pandas(artifact, outputs=outputs, top_k=2)
    fn = pickle.loads(pickle.dumps(fn))   # shipped to executors
    frames = [pd.DataFrame({"id": np.arange(i, i + 7), "input": list(rows[i:i + 7])}) for i in (0, 7)]
    result = pd.concat(list(fn(iter(frames))))
    assert list(result["id"]) == list(range(14)) and len(result["attribution_index"].iloc[0]) == 2
    assert spark_schema(artifact, outputs, passthrough="id long") == (
        "id long, prediction long, ood_flag boolean, attribution_index array<long>, class string")
    # the outputs as the Predictor reads them: on f7f1b6c an unknown name and a single name given as a
    # string were KeyErrors, no outputs a schema of the class alone, and a name twice two columns of it
    default = Predictor(artifact).predict(rows[:1])
    assert spark_schema(artifact) == ", ".join(
        f"{n} {'array<float>' if v.ndim > 1 else {'i': 'long', 'f': 'float', 'b': 'boolean'}[v.dtype.kind]}"
        for n, v in default.items() if n != "class") + ", class string"
    assert spark_schema(artifact, "prediction") == "prediction long, class string"
    for bad, message in ((["nope"], "unknown output"), ([], "each once"), (["prediction", "prediction"], "each once")):
        with pytest.raises(ValueError, match=message):
            spark_schema(artifact, bad)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster on loopback (2 CPUs), shut down afterwards (its processes stop with it)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=200 * 1024 * 1024, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_data_job_matches_the_predictor(ray_cluster, artifact, rows):
    ray = ray_cluster
    ds = ray.data.from_items([{"id": i, "input": row} for i, row in enumerate(rows)], override_num_blocks=8)
    out = attribute_dataset(ds, artifact, outputs=["prediction", "certified_radius", "attribution_index"], top_k=3,
                            batch_size=256, concurrency=2).to_pandas()
    assert len(out) == len(rows) and sorted(out["id"]) == list(range(len(rows)))
    out = out.sort_values("id")
    want = Predictor(artifact, outputs=["prediction", "certified_radius", "attribution_index"], top_k=3).predict(rows)
    np.testing.assert_array_equal(out["prediction"].to_numpy(), want["prediction"])
    np.testing.assert_array_equal(out["certified_radius"].to_numpy(), want["certified_radius"])
    np.testing.assert_array_equal(np.stack(out["attribution_index"].to_numpy()), want["attribution_index"])
    assert set(out["class"]) <= {str(k) for k in range(10)}
