"""Training and evaluation of DMIN and LIPN on precomputed slide features (docs/method.md §3–5).

    cohort = load_cohort("labels.csv", "features/")          # labels + lazily read bags
    splits = make_splits(cohort, k=10, seed=0)                # by case, stratified
    res = train_dmin(cohort, splits[0], DMINTrainConfig(), "runs/fold_0")
    res = train_lipn(cohort, splits[0], res.checkpoint, LIPNTrainConfig(), "runs/fold_0")
    table = evaluate_folds([res.checkpoint], cohort, splits[:1])
    print(table.format())
"""

import importlib
from typing import Any

# Names load on first use (PEP 562): the CLI reads the configs and options table to build its
# parser without importing torch, so `hdmil info` stays small.
_HOME = {
    "hdmil.train.data": ("Bag", "BagDataset", "Cohort", "load_cohort", "read_labels"),
    "hdmil.train.config": ("AttentionShare", "DMINTrainConfig", "KeptBudget", "LIPNTrainConfig",
                           "RecallShare"),
    "hdmil.train.dmin_trainer": ("train_dmin",),
    "hdmil.train.evaluate": ("EvalResult", "FoldTable", "evaluate_folds", "evaluate_model"),
    "hdmil.train.lipn_trainer": ("train_lipn",),
    "hdmil.train.loop": ("TrainResult",),
    "hdmil.train.metrics": ("auc", "classification_metrics", "mean_std"),
    "hdmil.train.splits": ("Split", "make_splits", "read_split_csv", "read_splits", "write_splits"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'hdmil.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "AttentionShare",
    "Bag",
    "BagDataset",
    "Cohort",
    "EvalResult",
    "DMINTrainConfig",
    "FoldTable",
    "KeptBudget",
    "LIPNTrainConfig",
    "RecallShare",
    "Split",
    "TrainResult",
    "auc",
    "classification_metrics",
    "evaluate_folds",
    "evaluate_model",
    "load_cohort",
    "make_splits",
    "mean_std",
    "read_labels",
    "read_split_csv",
    "read_splits",
    "train_dmin",
    "train_lipn",
    "write_splits",
]
