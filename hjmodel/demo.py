"""Build the bundled demo model repository, reproducibly, from data shipped inside scikit-learn.

    python -m hjmodel.demo --out models

writes ``models/<name>/1/`` (ONNX + torch artifacts) for every entry of :data:`DEMOS` and a
``models/DEMO_RESULTS.json`` with the held-out metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .artifact import save_artifact
from .data import load_dataset
from .train import TrainConfig, train

__all__ = ["DEMOS", "build"]

#: name -> (dataset, training settings)
DEMOS: dict[str, tuple[str, TrainConfig]] = {
    "digits_lse": ("digits", TrainConfig(kind="lse", pieces=8, epochs=150)),
    "digits_memory": ("digits", TrainConfig(kind="memory")),
    "digits_deep": ("digits", TrainConfig(kind="deep", hidden=[48], hidden_pieces=4, pieces=4, epochs=80)),
    "breast_cancer_lse": ("breast_cancer", TrainConfig(kind="lse", pieces=4, epochs=150)),
    "diabetes_lse": ("diabetes", TrainConfig(kind="lse", pieces=8, epochs=200, lr=0.01)),
}


def build(out: str | Path, names: list[str] | None = None, progress: bool = False,
          formats: tuple[str, ...] = ("onnx", "torch")) -> dict:
    """Train and save the demo models; returns {name: metrics}."""
    out = Path(out)
    results = {}
    for name in names or list(DEMOS):
        dataset, cfg = DEMOS[name]
        cfg.progress = progress
        t0 = time.time()
        model, report = train(load_dataset(dataset), cfg)
        save_artifact(model, out / name / "1", formats)
        results[name] = {"dataset": dataset, "kind": cfg.kind, **report.metrics,
                         "train_seconds": round(time.time() - t0, 2)}
        print(f"{name}: {json.dumps(report.metrics)}", file=sys.stderr)
    (out / "DEMO_RESULTS.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models", help="model repository directory (default: models)")
    parser.add_argument("--only", nargs="*", choices=sorted(DEMOS), help="build only these demos")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    args = parser.parse_args(argv)
    build(args.out, args.only, args.progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
