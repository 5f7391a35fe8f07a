"""The CUDA paths, checked and timed: ``python -m eval.gpu`` writes eval/RESULTS_gpu.md where a GPU is present.

    python -m eval.gpu [--models models] [--out eval/RESULTS_gpu.md] [--rows 60] [--seconds 4]
        [--budget-s 420] [--device cuda]

What it runs, each part against the CPU in the same run (on a machine without a GPU it says so and
exits 0; ``--device cpu`` runs every part with the CPU in the GPU's place, to try the script itself):

1. **Environment**: the GPU, driver, torch and its CUDA, onnxruntime and its providers, the TF32 switches
   (TF32 would change float32 matrix products; the served graphs compute their diagnostics in float64).
2. **Parity**: every bundled model through the service's own backends (``service.backends.load_backend``)
   opened on the GPU -- onnxruntime's CUDA execution provider and the torch trace on cuda -- against
   the onnxruntime CPU backend, every served output and the explanation outputs, on
   ``hjmodel.verify.parity_inputs`` rows. A backend that opens on another device is an error row.
3. **Certificates in the bits the GPU serves**: ``eval.served_bits.run`` with the backends on the GPU
   (its input families, the served-bits attack and the float64 PGD on the CPU), ``--rows`` per family.
4. **Latency**: each backend's ``infer`` with every output at batch 1 / 64 / 1024 on the CPU and on the
   GPU, and the bare forward pass (``bench.hjmodel_bench.PredictOnly``) on the GPU: the ratio issue 14
   asks of the CPU, read on the GPU. Host copies are inside every GPU time (the service pays them).
5. **The real server on the GPU**: ``python -m service`` with ``HJSERVE_DEVICE`` = the GPU and each
   backend (``max_batch_size`` 1024), one V2 request with every diagnostic checked against the CPU
   backend, then the closed-loop load of ``bench.loadgen`` at concurrency 1 / 16 / 64 (batch-1
   requests, every diagnostic) and batch-attribution jobs of 20,000 rows, beside the same server on
   the CPU.
6. **Scaling** (issue 14's benchmark on the GPU): models of each kind trained on synthetic data with N
   training rows in d dimensions (``--scaling``, default N = 1,000 / 5,000 / 20,000, d = 64 / 784,
   smallest first), each backend's ``infer`` at batch 1 and 1,024 on the CPU and on the GPU beside
   the bare forward pass, and the growth exponents in N.
7. **CUDA graphs**: whether onnxruntime's ``enable_cuda_graph`` and ``torch.cuda.graph`` (on the torch
   trace) can record a served call of each kind at batch 1 -- what each runtime says when it cannot (for
   torch, the operation that synchronises with the host), its time and bits against the plain call when
   it can.

The report is rewritten after every part, so a run stopped by its time limit keeps what it measured;
``--budget-s`` bounds the whole run (parts that would start after it are skipped and say so).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .common import EVAL_DIR, md_table
from .served_bits import open_backend

ROOT = EVAL_DIR.parent
BATCHES = (1, 64, 1024)
CONCURRENCY = (1, 16, 64)
BATCH_ROWS = 20_000
BATCH_MODELS = ("digits_lse", "digits_deep", "digits_memory")
#: the servers' max_batch_size: batch jobs run in chunks of it, where a GPU pays (part 4)
BATCH_CHUNK = 1024
BACKENDS = ("onnx", "torch")
TAU = 0.1
#: the scaling part's configurations (``--scaling``: kinds, sizes N, dimensions d), smallest first so
#: that a run cut by its budget drops the largest; N = 60,000 trains and exports for longer than a lease
SCALING = "lse,memory,deep:1000,5000,20000:64,784"
#: the scaling part's batches: one row (latency) and a GPU-sized batch (throughput)
SCALING_BATCHES = (1, 1024)


def compare(got: dict, want: dict) -> tuple[bool, str]:
    """Served outputs ``got`` against ``want``: the OOD gate's outputs (``hjmodel.verify.OOD_OUTPUTS``)
    equal on every row whose decision agrees (a row decided otherwise is scored against another class;
    a regressor's rows all count) -- they count calibration statistics with ties up to rounding
    (``hjmodel.models._rank_p``), so another device's kernels must not move them by a rank; every
    other output by ``hjmodel.verify.outputs_agree`` (the parity ``hjmodel verify`` holds runtimes
    to). Returns (pass, the worst difference per output)."""
    from hjmodel.verify import OOD_OUTPUTS, outputs_agree

    ok, worst = True, []
    same = None                      # rows whose decision agrees (None: every row counts)
    if "prediction" in got and "prediction" in want and not np.issubdtype(np.asarray(want["prediction"]).dtype, np.floating):
        x, y = np.asarray(got["prediction"]), np.asarray(want["prediction"])
        same = (x == y).reshape(len(y), -1).all(1) if x.shape == y.shape else np.zeros(len(y), dtype=bool)
    for name in want:
        x, y = np.asarray(got[name]), np.asarray(want[name])
        if x.shape != y.shape:
            ok = False
            worst.append(f"{name} shape {x.shape} != {y.shape}")
            continue
        if name in OOD_OUTPUTS:
            moved = (x != y).reshape(len(y), -1).any(1)
            moved = moved if same is None else moved & same
            ok &= not moved.any()
            worst.append(f"{name} {int(moved.sum())} rows differ" + ("" if same is None else " of those decided alike"))
            continue
        ok &= outputs_agree(x, y)
        if np.issubdtype(y.dtype, np.floating):
            diff = np.abs(x.astype(np.float64) - y)
            worst.append(f"{name} {float(np.nanmax(diff)) if np.isfinite(diff).any() else 0.0:.1e}")
        else:
            worst.append(f"{name} {float((x != y).reshape(len(y), -1).any(axis=1).mean()):.3f} differ")
    return ok, "; ".join(worst)


class Report:
    """The markdown report, rewritten whole after every part."""

    def __init__(self, path: Path, head: str):
        self.path, self.parts = path, [head]

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.parts) + "\n")
        print(text, flush=True)


def environment(device: str) -> str:
    import onnxruntime as ort

    lines = [f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}."]
    if device == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False).stdout.strip()
        lines.append(f"- GPU: {torch.cuda.get_device_name(0)} (capability {torch.cuda.get_device_capability(0)}); "
                     f"nvidia-smi: {smi or 'n/a'}.")
        lines.append(f"- torch {torch.__version__} (CUDA {torch.version.cuda}); TF32 matmul "
                     f"{torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}, "
                     f"float32 matmul precision '{torch.get_float32_matmul_precision()}'.")
    else:
        lines.append(f"- No GPU: the CPU stands in for it (`--device cpu`, a dry run of the script); torch {torch.__version__}.")
    lines.append(f"- onnxruntime {ort.__version__}, providers {ort.get_available_providers()}.")
    return "\n".join(lines) + "\n"


def bundled(models: Path) -> list[Path]:
    """The version directories of the bundled demo models (``make models``)."""
    return sorted(p.parent for p in Path(models).glob("*/1/model.json"))


def parity(models: Path, device: str, rows: int = 256) -> str:
    from hjmodel.artifact import read_spec
    from hjmodel.verify import DEMO_DATA, parity_inputs

    table = []
    for version in bundled(models):
        name = version.parent.name
        x = parity_inputs(name, rows) if name in DEMO_DATA else None
        if x is None:
            continue
        tau = np.full(len(x), TAU)
        base = np.broadcast_to(np.asarray(read_spec(version)["input_mean"], dtype=np.float32), x.shape).copy()
        ref = open_backend(version, "onnx", "cpu")
        want, want_explain = ref.infer(x, tau), ref.explain(x[:32], tau[:32], base[:32])
        for backend in BACKENDS:
            try:
                served = open_backend(version, backend, device)
                ok, detail = compare(served.infer(x, tau), want)
                table.append([name, backend, "served outputs", "PASS" if ok else "FAIL", detail])
                ok, detail = compare(served.explain(x[:32], tau[:32], base[:32]), want_explain)
                table.append([name, backend, "explanation outputs", "PASS" if ok else "FAIL", detail])
                served.close()
            except Exception as exc:  # noqa: BLE001 (every failure is a row of the report)
                table.append([name, backend, "open / run", "ERROR", f"{type(exc).__name__}: {str(exc)[:300]}"])
        ref.close()
    return ("## Parity: the service's backends on the GPU against onnxruntime on the CPU\n\n"
            f"{rows} rows per model (`hjmodel.verify.parity_inputs`: dataset rows, every other one noisy), "
            "tau 0.1; the explanation outputs on the first 32 from the training mean. Float outputs: rtol 1e-4 / "
            "atol 1e-5; discrete outputs: at most 2% of rows differ (decisions within rounding of a tie); the OOD "
            "gate's outputs (`ood_p_value`, `ood_flag`, `ood_component`, `hallucination_flag`): equal on every "
            "row whose decision agrees.\n\n"
            + md_table(["model", "backend on the GPU", "outputs", "result", "max abs difference per output"], table))


def served_bits(models: Path, device: str, rows: int, deadline: float) -> str:
    from hjmodel import serving

    from .served_bits import HEADER, run

    t0 = time.monotonic()
    # on a thread that flushes subnormals, as the service's backend threads do (the mode is per
    # thread: the other parts keep this one's arithmetic)
    with ThreadPoolExecutor(max_workers=1, initializer=serving.flush_subnormals) as flushing:
        table = flushing.submit(run, models, list(BACKENDS), rows, device=device, deadline=deadline).result()
    total = sum(r[3] for r in table)
    bad = sum(r[4] + r[5] + r[6] for r in table)
    done = sorted({r[0] for r in table})
    return ("## Certificates in the bits the GPU serves\n\n"
            f"`eval.served_bits.run(..., device='{device}')`, {rows} rows per family ({time.monotonic() - t0:.0f} s; "
            f"models done: {', '.join(done)}). **{bad} violations on {total} served answers** (the *rounded up* "
            "and both *violations* columns must be 0). Columns: `eval/served_bits.py`.\n\n"
            + md_table(HEADER, table))


def latency(models: Path, device: str) -> str:
    from bench.hjmodel_bench import PredictOnly, _time
    from hjmodel import load_model
    from hjmodel.verify import DEMO_DATA, parity_inputs

    table = []
    for version in bundled(models):
        name = version.parent.name
        if name not in DEMO_DATA:
            continue
        pool = parity_inputs(name, max(BATCHES))
        opened = {}
        for dev in ("cpu", device):
            for backend in BACKENDS:
                try:
                    opened[(backend, dev)] = open_backend(version, backend, dev)
                except Exception as exc:  # noqa: BLE001
                    print(f"{name} {backend} {dev}: {exc}", flush=True)
        bare = PredictOnly(load_model(version)).to(device).eval()
        for batch in BATCHES:
            x, tau = pool[:batch], np.full(batch, TAU)
            row = [name, batch]
            for key in (("onnx", "cpu"), ("onnx", device), ("torch", "cpu"), ("torch", device)):
                served = opened.get(key)
                row.append(1e3 * _time(lambda s=served, x=x, tau=tau: s.infer(x, tau), 0.15, 5) if served else float("nan"))
            with torch.inference_mode():
                bare_ms = 1e3 * _time(lambda x=x, f=bare: f(torch.from_numpy(x).to(device)).cpu(), 0.15, 5)
            row += [bare_ms, float(np.nanmin([row[3], row[5]])) / bare_ms]
            table.append(row)
            print(row, flush=True)
        for served in opened.values():
            served.close()
    return ("## Latency per call, every output (ms, median of 5)\n\n"
            "Each backend's `infer` as the service calls it (input and outputs copied between host and device "
            "inside the time), CPU threads: onnxruntime's and torch's defaults (all cores). *Bare forward*: "
            "`bench.hjmodel_bench.PredictOnly` on the GPU (features, head, argmax; the same float64 arithmetic), "
            "its input and prediction copied likewise; *ratio*: the faster GPU backend over it.\n\n"
            + md_table(["model", "batch", "onnx CPU", "onnx GPU", "torch CPU", "torch GPU", "bare forward GPU",
                        "ratio: all outputs / bare (GPU)"], table))


def served(models: Path, device: str, seconds: float, deadline: float) -> str:
    from bench import loadgen
    from hjmodel.verify import DEMO_DATA, parity_inputs
    from service.testing import run_server

    name = "digits_lse"
    version = Path(models) / name / "1"
    x = parity_inputs(name, 8)
    one = json.dumps({"inputs": [{"name": "input", "shape": [1, x.shape[1]], "datatype": "FP32",
                                  "data": x[0].tolist()}], "parameters": {"diagnostics": True}}).encode()
    ref = open_backend(version, "onnx", "cpu")
    want = ref.infer(x, np.full(len(x), TAU))
    ref.close()
    batch_x = {m: parity_inputs(m, BATCH_ROWS) for m in BATCH_MODELS}
    checks, load, jobs = [], [], []
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for model in bundled(models):
            if model.parent.name in DEMO_DATA:
                shutil.copytree(model, repo / model.parent.name / "1")
        for backend in BACKENDS:
            for dev in (device, "cpu"):
                if time.monotonic() > deadline:
                    checks.append([backend, dev, "SKIPPED", "the run's time budget was spent"])
                    continue
                try:
                    with (run_server(repo, Path(tmp), env=env, device=dev, backend=backend,
                                     max_batch_size=BATCH_CHUNK) as srv, srv.client() as c):
                        config = c.get(f"/v2/models/{name}/config").json()
                        top_k = int(config["parameters"]["top_k_max"]["string_value"])   # as the backend's
                        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                                       "data": x.ravel().tolist()}],
                                           "parameters": {"diagnostics": True, "top_k": top_k}})
                        reply = c.post(f"/v2/models/{name}/infer", content=body,
                                       headers={"Content-Type": "application/json"})
                        reply.raise_for_status()
                        got = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in reply.json()["outputs"]}
                        ok, detail = compare({k: got[k] for k in want if k in got}, {k: want[k] for k in want if k in got})
                        missing = sorted(set(want) - set(got))
                        where = config["parameters"]["device"]["string_value"], config["backend"]
                        checks.append([backend, dev, "PASS" if ok and not missing and where == (dev, backend) else "FAIL",
                                       f"serves on {where[0]} ({where[1]}); {detail}"
                                       + (f"; missing {missing}" if missing else "")])
                        port = int(srv.url.rsplit(":", 1)[1])
                        payload = loadgen.request_bytes(srv.host_port, f"/v2/models/{name}/infer", one)
                        for conc in CONCURRENCY:
                            r = asyncio.run(loadgen.closed_loop("127.0.0.1", port, payload, seconds, conc))
                            load.append([backend, dev, conc, r["rps"], r["p50_ms"], r["p99_ms"], r["errors"]])
                            print(load[-1], flush=True)
                        for model, rows in batch_x.items():
                            jobs.append([model, backend, dev,
                                         loadgen.batch_throughput(srv.url, model, rows, "columns", seconds)])
                            print(jobs[-1], flush=True)
                except Exception as exc:  # noqa: BLE001
                    checks.append([backend, dev, "ERROR", f"{type(exc).__name__}: {str(exc)[-400:]}"])
    ratios = []
    for backend in BACKENDS:
        for conc in CONCURRENCY:
            rps = {r[1]: r[3] for r in load if r[0] == backend and r[2] == conc}
            if device in rps and "cpu" in rps and rps["cpu"]:
                ratios.append([backend, f"closed loop, concurrency {conc}", rps[device] / rps["cpu"]])
        for model in BATCH_MODELS:
            rows = {r[2]: r[3] for r in jobs if r[0] == model and r[1] == backend}
            if device in rows and "cpu" in rows and rows["cpu"]:
                ratios.append([backend, f"batch attribution, {model}", rows[device] / rows["cpu"]])
    return ("## The real server on the GPU\n\n"
            f"`python -m service` (`service.testing.run_server`) with `HJSERVE_DEVICE` and `HJSERVE_BACKEND` as below, "
            f"the bundled models. One V2 request of 8 `{name}` rows with every diagnostic, against the onnxruntime CPU "
            "backend in process:\n\n"
            + md_table(["backend", "device", "result", "detail"], checks)
            + f"\n\nClosed loop (`bench.loadgen.closed_loop`, {seconds:g} s per point, keep-alive connections, one "
            "row per request, every diagnostic), GPU and CPU servers one after the other on this machine:\n\n"
            + md_table(["backend", "device", "concurrency", "req/s", "p50 ms", "p99 ms", "errors"], load)
            + f"\n\nBatch attribution (`bench.loadgen.batch_throughput`: jobs of {BATCH_ROWS:,} rows, V2 binary in, "
            f"NDJSON columns out, back to back for {seconds:g} s after a warm-up job):\n\n"
            + md_table(["model", "backend", "device", "rows/s"], jobs)
            + "\n\nGPU over CPU (req/s, rows/s):\n\n" + md_table(["backend", "load", "ratio"], ratios))


def scaling(spec: str, device: str, deadline: float) -> str:
    """Issue 14's scaling benchmark on the GPU: for each kind, N and d of ``spec`` (``kinds:sizes:dims``,
    as :data:`SCALING`), :func:`bench.scaling_bench.build` trains and exports the model on the CPU,
    then the service's backends open it on the CPU and on ``device`` and their ``infer`` with every
    output is timed at :data:`SCALING_BATCHES`, beside the bare forward pass on ``device``; the growth
    exponents in N are fitted as ``bench/scaling_bench.py`` fits the CPU's. Configurations that would
    start after ``deadline`` are listed as skipped."""
    from bench.scaling_bench import _slope

    kinds, sizes, dims = (part.split(",") for part in spec.split(":"))
    configs = [(kind, int(n), int(d)) for n in sizes for d in dims for kind in kinds]
    rows, skipped, failed = [], [], []
    for kind, n, d in configs:
        if time.monotonic() > deadline:
            skipped.append(f"{kind} N={n} d={d}")
            continue
        try:
            row = _scaling_row(kind, n, d, device)
        except Exception as exc:  # noqa: BLE001 (one configuration that fails -- out of GPU memory, say -- is reported)
            failed.append([kind, n, d, f"{type(exc).__name__}: {str(exc)[-300:]}"])
            print(failed[-1], flush=True)
            continue
        rows.append(row)
        print(json.dumps(row), flush=True)
    big = max(SCALING_BATCHES)

    def best(r: dict, batch: int) -> float:   # the faster backend on the device, seconds per call (NaN: neither ran)
        times = [r[f"{backend}_{device}_{batch}"] for backend in BACKENDS]
        return float("nan") if all(t != t for t in times) else float(np.nanmin(times))
    table = [[r["kind"], r["N"], r["d"], r["accuracy"], r["train_s"], r["export_s"], r["artifact_mb"], r["load_s"],
              1e3 * r["onnx_cpu_1"], 1e3 * r[f"onnx_{device}_1"], 1e3 * r[f"torch_{device}_1"],
              big / r[f"onnx_cpu_{big}"], big / r[f"onnx_{device}_{big}"], big / r[f"torch_{device}_{big}"],
              big / r[f"bare_{big}"], best(r, big) / r[f"bare_{big}"]] for r in rows]
    unavailable = [[r["kind"], r["N"], r["d"], what] for r in rows for what in r["unavailable"]]
    exponents = []
    for kind in kinds:
        for d in map(int, dims):
            rs = sorted((r for r in rows if r["kind"] == kind and r["d"] == d), key=lambda r: r["N"])
            if len(rs) >= 2:
                ns = [r["N"] for r in rs]
                series = ([r[f"onnx_cpu_{big}"] for r in rs], [best(r, big) for r in rs], [r[f"bare_{big}"] for r in rs])
                exponents.append([kind, d, *(_slope(ns, ys) if np.all(np.isfinite(ys)) else float("nan")
                                             for ys in series)])
    return (f"## Scaling with N and d on {device}\n\n"
            "`bench.scaling_bench.build` (synthetic data, 10 classes, both graphs exported) trains each model on the "
            f"CPU; the service's backends then open it (load s: both backends on {device}) and their `infer` with "
            f"every output is timed (median of 3), host copies included; the bare forward pass "
            f"(`bench.hjmodel_bench.PredictOnly`) on {device} likewise; CPU threads: the runtimes' defaults.\n\n"
            + md_table(["kind", "N", "d", "accuracy", "train s", "export s", "artifact MB", "load s",
                        "batch 1 ms, onnx CPU", f"batch 1 ms, onnx {device}", f"batch 1 ms, torch {device}",
                        f"rows/s b{big}, onnx CPU", f"rows/s b{big}, onnx {device}", f"rows/s b{big}, torch {device}",
                        f"bare forward rows/s b{big}, {device}", f"all diagnostics / bare, {device}"], table)
            + f"\n\nGrowth exponents (slope of log seconds per batch-{big} call against log N):\n\n"
            + md_table(["kind", "d", "onnx CPU", f"faster backend, {device}", f"bare forward, {device}"], exponents)
            + (f"\n\nSkipped (the run's time budget was spent): {', '.join(skipped)}." if skipped else "")
            + ("\n\nFailed:\n\n" + md_table(["kind", "N", "d", "error"], failed) if failed else "")
            + ("\n\nNot measured (n/a above):\n\n" + md_table(["kind", "N", "d", "backend"], unavailable)
               if unavailable else ""))


def _scaling_row(kind: str, n: int, d: int, device: str) -> dict:
    """One configuration of :func:`scaling`: built, opened, timed (seconds per call by backend, device
    and batch: ``<backend>_<device>_<batch>``, NaN for a backend that could not open or run there --
    named in ``unavailable`` --, ``bare_<batch>``), every backend closed."""
    from bench.hjmodel_bench import PredictOnly, _time
    from bench.scaling_bench import built

    with built(kind, n, d) as (version, made), contextlib.ExitStack() as opened_stack:
        # the data's rows, repeated where there are fewer than the largest batch
        x = np.resize(made["data"].X.astype(np.float32), (max(SCALING_BATCHES), d))
        row = {"kind": kind, "N": n, "d": d, "accuracy": made["accuracy"], "train_s": made["train_s"],
               "export_s": made["export_s"], "artifact_mb": made["artifact_mb"], "unavailable": []}
        opened = {}
        t0 = time.perf_counter()
        for backend in BACKENDS:
            try:
                opened[(backend, device)] = served = open_backend(version, backend, device)
            except Exception as exc:  # noqa: BLE001 (a backend that cannot open on the device is reported)
                row["unavailable"].append(f"{backend} on {device}: {type(exc).__name__}: {str(exc)[-200:]}")
                continue
            opened_stack.callback(served.close)
        row["load_s"] = time.perf_counter() - t0
        if device != "cpu":   # the baseline (with --device cpu the device's own session is it)
            opened[("onnx", "cpu")] = served = open_backend(version, "onnx", "cpu")
            opened_stack.callback(served.close)
        bare = PredictOnly(made["model"]).to(device).eval()
        for batch in SCALING_BATCHES:
            xb, tau = x[:batch], np.full(batch, TAU)
            for backend, dev in [(b, device) for b in BACKENDS] + ([("onnx", "cpu")] if device != "cpu" else []):
                served, key = opened.get((backend, dev)), f"{backend}_{dev}_{batch}"
                if served is None:
                    row[key] = float("nan")
                    continue
                try:
                    row[key] = _time(lambda s=served, xb=xb, tau=tau: s.infer(xb, tau), 0.15, 3)
                except Exception as exc:  # noqa: BLE001 (one that opens and then fails to run, likewise)
                    row[key] = float("nan")
                    row["unavailable"].append(f"{backend} on {dev}, batch {batch}: {type(exc).__name__}: "
                                              f"{str(exc)[-200:]}")
            with torch.inference_mode():
                row[f"bare_{batch}"] = _time(lambda xb=xb, f=bare: f(torch.from_numpy(xb).to(device)).cpu(), 0.15, 3)
    return row


def cuda_graphs(device: str, deadline: float) -> str:
    """Whether a CUDA graph (a call recorded once, then replayed as one launch) can run a served graph:
    the GPU's single-row cost is kernel launches (part 4), which a recorded call would pay once. For a
    model of each kind (:func:`bench.scaling_bench.build`, N = 1,000, d = 64), at batch 1: onnxruntime's
    CUDA provider with ``enable_cuda_graph`` (inputs and outputs bound to fixed device buffers, as it
    requires), and ``torch.cuda.graph`` recording the service's torch trace. What each says when it
    cannot, or, when it can, its time per call against the same runtime without the graph and whether
    it gives the same answers."""
    if device != "cuda":
        return "## CUDA graphs\n\nNot applicable: CUDA graphs need a GPU (this run's device is the CPU).\n"
    from bench.scaling_bench import built

    table = []
    for kind in ("lse", "deep", "memory"):
        if time.monotonic() > deadline:
            table.append([kind, "both", "skipped: the run's time budget was spent", float("nan"), float("nan"), ""])
            continue
        with built(kind, 1000, 64) as (version, made):
            x = made["data"].X[:1].astype(np.float32)
            for runtime, attempt in (("onnxruntime", _ort_cuda_graph), ("torch trace", _torch_cuda_graph)):
                try:
                    table.append([kind, runtime, *attempt(version, x)])
                except Exception as exc:  # noqa: BLE001 (what the runtime says is the finding)
                    table.append([kind, runtime, f"cannot: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                                  float("nan"), float("nan"), ""])
                print(table[-1], flush=True)
    return ("## CUDA graphs at batch 1\n\nA model of each kind (`bench.scaling_bench.build`, N = 1,000, d = 64), "
            "batch 1, every served output. *plain ms*: the runtime on cuda without a graph (onnxruntime: inputs "
            "from the host; torch: inputs already on the device, synchronised); *graph ms*: the recorded call "
            "replayed (inputs and outputs in fixed device buffers); *same answers*: every output equal, bit for "
            "bit, to the plain call's.\n\n"
            + md_table(["kind", "runtime", "CUDA graph", "plain ms", "graph ms", "same answers"], table))


def _ort_cuda_graph(version: Path, x: np.ndarray) -> list:
    """onnxruntime's CUDA provider with and without ``enable_cuda_graph`` on ``version`` at rows ``x``:
    ["recorded", plain ms, graph ms, same answers]; raises what the runtime says when it cannot."""
    import onnxruntime as ort

    from bench.hjmodel_bench import _time
    from hjmodel.artifact import ONNX_FILE
    from hjmodel.serving import onnx_feeds

    plain = ort.InferenceSession(str(version / ONNX_FILE), providers=["CUDAExecutionProvider"])
    want = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, onnx_feeds(plain, x, TAU))))
    t_plain = _time(lambda: plain.run(None, onnx_feeds(plain, x, TAU)), 0.15, 3)
    sess = ort.InferenceSession(str(version / ONNX_FILE), providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
    binding = sess.io_binding()
    for name, value in onnx_feeds(sess, x, TAU).items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    outs = {name: ort.OrtValue.ortvalue_from_shape_and_type(v.shape, v.dtype.type, "cuda", 0) for name, v in want.items()}
    for name, value in outs.items():
        binding.bind_ortvalue_output(name, value)
    sess.run_with_iobinding(binding)   # the first run records the graph, later ones replay it
    sess.run_with_iobinding(binding)
    same = all(np.array_equal(outs[k].numpy(), want[k], equal_nan=True) for k in want)
    t_graph = _time(lambda: sess.run_with_iobinding(binding), 0.15, 3)
    return ["recorded", 1e3 * t_plain, 1e3 * t_graph, str(same)]


def _torch_cuda_graph(version: Path, x: np.ndarray) -> list:
    """The service's torch trace on cuda, plain and recorded by ``torch.cuda.graph``: as :func:`_ort_cuda_graph`."""
    from bench.hjmodel_bench import _time
    from hjmodel.artifact import load_serving_module, traced_or_eager

    module = traced_or_eager(load_serving_module(version, verify=False).to("cuda").eval(), str(version))
    xs = torch.from_numpy(x).to("cuda")
    ts = torch.full((len(x), 1), TAU, dtype=torch.float64, device="cuda")

    def call():
        out = module(xs, ts)
        torch.cuda.synchronize()
        return out
    want = {k: v.cpu().numpy() for k, v in call().items()}
    t_plain = _time(call, 0.15, 3)
    torch.cuda.set_sync_debug_mode("error")   # a host synchronisation (a data-dependent shape) stops a recording
    try:
        module(xs, ts)
    except RuntimeError as exc:
        frame = re.search(r"most recent call last\):\s*(\S+\(\d+\): \w+)", str(exc))
        raise RuntimeError("the trace synchronises with the host at "
                           + (Path(frame[1]).name if frame else " ".join(str(exc).split())[:200])) from None
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stream = torch.cuda.Stream()   # warm-up on a side stream, as torch.cuda.graph asks
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            module(xs, ts)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recorded = module(xs, ts)

    def replay():
        graph.replay()
        torch.cuda.synchronize()
    replay()
    same = all(np.array_equal(recorded[k].cpu().numpy(), want[k], equal_nan=True) for k in want)
    return ["recorded", 1e3 * t_plain, 1e3 * _time(replay, 0.15, 3), str(same)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--out", default=str(EVAL_DIR / "RESULTS_gpu.md"))
    ap.add_argument("--rows", type=int, default=60, help="served-bits rows per input family")
    ap.add_argument("--seconds", type=float, default=4.0, help="closed-loop seconds per concurrency")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no part starts after this many seconds")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--parts", default="environment,parity,served_bits,latency,served,scaling,cuda_graphs")
    ap.add_argument("--scaling", default=SCALING, help="the scaling part's kinds:sizes:dims (default %(default)s)")
    args = ap.parse_args()
    start = time.monotonic()
    deadline = start + args.budget_s
    if args.device == "cuda" and not torch.cuda.is_available():
        print("eval.gpu: no GPU present (torch.cuda.is_available() is False); nothing to do.")
        return 0
    models = Path(args.models)
    report = Report(Path(args.out), "# hjserve on the GPU\n\nGenerated by `python -m eval.gpu` on "
                    f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Every GPU number has its "
                    "CPU baseline from the same run on the same machine. What each part does: the module docstring "
                    "of `eval/gpu.py`.\n")
    parts = {
        "environment": lambda: "## Environment\n\n" + environment(args.device),
        "parity": lambda: parity(models, args.device),
        "served_bits": lambda: served_bits(models, args.device, args.rows, deadline),
        "latency": lambda: latency(models, args.device),
        "served": lambda: served(models, args.device, args.seconds, deadline),
        "scaling": lambda: scaling(args.scaling, args.device, deadline),
        "cuda_graphs": lambda: cuda_graphs(args.device, deadline),
    }
    failed = False
    for part in args.parts.split(","):
        if time.monotonic() > deadline:
            report.add(f"## {part}\n\nSkipped: the run's time budget ({args.budget_s:g} s) was spent.\n")
            continue
        t0 = time.monotonic()
        try:
            text = parts[part]()
        except Exception:  # noqa: BLE001 (a part that breaks is reported; the next one still runs)
            failed = True
            text = f"## {part}: ERROR\n\n```\n{traceback.format_exc()[-3000:]}\n```\n"
        report.add(text + f"\n*({part}: {time.monotonic() - t0:.0f} s)*\n")
    with contextlib.suppress(Exception):
        report.add(f"Total {time.monotonic() - start:.0f} s.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
