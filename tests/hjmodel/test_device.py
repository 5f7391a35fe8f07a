"""A model moved with ``Module.to`` evaluates on its new device: nothing it computes with stays behind.

CI has no GPU, so the device is torch's ``meta`` device: its tensors carry shapes and a device but no
data, and every operation checks that its operands share one device -- exactly the mistake a model
moved to ``cuda`` would make at its first mixed operation (a constant cached by ``refresh`` left on
the CPU). Meta tensors cannot answer data-dependent questions, so the steps that ask one are given
an answer: the OOD reference's class table (built from label counts) is built on the CPU and
moved, and the gathered searches (the tangent search over the class pairs that can decide the
certificate, the interval-bound search over the rows where IBP can win: a ``nonzero`` each) gather
every element (torch's ``meta_nonzero_assume_all_nonzero``). ``eval/gpu.py`` runs the real thing on
CUDA when a GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hjmodel import functional as F
from hjmodel import load_model
from hjmodel.artifact import ExplainModule, ServingModule, TracedModule
from hjmodel.serving import output_names

META = torch.device("meta")
DEMOS = ["digits_lse", "digits_memory", "digits_deep", "diabetes_lse", "breast_cancer_lse"]


def _model(name, demo_repository, memory_regression):
    return memory_regression if name == "memory_regression" else load_model(demo_repository / name / "1")


def _tensors(value, seen=None):
    """Every tensor reachable from ``value`` through object attributes, tuples, lists and dicts."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v, seen)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, seen)
    elif hasattr(value, "__dict__") and type(value).__module__.startswith(("hjmodel", "torch.nn")):
        yield from _tensors(vars(value), seen)


@pytest.fixture
def gather_all():
    """A nonzero on the meta device gathers every element (docstring)."""
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def _moved(model):
    """``model`` moved to the meta device, with its class table answered (docstring)."""
    groups = model.reference.class_groups(model.n_outputs) if model.task == "classification" else None
    model = model.to(META)
    if groups is not None:
        moved = (groups[0].to(META), groups[1].to(META))
        model.reference.class_groups = lambda n_classes: moved
    return model


@pytest.mark.parametrize("name", [*DEMOS, "memory_regression"])
def test_every_cached_constant_follows_the_model(name, demo_repository, memory_regression):
    """After ``.to(device)`` no tensor the model holds -- parameters, buffers, the constants
    ``refresh`` caches, group tables, the OOD reference -- is left on the CPU; the float64 constants
    stay float64."""
    model = _model(name, demo_repository, memory_regression)
    before = {id(t): t.dtype for t in _tensors(model)}
    model.to(META)
    left = [tuple(t.shape) for t in _tensors(model) if t.device != META]
    assert not left, f"tensors left on the CPU: {left}"
    assert any(t.dtype == torch.float64 for t in _tensors(model)) and torch.float64 in before.values()


@pytest.mark.parametrize("name", [*DEMOS, "memory_regression"])
def test_a_moved_model_evaluates_on_its_device(name, demo_repository, memory_regression, gather_all):
    """evaluate (every output), explain, the serving and explanation modules and their traces (the
    torch backend's, whose batch-independent branches eager torch does not take): every operation's
    operands on the model's device, every output there."""
    model = _moved(_model(name, demo_repository, memory_regression))
    x = torch.zeros(3, model.n_features, dtype=torch.float64, device=META)
    ev = model.evaluate(x)
    assert set(ev.outputs) == set(output_names(model.task))
    assert all(v.device == META for v in ev.outputs.values())
    assert all(v.device == META for v in model.explain(x).values())
    tau = torch.full((3, 1), 0.1, dtype=torch.float64, device=META)
    served = ServingModule(model)(x.to(torch.float32), tau)
    assert all(v.device == META for v in served.values())
    explain = ExplainModule(model)
    if explain.specs:
        assert all(v.device == META for v in explain(x.to(torch.float32), tau, x.to(torch.float32)).values())
    # the torch backend's trace: the batch-independent form (functional.static_graph) on the device
    traced = TracedModule(ServingModule(model))
    assert all(v.device == META for v in traced(x.to(torch.float32), tau).values())
    if explain.specs:
        traced = TracedModule(explain)
        assert all(v.device == META for v in traced(x.to(torch.float32), tau, x.to(torch.float32)).values())


def test_moving_to_the_device_it_is_on_changes_nothing(demo_repository):
    """``.to("cpu")`` on a CPU model keeps its constants (the same objects) and its answers."""
    model = load_model(demo_repository / "digits_memory" / "1")
    x = torch.as_tensor(np.random.default_rng(0).uniform(0, 16, (8, 64)))
    want = model.evaluate(x).outputs
    pair, groups = model._pair, model.head.groups
    model.to("cpu")
    assert model._pair is pair and model.head.groups is groups
    got = model.evaluate(x).outputs
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_group_table_keeps_its_layout_when_moved():
    table = F.Groups.of(torch.tensor([[True, True, False, False], [False, False, True, True]]))
    moved = table.to(META)
    assert table.contiguous and moved.contiguous and moved.slots.device == META
    assert table.to("cpu") is table
