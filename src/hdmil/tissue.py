"""Tissue mask of a low-resolution slide image (docs/method.md §1.1, as CLAM does it).

RGB → HSV saturation → median blur → threshold (Otsu, kept within a floor and a ceiling, or a
fixed value) → morphological closing → fill small holes, drop small pieces. Pen ink (green / blue,
bright red and dark red), near-white background and near-black areas are never tissue.

>>> mask = tissue_mask(rgb)                          # bool (H, W)
>>> mask = tissue_mask(lr_image, mpp=8.0)            # areas in µm² once the pixel size is known
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

RED_INK_HUE = 350.0  # degrees; eosin, even a red one, and folds of it stay below (≈ 300–349°)

__all__ = ["TissueParams", "hsv_uint8", "otsu_threshold", "pen_mask", "tissue_mask"]


@dataclass(frozen=True)
class TissueParams:
    """How tissue is told from background. Intensities are on the 0–255 scale.

    Areas are in µm² when the pixel size (``mpp`` of the image given to ``tissue_mask``) is known,
    else the ``*_px`` values are used.
    """

    median_kernel: int = 7  # px, odd; CLAM's mthresh
    saturation_threshold: int | Literal["otsu"] = "otsu"
    # Otsu is clamped to [min_saturation, max_saturation]: on a blank image it would split
    # noise in two (hence the floor); on an all-tissue image it would split pale stroma from
    # nuclei (hence the ceiling).
    min_saturation: int = 20
    max_saturation: int = 50
    closing_kernel: int = 3  # px, side of the square structuring element; 0 or 1 = none
    min_tissue_area_um2: float = 4096.0  # a quarter of a 128 µm patch
    max_hole_area_um2: float = 16384.0  # one 128 µm patch
    min_tissue_px: int = 64  # used when the pixel size is unknown
    max_hole_px: int = 64
    exclude_pen: bool = True
    white_level: int = 215  # min(R, G, B) above this: glass, whatever its saturation
    black_level: int = 40  # max(R, G, B) below this: dark debris, slide edges, not stain

    def __post_init__(self) -> None:
        if self.median_kernel < 0:
            raise ValueError(f"median_kernel must be >= 0, got {self.median_kernel}")
        if self.saturation_threshold != "otsu" and not isinstance(self.saturation_threshold, int):
            raise ValueError(
                "saturation_threshold must be 'otsu' or an int 0..255, "
                f"got {self.saturation_threshold!r}"
            )
        if not 0 <= self.min_saturation <= self.max_saturation <= 255:
            raise ValueError(
                "need 0 <= min_saturation <= max_saturation <= 255, got "
                f"{self.min_saturation}, {self.max_saturation}"
            )


def hsv_uint8(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees (float32, 0–360), saturation and value (uint8, 0–255) of uint8 RGB."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    vmax = np.maximum(np.maximum(r, g), b)
    delta = vmax - np.minimum(np.minimum(r, g), b)
    sat = np.zeros(vmax.shape, np.float32)
    np.divide(delta * np.float32(255.0), vmax, out=sat, where=vmax > 0)
    sat = np.rint(sat).astype(np.uint8)
    # One sector per dominant channel: red 0 ± 60°, green 120 ± 60°, blue 240 ± 60°.
    is_r, is_g = vmax == r, vmax == g
    num = np.where(is_r, g - b, np.where(is_g, b - r, r - g)).astype(np.float32)
    sector = np.where(is_r, 0.0, np.where(is_g, 2.0, 4.0)).astype(np.float32)
    hue = num / np.maximum(delta, 1).astype(np.float32)
    hue += sector
    hue *= 60.0
    hue[hue < 0] += 360.0
    hue[delta == 0] = 0.0
    return hue, sat, vmax.astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising between-class variance of < t vs >= t."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)[:-1]  # weight of class < t for t = 1..255
    m0 = np.cumsum(hist * levels)[:-1]
    w1 = total - w0
    mu_t = (hist * levels).sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * w0 - m0 * total) ** 2 / (w0 * w1)
    between[(w0 == 0) | (w1 == 0)] = -1.0
    if between.max() <= 0:  # a flat image: one value, nothing to split
        return int(values.ravel()[0]) + 1
    # Several equal maxima (a gap in the histogram): take the middle of the gap.
    best = np.flatnonzero(between == between.max())
    return int(round(best.mean())) + 1


def pen_mask(
    rgb: np.ndarray,
    hsv: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    min_core: int = 7,
    min_rim_px: int = 4,
) -> np.ndarray:
    """Ink of marker pens: green / blue, bright red and dark red. bool (H, W).

    H&E lives between blue-violet (haematoxylin, hue ≈ 260–310°) and pink (eosin, ≈ 310–340°).
    Green and blue ink sits far from it (hue 70–250°); red ink sits past eosin (≥ 350° or below
    20°: a red eosin and its folds reach 349°) and is more saturated than eosin; dark-red ink is dark
    like nuclei and as red as nuclei under a weak haematoxylin, but flat where nuclei are grainy.
    Ink fades out at its rim into colours that tissue also has, so a pixel there counts as ink only when connected to an unmistakable core and no farther from it
    than the stroke's width (hysteresis, bounded: on a slide whose eosin is as red as the rim,
    unbounded growth from one stroke would swallow all the tissue it touches).
    """
    hue, sat, val = hsv if hsv is not None else hsv_uint8(rgb)
    green_blue = (hue >= 70) & (hue < 250)
    red_hue = (hue >= RED_INK_HUE) | (hue < 20)
    # Dark-red ink and dense nuclei under a weak haematoxylin share their colour (hue 336–353°);
    # ink is flat, nuclei are grainy: the ink's value varies by < 12 within 5 × 5 px, tumour's by 18+.
    dark_red = ((hue >= 336) | (hue < 20)) & (val < 120) & (sat >= 120)
    if dark_red.any():
        dark_red &= _local_std(val, 5) < 12.0
    core = (green_blue & (sat >= 45)) | (red_hue & (sat >= 140) & (val >= 90)) | dark_red
    if min_core > 1:  # a majority vote: a few odd pixels in tissue are not a pen stroke
        core = _majority(core, _odd(min_core))
    if not core.any():
        return core
    rim = (
        (green_blue & (sat >= 25))
        | (((hue >= 336) | (hue < 20)) & (sat >= 40))  # the rim is bounded, so it may reach into eosin
        | (((hue >= 290) | (hue < 20)) & (val < 140) & (sat >= 40))
    )
    return _grow(core, rim | core, min_rim_px)


def _local_std(values: np.ndarray, k: int) -> np.ndarray:
    """Standard deviation of ``values`` in each k × k window (float32 (H, W))."""
    v = values.astype(np.float32)
    mean = ndi.uniform_filter(v, k, mode="reflect")
    return np.sqrt(np.maximum(ndi.uniform_filter(v * v, k, mode="reflect") - mean * mean, 0.0))


def _grow(seed: np.ndarray, allowed: np.ndarray, min_reach: int, width_factor: float = 2.0) -> np.ndarray:
    """``seed`` grown through ``allowed``, each stroke no farther than its own width allows.

    A pixel of ``allowed`` joins when it is connected to the seed through ``allowed`` and lies within
    ``max(min_reach, width_factor * half-width of its nearest seed stroke)`` px of it: a blurred,
    wide stroke has a wide soft rim, a thin one a thin rim.
    """
    eight = np.ones((3, 3), bool)
    strokes, n = ndi.label(seed, structure=eight)
    half_width = ndi.maximum(ndi.distance_transform_edt(seed), strokes, index=np.arange(1, n + 1))
    reach = np.concatenate([[0.0], np.maximum(min_reach, width_factor * np.asarray(half_width))])
    dist, (iy, ix) = ndi.distance_transform_edt(~seed, return_indices=True)
    near = seed | (allowed & (dist <= reach[strokes[iy, ix]]))
    labels, m = ndi.label(near, structure=eight)
    hit = np.zeros(m + 1, bool)
    hit[labels[seed]] = True
    hit[0] = False
    return hit[labels]


def tissue_mask(
    rgb: np.ndarray, params: TissueParams | None = None, mpp: float | None = None
) -> np.ndarray:
    """Tissue (True) vs background, pen and debris (False) of an RGB image.

    Args:
        rgb: uint8 (H, W, 3) (an alpha channel, if any, is ignored), e.g. the slide at 1.25x.
        params: thresholds and kernel sizes; ``TissueParams()`` by default.
        mpp: µm per pixel of ``rgb`` (not of level 0); with it, area limits are in µm².

    Returns:
        bool (H, W).
    """
    params = params or TissueParams()
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ValueError(f"tissue_mask needs uint8 (H, W, 3) RGB, got {rgb.dtype} {rgb.shape}")
    rgb = rgb[..., :3]
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return np.zeros(rgb.shape[:2], bool)

    hue, sat, val = hsv_uint8(rgb)
    k = _odd(params.median_kernel)
    if params.saturation_threshold == "otsu":
        otsu = otsu_threshold(_median_sample(sat, k))
        thr = min(max(otsu, params.min_saturation), params.max_saturation)
    else:
        thr = int(params.saturation_threshold)
    # Glass is never tissue, whatever its tint; smoothed together with the saturation below.
    fg = sat >= thr
    fg &= np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) <= params.white_level
    # median(sat) >= thr exactly when most of the window is >= thr: a box filter, not a sort.
    fg = _majority(fg, k, mode="reflect")

    # Never tissue, not even inside it: ink and black (filled holes do not bring them back).
    never = val < params.black_level
    if params.exclude_pen:
        pen = pen_mask(rgb, (hue, sat, val), min_core=k)
        if k > 1 and pen.any():  # the last pixels of the ink's soft rim
            pen = ndi.binary_dilation(pen, iterations=max(1, k // 3))
        never |= pen
    if never.any():
        never = _majority(never, k)  # the same smoothing the saturation had
        fg &= ~never

    c = int(params.closing_kernel)
    if c > 1:
        # Pad so the closing does not erode tissue that touches the image border.
        fg = ndi.binary_closing(np.pad(fg, c, mode="edge"), structure=np.ones((c, c), bool))[c:-c, c:-c]

    px_area = mpp * mpp if mpp else None
    max_hole = params.max_hole_area_um2 / px_area if px_area else params.max_hole_px
    min_obj = params.min_tissue_area_um2 / px_area if px_area else params.min_tissue_px
    fg = _fill_small_holes(fg, max_hole)
    fg &= ~never
    return _remove_small_objects(fg, min_obj)


def _odd(k: int) -> int:
    k = int(k)
    return k + 1 if k > 1 and k % 2 == 0 else k


def _majority(mask: np.ndarray, k: int, mode: str = "nearest") -> np.ndarray:
    """The median filter of a bool mask over a k × k window (k odd)."""
    if k <= 1:
        return mask
    return ndi.uniform_filter(mask.astype(np.float32), size=k, mode=mode) > 0.5


def _median_sample(sat: np.ndarray, k: int, max_pixels: int = 250_000) -> np.ndarray:
    """Median-blurred saturation for Otsu's histogram; strided first on large images (a sort
    per pixel is the slow part, and the histogram needs no more than a quarter million samples)."""
    step = max(1, math.ceil(math.sqrt(sat.size / max_pixels)))
    sample = sat[::step, ::step]
    if k <= 1:
        return sample
    if sample.dtype == np.uint8:
        # The same numbers as ndi.median_filter(mode="reflect"), 3-7x faster: skimage's rank
        # median keeps a running 256-bin histogram; the symmetric pad is scipy's "reflect".
        from skimage.filters.rank import median

        r = k // 2
        padded = np.pad(sample, r, mode="symmetric")
        return median(padded, footprint=np.ones((k, k), bool))[r : r + sample.shape[0], r : r + sample.shape[1]]
    return ndi.median_filter(sample, size=k, mode="reflect")


def _remove_small_objects(mask: np.ndarray, min_area: float) -> np.ndarray:
    if min_area <= 1 or not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    if max_area < 1:
        return mask
    holes = ~mask
    # A hole is background not connected to the image border.
    labels, n = ndi.label(holes)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes <= max_area
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]
