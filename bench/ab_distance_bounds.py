"""The certificate's distance table (``functional.group_distance_bounds``) of this tree against an
earlier revision's, side by side in process. Writes ``bench/results/ab_distance_bounds.md``.

A memory head's Lipschitz and curvature constants are maxima of |w_i - w_j|^2 over its support
points, group by group (``functional.certificate_tables``); they are computed when a model is built
and again whenever one is loaded through torch (``hjmodel.load_model``, the torch backend), so at
N = 60,000 support points they were most of a model's load time (``bench/results/scaling.md``,
*load s*). The earlier revision's ``hjmodel/functional.py`` is read from git and run as a module of
its own, on the same weights, one thread each, in alternating rounds (``--repeats``; one round at
the largest sizes, where a call takes minutes). Synthetic weights: N rows N(0, 1) in p dimensions,
10 groups at random (a 10-class memory head's classes). Besides the times, the largest relative
difference between the two tables: both are upper bounds within ~1e-13 of the exact maximum.

Usage: ``python bench/ab_distance_bounds.py --base REV [--sizes 5000,20000,60000] [--dims 64,784]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from hjmodel import functional  # noqa: E402
from service.settings import split_names  # noqa: E402

OUT = ROOT / "bench" / "results" / "ab_distance_bounds.md"
GROUPS = 10


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the git revision to compare with")
    ap.add_argument("--sizes", default="5000,20000,60000")
    ap.add_argument("--dims", default="64,784")
    ap.add_argument("--repeats", type=int, default=3, help="rounds where one call takes under 30 s")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = report.module_at(args.base, "hjmodel/functional.py")
    head = report.revision()
    start, rows = time.perf_counter(), []
    for p in map(int, split_names(args.dims)):
        for n in map(int, split_names(args.sizes)):
            gen = torch.Generator().manual_seed(n + p)
            W = torch.randn(n, p, generator=gen, dtype=torch.float64)
            group = torch.randint(0, GROUPS, (n,), generator=gen)
            times: dict[str, list[float]] = {"base": [], "this": []}
            tables = {}
            for r in range(args.repeats):
                for key, fn in (("base", base.group_distance_bounds), ("this", functional.group_distance_bounds)):
                    t = time.perf_counter()
                    tables[key] = fn(W, group, GROUPS)
                    times[key].append(time.perf_counter() - t)
                if r == 0 and times["base"][0] > 30:
                    break
            a, b = tables["base"], tables["this"]
            rel = float(((a - b).abs() / a.clamp_min(torch.finfo(a.dtype).tiny)).max())
            rows.append((n, p, statistics.median(times["base"]), statistics.median(times["this"]), rel,
                         len(times["this"])))
            print(rows[-1], flush=True)
    report.write(args.out, "The certificate's distance table, side by side with an earlier revision",
                 f"python bench/ab_distance_bounds.py --base {args.base}", start,
                 f"torch {torch.__version__}, one thread; this tree at {head}; {GROUPS} groups; "
                 "what is timed: the module docstring.",
                 ("N", "p", f"{args.base} s", "this tree s", "this tree / base", "largest relative difference",
                  "rounds"),
                 ((str(n), str(p), f"{ta:.2f}", f"{tb:.2f}", f"{tb / ta:.3f}x", f"{rel:.1e}", str(k))
                  for n, p, ta, tb, rel, k in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
