"""SLPD pre-training over a cohort's patch-feature files, and SLPD outputs for each slide.

``pretrain_slpd(feature_files, cfg, out_ckpt)`` builds regions (16 × 16 blocks of the patch grid)
from every slide's features, trains student + EMA teacher (DINO, then DINO + intra- and
inter-slide prototype losses after ``cfg.proto_warmup_epochs``), saves a resumable safetensors
checkpoint after every epoch, and finally writes into each slide's h5:

| dataset | shape | what |
|---|---|---|
| ``region_embeddings`` | float32 [R, E] | teacher [CLS] of each full region (E = 192) |
| ``region_coords`` | int64 [R, 2] | level-0 (x, y) of each region's top-left corner |
| ``region_prototype`` | int64 [R] | the region's prototype (cluster) id, -1 where the slide has none |
| ``prototypes`` | float32 [K, Z] | the slide's prototypes (Z = 256); [0, Z] when too few regions |

plus attributes ``slpd_region_size_level0`` (side of a region in level-0 px), ``slpd_region_patches``
and ``slpd_checkpoint``.

Checkpoint: one ``.safetensors`` file, tensors ``student.*``, ``teacher.*``, ``center`` (and
``optim.*`` while training is unfinished), metadata ``{"hdmil": json}`` with ``model_type: "slpd"``,
the config, epochs done, ``complete`` and the per-epoch loss history. Loading executes no code.
"""

from __future__ import annotations

import json
import math
import os
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdmil.errors import Cancelled, CheckpointError, FeatureFileError, HDMILError
from hdmil.models.slpd import (
    SLPD,
    SLPDConfig,
    cross_slide_targets,
    slide_neighbours,
    slide_prototypes,
    slpd_config,
)

__all__ = [
    "Regions",
    "build_regions",
    "patch_size_of",
    "make_views",
    "SlideSLPD",
    "SLPDTrainResult",
    "pretrain_slpd",
    "embed_slide",
    "embed_regions",
    "write_slpd_outputs",
    "save_slpd_checkpoint",
    "load_slpd",
    "read_slpd_metadata",
]

ProgressFn = Callable[[str, int, int], None]
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Regions from the patch grid


@dataclass
class Regions:
    """The regions of one slide: G × G blocks of its patch grid.

    patch_index: int64 [R, G, G], row of ``features`` for each cell, -1 where no tissue patch;
    coords: int64 [R, 2] level-0 (x, y) of each region's top-left corner;
    grid_index: int64 [R, 2] (row, col) of each region in the grid of regions.
    """

    patch_index: np.ndarray
    coords: np.ndarray
    grid_index: np.ndarray
    region_size: int
    patch_size_level0: int

    def __len__(self) -> int:
        return int(self.patch_index.shape[0])

    @property
    def region_size_level0(self) -> int:
        return self.region_size * self.patch_size_level0

    @property
    def mask(self) -> np.ndarray:
        """bool [R, G, G]: True where a patch is present."""
        return self.patch_index >= 0

    def tokens(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x float32 [R, G, G, D] with zeros for missing patches, mask bool [R, G, G])."""
        feats = np.asarray(features, dtype=np.float32)
        mask = self.mask
        x = feats[np.where(mask, self.patch_index, 0)] if len(feats) else np.zeros(
            mask.shape + (feats.shape[1],), np.float32
        )
        x[~mask] = 0.0
        return x, mask


def patch_size_of(coords: np.ndarray, attrs: dict[str, Any], where: str = "") -> int:
    """``patch_size_level0`` from the file's attributes, else the smallest step between coords."""
    ps = attrs.get("patch_size_level0")
    if ps:
        return int(ps)
    steps = []
    for axis in (0, 1):
        u = np.unique(np.asarray(coords)[:, axis])
        d = np.diff(u)
        steps.extend(d[d > 0].tolist())
    if not steps:
        raise FeatureFileError(
            f"{where}: no 'patch_size_level0' attribute and too few patches to infer it"
        )
    return int(min(steps))


def build_regions(
    coords: np.ndarray,
    patch_size_level0: int,
    region_size: int = 16,
    min_tissue: float = 0.25,
) -> Regions:
    """Cut the patch grid into ``region_size`` × ``region_size`` blocks.

    coords int [N, 2] level-0 (x, y) of the patches. Grid position = (coords - offset) //
    patch_size_level0, where offset (< one patch) is the grid's phase (0 for grids that start at
    the slide origin, like ours). Blocks with at least ``min_tissue`` of their cells present (and
    at least one) become regions, in row-major order; missing cells are -1 in ``patch_index``.
    """
    g, ps = int(region_size), int(patch_size_level0)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(coords) == 0:
        z = np.zeros((0, 2), np.int64)
        return Regions(np.zeros((0, g, g), np.int64), z, z.copy(), g, ps)
    offset = coords.min(0) % ps
    cell = (coords - offset) // ps  # (col, row) per patch
    col, row = cell[:, 0], cell[:, 1]
    brow, bcol = row // g, col // g
    blocks, inverse, counts = np.unique(
        np.stack([brow, bcol], 1), axis=0, return_inverse=True, return_counts=True
    )
    inverse = inverse.reshape(-1)
    keep = (counts >= max(1, math.ceil(min_tissue * g * g))).nonzero()[0]
    new_id = np.full(len(blocks), -1, np.int64)
    new_id[keep] = np.arange(len(keep))
    patch_index = np.full((len(keep), g, g), -1, np.int64)
    rid = new_id[inverse]
    sel = rid >= 0
    patch_index[rid[sel], (row % g)[sel], (col % g)[sel]] = np.nonzero(sel)[0]
    grid_index = blocks[keep].astype(np.int64)
    region_coords = offset[None, :] + grid_index[:, ::-1] * (g * ps)  # (x, y)
    return Regions(patch_index, region_coords.astype(np.int64), grid_index, g, ps)


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


def _center_index(index: torch.Tensor, size: int) -> torch.Tensor:
    g = index.shape[1]
    o = (g - size) // 2
    return index[:, o : o + size, o : o + size]


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


# --------------------------------------------------------------------------------------------
# Embedding regions with a trained (teacher) network


@torch.no_grad()
def embed_regions(
    model: SLPD,
    index: torch.Tensor,
    features: torch.Tensor,
    crop: int | None = None,
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher outputs for regions: (cls [R, E], z [R, Z] L2-normalised).

    index [R, G, G] into ``features`` [N + 1, D] (last row zeros); ``crop``: centre crop side
    (None = the whole region).
    """
    net = model.teacher.eval()
    missing = features.shape[0] - 1
    dev = features.device
    cls_out, z_out = [], []
    for b0 in range(0, index.shape[0], batch_size):
        idx = index[b0 : b0 + batch_size].to(dev)
        if crop is not None:
            idx = _center_index(idx, crop)
        _, z, cls = net(features[idx], idx != missing)
        cls_out.append(cls.cpu())
        z_out.append(z.cpu())
    e, zd = model.cfg.encoder.embed_dim, model.cfg.head_bottleneck
    if not cls_out:
        return torch.zeros(0, e), torch.zeros(0, zd)
    return torch.cat(cls_out), torch.cat(z_out)


@dataclass
class SlideSLPD:
    """SLPD outputs of one slide (what goes into its h5)."""

    region_embeddings: np.ndarray  # float32 [R, E]
    region_coords: np.ndarray  # int64 [R, 2]
    region_prototype: np.ndarray  # int64 [R], -1 = none
    prototypes: np.ndarray  # float32 [K, Z] or [0, Z]
    region_size_level0: int
    region_patches: int
    patch_region: np.ndarray | None = None  # int64 [N]: region row of each input patch, -1 = none

    def datasets(self) -> dict[str, np.ndarray]:
        return {
            "region_embeddings": self.region_embeddings.astype(np.float32),
            "region_coords": self.region_coords.astype(np.int64),
            "region_prototype": self.region_prototype.astype(np.int64),
            "prototypes": self.prototypes.astype(np.float32),
        }


def _index_tensors(features: np.ndarray, regions: Regions) -> tuple[torch.Tensor, torch.Tensor]:
    feats = torch.from_numpy(np.asarray(features, dtype=np.float32))
    feats = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
    idx = torch.from_numpy(regions.patch_index.copy())
    idx[idx < 0] = feats.shape[0] - 1
    return idx, feats


def embed_slide(
    model: SLPD,
    features: np.ndarray,
    coords: np.ndarray,
    patch_size_level0: int,
    slide_id: str = "",
    device: str | torch.device | None = None,
) -> SlideSLPD:
    """Region embeddings and prototypes of one slide with a trained SLPD model (any slide).

    Uses the teacher; the k-means seed comes from the config's seed and ``slide_id``, as in
    ``pretrain_slpd``'s outputs, so the same slide gets the same prototypes.
    """
    cfg = model.cfg
    regions = build_regions(coords, patch_size_level0, cfg.region_size, cfg.region_min_tissue)
    dev = torch.device(device or "cpu")
    return _regions_outputs(model.to(dev), regions, features, slide_id, dev)


def write_slpd_outputs(path: str | os.PathLike, out: SlideSLPD, checkpoint: str = "") -> Path:
    """Add the SLPD datasets and attributes to a slide's h5 feature file (atomic replace)."""
    from hdmil.features.io import update_feature_file

    attrs = {
        "slpd_region_size_level0": int(out.region_size_level0),
        "slpd_region_patches": int(out.region_patches),
        "slpd_checkpoint": str(checkpoint),
    }
    return update_feature_file(path, out.datasets(), attrs)


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_slpd_checkpoint(
    path: str | os.PathLike,
    model: SLPD,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Safetensors checkpoint (atomic): student, teacher, center [+ optimizer state] + JSON meta."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, net in (("student", model.student), ("teacher", model.teacher)):
        for k, v in net.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    tensors["center"] = model.center.detach().cpu().contiguous()
    if optimizer is not None:
        for pid, state in optimizer.state_dict()["state"].items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.{pid}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    from hdmil import __version__

    meta = {
        "model_type": "slpd",
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "hdmil_version": __version__,
        **meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"hdmil": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_slpd_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of an SLPD checkpoint; CheckpointError when it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("hdmil", "{}"))
    except (OSError, ValueError, RuntimeError, Exception) as exc:  # safetensors raises its own
        if isinstance(exc, HDMILError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc
    if meta.get("model_type") != "slpd":
        raise CheckpointError(
            f"{path}: not an SLPD checkpoint (model_type {meta.get('model_type')!r})"
        )
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any decoding problem is a bad checkpoint
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from exc


def _load_into(model: SLPD, tensors: dict[str, torch.Tensor], path: Path) -> None:
    for prefix, net in (("student", model.student), ("teacher", model.teacher)):
        sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        try:
            net.load_state_dict(sd)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: {prefix} weights do not fit the config ({exc})") from exc
    if "center" in tensors:
        model.center.copy_(tensors["center"].reshape(model.center.shape))


def load_slpd(path: str | os.PathLike, device: str | torch.device | None = None) -> SLPD:
    """An SLPD model (student + teacher) from a checkpoint; executes no code."""
    path = Path(path)
    meta = read_slpd_metadata(path)
    try:
        cfg = SLPDConfig.from_dict(meta["config"])
        model = SLPD(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad SLPD config in checkpoint ({exc})") from exc
    _load_into(model, _read_tensors(path), path)
    return model.to(device or "cpu").eval()


# --------------------------------------------------------------------------------------------
# Training


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
    epochs_run: int = 0


@dataclass
class _Slide:
    name: str
    path: Path
    features: np.ndarray
    regions: Regions


def _collect_files(feature_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    from hdmil.features.io import find_feature_files

    if isinstance(feature_files, (str, os.PathLike)):
        p = Path(feature_files)
        return list(find_feature_files(p).values()) if p.is_dir() else [p]
    return [Path(p) for p in feature_files]


def _cosine(base: float, final: float, epochs: int, per_epoch: int, warmup: int = 0,
            warmup_start: float = 0.0) -> np.ndarray:  # fmt: skip
    """Per-step schedule: linear warm-up over ``warmup`` epochs, then cosine base -> final."""
    total = epochs * per_epoch
    w = min(warmup * per_epoch, total)
    warm = np.linspace(warmup_start, base, w, endpoint=False) if w else np.zeros(0)
    steps = np.arange(total - w)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warm, cos])


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("SLPD pre-training cancelled (the last finished epoch is saved)")


def _compatible(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Config keys that differ (epochs may change on resume)."""
    diff = []
    for k in sorted(set(saved) | set(now)):
        if k == "epochs":
            continue
        if saved.get(k) != now.get(k):
            diff.append(k)
    return diff


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
    resume: continue from ``out_ckpt`` when it holds an unfinished run with the same config
    (``epochs`` may grow; a finished run extended restarts the optimizer moments); with
    ``resume=False`` an existing file is overwritten. The checkpoint is saved after every epoch,
    so a cancelled run (``Cancelled``) resumes from its last finished epoch.
    Slides with fewer than ``cfg.min_regions_for_prototypes`` regions get no prototypes and no
    prototype loss; files without coords (CLAM ``.pt``) are skipped and listed in ``skipped``.
    """
    from hdmil.features.io import read_features

    cfg = cfg or slpd_config("small")
    out_ckpt = Path(out_ckpt)
    dev = torch.device(device or "cpu")
    report = progress or (lambda stage, done, total: None)

    # ---- regions of every slide
    files = _collect_files(feature_files)
    if not files:
        raise FeatureFileError(f"{feature_files}: no feature files")
    slides: list[_Slide] = []
    skipped: list[tuple[str, str]] = []
    dim = None
    for i, f in enumerate(files):
        _check(cancel)
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
    n_regions = sum(len(s.regions) for s in slides)
    if n_regions == 0:
        raise HDMILError(
            f"{feature_files}: no region of {cfg.region_size}×{cfg.region_size} patches with "
            f"≥{cfg.region_min_tissue:.0%} tissue in any slide; SLPD needs larger slides"
        )
    cfg = replace(cfg, encoder=replace(cfg.encoder, in_dim=int(dim)))
    cfg.validate()

    # ---- one feature table for the cohort (+ a zero row for missing patches)
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
    region_slide = np.concatenate(slide_of)

    # ---- model, optimizer, resume
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = SLPD(cfg).to(dev)
    decay = [p for n, p in model.student.named_parameters() if p.ndim > 1 and "pos" not in n
             and "cls" not in n]  # fmt: skip
    no_decay = [p for n, p in model.student.named_parameters() if not (p.ndim > 1 and "pos"
                not in n and "cls" not in n)]  # fmt: skip
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    start_epoch, history = 0, []
    if resume and out_ckpt.exists():
        meta = read_slpd_metadata(out_ckpt)
        diff = _compatible(meta.get("config", {}), cfg.to_dict())
        if diff:
            raise CheckpointError(
                f"{out_ckpt}: cannot resume, the config differs in {', '.join(diff)} "
                "(pass resume=False / leave out --resume to start over)"
            )
        tensors = _read_tensors(out_ckpt)
        _load_into(model, tensors, out_ckpt)
        _load_optimizer(opt, tensors)
        start_epoch = int(meta.get("epoch", 0))
        history = list(meta.get("history", []))

    per_epoch = math.ceil(n_regions / cfg.batch_size)
    lr_s = _cosine(cfg.lr, cfg.min_lr, cfg.epochs, per_epoch, cfg.lr_warmup_epochs)
    wd_s = _cosine(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, per_epoch)
    mom_s = _cosine(cfg.teacher_momentum, 1.0, cfg.epochs, per_epoch)
    total_steps = cfg.epochs * per_epoch
    meta_base = {
        "feature_dim": int(dim),
        "slides": [s.name for s in slides],
        "n_regions": int(n_regions),
    }

    def meta_now(epoch: int, complete: bool) -> dict[str, Any]:
        return {**meta_base, "epoch": epoch, "complete": complete, "history": history}

    # ---- epochs
    protos: list[np.ndarray | None] = [None] * len(slides)
    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        _check(cancel)
        targets = None
        if epoch >= cfg.proto_warmup_epochs:
            protos, targets = _epoch_prototypes(
                model, region_index, features, region_slide, len(slides), cfg, epoch, report,
                cancel,
            )  # fmt: skip
        model.train()
        gen = torch.Generator().manual_seed(_seed(cfg.seed, epoch, 1))
        perm = torch.randperm(n_regions, generator=gen)
        sums = {"total": 0.0, "dino": 0.0, "intra": 0.0, "inter": 0.0}
        for b in range(per_epoch):
            _check(cancel)
            it = epoch * per_epoch + b
            for gi, group in enumerate(opt.param_groups):
                group["lr"] = float(lr_s[it])
                if gi == 0:
                    group["weight_decay"] = float(wd_s[it])
            sel = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            views = make_views(region_index[sel].to(dev), features, cfg, gen)
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
            model.update_teacher(float(mom_s[it]))
            for k, v in terms.items().items():
                sums[k] += v * len(sel)
            report("train", it + 1, total_steps)
        n_proto = sum(p is not None for p in protos) if targets is not None else 0
        history.append(
            {"epoch": epoch + 1, **{k: v / n_regions for k, v in sums.items()},
             "slides_with_prototypes": n_proto}
        )  # fmt: skip
        epochs_run += 1
        done = epoch + 1 == cfg.epochs
        save_slpd_checkpoint(out_ckpt, model, meta_now(epoch + 1, done), None if done else opt)

    if epochs_run == 0:  # nothing left to train: make sure the file is a finished checkpoint
        if not out_ckpt.exists() or not read_slpd_metadata(out_ckpt).get("complete"):
            save_slpd_checkpoint(out_ckpt, model, meta_now(cfg.epochs, True))

    # ---- outputs
    result = SLPDTrainResult(
        checkpoint=out_ckpt, config=cfg, history=history, slides=[s.name for s in slides],
        n_regions=int(n_regions), slides_without_prototypes=[], skipped=skipped,
        epochs_run=epochs_run,
    )  # fmt: skip
    model.eval()
    for i, s in enumerate(slides):
        _check(cancel)
        report("write", i, len(slides))
        out = _regions_outputs(model, s.regions, s.features, s.name, dev)
        if len(out.prototypes) == 0:
            result.slides_without_prototypes.append(s.name)
        if write_outputs and s.path.suffix.lower() in (".h5", ".hdf5"):
            result.outputs.append(write_slpd_outputs(s.path, out, out_ckpt.name))
    report("write", len(slides), len(slides))
    return result


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    if not state:
        return
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def _epoch_prototypes(
    model: SLPD,
    region_index: torch.Tensor,
    features: torch.Tensor,
    region_slide: np.ndarray,
    n_slides: int,
    cfg: SLPDConfig,
    epoch: int,
    report: ProgressFn,
    cancel: threading.Event | None,
) -> tuple[list[np.ndarray | None], dict[str, torch.Tensor]]:
    """k-means per slide on the teacher's centre-crop embeddings, neighbours, region targets."""
    _, z = embed_regions(model, region_index, features, crop=cfg.global_size)
    z = z.numpy()
    r, zd = len(z), z.shape[1]
    labels = np.full(r, -1, np.int64)
    protos: list[np.ndarray | None] = []
    for si in range(n_slides):
        _check(cancel)
        report("prototypes", si, n_slides)
        rows = np.nonzero(region_slide == si)[0]
        p, lab = slide_prototypes(
            z[rows], cfg.n_prototypes, cfg.min_regions_for_prototypes,
            seed=_seed(cfg.seed, epoch, si), iters=cfg.kmeans_iters,
        )  # fmt: skip
        protos.append(p)
        labels[rows] = lab
    report("prototypes", n_slides, n_slides)
    neigh = slide_neighbours(protos)
    intra_z = np.zeros((r, zd), np.float32)
    inter_z = np.zeros((r, zd), np.float32)
    has = labels >= 0
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
        "intra_valid": torch.from_numpy(has),
        "inter_z": torch.from_numpy(inter_z),
        "inter_valid": torch.from_numpy(inter_valid),
    }
    return protos, targets


def _kmeans_seed(seed: int, slide_id: str) -> int:
    """Final prototypes: a seed per slide from the run's seed and the slide's id."""
    return _seed(seed, zlib.crc32(slide_id.encode()))


def _regions_outputs(
    model: SLPD, regions: Regions, features: np.ndarray, slide_id: str, device: torch.device
) -> SlideSLPD:
    cfg = model.cfg
    idx, feats = _index_tensors(features, regions)
    feats = feats.to(device)
    cls, _ = embed_regions(model, idx, feats)
    _, zc = embed_regions(model, idx, feats, crop=cfg.global_size)
    protos, labels = slide_prototypes(
        zc.numpy(), cfg.n_prototypes, cfg.min_regions_for_prototypes,
        seed=_kmeans_seed(cfg.seed, slide_id), iters=cfg.kmeans_iters,
    )  # fmt: skip
    if protos is None:
        protos = np.zeros((0, cfg.head_bottleneck), np.float32)
    patch_region = np.full(len(features), -1, np.int64)
    cells = regions.patch_index.reshape(len(regions), -1) if len(regions) else np.zeros((0, 1), np.int64)  # [R, G*G]
    r, c = np.nonzero(cells >= 0)
    patch_region[cells[r, c]] = r
    return SlideSLPD(
        cls.numpy().astype(np.float32), regions.coords, labels, protos,
        regions.region_size_level0, cfg.region_size, patch_region,
    )  # fmt: skip
