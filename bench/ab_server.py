"""The served request path of this tree against an earlier revision, side by side on this machine.

    python bench/ab_server.py --base REV [--model-dir models/digits_lse/1 ...] [--seconds 4] [--passes 3]
                              [--export] [--protocol rest|grpc|stream|batch|large] [--intra-op-threads 1]
                              [--outputs prediction,probabilities] [--concurrency 1 4]
                              [--out bench/results/ab_server.md]
        -> bench/results/ab_server.md (a section per model version)
    python bench/ab_server.py --backends [...] --out bench/results/ab_server_backends.md
    python bench/ab_server.py --versus pruned_graphs=0 [...]
    python bench/ab_server.py --versus torch_static_rows=0 --backend torch [...]
    python bench/ab_server.py --tls [--protocol grpc] [...] --out bench/results/ab_server_tls.md

With ``--backends`` the two sides are this tree's two backends instead (``HJSERVE_BACKEND=onnx``
against ``torch``, which serves the model's TorchScript trace), on the same artifact: what choosing
the torch backend costs a served request. With ``--versus NAME=VALUE`` both sides are this tree and
the first runs with the setting ``HJSERVE_NAME=VALUE`` (e.g. ``pruned_graphs=0``): what one setting
changes, with no other difference. With ``--tls`` both sides are this tree and the second serves TLS
(``HJSERVE_TLS_CERT_FILE`` / ``_KEY_FILE``, a test certificate made with openssl for the run; the
load generator's connections are TLS too, kept alive as the plaintext ones are): what TLS costs.

The earlier revision is checked out into a temporary git worktree; both servers (``python -m
service``, onnxruntime with one thread unless ``--intra-op-threads`` says otherwise) serve the same
model version from one repository, one at a time, alternating ``--passes`` times; each is driven by ``bench/loadgen.py``'s closed loop at
concurrency 1 and 4 (``--concurrency``) with the server's four default outputs and with every output
(``diagnostics: true``), and with ``--outputs`` a third request naming those outputs. Cells are medians over passes and the ratio is this tree's over the base's,
so machine noise shared by both cancels as far as alternation allows. Only the service code differs:
both run this tree's Python environment and the same artifact (built by this tree). With
``--export`` each tree serves the graphs its own exporter writes from the same trained artifact
(``model.pt``, as ``bench/ab_graph.py`` does), so the service and the graphs both differ: the whole
effect of a revision on a served request. With ``--protocol grpc`` the same requests go as
``ModelInfer`` calls (raw input contents) through ``bench/loadgen.py``'s gRPC loop (grpcio's asyncio
client: heavier than the raw-socket HTTP client, and on the same two cores, so it dilutes a
server-side difference rather than inflating it); with ``--protocol stream`` as ``ModelStreamInfer``
messages, one stream per worker, each awaiting its answer before the next (:func:`stream_loop`). With ``--protocol batch`` each server runs
batch-attribution jobs instead (``bench/loadgen.py``'s :func:`batch_job`: 20,000 V2 binary rows in,
NDJSON out, in the row and the column layout), repeated for ``--seconds``, in rows/s; and the latency
of online requests (the closed loop at concurrency 1, four default outputs) while row-layout jobs
run back to back, p50 and p99 in ms (the ratio: lower is better there). With ``--protocol large``
each server answers one online V2 request of 20,000 rows (``--rows``) at a time, repeated for
``--seconds``: seconds per request, binary input and outputs with the four default outputs and with
every output, and JSON both ways with the four default outputs (lower is better); then the closed
loop of small online requests at concurrency 1 while such large requests (binary, then JSON) run
back to back, as the share of them answered 200 (the rest: 503, a full queue) and p99 in ms: whether
one client's large request locks the model's other clients out, by filling its queue or by holding
the event loop while its body is decoded.
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ab_graph import export_with  # noqa: E402
from bench.loadgen import (  # noqa: E402
    batch_job,
    batch_throughput,
    grpc_loop,
    large_body,
    large_request,
    post_loop,
    stream_loop,
)
from service.settings import split_names  # noqa: E402
from service.testing import run_server  # noqa: E402

OUT = ROOT / "bench" / "results" / "ab_server.md"
CONCURRENCY = (1, 4)
#: the gRPC protocols: the closed loop and the method it calls
GRPC_LOOPS = {"grpc": (grpc_loop, "/inference.GRPCInferenceService/ModelInfer"),
              "stream": (stream_loop, "/inference.GRPCInferenceService/ModelStreamInfer")}
BATCH_ROWS = 20_000
LAYOUTS = ("rows", "columns")


def _large_seconds(url: str, name: str, body: tuple[bytes, dict[str, str]], rows: int, seconds: float) -> float:
    """The median seconds of back-to-back :func:`large_request` calls of ``body`` for at least
    ``seconds`` (and three calls), after one warm-up call."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as client:
        large_request(client, name, body, rows)
        times, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(times) < 3:
            times.append(large_request(client, name, body, rows))
    return statistics.median(times)


def _online_during_jobs(url: str, name: str, x: np.ndarray, body: bytes, seconds: float,
                        large: tuple[bytes, dict[str, str]] | None = None) -> dict:
    """The closed loop's result at concurrency 1 (online requests) while a thread runs row-layout
    batch jobs on ``x`` back to back (``large``: online requests of all of ``x``, this body of
    :func:`large_body`). A job that fails fails the measurement: online requests measured without
    the load would read as a gain."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    stop = False

    def jobs() -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            while not stop:
                if large:
                    large_request(client, name, large, len(x))
                else:
                    batch_job(client, name, x, "rows")

    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(jobs)
        try:
            time.sleep(0.5)   # the first job under way
            result = asyncio.run(post_loop(url, f"/v2/models/{name}/infer", body, seconds, 1))
        finally:
            stop = True
        load.result()          # re-raises the load thread's failure
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="the git revision to compare with")
    ap.add_argument("--backends", action="store_true",
                    help="instead of a revision: this tree's torch backend against its onnxruntime backend")
    ap.add_argument("--versus", metavar="NAME=VALUE",
                    help="this tree against itself with one setting changed (HJSERVE_NAME=VALUE) on the first side")
    ap.add_argument("--tls", action="store_true",
                    help="this tree serving TLS (a test certificate) against itself in plaintext")
    ap.add_argument("--model-dir", nargs="+", default=[str(ROOT / "models" / "digits_lse" / "1")],
                    help="one or more model versions, each compared in turn (a section of the report each)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--export", action="store_true", help="each tree serves the graphs its exporter writes")
    ap.add_argument("--protocol", choices=("rest", "grpc", "stream", "batch", "large"), default="rest")
    ap.add_argument("--backend", choices=("auto", "onnx", "torch"), default="auto",
                    help="the backend both sides serve with (--base, --versus): HJSERVE_BACKEND")
    ap.add_argument("--intra-op-threads", type=int, default=1,
                    help="the servers' HJSERVE_INTRA_OP_THREADS (0: onnxruntime's default, one per core)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY),
                    help="closed-loop concurrencies (REST and gRPC)")
    ap.add_argument("--outputs", help="comma-separated output names: one more request naming them (REST)")
    ap.add_argument("--rows", type=int, default=BATCH_ROWS,
                    help="rows of a batch job (--protocol batch) or of a large request (--protocol large)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if args.outputs and args.protocol != "rest":
        ap.error("--outputs names the outputs of a REST request")
    if sum(map(bool, (args.base, args.backends, args.versus, args.tls))) != 1:
        ap.error("give one of --base REV, --backends, --versus NAME=VALUE, --tls")
    if args.tls and args.protocol in ("batch", "large"):
        ap.error("--tls measures the closed loops (--protocol rest or grpc)")
    if args.backends and args.backend != "auto":
        ap.error("--backends serves through both backends; --backend is for --base and --versus")
    base = args.base and subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True,
                                        capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "service", *(["hjmodel"] if args.export else [])],
                                cwd=ROOT, capture_output=True, text=True).stdout.strip())
    sections = [_compare(args, Path(model_dir).resolve(), base, head, dirty) for model_dir in args.model_dir]
    Path(args.out).write_text("\n\n".join(sections) + "\n")
    print(Path(args.out).read_text())
    return 0


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _compare(args: argparse.Namespace, version: Path, base: str, head: str, dirty: bool) -> str:
    """Both servers side by side on one model version; the report's section for it."""
    name = version.parent.name
    spec = json.loads((version / "model.json").read_text())
    row = np.abs(np.random.default_rng(0).standard_normal(spec["n_features"])).astype(np.float32).tolist()
    inp = [{"name": "input", "shape": [1, len(row)], "datatype": "FP32", "data": row}]
    bodies = {"four default outputs": {"inputs": inp},
              "every output (diagnostics: true)": {"inputs": inp, "parameters": {"diagnostics": True}}}
    if args.outputs:   # REST only: one more request, naming these outputs
        names = split_names(args.outputs)
        bodies[" + ".join(names)] = {"inputs": inp, "outputs": [{"name": n} for n in names]}
    path = f"/v2/models/{name}/infer"
    if args.protocol in GRPC_LOOPS:
        from service.grpc import inference_pb2 as pb

        def message(diagnostics: bool) -> bytes:
            request = pb.ModelInferRequest(model_name=name)
            request.inputs.add(name="input", datatype="FP32", shape=[1, len(row)])
            request.raw_input_contents.append(np.asarray([row], np.float32).tobytes())
            if diagnostics:
                request.parameters["diagnostics"].bool_param = True
            return request.SerializeToString()

        messages = {label: message("parameters" in body) for label, body in bodies.items()}
    batch_x = np.abs(np.random.default_rng(1).standard_normal((args.rows, spec["n_features"]))).astype(np.float32) * 3
    during = "online request (c=1, four default outputs) during row-layout batch jobs"
    large_bodies = {"binary, four default outputs": (batch_x, False, True),
                    "binary, every output (diagnostics: true)": (batch_x, True, True),
                    "JSON, four default outputs": (batch_x, False, False)} if args.protocol == "large" else {}
    large_bodies = {label: large_body(*how) for label, how in large_bodies.items()}
    if args.protocol == "large":
        durings = {f"online request (c=1, four default outputs) during {args.rows:,}-row {how} requests": how
                   for how in ("binary", "JSON")}
        cells = [(f"one {args.rows:,}-row request, {label}", "s") for label in large_bodies] + [
            (during, unit) for during in durings for unit in ("answered %", "p99 ms")]
    elif args.protocol == "batch":
        cells = [(f"batch job, layout={layout}", "rows/s") for layout in LAYOUTS] + [(during, "p50 ms"),
                                                                                    (during, "p99 ms")]
    else:
        cells = [(label, c) for label in bodies for c in args.concurrency]
    results: dict[tuple[str, str, int], list[float]] = {}
    this = f"this tree ({head}{' + changes' if dirty else ''})"
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        worktree = tmp / "base"
        extra: dict[str, dict[str, object]] = {}   # more settings of a side
        client_context = grpc_credentials = None     # the client side of --tls
        if args.backends:   # one tree, two backends
            trees = {f"onnxruntime backend, {this}": ROOT, "torch backend (TorchScript trace)": ROOT}
            backend = dict(zip(trees, ("onnx", "torch")))
        elif args.tls:   # one tree; the first side serving TLS
            sys.path.insert(0, str(ROOT / "tests" / "service"))
            from svc_helpers import client_tls, make_pki

            pki = make_pki(Path(tempfile.mkdtemp(dir=tmp)))
            trees = {f"{this}, plaintext": ROOT, f"{this}, TLS": ROOT}   # the ratio: TLS over plaintext
            backend = dict.fromkeys(trees, args.backend)
            extra = {f"{this}, TLS": {"tls_cert_file": pki / "server.pem", "tls_key_file": pki / "server.key"}}
            client_context = client_tls(pki)
            import grpc

            grpc_credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
        elif args.versus:   # one tree; the first side with one setting changed
            key, _, value = args.versus.partition("=")
            trees = {f"{this}, HJSERVE_{key.upper()}={value}": ROOT, this: ROOT}
            backend = dict.fromkeys(trees, args.backend)
            extra = {next(iter(trees)): {key: value}}
        else:
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(worktree), base], cwd=ROOT, check=True)
            trees = {f"base {base}": worktree, this: ROOT}
            backend = dict.fromkeys(trees, args.backend)
        try:
            # one repository for both, or (--export) one per tree with its own graphs
            repos = {label: tmp / (f"repo{i}" if args.export else "repo") for i, label in enumerate(trees)}
            for label, tree in trees.items():
                target = repos[label] / name / "1"
                if not target.exists():
                    shutil.copytree(version, target)
                    if args.export:
                        export_with(tree, version, target / "model.onnx")
            for p in range(args.passes):
                for label, tree in (trees.items() if p % 2 == 0 else reversed(trees.items())):
                    settings = {"intra_op_threads": args.intra_op_threads, **extra.get(label, {})}
                    tls = "tls_cert_file" in settings
                    with run_server(repos[label], tmp, root=tree, grpc=args.protocol in GRPC_LOOPS, backend=backend[label],
                                    tls_context=client_context if tls else None, **settings) as server:
                        for body_label, c in cells:
                            if c == "s":
                                rps = _large_seconds(server.url, name, large_bodies[body_label.split(", ", 1)[1]],
                                                     args.rows, args.seconds)
                            elif c == "answered %":
                                load = large_bodies[f"{durings[body_label]}, four default outputs"]
                                r = _online_during_jobs(server.url, name, batch_x, json.dumps(bodies[
                                    "four default outputs"]).encode(), args.seconds, large=load)
                                rps = 100.0 * (r["n"] - r["errors"]) / r["n"]
                                results.setdefault((label, body_label, "p99 ms"), []).append(r["p99_ms"])
                            elif c == "p50 ms":
                                r = _online_during_jobs(server.url, name, batch_x, json.dumps(bodies[
                                    "four default outputs"]).encode(), args.seconds)
                                rps = r["p50_ms"]
                                results.setdefault((label, body_label, "p99 ms"), []).append(r["p99_ms"])
                            elif c == "p99 ms":
                                continue   # measured with p50
                            elif args.protocol == "batch":
                                rps = batch_throughput(server.url, name, batch_x, body_label.split("=")[-1], args.seconds)
                            else:
                                if args.protocol in GRPC_LOOPS:
                                    loop, method = GRPC_LOOPS[args.protocol]
                                    r = asyncio.run(loop(f"127.0.0.1:{server.grpc_port}", method,
                                                         messages[body_label], args.seconds, c,
                                                         credentials=grpc_credentials if tls else None))
                                else:
                                    r = asyncio.run(post_loop(server.url, path, json.dumps(bodies[body_label]).encode(),
                                                              args.seconds, c, tls=client_context if tls else None))
                                if r["errors"]:
                                    raise RuntimeError(f"{label}: {r['errors']} failed requests")
                                rps = r["rps"]
                            results.setdefault((label, body_label, c), []).append(rps)
                            print(f"pass {p} {label} {body_label} {c}: {rps:.1f}", flush=True)
        finally:
            if worktree.exists():
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    labels = list(trees)
    what = ("both serving this tree's artifact, through onnxruntime and through torch: only the backend differs"
            if args.backends else
            f"both this tree serving its artifact: only the setting {args.versus} differs" if args.versus else
            "both this tree serving its artifact: only TLS differs (the load generator's connections too); the "
            "ratio is TLS over plaintext"
            if args.tls else
            "each tree serving the graphs its own exporter writes from the same trained artifact" if args.export
            else "both serving this tree's artifact: only the service code differs")
    flags = ("--backends" if args.backends else f"--versus {args.versus}" if args.versus else "--tls" if args.tls
             else f"--base {args.base}")
    flags += (" --export" if args.export else "") + (f" --protocol {args.protocol}" if args.protocol != "rest" else "")
    if args.backend != "auto":
        flags += f" --backend {args.backend}"
    if args.intra_op_threads != 1:
        flags += f" --intra-op-threads {args.intra_op_threads}"
    if args.outputs:
        flags += f" --outputs {args.outputs}"
    if args.rows != BATCH_ROWS:
        flags += f" --rows {args.rows}"
    if args.model_dir != [str(ROOT / "models" / "digits_lse" / "1")]:
        flags += " --model-dir " + " ".join(_shown(Path(m)) for m in args.model_dir)
    if args.protocol == "large":
        method = (f"one online V2 request of {args.rows:,} rows at a time (binary or JSON), back to back "
                  f"for at least {args.seconds:g} s per server and request, then {args.seconds:g} s of batch-1 JSON "
                  "requests at concurrency 1 while such requests run")
        unit, key = "", "unit"
    elif args.protocol == "batch":
        method = (f"batch attribution, {args.rows:,} V2 binary rows per job in the server's default chunks, "
                  f"`bench/loadgen.py`'s `batch_job` back to back for at least {args.seconds:g} s per server and layout, "
                  f"then {args.seconds:g} s of online requests while row-layout jobs run")
        unit, key = "", "unit"
    else:
        how = {"grpc": "gRPC ModelInfer (raw contents)", "stream": "gRPC ModelStreamInfer, a stream per worker (raw contents)"}
        method = (f"batch 1, {how.get(args.protocol, 'JSON')}, "
                  f"`bench/loadgen.py`'s closed loop for {args.seconds:g} s per server, request and concurrency")
        unit, key = " req/s", "concurrency"
    threads = ("one thread" if args.intra_op_threads == 1 else "its default threads (one per core)"
               if args.intra_op_threads == 0 else f"{args.intra_op_threads} threads")
    if args.versus and args.versus.partition("=")[0].lower() == "intra_op_threads":
        threads += f" (the first side: HJSERVE_{args.versus.upper()})"
    title = ("through the torch backend against onnxruntime" if args.backends else
             f"with and without {args.versus}" if args.versus else "over TLS against plaintext" if args.tls
             else "against an earlier revision")
    runtime = (f"onnxruntime and torch with {threads}" if args.backends else
               f"torch (TorchScript trace) with {threads}" if args.backend == "torch" else f"onnxruntime with {threads}")
    L = [f"""# The served request path {title}: `{name}`

Generated by `python bench/ab_server.py {flags}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}:
`{name}`, {runtime}, {method}; {args.passes} alternating passes, medians. {platform.machine()},
{os.cpu_count()} cores shared by the client and the server (load average at the end {os.getloadavg()[0]:.1f});
{what}.

| request | {key} | {labels[0]}{unit} | {labels[1]}{unit} | ratio |
|---|---|---|---|---|"""]
    for body_label, c in cells:
        a, b = (statistics.median(results[(label, body_label, c)]) for label in labels)
        prec = 3 if c == "s" else 2 if "ms" in str(c) else 1 if "%" in str(c) else 0
        L.append(f"| {body_label} | {c} | {a:.{prec}f} | {b:.{prec}f} | {f'{b / a:.2f}x' if a else '-'} |")
    if args.protocol == "large":
        L.append("\nSeconds and p99: lower is better. Answered %: the online requests answered 200; the others got "
                 "503 (the model's queue full).")
    return "\n".join(L)


if __name__ == "__main__":
    raise SystemExit(main())
