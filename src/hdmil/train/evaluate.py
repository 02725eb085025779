"""Test-set evaluation of trained models, and the paper's k-fold table (docs/method.md §5).

Two ways to run a trained model on a slide's precomputed features:

- **HDMIL†**: DMIN on all patches, student evaluation path (``mask=None``: class c pools over
  the instances with ``s[:, c] > 0``);
- **HDMIL**: LIPN screens the slide's LR patches and DMIN pools class c over LIPN's keep mask for
  c only, as hierarchical inference does (reading only the kept HR patches gives the same result
  on the same features).

Both are ``hdmil.inference.predict_bag``, the one bag-to-prediction function of the package.

``evaluate_folds`` runs both per fold and gives per-fold and mean ± std AUC, ACC and macro F1.
"""

from __future__ import annotations

import csv
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdmil.errors import CheckpointError, HDMILError, check_cancelled
from hdmil.files import atomic_write
from hdmil.inference import predict_bag
from hdmil.train.data import Cohort
from hdmil.train.metrics import Metrics, classification_metrics, mean_std
from hdmil.train.splits import Split

__all__ = [
    "METHODS",
    "EvalResult",
    "FoldTable",
    "evaluate_folds",
    "evaluate_model",
    "find_fold_checkpoints",
    "model_split",
]

Progress = Callable[[str, int, int], None]
HDMIL_DAGGER = "HDMIL†"  # DMIN on all patches
HDMIL = "HDMIL"  # LIPN + DMIN
METHODS = (HDMIL_DAGGER, HDMIL)


@dataclass
class EvalResult:
    """Per-slide predictions of one model on one set of slides, and their metrics."""

    method: str
    classes: tuple[str, ...]
    slide_ids: list[str]
    labels: np.ndarray  # int64 [S]
    probabilities: np.ndarray  # float32 [S, C]
    kept_ratio: np.ndarray  # float32 [S]: share of patches DMIN pooled over (any class)
    metrics: Metrics = field(default_factory=dict)

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "slide_id": sid,
                "label": self.classes[int(y)],
                "prediction": self.classes[int(p)],
                **{f"p_{c}": float(self.probabilities[i, j]) for j, c in enumerate(self.classes)},
                "kept_ratio": float(self.kept_ratio[i]),
            }
            for i, (sid, y, p) in enumerate(zip(self.slide_ids, self.labels, self.predictions))
        ]

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        rows = self.rows()
        with atomic_write(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["slide_id"])
            writer.writeheader()
            writer.writerows(rows)
        return path


def _as_model(model: Any, cohort: Cohort) -> Any:
    """An ``HDMILModel``: the model itself, or a bare DMIN wrapped as a checkpoint without LIPN."""
    from hdmil.checkpoint import HDMILModel
    from hdmil.models import DMIN

    if not isinstance(model, DMIN):
        return model
    return HDMILModel(dmin=model, lipn=None, config={}, classes=list(cohort.classes),
                      path=Path("the model"), sha256="")


def _check_fit(model: Any, cohort: Cohort) -> None:
    from hdmil.features.stain import check_feature_stain  # a model never runs on other patches

    classes = model.config.get("classes")
    if classes is not None and tuple(classes) != tuple(cohort.classes):
        raise CheckpointError(
            f"the model's classes ({', '.join(classes)}) differ from the labels' "
            f"({', '.join(cohort.classes)}); pass labels with the same classes"
        )
    if model.dmin.n_classes != cohort.n_classes:
        raise CheckpointError(
            f"the model has {model.dmin.n_classes} classes, the labels {cohort.n_classes}"
        )
    bags = cohort.require_bags()
    check_feature_stain(model.config.get("encoder_recipe"), bags.first_attrs(),
                        str(next(iter(bags.files.values()), "the feature files")))
    if bags.dim != model.dmin.in_dim:
        raise CheckpointError(
            f"the model takes {model.dmin.in_dim}-d features, the feature files hold {bags.dim}-d ones "
            "(another encoder?)"
        )


@torch.no_grad()
def evaluate_model(
    model: Any,
    cohort: Cohort,
    split_ids: Sequence[str],
    use_lipn: bool,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> EvalResult:
    """Predict every slide of ``split_ids`` with HDMIL (``use_lipn``) or HDMIL† and score them.

    ``model`` is what ``hdmil.checkpoint.load_model`` returns (or a bare DMIN for HDMIL†).
    """
    model = _as_model(model, cohort)
    if use_lipn and model.lipn is None:
        raise CheckpointError(
            "this checkpoint has no LIPN: train one with `hdmil train-lipn`, or evaluate with "
            "--no-lipn (HDMIL† only)"
        )
    _check_fit(model, cohort)
    bags = cohort.require_bags()
    if use_lipn:
        model.lipn.eval()
    probs, kept = [], []
    stage = HDMIL if use_lipn else HDMIL_DAGGER
    for i, sid in enumerate(split_ids):
        check_cancelled(cancel, "evaluation")
        pred = _predict_slide(model, bags, sid, use_lipn)
        probs.append(pred.probabilities)
        kept.append(pred.kept_ratio)
        if progress is not None:
            progress(stage, i + 1, len(split_ids))
    labels = cohort.labels_of(split_ids)
    probabilities = (
        np.stack(probs).astype(np.float32)
        if probs
        else np.zeros((0, cohort.n_classes), np.float32)
    )
    return EvalResult(
        method=stage,
        classes=cohort.classes,
        slide_ids=list(split_ids),
        labels=labels,
        probabilities=probabilities,
        kept_ratio=np.asarray(kept, dtype=np.float32),
        metrics=classification_metrics(labels, probabilities),
    )


def _predict_slide(model: Any, bags: Any, sid: str, use_lipn: bool) -> Any:
    """``predict_bag`` on one slide's feature file (its LR patches and grid only for HDMIL)."""
    if not use_lipn:
        return predict_bag(model, bags[sid].features, use_lipn=False)
    index = bags.grid_index(sid) if model.lipn.dilates else None
    return predict_bag(model, bags[sid].features, bags.lr_patches(sid), index, use_lipn=True)


# -- folds --------------------------------------------------------------------------------------


def find_fold_checkpoints(path: str | Path) -> list[Path]:
    """A checkpoint file, or the per-fold checkpoints of a training directory
    (``fold_<i>/hdmil.safetensors``, else ``fold_<i>/dmin.safetensors``), sorted by fold."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    found = []
    for d in path.iterdir():
        if d.is_dir() and d.name.startswith("fold_") and d.name[5:].isdigit():
            for name in ("hdmil.safetensors", "dmin.safetensors"):
                if (d / name).is_file():
                    found.append((int(d.name[5:]), d / name))
                    break
    if not found:
        for name in ("hdmil.safetensors", "dmin.safetensors"):
            if (path / name).is_file():
                return [path / name]
        raise CheckpointError(
            f"{path}: no checkpoints found (expected fold_<i>/hdmil.safetensors or "
            "fold_<i>/dmin.safetensors)"
        )
    return [p for _, p in sorted(found)]


def model_split(config: Mapping[str, Any]) -> Split | None:
    """The split a checkpoint was trained on, from its provenance (None when not recorded)."""
    prov = config.get("provenance") or {}
    split = prov.get("split")
    if not split:
        return None
    return Split(
        tuple(split.get("train", ())),
        tuple(split.get("val", ())),
        tuple(split.get("test", ())),
        fold=int(prov.get("fold", 0) or 0),
    )


@dataclass
class FoldTable:
    """The paper's table: one row per fold and method, then mean ± std over folds."""

    rows: list[dict[str, Any]]  # fold, method, auc, acc, f1, kept_ratio, n
    results: list[EvalResult] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return [m for m in METHODS if any(r["method"] == m for r in self.rows)]

    def summary(self) -> dict[str, dict[str, tuple[float, float]]]:
        """method -> metric -> (mean, std) over folds."""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for method in self.methods:
            rows = [r for r in self.rows if r["method"] == method]
            out[method] = {
                k: mean_std([r[k] for r in rows]) for k in ("auc", "acc", "f1", "kept_ratio")
            }
        return out

    def format(self) -> str:
        """A plain-text table: per-fold rows, then a ``mean ± std`` row per method."""
        head = f"{'fold':>6}  {'method':<7} {'n':>4}  {'AUC':>6}  {'ACC':>6}  {'F1':>6}  {'kept':>6}"
        lines = [head, "-" * len(head)]
        pct = lambda v: "   nan" if math.isnan(v) else f"{100 * v:6.2f}"  # noqa: E731
        for r in self.rows:
            lines.append(
                f"{r['fold']:>6}  {r['method']:<7} {r['n']:>4}  {pct(r['auc'])}  "
                f"{pct(r['acc'])}  {pct(r['f1'])}  {pct(r['kept_ratio'])}"
            )
        lines.append("-" * len(head))
        ms = lambda m, s: "nan" if math.isnan(m) else f"{100 * m:.2f} ± {100 * s:.2f}"  # noqa: E731
        for method, stats in self.summary().items():
            lines.append(
                f"{'mean ± std':>11}  {method:<7}  AUC {ms(*stats['auc'])}  ACC {ms(*stats['acc'])}"
                f"  F1 {ms(*stats['f1'])}  kept {ms(*stats['kept_ratio'])}"
            )
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        cols = ["fold", "method", "n", "auc", "acc", "f1", "kept_ratio"]
        with atomic_write(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: r[k] for k in cols})
            for method, stats in self.summary().items():
                for which, idx in (("mean", 0), ("std", 1)):
                    writer.writerow(
                        {"fold": which, "method": method, "n": "",
                         **{k: stats[k][idx] for k in ("auc", "acc", "f1", "kept_ratio")}}
                    )
        return path


def evaluate_folds(
    models: Sequence[Any],
    cohort: Cohort,
    splits: Sequence[Split] | None = None,
    use_lipn: bool = True,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> FoldTable:
    """Evaluate each fold's model on its test set: HDMIL† always, HDMIL too with ``use_lipn``.

    ``models``: checkpoint paths or loaded models. A model's fold and test slides come from
    ``splits`` (matched by the fold in its provenance, else by position) or, without splits, from
    the split recorded in the checkpoint.
    """
    from hdmil.checkpoint import load_model

    by_fold = {s.fold: s for s in splits} if splits else {}
    table_rows: list[dict[str, Any]] = []
    results: list[EvalResult] = []
    for pos, item in enumerate(models):
        model = _as_model(load_model(item) if isinstance(item, (str, Path)) else item, cohort)
        config = model.config
        recorded = model_split(config)
        fold = (config.get("provenance") or {}).get("fold")
        fold = pos if fold is None else int(fold)
        if splits:
            split = by_fold.get(fold) or (splits[pos] if pos < len(splits) else None)
            if split is None:
                raise HDMILError(f"no split for fold {fold} among the given splits")
        elif recorded is not None:
            split = recorded
        else:
            raise HDMILError(
                f"{item if isinstance(item, (str, Path)) else 'model'}: the checkpoint records "
                "no split; pass --splits"
            )
        if not split.test:
            raise HDMILError(
                f"fold {fold}: the test split is empty (no slide with labels and features in it); "
                "nothing to evaluate"
            )
        missing = [s for s in split.test if s not in set(cohort.slide_ids)]
        if missing:
            raise HDMILError(
                f"fold {fold}: {len(missing)} test slides have no label or features: "
                f"{', '.join(missing[:5])}"
            )
        methods = (False, True) if use_lipn else (False,)
        for lipn_on in methods:
            res = evaluate_model(model, cohort, split.test, lipn_on, progress, cancel)
            results.append(res)
            table_rows.append(
                {
                    "fold": fold,
                    "method": res.method,
                    "n": len(res.slide_ids),
                    **res.metrics,
                    "kept_ratio": float(res.kept_ratio.mean()) if len(res.kept_ratio) else math.nan,
                }
            )
    return FoldTable(table_rows, results)
