"""Slide-level metrics as the paper reports them: AUC, accuracy and macro F1.

AUC is the binary ROC AUC of the positive class (index 1) for two classes and the macro
one-vs-rest AUC for more. It is NaN when the labels hold a single class (AUC is undefined there),
never an exception: a tiny validation set must not stop training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Metrics", "auc", "classification_metrics", "mean_std"]

Metrics = dict[str, float]


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC of ``probs`` [S, C] against integer ``labels`` [S]; NaN when undefined."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if n_classes == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    # one-vs-rest over the classes present; sklearn wants rows summing to one over those
    if len(present) < n_classes:
        sub = probs[:, present]
        sub = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
        if len(present) == 2:
            return float(roc_auc_score(labels == present[1], sub[:, 1]))
        remap = {c: i for i, c in enumerate(present)}
        return float(
            roc_auc_score([remap[v] for v in labels], sub, multi_class="ovr", average="macro")
        )
    probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
    return float(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=range(n_classes))
    )


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> Metrics:
    """``{"auc", "acc", "f1"}`` of slide predictions ``probs`` [S, C] (argmax is the call)."""
    from sklearn.metrics import f1_score

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(labels) == 0:
        return {"auc": math.nan, "acc": math.nan, "f1": math.nan}
    pred = probs.argmax(axis=1)
    return {
        "auc": auc(labels, probs),
        "acc": float((pred == labels).mean()),
        "f1": float(
f1_score(labels, pred, average="macro", zero_division=0)
        ),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over folds, ignoring NaN (std 0 for one fold)."""
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
