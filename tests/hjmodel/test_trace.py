"""The torch backend's TorchScript trace (hjmodel.artifact.TracedModule) answers what eager torch does,
bit for bit, on every demo model -- the served certificates included -- at batch sizes other than the
one it was recorded with, and keeps float64 constants apart that are equal in float32."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits

from hjmodel import functional as F
from hjmodel.artifact import (
    STATIC_ROWS,
    ExplainModule,
    ServingModule,
    TracedModule,
    example_inputs,
    load_serving_module,
    static_call_budget,
)
from hjmodel.serving import IG_ORDER, IG_PANELS

DATA = {"digits_lse": load_digits, "digits_memory": load_digits, "digits_deep": load_digits,
        "breast_cancer_lse": load_breast_cancer, "diabetes_lse": load_diabetes}


def _rows(name: str, n: int, seed: int) -> torch.Tensor:
    """n rows: the dataset's own rows, some scaled far out (OOD, wide radii), one row of zeros."""
    X = DATA[name](return_X_y=True)[0]
    rng = np.random.default_rng(seed)
    x = X[rng.choice(len(X), n, replace=False)].copy()
    x[::3] *= rng.uniform(2.0, 30.0, size=(len(x[::3]), 1))
    x[-1] = 0.0
    return torch.tensor(x, dtype=torch.float32)


def _assert_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), (key, (got[key] != want[key]).nonzero()[:5])


def _traced(module, **options) -> TracedModule:
    """TracedModule(module), its static runtime taking all STATIC_ROWS rows however busy the machine
    (at load it takes only as many as it runs within ``STATIC_CALL_S``: a test budget of a minute)."""
    with static_call_budget(60.0):
        return TracedModule(module, **options)


@pytest.fixture(scope="module", params=sorted(DATA))
def served(request, demo_repository):
    module = load_serving_module(demo_repository / request.param / "1").eval()
    return request.param, module, _traced(module)


@pytest.mark.parametrize("n", [1, 3, 64])
def test_the_trace_answers_what_eager_torch_does(served, n):
    name, module, traced = served
    x = _rows(name, n, seed=n)
    tau = torch.full((n, 1), 0.1, dtype=torch.float64).uniform_(0.05, 0.5, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want = module(x, tau)
    for _ in range(4):   # TorchScript's executor profiles the first calls and may plan anew after them
        _assert_identical(traced(x, tau), want)
    if n == 64:
        # the certificate's searches ran on some of these rows and were skipped on others
        assert (want["certified_radius"] > 0).any()
    # the interpreter's switch is per thread: a call from a thread that never set it
    with ThreadPoolExecutor(1) as pool:
        _assert_identical(pool.submit(traced, x, tau).result(), want)


def test_the_trace_answers_what_eager_torch_does_for_a_memory_regression(memory_regression):
    # a kind no demo model has: the certificate's general (n, K, N) masked form, the OOD score over
    # every reference point (the expanded distances of the batch-independent form)
    serving, explain = ServingModule(memory_regression).eval(), ExplainModule(memory_regression).eval()
    gen = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(37, memory_regression.n_features, generator=gen)
    tau = torch.full((37, 1), 0.3, dtype=torch.float64)
    base = torch.zeros_like(x)
    with torch.no_grad():
        want, want_explain = serving(x, tau), explain(x, tau, base)
    _assert_identical(TracedModule(serving)(x, tau), want)
    _assert_identical(TracedModule(explain)(x, tau, base), want_explain)


def test_the_trace_does_not_depend_on_the_batch_it_was_recorded_with(served):
    # recorded on batches where data-dependent searches are empty -- rows of NaN (radius 0: no
    # interval-bound search), the dataset's first two rows (on digits_deep: no tangent search) -- a
    # trace that kept eager torch's skip of an empty search would skip it on every later batch too
    name, module, _ = served
    x = _rows(name, 64, seed=11)
    tau = torch.full((64, 1), 0.1, dtype=torch.float64)
    with torch.no_grad():
        want = module(x, tau)
    nan = example_inputs(module)
    nan["input"] = torch.full_like(nan["input"], float("nan"))
    first = {"input": torch.tensor(DATA[name](return_X_y=True)[0][:2], dtype=torch.float32),
             "tau": torch.full((2, 1), 0.1, dtype=torch.float64)}
    recorded = TracedModule(module).operations()
    for example in (nan, first):
        traced = TracedModule(module, example)
        assert traced.operations() == recorded      # the same graph, whichever rows recorded it
        _assert_identical(traced(x, tau), want)


def test_the_trace_skips_the_searches_the_onnx_graph_skips_when_they_gather_nothing(served, demo_repository):
    """The gathered searches the exported graph puts in an If on "anything gathered"
    (artifact._skip_empty_searches) sit in a prim::If in the trace too (artifact._skip_empty_traced_searches):
    a row whose searches gather nothing skips their operations, and both branches answer bit for bit
    what the trace without the Ifs does."""
    import onnx

    from hjmodel.artifact import ONNX_FILE, _gathered_searches

    name, module, traced = served
    onnx_ifs = [n for n in onnx.load(str(demo_repository / name / "1" / ONNX_FILE)).graph.node if n.op_type == "If"]
    assert traced.searches_skipped == len(onnx_ifs) == sum(_gathered_searches(module.model))
    assert traced.operations().count("prim::If") == len(onnx_ifs)
    plain = TracedModule(module, skip_searches=False)
    assert plain.searches_skipped == 0 and "prim::If" not in plain.operations()
    assert sorted(k for k in traced.operations() if k != "prim::If") == sorted(
        [*plain.operations(), *["aten::numel", "aten::gt", "prim::Constant"] * len(onnx_ifs)])
    tau1 = torch.full((1, 1), 0.1, dtype=torch.float64)
    one = torch.tensor(DATA[name](return_X_y=True)[0][:1], dtype=torch.float32)  # its searches gather nothing
    _assert_identical(traced(one, tau1), plain(one, tau1))
    if onnx_ifs:
        assert traced.calls_made(one, tau1) < 0.85 * plain.calls_made(one, tau1)
    # the dataset and the dataset x10: each wrapped search gathers rows in some row block (the IBP
    # search of digits_lse only far out, digits_deep's tangent search only): its branch ran there
    X = torch.tensor(DATA[name](return_X_y=True)[0], dtype=torch.float32)
    x = torch.cat([X, 10.0 * X])
    tau = torch.full((len(x), 1), 0.1, dtype=torch.float64)
    _assert_identical(traced(x, tau), plain(x, tau))
    if onnx_ifs:
        skipped_all = plain.calls_made(one, tau1) - traced.calls_made(one, tau1)
        blocks = len(module.blocks(len(x)))
        assert plain.calls_made(x, tau) - traced.calls_made(x, tau) < skipped_all * blocks


def _gathers(x: torch.Tensor) -> torch.Tensor:
    rows = (x[:, 0] > 0).nonzero().squeeze(-1)                  # a gathered search over some rows
    return (x * 2.0).index_put((rows,), x.index_select(0, rows).exp().sum(-1, keepdim=True).expand(-1, 3))


def _gathers_then_writes_in_place(x: torch.Tensor) -> torch.Tensor:
    return _gathers(x).mul_(3.0)


def _gathers_within_a_search(x: torch.Tensor) -> torch.Tensor:
    rows = (x[:, 0] > 0).nonzero().squeeze(-1)
    sub = x.index_select(0, rows)
    inner = (sub[:, 1] > 0).nonzero().squeeze(-1)             # a second search inside the first
    found = sub.index_put((inner,), sub.index_select(0, inner) * 2.0)
    return (x * 2.0).index_put((rows,), found)


def test_the_traced_search_wrap_on_a_small_graph_and_where_it_must_not_wrap():
    """artifact._skip_empty_traced_searches on a recording of its own: a search from a nonzero to the
    index_put that writes back into data not depending on it goes into a branch, and the recording
    answers what eager torch does whether rows were gathered or not; a graph that writes anything in
    place is left as recorded (the else-branch passes the data itself, which a later in-place write
    would change)."""
    from hjmodel.artifact import _skip_empty_traced_searches

    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 0] = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5], dtype=torch.float64)
    traced = torch.jit.trace(_gathers, (x,))
    wrapped, count = _skip_empty_traced_searches(traced, (True,))
    assert count == 1 and [n.kind() for n in wrapped.graph.nodes()].count("prim::If") == 1
    none = -x.abs()                                             # nothing gathered: the else-branch
    for rows in (x, none, x[:1], none[:1]):
        assert torch.equal(wrapped(rows), _gathers(rows))
    assert _skip_empty_traced_searches(traced, (False,)) == (traced, 0)
    assert _skip_empty_traced_searches(traced, (True, True)) == (traced, 0)   # another number of searches
    in_place = torch.jit.trace(_gathers_then_writes_in_place, (x,))
    assert _skip_empty_traced_searches(in_place, (True,)) == (in_place, 0)
    # the second search moves into the first one's branch with it, and runs only there
    nested = torch.jit.trace(_gathers_within_a_search, (x,))
    wrapped, count = _skip_empty_traced_searches(nested, (True, True))
    assert count == 1 and [n.kind() for n in wrapped.graph.nodes()].count("prim::If") == 1
    for rows in (x, none, x[:1], none[:1], torch.cat([x[:, :1], -x[:, 1:].abs()], 1)):
        assert torch.equal(wrapped(rows), _gathers_within_a_search(rows))


def test_a_wrap_that_fails_leaves_the_searches_as_recorded_and_says_why(served, monkeypatch, caplog):
    # TorchScript's graph API is internal: where moving a search into a branch fails, the trace
    # answers as recorded, every search run
    name, module, traced = served

    def broken(*args, **kwargs):
        raise RuntimeError("no such method")

    monkeypatch.setattr("hjmodel.artifact._gathered_search", broken)
    with caplog.at_level("WARNING", logger="hjmodel.artifact"):
        unwrapped = TracedModule(module)
    assert unwrapped.searches_skipped == 0 and "prim::If" not in unwrapped.operations()
    if traced.searches_skipped:
        assert "wrapping its searches failed" in caplog.text and "no such method" in caplog.text
    x = _rows(name, 9, seed=8)
    tau = torch.full((9, 1), 0.1, dtype=torch.float64)
    _assert_identical(unwrapped(x, tau), traced(x, tau))


def test_a_trace_of_some_outputs_answers_what_the_whole_trace_does(served):
    """``ServingModule(model, outputs)`` -- what a server traces for batches that need fewer outputs
    (service.backends.base.OutputGraphs) -- records only the work those outputs need and answers
    them bit for bit as the whole module's trace does."""
    name, module, traced = served
    x = _rows(name, 64, seed=11)
    tau = torch.empty((64, 1), dtype=torch.float64).uniform_(0.05, 0.5, generator=torch.Generator().manual_seed(11))
    want = traced(x, tau)
    names = [o.name for o in module.specs]
    rng = np.random.default_rng(len(name))
    subsets = [("prediction",), ("prediction", "ood_flag"), tuple(n for n in names if n != "certified_radius"),
               tuple(n for n in names if rng.random() < 0.5) or ("certified_radius",)]
    sizes = {}
    for subset in subsets:
        part = TracedModule(ServingModule(module.model, subset))
        assert part.names == subset
        _assert_identical(part(x, tau), {k: want[k] for k in subset})
        sizes[subset] = len(part.operations())
    whole = len(traced.operations())
    assert sizes[("prediction",)] * 5 < whole and max(sizes.values()) < whole
    if "probabilities" in names:   # a classifier's certified radius is most of its graph
        assert sizes[subsets[2]] * 2 < whole


def test_folding_the_weight_only_operations_removes_them_and_changes_no_bit(served):
    # the trace records the weights as constants; what reads them alone (casts, index tables, products
    # of weights) is computed once at load -- by the kernels the unfolded graph would run per call
    name, module, traced = served
    unfolded = TracedModule(module, fold=False)
    assert len(traced.operations()) < 0.95 * len(unfolded.operations())
    flags = [p.requires_grad for p in module.parameters()]
    assert any(flags)      # as loaded: tracing takes the flags off while it records, and puts them back
    TracedModule(module)
    assert flags == [p.requires_grad for p in module.parameters()]
    x = _rows(name, 33, seed=3)
    tau = torch.empty((33, 1), dtype=torch.float64).uniform_(0.05, 0.5, generator=torch.Generator().manual_seed(3))
    _assert_identical(traced(x, tau), unfolded(x, tau))
    explain = ExplainModule(module.model).eval()
    base = example_inputs(explain, rows=33)["baseline"]
    _assert_identical(TracedModule(explain)(x, tau, base), TracedModule(explain, fold=False)(x, tau, base))


def test_modules_sharing_weights_are_recorded_on_several_threads_at_once(served):
    # a server records modules of fewer outputs on a thread of its own while others may record too:
    # each recording takes the shared weights' flags off and puts them back without racing another
    name, module, traced = served
    flags = [p.requires_grad for p in module.parameters()]
    subsets = [("prediction",), ("prediction", "ood_flag"), ("certified_radius",), ("energy_gap", "prediction")]
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda subset: TracedModule(ServingModule(module.model, subset)), subsets))
    assert flags == [p.requires_grad for p in module.parameters()]
    x = _rows(name, 5, seed=2)
    tau = torch.full((5, 1), 0.1, dtype=torch.float64)
    want = traced(x, tau)
    for subset, part in zip(subsets, parts):
        _assert_identical(part(x, tau), {k: want[k] for k in subset if k in want})


def test_a_fold_that_would_hold_too_many_bytes_is_not_made(served, monkeypatch, caplog):
    name, module, folded = served
    monkeypatch.setattr("hjmodel.artifact.FOLDED_BYTES", -(1 << 40))   # no fold is small enough
    with caplog.at_level("INFO", logger="hjmodel.artifact"):
        traced = TracedModule(module)
    assert "left unfolded" in caplog.text
    assert len(traced.operations()) > len(folded.operations())
    x = _rows(name, 9, seed=4)
    tau = torch.full((9, 1), 0.1, dtype=torch.float64)
    _assert_identical(traced(x, tau), folded(x, tau))


def test_a_fold_that_fails_leaves_the_trace_unfolded_and_says_why(served, monkeypatch, caplog):
    # the passes are TorchScript internals: where they fail, the recording answers unfolded
    name, module, folded = served

    def broken(graph):
        raise RuntimeError("no such pass")

    monkeypatch.setattr(torch._C, "_jit_pass_constant_propagation", broken)
    with caplog.at_level("WARNING", logger="hjmodel.artifact"):
        traced = TracedModule(module)
    assert "constant folding failed" in caplog.text and "no such pass" in caplog.text
    assert traced.folded_bytes == 0 and len(traced.operations()) > len(folded.operations())
    x = _rows(name, 9, seed=6)
    tau = torch.full((9, 1), 0.1, dtype=torch.float64)
    _assert_identical(traced(x, tau), folded(x, tau))


def test_the_traced_explanation_answers_what_eager_torch_does(served):
    name, module, _ = served
    explain = ExplainModule(module.model).eval()
    traced = TracedModule(explain)
    x = _rows(name, 3, seed=7)
    tau = torch.full((3, 1), 0.2, dtype=torch.float64)
    base = example_inputs(explain, rows=3)["baseline"]
    with torch.no_grad():
        want = explain(x, tau, base)
    for _ in range(3):
        _assert_identical(traced(x, tau, base), want)


def test_the_trace_runs_a_large_batch_in_the_modules_row_blocks(served, monkeypatch):
    # blocks of a few rows (as a model with 60,000 support points gets at a few hundred): the trace
    # is called on each block, never on the batch whole, and answers what eager torch does in blocks
    name, module, traced = served
    monkeypatch.setattr("hjmodel.models.BLOCK_ELEMENTS", 5 * module.model.row_elements)
    monkeypatch.setattr("hjmodel.serving.EXPLAIN_ELEMENTS", 3 * IG_PANELS * IG_ORDER * _first_width(module.model))
    explain = ExplainModule(module.model).eval()
    traced_explain = TracedModule(explain)
    x = _rows(name, 17, seed=5)
    tau = torch.full((17, 1), 0.1, dtype=torch.float64)
    base = example_inputs(explain, rows=17)["baseline"]
    for graph, module_, inputs, most in ((traced, module, (x, tau), 5), (traced_explain, explain, (x, tau, base), 3)):
        sizes, recorded = [], graph.graph
        monkeypatch.setattr(graph, "graph", lambda *a, sizes=sizes, recorded=recorded:
                            sizes.append(a[0].shape[0]) or recorded(*a))
        with torch.no_grad():
            want = module_(*inputs)
        _assert_identical(graph(*inputs), want)
        assert sum(sizes) == 17 and max(sizes) == most, sizes


def test_the_trace_runs_in_inference_mode_whoever_calls_it(served):
    # inference mode skips autograd's bookkeeping on each of the graph's ~900 operations (timed against
    # no_grad in bench/results/ab_trace.md); a caller that does not enter it (the Predictor, a
    # script) gets it too, in one block or several, with the same answers
    name, module, traced = served
    x = _rows(name, 7, seed=2)
    tau = torch.full((7, 1), 0.1, dtype=torch.float64)
    with torch.no_grad():
        want = module(x, tau)
    got = traced(x, tau)
    _assert_identical(got, want)
    assert all(v.is_inference() for v in got.values())
    # the interpreter's row-blocks path (a call on the static runtime is one block by construction)
    blocks, traced.blocks = traced.blocks, lambda n: [slice(0, 3), slice(3, n)]
    static_rows, traced.static_rows = traced.static_rows, 0
    try:
        got = traced(x, tau)
    finally:
        traced.blocks, traced.static_rows = blocks, static_rows
    with torch.no_grad():   # eager torch on the same blocks (a product's rounding may depend on its rows)
        parts = [module(x[r], tau[r]) for r in (slice(0, 3), slice(3, 7))]
    _assert_identical(got, {k: torch.cat([p[k] for p in parts]) for k in want})
    assert all(v.is_inference() for v in got.values())


def _first_width(model) -> int:
    return model.body[0].W.shape[0] if model.body else model.head.W.shape[0]


class _Constants(torch.nn.Module):
    """Products by float64 constants that are equal in float32 (1 + 2**-40 and 1; -1e-300 and 0)."""

    specs = tuple(SimpleNamespace(name=k) for k in ("up", "one", "tiny", "zero"))
    model = None

    def blocks(self, n):
        return [slice(0, n)]

    def forward(self, x):
        return {"up": x * F._UP, "one": x * 1.0, "tiny": (x + 1.0) * -1e-300, "zero": x * 0.0}


def test_float32_equal_constants_stay_apart_in_the_trace():
    # TorchScript's optimising executor pools such constants (torch 2.13: x * 0.0 computed x * -1e-300);
    # a directed-rounding factor merged with 1 would silently loosen a certificate
    module = _Constants()
    x = torch.arange(3, dtype=torch.float64)
    traced = TracedModule(module, {"x": x})
    for _ in range(5):
        _assert_identical(traced(x), module(x))
    assert traced(x)["up"][1].item() == F._UP and traced(x)["tiny"][0].item() == -1e-300


class _Weights(torch.nn.Module):
    """x @ W.to(float64) (a no-op cast: the folded value is W itself) and x @ (2 W) (a new tensor)."""

    specs = (SimpleNamespace(name="same"), SimpleNamespace(name="doubled"))
    model = None

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))

    def blocks(self, n):
        return [slice(0, n)]

    def forward(self, x):
        return {"same": x @ self.W.to(torch.float64), "doubled": x @ (self.W * 2.0)}


def test_a_trace_counts_the_memory_its_folded_values_hold_and_only_that():
    # the torch backend charges a graph of fewer outputs what it holds beyond the model's own tensors
    # (service.backends.base.OutputGraphs' byte budget): the doubled weight, not the weight itself
    module = _Weights()
    x = torch.randn(3, 64, dtype=torch.float64)
    traced = TracedModule(module, {"x": x})
    assert traced.folded_bytes == module.W.nbytes
    assert TracedModule(module, {"x": x}, fold=False).folded_bytes == 0
    _assert_identical(traced(x), module(x))
    assert module.W.requires_grad


# ----------------------------------------------------------------------------- the static runtime

def _spy_static(traced) -> list[int]:
    """Count the calls ``traced`` answers on its static runtime (rows per call)."""
    calls, run = [], traced._static.run

    def counted(inputs):
        calls.append(inputs[0].shape[0])
        return run(inputs)
    traced._static.run = counted
    return calls


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_small_calls_run_on_the_static_runtime_bit_for_bit(served, scale):
    # every row of the dataset (x5: far out, wide radii, the OOD flag up) in calls of STATIC_ROWS rows,
    # on the static runtime and on the interpreter. With the recording's tensor constants left in its
    # graph (not lifted into inputs) the runtime's preparation changed 114 digits_deep outputs here
    name, module, _ = served
    traced, interpreted = _traced(module), TracedModule(module, static_rows=0)
    rows = traced.static_rows
    assert rows == STATIC_ROWS and traced._static is not None and interpreted._static is None
    calls = _spy_static(traced)
    X = torch.tensor(DATA[name](return_X_y=True)[0], dtype=torch.float32) * scale
    for start in range(0, len(X), rows):
        x = X[start:start + rows]
        tau = torch.full((len(x), 1), 0.1, dtype=torch.float64)
        _assert_identical(traced(x, tau), interpreted(x, tau))
    assert len(calls) == -(-len(X) // rows)
    x = X[:rows + 1]                               # one row more: the interpreter
    tau = torch.full((len(x), 1), 0.1, dtype=torch.float64)
    _assert_identical(traced(x, tau), interpreted(x, tau))
    assert len(calls) == -(-len(X) // rows)


def test_the_static_runtime_takes_only_as_many_rows_as_it_runs_within_its_budget(served, monkeypatch):
    # it holds Python's lock: a call that takes longer than STATIC_CALL_S runs on the interpreter
    import hjmodel.artifact as artifact

    name, module, _ = served
    monkeypatch.setattr(artifact, "STATIC_CALL_S", 0.0)
    prepared = []
    prepare = torch._C._jit_to_static_module
    monkeypatch.setattr(torch._C, "_jit_to_static_module", lambda graph: prepared.append(1) or prepare(graph))
    traced = TracedModule(module)
    # one row's interpreter call is over twice the budget: the runtime is not even prepared (its calls
    # at load would hold the lock), and the calls run on the interpreter
    assert traced.static_rows == 0 and traced._static is None and prepared == []
    monkeypatch.setattr(artifact, "STATIC_CALL_S", 60.0)
    assert _traced(module)._static is not None and prepared == [1]
    assert TracedModule(module).static_rows == STATIC_ROWS
    with pytest.raises(RuntimeError, match="while open"), static_call_budget(0.0):   # it comes back, whatever happens
        assert TracedModule(module).static_rows == 0
        raise RuntimeError("raised while open")
    assert artifact.STATIC_CALL_S == 60.0
    # a clock on which every call takes 0.5 ms a row: 8 rows are over 2.1 ms, 4 rows within; measured
    # upwards, so no call much over the budget is made
    static, reads, rows = _traced(module)._static, [], []
    call = static.call

    def counted(inputs):
        rows.append(inputs[0].shape[0])
        return call(inputs)

    def clock():            # read before and after each timed call
        reads.append(None)
        return 0.0 if len(reads) % 2 else rows[-1] * 5e-4
    static.call = counted
    inputs = tuple(example_inputs(module).values())
    assert static.rows_within(2.1e-3, STATIC_ROWS, inputs, clock) == 4
    assert sorted(set(rows)) == [1, 2, 4, 8]
    rows.clear()
    assert static.rows_within(1e-4, STATIC_ROWS, inputs, clock) == 0 and set(rows) == {1}
    rows.clear()
    assert static.rows_within(60.0, 12, inputs, clock) == 12 and sorted(set(rows)) == [1, 2, 4, 8, 12]


def test_the_static_runtimes_answers_outlive_its_next_call(served):
    # the runtime plans its intermediate tensors in one arena per shape: what it returned is the
    # caller's, not overwritten by the next call
    name, module, traced = served
    x, y = _rows(name, 4, seed=5), _rows(name, 4, seed=6)
    tau = torch.full((4, 1), 0.2, dtype=torch.float64)
    first = traced(x, tau)
    kept = {k: v.clone() for k, v in first.items()}
    traced(y, tau)
    traced(y * 3.0, tau)
    _assert_identical(first, kept)
    with torch.no_grad():
        _assert_identical(first, module(x, tau))


def test_a_call_made_while_the_runtime_is_busy_runs_on_the_interpreter(served):
    # one planned arena: a second caller at the same time (the service never makes one, a script may)
    # must not share it
    name, module, traced = served
    x = _rows(name, 3, seed=7)
    tau = torch.full((3, 1), 0.1, dtype=torch.float64)
    calls = _spy_static(traced)
    with traced._static_free:
        got = traced(x, tau)
    assert calls == []
    _assert_identical(got, traced(x, tau))
    assert calls == [3]


def test_a_static_call_that_raises_is_answered_by_the_interpreter(served, monkeypatch, caplog):
    name, module, traced = served
    x = _rows(name, 2, seed=8)
    tau = torch.full((2, 1), 0.1, dtype=torch.float64)
    want = traced(x, tau)

    def fails(*inputs):
        raise RuntimeError("result type Float can't be cast to the desired output type Long")
    monkeypatch.setattr(traced._static, "module", fails)
    failed = traced._static.failed
    with caplog.at_level("WARNING", logger="hjmodel.artifact"):
        _assert_identical(traced(x, tau), want)
        _assert_identical(traced(x, tau), want)
    assert traced._static.failed == traced.static_failed == failed + 2
    assert caplog.text.count("the static runtime failed a call") == (1 if failed == 0 else 0)


def test_a_runtime_that_answers_otherwise_is_not_used_and_says_why(served, monkeypatch, caplog):
    import hjmodel.artifact as artifact

    name, module, _ = served
    prepare = torch._C._jit_to_static_module

    def off_by_one(graph):
        static = prepare(graph)
        return lambda *inputs: tuple(t + 1 if t.is_floating_point() else t for t in static(*inputs))
    monkeypatch.setattr(torch._C, "_jit_to_static_module", off_by_one)
    with caplog.at_level("WARNING", logger=artifact.__name__):
        traced = _traced(module)
    assert traced._static is None and traced.static_rows == traced.static_failed == 0
    assert "answered otherwise than the interpreter" in caplog.text
    x = _rows(name, 2, seed=9)
    tau = torch.full((2, 1), 0.1, dtype=torch.float64)
    with torch.no_grad():
        _assert_identical(traced(x, tau), module(x, tau))


@pytest.mark.parametrize(("fault", "bad", "takes"), [("differs", 5, 4), ("raises", 5, 4), ("differs", 4, 3),
                                                   ("raises", 4, 2)])
def test_the_runtime_takes_no_size_it_answered_otherwise_at_load(served, monkeypatch, caplog, fault, bad, takes):
    """It plans per shape, so one size could answer otherwise than the interpreter while the first
    call's agreed: every size it would take is checked once at load, and it takes the sizes below the
    first that differs (or raises); a larger call runs on the interpreter. A size that raises while
    the budget is measured (1, 2, 4, ...) ends the measurement there, and counts as no failed call:
    ``static_failed`` counts calls the interpreter answered for a caller."""
    import hjmodel.artifact as artifact

    name, module, _ = served
    prepare = torch._C._jit_to_static_module

    def wrong_at(graph):
        static = prepare(graph)

        def run(*inputs):
            out = static(*inputs)
            if inputs[0].shape[0] != bad:
                return out
            if fault == "raises":
                raise RuntimeError("no plan for this shape")
            return tuple(t + 1 if t.is_floating_point() else t for t in out)
        return run
    monkeypatch.setattr(torch._C, "_jit_to_static_module", wrong_at)
    with caplog.at_level("WARNING", logger=artifact.__name__):
        traced = _traced(module)
    assert traced._static is not None and traced.static_rows == takes
    assert f"{bad} rows" in caplog.text and traced.static_failed == 0
    x = _rows(name, bad, seed=10)
    tau = torch.full((bad, 1), 0.1, dtype=torch.float64)
    with torch.no_grad():
        _assert_identical(traced(x, tau), module(x, tau))                                 # the interpreter
        _assert_identical(traced(x[:takes], tau[:takes]), module(x[:takes], tau[:takes]))   # the runtime
    assert traced.static_failed == 0


def test_explanations_and_float32_equal_constants_on_the_static_runtime(served):
    # an explanation graph runs beside the serving graph in a server: never on the runtime, which holds
    # Python's lock; constants equal in float32 stay apart on the runtime too
    name, module, _ = served
    assert TracedModule(ExplainModule(module.model)).static_rows == 0
    constants = _Constants()
    x = torch.arange(3, dtype=torch.float64)
    traced = _traced(constants, inputs={"x": x}, static_rows=STATIC_ROWS)
    assert traced._static is not None
    calls = _spy_static(traced)
    for _ in range(3):
        _assert_identical(traced(x), constants(x))
    assert traced(x)["up"][1].item() == F._UP and traced(x)["tiny"][0].item() == -1e-300 and len(calls) == 5


def test_a_trace_off_the_cpu_never_prepares_the_static_runtime(monkeypatch):
    # its planned kernels are CPU ones: a trace on a GPU keeps the interpreter (the meta device stands
    # in for one here, as in test_device.py)
    prepared = []
    monkeypatch.setattr(torch._C, "_jit_to_static_module", lambda graph: prepared.append(graph))
    x = torch.arange(3, dtype=torch.float64, device="meta")
    traced = _traced(_Constants(), inputs={"x": x}, static_rows=STATIC_ROWS)
    assert traced.static_rows == 0 and traced._static is None and prepared == []
    assert traced(x)["up"].device.type == "meta"
