"""The results file of an in-process side-by-side benchmark: a title, one line saying how and where it
was generated, a table -- and the timing they share (:func:`alternate`). Used by
``bench/pruned_graphs.py``, ``bench/ab_trace.py``, ``bench/route_overhead.py``,
``bench/session_threads.py``, ``bench/ab_distance_bounds.py``, ``bench/ab_training.py`` and
``bench/ab_ndjson_source.py`` (a baseline module: :func:`module_at`); the
command line of the first four (:func:`arguments`)."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import statistics
import subprocess
import time
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def per_call(fn: Callable[[], object], min_seconds: float = 0.1) -> float:
    """Median of 5 of the mean seconds per call of ``fn`` over >= ``min_seconds``."""
    fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.02:
        fn()
        n += 1
    calls = max(1, int(min_seconds / max((time.perf_counter() - t0) / n, 1e-7)))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t) / calls)
    return statistics.median(samples)


def timed(totals: dict[str, float], key: str, fn: Callable) -> Callable:
    """``fn`` (a function) wrapped to add the seconds of each call to ``totals[key]``: where a
    process spends its time, stage by stage (``request_path.py``'s server, ``ab_training.py``'s
    training steps and calibration)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start
    return wrapper


def alternate(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds per call of each of ``calls``, timed in turn (:func:`per_call`) for ``repeats`` rounds:
    the median over rounds, so a slow spell of a shared machine falls on every side alike."""
    times: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            times[key].append(per_call(call))
    return {key: statistics.median(t) for key, t in times.items()}


def as_served() -> None:
    """Set this thread up as a served model's backend thread is set up: torch on one thread,
    subnormals flushed to zero (``service.batching``, ``hjmodel.serving.flush_subnormals``)."""
    import torch

    from hjmodel import serving

    torch.set_num_threads(1)
    serving.flush_subnormals()


def arguments(doc: str, out: Path, repeats: int, batches: tuple[int, ...] | None = None) -> argparse.ArgumentParser:
    """The command line the in-process benches over the demo models share: ``--models`` (the
    repository, default ``models/``), ``--repeats`` (rounds of :func:`alternate`) and ``--out`` (the
    results file), and with ``batches`` ``--only`` (these demo models: :func:`per_demo`) and
    ``--batches`` (default ``batches``); a script adds its own before parsing. ``doc``: the script's
    docstring."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--out", default=str(out))
    if batches is not None:
        from hjmodel.demo import DEMOS

        ap.add_argument("--only", nargs="*", choices=sorted(DEMOS), help="these demo models only")
        ap.add_argument("--batches", nargs="*", type=int, default=list(batches))
    return ap


def per_demo(args: argparse.Namespace, bench_model: Callable[[str, Path], list]) -> tuple[list, float]:
    """``bench_model(name, version directory)``'s rows for each demo model (``--only`` those), in turn;
    returns (rows, the ``time.perf_counter()`` they started at, for :func:`write`). A script sets its
    thread up first (:func:`as_served`: process-wide torch threads, so not done here)."""
    from hjmodel.demo import DEMOS

    started = time.perf_counter()
    rows = [row for name in (args.only or DEMOS) for row in bench_model(name, Path(args.models) / name / "1")]
    return rows, started



def demo_bench(doc: str, out: Path, repeats: int, batches: tuple[int, ...],
               bench_model: Callable[[str, Path, int, tuple[int, ...]], list]) -> tuple[argparse.Namespace, list, float]:
    """A side-by-side bench over the demo models, start to rows: its command line (:func:`arguments`
    with ``--batches``), this thread set up as served (:func:`as_served`), then
    ``bench_model(name, version directory, --repeats, --batches)`` for each demo model
    (:func:`per_demo`). Returns (the parsed arguments, the rows, when they started)."""
    args = arguments(doc, out, repeats=repeats, batches=batches).parse_args()
    as_served()
    rows, started = per_demo(args, lambda name, directory: bench_model(name, directory, args.repeats,
                                                                         tuple(args.batches)))
    return args, rows, started

def module_at(rev: str, path: str) -> types.ModuleType:
    """The Python file ``path`` (relative to the repository) as it was at commit ``rev``, loaded as a
    module of its own beside this tree's: the baseline side of a side-by-side benchmark."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    module = types.ModuleType(f"{Path(path).stem}_{rev}")
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def revision(rev: str = "HEAD") -> str:
    """``rev``'s short commit hash in this repository."""
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def machine() -> str:
    """This machine as the results files describe it (the load average is read now: at the end of a run)."""
    return (f"{platform.platform()}, {os.cpu_count()} CPUs shared with other jobs (load average "
            f"{os.getloadavg()[0]:.1f} at the end), Python {platform.python_version()}")


def write(out: str | Path, title: str, command: str, started: float, notes: str,
          columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """``out`` as markdown: ``title``; generated by ``command`` now, in the seconds since ``started``
    (a ``time.perf_counter()``), on :func:`machine`, then ``notes``; a table of ``columns`` and ``rows``
    (cells already formatted). Says where it wrote."""
    lines = [f"# {title}", "",
             f"Generated by `{command}` on {dt.datetime.now().isoformat(timespec='seconds')} "
             f"({time.perf_counter() - started:.0f} s); {machine()}; {notes}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    Path(out).write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
