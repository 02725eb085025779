"""Features of a whole cohort with one encoder (the recipe's and the accuracy benchmark's)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from hdmil.errors import check_cancelled
from hdmil.recipe.cohorts import manifest
from hdmil.recipe.config import Progress

__all__ = ["cohort_features", "encoder_for_model"]


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
    slides = manifest(cohort_dir)
    skipped: dict[str, str] = {}
    for i, s in enumerate(slides):
        check_cancelled(cancel, "recipe")
        if progress is not None:
            progress("features", i, len(slides))
        with open_slide(cohort_dir / s["path"]) as slide:
            grid = build_grid(slide)
            if len(grid.coords) == 0:
                why = grid.message or "no tissue patch"
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
