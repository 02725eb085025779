"""Training and evaluation of DMIN and LIPN on precomputed slide features (docs/method.md §3–5).

    cohort = load_cohort("labels.csv", "features/")          # labels + lazily read bags
    splits = make_splits(cohort, k=10, seed=0)                # by case, stratified
    res = train_dmin(cohort, splits[0], DMINTrainConfig(), "runs/fold_0")
    res = train_lipn(cohort, splits[0], res.checkpoint, LIPNTrainConfig(), "runs/fold_0")
    table = evaluate_folds([res.checkpoint], cohort, splits[:1])
    print(table.format())
"""

from hdmil.train.data import Bag, BagDataset, Cohort, load_cohort, read_labels
from hdmil.train.config import AttentionShare, DMINTrainConfig, LIPNTrainConfig, RecallShare
from hdmil.train.dmin_trainer import train_dmin
from hdmil.train.evaluate import EvalResult, FoldTable, evaluate_folds, evaluate_model
from hdmil.train.lipn_trainer import train_lipn
from hdmil.train.loop import TrainResult
from hdmil.train.metrics import auc, classification_metrics, mean_std
from hdmil.train.splits import Split, make_splits, read_split_csv, read_splits, write_splits

__all__ = [
    "AttentionShare",
    "Bag",
    "BagDataset",
    "Cohort",
    "EvalResult",
    "DMINTrainConfig",
    "FoldTable",
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
