"""The demo encoder: a tiny timm CNN fine-tuned on the training slides' patch truth.

A linear head on the encoder's pooled features learns each patch's tumour share (BCE); a second
round adds the tumour-free patches the first round rated most tumour-like (``hard_negatives``).
The encoder then gives its pooled features; the head is only for training.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import check_cancelled
from hdmil.recipe.cohorts import slide_grids
from hdmil.recipe.config import TUMOR_AT, Progress, RecipeConfig, RecipeError
from hdmil.recipe.hard_negatives import hard_negatives
from hdmil.train.loop import TrainTask

__all__ = [
    "PatchEncoderTask",
    "patch_head",
    "sample_patches",
    "train_demo_encoder",
    "train_patch_encoder",
]


def sample_patches(
    cohort_dir: Path, slide_ids: Sequence[str], per_slide: int, seed: int,
    cancel: threading.Event | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [P, 256, 256, 3] patches and their tumour share [P] from the given slides: up to
    ``per_slide / 2`` ground-truth tumour patches of each slide, the rest other tissue patches."""
    from hdmil.reading import iter_patches

    rng = np.random.default_rng([seed, 0xE7C0])
    pixels, targets = [], []
    for slide, grid, frac in slide_grids(cohort_dir, slide_ids, None, cancel):
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
    run_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Fine-tune ``encoder.model`` in place with a linear head on patch tumour shares (BCE).

    pixels uint8 [P, H, W, 3], targets float [P] in [0, 1]. Random flips and quarter turns (H&E has
    no orientation), and with ``stain_jitter`` > 0 a random stain change per patch
    (``hdmil.augment.StainJitter`` of that strength). ``head``: a ``Linear(encoder.dim, 1)`` to go
    on training (a new one when None); the encoder itself still gives its pooled features.
    The epochs run on ``hdmil.train.loop.fit``; its log and last state go to ``run_dir`` (a
    temporary folder when None). Returns the last epoch's mean loss.
    """
    from hdmil.train.loop import LoopConfig, RunFiles, fit

    task = PatchEncoderTask(encoder, patch_head(encoder, seed) if head is None else head,
                            pixels, targets, lr, batch_size, seed, stain_jitter, progress,
                            int(epochs))
    # the task draws from its own seeded generators, as before the loop: the loop seeds nothing
    loop = LoopConfig(max_epochs=int(epochs), seed=None, monitor=None, stage="encoder",
                      what="recipe")
    _trainable(encoder, True)
    try:
        with _run_folder(run_dir) as folder:
            fit(task, loop, RunFiles.in_dir(folder), cancel=cancel)
    finally:
        _trainable(encoder, False)
    return {"loss": task.last_loss, "patches": int(len(pixels)), "epochs": int(epochs),
            "stain_jitter": float(stain_jitter)}


@contextlib.contextmanager
def _run_folder(run_dir: str | os.PathLike | None) -> Iterator[Path]:
    if run_dir is not None:
        yield Path(run_dir)
        return
    with tempfile.TemporaryDirectory(prefix="hdmil-encoder-") as tmp:
        yield Path(tmp)


def _trainable(encoder: Any, on: bool) -> None:
    """Train mode with gradients for fine-tuning; eval mode without them for features."""
    encoder.model.train(on)
    for p in encoder.model.parameters():
        p.requires_grad_(on)


class PatchEncoderTask(TrainTask):
    """The encoder + tumour-share head as a ``TrainTask``: each epoch, the patches in a seeded
    order, batch by batch: stain change, quarter turn and flip, encode, head, BCE."""

    def __init__(self, encoder: Any, head: Any, pixels: np.ndarray, targets: np.ndarray,
                 lr: float, batch_size: int, seed: int, stain_jitter: float,
                 progress: Progress | None, epochs: int) -> None:
        import torch

        from hdmil.augment import StainJitter

        self.encoder, self.head, self.pixels = encoder, head, pixels
        self.y = torch.as_tensor(targets)
        self.gen = torch.Generator().manual_seed(int(seed))  # batch order and orientations
        self.jitter = StainJitter(float(stain_jitter))
        self.stain_rng = np.random.default_rng([int(seed), 0x57A1])
        self.model = torch.nn.ModuleDict({"encoder": encoder.model, "head": head})
        params = list(encoder.model.parameters()) + list(head.parameters())
        self.optimizer = torch.optim.Adam(params, lr=lr)
        self.batch_size, self.progress, self.epochs = batch_size, progress, epochs
        self.steps = max(1, math.ceil(len(pixels) / batch_size))
        self.last_loss = 0.0  # the last epoch's mean loss

    def train_epoch(self, epoch: int, seed: int | None,
                    cancel: threading.Event | None) -> dict[str, float]:
        import torch

        order = torch.randperm(len(self.pixels), generator=self.gen)
        loss_sum = 0.0
        for i in range(self.steps):
            check_cancelled(cancel, "recipe")
            loss_sum += self.step(order[i * self.batch_size:(i + 1) * self.batch_size])
            if self.progress is not None:
                self.progress("encoder", epoch * self.steps + i + 1, self.epochs * self.steps)
        self.last_loss = loss_sum / self.steps
        return {"train_loss": self.last_loss}

    def step(self, idx: Any) -> float:
        """One optimiser step on the patch rows ``idx`` (int64 [B]); the batch's loss."""
        import torch
        from torch import nn

        x = self.encoder.preprocess(self.jitter.per_item(self.pixels[idx.numpy()], self.stain_rng))
        k = int(torch.randint(0, 4, (1,), generator=self.gen))
        x = torch.rot90(x, k, dims=(2, 3))
        if bool(torch.randint(0, 2, (1,), generator=self.gen)):
            x = torch.flip(x, dims=(3,))
        logit = self.head(self.encoder.model(x)).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logit, self.y[idx].to(logit.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def train_demo_encoder(
    cfg: RecipeConfig, out: Path, train_ids: Sequence[str],
    progress: Any, cancel: threading.Event | None,
) -> tuple[Any, dict[str, Any]]:
    """The recipe's encoder, trained on the patch truth of ``train_ids`` in ``out/cohort`` (then
    on hard negatives), and what its training did (the report's ``encoder`` entry). The epoch
    logs go to ``out/encoder`` and ``out/encoder_hard_negatives``. ``progress(name)`` gives the
    progress callback of one named stage."""
    from hdmil.features import create_encoder

    cohort_dir = out / "cohort"
    encoder = create_encoder(cfg.encoder, device="cpu")
    pixels, targets = sample_patches(cohort_dir, train_ids, cfg.encoder_patches, cfg.seed, cancel)
    head = patch_head(encoder, cfg.seed)  # kept for the hard-negative round
    fit = train_patch_encoder(encoder, pixels, targets, cfg.encoder_epochs, cfg.encoder_lr,
                              seed=cfg.seed, progress=progress("encoder"), cancel=cancel,
                              head=head, stain_jitter=cfg.encoder_stain_jitter,
                              run_dir=out / "encoder")
    if cfg.encoder_hard_negatives and cfg.encoder_hard_epochs:
        # a second round with the tumour-free patches the first round rated most tumour-like
        hard_px, hard_y = hard_negatives(encoder, head, cohort_dir, train_ids,
                                         cfg.encoder_hard_negatives, progress("hard_negatives"),
                                         cancel)
        more = train_patch_encoder(
            encoder, np.concatenate([pixels, *hard_px]), np.concatenate([targets, *hard_y]),
            cfg.encoder_hard_epochs, cfg.encoder_lr, seed=cfg.seed + 1,
            progress=progress("encoder_hard_negatives"), cancel=cancel, head=head,
            stain_jitter=cfg.encoder_stain_jitter, run_dir=out / "encoder_hard_negatives")
        fit = {**fit, "loss": more["loss"], "hard_negatives": int(sum(len(y) for y in hard_y)),
               "hard_negative_epochs": more["epochs"]}
    encoder.weights = "trained by the recipe"  # no longer the seeded random ones: feature files say so
    return encoder, fit
