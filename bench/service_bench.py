"""Service benchmark: each measurement next to its baseline, in one run.

1. V2 infer throughput (JSON, batch 1, concurrency 16) vs a bare uvicorn endpoint returning a
   constant (the HTTP + client floor on this machine).
2. Latency (concurrency 1) with every diagnostic output vs predictions only.
3. Batch attribution rows/s (V2 binary in, NDJSON out; ``bench/loadgen.py``'s ``batch_job``) in the
   row and the column layout vs the same rows in process: ``load_serving_module`` (torch), an
   onnxruntime session, the documented ``Predictor`` -- each on the outputs the job answers: a job
   that names none answers every output of the serving graph (against ``Predictor(outputs="all")``),
   one that names the four default outputs runs the graph cut down to them (against the default
   ``Predictor``). Every one is warmed up, then all run in turn
   ``--repeats`` times (medians), so a burst of load on the shared machine reaches each alike. The
   jobs run on the server as deployed by default (onnxruntime's own thread count, one per core) and
   on a second server with one thread per operator, as the in-process baselines have.

Usage: ``python bench/service_bench.py [--model-dir models/digits_lse/1] [--seconds 5]``; writes
``bench/results/service.md``. Client and servers share this machine's cores; 1 and 2 are driven by
``bench/loadgen.py``'s closed loop (raw sockets, pre-encoded requests: the client's own cost is small).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import batch_job, post_loop  # noqa: E402
from service.testing import free_port, run_server  # noqa: E402

BARE_APP = """
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
BODY = b'{"model_name":"m","model_version":"1","outputs":[{"name":"prediction","datatype":"INT64","shape":[1],"data":[0]}]}'
async def infer(request):
    await request.body()
    return Response(BODY, media_type="application/json")
app = Starlette(routes=[Route("/v2/models/m/infer", infer, methods=["POST"])])
"""


def _model_dir(arg: str | None, tmp: Path) -> Path:
    if arg:
        return Path(arg)
    demo = sorted((ROOT / "models").glob("digits_lse/[0-9]*"))
    if demo:
        return demo[-1]
    from hjmodel.artifact import save_artifact
    from hjmodel.data import load_dataset
    from hjmodel.train import TrainConfig, train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = train(load_dataset("digits"), TrainConfig(epochs=5, progress=False))
        return save_artifact(model, tmp / "digits_lse" / "1")


def _start_bare(log_dir: Path):
    port = free_port()
    app_file = log_dir / "bare_app.py"
    app_file.write_text(BARE_APP)
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port),
                             "--log-level", "warning"], cwd=log_dir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.post(url + "/v2/models/m/infer", content=b"{}")
            break
        except httpx.TransportError:
            time.sleep(0.05)
    return proc, url


def _batch_runs(client: httpx.Client, name: str, version_dir: Path, spec: dict,
                x: np.ndarray) -> tuple[dict[str, Callable[[], object]], int]:
    """The batch measurements, each a warmed-up callable over all of ``x``: the server's jobs
    (:func:`_jobs`) and the in-process baselines -- the torch serving module in 256-row chunks; an
    onnxruntime session and the documented Predictor on the server's chunk size, the Predictor once
    for every output (what a job answers when it names none) and once for the default outputs (a job
    that names them) -- and that chunk size."""
    import torch

    from hjmodel import serving
    from hjmodel.artifact import load_serving_module
    from hjmodel.predictor import Predictor
    from service.rest.batch import default_chunk_rows

    module = load_serving_module(version_dir).eval()
    # as the server runs it: subnormals flushed (its batcher thread and sessions do; these rows
    # are far from the data, where that matters), the session's default threads
    serving.flush_subnormals()
    sess = serving.open_session(version_dir / "model.onnx", flush_subnormals=True)
    chunk = default_chunk_rows(spec, 64)   # the default max_batch_size
    # the documented in-process predictor (onnxruntime, one thread, the server's selection and
    # slicing), on the same chunks and the same outputs as the job it is compared with
    predictors = {"predictor all": Predictor(version_dir, outputs="all"), "predictor default": Predictor(version_dir)}

    def in_torch() -> None:
        with torch.inference_mode():     # as the service's torch backend runs it
            for start in range(0, len(x), 256):
                module(torch.from_numpy(x[start:start + 256]), torch.tensor([0.1], dtype=torch.float64))

    def in_ort() -> None:
        for start in range(0, len(x), chunk):
            sess.run(None, serving.onnx_feeds(sess, x[start:start + chunk], 0.1))

    def in_predictor(predictor: Predictor) -> Callable[[], None]:
        def run() -> None:
            for start in range(0, len(x), chunk):
                predictor(x[start:start + chunk])
        return run

    runs = {"torch": in_torch, "ort": in_ort, **{k: in_predictor(p) for k, p in predictors.items()}}
    for warm_up in runs.values():
        warm_up()
    return {**_jobs(client, name, x), **runs}, chunk


def _jobs(client: httpx.Client, name: str, x: np.ndarray) -> dict[str, Callable[[], object]]:
    """The server's batch jobs on ``x`` in the row and the column layout, naming no outputs (every
    output of the serving graph: the endpoint's default) and naming the default outputs, warmed up."""
    from hjmodel.serving import DEFAULT_OUTPUTS

    jobs = {}
    for asked, outputs in (("all", None), ("default", list(DEFAULT_OUTPUTS))):
        for layout in ("rows", "columns"):
            batch_job(client, name, x[:4096], layout, outputs)
            # batch_job raises unless every row is answered
            jobs[f"{layout} {asked}"] = (lambda layout=layout, outputs=outputs:
                                         batch_job(client, name, x, layout, outputs))
    return jobs


def _batch_table(med: dict[str, float], n: int, chunk: int) -> list[str]:
    """The batch rows of the table from the median seconds of each run (:func:`_batch_runs`; a
    ``1t`` suffix: the server with one onnxruntime thread per operator, as the Predictor has). Each
    job is set against a baseline computing the same outputs: naming none, a job answers every
    output of the serving graph; naming the default outputs, it runs the graph cut down to them
    (and the monitored outputs the metrics count), as the default Predictor does."""
    def line(what: str, baseline: str, base: str, job: str) -> str:
        return (f"| {what} (rows/s) | {baseline}: {n / med[base]:.0f} | hjserve: {n / med[job]:.0f} | "
                f"{med[base] / med[job]:.2f} |")

    every = f"in-process `hjmodel.predictor.Predictor(outputs=\"all\")` (onnxruntime, one thread), {chunk}-row chunks"
    default = f"in-process `hjmodel.predictor.Predictor()` (its default outputs, onnxruntime, one thread), {chunk}-row chunks"
    return [
        line(f"batch attribution, {n} rows binary in, NDJSON out, every output", "in-process load_serving_module "
             "(torch, 256-row chunks)", "torch", "rows all"),
        line("batch attribution, same rows, every output", every, "predictor all", "rows all"),
        line("batch attribution, same rows, every output, `layout=columns`", "the Predictor as above",
             "predictor all", "columns all"),
        line("batch attribution, same rows, every output, server with one onnxruntime thread as the Predictor",
             "the Predictor as above", "predictor all", "rows all 1t"),
        line("batch attribution, same rows, every output, one onnxruntime thread, `layout=columns`",
             "the Predictor as above", "predictor all", "columns all 1t"),
        line("batch attribution, same rows, the four default outputs named", default, "predictor default",
             "rows default"),
        line("batch attribution, same rows, default outputs, `layout=columns`", "the Predictor as above",
             "predictor default", "columns default"),
        line("batch attribution, same rows, default outputs, server with one onnxruntime thread",
             "the Predictor as above", "predictor default", "rows default 1t"),
        line("batch attribution, same rows, default outputs, one onnxruntime thread, `layout=columns`",
             "the Predictor as above", "predictor default", "columns default 1t"),
        line("batch attribution, same rows, every output", "in-process onnxruntime session on the same "
             f"`model.onnx`, {chunk}-row chunks (the server's runtime and chunk size)", "ort", "rows all"),
        line("batch attribution, same rows, every output, `layout=columns` (one line of columns per graph call)",
             "in-process onnxruntime as above", "ort", "columns all"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="a version directory (default: models/digits_lse/<latest>)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each batch measurement (medians)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "service.md"))
    args = parser.parse_args()

    from hjmodel import serving
    from hjmodel.artifact import read_spec

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        version_dir = _model_dir(args.model_dir, tmp)
        spec = read_spec(version_dir)
        name = version_dir.parent.name
        repo = tmp / "repo"
        (repo / name).mkdir(parents=True)
        # a copy, not a symlink: the server refuses directories that resolve outside its repository
        shutil.copytree(version_dir, repo / name / version_dir.name)
        d = spec["n_features"]
        rng = np.random.default_rng(0)
        row = np.abs(rng.standard_normal((1, d))).astype(np.float32)
        one = json.dumps({"inputs": [{"name": "input", "shape": [1, d], "datatype": "FP32",
                                      "data": row.ravel().tolist()}]}).encode()
        every = json.dumps({"inputs": [{"name": "input", "shape": [1, d], "datatype": "FP32",
                                        "data": row.ravel().tolist()}],
                            "parameters": {"diagnostics": True, "top_k": serving.TOP_K_MAX}}).encode()
        preds = json.dumps({"inputs": [{"name": "input", "shape": [1, d], "datatype": "FP32",
                                        "data": row.ravel().tolist()}], "outputs": [{"name": "prediction"}]}).encode()
        results: dict[str, dict] = {}
        bare, bare_url = _start_bare(tmp)
        try:
            results["bare"] = asyncio.run(post_loop(bare_url, "/v2/models/m/infer", one, args.seconds,
                                                      args.concurrency))
        finally:
            bare.terminate()
            bare.wait(10)
        with run_server(repo, tmp) as s:
            path = f"/v2/models/{name}/infer"
            results["infer"] = asyncio.run(post_loop(s.url, path, one, args.seconds, args.concurrency))
            results["all_diag"] = asyncio.run(post_loop(s.url, path, every, args.seconds, 1))
            results["pred_only"] = asyncio.run(post_loop(s.url, path, preds, args.seconds, 1))
            x = np.abs(rng.standard_normal((args.rows, d))).astype(np.float32) * 3
            times: dict[str, list[float]] = {}
            # the batch jobs on this server (onnxruntime's default threads, as deployed by default) and
            # on a second one with one thread per operator, as the in-process baselines run
            with run_server(repo, tmp, intra_op_threads=1) as s1, \
                    httpx.Client(base_url=s.url, timeout=600) as client, \
                    httpx.Client(base_url=s1.url, timeout=600) as client1:
                runs, chunk = _batch_runs(client, name, version_dir, spec, x)
                one_thread = {f"{k} 1t": v for k, v in _jobs(client1, name, x).items()}
                for _ in range(args.repeats):   # alternating, so machine noise reaches every one alike
                    for label, run in {**runs, **one_thread}.items():
                        t0 = time.perf_counter()
                        run()
                        times.setdefault(label, []).append(time.perf_counter() - t0)
        med = {label: statistics.median(t) for label, t in times.items()}

    r = results
    lines_md = [
        "# Service benchmark",
        "",
        f"Model `{name}` (kind {spec['kind']}, d={d}); {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores shared by client and server (load average at the end "
        f"{os.getloadavg()[0]:.1f}: other work on the machine skews absolute numbers, compare the ratios); "
        f"{args.seconds:g} s per load measurement; each batch measurement the median of {args.repeats} "
        "alternating runs after a warm-up. "
        f"Generated by `python bench/service_bench.py{''.join(' ' + a for a in sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| measurement | baseline | result | ratio |",
        "|---|---|---|---|",
        f"| V2 infer, JSON, batch 1, concurrency {args.concurrency} (req/s) | bare uvicorn constant: "
        f"{r['bare']['rps']:.0f} | hjserve: {r['infer']['rps']:.0f} | {r['infer']['rps'] / r['bare']['rps']:.2f} |",
        f"| latency p50 / p99, concurrency 1 (ms) | predictions only: {r['pred_only']['p50_ms']:.2f} / "
        f"{r['pred_only']['p99_ms']:.2f} | all diagnostics: {r['all_diag']['p50_ms']:.2f} / "
        f"{r['all_diag']['p99_ms']:.2f} | {r['all_diag']['p50_ms'] / r['pred_only']['p50_ms']:.2f} |",
        *_batch_table(med, args.rows, chunk),
        "",
        f"Errors: bare {r['bare']['errors']}, infer {r['infer']['errors']}, all diagnostics "
        f"{r['all_diag']['errors']}, predictions only {r['pred_only']['errors']}. Concurrency-{args.concurrency} "
        f"latency p50/p99: bare {r['bare']['p50_ms']:.1f}/{r['bare']['p99_ms']:.1f} ms, hjserve "
        f"{r['infer']['p50_ms']:.1f}/{r['infer']['p99_ms']:.1f} ms.",
        "",
        "Reading: the serving graph computes every diagnostic on every request; 'all diagnostics' "
        "(`diagnostics: true`) also asks for the explanation outputs, which run the second graph "
        "(integrated gradients, ...) in the same turn of the backend's thread, and the JSON of every "
        "output. The throughput gap to the bare endpoint is validation, batching and encoding in Python; "
        "`bench/results/competitors.md` breaks the request path down against MLServer and KServe. "
        "Each batch job is set against a baseline computing the outputs it answers: a job naming no "
        "outputs answers every output of the serving graph, fifteen columns with the saliency, while the "
        "default Predictor computes four on a graph cut down to them (a job naming those four also computes "
        "the monitored outputs its metrics count).",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines_md) + "\n")
    print("\n".join(lines_md))


if __name__ == "__main__":
    main()
