"""hjserve against the servers a user would pick instead, serving the same ONNX file side by side.

    python bench/competitors.py [--seconds 5] [--passes 2] [--out bench/results/competitors.md]

Servers (each a real process on loopback, onnxruntime with one thread, batch 1, JSON over HTTP):

* **Seldon MLServer 1.7.1**, a minimal custom runtime (``MLModel``: decode the V2 input, run the
  graph for ``prediction`` and ``probabilities``, encode), no parallel workers;
* **KServe ModelServer 0.21.0**, the same runtime as a ``kserve.Model``, one worker;
* **hjserve**, the same ``model.onnx`` (its repository holds only this model), asked for its four
  default outputs; for every diagnostic of the serving graph (its 14 outputs: certificate, OOD,
  attributions, saliency, ...); and for every output (``diagnostics: true``: the serving graph's and
  the explanation graph's -- integrated gradients, the dominant neuron's HJ reading -- which the
  server runs as a second graph);
* **bare**: a uvicorn + Starlette endpoint that reads the body and returns hjserve's all-diagnostics
  reply as a constant (the HTTP floor on this machine).

MLServer and KServe are installed into their own virtual environments (``.venv-mlserver``,
``.venv-kserve``, ignored by git) on first use; they cannot share hjserve's (their pins differ).
perf_analyzer cannot drive them (MLServer fails on ``/config``, KServe has none), so one client
drives all: ``bench/loadgen.py``'s closed loop (keep-alive connections over raw asyncio sockets,
pre-encoded requests; every reply's body is read whole). Its cost per request is a fraction of a
general-purpose client's, so less of the shared cores goes to the client and more of each
measurement is the server's (with httpx, the bare endpoint measured 1,850 / 1,190 req/s at
concurrency 1 / 16; see the bare row for this client). Every server first answers its request
through httpx with a 200, so the replies timed are the real ones. For each
concurrency (1, 4, 16) the servers are measured in turn, ``--passes`` times alternating, and each
cell is the median over passes. Client and servers share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import post_loop  # noqa: E402
from hjmodel import serving  # noqa: E402
from service.testing import free_port, run_server, stop_process  # noqa: E402

OUT = ROOT / "bench" / "results" / "competitors.md"
#: the measurement's defaults (the report names the options that differ)
DEFAULTS = {"seconds": 5.0, "passes": 2}
MLSERVER = ("mlserver==1.7.1",)
KSERVE = ("kserve==0.21.0",)
CONCURRENCY = (1, 4, 16)

MLSERVER_RUNTIME = '''
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")   # as hjserve's sessions
        self.sess = ort.InferenceSession(self.settings.parameters.uri, opts, providers=["CPUExecutionProvider"])
        self.feed_names = [i.name for i in self.sess.get_inputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32).reshape(-1, {d})
        feed = {{"input": x, "tau": np.full((len(x), 1), 0.1)}}         # tau: regression graphs only
        pred, prob = self.sess.run(["prediction", "probabilities"], {{k: feed[k] for k in self.feed_names}})
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("prediction", pred),
                                                                NumpyCodec.encode_output("probabilities", prob)])
'''

KSERVE_SERVER = '''
import sys
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class OnnxModel(Model):
    def __init__(self, name, path):
        super().__init__(name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")   # as hjserve's sessions
        self.sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.feed_names = [i.name for i in self.sess.get_inputs()]
        self.ready = True

    async def predict(self, payload, headers=None, response_headers=None):
        x = payload.inputs[0].as_numpy().astype(np.float32).reshape(-1, {d})
        feed = {{"input": x, "tau": np.full((len(x), 1), 0.1)}}         # tau: regression graphs only
        pred, prob = self.sess.run(["prediction", "probabilities"], {{k: feed[k] for k in self.feed_names}})
        outs = [InferOutput("prediction", list(pred.shape), "INT64"), InferOutput("probabilities", list(prob.shape), "FP32")]
        outs[0].set_data_from_numpy(pred, binary_data=False)
        outs[1].set_data_from_numpy(prob, binary_data=False)
        return InferResponse(response_id=payload.id or "0", model_name=self.name, infer_outputs=outs)


if __name__ == "__main__":
    ModelServer(http_port=int(sys.argv[2]), grpc_port=int(sys.argv[3]), workers=1,
                enable_grpc=False).start([OnnxModel("{name}", sys.argv[1])])
'''

BARE_APP = '''
from pathlib import Path
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
BODY = Path("reply.json").read_bytes()
async def infer(request):
    await request.body()
    return Response(BODY, media_type="application/json")
async def ready(request):
    return Response(b"")
app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"]), Route("/ready", ready)])
'''


def ensure_venv(where: Path, packages: tuple[str, ...]) -> Path:
    """A virtual environment with ``packages`` and this project's onnxruntime and numpy pins."""
    python = where / "bin" / "python"
    if not python.exists():
        import onnxruntime

        subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages, f"onnxruntime=={onnxruntime.__version__}",
                        f"numpy=={np.__version__}"], check=True)
    return python


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    stop = time.time() + timeout
    while time.time() < stop:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def start(cmd: list[str], cwd: Path, ready: str) -> subprocess.Popen:
    log = open(cwd / "server.log", "w")   # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    wait_ready(ready, proc, cwd / "server.log")
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "digits_lse" / "1"))
    ap.add_argument("--seconds", type=float, default=DEFAULTS["seconds"])
    ap.add_argument("--passes", type=int, default=DEFAULTS["passes"])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    version = Path(args.model_dir).resolve()
    name = version.parent.name
    onnx_file = version / "model.onnx"
    spec = json.loads((version / "model.json").read_text())
    d, task = spec["n_features"], spec["task"]
    ml_python = ensure_venv(ROOT / ".venv-mlserver", MLSERVER)
    ks_python = ensure_venv(ROOT / ".venv-kserve", KSERVE)
    row = np.abs(np.random.default_rng(0).standard_normal(d)).astype(np.float32).tolist()
    inp = [{"name": "input", "shape": [1, d], "datatype": "FP32", "data": row}]
    bodies = {
        "two": json.dumps({"inputs": inp, "outputs": [{"name": "prediction"}, {"name": "probabilities"}]}).encode(),
        "four": json.dumps({"inputs": inp}).encode(),     # hjserve's default outputs
        "graph": json.dumps({"inputs": inp, "parameters": {"diagnostics": list(serving.output_names(task))}}).encode(),
        "all": json.dumps({"inputs": inp, "parameters": {"diagnostics": True}}).encode(),
    }
    path = f"/v2/models/{name}/infer"
    procs: list[subprocess.Popen] = []
    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        stack.callback(lambda: [stop_process(p) for p in procs])
        repo = tmp / "repo"
        shutil.copytree(version, repo / name / "1")
        hj = stack.enter_context(run_server(repo, tmp, intra_op_threads=1))
        all_reply = httpx.post(hj.url + path, content=bodies["all"], timeout=30)
        all_reply.raise_for_status()
        # MLServer
        ml_dir = tmp / "mlserver"
        ml_dir.mkdir()
        (ml_dir / "runtime.py").write_text(MLSERVER_RUNTIME.format(d=d))
        ml_port = free_port()
        (ml_dir / "settings.json").write_text(json.dumps({"http_port": ml_port, "grpc_port": free_port(),
                                                          "metrics_port": free_port(), "parallel_workers": 0}))
        (ml_dir / "model-settings.json").write_text(json.dumps({"name": name, "implementation": "runtime.OnnxModel",
                                                                "parameters": {"uri": str(onnx_file)}}))
        ml_url = f"http://127.0.0.1:{ml_port}"
        procs.append(start([str(ml_python.parent / "mlserver"), "start", "."], ml_dir, f"{ml_url}/v2/models/{name}/ready"))
        # KServe
        ks_dir = tmp / "kserve"
        ks_dir.mkdir()
        (ks_dir / "server.py").write_text(KSERVE_SERVER.format(d=d, name=name))
        ks_port = free_port()
        ks_url = f"http://127.0.0.1:{ks_port}"
        procs.append(start([str(ks_python), "server.py", str(onnx_file), str(ks_port), str(free_port())], ks_dir,
                           f"{ks_url}/v2/models/{name}/ready"))
        # bare constant endpoint: hjserve's own all-diagnostics reply
        bare_dir = tmp / "bare"
        bare_dir.mkdir()
        (bare_dir / "reply.json").write_bytes(all_reply.content)
        (bare_dir / "bare_app.py").write_text(BARE_APP.format(name=name))
        bare_port = free_port()
        bare_url = f"http://127.0.0.1:{bare_port}"
        procs.append(start([sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(bare_port), "--log-level",
                            "warning"], bare_dir, bare_url + "/ready"))
        targets = {"MLServer 1.7.1 (prediction + probabilities)": (ml_url, "two"),
                   "KServe 0.21.0 (prediction + probabilities)": (ks_url, "two"),
                   "hjserve, four default outputs": (hj.url, "four"),
                   "hjserve, every serving-graph diagnostic": (hj.url, "graph"),
                   "hjserve, all diagnostics": (hj.url, "all"),
                   "bare constant (hjserve's all-diagnostics reply)": (bare_url, "all")}
        for label, (url, body) in targets.items():   # every server answers the request it will be timed on
            reply = httpx.post(url + path, content=bodies[body], timeout=30, headers={"content-type": "application/json"})
            if reply.status_code != 200:
                raise RuntimeError(f"{label}: {reply.status_code} {reply.text[-800:]}")
        for c in CONCURRENCY:
            for p in range(args.passes):
                order = list(targets.items()) if p % 2 == 0 else list(reversed(targets.items()))
                for label, (url, body) in order:
                    r = asyncio.run(post_loop(url, path, bodies[body], args.seconds, c))
                    results.setdefault((label, c), []).append(r)
                    print(f"c={c} pass {p}: {label}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                          f"errors {r['errors']}", flush=True)
    Path(args.out).write_text(report(results, list(targets), args))
    print(Path(args.out).read_text())
    return 0


def _flags(args) -> str:
    """The command line's options that differ from the defaults, as the report names them."""
    given = [f"--{k} {getattr(args, k)}" for k, default in DEFAULTS.items() if getattr(args, k) != default]
    out = Path(args.out).resolve()
    if out != OUT.resolve():
        given.append(f"--out {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return "".join(" " + g for g in given)


def report(results: dict, labels: list[str], args) -> str:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50_ms")} for k, v in results.items()}
    errors = sum(r["errors"] for v in results.values() for r in v)
    L = [f"""# hjserve against MLServer, KServe and a bare endpoint

Generated by `python bench/competitors.py{_flags(args)}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: the same
`digits_lse/1/model.onnx`, onnxruntime with one thread, batch 1, JSON; {args.passes} alternating passes of
{args.seconds:g} s per server and concurrency, medians. {platform.processor() or platform.machine()},
{os.cpu_count()} cores shared by the client and every server (load average at the end {os.getloadavg()[0]:.1f}).
Errors over all requests: {errors}. Setup and method: the module docstring.

**Throughput (requests/s) and p50 latency (ms)**

| server | """ + " | ".join(f"c={c} req/s | c={c} p50 ms" for c in CONCURRENCY) + " |",
         "|---|" + "---|---|" * len(CONCURRENCY)]
    for label in labels:
        L.append(f"| {label} | " + " | ".join(f"{med[(label, c)]['rps']:.0f} | {med[(label, c)]['p50_ms']:.2f}"
                                             for c in CONCURRENCY) + " |")
    ml, ks, four, graph, every, bare = labels
    L += ["", "**Ratios of throughput** (goal of issue 14: hjserve with all diagnostics >= 1.5x MLServer and KServe "
          "returning predictions only, and >= 0.5x the bare endpoint)", "",
          "| ratio | " + " | ".join(f"c={c}" for c in CONCURRENCY) + " |", "|---|" + "---|" * len(CONCURRENCY)]
    for num, den in ((four, ml), (four, ks), (graph, ml), (graph, ks), (every, ml), (every, ks), (every, bare)):
        L.append(f"| {num} / {den} | " + " | ".join(f"{med[(num, c)]['rps'] / med[(den, c)]['rps']:.2f}x"
                                                   for c in CONCURRENCY) + " |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
