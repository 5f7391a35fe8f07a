"""V1 formatting (service/explain.py): every number read from the graph outputs, each with a meaning."""

from __future__ import annotations

import numpy as np
from fakes import FakeBackend, write_model

from hjmodel import serving
from service.explain import EXPLAIN_OUTPUTS, MEANINGS, PREDICT_OUTPUTS, explain_rows, predict_rows
from service.repository import ModelVersion, read_spec


def _version(tmp_path, task="classification") -> tuple[ModelVersion, dict]:
    spec = read_spec(write_model(tmp_path / "m" / "1", task, seed=4))
    backend = FakeBackend(spec, 4)
    x = np.random.default_rng(0).normal(size=(3, spec.n_features)).astype(np.float32)
    outputs = backend.infer(x, np.full(3, 0.1))
    mv = ModelVersion("m", 1, tmp_path, spec, backend, None, None, serving.output_names(task))
    return mv, outputs


def test_every_served_output_has_a_meaning():
    assert set(PREDICT_OUTPUTS) <= set(EXPLAIN_OUTPUTS) <= set(MEANINGS)


def test_predict_rows_reads_the_outputs(tmp_path):
    mv, outputs = _version(tmp_path)
    answer = predict_rows(mv, outputs)
    assert answer["predictions"] == [mv.spec.class_names[k] for k in outputs["prediction"]]
    first = answer["diagnostics"][0]
    assert first["certified_radius"]["value"] == float(outputs["certified_radius"][0])
    assert first["ood"]["component"]["value"] in serving.OOD_COMPONENTS
    assert abs(sum(first["probabilities"]["value"].values()) - 1.0) < 1e-5
    assert "alpha=0.05" in first["ood"]["flagged"]["meaning"]


def test_explain_rows_names_features_and_top_k(tmp_path):
    mv, outputs = _version(tmp_path, "regression")
    answer = explain_rows(mv, outputs, top_k=3)
    row = answer["explanations"][0]
    assert [a["rank"] for a in row["attributions"]["value"]] == [1, 2, 3]
    features = [f["feature"] for f in row["salient_features"]["value"]]
    assert len(features) == 3 and all(f in mv.spec.feature_names for f in features)
    assert isinstance(answer["predictions"][0], list)   # regression: the values
