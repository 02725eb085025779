"""Held-out accuracy of an HDMIL model on a synthetic cohort, against the cohort's ground truth.

Slide level, for HDMIL (LIPN's mask) and HDMIL† (DMIN's own mask on all patches): AUC and ACC
over all slides and per tumour burden. Patch level (a patch is tumour when ≥ 50% of it is): the
tissue grid's recall of tumour patches, LIPN's and DMIN's mask recall and kept ratio, and the
patch-level AUC of DMIN's tumour attention.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import check_cancelled
from hdmil.inference import predict_bag
from hdmil.recipe.cohorts import manifest, slide_truth
from hdmil.recipe.config import TUMOR_AT, RecipeError

__all__ = ["heldout_metrics"]


def heldout_metrics(
    model: Any,
    cohort_dir: str | os.PathLike,
    features_dir: str | os.PathLike,
    burdens: Sequence[float] | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Accuracy of a loaded HDMIL model on a synthetic cohort with ground truth.

    Slide level, for HDMIL (LIPN's mask) and HDMIL† (DMIN's own mask on all patches): AUC, ACC,
    over all slides and per tumour burden (the tumour slides of that burden against every normal
    slide). Patch level, against the ground truth (a patch is tumour when ≥ 50% of it is):
    the tissue grid's recall of tumour patches (``hdmil.grid``: upstream of the model),
    LIPN's recall of tumour patches in its kept set (the patches read at 20x) and its kept ratio,
    DMIN's own mask recall, and the patch-level AUC of DMIN's tumour attention logits on each
    tumour slide (the per-slide mean; attention is a within-slide ranking).
    """
    cohort_dir, features_dir = Path(cohort_dir), Path(features_dir)
    classes = list(model.classes)
    if "tumor" not in classes:
        raise RecipeError(f"{model.path}: the model's classes {classes} have no 'tumor'")
    t_idx = classes.index("tumor")
    levels = list(burdens) if burdens else None
    rows = []
    for s in manifest(cohort_dir):
        check_cancelled(cancel, "recipe")
        path = features_dir / f"{s['slide_id']}.h5"
        if path.exists():
            rows.append(_slide_row(model, s, cohort_dir, path, t_idx, levels))
    if not rows:
        raise RecipeError(f"{features_dir}: no feature file for any slide of {cohort_dir}")
    return _report(rows, t_idx, levels)


def _slide_row(model: Any, s: dict[str, Any], cohort_dir: Path, path: Path, t_idx: int,
               levels: list[float] | None) -> dict[str, Any]:
    """One held-out slide: both predictions and its patch counts against the ground truth."""
    from hdmil.features import read_features

    bag = read_features(path)
    tumour = slide_truth(cohort_dir / s["truth_npz"], bag.coords) >= TUMOR_AT
    with np.load(cohort_dir / s["truth_npz"]) as t:  # every tumour patch, found or not
        n_truth = int((np.asarray(t["tumor_fraction"]) >= TUMOR_AT).sum())
    x = np.asarray(bag.features, np.float32)
    dagger = predict_bag(model, x, use_lipn=False)  # HDMIL†: DMIN's own mask on every patch
    hdmil = predict_bag(model, x, bag.lr_patches, bag.grid_index() if model.lipn.dilates else None)
    kept = hdmil.kept
    scores = dagger.scores[:, t_idx]
    own = dagger.dmin_mask.any(axis=1)
    label = list(model.classes).index(s["label"])
    burden = float(s["tumor_burden"])
    return {
        "slide_id": s["slide_id"], "label": label, "burden": burden,
        "level": _nearest(burden, levels) if levels and label == t_idx else 0.0,
        "p_hdmil": float(hdmil.probabilities[t_idx]),
        "p_dagger": float(dagger.probabilities[t_idx]),
        "probs_hdmil": hdmil.probabilities, "probs_dagger": dagger.probabilities,
        "n": int(len(kept)), "n_tumour": int(tumour.sum()), "n_tumour_truth": n_truth,
        "lipn_hits": int((kept & tumour).sum()), "lipn_kept": int(kept.sum()),
        "dmin_hits": int((own & tumour).sum()), "dmin_kept": int(own.sum()),
        "attention_auc": _auc(tumour, scores),
    }


def _report(rows: list[dict[str, Any]], t_idx: int, levels: list[float] | None) -> dict[str, Any]:
    """All slides, the slides whose tumour the grid found, each burden; then the slides."""
    report = {"all": _block(rows, t_idx)}
    # upstream failures apart: tumour slides whose tumour the tissue grid (hdmil.grid) never found
    found = [r for r in rows if r["label"] != t_idx or r["n_tumour"] > 0]
    if len(found) < len(rows):
        report["tumour_in_grid"] = _block(found, t_idx)
    if levels:
        normals = [r for r in rows if r["label"] != t_idx]
        for b in sorted(set(levels), reverse=True):
            pos = [r for r in rows if r["label"] == t_idx and r["level"] == b]
            if pos:
                report[f"burden_{b:g}"] = _block(pos + normals, t_idx)
    report["slides"] = [
        {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()
         if not k.startswith("probs_")}
        for r in rows
    ]
    return report


def _block(sel: list[dict[str, Any]], t_idx: int) -> dict[str, Any]:
    """The metrics of one set of slides."""
    from hdmil.train.metrics import classification_metrics

    labels = np.array([r["label"] for r in sel])
    out: dict[str, Any] = {"n_slides": len(sel), "n_tumor": int((labels == t_idx).sum())}
    for key, name in (("probs_hdmil", "hdmil"), ("probs_dagger", "hdmil_dagger")):
        m = classification_metrics(labels, np.stack([r[key] for r in sel]))
        out[f"{name}_auc"], out[f"{name}_acc"] = m["auc"], m["acc"]
    pos = [r for r in sel if r["label"] == t_idx]
    n_t = sum(r["n_tumour"] for r in pos)
    out["n_tumor_patches"] = int(n_t)
    n_all = sum(r["n_tumour_truth"] for r in pos)
    out["grid_tumor_recall"] = n_t / n_all if n_all else math.nan  # found by the tissue grid
    out["lipn_recall"] = sum(r["lipn_hits"] for r in pos) / n_t if n_t else math.nan
    out["dmin_mask_recall"] = sum(r["dmin_hits"] for r in pos) / n_t if n_t else math.nan
    out["lipn_kept_ratio"] = float(np.mean([r["lipn_kept"] / r["n"] for r in sel]))
    out["dmin_kept_ratio"] = float(np.mean([r["dmin_kept"] / r["n"] for r in sel]))
    aucs = [r["attention_auc"] for r in pos if not math.isnan(r["attention_auc"])]
    out["attention_auc"] = float(np.mean(aucs)) if aucs else math.nan
    return out


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, bool)
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, score))


def _nearest(value: float, levels: Sequence[float]) -> float:
    return float(min(levels, key=lambda b: abs(math.log(max(value, 1e-6)) - math.log(b))))
