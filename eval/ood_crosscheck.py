"""Cross-check of the OOD battery's baselines against pytorch-ood's implementations.

    pip install --no-deps --target eval/.pytorch-ood pytorch-ood==0.4.0
    python -m eval.ood_crosscheck            -> eval/OOD_CROSSCHECK.md

The battery (`eval/ood_battery.py`) computes its baselines itself, on the head features of each
model. Here the same features and class log-scores go through pytorch-ood 0.4.0's detectors
(Mahalanobis, KNN, EnergyBased, MaxSoftmax), fitted on the same training rows, and the two
implementations are compared row by row (Spearman rank correlation) and by AUROC on every shift.

**The torchvision workaround.** pytorch-ood imports torchvision at package import (its model zoo),
and the torchvision wheels on the package registry link against the CUDA build of torch: with the
CPU torch this project pins, `import torchvision` fails (`operator torchvision::nms does not exist`).
The detectors themselves never touch torchvision, so :func:`_without_torchvision` installs an import
hook that answers every `torchvision...` import with an empty placeholder module before pytorch-ood
is imported. ViM is not cross-checked: pytorch-ood's ViM needs a linear head (logits = W z + b), and
an LSE head is not one.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from hjmodel import TrainConfig, load_dataset, train

from .common import md_table
from .ood_battery import Detectors, auroc_fpr95, shifts

HERE = Path(__file__).resolve().parent
TARGET = HERE / ".pytorch-ood"


def _without_torchvision() -> None:
    class Placeholder(types.ModuleType):
        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            if name[:1].isupper():      # a class pytorch-ood's model zoo subclasses or instantiates
                value = type(name, (), {"__init__": lambda self, *a, **k: None})
            else:
                value = Placeholder(f"{self.__name__}.{name}")
                sys.modules[value.__name__] = value
            setattr(self, name, value)
            return value

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            return Placeholder(spec.name)

        def exec_module(self, module):
            return None

    sys.meta_path.insert(0, Finder())


@torch.no_grad()
def _theirs(det: Detectors, fitted: dict, X: np.ndarray, energy, msp) -> dict[str, np.ndarray]:
    """pytorch-ood's scores on the rows X: its fitted feature detectors on the head features, its
    energy and max-softmax on the same class log-scores the battery uses."""
    h = det.model.features(torch.as_tensor(np.asarray(X, dtype=np.float32)).double())
    logits, _ = det.class_scores(h)
    out = {name: d.predict_features(h.float()).double().numpy() for name, d in fitted.items()}   # its float32
    out["energy"] = energy.score(logits).numpy()
    out["MSP"] = msp.score(logits).numpy()
    return out


def main() -> int:
    warnings.simplefilter("ignore")
    if not TARGET.exists():
        print(f"install pytorch-ood first: pip install --no-deps --target {TARGET} pytorch-ood==0.4.0")
        return 2
    sys.path.insert(0, str(TARGET))
    _without_torchvision()
    import pytorch_ood
    from pytorch_ood.detector import KNN, EnergyBased, Mahalanobis, MaxSoftmax

    data = load_dataset("digits")
    exclude = [8, 9]
    keep = ~np.isin(data.y, exclude)
    X = data.X[keep]
    remap = {c: i for i, c in enumerate(sorted(set(data.y[keep].tolist())))}
    y = np.array([remap[v] for v in data.y[keep]])
    rows = []
    for kind in ("lse", "memory", "deep"):
        model, report = train(data, TrainConfig(kind=kind, exclude_classes=exclude, seed=0, progress=False))
        sp = {k: np.asarray(v) for k, v in report.splits.items()}
        det = Detectors(model, X[sp["train"]], y[sp["train"]])
        with torch.no_grad():
            H_tr = model.features(torch.as_tensor(X[sp["train"]]))
        theirs = {"Mahalanobis": Mahalanobis(None).fit_features(H_tr.float(), torch.as_tensor(y[sp["train"]])),
                  "1-NN": KNN(None, k=1, normalize=False).fit_features(H_tr.float(), torch.as_tensor(y[sp["train"]])),
                  "5-NN": KNN(None, k=5, normalize=False).fit_features(H_tr.float(), torch.as_tensor(y[sp["train"]]))}

        test = X[sp["test"]]
        ours_in, theirs_in = det.scores(test), _theirs(det, theirs, test, EnergyBased, MaxSoftmax)
        for name, Xo in shifts(test, data.X[~keep], 0).items():
            ours_out, theirs_out = det.scores(Xo), _theirs(det, theirs, Xo, EnergyBased, MaxSoftmax)
            for meth in ("1-NN", "5-NN", "Mahalanobis", "energy", "MSP"):
                a = np.r_[ours_in[meth], ours_out[meth]]
                b = np.r_[theirs_in[meth], theirs_out[meth]]
                rho = spearmanr(a, b).statistic
                auc_ours = auroc_fpr95(ours_in[meth], ours_out[meth])[0]
                auc_theirs = auroc_fpr95(theirs_in[meth], theirs_out[meth])[0]
                rows.append([kind, name, meth, float(rho), auc_ours, auc_theirs, abs(auc_ours - auc_theirs)])
        print(kind, "done", flush=True)
    worst = max(r[-1] for r in rows)
    by = {}
    for r in rows:
        by.setdefault((r[0], r[2]), []).append(r)
    summary = [[k, m, min(x[3] for x in v), max(x[-1] for x in v)] for (k, m), v in by.items()]
    text = f"""# OOD baselines: this project's implementations vs pytorch-ood {pytorch_ood.__version__}

Generated by `python -m eval.ood_crosscheck` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: one model per
kind (`hjmodel.train` defaults, digits without 8 and 9, seed 0), the battery's shifts, the same head features
and class log-scores fed to both implementations (see the module docstring for the torchvision workaround).

Largest AUROC difference over every kind, baseline and shift: **{worst:.2e}**.

{md_table(["kind", "baseline", "smallest Spearman rank correlation over shifts", "largest AUROC difference"], summary)}

Per shift:

{md_table(["kind", "shift", "baseline", "Spearman", "AUROC (ours)", "AUROC (pytorch-ood)", "difference"], rows)}
"""
    (HERE / "OOD_CROSSCHECK.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
