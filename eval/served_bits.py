"""Certificates in the bits the server returns, on inputs chosen to be hard for them.

    python -m eval.served_bits [--rows 100] [--backends onnx,torch,torch-static]  -> eval/SERVED_BITS.md

For each classification demo model and each backend the service can serve it with (``onnx``: the
served graph in onnxruntime; ``torch``: the serving module's TorchScript trace on its interpreter;
``torch-static``: the same trace with the server's default of small calls on TorchScript's static
runtime, every call cut into blocks of 1 to 16 rows, :func:`static_server`), the service's own
backend object (``service.backends.load_backend``, the server's default threads, on a thread that
flushes subnormals like the backend's) answers float32 inputs of six families: the held-out test split, the same
rows scaled x0.3, x3 and x10 (x3 and x10 are where one neuron dominates each group and the
certificates are nearly exact), noisy rows (Gaussian, sd 2 pixels / 0.5 feature sd), and the rows of
all of these whose float64 decision margin is smallest (closest to the boundary); and, with a tenth
of the rows each (at least 10), eleven families far from the data (:func:`far_families`: scales from
x1e-4 to x1e20, negated rows, the origin, Gaussian rows 10 and 1,000 sds out, a single feature,
constant rows, midpoints of two rows), which join the pool the smallest margins are drawn from. Per
family:

* **rounded up**: rows whose served float32 radius exceeds the float64 certificate of the same input
  computed by the torch module and that the torch module does not re-prove either (must be 0: the
  radius leaves the graph rounded toward zero). A searched radius is a point each runtime proves
  with its own float64 evaluation of a bound, so another runtime's may lie a little above the torch
  module's: a deep model's linearised-bound chord (up to 2.1e-8 relative between onnxruntime and
  torch on the 16-core CPU and the GPU of eval/RESULTS_gpu.md, none on this 2-core machine) is
  re-proven by evaluating the torch module's bound at the served radius (``HJModel.evaluate``'s
  ``prove``), counted in *re-proven above float64*; so is a memory head's tangent root (searched in
  float32, proven in float64 by each runtime; its excess over torch's reaches ~1e-6 on this machine).
  No allowance is left: a runtime may prove a tangent radius through a chord from a farther point,
  which the re-proof does not know, so a sound radius could be counted here -- never an unsound one
  passed. *largest excess* shows how far the worst served radius lies above the torch module's own;
* **served-bits violations**: rows where ``hjmodel.attacks.served_bits_attack`` -- PGD-L2 with a
  targeted start at every other class, every iterate rounded to float32 and classified by the same
  backend's served graph -- found a float32 input strictly inside the served radius with another
  served class;
* **float64 violations**: rows where ``hjmodel.attacks.pgd_l2`` (8 restarts x 60 steps, float64)
  found a decision change inside 0.999 x the served radius;
* **float64-client violations**: rows where ``hjmodel.attacks.input_rounding_attack`` -- a client
  that sends float64 values, which the backend reads rounded to float32: for every rival class, the
  float64 boundary along an iterated tangent-plane direction, the served class bisected on float32
  points along it, and the nearest pair of rounding cells (X rounding to the row, Y to a point of
  another served class; and from the directions of PGD-L2's smallest perturbations in balls of 2 to
  16 x the radius) -- found |Y - X| below the radius served for X, on each family's first
  ``CLIENT_ROWS`` rows (its PGD starts cost a memory head ~1 s a row). *float64-client slack* is the
  median of (|Y - X| - radius) / radius over those rows: how close that attack came.

Every count must be 0. The tightness of the same radii is measured in ``eval/CROWN.md`` and
``bench/results/hjmodel.md``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hjmodel import load_dataset, load_model, serving
from hjmodel.attacks import SHRINK, held_out, input_rounding_attack, pgd_l2, served_bits_attack
from hjmodel.verify import served_radius_check
from service.backends import load_backend

from .common import md_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIENT_ROWS = 60   #: rows per family the float64-client attack runs on
#: rows per family of :func:`far_families`: ``--rows`` / FAR_ROWS_DIVISOR, at least FAR_ROWS_MIN
FAR_ROWS_DIVISOR, FAR_ROWS_MIN = 10, 10
MODELS = {"digits_lse": "digits", "digits_memory": "digits", "digits_deep": "digits",
          "breast_cancer_lse": "breast_cancer"}


def families(X: np.ndarray, scale: np.ndarray, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The input families (float64, before the float32 cast)."""
    base = X[:rows]
    noisy = base + rng.normal(size=base.shape) * scale
    return {"test x1": base, "x0.3": 0.3 * base, "x3": 3.0 * base, "x10": 10.0 * base, "noisy": noisy}


def far_families(X: np.ndarray, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs far from what the model was fitted on (float64, before the float32 cast), ``rows`` each:
    the rows X scaled x1e-4 (next to the origin), x100, x1e4 and x1e20 (where the float64 arithmetic
    of a graph that reads float32 works with squared norms near 1e42), negated, Gaussian noise of sd
    1e-3 around the origin, Gaussian rows of 10 and 1,000 feature sds around the mean, a single
    feature set to between 0.1 and 1,000 (the rest 0), rows whose features all hold one value in
    [-50, 50], and midpoints of two rows (an image of two digits at half intensity each)."""
    base = X[:rows]
    n, d = base.shape
    mu, sd = X.mean(0), X.std(0)
    return {"x1e-4": 1e-4 * base, "x100": 100.0 * base, "x1e4": 1e4 * base, "x1e20": 1e20 * base,
            "negated": -base, "near 0": 1e-3 * rng.normal(size=(n, d)),
            "10 sd out": mu + 10.0 * sd * rng.normal(size=(n, d)),
            "1000 sd out": mu + 1000.0 * sd * rng.normal(size=(n, d)),
            "one feature": np.eye(d)[rng.integers(0, d, n)] * rng.uniform(0.1, 1000.0, (n, 1)),
            "constant": np.ones((n, d)) * rng.uniform(-50.0, 50.0, (n, 1)),
            "midpoints": 0.5 * (base + X[rng.permutation(len(X))[:n]])}


def smallest_margin(model, pool: np.ndarray, rows: int) -> np.ndarray:
    """The ``rows`` inputs of ``pool`` whose float64 log-probability margin is smallest."""
    x = torch.from_numpy(pool.astype(np.float32)).double()
    with torch.no_grad():
        lp = model.head.log_probabilities(model.head.preactivations(model.features(x)))
        top = lp.topk(2, dim=-1).values
    return pool[np.argsort((top[:, 0] - top[:, 1]).numpy())[:rows]]


def open_backend(version: Path, backend: str, device: str = "cpu", **options):
    """The service's own ``backend`` of ``version`` on ``device`` (``options``: ``load_backend``'s);
    one that opens on another device (a CUDA provider that did not start, under auto) is an error here."""
    served = load_backend(version, preference=backend, device=device, **options)
    if served.device != device:
        raise RuntimeError(f"{version}: the {backend} backend opened on {served.device}, not {device}")
    return served


def server(version: Path, backend: str, device: str = "cpu"):
    """float32 (n, d) -> the served outputs of ``version``: the service's ``backend`` itself, on
    ``device``. ``torch-static``: :func:`static_server`."""
    if backend == "torch-static":
        return static_server(version, device)
    served = open_backend(version, backend, device)
    return lambda q: served.infer(q, np.full(len(q), 0.1))


def static_server(version: Path, device: str = "cpu"):
    """The torch backend as the server loads it by default (``HJSERVE_TORCH_STATIC_ROWS``: small
    calls on TorchScript's static runtime), every call cut into blocks of 1, 2, ..., 16 rows in turn:
    each size the dynamic batcher can hand it, each answered by the static runtime. The load-time
    budget that can cut the runtime's rows below 16 on a busy machine is lifted while loading, so that
    every size is served there whatever this machine's load (it decides where a call runs, never its
    bits). An error if the runtime does not take all 16 sizes or fails a call (the interpreter would
    have answered it)."""
    from hjmodel import artifact

    with artifact.static_call_budget(math.inf):
        served = open_backend(version, "torch", device, static_rows=artifact.STATIC_ROWS)
    rows = served.static_rows
    if rows != artifact.STATIC_ROWS:
        raise RuntimeError(f"{version}: the static runtime takes calls of up to {rows} rows, not {artifact.STATIC_ROWS}")
    sizes = itertools.cycle(range(1, rows + 1))

    def call(q: np.ndarray) -> dict[str, np.ndarray]:
        parts, i = [], 0
        while i < len(q):
            block = q[i:i + next(sizes)]
            parts.append(served.infer(block, np.full(len(block), 0.1)))
            i += len(block)
        if served.static_failed:
            raise RuntimeError(f"{version}: the static runtime failed {served.static_failed} calls")
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    return call


def check(model, served, x32: np.ndarray) -> dict:
    out = served(x32)
    c, r32 = out["prediction"], out["certified_radius"].astype(np.float64)
    # a searched radius is a point each runtime proves with its own float64 evaluation of the bound,
    # so one runtime's radius may exceed the torch module's by rounding (DESIGN section 3): a radius
    # above the module's own counts only if the module does not re-prove it either
    radius = served_radius_check(model, x32, out)
    t0 = time.perf_counter()
    bits = served_bits_attack(model, lambda q: served(q)["prediction"], x32, r32, c)
    t_bits = time.perf_counter() - t0
    def client(q: np.ndarray):   # float64 values, read as the server reads them
        out = served(np.asarray(q).astype(np.float32))
        return out["prediction"], out["certified_radius"]

    rounding = input_rounding_attack(model, client, x32[:CLIENT_ROWS])
    slack = (rounding["distance"] - rounding["radius"]) / np.where(rounding["radius"] > 0, rounding["radius"], np.inf)
    x = torch.from_numpy(x32).double()
    violated, _, _ = pgd_l2(model, x, SHRINK * torch.from_numpy(r32), torch.from_numpy(c).long(), restarts=8, steps=60)
    return {"n": len(x32), "decision_differs": radius["decision_differs"], "rounded_up": radius["unproven"],
            "bits": int(bits.sum()), "f64": int(violated.sum()), "median_r": float(np.median(r32)),
            "zero_r": int((r32 == 0).sum()), "seconds": t_bits, "excess": radius["largest_excess"],
            "reproven": radius["re_proven"], "client": int(rounding["violated"].sum()),
            "slack": float(np.median(slack[np.isfinite(slack)])) if np.isfinite(slack).any() else math.nan}


HEADER = ["model", "backend", "inputs", "rows", "rounded up", "served-bits violations", "float64 violations",
          "served class differs from float64 decision", "radius 0", "median served radius",
          "served-bits attack s", "largest excess over float64", "re-proven above float64",
          "float64-client violations", "float64-client slack"]


def run(models: Path, backends: list[str], rows: int, device: str = "cpu", deadline: float = float("inf"),
        names: tuple[str, ...] = tuple(MODELS)) -> list[list]:
    """One table row (``HEADER``) per model of ``names``, backend and input family; the backends run
    on ``device`` (the float64 model and its attacks on the CPU). Stops starting new models after
    ``deadline`` (``time.monotonic()``). Call it on a thread that flushes subnormals
    (``serving.flush_subnormals``), as the service's backend threads do."""
    table = []
    for name in names:
        dataset = MODELS[name]
        if time.monotonic() > deadline:
            break
        version = Path(models) / name / "1"
        model = load_model(version).double().eval()
        served = {backend: server(version, backend, device) for backend in backends}
        data = load_dataset(dataset)
        X = data.X[held_out(model, data.X)].astype(np.float64)
        n = int(rows * (0.6 if name == "digits_memory" else 1.0))
        rng = np.random.default_rng(0)
        scale = np.full(X.shape[1], 2.0) if dataset == "digits" else 0.5 * X.std(0)
        fams = {**families(X, scale, n, rng), **far_families(X, max(FAR_ROWS_MIN, n // FAR_ROWS_DIVISOR), rng)}
        fams["smallest margin"] = smallest_margin(model, np.concatenate([X, *(v for v in fams.values())]), n)
        for backend in backends:
            for fam, values in fams.items():
                res = check(model, served[backend], values.astype(np.float32))
                table.append([name, backend, fam, res["n"], res["rounded_up"], res["bits"], res["f64"],
                              res["decision_differs"], res["zero_r"], res["median_r"], res["seconds"],
                              res["excess"], res["reproven"], res["client"], res["slack"]])
                print(table[-1], flush=True)
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200, help="rows per family (digits_memory: 60%% of it)")
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--out", default="SERVED_BITS.md")
    ap.add_argument("--backends", default="onnx,torch,torch-static",
                    help="comma-separated: onnx, torch, torch-static (module docstring)")
    args = ap.parse_args()
    backends = args.backends.split(",")
    torch.set_num_threads(2)
    serving.flush_subnormals()            # this thread runs the served graph, as the service's would
    t_start = time.time()
    table = run(Path(args.models), backends, args.rows)
    total = sum(row[3] for row in table)
    bad = sum(row[4] + row[5] + row[6] + row[13] for row in table)
    text = f"""# Certificates in the served bits

Generated by `python -m eval.served_bits --rows {args.rows} --backends {args.backends}` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC
({time.time() - t_start:.0f} s; {platform.machine()}, torch {torch.__version__}). What each column counts and how the
inputs are chosen: the module docstring of `eval/served_bits.py`.

**{bad} violations on {total} served answers** (the *rounded up* and the three *violations* columns must be 0 on every row).

{md_table(HEADER, table)}

*served class differs*: rows where the float32 served decision and the float64 model's decision of the
same float32 input differ (ties within rounding; the served graph gives such rows radius 0, so they are
not attacked in effect). *radius 0*: rows served with a zero radius (a decision within rounding of a tie).
*float64-client slack* near 0 means the attack's pairs came that close to the served radius (2e-5
on digits_lse's near-exact rows x3 / x10, 1-3e-4 on breast_cancer's: the input-rounding allowance); on a
memory or deep head the slack is mostly the certificate's own (eval/CROWN.md measures it); the
allowance does not depend on the head (tests/hjmodel/test_functional.py checks it against every
pair of rounding cells).
"""
    (HERE / args.out).write_text(text)
    print(text)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
