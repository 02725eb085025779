"""Tile-aligned patch reading: same pixels as read_region, each tile decoded once, bounded,
corrupt tiles skipped, cancellable."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hdmil.errors import Cancelled
from hdmil.reading import PatchReader, _TiledLevel, area_resize, choose_level, iter_patches
from hdmil.slide import open_slide


def _read_all(reader_or_iter) -> tuple[dict[int, np.ndarray], list[tuple[int, str]]]:
    seen: dict[int, np.ndarray] = {}
    failed: list[tuple[int, str]] = []
    for batch in reader_or_iter:
        assert batch.pixels.dtype == np.uint8
        assert len(batch.pixels) == len(batch.indices)
        for i, px in zip(batch.indices, batch.pixels):
            assert int(i) not in seen, "a patch was handed out twice"
            seen[int(i)] = px
        failed.extend(batch.failed)
    return seen, failed


def _tiles_touched(coords: np.ndarray, size: int, tile: tuple[int, int], level_wh: tuple[int, int]) -> set:
    """Independent count of the file tiles the patches overlap (inside the level)."""
    tw, th = tile
    w, h = level_wh
    out = set()
    for x, y in coords:
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
        if x1 <= x0 or y1 <= y0:
            continue
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                out.add((tx, ty))
    return out


@pytest.fixture(scope="module")
def pyramid_tiff(tmp_path_factory) -> Path:
    """A 1536 x 1024 JPEG-tiled (256 px) TIFF with a 2x-down level, like a 40x scan."""
    import tifffile

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:1024, 0:1536]
    base = np.stack([(xx * 0.17) % 255, (yy * 0.23) % 255, ((xx + yy) * 0.11) % 255], -1)
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    half = img.reshape(512, 2, 768, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    path = tmp_path_factory.mktemp("pyr") / "pyramid.tiff"
    kw = dict(tile=(256, 256), compression="jpeg", photometric="rgb")
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER", **kw)
        tw.write(half, subfiletype=1, **kw)
    return path


# ------------------------------------------------------------------------------------------- geometry


def test_choose_level_prefers_coarsest_level_with_enough_pixels():
    assert choose_level((1.0,), 257, 256) == 0
    assert choose_level((1.0, 2.0, 8.0), 512, 256) == 1  # 40x with a 2x-down level
    assert choose_level((1.0, 4.0, 16.0), 512, 256) == 0  # 40x SVS: read level 0, downsample
    assert choose_level((1.0, 4.0), 1024, 256) == 1
    assert choose_level((1.0, 2.0), 256, 256) == 0


def test_area_resize_matches_block_means_and_keeps_constants():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    expect = img.reshape(256, 2, 256, 2, 3).astype(np.float64).mean(axis=(1, 3))
    got = area_resize(img, 256)
    assert got.shape == (256, 256, 3)
    assert np.abs(got.astype(np.float64) - expect).max() <= 0.5 + 1e-6
    # A non-whole ratio against exact area integration, per axis: repeat each input pixel 256
    # times, then every output pixel is the mean of 300 consecutive samples.
    small = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    w = np.repeat(np.eye(300), 256, axis=0).reshape(256, 300, 300).mean(axis=1)  # [256, 300]
    exact = np.einsum("iy,yxc,jx->ijc", w, small.astype(np.float64), w, optimize=True)
    assert np.abs(area_resize(small, 256).astype(np.float64) - exact).max() <= 0.5 + 1e-3
    flat = np.full((257, 257, 3), 173, np.uint8)
    assert (area_resize(flat, 256) == 173).all()
    # 257 -> 256: output pixel 0 covers input pixel 0 and 1/256 of pixel 1
    ramp = np.tile(np.arange(257, dtype=np.float64)[None, :, None], (257, 1, 3)).clip(0, 255)
    ramp = ramp.astype(np.uint8)
    out = area_resize(ramp, 256).astype(np.float64)
    s = 257 / 256
    centres = np.array([np.clip(np.arange(257), 0, 255)[int(i * s) : int(np.ceil((i + 1) * s))].mean() for i in range(256)])
    assert np.abs(out[0] - centres[:, None]).max() <= 1.0


# ------------------------------------------------------------------------------------------- CMU slide


def test_cmu_patches_equal_read_region_and_tiles_decoded_once(cmu_slide, monkeypatch):
    calls: Counter = Counter()
    orig = _TiledLevel.decode

    def counting(self, index):
        calls[index] += 1
        return orig(self, index)

    monkeypatch.setattr(_TiledLevel, "decode", counting)
    rng = np.random.default_rng(1)
    # Random positions (straddling the 240-px tiles), edges and corners hanging over the border.
    coords = np.concatenate(
        [
            np.stack([rng.integers(0, 2220 - 256, 40), rng.integers(0, 2967 - 256, 40)], 1),
            np.array([[-100, -50], [2100, 2900], [2219, 0], [0, 2966], [239, 239], [240, 480]]),
        ]
    )
    with open_slide(cmu_slide) as slide:
        reader = PatchReader(slide, coords, 256, batch_size=8, workers=2)
        seen, failed = _read_all(reader)
        assert reader.tiled and reader.level == 0
        assert not failed and sorted(seen) == list(range(len(coords)))
        for i, (x, y) in enumerate(coords):
            np.testing.assert_array_equal(seen[i], slide.read_region((int(x), int(y)), 0, (256, 256)))
    touched = _tiles_touched(coords, 256, (240, 240), (2220, 2967))
    assert reader.n_read == len(coords)
    assert reader.n_tiles_decoded == len(touched) == len(calls)
    assert set(calls.values()) == {1}, "a tile was decoded more than once"
    assert reader.bytes_decoded == len(touched) * 240 * 240 * 3


def test_cmu_257px_patches_are_area_resized(cmu_slide):
    coords = np.array([[0, 0], [500, 700], [1234, 2001]])
    with open_slide(cmu_slide) as slide:
        seen, _ = _read_all(iter_patches(slide, coords, 257, out_px=256, batch_size=2, workers=1))
        for i, (x, y) in enumerate(coords):
            ref = area_resize(slide.read_region((int(x), int(y)), 0, (257, 257)), 256)
            np.testing.assert_array_equal(seen[i], ref)


def test_read_region_fallback_gives_the_same_pixels(cmu_slide):
    """A slide object without a file path (e.g. another backend) is read with read_region."""

    class NoPath:
        def __init__(self, slide):
            self._s = slide
            self.level_dimensions = slide.level_dimensions
            self.level_downsamples = slide.level_downsamples
            self.name = slide.name

        def read_region(self, loc, level, size):
            return self._s.read_region(loc, level, size)

    coords = np.array([[10, 20], [300, 250], [2000, 2800], [1000, 1000]])
    with open_slide(cmu_slide) as slide:
        fast, _ = _read_all(PatchReader(slide, coords, 256, batch_size=3))
        reader = PatchReader(NoPath(slide), coords, 256, batch_size=3)
        slow, _ = _read_all(reader)
    assert not reader.tiled and reader.n_read == len(coords)
    for i in range(len(coords)):
        np.testing.assert_array_equal(fast[i], slow[i])


# ------------------------------------------------------------------------------------------- pyramid


def test_40x_slide_reads_the_2x_down_level(pyramid_tiff):
    coords = np.array([[0, 0], [512, 256], [1000, 600], [1400, 900]])  # 512 level-0 px = 256 at level 1
    with open_slide(pyramid_tiff) as slide:
        assert slide.level_count == 2
        reader = PatchReader(slide, coords, 512, out_px=256, batch_size=4)
        seen, failed = _read_all(reader)
        assert reader.tiled and reader.level == 1 and not failed
        for i, (x, y) in enumerate(coords):
            np.testing.assert_array_equal(seen[i], slide.read_region((int(x), int(y)), 1, (256, 256)))


def test_memory_stays_a_band_of_tiles(pyramid_tiff):
    """A full grid over level 0: far fewer tiles held at once than the level has."""
    xs, ys = np.meshgrid(np.arange(0, 1536, 128), np.arange(0, 1024, 128))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)  # 96 overlapping patches
    with open_slide(pyramid_tiff) as slide:
        reader = PatchReader(slide, coords, 256, batch_size=8, workers=2)
        seen, _ = _read_all(reader)
    assert len(seen) == len(coords)
    assert reader.n_tiles_decoded == 24  # 6 x 4 tiles, each once
    # two batches in flight span at most ~2 rows of 6 tiles (+ the next row's start)
    assert reader.peak_tiles_cached <= 14 < 24


# ------------------------------------------------------------------------------------------- failures


def _corrupt_copy(src: Path, dst: Path, tile_index: int) -> Path:
    import tifffile

    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        page = tif.pages[0]
        off, n = page.dataoffsets[tile_index], page.databytecounts[tile_index]
    with open(dst, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\x00" * n)
    return dst


def test_corrupt_tile_is_reported_and_skipped(pyramid_tiff, tmp_path):
    bad = _corrupt_copy(pyramid_tiff, tmp_path / "bad.tiff", tile_index=7)  # tile (1, 1): x 256.., y 256..
    coords = np.array([[0, 0], [300, 300], [400, 200], [1000, 700], [256, 512]])
    with open_slide(bad) as slide:
        reader = PatchReader(slide, coords, 256, batch_size=2, workers=2)
        seen, failed = _read_all(reader)
        good = {0, 3, 4}
        assert set(seen) == good
        assert sorted(i for i, _ in failed) == [1, 2]
        assert all("tile (1, 1)" in msg and str(bad) in msg for _, msg in failed)
        assert reader.n_read == 3 and reader.n_failed == 2
        for i in good:
            x, y = coords[i]
            np.testing.assert_array_equal(seen[i], slide.read_region((int(x), int(y)), 0, (256, 256)))


def test_cancel_stops_within_one_batch(pyramid_tiff):
    xs, ys = np.meshgrid(np.arange(0, 1280, 64), np.arange(0, 768, 64))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)  # 240 patches, 60 batches of 4
    cancel = threading.Event()
    got = 0
    with open_slide(pyramid_tiff) as slide:
        reader = PatchReader(slide, coords, 256, batch_size=4, prefetch=1, workers=1)
        with pytest.raises(Cancelled, match=r"\.tiff?: reading patches cancelled"):
            for batch in reader.batches(cancel=cancel):
                got += 1
                cancel.set()
    assert got == 1
    assert reader.n_read < len(coords) // 2  # the background thread stopped too


def test_progress_counts_every_patch(cmu_slide):
    coords = np.array([[x, y] for x in range(0, 2000, 400) for y in range(0, 2600, 400)])
    calls = []
    with open_slide(cmu_slide) as slide:
        seen, _ = _read_all(
            iter_patches(slide, coords, 256, batch_size=7, progress=lambda s, d, t: calls.append((s, d, t)))
        )
    assert len(seen) == len(coords)
    assert calls[-1] == ("crop", len(coords), len(coords))
    assert [d for _, d, _ in calls] == sorted(d for _, d, _ in calls)


def test_empty_coords_yield_nothing(cmu_slide):
    with open_slide(cmu_slide) as slide:
        assert list(iter_patches(slide, np.zeros((0, 2), np.int64), 256)) == []


# ------------------------------------------------------------------------------------------- synthetic


def test_synthetic_slide_grid_matches_read_region(synthetic_slide):
    xs, ys = np.meshgrid(np.arange(0, 4096, 256 + 37), np.arange(0, 3072, 256 + 53))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    with open_slide(synthetic_slide) as slide:
        reader = PatchReader(slide, coords, 256, batch_size=16, workers=2)
        seen, failed = _read_all(reader)
        assert reader.tiled and not failed and len(seen) == len(coords)
        tw, th = slide.tile_sizes[0]
        assert reader.n_tiles_decoded == len(_tiles_touched(coords, 256, (tw, th), slide.dimensions))
        for i in range(0, len(coords), 5):
            x, y = coords[i]
            np.testing.assert_array_equal(seen[i], slide.read_region((int(x), int(y)), 0, (256, 256)))


# ------------------------------------------------------------------------------------------- edge patches


def test_padded_edge_patches_read_as_white_background(tmp_path):
    """The grid's partial last row and column: what lies on the slide is the slide's pixels, the
    rest white, though the file's edge tiles hold the writer's padding (zeros) there; only the
    tiles on the slide are decoded."""
    import tifffile

    rng = np.random.default_rng(8)
    img = rng.integers(0, 200, (612, 1174, 3), dtype=np.uint8)  # never white
    path = tmp_path / "edge.tiff"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    coords = np.array([[1024, 0], [1024, 512], [512, 512], [0, 0]])  # right, corner, bottom, inside
    with open_slide(path) as slide:
        reader = PatchReader(slide, coords, 256, batch_size=2, workers=2)
        fast, failed = _read_all(reader)

        class NoPath:  # another backend: read_region per patch
            level_dimensions, level_downsamples, name = slide.level_dimensions, slide.level_downsamples, "np"
            read_region = staticmethod(slide.read_region)

        slow, _ = _read_all(PatchReader(NoPath(), coords, 256, batch_size=2))
    assert reader.tiled and not failed
    assert reader.n_tiles_decoded == len(_tiles_touched(coords, 256, (256, 256), (1174, 612)))
    for i, (x, y) in enumerate(coords):
        want = np.full((256, 256, 3), 255, np.uint8)
        part = img[y : y + 256, x : x + 256]
        want[: part.shape[0], : part.shape[1]] = part
        np.testing.assert_array_equal(fast[i], want)
        np.testing.assert_array_equal(slow[i], want)
