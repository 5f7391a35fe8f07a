"""The serving contract: the named tensors a served hjmodel artifact produces.

Both artifact formats compute the same outputs from the same inputs:

* ``model.onnx`` -- an ONNX graph with inputs ``input`` (float32, ``(batch, d)``) and ``tau``
  (float64, ``(1,)``: tolerance of the regression certificate, ignored for classification), and
  the outputs below as graph outputs with these names.
* ``model.pt`` + ``model.json`` -- a torch state dict (loaded with ``weights_only=True``) and its
  JSON spec; :func:`hjmodel.artifact.load_serving_module` rebuilds the module whose
  ``forward(input, tau)`` returns a ``dict`` with the same names.

The service only moves these tensors; every number is computed by hjmodel.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Largest top-k the serving graph computes; requests slice ``attribution_*`` down to their own k.
TOP_K_MAX = 10

#: Name of the ONNX metadata property that holds the JSON spec.
ONNX_SPEC_KEY = "hjmodel.spec"

#: Format tag written into every spec.
SPEC_FORMAT = "hjmodel/1"


@dataclass(frozen=True)
class OutputSpec:
    """One named output: V2 datatype and per-row shape (``"d"`` = n_features, ``"K"`` = n_outputs,
    ``"k"`` = top-k)."""

    name: str
    datatype: str
    row_shape: tuple[str, ...]
    tasks: tuple[str, ...]
    doc: str


OUTPUTS: tuple[OutputSpec, ...] = (
    OutputSpec("prediction", "INT64", (), ("classification",), "predicted class index"),
    OutputSpec("prediction", "FP32", ("K",), ("regression",), "predicted values"),
    OutputSpec("probabilities", "FP32", ("K",), ("classification",), "class probabilities"),
    OutputSpec("certified_radius", "FP32", (), ("classification", "regression"),
               "L2 radius (raw input space) within which the decision (or each output within tau) cannot change"),
    OutputSpec("ood_score", "FP32", (), ("classification", "regression"),
               "Hopf-Cole value u over the reference measure, in diffusion units"),
    OutputSpec("ood_flag", "BOOL", (), ("classification", "regression"),
               "input flagged out-of-distribution at the calibrated false-positive rate alpha"),
    OutputSpec("ood_p_value", "FP32", (), ("classification", "regression"),
               "split-conformal p-value of the combined OOD statistic"),
    OutputSpec("ood_component", "INT64", (), ("classification", "regression"),
               "component with the larger calibrated score: 0 unsupported (u), 1 ambiguous (1 - max prob)"),
    OutputSpec("hallucination_flag", "BOOL", (), ("classification", "regression"),
               "unsupported by the data AND in the single-neuron extrapolation regime (Prop 8.5)"),
    OutputSpec("energy_gap", "FP32", (), ("classification", "regression"),
               "Delta/eps: top pre-activation minus the second, in units of eps (Prop 8.5)"),
    OutputSpec("attribution_entropy", "FP32", (), ("classification", "regression"),
               "entropy of the Gibbs weights, in [0, log N]"),
    OutputSpec("attribution_index", "INT64", ("k",), ("classification", "regression"),
               "indices of the top-k neurons / support points by Gibbs weight"),
    OutputSpec("attribution_weight", "FP32", ("k",), ("classification", "regression"),
               "their Gibbs weights pi_j"),
    OutputSpec("label_sensitivity", "FP32", ("k",), ("classification", "regression"),
               "d prediction / d label_j of the top-k (Prop F.1)"),
    OutputSpec("saliency", "FP32", ("d",), ("classification", "regression"),
               "gradient of the decisive output with respect to the raw input"),
)

#: Outputs returned when a request lists none.
DEFAULT_OUTPUTS = ("prediction", "probabilities", "certified_radius", "ood_flag")


def outputs_for(task: str) -> tuple[OutputSpec, ...]:
    """The outputs a model of ``task`` ("classification" or "regression") produces, in graph order."""
    return tuple(o for o in OUTPUTS if task in o.tasks)


def output_names(task: str) -> tuple[str, ...]:
    """Names of :func:`outputs_for`."""
    return tuple(o.name for o in outputs_for(task))
