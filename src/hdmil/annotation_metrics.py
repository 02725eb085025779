"""A run's results checked against annotations: LIPN's recall of the annotated patches, DMIN's
attention AUC and top-k precision for the annotated class, per slide and over the cohort.

A patch is *annotated* when at least ``min_overlap`` of its footprint lies inside the slide's
annotations of that class (unclassified annotations count; exclusions, ASAP group ``_2``, are cut
out; Camelyon16's groups ``_0`` and ``_1`` count as tumour). A slide without an annotation file has
no annotated patch (Camelyon16's normal slides).

* ``lipn_recall`` = annotated patches LIPN kept (read at 20x) / annotated patches;
* ``attention_auc``: ROC AUC of DMIN's attention logits (``scores``) of the class's branch,
  annotated against not, over the patches DMIN scored (all tissue patches under HDMIL†);
* ``topk_precision``: the share of the k patches of highest attention that are annotated.

Slides without annotated patches have NaN for all three; the cohort row pools the recall
(Σ kept annotated / Σ annotated) and averages the AUC and top-k precision over the slides that
have them.

>>> rows, cohort = evaluate_annotations("results/", "annotations/", cls="tumor")
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.annotations import (
    AnnotationError, Annotations, find_annotation_file, patch_fractions, read_annotations,
)

__all__ = ["CSV_COLUMNS", "annotated_patches", "evaluate_annotations", "evaluate_slide", "result_folders"]

CSV_COLUMNS = ("slide", "has_annotation", "n_patches", "n_annotated", "n_kept", "n_kept_annotated",
               "lipn_recall", "attention_auc", "topk_precision", "k")
CLASS_ALIASES = {"tumor": ("tumor", "tumour", "_0", "_1")}  # Camelyon16's ASAP groups


def _matches(a: Any, cls: str | None) -> bool:
    if a.exclusion or a.object_type not in ("annotation", ""):
        return False
    name = (a.classification or a.group or "").casefold()
    if cls is None or not name:
        return True
    return name in CLASS_ALIASES.get(cls.casefold(), (cls.casefold(),))


def annotated_patches(ann: Annotations | None, coords: np.ndarray, size: int, cls: str | None = None,
                      min_overlap: float = 0.5) -> np.ndarray:
    """bool [N]: patches (level-0 top-left ``coords``, ``size`` px) with at least ``min_overlap``
    of their footprint inside ``ann``'s annotations of class ``cls``, exclusions cut out."""
    import dataclasses

    if ann is None:
        return np.zeros(len(coords), bool)
    keep = tuple(a for a in ann.items if _matches(a, cls) or a.exclusion)
    if not any(not a.exclusion for a in keep):
        return np.zeros(len(coords), bool)
    region = dataclasses.replace(ann, items=keep).region()
    return patch_fractions(region, coords, size) >= min_overlap


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, score))


def evaluate_slide(annotated: np.ndarray, kept: np.ndarray, scores: np.ndarray, attention: np.ndarray,
                   k: int = 8) -> dict[str, Any]:
    """The numbers of one slide from its annotated [N], kept [N] and the class's scores /
    attention [N] (NaN where DMIN did not score the patch)."""
    n_ann = int(annotated.sum())
    hits = int((annotated & kept).sum())
    scored = np.isfinite(scores)
    att = np.where(np.isfinite(attention), attention, -np.inf)
    top = np.argsort(-att, kind="stable")[:k]
    top = top[np.isfinite(att[top])]
    return {
        "n_patches": int(len(annotated)), "n_annotated": n_ann, "n_kept": int(kept.sum()),
        "n_kept_annotated": hits, "lipn_recall": hits / n_ann if n_ann else math.nan,
        "attention_auc": _auc(annotated[scored], scores[scored]) if n_ann else math.nan,
        "topk_precision": float(annotated[top].mean()) if n_ann and len(top) else math.nan, "k": int(k),
    }


def result_folders(results: str | os.PathLike) -> list[Path]:
    """The result folders under ``results`` (each with report.json and patches.h5), or ``results``
    itself when it is one; AnnotationError when there is none."""
    root = Path(results)
    if (root / "report.json").is_file():
        return [root]
    found = sorted(p.parent for p in root.glob("*/report.json") if (p.parent / "patches.h5").is_file())
    if not found:
        raise AnnotationError(f"{root}: no results (<slide>/report.json and patches.h5; run hdmil predict)")
    return found


def _read_result(folder: Path) -> dict[str, Any]:
    import h5py

    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    with h5py.File(folder / "patches.h5", "r") as f:
        arrays = {k: f[k][:] for k in ("coords", "kept", "scores", "attention")}
        size = int(f.attrs["patch_size_level0"])
    stem = Path(report["path"]).stem if report.get("path") else str(report.get("slide"))
    return {"report": report, "stem": stem, "size": size, **arrays}


def _slide_annotations(folder: str | os.PathLike, stem: str, slide_path: str | None) -> Annotations | None:
    """The slide's annotations in level-0 px; None when the folder has no file for it."""
    try:
        path = find_annotation_file(folder, stem)
    except AnnotationError:
        return None
    ann = read_annotations(path)
    if ann.frame == "level0" or not slide_path or not os.path.exists(slide_path):
        return ann.translated(0, 0, "level0")  # QuPath's frame is ours unless the slide has bounds
    from hdmil.slide import open_slide

    with open_slide(slide_path) as slide:
        return ann.for_slide(slide)


def _class_index(classes: list[str], cls: str, folder: Path) -> int:
    lower = [c.casefold() for c in classes]
    if cls.casefold() not in lower:
        raise AnnotationError(f"{folder}: the model's classes {classes} have no {cls!r} (--class)")
    return lower.index(cls.casefold())


def evaluate_annotations(results: str | os.PathLike, annotations: str | os.PathLike, cls: str = "tumor",
                         min_overlap: float = 0.5, k: int = 8) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per result folder under ``results`` (``CSV_COLUMNS``) and the cohort row."""
    if not 0.0 < min_overlap <= 1.0:
        raise AnnotationError(f"--min-overlap must be in (0, 1], not {min_overlap}")
    if not Path(annotations).is_dir():
        raise AnnotationError(f"{annotations}: not a folder of annotation files")
    rows = []
    for folder in result_folders(results):
        r = _read_result(folder)
        c = _class_index(list(r["report"]["classes"]), cls, folder)
        ann = _slide_annotations(annotations, r["stem"], r["report"].get("path"))
        annotated = annotated_patches(ann, r["coords"], r["size"], cls, min_overlap)
        row = {"slide": r["report"].get("slide") or r["stem"], "has_annotation": ann is not None}
        rows.append({**row, **evaluate_slide(annotated, r["kept"].astype(bool), r["scores"][:, c],
                                             r["attention"][:, c], k)})
    return rows, cohort_row(rows)


def cohort_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled recall, mean AUC and top-k precision over the slides that have them."""
    n_ann = sum(r["n_annotated"] for r in rows)

    def mean(key: str) -> float:
        v = [r[key] for r in rows if not math.isnan(r[key])]
        return float(np.mean(v)) if v else math.nan

    return {
        "slide": "cohort", "has_annotation": sum(r["has_annotation"] for r in rows),
        "n_patches": sum(r["n_patches"] for r in rows), "n_annotated": n_ann,
        "n_kept": sum(r["n_kept"] for r in rows),
        "n_kept_annotated": sum(r["n_kept_annotated"] for r in rows),
        "lipn_recall": sum(r["n_kept_annotated"] for r in rows) / n_ann if n_ann else math.nan,
        "attention_auc": mean("attention_auc"), "topk_precision": mean("topk_precision"),
        "k": rows[0]["k"] if rows else 0,
    }
