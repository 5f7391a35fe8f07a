#!/usr/bin/env bash
# Concurrency sweep of a running (or self-started) hjserve with Triton's perf_analyzer over REST and
# gRPC, the two protocols alternating at each concurrency (side by side, same server, same rows);
# writes latency percentiles, throughput and the gRPC / REST ratio to eval/perf_analyzer.md.
#
#   bash bench/perf_analyzer.sh                  # start hjserve on $PORT with $MODEL_REPO, sweep, stop it
#   URL=127.0.0.1:8000 GRPC_URL=127.0.0.1:8001 bash bench/perf_analyzer.sh   # an already running server
#
# Settings (environment): MODEL (digits_lse), PORT (8765), GRPC_PORT (8766), URL, GRPC_URL, PROTOCOLS
# ("http grpc grpc-stream": REST, unary gRPC, and gRPC streams: perf_analyzer's --streaming), MODEL_REPO (eval/.cache/perf_models;
# built with `python -m hjmodel.demo --only $MODEL` if missing), CONCURRENCY ("1 2 4 8 16"),
# INTERVAL_MS (3000), STABILITY (30 %), MAX_TRIALS (10), PERF_VENV (.venv-perf; installed by bench/install_perf_analyzer.sh:
# tritonclient 2.51 wheel with its perf_analyzer binary, libb64 via apt), PY (.venv/bin/python).
# Inputs are real digits rows from a JSON data file (perf_analyzer's random bytes decode to absurd floats).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=${PY:-$root/.venv/bin/python}
MODEL=${MODEL:-digits_lse}
PORT=${PORT:-8765}
GRPC_PORT=${GRPC_PORT:-8766}
PROTOCOLS=${PROTOCOLS:-"http grpc grpc-stream"}
MODEL_REPO=${MODEL_REPO:-$root/eval/.cache/perf_models}
CONCURRENCY=${CONCURRENCY:-"1 2 4 8 16"}
INTERVAL_MS=${INTERVAL_MS:-3000}
PERF_VENV=${PERF_VENV:-$root/.venv-perf}
INSTALLER=${INSTALLER:-$root/bench/install_perf_analyzer.sh}
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
  GRPC_URL=127.0.0.1:$GRPC_PORT
  if [ ! -d "$MODEL_REPO/$MODEL" ]; then
    "$PY" -m hjmodel.demo --out "$MODEL_REPO" --only "$MODEL"
  fi
  "$PY" -m service --model-repository "$MODEL_REPO" --host 127.0.0.1 --port "$PORT" --grpc-port "$GRPC_PORT" \
    --log-level warning \
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

# 4. the sweep: at each concurrency, every protocol in turn (side by side on the same server)
for c in $CONCURRENCY; do
  for proto in $PROTOCOLS; do
    echo "concurrency $c, $proto" >&2
    target=$URL; extra=()
    case $proto in grpc|grpc-stream) target=${GRPC_URL:?set GRPC_URL for the gRPC sweep};; esac
    [ "$proto" = grpc-stream ] && extra=(--streaming)
    run="$work/$proto-c$c"
    perf_analyzer -m "$MODEL" -u "$target" -i "${proto%-stream}" "${extra[@]}" --concurrency-range "$c:$c" --input-data "$work/data.json" \
      -p "$INTERVAL_MS" --max-trials "${MAX_TRIALS:-10}" -s "${STABILITY:-30}" -f "$run.csv" >"$run.log" 2>&1 || {
      # perf_analyzer aborts after measuring when the server's statistics are inconsistent (e.g. compute
      # input/infer/output counts differ); the client-side numbers are in its log: keep them, say so
      if grep -q "p99 latency" "$run.log"; then
        echo "perf_analyzer exited abnormally at concurrency $c ($proto): $(grep -m1 'what()' "$run.log" || tail -1 "$run.log")" >&2
        grep -m1 "what()" "$run.log" >"$run.err" || tail -1 "$run.log" >"$run.err"
      else
        echo "perf_analyzer failed at concurrency $c ($proto):" >&2; tail -20 "$run.log" >&2; exit 1
      fi; }
  done
done

# 5. the report
"$PY" - "$work" "$OUT_MD" "$MODEL" "$URL" "$pa_version" "$config" "$CONCURRENCY" "$PROTOCOLS" <<'PYEOF'
import csv, datetime, json, os, platform, sys
from pathlib import Path
work, out, model, url, pa, config, conc, protocols = sys.argv[1:9]
protocols = protocols.split()
cfg = json.loads(config)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
import re
rows, notes, results = [], [], {}
for c, proto in ((c, p) for c in conc.split() for p in protocols):
    run = Path(work) / f"{proto}-c{c}"
    csv_path = run.with_suffix(".csv")
    if csv_path.exists():
        with open(csv_path) as fh:
            r = next(csv.DictReader(fh))
        if "Avg latency" not in r:  # the CSV has the percentiles; the mean is in the log
            r["Avg latency"] = re.findall(r"Avg latency: ([0-9]+) usec", run.with_suffix(".log").read_text())[-1]
        server = sum(float(r.get(k, 0) or 0) for k in ("Server Queue", "Server Compute Input",
                                                       "Server Compute Infer", "Server Compute Output")) / 1000.0
        server = f"{server:.2f}"
    else:  # client-side numbers from the log (perf_analyzer aborted on the server statistics)
        log = run.with_suffix(".log").read_text()
        grab = lambda pat: re.findall(pat, log)[-1]
        r = {"Inferences/Second": grab(r"Throughput: ([0-9.]+) infer/sec"),
             **{f"p{q} latency": grab(rf"p{q} latency: ([0-9]+) usec") for q in (50, 90, 95, 99)},
             "Avg latency": grab(r"Avg latency: ([0-9]+) usec")}
        server = "n/a"
        notes.append(f"concurrency {c} ({proto}): perf_analyzer aborted after measuring ("
                     + run.with_suffix(".err").read_text().strip() + "); client-side numbers from its log")
    us = lambda k: float(r[k]) / 1000.0
    results[(c, proto)] = (float(r["Inferences/Second"]), us("p50 latency"))
    label = {"http": "REST", "grpc": "gRPC", "grpc-stream": "gRPC stream"}.get(proto, proto)
    rows.append(f"| {c} | {label} | {float(r['Inferences/Second']):.1f} | {us('p50 latency'):.2f} | {us('p90 latency'):.2f} | "
                f"{us('p95 latency'):.2f} | {us('p99 latency'):.2f} | {us('Avg latency'):.2f} | {server} |")
compare = []
if {"http", "grpc"} <= set(protocols):
    compare = ["", "gRPC against REST at each concurrency (same server, same rows, run back to back):", "",
               "| concurrency | REST infer/s | gRPC infer/s | gRPC / REST throughput | REST p50 ms | gRPC p50 ms |",
               "|---|---|---|---|---|---|"]
    for c in conc.split():
        (th, lh), (tg, lg) = results[(c, "http")], results[(c, "grpc")]
        compare.append(f"| {c} | {th:.1f} | {tg:.1f} | {tg / th:.2f}x | {lh:.2f} | {lg:.2f} |")
if {"grpc", "grpc-stream"} <= set(protocols):
    compare += ["", "A gRPC stream (ModelStreamInfer: perf_analyzer's `--streaming`, the same number of requests outstanding) against unary "
                "ModelInfer calls at each concurrency:", "",
                "| concurrency | gRPC infer/s | gRPC stream infer/s | stream / unary throughput | gRPC p50 ms | stream p50 ms |",
                "|---|---|---|---|---|---|"]
    for c in conc.split():
        (tu, lu), (ts, ls) = results[(c, "grpc")], results[(c, "grpc-stream")]
        compare.append(f"| {c} | {tu:.1f} | {ts:.1f} | {ts / tu:.2f}x | {lu:.2f} | {ls:.2f} |")
lines = [
    "# perf_analyzer concurrency sweep\n",
    f"Generated by `bash bench/perf_analyzer.sh` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; "
    f"{cpu}, {os.cpu_count()} logical cores visible, shared by client and server and other jobs (absolute numbers "
    f"are indicative; compare across rows; load average at the end {os.getloadavg()[0]:.1f}). "
    f"{pa}; REST (HTTP, binary tensors) and gRPC (raw contents; unary, and over ModelStreamInfer streams), batch 1 per request, real digits rows as "
    f"input, the protocols alternating at each concurrency; model `{model}` "
    f"({cfg.get('backend')} backend on {cfg.get('parameters', {}).get('device', {}).get('string_value', '?')}, "
    f"server max_batch_size {cfg.get('max_batch_size')}, max queue delay "
    f"{cfg.get('dynamic_batching', {}).get('max_queue_delay_microseconds')} us) at {url}.\n",
    "Baselines: concurrency 1 (first row) for scaling, and the same artifact called in-process without HTTP:\n",
    "- " + (Path(work) / "inproc.txt").read_text().strip() + "\n",
    "| concurrency | protocol | infer/s | p50 ms | p90 ms | p95 ms | p99 ms | mean ms | server-side ms (queue+compute, from stats) |",
    "|---|---|---|---|---|---|---|---|---|",
    *rows,
    *compare,
    *(["", "Notes:", *[f"- {n}" for n in notes]] if notes else []),
]
Path(out).write_text("\n".join(lines) + "\n")
print(Path(out).read_text())
PYEOF
