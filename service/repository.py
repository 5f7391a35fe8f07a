"""The model repository: ``<root>/<model>/<version>/`` with numeric versions.

Every version on disk is loaded; requests without a version go to the highest version that is
ready (Triton's "latest" policy), explicit versions stay addressable. A version that fails to load
is reported as not ready with its reason and takes down nothing else; a failed reload keeps the
previous load of that version serving. Swaps happen atomically on the event loop; replaced
versions finish their queued requests before they are released.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hjmodel import serving
from hjmodel.artifact import read_artifact_spec, verify_checksums
from hjmodel.errors import ArtifactError
from hjmodel.serving import ArtifactSpec
from service.backends import Backend, load_backend
from service.batching import DynamicBatcher
from service.errors import HJServeError, InvalidModelName, ModelLoadFailed, ModelNotFound, ModelNotReady
from service.metrics import VersionMetrics
from service.settings import Settings

__all__ = ["MODEL_NAME_PATTERN", "ModelRepository", "ModelVersion", "VersionState", "check_model_name",
           "read_spec"]

log = logging.getLogger(__name__)

BackendLoader = Callable[..., Backend]

#: A model name: 1-128 ASCII letters, digits, ``_``, ``-`` and ``.``, not starting with ``.`` (so
#: never ``.``, ``..`` or a hidden directory) -- one path component, nothing that a file system or a
#: URL could read as a way out of the repository root.
MODEL_NAME_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}"
_NAME = re.compile(MODEL_NAME_PATTERN)
#: A version directory / version in a URL: a positive decimal number of at most 9 ASCII digits.
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


def check_model_name(name: str) -> str:
    """``name`` when it matches :data:`MODEL_NAME_PATTERN`, else InvalidModelName (400)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = name if isinstance(name, str) and len(name) <= 64 else f"{str(name)[:64]}..."
        raise InvalidModelName(f"invalid model name {shown!r}: a name is 1-128 characters of A-Z a-z 0-9 _ - . "
                               "and does not start with '.'")
    return name


def read_spec(version_dir: Path) -> ArtifactSpec:
    """The artifact's typed spec (``hjmodel``'s one validator); raises ModelLoadFailed."""
    try:
        return read_artifact_spec(version_dir)
    except ArtifactError as exc:
        raise ModelLoadFailed(f"invalid artifact: {exc}") from None
    except Exception as exc:
        raise ModelLoadFailed(f"cannot read the spec: {type(exc).__name__}: {exc}") from None


class VersionState:
    """Triton's model states, as shown in the repository index."""

    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"


@dataclass
class ModelVersion:
    """A loaded, serving model version."""

    name: str
    version: int
    path: Path
    spec: ArtifactSpec
    backend: Backend
    batcher: DynamicBatcher
    metrics: VersionMetrics
    output_names: tuple[str, ...] = ()
    #: Requests admitted (body being read, decoded, queued or computing): see DataPlane.admit.
    in_flight: int = 0

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def n_features(self) -> int:
        return self.spec.n_features

    @property
    def top_k_max(self) -> int:
        return self.spec.top_k_max


@dataclass
class _Model:
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)  # version -> why it is not (freshly) loaded
    reason: str = ""  # model-level (no directory, no versions, unloaded)


def _numeric_versions(model_dir: Path) -> list[int]:
    out = []
    for child in model_dir.iterdir():
        if _VERSION.fullmatch(child.name) and child.is_dir():
            out.append(int(child.name))
    return sorted(out)


class ModelRepository:
    """Loads, serves and swaps the model versions of one repository root."""

    def __init__(self, settings: Settings, loader: BackendLoader = load_backend):
        self.settings = settings
        self.root = Path(settings.model_repository).resolve()
        self._loader = loader
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._closers: set[asyncio.Task] = set()
        self._fingerprints: dict[str, tuple] = {}   # model -> its folder as of its last (re)load
        self.started = False

    # -- queries ----------------------------------------------------------------------------------

    def disk_models(self) -> list[str]:
        """Model directories under the root whose names are valid model names."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _NAME.fullmatch(p.name) and p.is_dir())

    def model_dir(self, name: str) -> Path:
        """The directory of model ``name``, checked to lie inside the repository root (a symlink
        that points outside is refused like a hostile name)."""
        path = self.root / check_model_name(name)
        resolved = path.resolve()
        if resolved == self.root or not resolved.is_relative_to(self.root):
            raise ModelNotFound(f"model '{name}' does not resolve to a directory inside the model repository")
        return resolved

    def get(self, name: str, version: str | int | None = None) -> ModelVersion:
        """The serving version (highest ready when ``version`` is None); ModelNotFound / ModelNotReady."""
        with self._lock:
            model = self._models.get(name)
        if model is None:   # known names were checked when they loaded: check only on a miss
            check_model_name(name)
            raise ModelNotFound(f"unknown model '{name}'")
        if version is None or version == "":
            if not model.versions:
                why = model.reason or "; ".join(f"version {v}: {r}" for v, r in sorted(model.reasons.items()))
                raise ModelNotReady(f"model '{name}' has no ready version" + (f" ({why})" if why else ""))
            return model.versions[max(model.versions)]
        if not _VERSION.fullmatch(str(version)):
            shown = str(version)[:32]
            raise ModelNotFound(f"model '{name}' has no version {shown!r} (versions are positive integers)")
        number = int(str(version))
        found = model.versions.get(number)
        if found is not None:
            return found
        if number in model.reasons:
            raise ModelNotReady(f"model '{name}' version {number} is not ready: {model.reasons[number]}")
        raise ModelNotFound(f"model '{name}' has no version '{version}'")

    def model_names(self) -> list[str]:
        """Models known to the repository (loaded or failed)."""
        with self._lock:
            return sorted(self._models)

    def ready_versions(self, name: str) -> list[int]:
        with self._lock:
            model = self._models.get(name)
        return sorted(model.versions) if model else []

    def serving_versions(self) -> list[ModelVersion]:
        """Every version being served now, of every model."""
        with self._lock:
            return [mv for model in self._models.values() for mv in model.versions.values()]

    def is_ready(self) -> bool:
        """Startup finished and at least one model version serves."""
        with self._lock:
            return self.started and any(m.versions for m in self._models.values())

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every model and version with state and reason."""
        items: list[dict[str, str]] = []
        with self._lock:
            models = dict(self._models)
        names = sorted(set(models) | set(self.disk_models()))
        for name in names:
            model = models.get(name)
            if model is None:
                if not ready_only:
                    items.append({"name": name, "state": VersionState.UNAVAILABLE, "reason": "not loaded"})
                continue
            versions = sorted(set(model.versions) | set(model.reasons))
            if not versions and not ready_only:
                items.append({"name": name, "state": VersionState.UNAVAILABLE, "reason": model.reason})
            for v in versions:
                ready = v in model.versions
                if ready_only and not ready:
                    continue
                items.append({"name": name, "version": str(v),
                              "state": VersionState.READY if ready else VersionState.UNAVAILABLE,
                              "reason": model.reasons.get(v, "")})
        return items

    # -- loading ----------------------------------------------------------------------------------

    def _load_version(self, name: str, version: int, path: Path) -> ModelVersion:
        """Blocking: load one version directory (runs in a worker thread)."""
        s = self.settings
        try:   # before anything reads them: a file changed since the artifact was written is not served
            verify_checksums(path)
        except ArtifactError as exc:
            raise ModelLoadFailed(f"invalid artifact: {exc}") from None
        backend = self._loader(path, preference=s.backend, device=s.device, threads=s.intra_op_threads,
                               spinning=s.intra_op_spinning, pruned_graphs=s.pruned_graphs,
                               pruned_graph_bytes=int(s.pruned_graph_mb * 2**20),
                               static_rows=s.torch_static_rows)
        try:
            spec = read_spec(path)
            if why := spec.unserved_because():
                raise ModelLoadFailed(f"not served: {why}")
            for file, embedded in backend.embedded_specs.items():
                why = serving.spec_mismatch(spec.raw, embedded)
                if why is not None:
                    raise ModelLoadFailed(f"{file} was exported with another spec than the artifact's ({why}): "
                                          "its claims would not be the graph's; export the model again")
            names = serving.output_names(spec.task)
            probe = backend.infer(np.zeros((1, spec.n_features), dtype=np.float32), np.full(1, s.default_tau))
            missing = [n for n in names if n not in probe]
            if missing:
                raise ModelLoadFailed(f"the model does not produce the outputs {missing}")
            for n in names:
                if len(probe[n]) != 1:
                    raise ModelLoadFailed(f"output '{n}' does not have one row per input row")
            contract = {o.name for o in serving.explain_outputs_for(spec.task, spec.kind)}
            explain = tuple(n for n in getattr(backend, "explain_outputs", ()) if n in contract)
            if explain:   # the explanation graph: probed like the serving graph
                zeros = np.zeros((1, spec.n_features), dtype=np.float32)
                extra = backend.explain(zeros, np.full(1, s.default_tau), zeros)
                bad = [n for n in explain if n not in extra or len(extra[n]) != 1]
                if bad:
                    raise ModelLoadFailed(f"the explanation graph does not produce one row of {bad}")
            names = (*names, *explain)
        except HJServeError as exc:
            backend.close()
            raise ModelLoadFailed(exc.message) from None
        except Exception as exc:
            backend.close()
            raise ModelLoadFailed(f"{type(exc).__name__}: {exc}") from None
        metrics = VersionMetrics(name, str(version), spec.class_names)
        batcher = DynamicBatcher(
            backend, max_batch_size=s.max_batch_size, max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
            max_queue_size=s.max_queue_size, retry_after_s=s.retry_after_s, name=f"{name}-{version}",
            on_batch=metrics.on_batch, on_queue=metrics.queue_size.set,
            explain_rows=serving.explain_rows_per_call(spec.raw.get("structure"), s.max_batch_size),
            inline_max_s=s.inline_max_ms / 1000.0)
        return ModelVersion(name, version, path, spec, backend, batcher, metrics, names)

    async def load_all(self) -> None:
        """Load every model on disk (startup); failures are recorded, never raised."""
        for name in self.disk_models():
            try:
                await self.load(name)
            except HJServeError as exc:
                log.warning("model %s: %s", name, exc.message)
        self.started = True

    async def load(self, name: str) -> None:
        """(Re)load every version of ``name`` from disk; raises ModelLoadFailed when any version
        failed (versions that loaded are swapped in; a failed version keeps its previous load)."""
        check_model_name(name)
        lock = self._load_locks.setdefault(name, asyncio.Lock())
        async with lock:
            model_dir = self.model_dir(name)
            if not model_dir.is_dir():
                raise ModelNotFound(f"no model directory '{name}' in the repository")
            self._fingerprints[name] = self.fingerprint(name)   # before reading: later edits are seen
            versions = _numeric_versions(model_dir)
            loaded: dict[int, ModelVersion] = {}
            failed: dict[int, str] = {}
            for v in versions:
                version_dir = (model_dir / str(v)).resolve()
                if not version_dir.is_relative_to(self.root):
                    failed[v] = "the version directory resolves outside the model repository"
                    continue
                if out := self._linked_out(version_dir):
                    failed[v] = f"{out} resolves outside the model repository"
                    continue
                try:
                    loaded[v] = await asyncio.to_thread(self._load_version, name, v, version_dir)
                except HJServeError as exc:
                    failed[v] = exc.message.replace(str(self.root), "<repository>")   # no host paths to clients
            with self._lock:
                old = self._models.get(name) or _Model()
                new = _Model()
                for v in versions:
                    if v in loaded:
                        new.versions[v] = loaded[v]
                    elif v in old.versions:
                        new.versions[v] = old.versions[v]
                        new.reasons[v] = f"reload failed, previous load still serving: {failed[v]}"
                    else:
                        new.reasons[v] = failed[v]
                if not versions:
                    new.reason = "no numeric version directories"
                self._models[name] = new
            replaced = [mv for v, mv in old.versions.items() if new.versions.get(v) is not mv]
            for mv in loaded.values():
                mv.metrics.ready.set(1)
            for mv in replaced:
                if mv.version not in new.versions:
                    mv.metrics.ready.set(0)
                self._retire(mv)
            for v in failed:
                if v not in new.versions:
                    VersionMetrics(name, str(v)).ready.set(0)
        if failed:
            detail = "; ".join(f"version {v}: {r}" for v, r in sorted(failed.items()))
            raise ModelLoadFailed(f"failed to load '{name}': {detail}")

    def _linked_out(self, version_dir: Path) -> str | None:
        """The first file of a version directory that is a link leading out of the repository root
        (None when none does): the loader would read it from there."""
        for entry in sorted(version_dir.iterdir()):
            if not entry.resolve().is_relative_to(self.root):
                return entry.name
        return None

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name`` (queued requests still finish)."""
        check_model_name(name)
        lock = self._load_locks.setdefault(name, asyncio.Lock())
        async with lock:
            with self._lock:
                old = self._models.get(name)
                if old is None:
                    raise ModelNotFound(f"unknown model '{name}'")
                self._models[name] = _Model(reason="unloaded")
            for mv in old.versions.values():
                mv.metrics.ready.set(0)
                self._retire(mv)

    # -- poll mode ----------------------------------------------------------------------------------

    def fingerprint(self, name: str) -> tuple:
        """What ``poll`` compares between scans: each numeric version directory of ``name`` with the
        names, sizes and modification times of its files (an empty tuple when the model is gone)."""
        try:
            model_dir = self.model_dir(name)
            versions = _numeric_versions(model_dir) if model_dir.is_dir() else []
            return tuple((v, tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                          for f in (model_dir / str(v)).iterdir() if f.is_file())))
                         for v in versions)
        except (HJServeError, OSError):
            return ()

    async def poll(self, interval_s: float) -> None:
        """Triton's ``poll`` model control: every ``interval_s`` seconds, load models whose folder
        appeared, reload those whose version folders or files changed, unload those removed. A
        failure is recorded in the index (the previous load keeps serving) and retried only when
        the folder changes again. Runs until cancelled."""
        seen = self._fingerprints
        while True:
            await asyncio.sleep(interval_s)
            on_disk = set(self.disk_models())
            for name in sorted(on_disk | set(seen)):
                current = self.fingerprint(name) if name in on_disk else ()
                if current == seen.get(name, ()):
                    continue
                seen[name] = current
                try:
                    if name in on_disk:
                        log.info("poll: (re)loading model %s", name)
                        await self.load(name)
                    elif self.ready_versions(name):
                        log.info("poll: unloading model %s (its folder is gone)", name)
                        await self.unload(name)
                except HJServeError as exc:
                    log.warning("poll: model %s: %s", name, exc.message)

    def _retire(self, mv: ModelVersion) -> None:
        task = asyncio.get_running_loop().create_task(mv.batcher.close())
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def close(self) -> None:
        """Release every model (shutdown)."""
        with self._lock:
            models, self._models = self._models, {}
        for model in models.values():
            for mv in model.versions.values():
                mv.metrics.ready.set(0)
                await mv.batcher.close()
        if self._closers:
            await asyncio.gather(*self._closers, return_exceptions=True)


