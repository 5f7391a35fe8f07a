"""The backend protocol: load an artifact once, run ``infer`` on batches of rows."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Backend", "BackendFactory", "OutputGraphs", "PRUNED_GRAPH_BYTES"]

log = logging.getLogger(__name__)

#: Default byte budget of a version's :class:`OutputGraphs` (the setting ``pruned_graph_mb``'s default).
PRUNED_GRAPH_BYTES = 256 << 20


@runtime_checkable
class Backend(Protocol):
    """A loaded model version.

    ``infer(input: float32 (B, d), tau: float64 (B,), outputs=None) -> {output name: array with
    leading dim B}`` computes the outputs of the serving contract (``tau``: each row's regression
    tolerance) (``hjmodel.serving.outputs_for(task)``): every one, or with ``outputs`` at least
    those (a backend may compute only what they need: :class:`OutputGraphs`; the values are the
    same either way). Implementations are thread-safe for one caller at a time and raise only
    :class:`service.errors.BackendError`.
    """

    name: str
    device: str
    platform: str
    #: How its graphs run, for operators (the model config's ``execution`` parameter): ``onnxruntime``;
    #: ``torchscript`` (the torch backend's traces) or ``torch eager`` (tracing failed: logged at load).
    execution: str
    #: The explanation outputs this version can compute (``hjmodel.serving.EXPLAIN_OUTPUTS``; empty for
    #: artifacts without an explanation graph).
    explain_outputs: tuple[str, ...]
    #: The spec each of its graph files was exported with ({file name: the JSON text of its
    #: ``hjmodel.serving.ONNX_SPEC_KEY`` metadata, or None}); empty where the model is built from
    #: ``model.json`` itself (torch). The repository serves a graph only beside that same spec.
    embedded_specs: Mapping[str, str | None]

    def infer(self, input: np.ndarray, tau: np.ndarray, outputs: Collection[str] | None = None, *,
              beside: bool = False) -> dict[str, np.ndarray]:
        """The serving outputs (``outputs``: at least these; None: every one) for ``input`` (B, d)
        float32, ``tau`` (B,). ``beside``: the same rows' explanation graph runs on another thread
        meanwhile, so this call must let go of Python's lock while it computes (onnxruntime always
        does; the torch backend's static runtime does not, and is not used then)."""
        ...

    def explain(self, input: np.ndarray, tau: np.ndarray, baseline: np.ndarray) -> dict[str, np.ndarray]:
        """The explanation outputs for ``input`` (B, d), ``tau`` (B,), ``baseline`` (B, d) float32."""
        ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    """Loads a version directory; raises :class:`service.errors.ModelLoadFailed` on any failure.
    ``pruned_graphs``: at most this many :class:`OutputGraphs` (0: always the whole graph), holding
    at most ``pruned_graph_bytes``; ``static_rows``: calls of at most this many rows on TorchScript's
    static runtime (torch only)."""

    def __call__(self, version_dir: Path, *, device: str, threads: int, spinning: bool = False,
                 pruned_graphs: int = 0, pruned_graph_bytes: int = PRUNED_GRAPH_BYTES,
                 static_rows: int = 0) -> Backend: ...


class OutputGraphs:
    """A version's graphs that compute only some of its serving outputs, built on demand.

    onnxruntime runs every node of a graph whichever outputs are fetched, and a trace records every
    output, so a batch that needs a few outputs would pay for all of them: the certified radius alone
    is some 70% of a classifier's graph (``bench/results/pruned_graphs.md``). :meth:`get` returns the
    graph of exactly the outputs asked for when it has been built; otherwise None -- the caller runs
    the whole graph, which computes the same values bit for bit -- and the first time, it starts
    building that graph on a thread of its own, so no batch waits for a build: ``build(names) ->
    (bytes it will hold, open)``, and ``open()`` -> the graph, called only if those bytes fit (a cut
    of a large memory model's graph keeps its support points: no session of it is opened just to be
    dropped). At most ``limit`` graphs are built per version, holding at most ``max_bytes``
    together (an onnxruntime session copies the constants its graph reads; a trace shares the
    module's tensors and holds the values it folded at load); output sets beyond them, and a set
    whose build failed (logged), run the whole graph. Called from one thread (the version's
    batcher); builds publish from theirs."""

    def __init__(self, names: Collection[str], build: Callable[[tuple[str, ...]], tuple[int, Callable[[], Any]]],
                 limit: int, max_bytes: int = 1 << 62, label: str = "model"):
        self.names = tuple(names)
        self._all = frozenset(self.names)
        self._build, self._limit, self._label = build, limit, label
        self._max_bytes, self._bytes = max_bytes, 0
        self._graphs: dict[frozenset[str], tuple[Any, tuple[str, ...]]] = {}   # key -> (graph, its names)
        self._started: set[frozenset[str]] = set()
        self._builder: ThreadPoolExecutor | None = None

    @property
    def built(self) -> tuple[tuple[str, ...], ...]:
        """The output sets with a graph, each in contract order (for tests and operators)."""
        return tuple(names for _, names in list(self._graphs.values()))

    def get(self, outputs: Collection[str] | None) -> tuple[Any, tuple[str, ...]] | None:
        """(graph, its output names in contract order) for exactly ``outputs``, when built; None
        when the whole graph should run (every output wanted, or no graph of these yet)."""
        if outputs is None or not self._limit:
            return None
        key = self._all.intersection(outputs)
        if len(key) == len(self._all) or not key:
            return None
        built = self._graphs.get(key)
        if built is not None:
            return built
        if key not in self._started and len(self._started) < self._limit:
            self._started.add(key)
            if self._builder is None:
                self._builder = ThreadPoolExecutor(1, thread_name_prefix=f"hjserve-{self._label}-prune")
            self._builder.submit(self._make, key)
        return None

    def _make(self, key: frozenset[str]) -> None:
        names = tuple(n for n in self.names if n in key)
        try:
            size, open_graph = self._build(names)
            if self._bytes + size > self._max_bytes:
                log.info("%s: no room for a graph of the outputs %s (%d bytes; %d of %d used): the whole "
                         "graph serves them", self._label, list(names), size, self._bytes, self._max_bytes)
                return
            graph = open_graph()
            if self._limit:   # not closed meanwhile
                self._bytes += size
                self._graphs[key] = (graph, names)
        except Exception as exc:   # the whole graph still answers these outputs
            log.warning("%s: no graph of the outputs %s (the whole graph serves them): %s: %s",
                        self._label, list(names), type(exc).__name__, str(exc)[:300])

    def close(self) -> None:
        """Stop building (a build under way finishes on its thread and is dropped)."""
        self._limit = 0
        if self._builder is not None:
            self._builder.shutdown(wait=False, cancel_futures=True)
        self._graphs.clear()
