"""``hjmodel`` command line: train, inspect, verify, diagnose, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import CalibrationError, HJModelError, InputError
from .serving import KINDS

__all__ = ["main"]

#: ``hjmodel train`` notes (on stderr) a calibration split whose deployment's false-flag rate may land
#: further than this from alpha (95% of calibration draws), unless ``--alpha-tolerance`` was given
NOTE_TOLERANCE = 0.015


def _cmd_train(args: argparse.Namespace) -> int:
    from .artifact import save_artifact
    from .data import load_dataset
    from .train import TrainConfig, check_tolerance, train

    cfg = TrainConfig(kind=args.kind, eps=args.eps, t=args.t, preprocess=args.preprocess, pieces=args.pieces,
                      hidden=args.hidden, head=args.head, epochs=args.epochs, lr=args.lr, seed=args.seed, anneal=args.anneal,
                      alpha=args.alpha, alpha_tolerance=args.alpha_tolerance, memory_size=args.memory_size,
                      support=args.support, calibration_fraction=args.calibration_fraction, progress=not args.quiet)
    model, report = train(load_dataset(args.data, target=args.target, task=args.task), cfg)
    out = save_artifact(model, args.out, tuple(args.formats))
    if args.alpha_tolerance is None:
        # training's own tolerance check, as a note: the artifact is written either way
        splits = report.splits
        try:
            check_tolerance(cfg.alpha, NOTE_TOLERANCE, len(splits["calibration"]),
                            total=sum(map(len, splits.values())))
        except CalibrationError as e:
            print(f"note: {e} (--alpha-tolerance refuses such a split)", file=sys.stderr)
    print(json.dumps({"artifact": str(out), "metrics": report.metrics, "seconds": round(report.seconds, 2)},
                     indent=2))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .artifact import read_spec

    print(json.dumps(read_spec(args.artifact), indent=2, sort_keys=True))
    return 0


def _cmd_rebuild(args: argparse.Namespace) -> int:
    """An artifact written again from its ``model.pt`` and ``model.json``, with this version's graphs
    (e.g. one exported before its served radius allowed for input rounding)."""
    from .artifact import load_model, save_artifact

    source, out = Path(args.artifact).resolve(), Path(args.out).resolve()
    if out == source:
        raise HJModelError("--out must be another version directory: the source is read, not replaced")
    save_artifact(load_model(source), out, formats=tuple(args.formats))
    print(f"rebuilt {source} -> {out}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    report = verify(args.artifact, n=args.n, seed=args.seed)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def _count(text: str) -> int:
    """An argument that counts something: an integer >= 1 (argparse's type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _path(text: str) -> str:
    """A file or directory argument: not empty (pathlib reads "" as ".", the working directory, where
    ``--out ""`` wrote an artifact among whatever was there)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (it would mean the working directory): give a path")
    return text


def _read_inputs(source: str) -> np.ndarray:
    if source == "-":
        return np.asarray(json.load(sys.stdin), dtype=np.float64)
    if source.lstrip().startswith("["):   # a JSON array: never a path (one row of 64 numbers is longer
        return np.asarray(json.loads(source), dtype=np.float64)   # than a file name may be)
    path = Path(source)
    if path.exists():
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return np.asarray(json.loads(path.read_text()), dtype=np.float64)
    if path.suffix in (".json", ".npy"):
        raise FileNotFoundError(f"no such file {source!r}")
    return np.asarray(json.loads(source), dtype=np.float64)


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from .artifact import load_model

    model = load_model(args.artifact)
    try:
        x = np.asarray(_read_inputs(args.input), dtype=np.float64)
    except (ValueError, TypeError, OSError) as e:  # json.JSONDecodeError is a ValueError
        raise InputError(f"cannot read --input as a numeric array (a JSON array, a .json/.npy file or -): "
                         f"{type(e).__name__}: {e}") from e
    rows = model.diagnose(x, top_k=args.top_k, tau=args.tau)   # checks them all (InputError)
    print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    return 0


def _load_arrays(path: str, what: str) -> dict:
    """An .npz file (no pickles) or a torch tensor dict (``weights_only``) as a dict of arrays."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{what}: no such file {path!r}")
    try:
        if file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or unsafe files
        raise InputError(f"{what}: cannot read {path!r} ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(state, dict):
        raise InputError(f"{what}: {path!r} does not hold a dict of tensors")
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def _calibration(args: argparse.Namespace):
    data = _load_arrays(args.calibration, "--calibration")
    if "X" not in data:
        raise InputError("--calibration must hold an array X (and optionally y)")
    X, y = data["X"], data.get("y")
    return (X, y) if y is not None else X, data.get("X_reference")


def _export_options(args: argparse.Namespace) -> dict:
    return {"task": args.task, "class_names": args.class_names, "alpha": args.alpha,
            "alpha_tolerance": args.alpha_tolerance, "seed": args.seed, "formats": tuple(args.formats)}


def _cmd_export(args: argparse.Namespace) -> int:
    from .byom import export

    state = _load_arrays(args.state, "--state")
    calibration, reference = _calibration(args)
    try:
        model = export(state, calibration, args.out, reference_data=reference, **_export_options(args))
    except (KeyError, ValueError) as e:   # a state dict that is not an LSE network's tensors
        raise InputError(f"--state: {type(e).__name__}: {e}") from e
    print(json.dumps({"artifact": args.out, "kind": model.kind, "task": model.task, "metrics": model.meta["metrics"]},
                     indent=2))
    return 0


def _cmd_import_onnx(args: argparse.Namespace) -> int:
    from .onnx_import import import_onnx

    calibration, reference = _calibration(args)
    model = import_onnx(args.onnx, calibration, args.out, reference_data=reference, **_export_options(args))
    print(json.dumps({"artifact": args.out, "kind": model.kind, "task": model.task, "metrics": model.meta["metrics"]},
                     indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import build

    print(json.dumps(build(args.out, progress=not args.quiet), indent=2))
    return 0


def gate_and_output_arguments(p: argparse.ArgumentParser) -> None:
    """The OOD gate's and the artifact's options, shared by ``train`` and the export commands."""
    p.add_argument("--alpha", type=float, default=0.05, help="target false-flag rate of the OOD gate")
    p.add_argument("--alpha-tolerance", type=float,
                   help="refuse calibration rows too few for one deployment's false-flag rate to lie within "
                        "alpha +- this (95%% of calibration draws); the interval is reported either way")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--formats", nargs="+", choices=["onnx", "torch"], default=["onnx", "torch"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hjmodel", description="LSE networks with Hamilton-Jacobi diagnostics")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model and write an artifact")
    p.add_argument("data", help="digits | breast_cancer | wine | iris | diabetes | FILE.npz | FILE.csv")
    p.add_argument("--kind", choices=list(KINDS), default="lse")
    p.add_argument("--out", required=True, type=_path, help="version directory to write, e.g. models/mymodel/1")
    p.add_argument("--target", help="CSV target column (default: last)")
    p.add_argument("--task", choices=["classification", "regression"])
    p.add_argument("--eps", type=float, help="viscosity (default: eps*, Thm 8.1)")
    p.add_argument("--t", type=float, help="gauge t")
    p.add_argument("--preprocess", choices=["standardize", "pca", "none"], default="standardize")
    p.add_argument("--pieces", type=int, default=8, help="neurons per output (lse head)")
    p.add_argument("--hidden", type=int, nargs="*", default=[64], help="deep: units per body layer")
    p.add_argument("--head", choices=["lse", "memory"], default="lse", help="deep: head kind")
    p.add_argument("--memory-size", type=int, default=2000, help="memory heads: at most this many support points")
    p.add_argument("--support", choices=["random", "kcenter"], default="random",
                   help="memory heads: support points at random, or a k-center coreset per class (small artifacts)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--anneal", type=float, default=1.0, help="start at ANNEAL*eps and anneal down to eps")
    p.add_argument("--calibration-fraction", type=float, default=0.2,
                   help="share of the rows held out to calibrate the OOD gate (the test split is another 0.2)")
    gate_and_output_arguments(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("inspect", help="print an artifact's spec")
    p.add_argument("artifact", type=_path)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("rebuild", help="write an artifact again from its model.pt with this version's graphs")
    p.add_argument("artifact", type=_path, help="the version directory to read")
    p.add_argument("--out", required=True, type=_path, help="the version directory to write, e.g. models/mymodel/2")
    p.add_argument("--formats", nargs="+", choices=["onnx", "torch"], default=["onnx", "torch"])
    p.set_defaults(func=_cmd_rebuild)

    p = sub.add_parser("verify", help="check the Thm 4.1 identity, torch/ONNX parity and that every radius the ONNX graph serves is proven in float64")
    p.add_argument("artifact", type=_path)
    p.add_argument("--n", type=_count, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("diagnose", help="print a diagnosis as JSON")
    p.add_argument("artifact", type=_path)
    p.add_argument("--input", required=True, help="JSON array (row or rows), a .json/.npy file, or - for stdin")
    p.add_argument("--top-k", type=_count, default=5)
    p.add_argument("--tau", type=float, help="a regression model's certificate tolerance (default 0.1)")
    p.set_defaults(func=_cmd_diagnose)

    def export_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--calibration", required=True, type=_path,
                       help=".npz with X (rows not trained on), optional y, optional X_reference (e.g. training rows)")
        p.add_argument("--out", required=True, type=_path, help="version directory to write, e.g. models/mymodel/1")
        p.add_argument("--task", choices=["classification", "regression"])
        p.add_argument("--class-names", nargs="+")
        gate_and_output_arguments(p)

    p = sub.add_parser("export", help="a state dict of W, b, eps (+ groups / V, mu, A) -> a serving artifact")
    p.add_argument("--state", required=True, type=_path, help=".npz or torch file (weights_only) with W, b, eps, ...")
    export_arguments(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import-onnx", help="a third-party ONNX LSE network -> a serving artifact")
    p.add_argument("onnx", type=_path, help="the ONNX file (ReduceLogSumExp over an affine map; see hjmodel/onnx_import.py)")
    export_arguments(p)
    p.set_defaults(func=_cmd_import_onnx)

    p = sub.add_parser("demo", help="build the demo model repository")
    p.add_argument("--out", type=_path, default="models")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HJModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
