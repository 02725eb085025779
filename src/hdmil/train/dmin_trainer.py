"""Training DMIN on feature bags (METHOD §3): one bag per step, class-balanced, early stopping.

``train_dmin(cohort, split, cfg, out_dir)`` writes into ``out_dir``:

- ``dmin.safetensors``: the best-validation model (``hdmil.checkpoint`` format, with its config,
  classes, encoder, patch geometry and provenance), loadable with ``load_model``;
- ``log.csv``: one row per epoch (train loss and each loss term, validation loss / AUC / ACC,
  kept ratios, seconds);
- ``last.safetensors`` + ``state.json``: the model and optimizer after the last finished epoch;
  ``resume=True`` continues from them. Optimizer tensors go into the safetensors file, everything
  else into JSON, so resuming executes no pickled code.

Every epoch is seeded from ``(seed, epoch)``, so a resumed run draws the same bags, dropout and
Gumbel noise as an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hdmil.errors import Cancelled, CheckpointError, HDMILError
from hdmil.train.data import Cohort
from hdmil.train.metrics import classification_metrics
from hdmil.train.splits import Split

__all__ = [
    "EarlyStopping",
    "TrainConfig",
    "TrainResult",
    "branch_auc",
    "build_dmin",
    "dmin_config",
    "train_dmin",
]

Progress = Callable[[str, int, int], None]
BEST_NAME = "dmin.safetensors"
LAST_NAME = "last.safetensors"
STATE_NAME = "state.json"
LOG_NAME = "log.csv"
GEOMETRY_KEYS = ("patch_size_level0", "patch_px", "magnification", "mpp")


@dataclass
class TrainConfig:
    """Everything a training run needs; defaults are METHOD §3 (DMIN) and §4 (LIPN)."""

    # DMIN architecture (in_dim and n_classes come from the data)
    hidden: int = 512
    attn_dim: int = 256
    dropout: float = 0.25
    cheby_degree: int = 12  # 16 for TCGA-NSCLC
    tau: float = 0.7  # Gumbel-sigmoid temperature
    gamma: float = 0.5  # mask threshold
    k_sample: int = 32  # instances per side for the clustering loss (clamped to N/2)
    inst_out_of_class: bool = False  # other branches' top-k as negatives also for 2 classes (ours)
    # hybrid loss
    keep_rate: float = 0.6  # target kept ratio r (0.7 for TCGA-NSCLC / BRCA)
    w_ce: float = 0.7
    w_clu: float = 0.3
    w_emb: float = 0.5
    w_kl: float = 0.5
    w_rate: float = 2.0
    # DMIN optimisation
    lr: float = 3e-4  # 3e-5 for TCGA-NSCLC
    weight_decay: float = 1e-5
    max_epochs: int = 200
    min_epochs: int = 50  # early stopping may stop from this epoch on
    patience: int = 20
    # LIPN (METHOD §4)
    lipn_tau: float = 0.7
    lipn_lr: float = 1e-4
    lipn_weight_decay: float = 1e-5
    lipn_max_epochs: int = 100
    lipn_min_epochs: int = 0
    lipn_patience: int = 5
    lipn_batch_patches: int = 2048  # slides are batched into one LIPN step up to this many patches
    # None: the paper's M_LR = 1[P > 0.5]. A share (say 0.97): after training, lower LIPN's
    # threshold until it keeps that share of the validation instances DMIN keeps (never above 0.5)
    lipn_recall: float | None = None
    # "mask": the paper's target M_HR = 1[s > 0] and LIPN's straight-through mask; "soft": target
    # σ(s / τ) and LIPN's probability, the same boundary (σ(s/τ) > 0.5 ⟺ s > 0) with DMIN's margin
    lipn_targets: str = "mask"
    # ours, instead of lipn_recall: one threshold per class, the highest whose kept set holds this
    # share of DMIN's attention (pooling weight) for the class on the validation slides; one share
    # for every class, or one per class (in class order)
    lipn_attention: float | tuple[float, ...] | None = None
    # ours: per class, rings of neighbouring patches that join each patch LIPN keeps for the class
    # (LIPNConfig.dilation; None: none, the paper)
    lipn_dilation: tuple[int, ...] | None = None
    # ours: a random stain change per training slide (hdmil.augment.StainJitter strength; 0 = off,
    # the paper), so LIPN's 16 px view does not learn the training slides' stains
    lipn_stain_jitter: float = 0.0
    # "l1": the paper's L1 between LIPN's and DMIN's masks; "bce" (ours, with soft targets):
    # cross-entropy between LIPN's probabilities and σ(s / τ), which ranks rare tumour patches higher
    lipn_match: str = "l1"
    # ours: LIPN's probabilities (thresholds, inference) averaged over 1, 4 or 8 orientations
    lipn_views: int = 1
    # run
    seed: int = 0
    instances: str = "patch"
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TrainResult:
    """What a run produced: where, which epoch was best and its validation metrics."""

    out_dir: Path
    checkpoint: Path  # best-validation checkpoint
    log_path: Path
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int  # epochs finished in total (including those before a resume)
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


# -- shared helpers (the LIPN trainer uses them too) ----------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise HDMILError(f"unknown device {name!r}") from exc


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("training cancelled")


class EarlyStopping:
    """Stop when the validation loss has not improved for ``patience`` epochs, but never before
    ``min_epochs`` epochs have run. ``step`` returns True when the loss is a new best."""

    def __init__(self, patience: int, min_epochs: int = 0) -> None:
        self.patience = patience
        self.min_epochs = min_epochs
        self.best = math.inf
        self.best_epoch = -1
        self.since_best = 0

    def step(self, epoch: int, loss: float) -> bool:
        if loss < self.best:
            self.best, self.best_epoch, self.since_best = float(loss), epoch, 0
            return True
        self.since_best += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        return epoch + 1 >= self.min_epochs and self.since_best >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "since_best": self.since_best}

    def load(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.since_best = int(state["since_best"])


class CSVLog:
    """An epoch log that survives a resume: rows after the resumed epoch are dropped."""

    def __init__(self, path: Path, resume_after: int | None = None) -> None:
        self.path = path
        self.columns: list[str] | None = None
        self.rows: list[dict[str, Any]] = []
        if resume_after is not None and path.exists():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if int(r["epoch"]) <= resume_after]
            self._rewrite()
        elif path.exists():
            path.unlink()

    def append(self, row: dict[str, Any]) -> None:
        if self.columns is None:
            self.columns = list(row)
        self.rows.append({k: row.get(k, "") for k in self.columns})
        self._rewrite()

    def _rewrite(self) -> None:
        # rewriting a few hundred rows per epoch costs nothing and keeps the file whole
        if self.columns is None:
            return
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: _fmt(r.get(k, "")) for k in self.columns})
        os.replace(tmp, self.path)


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if dataclasses.is_dataclass(o):
        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_train_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Model + optimizer tensors into ``path`` (safetensors); returns the optimizer's non-tensor
    state for the JSON side."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
    }
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return {"param_groups": opt["param_groups"], "scalars": scalars}


def load_train_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, opt_json: dict[str, Any]
) -> None:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read the training state ({exc})") from exc
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_sd)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: the saved model does not fit this configuration; start without --resume "
            f"or use the same settings ({str(exc).splitlines()[0]})"
        ) from exc
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, sc in opt_json.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": opt_json["param_groups"]})


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
    bags = cohort.require_bags()
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
    first = next(iter(bags.files.values()), None)
    info["features_dir"] = str(first.parent.resolve()) if first is not None else None
    return info


# -- DMIN ---------------------------------------------------------------------------------------


def dmin_config(cfg: TrainConfig, in_dim: int, n_classes: int):
    """The DMINConfig a TrainConfig stands for (fields DMINConfig does not have are left out)."""
    from hdmil.models.dmin import DMINConfig

    wanted = {
        "in_dim": in_dim,
        "n_classes": n_classes,
        "hidden": cfg.hidden,
        "attn_dim": cfg.attn_dim,
        "dropout": cfg.dropout,
        "cheby_degree": cfg.cheby_degree,
        "tau": cfg.tau,
        "gamma": cfg.gamma,
        "k_sample": cfg.k_sample,
        "inst_out_of_class": cfg.inst_out_of_class,
        "target_keep_rate": cfg.keep_rate,
        "w_ce": cfg.w_ce,
        "w_clu": cfg.w_clu,
        "w_emb": cfg.w_emb,
        "w_kl": cfg.w_kl,
        "w_rate": cfg.w_rate,
    }
    names = {f.name for f in dataclasses.fields(DMINConfig)}
    return DMINConfig(**{k: v for k, v in wanted.items() if k in names})


def build_dmin(cfg: TrainConfig, in_dim: int, n_classes: int) -> nn.Module:
    from hdmil.models.dmin import DMIN

    return DMIN(dmin_config(cfg, in_dim, n_classes))


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
        check_cancel(cancel)
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


def train_dmin(
    cohort: Cohort,
    split: Split,
    cfg: TrainConfig | None = None,
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
    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_split(cohort, split)
    bags = cohort.require_bags()
    device = resolve_device(cfg.device)
    in_dim, n_classes = bags.dim, cohort.n_classes

    seed_everything(cfg.seed)
    dcfg = dmin_config(cfg, in_dim, n_classes)
    model = build_dmin(cfg, in_dim, n_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stopper = EarlyStopping(cfg.patience, cfg.min_epochs)
    best_metrics: dict[str, float] = {}
    start = 0

    state_path, last_path = out_dir / STATE_NAME, out_dir / LAST_NAME
    if resume and state_path.exists() and last_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("train_ids") != list(split.train) or state.get("val_ids") != list(split.val):
            raise HDMILError(
                f"{state_path}: this run was trained on another split; resume with the same "
                "--splits / --folds / --seed, or write to a new --out"
            )
        load_train_state(last_path, model, optimizer, state["optimizer"])
        stopper.load(state["early_stopping"])
        best_metrics = state.get("best_metrics", {})
        start = int(state["epoch"]) + 1
        if state.get("stopped_early"):
            start = max(start, cfg.max_epochs)  # a finished run stays finished
    elif resume:
        resume = False  # nothing to resume from: a fresh run
    log = CSVLog(out_dir / LOG_NAME, resume_after=start - 1 if resume else None)

    train_ids = list(split.train)
    train_labels = cohort.labels_of(train_ids)
    provenance = feature_provenance(cohort)
    stopped = False
    epoch = start - 1
    for epoch in range(start, cfg.max_epochs):
        t0 = time.perf_counter()
        es = epoch_seed(cfg.seed, epoch)
        seed_everything(es)
        model.train()
        sums: dict[str, float] = {}
        order = balanced_order(train_labels, len(train_ids), es)
        for i in order:
            check_cancel(cancel)
            sid = train_ids[i]
            x = bags[sid].features.to(device)
            total, terms, _ = dmin_step(model, x, int(train_labels[i]), dcfg)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            sums["train_loss"] = sums.get("train_loss", 0.0) + float(total.detach())
            for k, v in terms.items():
                sums[f"train_{k}"] = sums.get(f"train_{k}", 0.0) + v
        row: dict[str, Any] = {"epoch": epoch}
        row.update({k: v / len(order) for k, v in sums.items()})
        row.update(validate_dmin(model, cohort, split.val, device, cancel))
        row["seconds"] = time.perf_counter() - t0

        if stopper.step(epoch, row["val_loss"]):
            best_metrics = {k: row[k] for k in ("val_loss", "val_auc", "val_acc", "val_kept_ratio",
                                                "val_branch_auc")}
            best_metrics["epoch"] = epoch
            config = _checkpoint_config(
                cfg, dcfg, cohort, split, provenance, epoch, best_metrics
            )
            _save_best(out_dir / BEST_NAME, model, config)
        log.append(row)
        stopped = stopper.should_stop(epoch)
        opt_json = save_train_state(last_path, model, optimizer)
        write_json_atomic(
            state_path,
            {
                "epoch": epoch,
                "optimizer": opt_json,
                "early_stopping": stopper.state(),
                "best_metrics": best_metrics,
                "stopped_early": stopped,
                "train_ids": train_ids,
                "val_ids": list(split.val),
                "config": cfg.to_dict(),
            },
        )
        if on_epoch is not None:
            on_epoch(row)
        if progress is not None:
            progress("dmin", epoch + 1, cfg.max_epochs)
        if stopped:
            break

    if not (out_dir / BEST_NAME).exists():
        raise HDMILError(f"{out_dir}: no epoch finished, so no checkpoint was written")
    return TrainResult(
        out_dir=out_dir,
        checkpoint=out_dir / BEST_NAME,
        log_path=out_dir / LOG_NAME,
        best_epoch=stopper.best_epoch,
        best_metrics=best_metrics,
        epochs_run=epoch + 1,
        stopped_early=stopped,
        history=[dict(r) for r in log.rows],
    )


def _checkpoint_config(
    cfg: TrainConfig,
    dcfg: Any,
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


def _save_best(path: Path, model: nn.Module, config: dict[str, Any]) -> None:
    from hdmil.checkpoint import save_checkpoint

    # round-trip through JSON: numpy scalars and paths from h5 attributes become plain values
    save_checkpoint(path, {"dmin": model}, json.loads(json.dumps(config, default=_json_default)))
