"""The patch grid of a slide: HR 256 px at 20x ⇄ LR 16 px at 1.25x, in level-0 coordinates.

One grid cell is one HR patch (``patch_size_level0`` level-0 px, 128 µm at the defaults) and one LR
patch (16 × 16 px of ``lr_image``, the whole slide at 1.25x laid out exactly on the grid). The grid
starts at level-0 (0, 0) and covers the whole slide: its last row and column run past the slide's
bottom and right edges and are padded with background (white, never tissue), as CLAM and TRIDENT
pad them, so tissue at the edges is analysed (``padded`` says which patches). A patch is kept when
at least ``tissue_threshold`` of its LR cell is tissue, padding counted as background
(docs/method.md §1).

>>> grid = build_grid(slide)                 # slide: hdmil.slide.Slide
>>> grid.coords[:2], grid.shape, grid.patch_size_level0
>>> lr = grid.lr_patches()                   # uint8 [N, 16, 16, 3], LIPN's input
>>> heat = grid.to_raster(scores)            # (rows, cols) with NaN off tissue
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse

from hdmil.annotations import slide_offset
from hdmil.errors import SlideError, check_cancelled
from hdmil.slide import MAX_WINDOW_PIXELS, MPP_RANGE, check_mpp, check_overview_size, slide_label
from hdmil.tissue import TissueParams, tissue_mask

__all__ = [
    "PatchGrid", "build_grid", "grid_shape", "padded_mask", "patch_size_level0", "read_lr_image",
    "target_mpp",
]

Progress = Callable[[str, int, int], Any]

# What the LR image holds past the slide's edges: white glass, as Slide.read_region pads and as
# the tissue mask sees background.
_BACKGROUND = 255
# Source pixels per band while streaming a level into the LR image (≈ 24 MB uint8, 96 MB float).
_BAND_PIXELS = 8_000_000
# A patch's side in level-0 px: below 16 px the LR patch (16 px) would be larger than the patch
# it summarises (--mpp 100 gives 1 px patches, an LR image 256x the slide); above 16384 px one
# patch is an 800 MB read (a unit mix-up the other way; 0.05 µm/px gives 2560 px at 20x).
PATCH_LEVEL0_RANGE = (16, 16384)


def grid_shape(dimensions: tuple[int, int], patch_size_level0: int) -> tuple[int, int]:
    """(rows, cols) of the grid over a (w, h) level-0 slide: the partial last row and column
    count (ceil, as CLAM and TRIDENT tile), so every slide pixel lies in one patch.

    >>> grid_shape((2220, 2967), 256)       # CMU-1-Small-Region: 11 x 8 full patches + the edges
    (12, 9)
    """
    w, h = (int(v) for v in dimensions)
    ps0 = int(patch_size_level0)
    return -(-h // ps0), -(-w // ps0)


def padded_mask(coords: np.ndarray, patch_size_level0: int, dimensions: tuple[int, int]) -> np.ndarray:
    """bool [N]: the patches at level-0 ``coords`` (x, y) whose footprint runs past the right or
    bottom edge of a (w, h) slide (read with background padding). All False when (w, h) is
    unknown (0, 0)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    w, h = (int(v) for v in dimensions)
    if w <= 0 or h <= 0:
        return np.zeros(len(coords), bool)
    end = coords + int(patch_size_level0)
    return (end[:, 0] > w) | (end[:, 1] > h)


def target_mpp(magnification: float) -> float:
    """µm per pixel at an objective magnification: 10x ≈ 1 µm/px, so 20x → 0.5, 1.25x → 8."""
    if not magnification > 0:
        raise ValueError(f"magnification must be positive, got {magnification}")
    return 10.0 / magnification


@dataclass(eq=False)
class PatchGrid:
    """Tissue patches of one slide on a regular grid.

    Arrays with N rows list the tissue patches only, in row-major grid order.
    """

    coords: np.ndarray  # int64 [N, 2] level-0 (x, y) of each patch's top-left corner
    index: np.ndarray  # int64 [N, 2] (row, col) in the full grid
    shape: tuple[int, int]  # (rows, cols) of the full grid
    patch_size_level0: int  # side of one patch in level-0 px
    mpp: float  # level-0 µm/px used
    tissue_fraction: np.ndarray  # float32 [N]
    mask: np.ndarray  # bool (rows * lr_patch_px, cols * lr_patch_px)
    lr_image: np.ndarray  # uint8 (rows * lr_patch_px, cols * lr_patch_px, 3)
    message: str = ""
    patch_px: int = 256
    magnification: float = 20.0
    lr_magnification: float = 1.25
    lr_patch_px: int = 16
    tissue_threshold: float = 0.25
    origin: tuple[int, int] = (0, 0)
    dimensions: tuple[int, int] = (0, 0)  # level-0 (w, h) of the slide
    slide_name: str = ""
    level: int = 0  # pyramid level the LR image was made from
    cell_fraction: np.ndarray | None = field(default=None, repr=False)  # float32 (rows, cols)
    # OpenSlide's openslide.bounds-x/y (MRXS): the level-0 px where QuPath's (0, 0) lies; GeoJSON
    # exports subtract it so QuPath draws them on the same tissue ((0, 0) for other formats)
    bounds_offset: tuple[int, int] = (0, 0)

    @classmethod
    def from_coords(
        cls,
        coords: np.ndarray,
        patch_size_level0: int,
        dimensions: tuple[int, int],
        mpp: float,
        slide_name: str = "",
        lr_patch_px: int = 16,
    ) -> PatchGrid:
        """A grid around patch coordinates read back from a feature file (no LR image, no mask).

        ``coords`` must lie on this grid (multiples of ``patch_size_level0`` from (0, 0)).
        """
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        ps0 = int(patch_size_level0)
        if (coords % ps0).any() or (coords < 0).any():
            raise ValueError(
                f"coordinates are not on a grid of {ps0} px patches from (0, 0); "
                "they were made with another patch size or offset"
            )
        w, h = (int(v) for v in dimensions)
        rows, cols = grid_shape((w, h), ps0)
        index = coords[:, ::-1] // ps0
        if len(index) and ((index[:, 0] >= rows) | (index[:, 1] >= cols)).any():
            raise ValueError(f"coordinates outside the {w} x {h} px slide's grid of {ps0} px patches")
        return cls(
            coords=coords,
            index=index,
            shape=(rows, cols),
            patch_size_level0=ps0,
            mpp=float(mpp),
            tissue_fraction=np.full(len(coords), np.nan, np.float32),
            mask=np.zeros((rows * lr_patch_px, cols * lr_patch_px), bool),
            lr_image=np.full((rows * lr_patch_px, cols * lr_patch_px, 3), 255, np.uint8),
            message=f"{len(coords)} patches from coordinates",
            lr_patch_px=lr_patch_px,
            dimensions=(w, h),
            slide_name=slide_name,
        )

    @property
    def patch_size_um(self) -> float:
        return self.patch_size_level0 * self.mpp

    @property
    def lr_scale(self) -> float:
        """Level-0 px per LR px."""
        return self.patch_size_level0 / self.lr_patch_px

    @property
    def lr_mpp(self) -> float:
        """µm per px of ``lr_image`` and ``mask``."""
        return self.mpp * self.lr_scale

    @property
    def n(self) -> int:
        return int(self.coords.shape[0])

    @property
    def padded(self) -> np.ndarray:
        """bool [N]: tissue patches that run past the slide's right or bottom edge (their
        footprint beyond it is background padding)."""
        return padded_mask(self.coords, self.patch_size_level0, self.dimensions)

    @property
    def n_padded(self) -> int:
        return int(self.padded.sum())

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        rows, cols = self.shape
        return (
            f"PatchGrid({self.slide_name!r}, {self.n} tissue patches of {rows}x{cols}, "
            f"patch {self.patch_size_level0} px = {self.patch_size_um:.1f} µm)"
        )

    def lr_patches(self) -> np.ndarray:
        """uint8 [N, lr_patch_px, lr_patch_px, 3]: each tissue patch's cell of ``lr_image``."""
        p = self.lr_patch_px
        rows, cols = self.shape
        cells = self.lr_image.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4)
        return np.ascontiguousarray(cells[self.index[:, 0], self.index[:, 1]])

    def to_raster(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """[N] or [N, C] per-patch values -> (rows, cols) or (rows, cols, C), one pixel per patch.

        Cells without a tissue patch hold ``fill``. Floating values keep their dtype.
        """
        values = np.asarray(values)
        if values.ndim not in (1, 2) or values.shape[0] != self.n:
            raise ValueError(f"values must be [N] or [N, C] with N = {self.n}, got {values.shape}")
        fill_arr = np.asarray(fill)
        if np.issubdtype(values.dtype, np.floating) and np.can_cast(
            fill_arr, values.dtype, casting="same_kind"
        ):
            dtype = values.dtype
        else:
            dtype = np.result_type(values.dtype, fill_arr.dtype)
        out = np.full(self.shape + values.shape[1:], fill, dtype=dtype)
        out[self.index[:, 0], self.index[:, 1]] = values
        return out


def build_grid(
    slide,
    mpp: float | None = None,
    patch_px: int = 256,
    magnification: float = 20.0,
    lr_magnification: float = 1.25,
    tissue_threshold: float = 0.25,
    tissue_params: TissueParams | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    snap: float = 0.05,
) -> PatchGrid:
    """The tissue patch grid of ``slide``.

    Args:
        slide: an open ``hdmil.slide.Slide`` (anything with its ``dimensions``,
            ``level_downsamples``, ``best_level_for_downsample``, ``read_region``, ``mpp``).
        mpp: level-0 µm/px; overrides the slide's own. Without either: MissingMPPError.
        patch_px: HR patch side at ``magnification`` (256 at 20x = 128 µm).
        magnification: HR magnification; µm/px there is 10 / magnification.
        lr_magnification: LR magnification; LR patch side = patch_px * lr / hr (16).
        tissue_threshold: keep a patch when this fraction of it or more is tissue.
        tissue_params: tissue mask settings (``TissueParams()``).
        progress: ``progress(stage, done, total)`` while the LR image is read.
        cancel: set it to stop; raises ``Cancelled``.
        snap: when the slide's µm/px is within this relative distance of a whole multiple (or
            fraction) of the target's, use the whole ratio: a "20x" scan at 0.499 µm/px gets
            256 px patches (as CLAM and the reference read it), a "40x" at 0.2527 gets 512.
            0 for the exact physical size.

    Returns:
        A ``PatchGrid``; N = 0 (with ``message`` saying why) for a slide smaller than one patch
        or without tissue.
    """
    mpp = _grid_mpp(slide, mpp)
    if not 0.0 <= tissue_threshold <= 1.0:
        raise ValueError(f"tissue_threshold must be within [0, 1], got {tissue_threshold}")
    lr_px = _lr_patch_px(patch_px, magnification, lr_magnification)

    ps0 = patch_size_level0(mpp, patch_px, magnification, snap)
    _check_patch_size(slide, ps0, mpp, patch_px, magnification)
    w, h = (int(v) for v in slide.dimensions)
    # Smaller than one patch either way: nothing to tile (its one cell would be mostly padding).
    rows, cols = grid_shape((w, h), ps0) if w >= ps0 and h >= ps0 else (h // ps0, w // ps0)
    name = str(getattr(slide, "name", "") or "")
    common = dict(  # the fields an empty grid has too
        shape=(rows, cols), patch_size_level0=ps0, mpp=mpp, patch_px=int(patch_px),
        magnification=float(magnification), lr_magnification=float(lr_magnification),
        lr_patch_px=lr_px, tissue_threshold=float(tissue_threshold), dimensions=(w, h),
        slide_name=name, bounds_offset=slide_offset(slide),
    )
    if rows == 0 or cols == 0:
        message = (
            f"{slide_label(slide)}: the slide ({w} x {h} px) is smaller than one patch "
            f"({ps0} px = {ps0 * mpp:.0f} µm at {mpp:g} µm/px); no patches"
        )
        return _empty_grid(message=message, **common)

    scale = ps0 / lr_px  # level-0 px per LR px
    level = int(slide.best_level_for_downsample(scale))
    lr_image = read_lr_image(
        slide, (rows * lr_px, cols * lr_px), scale, level=level, progress=progress, cancel=cancel
    )
    mask = _edge_tissue(lr_image, (w, h), scale, tissue_params or TissueParams(), mpp, progress)
    cell = mask.reshape(rows, lr_px, cols, lr_px).mean(axis=(1, 3), dtype=np.float32)
    # Strictly positive: a threshold of 0 must not keep empty background cells.
    keep = (cell >= tissue_threshold) & (cell > 0)
    index = np.argwhere(keep).astype(np.int64)  # row-major order
    coords = index[:, ::-1] * ps0
    n_padded = int(padded_mask(coords, ps0, (w, h)).sum())
    message = _grid_message(slide, len(index), (rows, cols), mask, tissue_threshold, ps0, mpp, n_padded)
    return PatchGrid(coords=coords.astype(np.int64), index=index, tissue_fraction=cell[keep],
                     mask=mask, lr_image=lr_image, message=message, level=level, cell_fraction=cell,
                     **common)  # fmt: skip


def _edge_tissue(lr_image: np.ndarray, dimensions: tuple[int, int], scale: float,
                 params: TissueParams, mpp: float, progress: Progress | None) -> np.ndarray:
    """The tissue mask of the LR pixels on the slide; the padding past its edges is background.

    Masking only the slide's own pixels keeps the padding out of the threshold statistics and
    the morphology, so the mask inside the slide is the one its pixels alone give.
    """
    w, h = dimensions
    in_h = min(lr_image.shape[0], math.ceil(h / scale - 1e-9))
    in_w = min(lr_image.shape[1], math.ceil(w / scale - 1e-9))
    mask = np.zeros(lr_image.shape[:2], bool)
    mask[:in_h, :in_w] = _tissue(lr_image[:in_h, :in_w], params, mpp * scale, progress)
    return mask


def _tissue(lr_image: np.ndarray, params: TissueParams, lr_mpp: float,
            progress: Progress | None) -> np.ndarray:
    """The tissue mask of the LR image, as one "tissue" progress step."""
    if progress is not None:
        progress("tissue", 0, 1)
    mask = tissue_mask(lr_image, params, mpp=lr_mpp)
    if progress is not None:
        progress("tissue", 1, 1)
    return mask


def _grid_mpp(slide, mpp: float | None) -> float:
    """The level-0 µm/px to build the grid with: the one given, else the slide's own."""
    if mpp is None:
        mpp = slide.require_mpp()
    return check_mpp(mpp, slide_label(slide))


def _check_patch_size(slide, ps0: int, mpp: float, patch_px: int, magnification: float) -> None:
    """SlideError unless a patch is ``PATCH_LEVEL0_RANGE`` level-0 px: says which mpp would do."""
    lo, hi = PATCH_LEVEL0_RANGE
    if lo <= ps0 <= hi:
        return
    um = patch_px * target_mpp(magnification)  # the patch's side in µm
    mpp_lo, mpp_hi = max(MPP_RANGE[0], um / hi), min(MPP_RANGE[1], um / lo)
    raise SlideError(
        f"{slide_label(slide)}: at {mpp:.6g} µm/px a {patch_px} px patch at {magnification:g}x "
        f"({um:g} µm) is {ps0:.6g} level-0 px; it must be {lo} to {hi} px, so the level-0 mpp "
        f"must be {mpp_lo:.3g} to {mpp_hi:.3g} µm/px for this magnification"
    )


def _lr_patch_px(patch_px: int, magnification: float, lr_magnification: float) -> int:
    """Side of an LR patch in px: 256 px at 20x is 16 px at 1.25x; it must be whole."""
    lr_exact = patch_px * lr_magnification / magnification
    lr_px = int(round(lr_exact))
    if lr_px < 1 or abs(lr_px - lr_exact) > 1e-6:
        raise ValueError(
            f"patch_px * lr_magnification / magnification must be a whole number of LR pixels, "
            f"got {patch_px} * {lr_magnification} / {magnification} = {lr_exact:g}"
        )
    return lr_px


def _grid_message(slide, n: int, shape: tuple[int, int], mask: np.ndarray,
                  tissue_threshold: float, ps0: int, mpp: float, n_padded: int = 0) -> str:
    """What a grid of ``n`` tissue patches holds, or why it holds none."""
    rows, cols = shape
    if n == 0:
        return (
            f"{slide_label(slide)}: no tissue found: no patch of the {rows} x {cols} grid is "
            f"{tissue_threshold:.0%} tissue or more (tissue covers {mask.mean():.1%} of the slide)"
        )
    return (
        f"{n} tissue patches of {rows * cols} ({rows} x {cols} grid, "
        f"{ps0} px = {ps0 * mpp:.0f} µm{_padded_words(n_padded)})"
    )


def _padded_words(n_padded: int) -> str:
    return f"; {n_padded} at the slide's edge, padded with background" if n_padded else ""


def read_lr_image(
    slide,
    size_hw: tuple[int, int],
    scale: float,
    level: int | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """The slide from level-0 (0, 0) resampled to ``size_hw`` px, ``scale`` level-0 px per px.

    Area-averages pyramid level ``level`` (default: the smallest level still at least as fine
    as needed) in horizontal bands, so a level without a pyramid above it is never held in
    memory whole. Past the slide's right and bottom edges it is white (background): only the
    level's own pixels are read, whatever a backend would pad with. Returns uint8 (H, W, 3).
    """
    out_h, out_w = (int(v) for v in size_hw)
    check_overview_size(slide, (out_w, out_h), "low-resolution image")
    out = np.empty((out_h, out_w, 3), np.uint8)
    if out_h == 0 or out_w == 0:
        return out
    if level is None:
        level = int(slide.best_level_for_downsample(scale))
    ds = float(slide.level_downsamples[level])
    s = scale / ds  # source px of this level per output px
    src_w = math.ceil(out_w * s - 1e-9)
    if src_w * max(s, 1.0) > MAX_WINDOW_PIXELS:  # even one output row is too much to decode
        raise SlideError(
            f"{slide_label(slide)}: one row of the low-resolution image needs {src_w} x {math.ceil(s)} "
            f"px of level {level}, more than the {MAX_WINDOW_PIXELS // 2**20} MP decoded at once"
        )
    ax = _area_matrix(out_w, s, 0, src_w)
    band_rows = max(1, int(_BAND_PIXELS // max(1, src_w * max(s, 1.0))))
    starts = list(range(0, out_h, band_rows))
    for b, i0 in enumerate(starts):
        check_cancelled(cancel, f"{slide_label(slide)}: reading the low-resolution image")
        if progress is not None:
            progress("lr_image", b, len(starts))
        i1 = min(out_h, i0 + band_rows)
        y0 = math.floor(i0 * s + 1e-9)
        y1 = max(y0 + 1, math.ceil(i1 * s - 1e-9))
        band = _read_band(slide, level, ds, y0, (src_w, y1 - y0))
        out[i0:i1] = _resample(band, _area_matrix(i1 - i0, s, i0 * s - y0, y1 - y0), ax)
    if progress is not None:
        progress("lr_image", len(starts), len(starts))
    return out


def _read_band(slide, level: int, ds: float, y0: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 (h, w, 3) of level ``level`` from level px (0, y0), white past the slide's edge."""
    return read_level_window(slide, level, ds, (0, y0), size)


def read_level_window(slide, level: int, ds: float, origin: tuple[int, int],
                      size: tuple[int, int]) -> np.ndarray:
    """uint8 (h, w, 3) of pyramid level ``level`` (downsample ``ds``) from level px ``origin``:
    the level's own pixels, white (background) past its right and bottom edges, never read there
    (a backend's own padding, e.g. tiffslide's black, never reaches the tissue mask)."""
    (x0, y0), (w, h) = origin, size
    lw, lh = _level_size(slide, level, (x0 + w, y0 + h))
    rw, rh = min(w, lw - x0), min(h, lh - y0)
    # level-0 coordinates that map back to level px (x0, y0) exactly (read_region floors / ds)
    loc = (math.ceil(x0 * ds - 1e-9), math.ceil(y0 * ds - 1e-9))
    if rw == w and rh == h:
        return np.asarray(slide.read_region(loc, level, (w, h)))[..., :3]
    window = np.full((h, w, 3), _BACKGROUND, np.uint8)
    if rw > 0 and rh > 0:
        window[:rh, :rw] = np.asarray(slide.read_region(loc, level, (rw, rh)))[..., :3]
    return window


def read_lr_patch(slide, level: int, ds: float, s: float, xy: tuple[int, int], lr_px: int) -> np.ndarray:
    """uint8 (lr_px, lr_px, 3): the LR patch whose level-0 corner is ``xy``, area-averaged from
    level px [x / ds, x / ds + lr_px * s) per axis (``s`` level px per LR px), as the LR image
    averages it; white past the slide's edges."""
    fx, fy = xy[0] / ds, xy[1] / ds
    x0, y0 = math.floor(fx + 1e-9), math.floor(fy + 1e-9)
    x1 = max(x0 + 1, math.ceil(fx + lr_px * s - 1e-9))
    y1 = max(y0 + 1, math.ceil(fy + lr_px * s - 1e-9))
    window = read_level_window(slide, level, ds, (x0, y0), (x1 - x0, y1 - y0))
    ax = _area_matrix(lr_px, s, fx - x0, x1 - x0)
    ay = _area_matrix(lr_px, s, fy - y0, y1 - y0)
    return _resample(window, ay, ax)


def _level_size(slide, level: int, default: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of pyramid level ``level``; ``default`` for a slide that does not say."""
    dims = getattr(slide, "level_dimensions", None)
    if not dims or level >= len(dims):
        return default
    return int(dims[level][0]), int(dims[level][1])


def patch_size_level0(
    mpp: float, patch_px: int = 256, magnification: float = 20.0, snap: float = 0.05
) -> int:
    """Side in level-0 px of a ``patch_px`` patch at ``magnification`` on a slide at ``mpp``.

    >>> patch_size_level0(0.499), patch_size_level0(0.25), patch_size_level0(0.3)
    (256, 512, 427)
    """
    ratio = target_mpp(magnification) / mpp  # level-0 px per target px
    # Scanners label 20x anywhere from 0.49 to 0.51 µm/px: snap near-whole ratios.
    whole = round(ratio) if ratio >= 1 else 1.0 / max(1, round(1.0 / ratio))
    if whole > 0 and abs(ratio - whole) <= snap * whole:
        ratio = whole
    return max(1, int(round(patch_px * ratio)))


def _area_matrix(n_out: int, s: float, start: float, n_in: int) -> sparse.csr_matrix:
    """Sparse [n_out, n_in] area weights: output i averages input [start + i*s, start + (i+1)*s).

    Rows sum to one (renormalised where the window runs past the input).
    """
    a = start + np.arange(n_out) * s
    b = a + s
    k = int(math.ceil(s)) + 1
    j = np.floor(a + 1e-9).astype(np.int64)[:, None] + np.arange(k)[None, :]
    overlap = np.minimum(b[:, None], j + 1) - np.maximum(a[:, None], j)
    valid = (overlap > 1e-9) & (j >= 0) & (j < n_in)
    weights = np.where(valid, overlap, 0.0)
    sums = weights.sum(axis=1, keepdims=True)
    weights = weights / np.where(sums > 0, sums, 1.0)
    rows = np.broadcast_to(np.arange(n_out)[:, None], j.shape)
    return sparse.csr_matrix(
        (weights[valid].astype(np.float32), (rows[valid], j[valid])), shape=(n_out, n_in)
    )


def _resample(band: np.ndarray, ay: sparse.csr_matrix, ax: sparse.csr_matrix) -> np.ndarray:
    """(h, w, 3) uint8 -> (ay rows, ax rows, 3) uint8 by separable area averaging."""
    h, w, _ = band.shape
    if ay.shape[0] == h and ax.shape[0] == w and _is_identity(ay) and _is_identity(ax):
        return band  # the level is exactly the LR resolution
    t = ay @ band.reshape(h, w * 3).astype(np.float32)  # (h_out, w * 3)
    h_out = t.shape[0]
    t = np.ascontiguousarray(t.reshape(h_out, w, 3).transpose(1, 0, 2)).reshape(w, h_out * 3)
    t = ax @ t  # (w_out, h_out * 3)
    t = t.reshape(ax.shape[0], h_out, 3).transpose(1, 0, 2)
    return np.clip(np.rint(t), 0, 255).astype(np.uint8)


def _is_identity(m: sparse.csr_matrix) -> bool:
    if m.shape[0] != m.shape[1] or m.nnz != m.shape[0]:
        return False
    coo = m.tocoo()
    return bool(np.all(coo.row == coo.col) and np.allclose(coo.data, 1.0))


def _empty_grid(message: str, **common: Any) -> PatchGrid:
    rows, cols = common["shape"]
    p = common["lr_patch_px"]
    return PatchGrid(
        coords=np.zeros((0, 2), np.int64),
        index=np.zeros((0, 2), np.int64),
        tissue_fraction=np.zeros(0, np.float32),
        mask=np.zeros((rows * p, cols * p), bool),
        lr_image=np.full((rows * p, cols * p, 3), 255, np.uint8),
        message=message,
        cell_fraction=np.zeros((rows, cols), np.float32),
        **common,
    )

