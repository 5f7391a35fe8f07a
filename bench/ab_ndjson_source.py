"""The NDJSON batch source converting each line to its row of numbers as it is read (this tree's
``service.codecs.batch.ndjson_source``) against the source of a baseline commit, which held a chunk's
lines as parsed JSON and converted them together: in process, side by side. Writes
``bench/results/ab_ndjson_source.md``.

The change is for memory (a chunk of hostile lines held as Python objects took gigabytes;
``tests/service/test_request_memory.py``); this measures what it costs in speed and what it saves in
memory on real rows. Rows: ``--rows`` random float rows of d = 64 (the digits models) and d = 784 (MNIST's
size), printed as Python prints floats (17 significant digits), spooled in memory; each side reads the
whole body in chunks of 1,024 rows (``--repeats`` rounds of :func:`bench.report.alternate`). Memory:
the peak traced allocation (tracemalloc) while one side reads one chunk. Usage:
``python bench/ab_ndjson_source.py [--baseline 5e8e564] [--rows 20000] [--repeats 5]``.
"""

from __future__ import annotations

import io
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from service.codecs import batch  # noqa: E402

OUT = ROOT / "bench" / "results" / "ab_ndjson_source.md"
CHUNK = 1024


def _body(rows: int, d: int) -> bytes:
    x = np.random.default_rng(d).standard_normal((rows, d))
    return "".join("[" + ",".join(map(repr, row)) + "]\n" for row in x.tolist()).encode()


def _read_all(source, body: bytes) -> int:
    return sum(len(chunk) for chunk, _ in source(io.BytesIO(body), CHUNK, 10**9, 1 << 20))


def _chunk_peak(source, body: bytes) -> float:
    """MB traced at the peak while the first chunk is read."""
    tracemalloc.start()
    try:
        next(iter(source(io.BytesIO(body), CHUNK, 10**9, 1 << 20)))
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = report.arguments(__doc__, OUT, repeats=5)
    ap.add_argument("--baseline", default="5e8e564")
    ap.add_argument("--rows", type=int, default=20_000)
    args = ap.parse_args()
    started = time.perf_counter()
    old = report.module_at(args.baseline, "service/codecs/batch.py").ndjson_source
    new = batch.ndjson_source
    table = []
    for d in (64, 784):
        body = _body(args.rows, d)
        assert _read_all(old, body) == _read_all(new, body) == args.rows
        for (a, _), (b, _) in zip(old(io.BytesIO(body), CHUNK, 10**9, 1 << 20), new(io.BytesIO(body), CHUNK, 10**9, 1 << 20)):
            np.testing.assert_array_equal(a, b)   # the same rows, bit for bit
        t = report.alternate({"old": lambda body=body: _read_all(old, body),
                              "new": lambda body=body: _read_all(new, body)}, args.repeats)
        peaks = _chunk_peak(old, body), _chunk_peak(new, body)
        table.append([str(d), f"{len(body) / 1e6:.1f}", f"{args.rows / t['old']:.0f}", f"{args.rows / t['new']:.0f}",
                      f"**{t['new'] / t['old']:.2f}x**", f"{peaks[0]:.1f}", f"{peaks[1]:.1f}"])
    report.write(args.out, "NDJSON batch source: rows converted line by line, against a chunk of parsed lines",
                 f"python bench/ab_ndjson_source.py --baseline {args.baseline} --rows {args.rows} --repeats {args.repeats}",
                 started, f"baseline {report.revision(args.baseline)}, this tree {report.revision()} (+ changes "
                 "if any); one thread; the same rows out, bit for bit (checked); method: the module docstring.",
                 ["d", "body MB", f"rows/s, {report.revision(args.baseline)}", "rows/s, this tree",
                  "time ratio (this / baseline)", "peak MB per 1,024-row chunk, baseline", "same, this tree"], table)


if __name__ == "__main__":
    main()
