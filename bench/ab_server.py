"""The served request path of this tree against an earlier revision, side by side on this machine.

    python bench/ab_server.py --base REV [--model-dir models/digits_lse/1] [--seconds 4] [--passes 3]
        -> bench/results/ab_server.md

The earlier revision is checked out into a temporary git worktree; both servers (``python -m
service``, onnxruntime with one thread) serve the same model version from one repository, one at a
time, alternating ``--passes`` times; each is driven by ``bench/loadgen.py``'s closed loop at
concurrency 1 and 4 with the server's four default outputs and with every output
(``diagnostics: true``). Cells are medians over passes and the ratio is this tree's over the base's,
so machine noise shared by both cancels as far as alternation allows. Only the service code differs:
both run this tree's Python environment and the same artifact (built by this tree).
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

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import closed_loop, request_bytes  # noqa: E402
from service.testing import free_port, stop_process  # noqa: E402

OUT = ROOT / "bench" / "results" / "ab_server.md"
CONCURRENCY = (1, 4)


def serve(tree: Path, repo: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HJSERVE_")}
    env.update({"HJSERVE_INTRA_OP_THREADS": "1", "PYTHONPATH": str(tree)})
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", "--model-repository", str(repo), "--host",
                                 "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"{tree}: the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the git revision to compare with")
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "digits_lse" / "1"))
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "service"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip())
    version = Path(args.model_dir).resolve()
    name = version.parent.name
    spec = json.loads((version / "model.json").read_text())
    row = np.abs(np.random.default_rng(0).standard_normal(spec["n_features"])).astype(np.float32).tolist()
    inp = [{"name": "input", "shape": [1, len(row)], "datatype": "FP32", "data": row}]
    bodies = {"four default outputs": {"inputs": inp},
              "every output (diagnostics: true)": {"inputs": inp, "parameters": {"diagnostics": True}}}
    path = f"/v2/models/{name}/infer"
    results: dict[tuple[str, str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        repo = tmp / "repo"
        shutil.copytree(version, repo / name / "1")
        worktree = tmp / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(worktree), base], cwd=ROOT, check=True)
        try:
            trees = {f"base {base}": worktree, f"this tree ({head}{' + changes' if dirty else ''})": ROOT}
            for p in range(args.passes):
                for label, tree in (trees.items() if p % 2 == 0 else reversed(trees.items())):
                    proc, port = serve(tree, repo, tmp / "server.log")
                    try:
                        for body_label, body in bodies.items():
                            payload = request_bytes(f"127.0.0.1:{port}", path, json.dumps(body).encode())
                            for c in CONCURRENCY:
                                r = asyncio.run(closed_loop("127.0.0.1", port, payload, args.seconds, c))
                                if r["errors"]:
                                    raise RuntimeError(f"{label}: {r['errors']} failed requests")
                                results.setdefault((label, body_label, c), []).append(r["rps"])
                                print(f"pass {p} {label} {body_label} c={c}: {r['rps']:.0f} req/s", flush=True)
                    finally:
                        stop_process(proc)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    labels = list(trees)
    L = [f"""# The served request path against an earlier revision

Generated by `python bench/ab_server.py --base {args.base}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}:
`{name}`, onnxruntime with one thread, batch 1, JSON, `bench/loadgen.py`'s closed loop, {args.passes}
alternating passes of {args.seconds:g} s per server, request and concurrency; medians. {platform.machine()},
{os.cpu_count()} cores shared by the client and the server (load average at the end {os.getloadavg()[0]:.1f}).

| request | concurrency | {labels[0]} req/s | {labels[1]} req/s | ratio |
|---|---|---|---|---|"""]
    for body_label in bodies:
        for c in CONCURRENCY:
            a, b = (statistics.median(results[(label, body_label, c)]) for label in labels)
            L.append(f"| {body_label} | {c} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")
    OUT.write_text("\n".join(L) + "\n")
    print(OUT.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
