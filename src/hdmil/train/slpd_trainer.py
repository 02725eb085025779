"""SLPD pre-training over a cohort's patch-feature files, and SLPD outputs for each slide.

``pretrain_slpd(feature_files, cfg, out_ckpt)`` builds regions (16 × 16 blocks of the patch grid)
from every slide's features, trains student + EMA teacher (DINO, then DINO + intra- and
inter-slide prototype losses after ``cfg.proto_warmup_epochs``), saves a resumable safetensors
checkpoint after every epoch (``hdmil.checkpoint.save_slpd``), and finally writes into each
slide's h5:

| dataset | shape | what |
|---|---|---|
| ``region_embeddings`` | float32 [R, E] | teacher [CLS] of each full region (E = 192) |
| ``region_coords`` | int64 [R, 2] | level-0 (x, y) of each region's top-left corner |
| ``region_prototype`` | int64 [R] | the region's prototype (cluster) id, -1 where the slide has none |
| ``prototypes`` | float32 [K, Z] | the slide's prototypes (Z = 256); [0, Z] when too few regions |

plus attributes ``slpd_region_size_level0`` (side of a region in level-0 px), ``slpd_region_patches``
and ``slpd_checkpoint``. The model and what inference needs of it (regions, embeddings) live in
``hdmil.models.slpd``; this module holds only what training adds: views, schedules, the epochs.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdmil.checkpoint import read_slpd_metadata, restore_slpd, save_slpd
from hdmil.errors import CheckpointError, FeatureFileError, HDMILError, check_cancelled
from hdmil.models.slpd import (
    SLPD,
    Regions,
    SLPDConfig,
    SlideSLPD,
    build_regions,
    cross_slide_targets,
    derived_seed,
    embed_regions,
    embed_slide_regions,
    patch_size_of,
    slide_neighbours,
    slide_prototypes,
    slpd_config,
)
from hdmil.train.loop import EarlyStopping, LoopConfig, RunFiles, TrainTask, fit, write_run_state

__all__ = [
    "SLPDTrainResult",
    "make_views",
    "pretrain_slpd",
    "run_files",
    "write_slpd_outputs",
]

ProgressFn = Callable[[str, int, int], None]
_WHAT = "SLPD pre-training"  # cancelling keeps the last finished epoch's checkpoint


# --------------------------------------------------------------------------------------------
# Views: crops of the token grid


def _crop_index(
    index: torch.Tensor, size: int, gen: torch.Generator, flips: bool, rotations: bool
) -> torch.Tensor:
    """Random size × size crops of index maps [B, G, G] with random flips / 90° rotations."""
    b, g = index.shape[0], index.shape[1]
    oy = torch.randint(0, g - size + 1, (b,), generator=gen)
    ox = torch.randint(0, g - size + 1, (b,), generator=gen)
    ar = torch.arange(size)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    out = index[torch.arange(b)[:, None, None], rows, cols]  # [B, s, s]
    if flips:
        flip = torch.rand(b, generator=gen) < 0.5
        out = torch.where(flip[:, None, None], out.flip(2), out)
    if rotations:
        k = torch.randint(0, 4, (b,), generator=gen)
        for r in (1, 2, 3):
            sel = k == r
            if sel.any():
                out[sel] = torch.rot90(out[sel], r, dims=(1, 2))
    return out


def make_views(
    index: torch.Tensor, features: torch.Tensor, cfg: SLPDConfig, gen: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global then local views of a batch of regions.

    index: int64 [B, G, G] rows of ``features`` [N + 1, D], whose last row is zeros (missing
    patches point there). Returns ``(x [B, s, s, D], mask [B, s, s])`` per view.
    """
    missing = features.shape[0] - 1
    views = []
    for n, size in ((cfg.global_crops, cfg.global_size), (cfg.local_crops, cfg.local_size)):
        for _ in range(n):
            idx = _crop_index(index, size, gen, cfg.flips, cfg.rotations)
            views.append((features[idx], idx != missing))
    return views


def write_slpd_outputs(path: str | os.PathLike, out: SlideSLPD, checkpoint: str = "") -> Path:
    """Add the SLPD datasets and attributes to a slide's h5 feature file (atomic replace)."""
    from hdmil.features.io import update_feature_file

    return update_feature_file(path, out.datasets(), out.attrs(checkpoint))


# --------------------------------------------------------------------------------------------
# The cohort: regions of every slide, one feature table


@dataclass
class SLPDTrainResult:
    checkpoint: Path
    config: SLPDConfig
    history: list[dict[str, float]]  # per epoch: mean loss terms, slides with prototypes
    slides: list[str]
    n_regions: int
    slides_without_prototypes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    outputs: list[Path] = field(default_factory=list)
    epochs_run: int = 0  # in this call (not counting those before a resume)
    log: Path | None = None  # the epoch log (CSV)


@dataclass
class _Slide:
    name: str
    path: Path
    features: np.ndarray
    regions: Regions


@dataclass
class _Cohort:
    """Every slide's regions, indexing one feature table for the whole cohort.

    features: float32 [N + 1, D] (all slides' patches, then a zero row for missing patches);
    region_index: int64 [R, G, G] rows of ``features``; region_slide: int64 [R] slide of a region.
    """

    slides: list[_Slide]
    skipped: list[tuple[str, str]]
    dim: int
    features: torch.Tensor
    region_index: torch.Tensor
    region_slide: np.ndarray

    @property
    def n_regions(self) -> int:
        return int(self.region_index.shape[0])


def _collect_files(feature_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    from hdmil.features.io import find_feature_files

    if isinstance(feature_files, (str, os.PathLike)):
        p = Path(feature_files)
        return list(find_feature_files(p).values()) if p.is_dir() else [p]
    return [Path(p) for p in feature_files]


def _read_slides(
    files: list[Path], cfg: SLPDConfig, report: ProgressFn, cancel: threading.Event | None
) -> tuple[list[_Slide], list[tuple[str, str]], int | None]:
    """(slides with their regions, skipped files with why, feature width)."""
    from hdmil.features.io import read_features

    slides: list[_Slide] = []
    skipped: list[tuple[str, str]] = []
    dim = None
    for i, f in enumerate(files):
        check_cancelled(cancel, _WHAT)
        report("regions", i, len(files))
        bag = read_features(f, lr_patches=False)
        if bag.coords is None:
            skipped.append((str(f), "no patch coordinates (regions need them)"))
            continue
        if dim is None:
            dim = bag.dim
        elif bag.dim != dim:
            raise FeatureFileError(f"{f}: features are {bag.dim}-d but earlier files are {dim}-d")
        ps = patch_size_of(bag.coords, bag.attrs, str(f))
        regions = build_regions(bag.coords, ps, cfg.region_size, cfg.region_min_tissue)
        slides.append(_Slide(bag.slide_id or f.stem, f, bag.features, regions))
    report("regions", len(files), len(files))
    return slides, skipped, dim


def _load_cohort(
    feature_files: str | os.PathLike | Sequence[str | os.PathLike],
    cfg: SLPDConfig,
    dev: torch.device,
    report: ProgressFn,
    cancel: threading.Event | None,
) -> _Cohort:
    files = _collect_files(feature_files)
    if not files:
        raise FeatureFileError(f"{feature_files}: no feature files")
    slides, skipped, dim = _read_slides(files, cfg, report, cancel)
    if sum(len(s.regions) for s in slides) == 0:
        raise HDMILError(
            f"{feature_files}: no region of {cfg.region_size}×{cfg.region_size} patches with "
            f"≥{cfg.region_min_tissue:.0%} tissue in any slide; SLPD needs larger slides"
        )
    feats_list, idx_list, slide_of = [], [], []
    offset = 0
    for si, s in enumerate(slides):
        feats_list.append(np.asarray(s.features, dtype=np.float32))
        pi = s.regions.patch_index
        idx_list.append(np.where(pi >= 0, pi + offset, -1))
        slide_of.append(np.full(len(pi), si, np.int64))
        offset += len(s.features)
    features = torch.from_numpy(np.concatenate(feats_list))
    features = torch.cat([features, features.new_zeros(1, features.shape[1])]).to(dev)
    region_index = torch.from_numpy(np.concatenate(idx_list))
    region_index[region_index < 0] = features.shape[0] - 1
    return _Cohort(slides, skipped, int(dim), features, region_index, np.concatenate(slide_of))


# --------------------------------------------------------------------------------------------
# Model, optimizer, schedules, resume


def _cosine(base: float, final: float, epochs: int, per_epoch: int, warmup: int = 0,
            warmup_start: float = 0.0) -> np.ndarray:  # fmt: skip
    """Per-step schedule: linear warm-up over ``warmup`` epochs, then cosine base -> final."""
    total = epochs * per_epoch
    w = min(warmup * per_epoch, total)
    warm = np.linspace(warmup_start, base, w, endpoint=False) if w else np.zeros(0)
    steps = np.arange(total - w)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warm, cos])


@dataclass
class _Schedules:
    """Per-step learning rate, weight decay and teacher momentum over the whole run."""

    per_epoch: int
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray

    @classmethod
    def of(cls, cfg: SLPDConfig, n_regions: int) -> _Schedules:
        per_epoch = math.ceil(n_regions / cfg.batch_size)
        return cls(
            per_epoch,
            _cosine(cfg.lr, cfg.min_lr, cfg.epochs, per_epoch, cfg.lr_warmup_epochs),
            _cosine(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, per_epoch),
            _cosine(cfg.teacher_momentum, 1.0, cfg.epochs, per_epoch),
        )

    @property
    def total_steps(self) -> int:
        return len(self.lr)


def _decays(name: str, p: torch.nn.Parameter) -> bool:
    """Weight decay for weight matrices, not for biases, norms, position or [CLS] tokens."""
    return p.ndim > 1 and "pos" not in name and "cls" not in name


def _build(cfg: SLPDConfig, dev: torch.device) -> tuple[SLPD, torch.optim.Optimizer]:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = SLPD(cfg).to(dev)
    named = list(model.student.named_parameters())
    decay = [p for n, p in named if _decays(n, p)]
    no_decay = [p for n, p in named if not _decays(n, p)]
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    return model, opt


def _compatible(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Config keys that differ (epochs may change on resume)."""
    return [k for k in sorted(set(saved) | set(now)) if k != "epochs" and saved.get(k) != now.get(k)]


def _check_same_run(path: Path, saved: dict[str, Any], cfg: SLPDConfig) -> None:
    diff = _compatible(saved, cfg.to_dict())
    if diff:
        raise CheckpointError(
            f"{path}: cannot resume, the config differs in {', '.join(diff)} "
            "(pass resume=False / leave out --resume to start over)"
        )


# --------------------------------------------------------------------------------------------
# Prototypes and one epoch


def _slide_prototype_labels(
    z: np.ndarray, region_slide: np.ndarray, n_slides: int, cfg: SLPDConfig, epoch: int,
    report: ProgressFn, cancel: threading.Event | None,
) -> tuple[list[np.ndarray | None], np.ndarray]:  # fmt: skip
    """k-means inside every slide: (prototypes per slide or None, label of each region)."""
    labels = np.full(len(z), -1, np.int64)
    protos: list[np.ndarray | None] = []
    for si in range(n_slides):
        check_cancelled(cancel, _WHAT)
        report("prototypes", si, n_slides)
        rows = np.nonzero(region_slide == si)[0]
        p, lab = slide_prototypes(
            z[rows], cfg.n_prototypes, cfg.min_regions_for_prototypes,
            seed=derived_seed(cfg.seed, epoch, si), iters=cfg.kmeans_iters,
        )  # fmt: skip
        protos.append(p)
        labels[rows] = lab
    report("prototypes", n_slides, n_slides)
    return protos, labels


def _epoch_prototypes(
    model: SLPD, cohort: _Cohort, cfg: SLPDConfig, epoch: int, report: ProgressFn,
    cancel: threading.Event | None,
) -> tuple[list[np.ndarray | None], dict[str, torch.Tensor]]:  # fmt: skip
    """k-means per slide on the teacher's centre-crop embeddings, neighbours, region targets."""
    _, z = embed_regions(model, cohort.region_index, cohort.features, crop=cfg.global_size)
    z = z.numpy()
    n_slides, region_slide = len(cohort.slides), cohort.region_slide
    protos, labels = _slide_prototype_labels(z, region_slide, n_slides, cfg, epoch, report, cancel)
    neigh = slide_neighbours(protos)
    r, zd = len(z), z.shape[1]
    intra_z = np.zeros((r, zd), np.float32)
    inter_z = np.zeros((r, zd), np.float32)
    inter_valid = np.zeros(r, bool)
    for si in range(n_slides):
        if protos[si] is None:
            continue
        rows = np.nonzero(region_slide == si)[0]
        intra_z[rows] = protos[si][labels[rows]]
        if neigh[si] >= 0:
            cross = cross_slide_targets(protos[si], protos[neigh[si]])
            inter_z[rows] = cross[labels[rows]]
            inter_valid[rows] = True
    targets = {
        "intra_z": torch.from_numpy(intra_z),
        "intra_valid": torch.from_numpy(labels >= 0),
        "inter_z": torch.from_numpy(inter_z),
        "inter_valid": torch.from_numpy(inter_valid),
    }
    return protos, targets


@dataclass
class _Run:
    """What one SLPD training run holds between epochs."""

    cfg: SLPDConfig
    model: SLPD
    opt: torch.optim.Optimizer
    cohort: _Cohort
    sched: _Schedules
    dev: torch.device
    report: ProgressFn
    cancel: threading.Event | None


def _step(run: _Run, epoch: int, it: int, sel: torch.Tensor, gen: torch.Generator,
          targets: dict[str, torch.Tensor] | None) -> dict[str, float]:  # fmt: skip
    """One optimizer step on the regions ``sel``; returns the loss terms."""
    cfg, model, opt, dev = run.cfg, run.model, run.opt, run.dev
    for gi, group in enumerate(opt.param_groups):
        group["lr"] = float(run.sched.lr[it])
        if gi == 0:
            group["weight_decay"] = float(run.sched.weight_decay[it])
    views = make_views(run.cohort.region_index[sel].to(dev), run.cohort.features, cfg, gen)
    intra = inter = None
    if targets is not None:
        intra = (targets["intra_z"][sel].to(dev), targets["intra_valid"][sel].to(dev))
        inter = (targets["inter_z"][sel].to(dev), targets["inter_valid"][sel].to(dev))
    terms = model.losses(views, intra, inter)
    opt.zero_grad(set_to_none=True)
    terms.total.backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(model.student.parameters(), cfg.clip_grad)
    if epoch < cfg.freeze_last_layer_epochs:
        model.student.head.last_weight.grad = None
    opt.step()
    model.update_teacher(float(run.sched.momentum[it]))
    return terms.items()


def _train_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """One epoch (prototypes first once past the warm-up); the epoch's row of the history."""
    cfg, n_regions, per_epoch = run.cfg, run.cohort.n_regions, run.sched.per_epoch
    protos: list[np.ndarray | None] = []
    targets = None
    if epoch >= cfg.proto_warmup_epochs:
        protos, targets = _epoch_prototypes(run.model, run.cohort, cfg, epoch, run.report, run.cancel)
    run.model.train()
    gen = torch.Generator().manual_seed(derived_seed(cfg.seed, epoch, 1))
    perm = torch.randperm(n_regions, generator=gen)
    sums = {"total": 0.0, "dino": 0.0, "intra": 0.0, "inter": 0.0}
    for b in range(per_epoch):
        check_cancelled(run.cancel, _WHAT)
        it = epoch * per_epoch + b
        sel = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        for k, v in _step(run, epoch, it, sel, gen, targets).items():
            sums[k] += v * len(sel)
        run.report("train", it + 1, run.sched.total_steps)
    n_proto = sum(p is not None for p in protos)
    return {"epoch": epoch + 1, **{k: v / n_regions for k, v in sums.items()},
            "slides_with_prototypes": n_proto}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The run: a task for the one training loop


def run_files(out_ckpt: Path) -> RunFiles:
    """The loop's files of a run writing ``out_ckpt``: ``<stem>.log.csv`` beside it, and while
    the run is unfinished ``<stem>.last.safetensors`` + ``<stem>.state.json`` (what resumes)."""
    d, stem = out_ckpt.parent, out_ckpt.stem
    return RunFiles(d / f"{stem}.log.csv", d / f"{stem}.last.safetensors", d / f"{stem}.state.json")


class _PretrainTask(TrainTask):
    """SLPD for ``fit``: one epoch of DINO (+ prototype) steps; every epoch saves ``out_ckpt``."""

    def __init__(self, run: _Run, out_ckpt: Path) -> None:
        self.run, self.out = run, out_ckpt
        self.model, self.optimizer = run.model, run.opt
        self.history: list[dict[str, Any]] = []
        self.epochs_run = 0  # in this call (not counting those before a resume)
        cohort = run.cohort
        self.meta_base = {"feature_dim": cohort.dim, "slides": [s.name for s in cohort.slides],
                          "n_regions": cohort.n_regions}  # fmt: skip

    def meta(self, epoch: int, complete: bool) -> dict[str, Any]:
        return {**self.meta_base, "epoch": epoch, "complete": complete, "history": self.history}

    def train_epoch(self, epoch: int, seed: int | None, cancel: threading.Event | None) -> dict[str, float]:
        row = _train_epoch(self.run, epoch)
        self.history.append(row)
        self.epochs_run += 1
        return {f"train_{'loss' if k == 'total' else k}": v for k, v in row.items() if k != "epoch"}

    def save_best(self, epoch: int, row: dict[str, Any], best: dict[str, Any]) -> None:
        save_slpd(self.out, self.model, self.meta(epoch + 1, epoch + 1 == self.run.cfg.epochs))

    def state(self) -> dict[str, Any]:
        return {"config": self.run.cfg.to_dict(), "history": self.history}

    def load_state(self, state: dict[str, Any]) -> None:
        _check_same_run(self.out, state.get("config", {}), self.run.cfg)
        self.history = list(state.get("history", []))


def _seed_run_files(task: _PretrainTask, files: RunFiles) -> None:
    """Resume from a checkpoint alone (written by older versions, which kept the optimizer in it,
    or a finished run, which keeps none: its moments restart): write the loop's files from it."""
    meta = read_slpd_metadata(task.out)
    _check_same_run(task.out, meta.get("config", {}), task.run.cfg)
    restore_slpd(task.out, task.model, task.optimizer)
    task.history = list(meta.get("history", []))
    last = int(meta.get("epoch", 0)) - 1  # the loop counts finished epochs from 0
    stopper = EarlyStopping(None)
    stopper.step(last, None)
    write_run_state(task, files, last, stopper, {"epoch": last})


def _fit(task: _PretrainTask, resume: bool, cancel: threading.Event | None) -> RunFiles:
    """The epochs, through the one loop; a finished run leaves only its checkpoint and log."""
    files = run_files(task.out)
    fresh = not (files.state.exists() and files.last.exists())
    if resume and fresh and task.out.exists():
        _seed_run_files(task, files)
    loop = LoopConfig(max_epochs=task.run.cfg.epochs, seed=None, monitor=None, what=_WHAT)
    fit(task, loop, files, resume=resume, cancel=cancel)
    if task.epochs_run == 0:  # nothing left to train: make sure the file is a finished checkpoint
        if not task.out.exists() or not read_slpd_metadata(task.out).get("complete"):
            save_slpd(task.out, task.model, task.meta(task.run.cfg.epochs, True))
    for p in (files.last, files.state):  # finished: the checkpoint alone is the run
        p.unlink(missing_ok=True)
    return files


def _write_all(run: _Run, result: SLPDTrainResult, write_outputs: bool) -> None:
    """Final region embeddings and prototypes of every slide, into its h5."""
    run.model.eval()
    slides = run.cohort.slides
    for i, s in enumerate(slides):
        check_cancelled(run.cancel, _WHAT)
        run.report("write", i, len(slides))
        out = embed_slide_regions(run.model, s.regions, s.features, s.name, run.dev)
        if len(out.prototypes) == 0:
            result.slides_without_prototypes.append(s.name)
        if write_outputs and s.path.suffix.lower() in (".h5", ".hdf5"):
            result.outputs.append(write_slpd_outputs(s.path, out, result.checkpoint.name))
    run.report("write", len(slides), len(slides))


def pretrain_slpd(
    feature_files: str | os.PathLike | Sequence[str | os.PathLike],
    cfg: SLPDConfig | None = None,
    out_ckpt: str | os.PathLike = "slpd.safetensors",
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    write_outputs: bool = True,
) -> SLPDTrainResult:
    """Pre-train SLPD on a cohort's feature files and write region embeddings / prototypes.

    feature_files: a folder (``find_feature_files``) or a list of ``.h5`` files with coords.
    cfg: ``slpd_config("small")`` by default; ``encoder.in_dim`` is set from the features.
    resume: continue the unfinished run of ``out_ckpt`` (its ``run_files``; or a checkpoint alone)
    when it has the same config (``epochs`` may grow; a finished run extended restarts the
    optimizer moments); with ``resume=False`` an existing file is overwritten. The checkpoint and
    the run's state are saved after every epoch (``hdmil.train.loop.fit``), so a cancelled run
    (``Cancelled``) resumes from its last finished epoch.
    Slides with fewer than ``cfg.min_regions_for_prototypes`` regions get no prototypes and no
    prototype loss; files without coords (CLAM ``.pt``) are skipped and listed in ``skipped``.
    """
    cfg = cfg or slpd_config("small")
    out_ckpt = Path(out_ckpt)
    dev = torch.device(device or "cpu")
    report = progress or (lambda stage, done, total: None)
    cohort = _load_cohort(feature_files, cfg, dev, report, cancel)
    cfg = replace(cfg, encoder=replace(cfg.encoder, in_dim=cohort.dim))
    cfg.validate()
    model, opt = _build(cfg, dev)
    run = _Run(cfg, model, opt, cohort, _Schedules.of(cfg, cohort.n_regions), dev, report, cancel)
    task = _PretrainTask(run, out_ckpt)
    files = _fit(task, resume, cancel)
    result = SLPDTrainResult(
        checkpoint=out_ckpt, config=cfg, history=task.history,
        slides=[s.name for s in cohort.slides], n_regions=cohort.n_regions,
        slides_without_prototypes=[], skipped=cohort.skipped, epochs_run=task.epochs_run,
        log=files.log,
    )  # fmt: skip
    _write_all(run, result, write_outputs)
    return result
