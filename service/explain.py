"""Readable (V1) answers: class names, top attributions with their meaning, each number explained.

Pure formatting of graph outputs; nothing is computed here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hjmodel import serving
from service.repository import ModelVersion

__all__ = [
    "EXPLAIN_OUTPUTS",
    "MEANINGS",
    "PREDICT_OUTPUTS",
    "explain_rows",
    "predict_rows",
]

#: Output name -> what the number means (the serving contract's own docs).
MEANINGS: dict[str, str] = {o.name: o.doc for o in (*serving.OUTPUTS, *serving.EXPLAIN_OUTPUTS)}
MEANINGS["prediction"] = "predicted class (classification) or predicted values (regression)"

PREDICT_OUTPUTS = ("prediction", "probabilities", "certified_radius", "ood_score", "ood_flag", "ood_p_value",
                   "ood_component", "hallucination_flag", "energy_gap")
EXPLAIN_OUTPUTS = tuple(dict.fromkeys((*PREDICT_OUTPUTS, "attribution_entropy", "attribution_index",
                                       "attribution_weight", "label_sensitivity", "saliency",
                                       *(o.name for o in serving.EXPLAIN_OUTPUTS))))   # a name once per task

_UNIT = {
    "lse": "neuron j of the output's LSE layer (its weight row w_j and bias b_j)",
    "memory": "stored support point j (a training example or coreset point)",
    "deep": "neuron j of the final LSE head, in the learned feature space",
}


def _v(value: Any, meaning: str) -> dict[str, Any]:
    return {"value": value, "meaning": meaning}


def _scalar(array: np.ndarray, i: int) -> Any:
    return np.asarray(array)[i].item()


def _prediction(mv: ModelVersion, outputs: dict[str, np.ndarray], i: int) -> Any:
    if mv.task == "classification":
        return mv.spec.class_names[int(_scalar(outputs["prediction"], i))]
    return np.asarray(outputs["prediction"])[i].tolist()


def _common(mv: ModelVersion, outputs: dict[str, np.ndarray], i: int, alpha: Any) -> dict[str, Any]:
    spec = mv.spec
    out: dict[str, Any] = {}
    if mv.task == "classification":
        k = int(_scalar(outputs["prediction"], i))
        probs = np.asarray(outputs["probabilities"])[i].tolist()
        out["class_index"] = _v(k, "index of the predicted class in class_names")
        out["probabilities"] = _v(dict(zip(spec.class_names, probs, strict=True)),
                                  MEANINGS["probabilities"] + (
                                      " (Gibbs-weighted vote of the stored training labels)"
                                      if spec.kind == "memory" else " (softmax of the logits / eps)"))
        radius_doc = "L2 radius in raw input space within which no perturbation can change the predicted class"
    else:
        radius_doc = "L2 radius in raw input space within which every output moves by at most tau"
    out["certified_radius"] = _v(_scalar(outputs["certified_radius"], i), radius_doc + " (sound, closed form)")
    component = int(_scalar(outputs["ood_component"], i))
    out["ood"] = {
        "flagged": _v(bool(_scalar(outputs["ood_flag"], i)),
                      f"out-of-distribution at the calibrated false-positive rate alpha={alpha}"),
        "score": _v(_scalar(outputs["ood_score"], i), MEANINGS["ood_score"] + "; larger = farther from the data"),
        "p_value": _v(_scalar(outputs["ood_p_value"], i),
                      "split-conformal p-value; small = unusual for in-distribution data"),
        "component": _v(serving.OOD_COMPONENTS[component] if 0 <= component < len(serving.OOD_COMPONENTS)
                        else component,
                        "which calibrated component is larger: unsupported (far from the training data) or "
                        "ambiguous (1 - max class probability)"),
    }
    out["hallucination"] = _v(bool(_scalar(outputs["hallucination_flag"], i)), MEANINGS["hallucination_flag"])
    out["energy_gap"] = _v(_scalar(outputs["energy_gap"], i),
                           MEANINGS["energy_gap"] + "; large = one neuron dominates (linear extrapolation regime)")
    return out


def predict_rows(mv: ModelVersion, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{"predictions": [...], "diagnostics": [...]}`` for every row."""
    n = len(outputs["prediction"])
    alpha = mv.spec.alpha
    return {
        "model_name": mv.name,
        "model_version": str(mv.version),
        "predictions": [_prediction(mv, outputs, i) for i in range(n)],
        "diagnostics": [_common(mv, outputs, i, alpha) for i in range(n)],
    }


def _support_info(spec: serving.ArtifactSpec, j: int) -> dict[str, Any]:
    """Training-example id / label of support point j when the artifact lists them."""
    info: dict[str, Any] = {}
    for values, label in ((spec.support_ids, "training_example_id"), (spec.support_labels, "training_label")):
        if values is not None and 0 <= j < len(values):
            info[label] = values[j]
    return info


def _class_name(mv: ModelVersion, k: int) -> Any:
    names = mv.spec.class_names
    return names[k] if 0 <= k < len(names) else k


def _explanation_graph(mv: ModelVersion, outputs: dict[str, np.ndarray], i: int, features, top_k: int) -> dict:
    """The sections read from the explanation graph's outputs, when the model has them."""
    out: dict[str, Any] = {}
    if "integrated_gradients" in outputs:
        ig = np.asarray(outputs["integrated_gradients"])[i]
        order = np.argsort(-np.abs(ig), kind="stable")[:top_k].tolist()
        out["integrated_gradients"] = _v(
            {"top": [{"feature": features[f] if f < len(features) else f, "value": ig[f].item()} for f in order],
             "sum": float(ig.sum(dtype=np.float64))},   # float32 values, summed where they cannot overflow
            MEANINGS["integrated_gradients"] + " (baseline: the request's baseline parameter, default the training mean)")
    if "label_flips" in outputs:
        count = int(_scalar(outputs["label_flips"], i))
        plan = [j for j in np.asarray(outputs["label_flip_index"])[i].tolist() if j >= 0]
        flips = {"count": count if count <= len(mv.spec.support_ids or ()) else None,
                 "to_class": _class_name(mv, int(_scalar(outputs["label_flip_target"], i))),
                 "examples": [{"index": j, **_support_info(mv.spec, j)} for j in plan]}
        out["label_flips"] = _v(flips, MEANINGS["label_flips"] + "; examples: the first of them, in order "
                                "(null count: no relabelling flips it)")
    hj = {key: _scalar(outputs[key], i) for key in ("hj_initial_value", "hj_value", "hopf_lax_value") if key in outputs}
    if hj:
        if "hj_support_point" in outputs:
            hj["hj_support_point"] = np.asarray(outputs["hj_support_point"])[i].tolist()
        out["hj"] = _v(hj, "the dominant neuron's Hamilton-Jacobi reading (Thm 4.1, 5.1): initial value g_j, "
                           "u(z, t) over the decisive group, its eps -> 0 (Hopf-Lax) value, support point y_j "
                           "in raw input space")
    if "tropical_prediction" in outputs:
        tropical = np.asarray(outputs["tropical_prediction"])[i]
        value = _class_name(mv, int(tropical)) if mv.task == "classification" else tropical.tolist()
        out["eps_what_if"] = _v({"tropical_prediction": value,
                                 "decision_changes": bool(_scalar(outputs["eps_decision_changes"], i))},
                                serving.spec_of(mv.task, "tropical_prediction").doc + "; "
                                + MEANINGS["eps_decision_changes"])
    return out


def explain_rows(mv: ModelVersion, outputs: dict[str, np.ndarray], top_k: int) -> dict[str, Any]:
    """:func:`predict_rows` plus, per row, the top-k attributions and the most salient features."""
    result = predict_rows(mv, outputs)
    spec = mv.spec
    unit = _UNIT.get(spec.kind, "neuron / support point j")
    features = list(spec.feature_names)
    explanations = []
    for i in range(len(result["predictions"])):
        index = np.asarray(outputs["attribution_index"])[i, :top_k].tolist()
        weight = np.asarray(outputs["attribution_weight"])[i, :top_k].tolist()
        sens = np.asarray(outputs["label_sensitivity"])[i, :top_k].tolist()
        attributions = []
        for rank, (j, w, s) in enumerate(zip(index, weight, sens, strict=True), start=1):
            item = {"rank": rank, "index": j, "weight": w, "label_sensitivity": s}
            item.update(_support_info(spec, j))
            attributions.append(item)
        saliency = np.asarray(outputs["saliency"])[i]
        order = np.argsort(-np.abs(saliency), kind="stable")[:top_k].tolist()
        salient = [{"feature": (features[f] if isinstance(features, list) and f < len(features) else f),
                    "gradient": saliency[f].item()} for f in order]
        explanations.append({
            **_explanation_graph(mv, outputs, i, features, top_k),
            "attributions": _v(attributions,
                               f"top-{top_k} Gibbs weights pi_j (they sum to 1 over all j); index = {unit}; "
                               "label_sensitivity = d prediction / d label_j (Prop F.1)"),
            "attribution_entropy": _v(_scalar(outputs["attribution_entropy"], i),
                                      MEANINGS["attribution_entropy"] + "; 0 = one neuron decides alone"),
            "salient_features": _v(salient, "features with the largest |gradient| of the decisive output "
                                            "(raw input space)"),
        })
    result["explanations"] = explanations
    return result
