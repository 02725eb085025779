"""Training LIPN against a frozen, trained DMIN (docs/method.md §4).

For every slide the frozen DMIN, in eval mode, marks which instances each class would pool over
on the HR features, ``M_HR = 1[s > 0]``; LIPN learns to predict that mask from the same patches'
16×16 LR views. Loss per slide: ``mean_c L1(M_LR[:, c], M_HR[:, c]) + MSE(r̃_LR, r̃_HR)``.
LIPN is per instance, so one step batches several slides' patches (up to
``cfg.batch_patches``) through the network and averages the per-slide losses, which keeps the
kept-ratio term per slide.

``LIPNTrainConfig.targets = "soft"`` (ours, not the paper's) distils DMIN's attention logits
instead: target ``σ(s / τ)``, LIPN's probability ``P`` in place of its straight-through mask. The
decision boundary is the same (``σ(s/τ) > 0.5`` exactly when ``s > 0``), but LIPN also learns how
far each patch is from it, so its ``P`` ranks patches as DMIN's scores do and a lowered threshold
(``RecallShare``) admits the patches DMIN ranks next, not arbitrary ones.

The epochs, early stopping and resume are ``hdmil.train.loop.fit``'s (``lipn_log.csv``,
``lipn_last.safetensors``, ``lipn_state.json``; the best epoch's LIPN in
``lipn_best.safetensors``). The output, ``hdmil.safetensors``, holds DMIN and LIPN together: one
file is a full HDMIL model.
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

from hdmil.errors import CheckpointError, HDMILError, check_cancelled
from hdmil.files import atomic_path, to_jsonable
from hdmil.train.calibration import (attention_shares, calibrate_attention, calibrate_kept,
                                     calibrate_threshold)
from hdmil.train.config import AttentionShare, KeptBudget, LIPNTrainConfig, RecallShare
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
from hdmil.train.splits import Split

__all__ = ["LIPNTask", "hr_targets", "train_lipn"]

HDMIL_NAME = "hdmil.safetensors"
LIPN_LOG_NAME = "lipn_log.csv"
LIPN_LAST_NAME = "lipn_last.safetensors"
LIPN_STATE_NAME = "lipn_state.json"
LIPN_BEST_NAME = "lipn_best.safetensors"


@torch.no_grad()
def hr_targets(
    dmin: torch.nn.Module,
    cohort: Cohort,
    slide_ids: Sequence[str],
    cancel: threading.Event | None = None,
    soft: bool = False,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """slide id -> [N, C]: the frozen DMIN's evaluation mask ``1[s > 0]`` (bool, no dropout), or
    with ``soft`` its attention logits through the mask's own sigmoid at a distillation
    ``temperature`` T, ``σ(s / (T·τ))`` (float; T = 1: the mask's own)."""
    bags = cohort.require_bags()
    dmin.eval()
    out = {}
    for sid in slide_ids:
        check_cancelled(cancel, "training")
        pred = dmin.predict(bags[sid].features, None)
        scale = dmin.cfg.tau * temperature
        out[sid] = torch.sigmoid(pred.scores / scale).cpu() if soft else pred.mask.bool().cpu()
    return out


def _batches(slide_ids: Sequence[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Consecutive groups of slides with at most ``budget`` patches (a larger slide alone)."""
    groups: list[list[str]] = []
    current: list[str] = []
    n = 0
    for sid in slide_ids:
        if current and n + sizes[sid] > budget:
            groups.append(current)
            current, n = [], 0
        current.append(sid)
        n += sizes[sid]
    if current:
        groups.append(current)
    return groups


def _run_group(
    lipn: torch.nn.Module,
    cohort: Cohort,
    group: Sequence[str],
    targets: dict[str, torch.Tensor],
    device: torch.device,
    soft: bool = False,
    jitter: Any = None,
    rng: np.random.Generator | None = None,
    match: str = "l1",
) -> tuple[torch.Tensor, dict[str, float], list[tuple[torch.Tensor, torch.Tensor]]]:
    """LIPN on a group of slides: (mean per-slide loss, mean terms, [(M_LR, M_HR) per slide]).

    ``soft``: LIPN's probabilities P [N, C] against soft targets, instead of its binary mask.
    ``jitter`` (a ``StainJitter``, with ``rng``): one random stain change per slide (training)."""
    from hdmil.models.losses import lipn_loss

    bags = cohort.require_bags()
    lr = np.concatenate([bags.lr_patches(s) if jitter is None else jitter(bags.lr_patches(s), rng)
                         for s in group])
    logits = lipn(lipn.prepare(lr).to(device))
    masks = torch.sigmoid(logits / lipn.cfg.tau) if soft else lipn.soft_mask(logits)
    losses, sums, pairs = [], {}, []
    start = 0
    for sid in group:
        target = targets[sid].to(device)
        m = masks[start : start + target.shape[0]]
        start += target.shape[0]
        loss, terms = lipn_loss(m, target, match=match)
        losses.append(loss)
        for k, v in terms.items():
            if k != "total":
                sums[k] = sums.get(k, 0.0) + float(v)
        pairs.append((m.detach() > lipn.cfg.threshold, target > 0.5))
    total = torch.stack(losses).mean()
    return total, {k: v / len(group) for k, v in sums.items()}, pairs


@torch.no_grad()
def recalibrate_batchnorm(
    lipn: torch.nn.Module,
    cohort: Cohort,
    groups: Sequence[Sequence[str]],
    device: torch.device,
    cancel: threading.Event | None = None,
) -> None:
    """Re-estimate BatchNorm running statistics as the plain average over ``groups``.

    The momentum-0.1 running averages lag far behind the batch statistics after a few hundred
    steps (a small cohort), and in eval mode that lag compounds over LIPN's eleven BN layers
    until every patch gets the same output. One forward pass over the training patches fixes
    that, so validation and inference see the network that training optimised.
    """
    bns = [m for m in lipn.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    bags = cohort.require_bags()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = lipn.training
    lipn.train()
    try:
        for group in groups:
            check_cancelled(cancel, "training")
            lr = np.concatenate([bags.lr_patches(s) for s in group])
            lipn(lipn.prepare(lr).to(device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        lipn.train(was_training)


def _agreement(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Mask agreement and the recall of DMIN's kept instances (any class) in LIPN's kept set."""
    agree = total = hit = wanted = 0
    for m_lr, m_hr in pairs:
        agree += int((m_lr == m_hr).sum())
        total += m_hr.numel()
        keep_lr, keep_hr = m_lr.any(dim=1), m_hr.any(dim=1)
        hit += int((keep_lr & keep_hr).sum())
        wanted += int(keep_hr.sum())
    return {
        "agreement": agree / total if total else math.nan,
        "recall": hit / wanted if wanted else math.nan,
    }


def _load_dmin(dmin_checkpoint: str | Path | Any, cohort: Cohort) -> Any:
    """The HDMILModel whose DMIN LIPN learns from, checked against the cohort."""
    from hdmil.checkpoint import load_model

    bags = cohort.require_bags()
    if bags.instances != "patch":
        raise HDMILError("LIPN screens patches: train it on --instances patch features")
    model = (
        load_model(dmin_checkpoint) if isinstance(dmin_checkpoint, (str, Path)) else dmin_checkpoint
    )
    dmin = model.dmin
    if dmin is None:
        raise CheckpointError(f"{dmin_checkpoint}: no DMIN in this checkpoint")
    classes = model.config.get("classes")
    if classes is not None and tuple(classes) != tuple(cohort.classes):
        raise CheckpointError(
            f"{dmin_checkpoint}: the DMIN's classes ({', '.join(classes)}) differ from the "
            f"labels' ({', '.join(cohort.classes)})"
        )
    if dmin.cfg.in_dim != bags.dim:
        raise CheckpointError(
            f"{dmin_checkpoint}: the DMIN takes {dmin.cfg.in_dim}-d features, the feature files "
            f"hold {bags.dim}-d ones"
        )
    return model


def _check_inputs(cohort: Cohort, split: Split, cfg: LIPNTrainConfig) -> None:
    """Refuse before training what would fail after it."""
    unknown = [s for s in split.train + split.val if s not in set(cohort.slide_ids)]
    if unknown:
        raise HDMILError(
            f"fold {split.fold}: {len(unknown)} slides of the split have no label or features: "
            f"{', '.join(unknown[:5])}"
        )
    if not split.train or not split.val:
        raise HDMILError(f"fold {split.fold}: LIPN needs training and validation slides")
    n_classes = cohort.n_classes
    if isinstance(cfg.calibration, AttentionShare):  # checked before training, used after it
        attention_shares(cfg.calibration.shares, cohort.classes)
    if cfg.dilation is not None and len(cfg.dilation) != n_classes:
        raise HDMILError(f"LIPN dilation has {len(cfg.dilation)} ring counts for {n_classes} "
                         f"classes ({', '.join(cohort.classes)})")


def _targets(dmin: torch.nn.Module, cohort: Cohort, ids: Sequence[str], cfg: LIPNTrainConfig,
             cancel: threading.Event | None) -> dict[str, torch.Tensor]:
    """DMIN's targets for ``ids``, with every slide's LR patches read (and cached) up front, so
    that errors surface before training."""
    bags = cohort.require_bags()
    targets = hr_targets(dmin, cohort, ids, cancel, soft=cfg.soft,
                          temperature=cfg.target_temperature)
    for sid in ids:
        if bags.lr_patches(sid).shape[0] != targets[sid].shape[0]:
            raise HDMILError(f"{bags.path(sid)}: LR patches and features differ in number")
    return targets


@torch.no_grad()
def _start_at_base_rate(lipn: torch.nn.Module, targets: Sequence[torch.Tensor]) -> None:
    """Soft targets (ours, not the reference's): start the classifier's bias at the targets' base
    rate, τ·logit(mean target) per class. From the reference's zero bias every patch starts at
    P = 0.5 while most targets lie below it; the first steps then push every patch down and the
    rare class's patches stay stuck near 0.5 with almost no gradient (seen on small cohorts)."""
    mean = torch.cat([t.float().reshape(t.shape[0], -1) for t in targets]).mean(0)
    p = mean.clamp(1e-3, 1 - 1e-3).to(lipn.fc.bias.device)
    lipn.fc.bias.copy_(lipn.cfg.tau * torch.logit(p))


class LIPNTask(TrainTask):
    """LIPN's part of ``fit``: groups of whole training slides per step (one random stain change
    per slide with ``stain_jitter``), BatchNorm re-estimated after every epoch, validation loss
    and mask agreement on ``split.val``; the best epoch's weights in ``lipn_best.safetensors``."""

    def __init__(self, cohort: Cohort, split: Split, cfg: LIPNTrainConfig,
                 targets: dict[str, torch.Tensor], out_dir: Path, device: torch.device) -> None:
        from hdmil.augment import StainJitter
        from hdmil.models.lipn import LIPN, LIPNConfig

        self.cohort, self.split, self.cfg, self.targets, self.device = (
            cohort, split, cfg, targets, device)
        self.model = LIPN(LIPNConfig(n_classes=cohort.n_classes, tau=cfg.tau, views=cfg.views,
                                     dilation=cfg.dilation)).to(device)
        if cfg.soft:
            _start_at_base_rate(self.model, [targets[s] for s in split.train])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr,
                                          weight_decay=cfg.weight_decay)
        self.jitter = StainJitter(cfg.stain_jitter)  # strength 0 (the paper): slides unchanged
        self.sizes = {s: int(t.shape[0]) for s, t in targets.items()}
        self.val_groups = _batches(list(split.val), self.sizes, cfg.batch_patches)
        self.best_path = out_dir / LIPN_BEST_NAME
        self.state_path = out_dir / LIPN_STATE_NAME

    def train_epoch(self, epoch: int, seed: int | None,
                    cancel: threading.Event | None) -> dict[str, float]:
        train = self.split.train
        order = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]
        self.model.train()
        sums: dict[str, float] = {}
        groups = _batches(order, self.sizes, self.cfg.batch_patches)
        stain_rng = np.random.default_rng([seed, 0x57A1])
        for group in groups:
            check_cancelled(cancel, "training")
            loss, terms, _ = _run_group(self.model, self.cohort, group, self.targets, self.device,
                                        self.cfg.soft, self.jitter, stain_rng, self.cfg.match)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            sums["train_loss"] = sums.get("train_loss", 0.0) + float(loss.detach())
            for k, v in terms.items():
                sums[f"train_{k}"] = sums.get(f"train_{k}", 0.0) + v
        recalibrate_batchnorm(self.model, self.cohort, groups, self.device, cancel)
        return {k: v / len(groups) for k, v in sums.items()}

    @torch.no_grad()
    def validate(self, epoch: int, cancel: threading.Event | None) -> dict[str, float]:
        self.model.eval()
        vsum: dict[str, float] = {}
        pairs = []
        for group in self.val_groups:
            check_cancelled(cancel, "training")
            loss, terms, p = _run_group(self.model, self.cohort, group, self.targets, self.device,
                                        self.cfg.soft, match=self.cfg.match)
            vsum["val_loss"] = vsum.get("val_loss", 0.0) + float(loss) * len(group)
            for k, v in terms.items():
                vsum[f"val_{k}"] = vsum.get(f"val_{k}", 0.0) + v * len(group)
            pairs += p
        row = {k: v / len(self.split.val) for k, v in vsum.items()}
        row.update({f"val_{k}": v for k, v in _agreement(pairs).items()})
        return row

    def save_best(self, epoch: int, row: dict[str, Any], best: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        weights = {k: v.detach().cpu().contiguous().clone()
                   for k, v in self.model.state_dict().items()}
        with atomic_path(self.best_path) as tmp:
            save_file(weights, str(tmp))

    def load_best(self) -> None:
        """The best epoch's weights back into the model (eval mode)."""
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(self.best_path)))
        self.model.eval()

    def state(self) -> dict[str, Any]:
        return {"train_ids": list(self.split.train), "val_ids": list(self.split.val),
                "config": self.cfg.to_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        if (state.get("train_ids") != list(self.split.train)
                or state.get("val_ids") != list(self.split.val)):
            raise HDMILError(f"{self.state_path}: this LIPN run was trained on another split; "
                             "resume with the same splits, or write to a new --out")
        if not self.best_path.is_file():
            raise HDMILError(f"{self.best_path}: the best epoch's LIPN is missing; start again "
                             "without resume")


def _calibrate(task: LIPNTask, dmin: torch.nn.Module,
               cancel: threading.Event | None) -> dict[str, Any] | None:
    """Set the trained LIPN's thresholds as ``cfg.calibration`` asks (None: the paper's 0.5)."""
    calibration, lipn, val = task.cfg.calibration, task.model, task.split.val
    if isinstance(calibration, AttentionShare):
        return calibrate_attention(lipn, dmin, task.cohort, val, calibration.shares, cancel)
    if isinstance(calibration, KeptBudget):
        return calibrate_kept(lipn, dmin, task.cohort, val, calibration.ratio, cancel)
    if isinstance(calibration, RecallShare):
        return calibrate_threshold(lipn, task.cohort, val, task.targets, calibration.share, cancel)
    return None


def _hdmil_config(model: Any, split: Split, cfg: LIPNTrainConfig, done: Any,
                  calibration: dict[str, Any] | None) -> dict[str, Any]:
    """The DMIN checkpoint's config with LIPN's training added to its provenance."""
    config = {k: v for k, v in model.config.items() if k not in ("modules", "model_type")}
    prov = dict(config.get("provenance") or {})
    prov["stage"] = "hdmil"
    prov["dmin_checkpoint"] = str(model.path)
    prov["lipn"] = {
        "epochs": done.epochs_run,
        "best_val": done.best_metrics,
        "seed": cfg.seed,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "patience": cfg.patience,
        "targets": cfg.targets,
        "stain_jitter": cfg.stain_jitter,
        "match": cfg.match,
        "dilation": cfg.dilation,
        "threshold_calibration": calibration,
        "config": cfg.to_dict(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if "split" not in prov:
        prov["split"] = {"train": list(split.train), "val": list(split.val), "test": list(split.test)}
        prov["fold"] = split.fold
    config["provenance"] = prov
    return config


def train_lipn(
    cohort: Cohort,
    split: Split,
    dmin_checkpoint: str | Path | Any,
    cfg: LIPNTrainConfig | None = None,
    out_dir: str | Path = "lipn-run",
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train LIPN to reproduce the frozen DMIN's masks from LR patches; write ``hdmil.safetensors``
    (DMIN + LIPN) and ``lipn_log.csv`` into ``out_dir``.

    ``dmin_checkpoint``: a path for ``load_model`` or a loaded model. Adam (lr 1e-4, weight decay
    1e-5 by default), early stopping on validation loss (patience 5), then ``cfg.calibration``.
    ``resume=True`` continues after the last finished epoch saved in ``out_dir``.
    """
    from hdmil.checkpoint import save_checkpoint

    cfg = cfg or LIPNTrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _load_dmin(dmin_checkpoint, cohort)
    _check_inputs(cohort, split, cfg)
    device = resolve_device(cfg.device)
    dmin = model.dmin.to(device).eval()
    for p in dmin.parameters():
        p.requires_grad_(False)
    ids = list(split.train) + list(split.val)
    if progress is not None:
        progress("targets", 0, len(ids))
    targets = _targets(dmin, cohort, ids, cfg, cancel)  # DMIN's eval path: no RNG drawn
    seed_everything(cfg.seed)  # LIPN's initial weights
    task = LIPNTask(cohort, split, cfg, targets, out_dir, device)
    loop = LoopConfig(max_epochs=cfg.max_epochs, seed=cfg.seed, monitor="val_loss",
                      patience=cfg.patience, min_epochs=cfg.min_epochs, stage="lipn")
    files = RunFiles(out_dir / LIPN_LOG_NAME, out_dir / LIPN_LAST_NAME, out_dir / LIPN_STATE_NAME)
    done = fit(task, loop, files, resume=resume, progress=progress, cancel=cancel,
               on_epoch=on_epoch)
    if done.best_epoch < 0 or not task.best_path.is_file():
        raise HDMILError(f"{out_dir}: no LIPN epoch finished, so no checkpoint was written")
    task.load_best()
    calibration = _calibrate(task, dmin, cancel)
    config = _hdmil_config(model, split, cfg, done, calibration)
    path = save_checkpoint(out_dir / HDMIL_NAME, {"dmin": dmin, "lipn": task.model},
                           to_jsonable(config))
    return TrainResult.of(done, out_dir, path)
