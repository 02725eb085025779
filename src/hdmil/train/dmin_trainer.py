"""Training DMIN on feature bags (docs/method.md §3): one bag per step, class-balanced, early stopping.

``train_dmin(cohort, split, cfg, out_dir)`` writes into ``out_dir``:

- ``dmin.safetensors``: the best-validation model (``hdmil.checkpoint`` format, with its config,
  classes, encoder, patch geometry and provenance), loadable with ``load_model``;
- ``log.csv``: one row per epoch (train loss and each loss term, validation loss / AUC / ACC,
  kept ratios, seconds);
- ``last.safetensors`` + ``state.json``: the model and optimizer after the last finished epoch;
  ``resume=True`` continues from them (``hdmil.train.loop``).

The epochs, their seeds, early stopping and resume are ``hdmil.train.loop.fit``'s; this module is
DMIN's part: a class-balanced epoch of bags, validation, and the best checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hdmil.errors import HDMILError, check_cancelled
from hdmil.files import to_jsonable
from hdmil.train.config import DMINTrainConfig
from hdmil.train.data import Cohort
from hdmil.train.loop import (
    LoopConfig,
    Progress,
    RunFiles,
    TrainResult,
    TrainTask,
    fit,
    resolve_device,
    seed_everything,
)
from hdmil.train.metrics import classification_metrics
from hdmil.train.splits import Split

__all__ = [
    "DMINTask",
    "TrainResult",
    "branch_auc",
    "build_dmin",
    "train_dmin",
    "validate_dmin",
]

BEST_NAME = "dmin.safetensors"
LAST_NAME = "last.safetensors"
STATE_NAME = "state.json"
LOG_NAME = "log.csv"
GEOMETRY_KEYS = ("patch_size_level0", "patch_px", "magnification", "mpp")


def balanced_order(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices drawn with replacement, each class equally likely (weights 1 / class count)."""
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(
        torch.as_tensor(weights, dtype=torch.float64), n, replacement=True, generator=gen
    ).numpy()


def feature_provenance(cohort: Cohort) -> dict[str, Any]:
    """Encoder and patch geometry from the feature files' attributes (for the checkpoint)."""
    from hdmil.features.stain import check_same_stain  # the first file's record stands for all

    bags = cohort.require_bags()
    check_same_stain(bags.files)
    attrs = bags.first_attrs()
    keys = ("encoder", "dim", "patch_size_level0", "patch_px", "magnification", "mpp")
    info = {k: attrs[k] for k in keys if k in attrs}
    info["dim"] = int(attrs.get("dim", bags.dim))
    info["instances"] = bags.instances
    if bags.instances == "region":
        # DMIN's instances are region embeddings; the file's "dim" is its patch features' width
        info["patch_dim"], info["dim"] = info["dim"], int(bags.dim)
        if attrs.get("slpd_checkpoint"):
            info["slpd_checkpoint"] = str(attrs["slpd_checkpoint"])  # what `hdmil predict` embeds with
    info.update(_encoder_record(attrs))
    first = next(iter(bags.files.values()), None)
    info["features_dir"] = str(first.parent.resolve()) if first is not None else None
    return info


def _encoder_record(attrs: dict[str, Any]) -> dict[str, Any]:
    """``encoder`` and ``encoder_recipe`` for the checkpoint, from the feature file's attributes
    (ours, or TRIDENT's ``encoder`` on ``features``): what ``hdmil predict`` rebuilds."""
    from hdmil.features.recipe import recipe_from_attrs

    recipe = recipe_from_attrs(attrs)
    if recipe is None:
        return {}  # CLAM writes no encoder: predict asks for --encoder
    return {"encoder": recipe.name, "encoder_recipe": recipe.to_dict()}


def build_dmin(cfg: DMINTrainConfig, in_dim: int, n_classes: int) -> nn.Module:
    from hdmil.models.dmin import DMIN

    return DMIN(cfg.dmin_config(in_dim, n_classes))


def dmin_step(model: nn.Module, x: torch.Tensor, y: int, dcfg) -> tuple[torch.Tensor, dict, Any]:
    """One training forward pass: (total loss, {term: float}, DMINOutput)."""
    from hdmil.models.losses import dmin_loss

    out = model(x, y)
    total, terms = dmin_loss(out, y, dcfg)
    return total, {k: float(v) for k, v in terms.items() if k != "total"}, out


@torch.no_grad()
def validate_dmin(
    model: nn.Module,
    cohort: Cohort,
    slide_ids: Sequence[str],
    device: torch.device,
    cancel: threading.Event | None = None,
) -> dict[str, float]:
    """Student (masked, ``M = 1[s > 0]``) path on each slide: loss = mean NLL, AUC, ACC, kept,
    and the branch AUC (``branch_auc``)."""
    bags = cohort.require_bags()
    model.eval()
    probs, kept, nll, top = [], [], [], []
    for sid in slide_ids:
        check_cancelled(cancel, "training")
        x = bags[sid].features.to(device)
        pred = model.predict(x, None)
        p = pred.probabilities.detach().float().cpu().numpy()
        probs.append(p)
        nll.append(-math.log(max(float(p[cohort.label_of(sid)]), 1e-12)))
        kept.append(float(pred.kept_ratio))
        top.append(pred.scores.amax(dim=0).float().numpy())
    labels = cohort.labels_of(slide_ids)
    m = classification_metrics(labels, np.stack(probs)) if probs else {}
    return {
        "val_loss": float(np.mean(nll)) if nll else math.nan,
        "val_auc": m.get("auc", math.nan),
        "val_acc": m.get("acc", math.nan),
        "val_kept_ratio": float(np.nanmean(kept)) if kept else math.nan,
        "val_branch_auc": branch_auc(labels, np.stack(top)) if top else math.nan,
    }


def branch_auc(labels: np.ndarray, top_scores: np.ndarray) -> float:
    """Does each class's attention branch find that class's evidence? labels [S], top_scores
    [S, C] = each slide's highest attention logit ``max_j s[j, c]`` per branch.

    Two classes: the ROC AUC of branch 1's top score for class 1 against class 0 (as ``auc``: index
    1 is the positive class). More: the mean one-vs-rest AUC of branch c for class c. Near 1, the
    positive branch's top instance marks the positive slides (a tumour branch that attends to
    tumour); near or under 0.5 the branches swapped roles: the slide call can still be right while
    the positive class's heatmap points at the wrong tissue. NaN with one class present.
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    top_scores = np.asarray(top_scores, dtype=np.float64)
    classes = [1] if top_scores.shape[1] == 2 else range(top_scores.shape[1])
    aucs = [roc_auc_score(labels == c, top_scores[:, c]) for c in classes
            if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean(aucs)) if aucs else math.nan


def _check_split(cohort: Cohort, split: Split) -> None:
    unknown = [s for s in split.all_ids if s not in set(cohort.slide_ids)]
    if unknown:
        raise HDMILError(
            f"fold {split.fold}: {len(unknown)} slides of the split are not in the cohort "
            f"(no label or no features): {', '.join(unknown[:5])}"
        )
    if not split.train:
        raise HDMILError(f"fold {split.fold}: the training set is empty")
    if not split.val:
        raise HDMILError(f"fold {split.fold}: the validation set is empty (needed to stop early)")
    present = set(cohort.labels_of(split.train).tolist())
    if len(present) < 2:
        raise HDMILError(
            f"fold {split.fold}: the training set holds only class "
            f"{cohort.classes[present.pop()]!r}; every class needs training slides"
        )


class DMINTask(TrainTask):
    """DMIN's part of ``fit``: class-balanced bags (one per step), validation on ``split.val``,
    ``dmin.safetensors`` at every new best validation loss."""

    def __init__(self, cohort: Cohort, split: Split, cfg: DMINTrainConfig, out_dir: Path,
                 device: torch.device) -> None:
        self.cohort, self.split, self.cfg, self.device = cohort, split, cfg, device
        self.bags = cohort.require_bags()
        seed_everything(cfg.seed)  # the initial weights
        self.dcfg = cfg.dmin_config(self.bags.dim, cohort.n_classes)
        self.model = build_dmin(cfg, self.bags.dim, cohort.n_classes).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr,
                                          weight_decay=cfg.weight_decay)
        self.train_ids = list(split.train)
        self.train_labels = cohort.labels_of(self.train_ids)
        self.provenance = feature_provenance(cohort)
        self.best_path = out_dir / BEST_NAME
        self.state_path = out_dir / STATE_NAME

    def train_epoch(self, epoch: int, seed: int | None,
                    cancel: threading.Event | None) -> dict[str, float]:
        self.model.train()
        sums: dict[str, float] = {}
        order = balanced_order(self.train_labels, len(self.train_ids), seed)
        for i in order:
            check_cancelled(cancel, "training")
            x = self.bags[self.train_ids[i]].features.to(self.device)
            total, terms, _ = dmin_step(self.model, x, int(self.train_labels[i]), self.dcfg)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            sums["train_loss"] = sums.get("train_loss", 0.0) + float(total.detach())
            for k, v in terms.items():
                sums[f"train_{k}"] = sums.get(f"train_{k}", 0.0) + v
        return {k: v / len(order) for k, v in sums.items()}

    def validate(self, epoch: int, cancel: threading.Event | None) -> dict[str, float]:
        return validate_dmin(self.model, self.cohort, self.split.val, self.device, cancel)

    def save_best(self, epoch: int, row: dict[str, Any], best: dict[str, Any]) -> None:
        from hdmil.checkpoint import save_checkpoint

        config = _checkpoint_config(self.cfg, self.cohort, self.split, self.provenance, epoch, best)
        # plain JSON values: numpy scalars and paths from h5 attributes become plain values
        save_checkpoint(self.best_path, {"dmin": self.model}, to_jsonable(config))

    def state(self) -> dict[str, Any]:
        return {"train_ids": self.train_ids, "val_ids": list(self.split.val),
                "config": self.cfg.to_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("train_ids") != self.train_ids or state.get("val_ids") != list(self.split.val):
            raise HDMILError(
                f"{self.state_path}: this run was trained on another split; resume with the same "
                "--splits / --folds / --seed, or write to a new --out"
            )


def train_dmin(
    cohort: Cohort,
    split: Split,
    cfg: DMINTrainConfig | None = None,
    out_dir: str | Path = "dmin-run",
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train DMIN on ``split.train``, stop early on ``split.val`` loss, keep the best checkpoint.

    ``progress("dmin", epoch, max_epochs)`` after every epoch; ``on_epoch(row)`` gets the log row.
    ``cancel`` (a ``threading.Event``) stops between bags with ``Cancelled``; the last finished
    epoch stays on disk for ``resume=True``.
    """
    cfg = cfg or DMINTrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_split(cohort, split)
    task = DMINTask(cohort, split, cfg, out_dir, resolve_device(cfg.device))
    loop = LoopConfig(max_epochs=cfg.max_epochs, seed=cfg.seed, monitor="val_loss",
                      patience=cfg.patience, min_epochs=cfg.min_epochs, stage="dmin")
    files = RunFiles(out_dir / LOG_NAME, out_dir / LAST_NAME, out_dir / STATE_NAME)
    done = fit(task, loop, files, resume=resume, progress=progress, cancel=cancel,
               on_epoch=on_epoch)
    if not task.best_path.exists():
        raise HDMILError(f"{out_dir}: no epoch finished, so no checkpoint was written")
    return TrainResult.of(done, out_dir, task.best_path)


def _checkpoint_config(
    cfg: DMINTrainConfig,
    cohort: Cohort,
    split: Split,
    features: dict[str, Any],
    epoch: int,
    best: dict[str, float],
) -> dict[str, Any]:
    """What ``save_checkpoint`` stores beside the modules' own configs."""
    config: dict[str, Any] = {
        "classes": list(cohort.classes),
        "encoder": features.get("encoder"),
        "encoder_recipe": features.get("encoder_recipe"),
        "feature_dim": int(features["dim"]),
        "instances": features["instances"],
        **{k: features[k] for k in ("patch_dim", "slpd_checkpoint") if k in features},
        "target_keep_rate": cfg.keep_rate,
        **{k: features[k] for k in GEOMETRY_KEYS if k in features},
        "provenance": {
            "stage": "dmin",
            "features_dir": features.get("features_dir"),
            "labels": str(cohort.source) if cohort.source else None,
            "fold": split.fold,
            "split": {"train": list(split.train), "val": list(split.val), "test": list(split.test)},
            "seed": cfg.seed,
            "epochs": epoch + 1,
            "best_val": best,
            "train": cfg.to_dict(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    return {k: v for k, v in config.items() if v is not None}
