"""Run every benchmark, one after another, each writing its results file under bench/results/.

    python -m bench.run_all [--models DIR]

Each benchmark compares against its baseline inside its own run (ratios, not absolute times)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=str(ROOT / "models"), help="demo model repository")
    args = ap.parse_args()
    runs = [
        ["bench/hjmodel_bench.py", "--models", args.models],
        ["bench/graph_profile.py", "--models", args.models],
        ["bench/session_threads.py", "--models", args.models],
        ["bench/hjmodel_eval.py", "--models", args.models],
        ["bench/service_bench.py", "--model-dir", str(Path(args.models) / "digits_lse" / "1")],
        ["bench/request_path.py", "--model-dir", str(Path(args.models) / "digits_lse" / "1")],
        ["bench/loop_work.py", "--model-dir", str(Path(args.models) / "digits_lse" / "1")],
        ["bench/distributed_bench.py", "--model-dir", str(Path(args.models) / "digits_lse" / "1")],
    ]
    failed = 0
    for script, *rest in runs:
        print(f"== {script}", flush=True)
        failed += subprocess.run([sys.executable, str(ROOT / script), *rest], cwd=ROOT).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
