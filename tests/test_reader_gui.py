"""The napari reader: ``get_reader`` checks, layer data, the CMU slide rendered in a real viewer.

The viewer tests need a real X server with OpenGL (pytest-xvfb starts Xvfb; Mesa renders).
"""

from __future__ import annotations

import numpy as np
import pytest

from hdmil.errors import HDMILError
from napari_hdmil import _reader
from napari_hdmil._reader import get_reader, read_associated, read_slide


# -- get_reader: cheap checks, None for anything it cannot read, never raises -----------------


def test_get_reader_accepts_slides(cmu_slide, tiny_slide):
    assert get_reader(str(cmu_slide)) is read_slide
    assert get_reader(cmu_slide) is read_slide
    assert get_reader([str(cmu_slide)]) is read_slide
    assert get_reader(str(tiny_slide)) is read_slide


def test_get_reader_rejects_bad_input(tmp_path, broken_slide, cmu_slide):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    txt = tmp_path / "notes.txt"
    txt.write_text("not a slide")
    folder = tmp_path / "folder.svs"
    folder.mkdir()
    for path in (
        broken_slide,
        text,
        txt,
        tmp_path / "missing.svs",
        folder,
        tmp_path,
        [str(cmu_slide), str(cmu_slide)],  # one slide at a time
        [],
        None,
        42,
    ):
        assert get_reader(path) is None, path


def test_read_slide_layer_data(cmu_slide):
    [(data, kwargs, layer_type)] = read_slide(str(cmu_slide))
    assert layer_type == "image"
    assert isinstance(data, list) and len(data) == 1
    assert data[0].shape == (2967, 2220, 3) and data[0].chunksize == (240, 240, 3)
    assert kwargs["multiscale"] is True and kwargs["rgb"] is True
    assert kwargs["name"] == "CMU-1-Small-Region"
    assert kwargs["scale"] == pytest.approx((0.499, 0.499), abs=1e-4)
    meta = kwargs["metadata"]
    assert meta["hdmil_slide"] is True
    assert meta["slide_path"] == str(cmu_slide.resolve())
    assert meta["mpp"] == pytest.approx(0.499, abs=1e-4)
    assert meta["objective_power"] == pytest.approx(20)
    assert meta["vendor"] == "aperio"
    assert meta["level_dimensions"] == [(2220, 2967)]
    assert type(meta["properties"]) is dict and meta["properties"]["tiffslide.vendor"] == "aperio"
    # associated images are not layers unless asked for
    extra = read_associated(str(cmu_slide))
    names = {kw["name"] for _, kw, _ in extra}
    assert {"CMU-1-Small-Region [label]", "CMU-1-Small-Region [macro]"} <= names
    assert all(t == "image" and kw["rgb"] and d.shape[2] == 3 for d, kw, t in extra)


def test_reader_shares_one_open_slide_per_file(cmu_slide):
    _reader.close_cached(cmu_slide)
    get_reader(str(cmu_slide))
    get_reader([str(cmu_slide)])
    read_slide(str(cmu_slide))
    keys = [k for k in _reader._SLIDES if k[0] == str(cmu_slide.resolve())]
    assert len(keys) == 1


def test_reader_without_mpp_uses_pixels(tmp_path):
    import tifffile

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.full((64, 96, 3), 128, np.uint8), tile=(32, 32), photometric="rgb")
    [(data, kwargs, _)] = get_reader(str(path))(str(path))
    assert kwargs["scale"] == (1.0, 1.0)
    assert kwargs["metadata"]["mpp"] is None
    assert "mpp" in kwargs["metadata"]["note"]
    with pytest.raises(HDMILError):
        read_slide([str(path), str(path)])


# -- in a real viewer -------------------------------------------------------------------------


def _tissue_fraction(rgb: np.ndarray) -> float:
    """Share of pixels that look like H&E tissue: pink / purple, neither white nor black."""
    px = rgb[..., :3].astype(np.int16)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    pink = (r - g > 20) & (b - g > 10) & (px.max(-1) > 60) & (px.min(-1) < 215)
    return float(pink.mean())


@pytest.mark.gui
def test_viewer_opens_cmu_and_renders_tissue(make_napari_viewer, qtbot, cmu_slide):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(900, 800)
    layers = viewer.open(str(cmu_slide), plugin="napari-hdmil")
    assert len(layers) == 1 and len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.name == "CMU-1-Small-Region"
    assert layer.multiscale and layer.rgb
    np.testing.assert_allclose(layer.scale, (0.499, 0.499), atol=1e-4)
    assert layer.metadata["hdmil_slide"] is True
    assert layer.metadata["mpp"] == pytest.approx(0.499, abs=1e-4)
    assert layer.data[0].shape == (2967, 2220, 3)
    # the world is in µm: the whole slide spans 2967 px * 0.499 µm
    extent = layer.extent.world
    assert extent[1][0] - extent[0][0] == pytest.approx(2967 * 0.499, rel=0.01)

    viewer.reset_view()
    shot = None
    for _ in range(40):  # up to ~4 s for the tiles to load and the canvas to draw
        qtbot.wait(100)
        shot = viewer.screenshot(canvas_only=True, flash=False)
        if _tissue_fraction(shot) > 0.05:
            break
    assert shot is not None and shot.ndim == 3 and min(shot.shape[:2]) > 100
    rgb = shot[..., :3]
    not_black = (rgb.max(-1) > 30).mean()
    assert not_black > 0.2, f"canvas mostly black ({not_black:.0%} lit)"
    assert rgb.std() > 10, "canvas is a flat frame"
    frac = _tissue_fraction(rgb)
    assert frac > 0.05, f"only {frac:.1%} of the canvas looks like tissue"


@pytest.mark.gui
def test_viewer_open_bad_file_is_an_error_not_a_crash(make_napari_viewer, broken_slide):
    viewer = make_napari_viewer()
    # napari turns a reader that declines into an error it shows as a notification in the GUI
    with pytest.raises(Exception, match="broken.svs"):
        viewer.open(str(broken_slide), plugin="napari-hdmil")
    assert len(viewer.layers) == 0


def test_slide_layer_is_in_micrometres_when_the_file_has_mpp(cmu_slide):
    from napari_hdmil._reader import read_slide

    (_, kwargs, _), = read_slide(str(cmu_slide))
    assert kwargs["units"] == ("µm", "µm") and kwargs["scale"][0] < 1.0


# -- tiles that fail to decode while panning (issue 15 §7) -------------------------------------

BAD_TILE = 14  # CMU's tiles are 240 px, 10 a row: tile 14 is row 1, column 4 (not tile 0, which
# the reader decodes when opening, so the slide opens and fails only while panning)


@pytest.fixture
def bad_tile_slide(cmu_slide, tmp_path):
    """A copy of the CMU slide with one tile's JPEG bytes zeroed."""
    import shutil

    import tifffile

    path = tmp_path / "bad-tile.svs"
    shutil.copy(cmu_slide, path)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert page.tilewidth == 240 and len(page.dataoffsets) == 13 * 10
        off, n = page.dataoffsets[BAD_TILE], page.databytecounts[BAD_TILE]
    with open(path, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\x00" * n)
    yield path
    _reader.close_cached(path)


def _warnings_since(start: int) -> list[str]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [str(n.message) for n in notification_manager.records[start:]
            if n.severity == NotificationSeverity.WARNING]  # fmt: skip


def test_a_tile_that_fails_to_decode_is_white_and_said_once(bad_tile_slide, cmu_slide):
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)
    [(data, _, _)] = read_slide(str(bad_tile_slide))
    assert data[0].chunksize == (240, 240, 3)  # the file's tiles, as the plain pyramid
    shown = np.asarray(data[0])
    again = np.asarray(read_slide(str(bad_tile_slide))[0][0][0][200:300, 900:1000])  # a redraw
    good = np.asarray(_reader.cached_slide(cmu_slide).level_array(0))
    differs = (shown != good).any(-1)
    rows, cols = np.nonzero(differs)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (240, 479, 960, 1199)  # that tile only
    assert (shown[240:480, 960:1200] == 255).all() and (again[40:, 60:] == 255).all()
    assert _reader.tile_failures(_reader.cached_slide(bad_tile_slide)) == 2  # read twice, both blank
    said = _warnings_since(start)
    assert len(said) == 1, said  # one notification per slide, not one per tile or redraw
    assert said[0].startswith(f"{bad_tile_slide.resolve()}: some tiles of level 0 cannot be decoded (codec JPEG")
    assert "drawn blank (white)" in said[0]


@pytest.mark.gui
def test_panning_over_a_broken_tile_draws_and_warns_once(make_napari_viewer, qtbot, bad_tile_slide, errors):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(700, 600)
    start = len(notification_manager.records)
    (layer,) = viewer.open(str(bad_tile_slide), plugin="napari-hdmil")
    for zoom in (0.5, 1.0, 2.0, 0.5):  # redraws at several zooms, the broken tile in view each time
        viewer.scene.camera.center = (360 * 0.499, 1080 * 0.499)
        viewer.scene.camera.zoom = zoom
        qtbot.wait(150)
        shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].std() > 10  # the slide is drawn
    assert errors() == []  # no codec error raised at napari
    said = [m for m in _warnings_since(start) if "cannot be decoded" in m]
    assert len(said) == 1 and str(bad_tile_slide.name) in said[0]
    assert _reader.tile_failures(_reader.cached_slide(bad_tile_slide)) >= 1
    assert layer.metadata["hdmil_slide"] is True
