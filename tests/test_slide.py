"""hdmil.slide: opening real and written slides, levels, mpp, pixels and bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile

from hdmil.errors import HDMILError, MissingMPPError, SlideError
from hdmil.slide import Slide, open_slide


def _write_pyramid(path: Path, level0: np.ndarray, mpp: float | None, levels: int = 3) -> Path:
    """A tiled pyramidal TIFF, each level a top-level page, as whole-slide writers make them."""
    res = {} if mpp is None else {"resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        for i in range(levels):
            step = 2**i
            img = level0[::step, ::step]
            if mpp is not None:
                res["resolution"] = (1e4 / (mpp * step), 1e4 / (mpp * step))
            tw.write(
                img, tile=(128, 128), photometric="rgb", compression="zlib",
                subfiletype=0 if i == 0 else 1, **res,
            )
    return path


@pytest.fixture(scope="module")
def pyramid_tiff(tmp_path_factory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(700, 900, 3), dtype=np.uint8)
    path = _write_pyramid(tmp_path_factory.mktemp("pyr") / "pyramid.tiff", img, mpp=0.25)
    return path, img


@pytest.fixture(scope="module")
def cmu(cmu_slide):
    with open_slide(cmu_slide) as slide:
        yield slide


# -- the real Aperio slide --------------------------------------------------------------------


def test_cmu_metadata(cmu, cmu_slide):
    assert isinstance(cmu, Slide)
    assert cmu.path == cmu_slide and cmu.name == "CMU-1-Small-Region"
    assert cmu.dimensions == (2220, 2967)
    assert cmu.level_count == 1 and cmu.level_dimensions == ((2220, 2967),)
    assert cmu.level_downsamples == (1.0,)
    assert cmu.mpp == pytest.approx(0.499, abs=1e-4)
    assert cmu.require_mpp() == pytest.approx(0.499, abs=1e-4)
    assert cmu.objective_power == pytest.approx(20)
    assert cmu.vendor == "aperio"
    assert cmu.tile_sizes == ((240, 240),)
    assert isinstance(cmu.properties, dict) and "tiffslide.mpp-x" in cmu.properties


def test_cmu_level_array_is_dask_over_tiles(cmu):
    arr = cmu.level_array(0)
    assert isinstance(arr, da.Array)
    assert arr.shape == (2967, 2220, 3) and arr.dtype == np.uint8
    # chunks are the file's 240 px tiles, partial ones only at the right / bottom edge
    assert set(arr.chunks[0][:-1]) == {240} and set(arr.chunks[1][:-1]) == {240}
    assert arr.chunks[0][-1] == 2967 - 240 * (2967 // 240)
    assert arr.chunks[2] == (3,)
    assert arr.numblocks[:2] == (13, 10)
    assert cmu.level_array(0) is arr  # cached, no new graph per call
    pyr = cmu.pyramid()
    assert len(pyr) == 1 and pyr[0] is arr


def test_cmu_read_region_matches_level_array_and_tiffslide(cmu, cmu_slide):
    import tiffslide

    arr = cmu.level_array(0)
    # a window crossing tile borders, and one at the bottom-right edge (partial tiles)
    stds = []
    for (x, y), (w, h) in [((990, 1310), (300, 260)), ((2000, 2800), (220, 167))]:
        region = cmu.read_region((x, y), 0, (w, h))
        assert region.shape == (h, w, 3) and region.dtype == np.uint8
        np.testing.assert_array_equal(region, arr[y : y + h, x : x + w].compute())
        with tiffslide.TiffSlide(cmu_slide) as ts:
            ref = ts.read_region((x, y), 0, (w, h), as_array=True)
        np.testing.assert_array_equal(region, ref)
        stds.append(region.std())
    assert stds[0] > 10  # the middle window is tissue, not a constant frame


def test_read_region_pads_white_out_of_bounds(cmu):
    w0, h0 = cmu.dimensions
    region = cmu.read_region((w0 - 50, h0 - 40), 0, (100, 100))
    inside = cmu.level_array(0)[h0 - 40 :, w0 - 50 :].compute()
    np.testing.assert_array_equal(region[:40, :50], inside)
    assert (region[40:] == 255).all() and (region[:, 50:] == 255).all()
    outside = cmu.read_region((-500, -500), 0, (64, 32))
    assert outside.shape == (32, 64, 3) and (outside == 255).all()
    left = cmu.read_region((-10, 0), 0, (20, 20))
    assert (left[:, :10] == 255).all()
    np.testing.assert_array_equal(left[:, 10:], cmu.read_region((0, 0), 0, (10, 20)))


def test_cmu_associated_images(cmu):
    assoc = cmu.associated_images
    assert {"label", "macro"} <= set(assoc)
    assert set(cmu.associated_image_names) == set(assoc)
    for name, img in assoc.items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert min(img.shape[:2]) > 50
    assert assoc["macro"].shape[1] > assoc["macro"].shape[0]  # the macro is the whole glass slide


def test_cmu_thumbnail(cmu):
    thumb = cmu.thumbnail(256)
    assert thumb.dtype == np.uint8 and thumb.shape[2] == 3
    assert max(thumb.shape[:2]) == 256
    assert thumb.shape[1] / thumb.shape[0] == pytest.approx(2220 / 2967, rel=0.02)
    full = cmu.level_array(0).compute().astype(np.float64)
    # same picture: the mean colour agrees, and the tissue (darker) half is in the same place
    np.testing.assert_allclose(thumb.reshape(-1, 3).mean(0), full.reshape(-1, 3).mean(0), atol=4)
    top, bottom = thumb[: thumb.shape[0] // 2].mean(), thumb[thumb.shape[0] // 2 :].mean()
    ftop, fbottom = full[: full.shape[0] // 2].mean(), full[full.shape[0] // 2 :].mean()
    assert (top < bottom) == (ftop < fbottom)
    assert cmu.thumbnail((10_000, 10_000)).shape == (2967, 2220, 3)  # never upsampled


def test_mpp_override_wins(cmu_slide):
    with open_slide(cmu_slide, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.require_mpp() == 0.25
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(SlideError, match="CMU-1-Small-Region"):
            open_slide(cmu_slide, mpp=bad)


def test_small_slide_opens(tiny_slide):
    with open_slide(tiny_slide) as slide:
        assert slide.dimensions == (16, 16)
        assert slide.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


# -- written TIFFs --------------------------------------------------------------------------


def test_generic_pyramid_levels(pyramid_tiff):
    path, img = pyramid_tiff
    with open_slide(path) as slide:
        assert slide.dimensions == (900, 700)
        assert slide.level_count == 3
        assert slide.level_dimensions == ((900, 700), (450, 350), (225, 175))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert slide.tile_sizes == ((128, 128),) * 3
        assert slide.mpp == pytest.approx(0.25)
        pyr = slide.pyramid()
        assert [a.shape[:2] for a in pyr] == [(700, 900), (350, 450), (175, 225)]
        assert all(a.chunksize == (128, 128, 3) for a in pyr)
        # zlib is lossless: the pixels are exactly what was written
        np.testing.assert_array_equal(pyr[0].compute(), img)
        np.testing.assert_array_equal(pyr[2].compute(), img[::4, ::4])
        # read_region at level 2 takes a level-0 location
        region = slide.read_region((400, 200), 2, (30, 20))
        np.testing.assert_array_equal(region, img[::4, ::4][50:70, 100:130])
        assert slide.best_level_for_downsample(0.5) == 0
        assert slide.best_level_for_downsample(1.9) == 0
        assert slide.best_level_for_downsample(2.0) == 1
        assert slide.best_level_for_downsample(3.5) == 1
        assert slide.best_level_for_downsample(100) == 2
        thumb = slide.thumbnail(100)
        assert thumb.shape == (78, 100, 3)


def test_tiff_without_mpp(tmp_path):
    img = np.full((300, 400, 3), 200, np.uint8)
    path = tmp_path / "no-mpp.tif"
    tifffile.imwrite(path, img, tile=(128, 128), photometric="rgb")
    with open_slide(path) as slide:
        assert slide.mpp is None
        assert slide.dimensions == (400, 300)
        with pytest.raises(MissingMPPError, match="no-mpp.tif") as err:
            slide.require_mpp()
        assert "--mpp" in str(err.value)
        assert isinstance(err.value, HDMILError)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.require_mpp() == 0.5


def test_screen_dpi_is_not_an_mpp(tmp_path):
    """A TIFF saved by an image editor at 72 dpi has no microscope mpp: missing, not 352 µm."""
    path = tmp_path / "dpi72.tif"
    img = np.zeros((64, 64, 3), np.uint8)
    tifffile.imwrite(path, img, tile=(32, 32), photometric="rgb", resolution=(72, 72),
                     resolutionunit="INCH")
    with open_slide(path) as slide:
        assert slide.mpp is None


def test_closed_slide_raises(pyramid_tiff):
    path, _ = pyramid_tiff
    with open_slide(path) as slide:
        pass
    with pytest.raises(SlideError, match="closed"):
        slide.read_region((0, 0), 0, (10, 10))
    with pytest.raises(IndexError):
        open_slide(path).level_array(3)


# -- bad input ------------------------------------------------------------------------------


def test_bad_inputs_name_the_file(tmp_path, broken_slide):
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    empty = tmp_path / "empty.tiff"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(b"II*\x00" + b"\x00" * 12)
    folder = tmp_path / "folder.svs"
    folder.mkdir()
    txt = tmp_path / "readme.txt"
    txt.write_text("hello")
    cases = {
        broken_slide: "not a TIFF",
        text: "text file",
        empty: "empty",
        truncated: "",
        tmp_path / "missing.svs": "no such file",
        folder: "directory",
        txt: "",
    }
    for path, problem in cases.items():
        with pytest.raises(SlideError) as err:
            open_slide(path)
        msg = str(err.value)
        assert str(path) in msg, msg
        assert problem in msg, msg
        assert "\n" not in msg


def test_openslide_formats_without_openslide(tmp_path, monkeypatch):
    path = tmp_path / "scan.mrxs"
    path.write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    with pytest.raises(SlideError) as err:
        open_slide(path)
    msg = str(err.value)
    assert str(path) in msg and ".mrxs" in msg and "pip install napari-hdmil[openslide]" in msg


def test_openslide_backend_matches_tiffslide(cmu_slide, cmu):
    pytest.importorskip("openslide")
    with open_slide(cmu_slide, backend="openslide") as slide:
        assert slide.backend == "openslide"
        assert slide.dimensions == cmu.dimensions
        assert slide.mpp == pytest.approx(0.499, abs=1e-4)
        arr = slide.level_array(0)
        assert isinstance(arr, da.Array) and arr.shape == (2967, 2220, 3)
        tw, th = arr.chunksize[1], arr.chunksize[0]
        assert tw % 240 == 0 and th % 240 == 0  # whole file tiles per chunk
        window = ((500, 700), (260, 300))
        ours = slide.read_region(*window[:1], 0, window[1])
        np.testing.assert_array_equal(ours, cmu.read_region(window[0], 0, window[1]))
        np.testing.assert_array_equal(ours, arr[700:1000, 500:760].compute())
        edge = slide.read_region((2200, 2950), 0, (40, 40))
        assert (edge[17:] == 255).all() and (edge[:, 20:] == 255).all()
        assert "label" in slide.associated_images
