"""Training LIPN against a frozen, trained DMIN (METHOD §4).

For every slide the frozen DMIN, in eval mode, marks which instances each class would pool over
on the HR features, ``M_HR = 1[s > 0]``; LIPN learns to predict that mask from the same patches'
16×16 LR views. Loss per slide: ``mean_c L1(M_LR[:, c], M_HR[:, c]) + MSE(r̃_LR, r̃_HR)``.
LIPN is per instance, so one step batches several slides' patches (up to
``cfg.lipn_batch_patches``) through the network and averages the per-slide losses, which keeps the
kept-ratio term per slide.

``TrainConfig.lipn_targets = "soft"`` (ours, not the paper's) distils DMIN's attention logits
instead: target ``σ(s / τ)``, LIPN's probability ``P`` in place of its straight-through mask. The
decision boundary is the same (``σ(s/τ) > 0.5`` exactly when ``s > 0``), but LIPN also learns how
far each patch is from it, so its ``P`` ranks patches as DMIN's scores do and a lowered threshold
(``lipn_recall``) admits the patches DMIN ranks next, not arbitrary ones.

The output, ``hdmil.safetensors``, holds DMIN and LIPN together: one file is a full HDMIL model.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdmil.errors import CheckpointError, HDMILError
from hdmil.train.data import Cohort
from hdmil.train.dmin_trainer import (
    CSVLog,
    EarlyStopping,
    Progress,
    TrainConfig,
    TrainResult,
    _json_default,
    check_cancel,
    epoch_seed,
    resolve_device,
    seed_everything,
)
from hdmil.train.splits import Split

__all__ = ["calibrate_attention", "calibrate_threshold", "hr_targets", "train_lipn"]

HDMIL_NAME = "hdmil.safetensors"
LIPN_LOG_NAME = "lipn_log.csv"


@torch.no_grad()
def hr_targets(
    dmin: torch.nn.Module,
    cohort: Cohort,
    slide_ids: Sequence[str],
    cancel: threading.Event | None = None,
    soft: bool = False,
) -> dict[str, torch.Tensor]:
    """slide id -> [N, C]: the frozen DMIN's evaluation mask ``1[s > 0]`` (bool, no dropout), or
    with ``soft`` its attention logits through the mask's own sigmoid, ``σ(s / τ)`` (float)."""
    bags = cohort.require_bags()
    dmin.eval()
    out = {}
    for sid in slide_ids:
        check_cancel(cancel)
        pred = dmin.predict(bags[sid].features, None)
        out[sid] = torch.sigmoid(pred.scores / dmin.cfg.tau).cpu() if soft else pred.mask.bool().cpu()
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
            check_cancel(cancel)
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


def _kept(lipn: torch.nn.Module, probs: list[torch.Tensor], bags: Any, slide_ids: Sequence[str]) -> torch.Tensor:
    """LIPN's kept sets at its current thresholds, dilation included: bool [sum N, C]."""
    kept = [lipn.keep_from(p, bags.grid_index(sid) if lipn.dilates else None)[1]
            for p, sid in zip(probs, slide_ids)]
    return torch.cat(kept) if kept else torch.zeros(0, lipn.cfg.n_classes, dtype=torch.bool)


def attention_shares(share: float | Sequence[float], classes: Sequence[str]) -> list[float]:
    """``lipn_attention`` as one share per class: a single share applies to every class."""
    n = len(classes)
    shares = [float(share)] * n if np.isscalar(share) else [float(v) for v in share]
    if len(shares) != n:
        raise HDMILError(f"lipn_attention has {len(shares)} shares for {n} classes "
                         f"({', '.join(classes)}): give one share, or one per class")
    if not all(0.0 < v <= 1.0 for v in shares):
        raise HDMILError(f"lipn_attention must be in (0, 1], got {share}")
    return shares


@torch.no_grad()
def calibrate_threshold(
    lipn: torch.nn.Module,
    cohort: Cohort,
    slide_ids: Sequence[str],
    targets: dict[str, torch.Tensor],
    recall: float,
    cancel: threading.Event | None = None,
) -> dict[str, float]:
    """Set ``lipn.cfg.threshold`` so LIPN keeps ``recall`` of the (slide, patch, class) instances
    DMIN keeps on ``slide_ids``; the threshold only goes down from the paper's 0.5.

    A missed instance is never read at 20x, while an extra one costs one patch of reading and
    features: for a screening step recall matters more than the paper's symmetric 0.5.
    Returns the threshold and, at it, the recall and the kept ratio on those slides.
    """
    if not 0.0 < recall <= 1.0:
        raise HDMILError(f"lipn_recall must be in (0, 1], got {recall}")
    bags = cohort.require_bags()
    probs, wanted = [], []
    for sid in slide_ids:
        check_cancel(cancel)
        probs.append(lipn.probabilities(bags.lr_patches(sid)))  # [N, C]
        wanted.append(targets[sid].cpu().float() > 0.5)  # [N, C]: DMIN keeps (σ(s/τ) > 0.5 ⟺ s > 0)
    p, m = torch.cat(probs), torch.cat(wanted)
    default = float(lipn.cfg.threshold)
    if m.any():
        # the largest t with share(P > t | M_HR) >= recall: just under the (1 - recall) quantile
        q = np.float32(torch.quantile(p[m].double(), 1.0 - recall, interpolation="lower").item())
        # one float32 step below it: P is float32, and so is the comparison P > threshold
        threshold = min(default, float(np.nextafter(q, np.float32(-np.inf))))
    else:
        threshold = default
    lipn.cfg.threshold = threshold
    kept = _kept(lipn, probs, bags, slide_ids)
    return {
        "threshold": threshold,
        "recall": float((kept & m).sum() / m.sum()) if m.any() else math.nan,
        "kept_ratio": float(kept.any(dim=1).float().mean()) if len(p) else math.nan,
        "recall_at_0.5": float(((p > default) & m).sum() / m.sum()) if m.any() else math.nan,
    }


@torch.no_grad()
def calibrate_attention(
    lipn: torch.nn.Module,
    dmin: torch.nn.Module,
    cohort: Cohort,
    slide_ids: Sequence[str],
    share: float | Sequence[float],
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Set one LIPN threshold per class (``lipn.cfg.class_thresholds``): the highest with which
    LIPN's kept set holds ``share`` of DMIN's attention for that class, on average over
    ``slide_ids``. ``share``: one for every class, or one per class.

    DMIN's attention for class c is its evaluation pooling weight: softmax of s[:, c] over the
    instances it keeps (s > 0). Pooling is a weighted mean, so instances with little weight change
    the prediction little whether LIPN keeps them or not; a class whose attention is spread thin
    over every patch (say, "normal" on any slide) then no longer keeps every patch it marks, while a
    class whose attention sits on a few patches (tumour) keeps those. Thresholds may lie above the
    paper's 0.5. The thresholds are set before LIPN's dilation (which only adds patches); the kept
    ratios returned count it. Returns per class the threshold, the attention share held, and the
    kept ratios.
    """
    n_classes = lipn.cfg.n_classes
    shares = attention_shares(share, cohort.classes)
    bags = cohort.require_bags()
    probs, weights = [], []
    for sid in slide_ids:
        check_cancel(cancel)
        # DMIN's pooling weights [N, C], NaN outside each class's kept set: 0 there
        weights.append(torch.nan_to_num(dmin.predict(bags[sid].features, None).attention, nan=0.0))
        probs.append(lipn.probabilities(bags.lr_patches(sid)))  # [N, C]
    thresholds, held = [], []
    for c in range(n_classes):
        # each slide that keeps anything for c counts once: its weights sum to 1 over its instances
        slides = [i for i, w in enumerate(weights) if float(w[:, c].sum()) > 0]
        if not slides:
            thresholds.append(float(lipn.cfg.threshold))
            held.append(math.nan)
            continue
        p = torch.cat([probs[i][:, c] for i in slides]).numpy().astype(np.float32)
        w = torch.cat([weights[i][:, c] for i in slides]).numpy() / len(slides)
        order = np.argsort(-p, kind="stable")
        covered = np.cumsum(w[order])  # attention held when the threshold is just below p[order[i]]
        i = int(np.searchsorted(covered, shares[c] * (1 - 1e-9)))
        i = min(i, len(order) - 1)
        # just under that patch's P (float32, as P > threshold compares): it and its ties are kept
        t = float(np.nextafter(p[order[i]], np.float32(-np.inf)))
        thresholds.append(t)
        held.append(float(w[p > t].sum()))
    lipn.cfg.class_thresholds = tuple(thresholds)
    k_all = _kept(lipn, probs, bags, slide_ids)
    return {
        "share": shares if not np.isscalar(share) else float(share),
        "class_thresholds": thresholds,
        "attention_held": held,
        "dilation": list(lipn.cfg.dilation) if lipn.cfg.dilation is not None else None,
        "kept_ratio": float(k_all.any(dim=1).float().mean()) if len(k_all) else math.nan,
        "class_kept_ratio": [float(v) for v in k_all.float().mean(dim=0)] if len(k_all) else [],
    }


def train_lipn(
    cohort: Cohort,
    split: Split,
    dmin_checkpoint: str | Path | Any,
    cfg: TrainConfig | None = None,
    out_dir: str | Path = "lipn-run",
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train LIPN to reproduce the frozen DMIN's masks from LR patches; write ``hdmil.safetensors``
    (DMIN + LIPN) and ``lipn_log.csv`` into ``out_dir``.

    ``dmin_checkpoint``: a path for ``load_model`` or a loaded model. Uses ``cfg.lipn_*`` settings:
    Adam lr 1e-4, weight decay 1e-5, early stopping on validation loss with patience 5.
    """
    from hdmil.checkpoint import load_model, save_checkpoint
    from hdmil.augment import StainJitter
    from hdmil.models.lipn import LIPN, LIPNConfig

    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bags = cohort.require_bags()
    if bags.instances != "patch":
        raise HDMILError("LIPN screens patches: train it on --instances patch features")
    model = (
        load_model(dmin_checkpoint) if isinstance(dmin_checkpoint, (str, Path)) else dmin_checkpoint
    )
    dmin = model.dmin
    if dmin is None:
        raise CheckpointError(f"{dmin_checkpoint}: no DMIN in this checkpoint")
    base_config = dict(getattr(model, "config", {}) or {})
    classes = base_config.get("classes")
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
    unknown = [s for s in split.train + split.val if s not in set(cohort.slide_ids)]
    if unknown:
        raise HDMILError(
            f"fold {split.fold}: {len(unknown)} slides of the split have no label or features: "
            f"{', '.join(unknown[:5])}"
        )
    if not split.train or not split.val:
        raise HDMILError(f"fold {split.fold}: LIPN needs training and validation slides")

    device = resolve_device(cfg.device)
    dmin.to(device).eval()
    for p in dmin.parameters():
        p.requires_grad_(False)
    n_classes = cohort.n_classes
    if cfg.lipn_attention is not None:  # checked before training, used after it
        attention_shares(cfg.lipn_attention, cohort.classes)
    if cfg.lipn_dilation is not None and len(cfg.lipn_dilation) != n_classes:
        raise HDMILError(f"lipn_dilation has {len(cfg.lipn_dilation)} ring counts for {n_classes} "
                         f"classes ({', '.join(cohort.classes)})")
    seed_everything(cfg.seed)
    lipn = LIPN(LIPNConfig(n_classes=n_classes, tau=cfg.lipn_tau, views=cfg.lipn_views,
                           dilation=cfg.lipn_dilation)).to(device)
    optimizer = torch.optim.Adam(
        lipn.parameters(), lr=cfg.lipn_lr, weight_decay=cfg.lipn_weight_decay
    )
    stopper = EarlyStopping(cfg.lipn_patience, cfg.lipn_min_epochs)
    jitter = StainJitter(cfg.lipn_stain_jitter)  # strength 0 (the paper) returns slides unchanged

    ids = list(split.train) + list(split.val)
    if progress is not None:
        progress("targets", 0, len(ids))
    if cfg.lipn_targets not in ("mask", "soft"):
        raise HDMILError(f"lipn_targets must be 'mask' or 'soft', got {cfg.lipn_targets!r}")
    soft = cfg.lipn_targets == "soft"
    if cfg.lipn_match not in ("l1", "bce"):
        raise HDMILError(f"lipn_match must be 'l1' or 'bce', got {cfg.lipn_match!r}")
    if cfg.lipn_match == "bce" and not soft:
        raise HDMILError("lipn_match='bce' compares LIPN's probabilities with DMIN's soft targets: "
                         "set lipn_targets='soft' too")
    if cfg.lipn_recall is not None and cfg.lipn_attention is not None:
        raise HDMILError("lipn_recall and lipn_attention both calibrate LIPN's thresholds: set one")
    targets = hr_targets(dmin, cohort, ids, cancel, soft=soft)
    for sid in ids:  # read (and cache) the LR patches up front: errors surface before training
        if bags.lr_patches(sid).shape[0] != targets[sid].shape[0]:
            raise HDMILError(f"{bags.path(sid)}: LR patches and features differ in number")
    sizes = {s: int(targets[s].shape[0]) for s in ids}
    val_groups = _batches(list(split.val), sizes, cfg.lipn_batch_patches)

    log = CSVLog(out_dir / LIPN_LOG_NAME)
    best_metrics: dict[str, float] = {}
    best_state: dict[str, torch.Tensor] | None = None
    stopped = False
    epoch = -1
    for epoch in range(cfg.lipn_max_epochs):
        t0 = time.perf_counter()
        es = epoch_seed(cfg.seed, epoch)
        seed_everything(es)
        order = [split.train[i] for i in np.random.default_rng(es).permutation(len(split.train))]
        lipn.train()
        sums: dict[str, float] = {}
        steps = 0
        train_groups = _batches(order, sizes, cfg.lipn_batch_patches)
        stain_rng = np.random.default_rng([es, 0x57A1])
        for group in train_groups:
            check_cancel(cancel)
            loss, terms, _ = _run_group(lipn, cohort, group, targets, device, soft, jitter,
                                        stain_rng, cfg.lipn_match)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            sums["train_loss"] = sums.get("train_loss", 0.0) + float(loss.detach())
            for k, v in terms.items():
                sums[f"train_{k}"] = sums.get(f"train_{k}", 0.0) + v
        row: dict[str, Any] = {"epoch": epoch, **{k: v / steps for k, v in sums.items()}}

        recalibrate_batchnorm(lipn, cohort, train_groups, device, cancel)
        lipn.eval()
        vsum: dict[str, float] = {}
        pairs = []
        with torch.no_grad():
            for group in val_groups:
                check_cancel(cancel)
                loss, terms, p = _run_group(lipn, cohort, group, targets, device, soft,
                                            match=cfg.lipn_match)
                vsum["val_loss"] = vsum.get("val_loss", 0.0) + float(loss) * len(group)
                for k, v in terms.items():
                    vsum[f"val_{k}"] = vsum.get(f"val_{k}", 0.0) + v * len(group)
                pairs += p
        row.update({k: v / len(split.val) for k, v in vsum.items()})
        row.update({f"val_{k}": v for k, v in _agreement(pairs).items()})
        row["seconds"] = time.perf_counter() - t0

        if stopper.step(epoch, row["val_loss"]):
            best_state = {k: v.detach().clone() for k, v in lipn.state_dict().items()}
            best_metrics = {k: v for k, v in row.items() if k.startswith("val_")}
            best_metrics["epoch"] = epoch
        log.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if progress is not None:
            progress("lipn", epoch + 1, cfg.lipn_max_epochs)
        stopped = stopper.should_stop(epoch)
        if stopped:
            break

    if best_state is None:
        raise HDMILError(f"{out_dir}: no LIPN epoch finished, so no checkpoint was written")
    lipn.load_state_dict(best_state)
    lipn.eval()
    calibration = None
    if cfg.lipn_attention is not None:
        calibration = calibrate_attention(lipn, dmin, cohort, split.val, cfg.lipn_attention, cancel)
    elif cfg.lipn_recall is not None:
        calibration = calibrate_threshold(lipn, cohort, split.val, targets, cfg.lipn_recall, cancel)
    config = {k: v for k, v in base_config.items() if k not in ("modules", "model_type")}
    prov = dict(config.get("provenance") or {})
    prov["stage"] = "hdmil"
    prov["dmin_checkpoint"] = str(getattr(model, "path", dmin_checkpoint))
    prov["lipn"] = {
        "epochs": epoch + 1,
        "best_val": best_metrics,
        "seed": cfg.seed,
        "lr": cfg.lipn_lr,
        "weight_decay": cfg.lipn_weight_decay,
        "patience": cfg.lipn_patience,
        "targets": cfg.lipn_targets,
        "stain_jitter": cfg.lipn_stain_jitter,
        "match": cfg.lipn_match,
        "dilation": cfg.lipn_dilation,
        "threshold_calibration": calibration,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if "split" not in prov:
        prov["split"] = {"train": list(split.train), "val": list(split.val), "test": list(split.test)}
        prov["fold"] = split.fold
    config["provenance"] = prov
    path = save_checkpoint(
        out_dir / HDMIL_NAME,
        {"dmin": dmin, "lipn": lipn},
        json.loads(json.dumps(config, default=_json_default)),
    )
    return TrainResult(
        out_dir=out_dir,
        checkpoint=path,
        log_path=out_dir / LIPN_LOG_NAME,
        best_epoch=stopper.best_epoch,
        best_metrics=best_metrics,
        epochs_run=epoch + 1,
        stopped_early=stopped,
        history=[dict(r) for r in log.rows],
    )
