"""Batched feature extraction: patch batches in, features in the order of the grid's coords out."""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hdmil.errors import check_cancelled
from hdmil.features.encoders import Encoder
from hdmil.features.io import FeatureBag

if TYPE_CHECKING:
    from hdmil.grid import PatchGrid

Progress = Callable[[str, int, int], None]


class PatchBatchLike(Protocol):
    indices: np.ndarray  # int64 [B]: rows of the coords
    pixels: np.ndarray  # uint8 [B, H, W, 3]
    failed: list[tuple[int, str]]  # (row, why) of the patches that could not be decoded


def extract_features(
    encoder: Encoder,
    batches: Iterable[PatchBatchLike],
    n_total: int,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every batch and put each row where its index says.

    Batches may come in any order (tile-aligned reading reorders patches) and may skip patches
    that failed to decode (listed in ``batch.failed``). Returns ``features`` float32 [n_total, D]
    (zeros where not read) and ``ok`` bool [n_total].
    """
    features = np.zeros((n_total, encoder.dim), dtype=np.float32)
    ok = np.zeros(n_total, dtype=bool)
    try:
        _embed_batches(encoder, batches, features, ok, progress, cancel)
    finally:
        # An error here (the encoder, a cancel) stops the reader's threads before it propagates:
        # a suspended generator would keep them decoding until garbage collection.
        if isinstance(batches, types.GeneratorType):
            batches.close()
    check_cancelled(cancel, "feature extraction")
    return features, ok


def _embed_batches(
    encoder: Encoder,
    batches: Iterable[PatchBatchLike],
    features: np.ndarray,
    ok: np.ndarray,
    progress: Progress | None,
    cancel: threading.Event | None,
) -> None:
    n_total = len(features)
    done = 0
    if progress:
        progress("features", 0, n_total)
    for batch in batches:
        check_cancelled(cancel, "feature extraction")
        idx = np.asarray(batch.indices, dtype=np.int64)
        if idx.size:
            if idx.min() < 0 or idx.max() >= n_total:
                raise ValueError(f"batch indices out of range [0, {n_total}): {idx.min()}..{idx.max()}")
            if len(batch.pixels) != idx.size:
                raise ValueError(f"batch has {idx.size} indices but {len(batch.pixels)} patches")
            features[idx] = encoder.embed(batch.pixels).cpu().numpy()
            ok[idx] = True
        done += idx.size + len(batch.failed)
        if progress:
            progress("features", min(done, n_total), n_total)


def extract_slide_features(
    slide: Any,
    grid: PatchGrid,
    encoder: Encoder,
    batch_size: int = 64,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    stain: Any = None,
) -> FeatureBag:
    """Features of every tissue patch of ``grid``, with coords, LR patches and geometry attributes.

    Patches that could not be decoded are left out of the bag (features, coords and LR patches
    alike, so rows stay aligned); ``attrs["n_failed"]`` counts them. ``stain``: a
    ``StainNormalizer`` applied to the HR patches first (or pass a ``StainedEncoder``); the
    recipe records it, ``attrs["stain_fallbacks"]`` counts the background patches it left as
    they were. LR patches (LIPN's input) are never normalised.
    """
    from hdmil.compute import compute_of
    from hdmil.features.stain import stain_of, with_stain
    from hdmil.reading import iter_patches

    encoder = with_stain(encoder, stain)
    stained, fallbacks0 = stain_of(encoder), getattr(encoder, "fallbacks", 0)
    coords = np.asarray(grid.coords, dtype=np.int64)
    n = len(coords)
    patch_px = int(grid.patch_px)
    batches = iter_patches(
        slide, coords, grid.patch_size_level0, out_px=patch_px, batch_size=batch_size, cancel=cancel
    )
    features, ok = extract_features(encoder, batches, n, progress=progress, cancel=cancel)
    lr = np.asarray(grid.lr_patches(), dtype=np.uint8) if n else np.zeros((0, 16, 16, 3), np.uint8)
    attrs = {
        "encoder": encoder.name,
        "encoder_recipe": _recipe(encoder),  # what rebuilds exactly these weights (predict)
        "dim": encoder.dim,
        "patch_size_level0": int(grid.patch_size_level0),
        "patch_px": patch_px,
        "magnification": float(grid.magnification),
        "mpp": float(grid.mpp),
        "slide": slide.name,
        # lets the viewer open a slide found by SLPD similarity from its feature file
        "slide_path": str(Path(slide.path).resolve()) if getattr(slide, "path", None) else None,
        "n_failed": int(n - ok.sum()),
        "compute": compute_of(encoder).to_report(),  # how the encoder ran (hdmil.compute)
        "stain": stained.method if stained else None,  # the recipe holds its parameters
        "stain_fallbacks": int(encoder.fallbacks - fallbacks0) if stained else None,
        "level0_magnification": _level0_magnification(slide, grid),
        **_slide_size(slide),
    }
    return FeatureBag(features[ok], coords[ok], attrs, lr[ok], slide.name, None)


def _slide_size(slide: Any) -> dict[str, int]:
    """Level-0 ``slide_width`` / ``slide_height`` (readers check coords against them), if known."""
    dims = getattr(slide, "dimensions", None)
    if dims is None or len(dims) != 2:
        return {}
    return {"slide_width": int(dims[0]), "slide_height": int(dims[1])}


def _recipe(encoder: Encoder) -> dict[str, Any] | None:
    from hdmil.features.recipe import recipe_of
    from hdmil.features.stain import StainedEncoder

    inner = encoder.encoder if isinstance(encoder, StainedEncoder) else encoder
    return recipe_of(encoder).to_dict() if isinstance(inner, Encoder) else None


def _level0_magnification(slide: Any, grid: Any) -> float | None:
    """The slide's level-0 magnification (TRIDENT's ``level0_magnification``): its objective
    power, else from the grid's mpp at 10 µm/px per 1x (0.25 µm/px = 40x)."""
    power = getattr(slide, "objective_power", None)  # SimpleNamespace slides in tests have none
    if power:
        return float(power)
    mpp = float(grid.mpp) if grid.mpp else 0.0
    return round(10.0 / mpp, 2) if mpp > 0 else None
