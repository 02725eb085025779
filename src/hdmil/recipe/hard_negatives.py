"""Hard negatives: the tumour-free patches an encoder + head rate most tumour-like."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.recipe.cohorts import slide_grids
from hdmil.recipe.config import Progress

__all__ = ["hard_negatives"]


def hard_negatives(
    encoder: Any, head: Any, cohort_dir: Path, slide_ids: Sequence[str], per_slide: int,
    progress: Progress | None = None, cancel: threading.Event | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The ``per_slide`` tissue patches of each slide with no tumour that the encoder + head rate
    most tumour-like (lymphoid aggregates, folds, ink: what random sampling rarely draws): per
    slide, uint8 [k, H, W, 3] pixels and float32 [k] tumour shares (all 0)."""
    from hdmil.reading import iter_patches

    pixels, targets = [], []
    encoder.model.eval()
    for slide, grid, frac in slide_grids(cohort_dir, slide_ids, progress, cancel):
        rows = np.flatnonzero(frac == 0)
        scores, kept = [], []
        for batch in iter_patches(slide, grid.coords[rows], grid.patch_size_level0,
                                  batch_size=64, cancel=cancel):
            scores.append(_scores(encoder, head, batch.pixels))
            kept.append((batch.indices, batch.pixels))
        if not scores:
            continue
        order = np.argsort(-np.concatenate(scores), kind="stable")[:per_slide]
        idx = np.concatenate([i for i, _ in kept])
        px = np.concatenate([p for _, p in kept])
        pixels.append(px[order])
        targets.append(frac[rows[idx[order]]].astype(np.float32))
    return pixels, targets


def _scores(encoder: Any, head: Any, pixels: np.ndarray) -> np.ndarray:
    """float32 [B] tumour logits of uint8 [B, H, W, 3] patches."""
    import torch

    with torch.no_grad():
        x = encoder.preprocess(pixels)
        return head(encoder.model(x)).squeeze(1).cpu().numpy()
