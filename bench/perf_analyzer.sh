#!/usr/bin/env bash
# Concurrency sweep of a running (or self-started) hjserve with Triton's perf_analyzer; writes
# latency percentiles and throughput to eval/perf_analyzer.md.
#
#   bash bench/perf_analyzer.sh                  # start hjserve on $PORT with $MODEL_REPO, sweep, stop it
#   URL=127.0.0.1:8000 bash bench/perf_analyzer.sh   # sweep an already running server (not stopped)
#
# Settings (environment): MODEL (digits_lse), PORT (8765), URL, MODEL_REPO (eval/.cache/perf_models;
# built with `python -m hjmodel.demo --only $MODEL` if missing), CONCURRENCY ("1 2 4 8 16"),
# INTERVAL_MS (3000), STABILITY (30 %), MAX_TRIALS (10), PERF_VENV (.venv-perf; installed by ../shared/tools/install-perf-analyzer.sh:
# tritonclient 2.51 wheel with its perf_analyzer binary, libb64 via apt), PY (.venv/bin/python).
# Inputs are real digits rows from a JSON data file (perf_analyzer's random bytes decode to absurd floats).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=${PY:-$root/.venv/bin/python}
MODEL=${MODEL:-digits_lse}
PORT=${PORT:-8765}
MODEL_REPO=${MODEL_REPO:-$root/eval/.cache/perf_models}
CONCURRENCY=${CONCURRENCY:-"1 2 4 8 16"}
INTERVAL_MS=${INTERVAL_MS:-3000}
PERF_VENV=${PERF_VENV:-$root/.venv-perf}
INSTALLER=${INSTALLER:-$root/../shared/tools/install-perf-analyzer.sh}
OUT_MD=${OUT_MD:-$root/eval/perf_analyzer.md}
work=$(mktemp -d)
server_pid=""
cleanup() { if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi; rm -rf "$work"; }
trap cleanup EXIT

# 1. perf_analyzer
if [ ! -x "$PERF_VENV/bin/perf_analyzer" ] || [ ! -f "$PERF_VENV/perf-env.sh" ]; then
  bash "$INSTALLER" "$PERF_VENV"
fi
# shellcheck disable=SC1091
. "$PERF_VENV/perf-env.sh"
pa_version=$(perf_analyzer --version 2>&1 | head -1 || true)

# 2. the server
if [ -z "${URL:-}" ]; then
  URL=127.0.0.1:$PORT
  if [ ! -d "$MODEL_REPO/$MODEL" ]; then
    "$PY" -m hjmodel.demo --out "$MODEL_REPO" --only "$MODEL"
  fi
  "$PY" -m service --model-repository "$MODEL_REPO" --host 127.0.0.1 --port "$PORT" --log-level warning \
    >"$work/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 120); do
    curl -sf "http://$URL/v2/health/ready" >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || { echo "hjserve exited:" >&2; cat "$work/server.log" >&2; exit 1; }
    sleep 0.5
  done
fi
curl -sf "http://$URL/v2/models/$MODEL/ready" >/dev/null || { echo "model $MODEL not ready at $URL" >&2; exit 1; }
config=$(curl -sf "http://$URL/v2/models/$MODEL/config")

# 3. input data: real rows of the dataset, and the in-process baseline (same artifact, no HTTP)
"$PY" - "$work/data.json" "$work/inproc.txt" "$URL" "$MODEL" "$MODEL_REPO" <<'PYEOF'
import json, sys, time, urllib.request
from pathlib import Path
import numpy as np, torch
data_path, inproc_path, url, model, repo = sys.argv[1:6]
cfg = json.load(urllib.request.urlopen(f"http://{url}/v2/models/{model}/config"))
d = cfg["input"][0]["dims"][-1]
from sklearn.datasets import load_digits
X = load_digits().data[:64].astype(np.float32)
if X.shape[1] != d:  # another model: rows around zero of the right width
    X = np.random.default_rng(0).normal(size=(64, d)).astype(np.float32)
Path(data_path).write_text(json.dumps({"data": [{"input": {"content": r.tolist(), "shape": [d]}} for r in X]}))
line = "in-process baseline: not measured (model directory not local)"
vdir = Path(repo) / model
if vdir.is_dir():
    from hjmodel.artifact import load_serving_module
    torch.set_num_threads(1)
    version = sorted(p for p in vdir.iterdir() if p.name.isdigit())[-1]
    m = load_serving_module(version)
    x1, tau = torch.as_tensor(X[:1]), torch.tensor([0.1], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(20): m(x1, tau)
        ts = []
        for _ in range(300):
            t0 = time.perf_counter(); m(x1, tau); ts.append(time.perf_counter() - t0)
    ts = np.array(ts) * 1e6
    line = (f"in-process baseline (torch serving module, batch 1, 1 thread, no HTTP): "
            f"p50 {np.percentile(ts, 50):.0f} us, p99 {np.percentile(ts, 99):.0f} us")
Path(inproc_path).write_text(line)
PYEOF

# 4. the sweep
for c in $CONCURRENCY; do
  echo "concurrency $c" >&2
  perf_analyzer -m "$MODEL" -u "$URL" -i http --concurrency-range "$c:$c" --input-data "$work/data.json" \
    -p "$INTERVAL_MS" --max-trials "${MAX_TRIALS:-10}" -s "${STABILITY:-30}" -f "$work/c$c.csv" >"$work/c$c.log" 2>&1 || {
    # perf_analyzer aborts after measuring when the server's statistics are inconsistent (e.g. compute
    # input/infer/output counts differ); the client-side numbers are in its log: keep them, say so
    if grep -q "p99 latency" "$work/c$c.log"; then
      echo "perf_analyzer exited abnormally at concurrency $c: $(grep -m1 'what()' "$work/c$c.log" || tail -1 "$work/c$c.log")" >&2
      grep -m1 "what()" "$work/c$c.log" >"$work/c$c.err" || tail -1 "$work/c$c.log" >"$work/c$c.err"
    else
      echo "perf_analyzer failed at concurrency $c:" >&2; tail -20 "$work/c$c.log" >&2; exit 1
    fi; }
done

# 5. the report
"$PY" - "$work" "$OUT_MD" "$MODEL" "$URL" "$pa_version" "$config" "$CONCURRENCY" <<'PYEOF'
import csv, datetime, json, os, platform, sys
from pathlib import Path
work, out, model, url, pa, config, conc = sys.argv[1:8]
cfg = json.loads(config)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
import re
rows, notes = [], []
for c in conc.split():
    csv_path = Path(work) / f"c{c}.csv"
    if csv_path.exists():
        with open(csv_path) as fh:
            r = next(csv.DictReader(fh))
        if "Avg latency" not in r:  # the CSV has the percentiles; the mean is in the log
            r["Avg latency"] = re.findall(r"Avg latency: ([0-9]+) usec", (Path(work) / f"c{c}.log").read_text())[-1]
        server = sum(float(r.get(k, 0) or 0) for k in ("Server Queue", "Server Compute Input",
                                                       "Server Compute Infer", "Server Compute Output")) / 1000.0
        server = f"{server:.2f}"
    else:  # client-side numbers from the log (perf_analyzer aborted on the server statistics)
        log = (Path(work) / f"c{c}.log").read_text()
        grab = lambda pat: re.findall(pat, log)[-1]
        r = {"Inferences/Second": grab(r"Throughput: ([0-9.]+) infer/sec"),
             **{f"p{q} latency": grab(rf"p{q} latency: ([0-9]+) usec") for q in (50, 90, 95, 99)},
             "Avg latency": grab(r"Avg latency: ([0-9]+) usec")}
        server = "n/a"
        notes.append(f"concurrency {c}: perf_analyzer aborted after measuring ("
                     + (Path(work) / f"c{c}.err").read_text().strip() + "); client-side numbers from its log")
    us = lambda k: float(r[k]) / 1000.0
    rows.append(f"| {c} | {float(r['Inferences/Second']):.1f} | {us('p50 latency'):.2f} | {us('p90 latency'):.2f} | "
                f"{us('p95 latency'):.2f} | {us('p99 latency'):.2f} | {us('Avg latency'):.2f} | {server} |")
lines = [
    "# perf_analyzer concurrency sweep\n",
    f"Generated by `bash bench/perf_analyzer.sh` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; "
    f"{cpu}, {os.cpu_count()} logical cores visible, shared by client and server and other jobs (absolute numbers "
    f"are indicative; compare across rows; load average at the end {os.getloadavg()[0]:.1f}). "
    f"{pa}; HTTP, binary tensors, batch 1 per request, real digits rows as input; model `{model}` "
    f"({cfg.get('backend')} backend on {cfg.get('parameters', {}).get('device', {}).get('string_value', '?')}, "
    f"server max_batch_size {cfg.get('max_batch_size')}, max queue delay "
    f"{cfg.get('dynamic_batching', {}).get('max_queue_delay_microseconds')} us) at {url}.\n",
    "Baselines: concurrency 1 (first row) for scaling, and the same artifact called in-process without HTTP:\n",
    "- " + (Path(work) / "inproc.txt").read_text().strip() + "\n",
    "| concurrency | infer/s | p50 ms | p90 ms | p95 ms | p99 ms | mean ms | server-side ms (queue+compute, from stats) |",
    "|---|---|---|---|---|---|---|---|",
    *rows,
    *(["", "Notes:", *[f"- {n}" for n in notes]] if notes else []),
]
Path(out).write_text("\n".join(lines) + "\n")
print(Path(out).read_text())
PYEOF
