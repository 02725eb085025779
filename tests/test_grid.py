"""Patch grid: geometry on the real CMU slide, edge cases, the banded LR reader on fake pyramids."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

import hdmil.grid as grid_mod
from hdmil.errors import Cancelled, MissingMPPError, SlideError
from hdmil.grid import PatchGrid, build_grid, patch_size_level0, read_lr_image
from hdmil.slide import open_slide


class FakeSlide:
    """The Slide contract over in-memory levels, or over a pixel function for huge levels.

    Records every ``read_region`` call as (level, w, h).
    """

    def __init__(self, levels, mpp=0.5, downsamples=None, name="fake"):
        self.levels = levels  # list of arrays (H, W, 3), or of (w, h) with pixel_fn
        self.level_dimensions = tuple(
            (lv.shape[1], lv.shape[0]) if isinstance(lv, np.ndarray) else tuple(lv) for lv in levels
        )
        self.dimensions = self.level_dimensions[0]
        self.level_downsamples = tuple(
            downsamples or [self.dimensions[0] / w for w, _ in self.level_dimensions]
        )
        self.mpp = mpp
        self.name = name
        self.path = f"/fake/{name}.svs"
        self.reads: list[tuple[int, int, int]] = []

    def require_mpp(self):
        if self.mpp is None:
            raise MissingMPPError(f"{self.path}: no mpp")
        return self.mpp

    def best_level_for_downsample(self, ds):
        return max(i for i, d in enumerate(self.level_downsamples) if d <= ds * (1 + 1e-6))

    def read_region(self, location, level, size):
        w, h = size
        self.reads.append((level, w, h))
        ds = self.level_downsamples[level]
        x, y = math.floor(location[0] / ds), math.floor(location[1] / ds)
        lv = self.levels[level]
        out = np.full((h, w, 3), 255, np.uint8)
        if isinstance(lv, np.ndarray):
            part = lv[y : y + h, x : x + w]
            out[: part.shape[0], : part.shape[1]] = part
        else:  # a huge level: pink tissue on the left half, glass on the right
            lw, lh = lv
            xs = np.arange(x, x + w)
            ys = np.arange(y, y + h)
            inside = (xs[None, :] < lw // 2) & (ys[:, None] < lh)
            out[inside] = (200, 110, 170)
        return out


def _tissue_image(h, w, seed=0):
    """Pink tissue with texture on the left 60 %, glass elsewhere."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 240, np.uint8)
    tissue = rng.normal((200, 120, 180), 15, (h, int(w * 0.6), 3))
    img[:, : int(w * 0.6)] = np.clip(tissue, 0, 255).astype(np.uint8)
    return img


# ---------------------------------------------------------------------------------------------
# the real CMU slide (2220 x 2967 px at 0.499 µm/px)


@pytest.fixture(scope="module")
def cmu_grid(cmu_slide):
    with open_slide(cmu_slide) as slide:
        yield build_grid(slide), slide.dimensions


def test_cmu_grid_geometry(cmu_grid):
    grid, (w, h) = cmu_grid
    assert grid.patch_size_level0 == 256
    # The partial last row (2967 = 11 * 256 + 151) and column (2220 = 8 * 256 + 172) count.
    assert grid.shape == (math.ceil(h / 256), math.ceil(w / 256)) == (12, 9)
    assert grid.lr_image.shape == (grid.shape[0] * 16, grid.shape[1] * 16, 3)
    assert grid.mask.shape == grid.lr_image.shape[:2]
    assert grid.lr_patch_px == 16 and grid.origin == (0, 0)
    assert grid.patch_size_um == pytest.approx(256 * 0.499)
    assert grid.coords.dtype == np.int64 and grid.index.dtype == np.int64
    assert (grid.coords % 256 == 0).all()
    assert (grid.coords >= 0).all()
    assert (grid.coords[:, 0] < w).all() and (grid.coords[:, 1] < h).all()  # corners on the slide
    over = (grid.coords[:, 0] + 256 > w) | (grid.coords[:, 1] + 256 > h)
    np.testing.assert_array_equal(grid.padded, over)
    assert grid.n_padded == over.sum() > 0  # the tissue reaches the bottom edge
    assert ((grid.index[:, 0] == 11) | (grid.index[:, 1] == 8))[over].all()
    assert f"{grid.n_padded} at the slide's edge" in grid.message
    np.testing.assert_array_equal(grid.coords, grid.index[:, ::-1] * 256)
    assert len(np.unique(grid.index, axis=0)) == grid.n  # no patch twice


def test_cmu_grid_tissue(cmu_grid):
    grid, _ = cmu_grid
    rows, cols = grid.shape
    # CMU-1-Small-Region is about a third tissue, in one piece down the middle.
    assert 0.2 < grid.mask.mean() < 0.5
    assert 0.2 * rows * cols < grid.n < 0.7 * rows * cols
    assert (grid.tissue_fraction >= 0.25).all() and (grid.tissue_fraction <= 1).all()
    # The tissue fraction is the mask's mean over each patch's 16 x 16 cell.
    for (r, c), f in zip(grid.index[:5], grid.tissue_fraction[:5]):
        assert grid.mask[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].mean() == pytest.approx(f)
    assert str(grid.n) in grid.message


def test_cmu_lr_image_is_level0_area_mean(cmu_grid, cmu_slide):
    grid, _ = cmu_grid
    rows, cols = grid.shape
    with open_slide(cmu_slide) as slide:
        full = slide.read_region((0, 0), 0, (cols * 256, rows * 256)).astype(np.float64)
    expected = full.reshape(rows * 16, 16, cols * 16, 16, 3).mean(axis=(1, 3))
    assert np.abs(grid.lr_image - expected).max() <= 0.5 + 1e-6


def test_cmu_lr_patches(cmu_grid):
    grid, _ = cmu_grid
    lr = grid.lr_patches()
    assert lr.shape == (grid.n, 16, 16, 3) and lr.dtype == np.uint8
    r, c = grid.index[-1]
    np.testing.assert_array_equal(lr[-1], grid.lr_image[r * 16 : r * 16 + 16, c * 16 : c * 16 + 16])


def test_to_raster_places_values(cmu_grid):
    grid, _ = cmu_grid
    values = np.arange(grid.n, dtype=np.float32)
    raster = grid.to_raster(values)
    assert raster.shape == grid.shape and raster.dtype == np.float32
    for i in (0, grid.n // 2, grid.n - 1):
        r, c = grid.index[i]
        assert raster[r, c] == values[i]
    assert np.isnan(raster).sum() == grid.shape[0] * grid.shape[1] - grid.n
    multi = grid.to_raster(np.stack([values, -values], 1), fill=0)
    assert multi.shape == grid.shape + (2,)
    r, c = grid.index[3]
    assert tuple(multi[r, c]) == (3, -3)
    ints = grid.to_raster(np.ones(grid.n, np.int64))  # ints with a NaN fill become float
    assert np.issubdtype(ints.dtype, np.floating) and np.nansum(ints) == grid.n
    with pytest.raises(ValueError, match="values"):
        grid.to_raster(np.ones(grid.n + 1))


def test_mpp_override_changes_patch_size(cmu_slide):
    with open_slide(cmu_slide) as slide:
        g40 = build_grid(slide, mpp=0.25)
        assert g40.patch_size_level0 == 512 and g40.mpp == 0.25
        assert g40.shape == (math.ceil(2967 / 512), math.ceil(2220 / 512))
        assert (g40.coords % 512 == 0).all()
        g10 = build_grid(slide, mpp=1.0)
        assert g10.patch_size_level0 == 128 and g10.shape == (math.ceil(2967 / 128), math.ceil(2220 / 128))
        with pytest.raises(SlideError, match="mpp"):
            build_grid(slide, mpp=-1)


def test_patch_size_level0():
    assert patch_size_level0(0.499) == 256  # a 20x scan
    assert patch_size_level0(0.2527) == 512  # a 40x scan
    assert patch_size_level0(0.499, snap=0) == 257  # exact physical size
    assert patch_size_level0(0.3) == round(256 * 0.5 / 0.3)  # no whole ratio: physical size
    assert patch_size_level0(0.5, patch_px=224, magnification=10) == 448


def test_threshold_selects_subset(cmu_slide):
    with open_slide(cmu_slide) as slide:
        loose = build_grid(slide, tissue_threshold=0.05)
        strict = build_grid(slide, tissue_threshold=0.9)
    assert strict.n < loose.n
    assert {tuple(i) for i in strict.index} <= {tuple(i) for i in loose.index}
    assert (strict.tissue_fraction >= 0.9).all()


# ---------------------------------------------------------------------------------------------
# edge cases


def test_tiny_slide_gives_empty_grid(tiny_slide):
    with open_slide(tiny_slide) as slide:
        grid = build_grid(slide, mpp=slide.mpp or 0.5)
    assert grid.n == 0 and len(grid) == 0
    assert grid.shape[0] == 0 or grid.shape[1] == 0
    assert "smaller than one patch" in grid.message
    assert grid.coords.shape == (0, 2) and grid.lr_patches().shape == (0, 16, 16, 3)
    assert grid.to_raster(np.zeros(0)).size == 0


def test_white_slide_gives_empty_grid(tmp_path):
    import tifffile

    path = tmp_path / "white.tiff"
    tifffile.imwrite(path, np.full((1024, 1536, 3), 250, np.uint8), tile=(256, 256), photometric="rgb")
    with open_slide(path) as slide:
        with pytest.raises(MissingMPPError, match="white.tiff"):
            build_grid(slide)  # the file has no mpp and none was given
        grid = build_grid(slide, mpp=0.5)
    assert grid.shape == (4, 6) and grid.n == 0
    assert "no tissue" in grid.message
    assert grid.lr_patches().shape == (0, 16, 16, 3)


def test_tissue_half_of_fake_slide():
    img = _tissue_image(1024, 2048)  # 4 x 8 patches at 0.5 µm/px, left 60 % tissue
    grid = build_grid(FakeSlide([img]))
    assert grid.shape == (4, 8)
    cols = set(grid.index[:, 1].tolist())
    assert {0, 1, 2, 3} <= cols and not cols & {5, 6, 7}
    # Column 4 is 80 % tissue (60 % of 2048 px = 1228.8 px = 4.8 patches).
    assert 4 in cols
    assert grid.n == 4 * len(cols)


def test_reads_smallest_sufficient_pyramid_level():
    """A 50k x 50k slide with a 1/16 level: only that level is read, never level 0."""
    dims = [(50_000, 50_000), (12_500, 12_500), (3125, 3125)]
    slide = FakeSlide(dims, mpp=0.5, downsamples=[1.0, 4.0, 16.0])
    grid = build_grid(slide)
    assert grid.level == 2
    assert {lv for lv, _, _ in slide.reads} == {2}
    # 50000 px = 195 patches of 256 px and 80 px: 196 with the padded last one.
    assert grid.shape == (196, 196) and grid.lr_image.shape == (3136, 3136, 3)
    # The left half (x < 25000) is tissue: a patch's tissue share is the share of its columns
    # left of that line times the share of its rows on the slide (the padded last row holds
    # 80 / 256 = 31 %, so the corner patch with 168 / 256 of its columns in tissue falls below).
    c = np.arange(196)
    col_share = np.clip(25_000 - c * 256, 0, 256) / 256
    row_share = np.clip(50_000 - c * 256, 0, 256) / 256
    expected = np.argwhere(np.outer(row_share, col_share) >= 0.25)
    assert {tuple(i) for i in grid.index.tolist()} == {tuple(i) for i in expected.tolist()}
    assert 195 in grid.index[:, 0] and grid.n_padded == (grid.index[:, 0] == 195).sum()
    # only the level's own pixels are asked for, never past its 3125 px
    assert max(h for _, _, h in slide.reads) <= 3125 and max(w for _, w, _ in slide.reads) <= 3125


def test_level0_is_streamed_in_bands(monkeypatch):
    """Without a pyramid, level 0 is read in bounded bands and area-averaged exactly."""
    img = _tissue_image(1024, 1536, seed=3)
    slide = FakeSlide([img])
    monkeypatch.setattr(grid_mod, "_BAND_PIXELS", 1536 * 100)
    lr = read_lr_image(slide, (64, 96), 16.0)
    assert len(slide.reads) > 5
    assert max(w * h for _, w, h in slide.reads) <= 1536 * 100
    expected = img.astype(np.float64).reshape(64, 16, 96, 16, 3).mean(axis=(1, 3))
    assert np.abs(lr - expected).max() <= 0.5 + 1e-6


def test_fractional_downsample_keeps_colour_and_mean(monkeypatch):
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    img[:, :300] = (10, 200, 90)
    slide = FakeSlide([img])
    monkeypatch.setattr(grid_mod, "_BAND_PIXELS", 900 * 50)
    lr = read_lr_image(slide, (70, 90), 9.7)  # 679 x 873 source px, 9.7 per output px
    assert lr.shape == (70, 90, 3)
    # A flat area stays exactly its colour; the rest keeps its mean.
    assert (lr[:, :30] == (10, 200, 90)).all()
    src = img[:679, :873].astype(np.float64)
    assert lr.mean(axis=(0, 1)) == pytest.approx(src.mean(axis=(0, 1)), abs=0.5)


def test_progress_and_cancel():
    img = _tissue_image(512, 512)
    calls = []
    build_grid(FakeSlide([img]), progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert ("lr_image", 1, 1) in calls and ("tissue", 1, 1) in calls
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled, match=r"fake\.svs: reading the low-resolution image cancelled"):
        build_grid(FakeSlide([img]), cancel=stop)


def test_bad_arguments():
    slide = FakeSlide([_tissue_image(512, 512)])
    with pytest.raises(ValueError, match="whole number"):
        build_grid(slide, patch_px=100)  # 100 * 1.25 / 20 = 6.25 LR px
    with pytest.raises(ValueError, match="tissue_threshold"):
        build_grid(slide, tissue_threshold=1.5)
    with pytest.raises(MissingMPPError):
        build_grid(FakeSlide([_tissue_image(512, 512)], mpp=None))


def test_patch_grid_repr_and_lr_mpp(cmu_grid):
    grid, _ = cmu_grid
    assert isinstance(grid, PatchGrid)
    assert grid.lr_mpp == pytest.approx(0.499 * 16)
    assert "CMU-1-Small-Region" in repr(grid)


def test_from_coords_round_trip(cmu_grid):
    grid, dims = cmu_grid
    back = PatchGrid.from_coords(grid.coords, grid.patch_size_level0, dims, grid.mpp)
    np.testing.assert_array_equal(back.index, grid.index)
    assert back.shape == grid.shape and back.n == grid.n
    values = np.arange(grid.n, dtype=np.float64)
    np.testing.assert_array_equal(back.to_raster(values), grid.to_raster(values))
    with pytest.raises(ValueError, match="not on a grid"):
        PatchGrid.from_coords(grid.coords + 3, grid.patch_size_level0, dims, grid.mpp)
    with pytest.raises(ValueError, match="outside"):
        PatchGrid.from_coords([[math.ceil(dims[0] / 256) * 256, 0]], 256, dims, grid.mpp)
    # the padded last column is on the grid
    edge = PatchGrid.from_coords([[(dims[0] // 256) * 256, 0]], 256, dims, grid.mpp)
    assert edge.index.tolist() == [[0, dims[0] // 256]] and edge.n_padded == 1


# ---------------------------------------------------------------------------------------------
# edge patches: the partial last row and column, padded with background


class BlackPadSlide(FakeSlide):
    """A backend that pads past the level with black (tiffslide pads with 0): the LR image must
    not take its padding for slide pixels."""

    def read_region(self, location, level, size):
        out = super().read_region(location, level, size)
        ds = self.level_downsamples[level]
        x, y = math.floor(location[0] / ds), math.floor(location[1] / ds)
        lw, lh = self.level_dimensions[level]
        out[max(0, lh - y):] = 0
        out[:, max(0, lw - x):] = 0
        return out


def _edge_column_slide(cls=FakeSlide, width=1024 + 150, height=1024):
    """Glass, with tissue only in the partial last column (x >= 1024, 150 px of a 256 px patch)."""
    img = np.full((height, width, 3), 240, np.uint8)
    rng = np.random.default_rng(4)
    img[:, 1024:] = np.clip(rng.normal((200, 120, 180), 15, (height, width - 1024, 3)), 0, 255)
    return cls([img])


def test_tissue_only_in_the_partial_last_column_is_analysed():
    slide = _edge_column_slide()
    grid = build_grid(slide)
    assert grid.shape == (4, 5)  # 1174 px = 4 whole patches and 150 px
    # 150 / 256 = 59 % of each last-column patch is tissue, the padding counts as background
    assert grid.index.tolist() == [[r, 4] for r in range(4)]
    assert grid.padded.all() and grid.n_padded == 4
    np.testing.assert_allclose(grid.tissue_fraction, 150 / 256, atol=1 / 16)
    assert "4 at the slide's edge, padded with background" in grid.message
    np.testing.assert_array_equal(grid.coords, [[1024, r * 256] for r in range(4)])  # on the slide


@pytest.mark.parametrize("cls", [FakeSlide, BlackPadSlide])
def test_padded_area_reads_as_background(cls):
    slide = _edge_column_slide(cls, width=1024 + 150, height=512 + 160)
    grid = build_grid(slide)
    assert grid.shape == (3, 5)
    # LR px from ceil(1174 / 16) = 74 and 672 / 16 = 42 on lie wholly past the edge
    assert (grid.lr_image[:, 74:] == 255).all() and (grid.lr_image[42:] == 255).all()
    assert not grid.mask[:, 74:].any() and not grid.mask[42:].any()
    assert grid.mask[:42, 1024 // 16 + 1 : 1174 // 16].all()  # the tissue beside it is
    # nothing past the level was asked for: the padding is made, not read
    assert all(w <= 1174 and h <= 672 for _, w, h in slide.reads)
    # the corner patch is 150 / 256 x 160 / 256 = 37 % tissue: padded both ways, still analysed
    assert grid.index.tolist() == [[0, 4], [1, 4], [2, 4]] and grid.n_padded == 3


def test_lr_image_past_the_edge_matches_white_padding():
    """The area mean over a padded cell is the mean of the slide's pixels and white."""
    img = _tissue_image(300, 500, seed=2)
    lr = read_lr_image(BlackPadSlide([img]), (32, 48), 16.0)  # 512 x 768 level-0 px
    padded = np.full((512, 768, 3), 255, np.uint8)
    padded[:300, :500] = img
    expected = padded.astype(np.float64).reshape(32, 16, 48, 16, 3).mean(axis=(1, 3))
    assert np.abs(lr - expected).max() <= 0.5 + 1e-6


def test_grid_records_the_mrxs_bounds_offset():
    slide = _edge_column_slide()
    assert build_grid(slide).bounds_offset == (0, 0)
    slide.properties = {"openslide.bounds-x": "3072", "openslide.bounds-y": "512"}
    assert build_grid(slide).bounds_offset == (3072, 512)


def test_grid_shape_and_padded_mask():
    from hdmil.grid import grid_shape, padded_mask

    assert grid_shape((2220, 2967), 256) == (math.ceil(2967 / 256), math.ceil(2220 / 256))
    assert grid_shape((1024, 512), 256) == (2, 4)  # whole patches: nothing padded
    coords = np.array([[0, 0], [768, 256], [1024, 0], [0, 512]])
    assert padded_mask(coords, 256, (1100, 700)).tolist() == [False, False, True, True]
    assert padded_mask(coords, 256, (0, 0)).tolist() == [False] * 4  # size unknown
