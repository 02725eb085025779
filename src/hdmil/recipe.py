"""The demo model's recipe: synthetic cohort → encoder → features → DMIN → LIPN → held-out report.

    result = run_recipe("out/demo-model", RecipeConfig(seed=0))
    result.checkpoint      # out/demo-model/hdmil-demo.safetensors (DMIN + LIPN, loadable with load_model)
    result.report          # the JSON report (also out/demo-model/hdmil-demo.json)

Everything follows from ``RecipeConfig.seed``: the training cohort is ``synth_cohort(seed)``, the
held-out cohort ``synth_cohort(seed + HELDOUT_OFFSET)`` (its slide seeds are checked to be disjoint
from the training ones), a tiny timm encoder is trained on the training slides' patch truth (its
weights go beside the checkpoint, named by ``encoder_weights``), DMIN then learns from slide labels
only and LIPN from DMIN's masks, all seeded. Two runs with one seed give the same weights. The demo
is trained on synthetic slides and is not for diagnosis (docs/demo_model.md).

The held-out metrics (``heldout_metrics``) use the cohort's ground truth: slide AUC / ACC of HDMIL
(LIPN + DMIN) and HDMIL† (DMIN on all patches), LIPN's recall of ground-truth tumour patches in its
kept set and its kept ratio, and the patch-level AUC of DMIN's tumour attention. The accuracy
benchmark (``benchmarks/accuracy.py``) calls the same functions on more held-out slides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import Cancelled, HDMILError

__all__ = [
    "DEMO_NAME",
    "HELDOUT_OFFSET",
    "RecipeConfig",
    "RecipeError",
    "RecipeResult",
    "cohort_features",
    "encoder_for_model",
    "heldout_metrics",
    "run_recipe",
    "slide_truth",
    "train_patch_encoder",
]

Progress = Callable[[str, int, int], None]
DEMO_NAME = "hdmil-demo"
HELDOUT_OFFSET = 100_000  # held-out cohort seed = seed + this; never a training seed of the recipe
TUMOR_AT = 0.5  # a patch is ground-truth tumour when at least half of it is tumour


class RecipeError(HDMILError):
    """Bad recipe settings, or a recipe run that cannot go on (say, no slide had tissue)."""


@dataclass
class RecipeConfig:
    """What the recipe makes and how; defaults are the bundled demo model's.

    Sizes are chosen for ≤ 30 minutes on 2 CPU cores (see docs/demo_model.md for measurements).
    """

    seed: int = 0
    n_slides: int = 96  # training cohort (train + validation), half tumour
    n_heldout: int = 40  # held-out slides for the report, generated from another seed
    slide_size: int = 4096  # level-0 px of each square slide at 0.5 µm/px (~100-150 tissue patches)
    tumor_burdens: tuple[float, ...] = (0.4, 0.2, 0.1, 0.05, 0.03)
    heldout_burdens: tuple[float, ...] = (0.4, 0.2, 0.1, 0.05, 0.02)
    val_fraction: float = 0.2
    # a tiny timm architecture (0.2 M parameters, ~6 ms per 256 px patch on one CPU core), trained
    # here on the training slides' patch truth; DMIN still learns from slide labels only
    encoder: str = "test_byobnet"
    encoder_patches: int = 24  # patches per training slide for the encoder (tumour first)
    encoder_epochs: int = 4
    encoder_lr: float = 1e-3
    # random stain changes while training the encoder and LIPN (hdmil.augment.StainJitter
    # strengths; 0 = off): without them, held-out slides stained paler or bluer than the training
    # slides were missed whole (docs/demo_model.md)
    encoder_stain_jitter: float = 1.0
    lipn_stain_jitter: float = 1.0
    # a second round: the encoder_hard_negatives tumour-free patches per training slide that the
    # encoder rates most tumour-like (lymphoid aggregates, folds, ink) are added for
    # encoder_hard_epochs more epochs (0 = no second round)
    encoder_hard_negatives: int = 8
    encoder_hard_epochs: int = 2
    batch_size: int = 64
    # DMIN (METHOD §3; k = 8 for small bags) and LIPN (§4)
    keep_rate: float = 0.6
    k_sample: int = 8
    # CLAM's out-of-class instance negatives for two classes: off, as METHOD §3 (it did not keep
    # the tumour evidence in the tumour branch in the one run measured, docs/demo_model.md)
    inst_out_of_class: bool = False
    max_epochs: int = 200
    min_epochs: int = 50
    patience: int = 20
    # DMIN is trained again with seed + 1, + 2, ... (up to dmin_tries runs) while its validation
    # branch AUC is below branch_auc_min (its tumour evidence sits in the normal branch)
    dmin_tries: int = 3
    branch_auc_min: float = 0.9
    lipn_max_epochs: int = 100
    lipn_patience: int = 5
    lipn_batch_patches: int = 256  # ~2 slides per LIPN step: 8x the steps of the default 2048
    lipn_lr: float = 1e-3  # the paper's 1e-4 is for cohorts 100x larger: here it stops unconverged
    # one LIPN threshold per class (normal, tumour), the highest whose kept set holds this share of
    # DMIN's validation attention: normal attention is spread thin over all tissue, so 85% of it
    # changes little; tumour attention sits on few patches (docs/demo_model.md)
    lipn_attention: float | tuple[float, ...] | None = (0.85, 0.98)
    # rings of neighbours joining each patch LIPN keeps (normal, tumour): the tumour set's boundary
    lipn_dilation: tuple[int, ...] | None = (0, 1)
    lipn_recall: float | None = None  # or: one threshold keeping this share of DMIN's instances
    lipn_targets: str = "soft"  # σ(s/τ): LIPN learns DMIN's ranking, not only its 0/1 mask
    lipn_match: str = "bce"  # cross-entropy to σ(s/τ), not L1: ranks rare tumour patches higher
    lipn_views: int = 4  # P averaged over the 4 quarter turns of each LR patch (docs/demo_model.md)
    threads: int = 2  # torch threads
    workers: int | None = None  # slide-making processes (default up to 2)

    @classmethod
    def quick(cls, seed: int = 0, n_slides: int = 4) -> RecipeConfig:
        """A few small slides and two epochs: checks that the recipe runs, trains nothing useful."""
        return cls(
            seed=seed, n_slides=n_slides, n_heldout=2, slide_size=1536, max_epochs=2,
            min_epochs=0, patience=1, lipn_max_epochs=2, lipn_patience=1, batch_size=32,
            tumor_burdens=(0.4,), heldout_burdens=(0.4,), workers=1, encoder_patches=8,
            encoder_epochs=1, encoder_hard_negatives=2, encoder_hard_epochs=1,
        )

    def __post_init__(self) -> None:
        if self.n_slides < 4:
            raise RecipeError(f"the recipe needs at least 4 training slides, got {self.n_slides}")
        if self.n_heldout < 0:
            raise RecipeError(f"n_heldout must be >= 0, got {self.n_heldout}")
        if self.slide_size < 1024:
            raise RecipeError(f"slide_size must be at least 1024 px, got {self.slide_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise RecipeError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        self.tumor_burdens = tuple(float(b) for b in self.tumor_burdens)
        self.heldout_burdens = tuple(float(b) for b in self.heldout_burdens)

    @property
    def heldout_seed(self) -> int:
        return int(self.seed) + HELDOUT_OFFSET

    def train_config(self, device: str = "cpu"):
        from hdmil.train import TrainConfig

        return TrainConfig(
            keep_rate=self.keep_rate, k_sample=self.k_sample,
            inst_out_of_class=self.inst_out_of_class, max_epochs=self.max_epochs,
            min_epochs=self.min_epochs, patience=self.patience,
            lipn_max_epochs=self.lipn_max_epochs, lipn_patience=self.lipn_patience,
            lipn_batch_patches=self.lipn_batch_patches, lipn_recall=self.lipn_recall,
            lipn_attention=self.lipn_attention, lipn_lr=self.lipn_lr, lipn_targets=self.lipn_targets,
            lipn_stain_jitter=self.lipn_stain_jitter, lipn_match=self.lipn_match,
            lipn_views=self.lipn_views, lipn_dilation=self.lipn_dilation,
            seed=self.seed, device=device,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RecipeResult:
    out_dir: Path
    checkpoint: Path
    encoder_weights: Path
    report_path: Path
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# steps


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("recipe cancelled")


def cohort_features(
    cohort_dir: str | os.PathLike,
    features_dir: str | os.PathLike,
    encoder: Any,
    batch_size: int = 64,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, str]:
    """Features of every slide in ``cohort_dir/cohort.json`` into ``features_dir/<slide>.h5``.

    Returns ``{slide_id: why}`` for slides left out (no tissue patch found); the others are written.
    """
    from hdmil.features import extract_slide_features, write_features
    from hdmil.grid import build_grid
    from hdmil.slide import open_slide

    cohort_dir, features_dir = Path(cohort_dir), Path(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    slides = json.loads((cohort_dir / "cohort.json").read_text())["slides"]
    skipped: dict[str, str] = {}
    for i, s in enumerate(slides):
        _check(cancel)
        if progress is not None:
            progress("features", i, len(slides))
        with open_slide(cohort_dir / s["path"]) as slide:
            grid = build_grid(slide)
            if len(grid.coords) == 0:
                why = str(getattr(grid, "message", "") or "no tissue patch")
                skipped[s["slide_id"]] = why.replace(f"{slide.path}: ", "")  # no local paths
                continue
            bag = extract_slide_features(slide, grid, encoder, batch_size=batch_size, cancel=cancel)
        write_features(features_dir / f"{s['slide_id']}.h5", bag)
    if progress is not None:
        progress("features", len(slides), len(slides))
    return skipped


def encoder_for_model(model: Any, device: Any = "cpu") -> Any:
    """The encoder a checkpoint's DMIN was trained on (the pipeline's rule: pinned weights beside
    the checkpoint when the config names them)."""
    from hdmil.pipeline import encoder_for

    return encoder_for(model, device)


def _stratified_split(slide_ids: Sequence[str], labels: Sequence[str], val_fraction: float,
                      seed: int):
    """Train / validation ids, stratified by label, seeded; no test set (it is generated apart)."""
    from hdmil.train import Split

    rng = np.random.default_rng([seed, 0x5B17])
    train, val = [], []
    for label in sorted(set(labels)):
        ids = [s for s, y in zip(slide_ids, labels) if y == label]
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n_val = max(1, int(round(val_fraction * len(ids)))) if len(ids) > 1 else 0
        val += ids[:n_val]
        train += ids[n_val:]
    return Split(tuple(sorted(train)), tuple(sorted(val)), (), fold=0)


def _slide_grids(
    cohort_dir: Path, slide_ids: Sequence[str], progress: Progress | None,
    cancel: threading.Event | None,
):
    """(open slide, its tissue grid, each grid patch's tumour share) for each slide with tissue."""
    from hdmil.grid import build_grid
    from hdmil.slide import open_slide

    slides = {s["slide_id"]: s for s in json.loads((cohort_dir / "cohort.json").read_text())["slides"]}
    for done, sid in enumerate(slide_ids):
        _check(cancel)
        if progress is not None:
            progress("slides", done, len(slide_ids))
        s = slides[sid]
        with open_slide(cohort_dir / s["path"]) as slide:
            grid = build_grid(slide)
            if len(grid.coords):
                yield slide, grid, slide_truth(cohort_dir / s["truth_npz"], grid.coords)
    if progress is not None:
        progress("slides", len(slide_ids), len(slide_ids))


def _sample_patches(
    cohort_dir: Path, slide_ids: Sequence[str], per_slide: int, seed: int,
    cancel: threading.Event | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [P, 256, 256, 3] patches and their tumour share [P] from the given slides: up to
    ``per_slide / 2`` ground-truth tumour patches of each slide, the rest other tissue patches."""
    from hdmil.reading import iter_patches

    rng = np.random.default_rng([seed, 0xE7C0])
    pixels, targets = [], []
    for slide, grid, frac in _slide_grids(cohort_dir, slide_ids, None, cancel):
        tum = np.flatnonzero(frac >= TUMOR_AT)
        other = np.flatnonzero(frac < TUMOR_AT)
        take_t = rng.permutation(tum)[: per_slide // 2]
        take_o = rng.permutation(other)[: per_slide - len(take_t)]
        rows = np.sort(np.concatenate([take_t, take_o]))
        for batch in iter_patches(slide, grid.coords[rows], grid.patch_size_level0,
                                  batch_size=64, cancel=cancel):
            pixels.append(batch.pixels)
            targets.append(frac[rows[batch.indices]])
    if not pixels:
        raise RecipeError(f"{cohort_dir}: no tissue patch in the training slides")
    return np.concatenate(pixels), np.concatenate(targets).astype(np.float32)


def _hard_negatives(
    encoder: Any, head: Any, cohort_dir: Path, slide_ids: Sequence[str], per_slide: int,
    progress: Progress | None = None, cancel: threading.Event | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The ``per_slide`` tissue patches of each slide with no tumour that the encoder + head rate
    most tumour-like (lymphoid aggregates, folds, ink: what random sampling rarely draws): per
    slide, uint8 [k, H, W, 3] pixels and float32 [k] tumour shares (all 0)."""
    import torch

    from hdmil.reading import iter_patches

    pixels, targets = [], []
    encoder.model.eval()
    for slide, grid, frac in _slide_grids(cohort_dir, slide_ids, progress, cancel):
        rows = np.flatnonzero(frac == 0)
        scores, kept = [], []
        for batch in iter_patches(slide, grid.coords[rows], grid.patch_size_level0,
                                  batch_size=64, cancel=cancel):
            with torch.no_grad():
                x = encoder.preprocess(batch.pixels)
                scores.append(head(encoder.model(x)).squeeze(1).cpu().numpy())
            kept.append((batch.indices, batch.pixels))
        if not scores:
            continue
        order = np.argsort(-np.concatenate(scores), kind="stable")[:per_slide]
        idx = np.concatenate([i for i, _ in kept])
        px = np.concatenate([p for _, p in kept])
        pixels.append(px[order])
        targets.append(frac[rows[idx[order]]].astype(np.float32))
    return pixels, targets


def patch_head(encoder: Any, seed: int = 0) -> Any:
    """A seeded ``Linear(encoder.dim, 1)``: the tumour-share head ``train_patch_encoder`` trains."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return torch.nn.Linear(encoder.dim, 1).to(encoder.device)


def train_patch_encoder(
    encoder: Any,
    pixels: np.ndarray,
    targets: np.ndarray,
    epochs: int = 4,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    head: Any = None,
    stain_jitter: float = 0.0,
) -> dict[str, float]:
    """Fine-tune ``encoder.model`` in place with a linear head on patch tumour shares (BCE).

    pixels uint8 [P, H, W, 3], targets float [P] in [0, 1]. Random flips and quarter turns (H&E has
    no orientation), and with ``stain_jitter`` > 0 a random stain change per patch
    (``hdmil.augment.StainJitter`` of that strength). ``head``: a ``Linear(encoder.dim, 1)`` to go
    on training (a new one when None); the encoder itself still gives its pooled features.
    Returns the last epoch's mean loss.
    """
    import torch
    from torch import nn

    from hdmil.augment import StainJitter

    gen = torch.Generator().manual_seed(int(seed))
    jitter = StainJitter(float(stain_jitter))
    stain_rng = np.random.default_rng([int(seed), 0x57A1])
    head = patch_head(encoder, seed) if head is None else head
    for p in encoder.model.parameters():
        p.requires_grad_(True)
    params = list(encoder.model.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    y_all = torch.as_tensor(targets)
    n = len(pixels)
    steps = max(1, math.ceil(n / batch_size))
    loss_sum = 0.0
    encoder.model.train()
    try:
        for epoch in range(int(epochs)):
            order = torch.randperm(n, generator=gen)
            loss_sum = 0.0
            for i in range(steps):
                _check(cancel)
                idx = order[i * batch_size:(i + 1) * batch_size]
                x = encoder.preprocess(jitter.per_item(pixels[idx.numpy()], stain_rng))
                k = int(torch.randint(0, 4, (1,), generator=gen))
                x = torch.rot90(x, k, dims=(2, 3))
                if bool(torch.randint(0, 2, (1,), generator=gen)):
                    x = torch.flip(x, dims=(3,))
                logit = head(encoder.model(x)).squeeze(1)
                loss = nn.functional.binary_cross_entropy_with_logits(
                    logit, y_all[idx].to(logit.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach())
                if progress is not None:
                    progress("encoder", epoch * steps + i + 1, int(epochs) * steps)
    finally:
        encoder.model.eval()
        for p in encoder.model.parameters():
            p.requires_grad_(False)
    return {"loss": loss_sum / steps, "patches": int(n), "epochs": int(epochs),
            "stain_jitter": float(stain_jitter)}


def _load(labels: Path, features_dir: Path, skipped: dict[str, str]):
    from hdmil.train import load_cohort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # slides without tissue: listed in the report instead
        return load_cohort(labels, features_dir, skip_missing=bool(skipped))


def slide_truth(truth_npz: str | os.PathLike, coords: np.ndarray) -> np.ndarray:
    """Tumour share of each patch at level-0 ``coords`` [N, 2] (x, y), from ``<slide>.truth.npz``."""
    with np.load(truth_npz) as t:
        frac = np.asarray(t["tumor_fraction"], np.float32)
        p = int(t["patch_size_level0"])
    rows = np.clip(np.asarray(coords)[:, 1] // p, 0, frac.shape[0] - 1)
    cols = np.clip(np.asarray(coords)[:, 0] // p, 0, frac.shape[1] - 1)
    return frac[rows, cols]


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, bool)
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, score))


def _nearest(value: float, levels: Sequence[float]) -> float:
    return float(min(levels, key=lambda b: abs(math.log(max(value, 1e-6)) - math.log(b))))


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
    import torch

    from hdmil.train.metrics import classification_metrics
    from hdmil.features import read_features

    cohort_dir, features_dir = Path(cohort_dir), Path(features_dir)
    manifest = json.loads((cohort_dir / "cohort.json").read_text())
    classes = list(model.classes)
    if "tumor" not in classes:
        raise RecipeError(f"{model.path}: the model's classes {classes} have no 'tumor'")
    t_idx = classes.index("tumor")
    levels = list(burdens) if burdens else None
    rows = []
    with torch.no_grad():
        for s in manifest["slides"]:
            _check(cancel)
            path = features_dir / f"{s['slide_id']}.h5"
            if not path.exists():
                continue
            bag = read_features(path)
            x = torch.as_tensor(np.asarray(bag.features, np.float32))
            tumour = slide_truth(cohort_dir / s["truth_npz"], bag.coords) >= TUMOR_AT
            with np.load(cohort_dir / s["truth_npz"]) as t:  # every tumour patch, found or not
                n_truth = int((np.asarray(t["tumor_fraction"]) >= TUMOR_AT).sum())
            dagger = model.dmin.predict(x, None)
            index = bag.grid_index() if model.lipn.dilates else None
            lipn_mask = np.asarray(model.lipn.keep_mask(bag.lr_patches, index=index), bool)
            hdmil = model.dmin.predict(x, torch.as_tensor(lipn_mask))
            kept = lipn_mask.any(axis=1)
            scores = dagger.scores[:, t_idx].numpy()
            own = dagger.mask.numpy().any(axis=1)
            label = classes.index(s["label"])
            burden = float(s["tumor_burden"])
            rows.append({
                "slide_id": s["slide_id"], "label": label, "burden": burden,
                "level": _nearest(burden, levels) if levels and label == t_idx else 0.0,
                "p_hdmil": float(hdmil.probabilities[t_idx]),
                "p_dagger": float(dagger.probabilities[t_idx]),
                "probs_hdmil": hdmil.probabilities.numpy(), "probs_dagger": dagger.probabilities.numpy(),
                "n": int(len(kept)), "n_tumour": int(tumour.sum()), "n_tumour_truth": n_truth,
                "lipn_hits": int((kept & tumour).sum()), "lipn_kept": int(kept.sum()),
                "dmin_hits": int((own & tumour).sum()), "dmin_kept": int(own.sum()),
                "attention_auc": _auc(tumour, scores),
            })
    if not rows:
        raise RecipeError(f"{features_dir}: no feature file for any slide of {cohort_dir}")

    def block(sel: list[dict]) -> dict[str, Any]:
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

    report = {"all": block(rows)}
    # upstream failures apart: tumour slides whose tumour the tissue grid (hdmil.grid) never found
    found = [r for r in rows if r["label"] != t_idx or r["n_tumour"] > 0]
    if len(found) < len(rows):
        report["tumour_in_grid"] = block(found)
    if levels:
        normals = [r for r in rows if r["label"] != t_idx]
        for b in sorted(set(levels), reverse=True):
            pos = [r for r in rows if r["label"] == t_idx and r["level"] == b]
            if pos:
                report[f"burden_{b:g}"] = block(pos + normals)
    report["slides"] = [
        {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()
         if not k.startswith("probs_")}
        for r in rows
    ]
    return report


def _complete(cohort_dir: Path) -> bool:
    try:
        m = json.loads((cohort_dir / "cohort.json").read_text())
    except (OSError, ValueError):
        return False
    return all((cohort_dir / s["path"]).exists() and (cohort_dir / s["truth_npz"]).exists()
               for s in m["slides"]) and (cohort_dir / "labels.csv").exists()


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (slide makers)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return time.process_time()
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _seeds(cohort_dir: Path) -> set[int]:
    return {int(s["seed"]) for s in json.loads((cohort_dir / "cohort.json").read_text())["slides"]}


def _clean(obj: Any) -> Any:
    """JSON-ready: NaN → None, numpy scalars → numbers, tuples → lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, 6)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _train_dmin_checked(cohort: Any, split: Any, cfg: RecipeConfig, tcfg: Any, out: Path,
                        progress: Progress | None, cancel: threading.Event | None,
                        say: Callable[[str], None]):
    """Train DMIN, again with the next seed while its tumour branch fails the branch check.

    Nothing in DMIN's loss ties the tumour evidence to the tumour branch: some seeds give a DMIN
    whose *normal* branch attends to tumour (right slide calls, a tumour heatmap on normal tissue).
    The validation branch AUC (``hdmil.train.dmin_trainer.branch_auc``, slide labels only) catches
    that. Returns the first run that passes, else the one with the highest branch AUC, and one
    summary per try.
    """
    from hdmil.train import train_dmin

    runs, tries = [], []
    for t in range(max(1, int(cfg.dmin_tries))):
        seed = int(cfg.seed) + t
        folder = out / ("dmin" if t == 0 else f"dmin-seed{seed}")
        res = train_dmin(cohort, split, dataclasses.replace(tcfg, seed=seed), folder,
                         progress=progress, cancel=cancel)
        b = float(res.best_metrics.get("val_branch_auc", math.nan))
        runs.append(res)
        tries.append({"seed": seed, "folder": folder.name, "best_epoch": res.best_epoch,
                      "val_auc": res.best_metrics.get("val_auc"), "val_branch_auc": b})
        if math.isnan(b) or b >= cfg.branch_auc_min:
            return res, tries
        say(f"DMIN seed {seed}: branch AUC {b:.3f} < {cfg.branch_auc_min} (the tumour evidence is "
            "in another branch); training again with the next seed")
    best = max(range(len(runs)), key=lambda i: tries[i]["val_branch_auc"])
    say(f"DMIN: no seed passed the branch check; keeping seed {tries[best]['seed']}")
    return runs[best], tries


# ---------------------------------------------------------------------------------------------
# the recipe


def run_recipe(
    out_dir: str | os.PathLike,
    cfg: RecipeConfig | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    log: Callable[[str], None] | None = None,
) -> RecipeResult:
    """Make the demo model in ``out_dir``: ``hdmil-demo.safetensors`` (DMIN + LIPN),
    ``hdmil-demo-encoder.safetensors`` (the trained encoder) and ``hdmil-demo.json`` (the report).

    Work folders ``cohort/``, ``heldout/``, ``features/``, ``heldout_features/``, ``dmin/`` and
    ``lipn/`` stay in ``out_dir``; cohorts made before with the same settings are re-used.
    ``progress(stage, done, total)`` for stages cohort, heldout, encoder, features,
    heldout_features, dmin, lipn; ``log(line)`` gets one line per finished step. ``cancel`` (a
    ``threading.Event``) stops between slides / steps with ``Cancelled``.
    """
    import torch

    from hdmil import __version__
    from hdmil.checkpoint import _sha256, load_model, save_checkpoint
    from hdmil.features import create_encoder, save_encoder
    from hdmil.synth import synth_cohort
    from hdmil.train import train_lipn

    cfg = cfg or RecipeConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.threads)))
    timings: dict[str, float] = {}  # wall-clock seconds per step
    cpu: dict[str, float] = {}  # CPU seconds per step (all threads and slide-making processes)
    t_all, c_all = time.perf_counter(), _cpu_seconds()
    try:
        # -- cohorts: training and held-out, from different seeds --------------------------------
        t0, c0 = time.perf_counter(), _cpu_seconds()
        size = (cfg.slide_size, cfg.slide_size)

        def stage(name: str) -> Progress | None:
            return None if progress is None else (lambda _s, d, n: progress(name, d, n))

        def cohort(name: str, n: int, seed: int, burdens: tuple[float, ...]) -> str:
            """Make a cohort, or re-use the one a previous run made with the same settings."""
            folder = out / name
            marker = folder / "recipe-cohort.json"
            want = {"n_slides": n, "seed": seed, "size": cfg.slide_size, "burdens": list(burdens)}
            if marker.exists() and json.loads(marker.read_text()) == want and _complete(folder):
                return "re-used"
            marker.unlink(missing_ok=True)
            synth_cohort(folder, n, seed=seed, size=size, tumor_burdens=burdens,
                         workers=cfg.workers, progress=stage(name), cancel=cancel)
            marker.write_text(json.dumps(want))
            return "made"

        how = cohort("cohort", cfg.n_slides, cfg.seed, cfg.tumor_burdens)
        timings["cohort"] = time.perf_counter() - t0
        cpu["cohort"] = _cpu_seconds() - c0
        say(f"cohort: {cfg.n_slides} slides of {cfg.slide_size} px {how} in {timings['cohort']:.0f} s")
        if cfg.n_heldout:
            t0, c0 = time.perf_counter(), _cpu_seconds()
            how = cohort("heldout", cfg.n_heldout, cfg.heldout_seed, cfg.heldout_burdens)
            timings["heldout"] = time.perf_counter() - t0
            cpu["heldout"] = _cpu_seconds() - c0
            shared = _seeds(out / "cohort") & _seeds(out / "heldout")
            if shared:  # 31-bit seeds drawn per slide: never seen, but the report relies on it
                raise RecipeError(f"{out}: held-out slides share seeds with training: {sorted(shared)}")
            say(f"held-out cohort: {cfg.n_heldout} slides {how} in {timings['heldout']:.0f} s")

        # -- split, then the encoder trained on the training slides' patch truth ---------------
        manifest = json.loads((out / "cohort" / "cohort.json").read_text())["slides"]
        split = _stratified_split([s["slide_id"] for s in manifest],
                                  [s["label"] for s in manifest], cfg.val_fraction, cfg.seed)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        encoder = create_encoder(cfg.encoder, device="cpu")
        pixels, targets = _sample_patches(out / "cohort", split.train, cfg.encoder_patches,
                                          cfg.seed, cancel)
        head = patch_head(encoder, cfg.seed)  # kept for the hard-negative round
        enc_fit = train_patch_encoder(encoder, pixels, targets, cfg.encoder_epochs,
                                      cfg.encoder_lr, seed=cfg.seed, progress=stage("encoder"),
                                      cancel=cancel, head=head,
                                      stain_jitter=cfg.encoder_stain_jitter)
        if cfg.encoder_hard_negatives and cfg.encoder_hard_epochs:
            # a second round with the tumour-free patches the first round rated most tumour-like
            hard_px, hard_y = _hard_negatives(encoder, head, out / "cohort", split.train,
                                              cfg.encoder_hard_negatives, stage("hard_negatives"),
                                              cancel)
            more = train_patch_encoder(
                encoder, np.concatenate([pixels, *hard_px]), np.concatenate([targets, *hard_y]),
                cfg.encoder_hard_epochs, cfg.encoder_lr, seed=cfg.seed + 1,
                progress=stage("encoder_hard_negatives"), cancel=cancel, head=head,
                stain_jitter=cfg.encoder_stain_jitter)
            enc_fit = {**enc_fit, "loss": more["loss"],
                       "hard_negatives": int(sum(len(y) for y in hard_y)),
                       "hard_negative_epochs": more["epochs"]}
        del pixels
        timings["encoder"] = time.perf_counter() - t0
        cpu["encoder"] = _cpu_seconds() - c0
        hard_note = (f", then + {enc_fit['hard_negatives']} hard negatives x "
                     f"{enc_fit['hard_negative_epochs']} epochs" if "hard_negatives" in enc_fit else "")
        say(f"encoder {encoder.name}: {enc_fit['patches']} patches x {enc_fit['epochs']} epochs"
            f"{hard_note}, loss {enc_fit['loss']:.3f}, {timings['encoder']:.0f} s")

        # -- features --------------------------------------------------------------------------
        t0, c0 = time.perf_counter(), _cpu_seconds()
        skipped = cohort_features(out / "cohort", out / "features", encoder, cfg.batch_size,
                                  stage("features"), cancel)
        timings["features"] = time.perf_counter() - t0
        cpu["features"] = _cpu_seconds() - c0
        say(f"features ({encoder.name}, {encoder.dim}-d): {timings['features']:.0f} s"
            + (f"; {len(skipped)} slides without tissue left out" if skipped else ""))
        heldout_skipped: dict[str, str] = {}
        if cfg.n_heldout:
            t0, c0 = time.perf_counter(), _cpu_seconds()
            heldout_skipped = cohort_features(out / "heldout", out / "heldout_features", encoder,
                                              cfg.batch_size, stage("heldout_features"), cancel)
            timings["heldout_features"] = time.perf_counter() - t0
            cpu["heldout_features"] = _cpu_seconds() - c0

        # -- DMIN then LIPN, from slide labels only ---------------------------------------------
        cohort_ = _load(out / "cohort" / "labels.csv", out / "features", skipped)
        if len(set(cohort_.labels.tolist())) < 2:
            raise RecipeError(f"{out}: the training cohort has slides of one class only")
        split = split.restrict(cohort_.slide_ids)
        if not split.train or not split.val:
            raise RecipeError(f"{out}: too few slides with tissue to train and validate")
        tcfg = cfg.train_config()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        dmin_res, dmin_tries = _train_dmin_checked(cohort_, split, cfg, tcfg, out, stage("dmin"),
                                                   cancel, say)
        timings["dmin"] = time.perf_counter() - t0
        cpu["dmin"] = _cpu_seconds() - c0
        say(f"DMIN: best epoch {dmin_res.best_epoch} of {dmin_res.epochs_run}, "
            f"val AUC {dmin_res.best_metrics.get('val_auc', math.nan):.3f}, kept "
            f"{dmin_res.best_metrics.get('val_kept_ratio', math.nan):.2f}, branch AUC "
            f"{dmin_res.best_metrics.get('val_branch_auc', math.nan):.3f}, "
            f"{len(dmin_tries)} {'try' if len(dmin_tries) == 1 else 'tries'}, {timings['dmin']:.0f} s")
        t0, c0 = time.perf_counter(), _cpu_seconds()
        lipn_res = train_lipn(cohort_, split, dmin_res.checkpoint, tcfg, out / "lipn",
                              progress=stage("lipn"), cancel=cancel)
        timings["lipn"] = time.perf_counter() - t0
        cpu["lipn"] = _cpu_seconds() - c0
        say(f"LIPN: best epoch {lipn_res.best_epoch} of {lipn_res.epochs_run}, "
            f"{timings['lipn']:.0f} s")

        # -- held-out evaluation with ground truth ------------------------------------------
        model = load_model(lipn_res.checkpoint)
        heldout: dict[str, Any] = {}
        if cfg.n_heldout:
            t0, c0 = time.perf_counter(), _cpu_seconds()
            heldout = heldout_metrics(model, out / "heldout", out / "heldout_features",
                                      cfg.heldout_burdens, cancel)
            timings["evaluate"] = time.perf_counter() - t0
            cpu["evaluate"] = _cpu_seconds() - c0
            a = heldout["all"]
            say(f"held-out: HDMIL AUC {a['hdmil_auc']:.3f} ACC {a['hdmil_acc']:.3f}, HDMIL† AUC "
                f"{a['hdmil_dagger_auc']:.3f}, LIPN recall {a['lipn_recall']:.3f} kept "
                f"{a['lipn_kept_ratio']:.2f}, attention AUC {a['attention_auc']:.3f}")

        # -- the bundled files -------------------------------------------------------------
        enc_path = save_encoder(encoder, out / f"{DEMO_NAME}-encoder.safetensors")
        timings["total"] = time.perf_counter() - t_all
        cpu["total"] = _cpu_seconds() - c_all
        summary = {k: v for k, v in heldout.items() if k != "slides"}
        config = {k: v for k, v in model.config.items() if k not in ("modules", "model_type")}
        config.update({
            "encoder": encoder.name,  # the architecture; its weights are the file below
            "encoder_pretrained": False,
            "encoder_weights": enc_path.name,  # beside the checkpoint (trained by this recipe)
            "demo": True,
            "intended_use": "demonstration on synthetic slides; not for diagnosis",
        })
        prov = dict(config.get("provenance") or {})
        prov.update({
            "stage": "recipe",
            "recipe": cfg.to_dict(),
            "training_cohort": {"seed": cfg.seed, "n_slides": cfg.n_slides,
                                "slide_size": cfg.slide_size, "skipped": skipped},
            "heldout_cohort": {"seed": cfg.heldout_seed, "n_slides": cfg.n_heldout},
            "heldout_metrics": summary,
        })
        for key in ("features_dir", "labels", "dmin_checkpoint"):  # machine-local paths
            prov.pop(key, None)
        config["provenance"] = _clean(prov)
        ckpt = save_checkpoint(out / f"{DEMO_NAME}.safetensors",
                               {"dmin": model.dmin, "lipn": model.lipn}, _clean(config))
        report = _clean({
            "model": ckpt.name,
            "sha256": _sha256(ckpt),
            "bytes": ckpt.stat().st_size,
            "encoder": {"name": encoder.name, "dim": encoder.dim, "file": enc_path.name,
                        "weights": "trained by the recipe on the training slides' patch truth",
                        **enc_fit},
            "classes": list(model.classes),
            "recipe": cfg.to_dict(),
            "training_cohort": {"seed": cfg.seed, "n_slides": cfg.n_slides,
                                "n_with_features": len(cohort_), "skipped": skipped,
                                "n_train": len(split.train), "n_val": len(split.val)},
            "heldout_cohort": {"seed": cfg.heldout_seed, "n_slides": cfg.n_heldout,
                               "skipped": heldout_skipped},
            "dmin": {"best_epoch": dmin_res.best_epoch, "epochs_run": dmin_res.epochs_run,
                     "best_val": dmin_res.best_metrics, "tries": dmin_tries},
            "lipn": {"best_epoch": lipn_res.best_epoch, "epochs_run": lipn_res.epochs_run,
                     "best_val": lipn_res.best_metrics},
            "heldout": heldout,
            "timings_s": timings,
            "cpu_s": cpu,
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": int(cfg.threads),
                        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
            "versions": {"hdmil": __version__, "torch": torch.__version__},
        })
        report_path = out / f"{DEMO_NAME}.json"
        tmp = report_path.with_suffix(".json.part")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, report_path)
        say(f"wrote {ckpt} ({ckpt.stat().st_size / 1e6:.1f} MB) and {report_path} "
            f"in {timings['total'] / 60:.1f} min")
        return RecipeResult(out, ckpt, enc_path, report_path, report)
    finally:
        torch.set_num_threads(threads)


def install_demo(out_dir: str | os.PathLike, assets_dir: str | os.PathLike | None = None) -> list[Path]:
    """Copy a recipe's three files into the package's assets (what ``make model`` bundles)."""
    src = Path(out_dir)
    dst = Path(assets_dir) if assets_dir else Path(__file__).parent / "assets"
    names = [f"{DEMO_NAME}.safetensors", f"{DEMO_NAME}-encoder.safetensors", f"{DEMO_NAME}.json"]
    missing = [n for n in names if not (src / n).exists()]
    if missing:
        raise RecipeError(f"{src}: no {', '.join(missing)}; run the recipe first")
    dst.mkdir(parents=True, exist_ok=True)
    copied = [Path(shutil.copy2(src / n, dst / n)) for n in names]
    for path in copied:  # package data: readable by every user of the install
        path.chmod(0o644)
    return copied
