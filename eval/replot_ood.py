"""Redraw the OOD plots from the cached OOD models (same numbers as the last ``python -m eval.run``)."""

from dataclasses import replace

from . import ood
from .common import EVAL_DIR, MODELS, get_model, set_threads
from .run import OOD_RUNS

if __name__ == "__main__":
    set_threads()
    runs = []
    for label, kind, exclude, seed in OOD_RUNS:
        base = MODELS["digits_lse" if kind == "lse" else "digits_memory"][1]
        cfg = replace(base, exclude_classes=list(exclude), seed=seed)
        m, splits, _, _ = get_model(f"digits_{kind}_ood{''.join(map(str, exclude))}", "digits", cfg)
        runs.append((label, ood.study(m, splits, exclude)))
    ood.plot(runs, EVAL_DIR / "ood_auroc.png", EVAL_DIR / "ood_alpha.png")
