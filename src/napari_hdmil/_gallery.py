"""Thumbnails for the top-k gallery, read from the slide's pyramid (plain numpy: run it in a worker).

The Qt strip that shows them is ``napari_hdmil._qt.gallery``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hdmil.errors import HDMILError
from napari_hdmil import _layers

THUMB_PX = 72


def read_thumbnails(slide: Any, coords: np.ndarray, patch_size_level0: int, px: int = THUMB_PX) -> list[np.ndarray]:
    """uint8 (px, px, 3) thumbnails of patches at level-0 (x, y) ``coords``, read from the
    coarsest pyramid level that still has ``px`` pixels per patch."""
    ps0 = int(patch_size_level0)
    level = int(slide.best_level_for_downsample(ps0 / px))
    ds = float(slide.level_downsamples[level])
    side = max(1, int(round(ps0 / ds)))
    out = []
    for x, y in np.asarray(coords, dtype=np.int64).reshape(-1, 2):
        region = np.asarray(slide.read_region((int(x), int(y)), level, (side, side)))[..., :3]
        # nearest-neighbour down to px: thumbnails, not analysis
        iy = np.minimum((np.arange(px) * side / px).astype(int), region.shape[0] - 1)
        ix = np.minimum((np.arange(px) * side / px).astype(int), region.shape[1] - 1)
        out.append(np.ascontiguousarray(region[iy][:, ix]))
    return out


def gallery_rows(result: Any, cls: int, k: int) -> np.ndarray:
    """int64 patch rows the gallery shows for class ``cls``: its top-k, then its bottom-k (once each)."""
    rows = np.concatenate([_layers.top_k(result, cls, k), _layers.bottom_k(result, cls, k)])
    return np.array(list(dict.fromkeys(rows.tolist())), dtype=np.int64)


def read_result_thumbnails(result: Any, rows: np.ndarray) -> dict[int, np.ndarray]:
    """Patch row -> thumbnail for ``rows`` of ``result``; {} when the slide cannot be read."""
    from hdmil.slide import open_slide

    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows) or not result.slide_path:
        return {}
    try:
        with open_slide(result.slide_path, mpp=result.mpp) as slide:
            thumbs = read_thumbnails(slide, result.coords[rows], result.patch_size_level0)
    except HDMILError:
        return {}  # thumbnails are a nicety: the result stands without them
    return dict(zip(rows.tolist(), thumbs))
