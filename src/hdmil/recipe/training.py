"""DMIN (with the branch check) then LIPN, trained on the recipe's cohort features."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hdmil.recipe.config import Progress, RecipeConfig

__all__ = ["train_dmin_checked"]


def train_dmin_checked(cohort: Any, split: Any, cfg: RecipeConfig, dcfg: Any, out: Path,
                       progress: Progress | None, cancel: threading.Event | None,
                       say: Callable[[str], None]):
    """Train DMIN, again with the next seed while its tumour branch fails the branch check.

    Nothing in DMIN's loss ties the tumour evidence to the tumour branch: some seeds give a DMIN
    whose *normal* branch attends to tumour (right slide calls, a tumour heatmap on normal tissue).
    The validation branch AUC (``hdmil.train.dmin_trainer.branch_auc``, slide labels only) catches
    that. ``dcfg``: the ``DMINTrainConfig`` of the first try (the others differ in ``seed``).
    Returns the first run that passes, else the one with the highest branch AUC, and one summary
    per try.
    """
    from hdmil.train import train_dmin  # looked up per call: tests replace it

    runs, tries = [], []
    for t in range(max(1, int(cfg.dmin_tries))):
        seed = int(cfg.seed) + t
        folder = out / ("dmin" if t == 0 else f"dmin-seed{seed}")
        res = train_dmin(cohort, split, dataclasses.replace(dcfg, seed=seed), folder,
                         progress=progress, cancel=cancel)
        b = float(res.best_metrics.get("val_branch_auc", math.nan))
        runs.append(res)
        tries.append({"seed": seed, "folder": folder.name, "best_epoch": res.best_epoch,
                      "val_auc": res.best_metrics.get("val_auc"), "val_branch_auc": b})
        if math.isnan(b) or b >= cfg.branch_auc_min:
            return res, tries
        say(f"DMIN seed {seed}: branch AUC {b:.3f} < {cfg.branch_auc_min} (the tumour evidence is "
            "in another branch); training again with the next seed")
    best = max(range(len(runs)), key=lambda i: tries[i]["val_branch_auc"])
    say(f"DMIN: no seed passed the branch check; keeping seed {tries[best]['seed']}")
    return runs[best], tries
