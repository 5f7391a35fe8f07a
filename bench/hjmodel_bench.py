"""In-process cost of the served diagnostics: ``evaluate`` with every output vs prediction only,
per model kind, for both backends, batch sizes 1 and 256. Writes ``bench/results/hjmodel_bench.md``.

Backends and rows (one thread each, so numbers are per core):

* torch -- *all diagnostics*: ``ServingModule(input, tau)`` (``HJModel.evaluate`` with every served
  output, float32 in / out) as the service's torch backend runs it, its TorchScript trace
  (``hjmodel.artifact.TracedModule``); *all diagnostics, trace unfolded*: the same trace with its
  weight-only operations left in the graph (``TracedModule(fold=False)``: what folding them at load
  saves), and *all diagnostics, eager*: the module itself, side by side;
  *HJModel.predict*: the library's predict (the forward pass only,
  no diagnostics); *predict only*: the bare forward
  ``model.features`` -> ``head.outputs`` -> argmax (the baseline of the ratio).
* onnxruntime -- *all diagnostics*: ``model.onnx``, every output; *prediction fetched*: the same
  graph asked only for ``prediction``; *predict only*: a graph exported from the bare forward;
  *all diagnostics, far rows*: every output for rows far from the data (|N(0, 1)| x 3 per pixel,
  OOD traffic), where the graph's exponentials underflow, in the served session (subnormals
  flushed, ``serving.open_session``) and, side by side, in one that keeps them.
* both -- *explanation outputs*: the explanation graph (``ExplainModule`` / ``explain.onnx``: the
  integrated gradients from the training mean, label flips, the HJ reading, the eps what-if), which
  the service runs only for requests that name those outputs; its ratio is to the same *predict only*
  (torch: traced, and *explanation outputs, eager*).

A second table reads the torch backend against onnxruntime: the traced (served) and eager torch
calls over onnxruntime's, for every diagnostic and for the explanation outputs.

Each cell is the median of 7 timing repeats, each repeat averaging enough calls to last >= 0.2 s.
Usage: ``python bench/hjmodel_bench.py [--models DIR]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hjmodel import load_dataset, load_model, load_serving_module  # noqa: E402
from hjmodel import serving as serving_contract  # noqa: E402
from hjmodel.artifact import ONNX_FILE, ExplainModule, TracedModule, read_spec  # noqa: E402

MODELS = {"digits_lse": ("lse classification", "digits"), "digits_memory": ("memory classification", "digits"),
          "digits_deep": ("deep classification", "digits"), "diabetes_lse": ("lse regression", "diabetes")}
BATCHES = (1, 256)


class PredictOnly(torch.nn.Module):
    """The bare forward: preprocess, body, head outputs; argmax for classification."""

    def __init__(self, model):
        super().__init__()
        self.model = model.double().eval()

    def forward(self, input):  # noqa: A002
        m = self.model
        out = m.head.outputs(m.head.preactivations(m.features(input.to(torch.float64))))
        return out.argmax(-1) if m.task == "classification" else out.to(torch.float32)


def _time(fn, min_seconds: float = 0.2, repeats: int = 7) -> float:
    """Median seconds per call."""
    for _ in range(3):
        fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.05:
        fn()
        n += 1
    per = max((time.perf_counter() - t0) / n, 1e-7)
    calls = max(1, int(min_seconds / per))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t) / calls)
    return statistics.median(samples)


#: a thread started before any session: onnxruntime sets the flush mode on the thread that opens a
#: flushing session (and threads started from it later), so "subnormals kept" runs here
KEPT = ThreadPoolExecutor(max_workers=1)
KEPT.submit(lambda: None).result()


def _session(path: Path, flush: bool = True):
    return serving_contract.open_session(path, threads=1, flush_subnormals=flush)


def bench_model(directory: Path, data_name: str, work: Path) -> list[dict]:
    model = load_model(directory)
    serving = load_serving_module(directory).eval()
    bare = PredictOnly(load_model(directory)).eval()
    bare_path = work / f"{directory.parent.name}_predict.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(bare, (torch.zeros(2, model.n_features),), str(bare_path), input_names=["input"],
                          output_names=["prediction"], dynamic_axes={"input": {0: "batch"}, "prediction": {0: "batch"}},
                          opset_version=17, dynamo=False)
    full_sess, bare_sess = _session(directory / ONNX_FILE), _session(bare_path)
    explain_sess = _session(directory / serving_contract.EXPLAIN_FILE)
    explain = ExplainModule(load_model(directory)).eval()
    traced, traced_explain = TracedModule(serving), TracedModule(explain)
    unfolded = TracedModule(serving, fold=False)
    mean = np.asarray(read_spec(directory)["input_mean"], dtype=np.float32)
    kept_sess = KEPT.submit(_session, directory / ONNX_FILE, False).result()
    far = (np.abs(np.random.default_rng(0).standard_normal((max(BATCHES), model.n_features))) * 3).astype(np.float32)
    X = load_dataset(data_name).X
    tau = torch.tensor([0.1], dtype=torch.float64)
    rows = []
    for batch in BATCHES:
        x32 = torch.as_tensor(X[np.arange(batch) % len(X)], dtype=torch.float32)
        xn = x32.numpy()
        feed = serving_contract.onnx_feeds(full_sess, xn, 0.1)
        # sanity: the baselines predict what the server predicts
        with torch.no_grad():
            want = serving(x32, tau)["prediction"].numpy()
            assert np.allclose(bare(x32).numpy(), want, rtol=1e-6)
        assert np.allclose(bare_sess.run(None, {"input": xn})[0], want, rtol=1e-6)
        with torch.inference_mode():      # as the service's torch backend runs it
            t_b, base_b = tau.expand(batch, 1), torch.as_tensor(mean).expand(batch, -1)
            t = {
                ("torch", "all diagnostics"): _time(lambda x32=x32, t_b=t_b: traced(x32, t_b)),
                ("torch", "all diagnostics, eager"): _time(lambda x32=x32, t_b=t_b: serving(x32, t_b)),
                ("torch", "all diagnostics, trace unfolded"): _time(lambda x32=x32, t_b=t_b: unfolded(x32, t_b)),
                ("torch", "HJModel.predict"): _time(lambda x32=x32: model.predict(x32)),
                ("torch", "predict only"): _time(lambda x32=x32: bare(x32)),
                ("torch", "explanation outputs"): _time(
                    lambda x32=x32, t_b=t_b, base_b=base_b: traced_explain(x32, t_b, base_b)),
                ("torch", "explanation outputs, eager"): _time(
                    lambda x32=x32, t_b=t_b, base_b=base_b: explain(x32, t_b, base_b)),
            }
        t[("onnxruntime", "all diagnostics")] = _time(lambda feed=feed: full_sess.run(None, feed))
        t[("onnxruntime", "prediction fetched")] = _time(lambda feed=feed: full_sess.run(["prediction"], feed))
        t[("onnxruntime", "predict only")] = _time(lambda xn=xn: bare_sess.run(None, {"input": xn}))
        explain_feed = serving_contract.onnx_feeds(explain_sess, xn, 0.1, mean)
        t[("onnxruntime", "explanation outputs")] = _time(lambda f=explain_feed: explain_sess.run(None, f))
        # rows far from the data (OOD traffic), where exponentials underflow: the served session
        # flushes subnormals (serving.open_session); side by side, one that does not
        far_feed = serving_contract.onnx_feeds(full_sess, far[:batch], 0.1)
        t[("onnxruntime", "all diagnostics, far rows")] = _time(lambda f=far_feed: full_sess.run(None, f))
        t[("onnxruntime", "all diagnostics, far rows, subnormals kept")] = KEPT.submit(
            _time, lambda f=far_feed: kept_sess.run(None, f)).result()
        for backend in ("torch", "onnxruntime"):
            base = t[(backend, "predict only")]
            for (b, what), sec in t.items():
                if b == backend:
                    rows.append({"model": directory.parent.name, "batch": batch, "backend": backend, "what": what,
                                 "ms": sec * 1e3, "ratio": sec / base,
                                 "vs_ort": sec / t.get(("onnxruntime", what.removesuffix(", eager").removesuffix(", trace unfolded")), math.nan)})
        print(directory.parent.name, batch, {f"{b}/{w}": round(s * 1e3, 3) for (b, w), s in t.items()}, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "hjmodel_bench.md"))
    args = ap.parse_args()
    models = None
    for c in (args.models, os.environ.get("HJSERVE_TEST_MODELS"), str(ROOT / "models"), "/tmp/demo1"):
        if c and (Path(c) / "DEMO_RESULTS.json").exists():
            models = Path(c)
            break
    if models is None:
        raise SystemExit("no demo repository: run `python -m hjmodel.demo --out models` first")
    torch.set_num_threads(1)
    # this thread runs the served graphs as the service's backend thread does: subnormals flushed
    # (KEPT, started before, keeps them)
    serving_contract.flush_subnormals()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in MODELS:
            rows += bench_model(models / name / "1", MODELS[name][1], Path(work))
    import onnxruntime as ort

    load = os.getloadavg()
    L = ["# hjmodel: cost of the diagnostics", "",
         f"Generated by `python bench/hjmodel_bench.py` on {dt.datetime.now().isoformat(timespec='seconds')}; "
         f"{platform.platform()}, {os.cpu_count()} CPUs shared with other jobs (load average {load[0]:.1f} at the "
         f"end), Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}; "
         f"one thread per backend; demo models from `{models}`.", "",
         "Milliseconds per call (median of 7 repeats) and ratio to the same backend's *predict only* (bare "
         "forward: features, head outputs, argmax). *all diagnostics* = every served output: prediction, "
         "probabilities, certified radius, OOD score / flag / p-value / component, hallucination flag, energy gap, "
         "attribution entropy, top-10 attribution indices / weights / label sensitivities, saliency.", "",
         "| model | kind | batch | backend | call | ms / call | ratio to predict only |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['model']} | {MODELS[r['model']][0]} | {r['batch']} | {r['backend']} | {r['what']} | "
                 f"{r['ms']:.3f} | {r['ratio']:.1f}x |")
    L += ["", "**The torch backend against onnxruntime** (the same call's time over onnxruntime's; issue 14's "
          "goal: within 2x)", "", "| model | batch | all diagnostics, traced (served) | all diagnostics, trace unfolded | "
          "all diagnostics, eager | explanation outputs, traced (served) | explanation outputs, eager |",
          "|---|---|---|---|---|---|---|"]
    vs = {(r["model"], r["batch"], r["what"]): r["vs_ort"] for r in rows if r["backend"] == "torch"}
    for name, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        L.append(f"| {name} | {batch} | " + " | ".join(
            f"{vs[(name, batch, what)]:.2f}x" for what in ("all diagnostics", "all diagnostics, trace unfolded",
                                                           "all diagnostics, eager", "explanation outputs",
                                                           "explanation outputs, eager")) + " |")
    L += ["", "Notes: `HJModel.predict` is the forward pass alone (it matches *predict only*); onnxruntime "
          "computes the whole served graph even when only `prediction` is fetched. *far rows* are "
          "|N(0, 1)| x 3 per feature (OOD traffic), where the graph's exponentials underflow: the served "
          "session flushes subnormals to zero (`hjmodel.serving.open_session`); *subnormals kept* is "
          "the same graph in a session that does not, on a thread that never flushed -- the flush is "
          "what keeps OOD traffic as cheap as in-distribution traffic. *explanation outputs* is the "
          "explanation graph (`explain.onnx` / `ExplainModule`: integrated gradients from the training mean, "
          "label flips, the HJ reading, the eps what-if), which the service runs only for requests that "
          "name those outputs; its ratio is to the same backend's *predict only*."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(L) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
