"""The viewer as a pathologist uses it (issue 15), in a real viewer under Xvfb: a slide without mpp
runs again and again with the mpp the user gave it, every layer is in µm, the gallery follows each
run, several slides keep their own results, heatmaps say what they show, and the widget fits a
419 px dock.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from napari_hdmil import _layers
from napari_hdmil._qt.layer_store import layer_name, slide_key
from napari_hdmil._widget import HDMILWidget
from test_layers import _result, make_checkpoint

pytestmark = pytest.mark.gui

CMU = "CMU-1-Small-Region"
MPP = 0.499  # the CMU slide's own


@pytest.fixture(scope="module")
def tiny(cmu_slide, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("viewer_ckpt") / "tiny.safetensors", cmu_slide)


@pytest.fixture(scope="module")
def nompp_slide(cmu_slide, tmp_path_factory):
    """The CMU slide's pixels in a tiled TIFF without any resolution: a slide without mpp."""
    import tifffile

    from hdmil.slide import open_slide

    with open_slide(cmu_slide) as slide:
        w, h = slide.dimensions
        rgb = np.asarray(slide.read_region((0, 0), 0, (w, h)))[..., :3]
    out = tmp_path_factory.mktemp("nompp") / "nompp.tif"
    tifffile.imwrite(out, rgb, tile=(256, 256), photometric="rgb", compression="zlib")
    return out


@pytest.fixture(scope="module")
def second_slide(cmu_slide, tmp_path_factory):
    """A second slide file (the CMU slide under another name)."""
    out = tmp_path_factory.mktemp("second") / "second.svs"
    shutil.copyfile(cmu_slide, out)
    return out


@pytest.fixture
def viewer_widget(make_napari_viewer, cmu_slide, tiny, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1000, 700)
    viewer.open(str(cmu_slide), plugin="napari-hdmil")
    widget = HDMILWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HDMIL", area="right")
    widget.model_edit.value = tiny
    qtbot.wait(50)  # let napari paint once before the tests change layers
    return viewer, widget


def _run(qtbot, widget, kind="all"):
    worker = widget.run(kind)
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    qtbot.wait(50)


def _ours(viewer, slide=CMU):
    """Our layers of the slide layer named ``slide`` (by their metadata, not their names)."""
    path = slide_key(viewer.layers[slide].metadata["slide_path"])
    return [layer for layer in viewer.layers
            if layer.metadata.get("hdmil_layer") and slide_key(layer.metadata.get("slide_path")) == path]


def _heatmap(viewer, class_name, slide=CMU):
    (layer,) = [la for la in _ours(viewer, slide) if la.metadata["hdmil_layer"] == "heatmap"
                and la.metadata["class"] == class_name]  # fmt: skip
    return layer


def _lipn(viewer, slide=CMU):
    (layer,) = [la for la in _ours(viewer, slide) if la.metadata["hdmil_layer"] == "lipn"]
    return layer


# ---------------------------------------------------------------------------------------------
# 1. an mpp typed by the user belongs to the slide: re-runs, HDMIL†, Classify and another mpp


def test_a_slide_without_mpp_runs_again_with_the_users_mpp(viewer_widget, qtbot, nompp_slide, errors):
    viewer, w = viewer_widget
    viewer.open(str(nompp_slide), plugin="napari-hdmil")
    slide = viewer.layers["nompp"]
    w.slide_box.value = slide
    assert w.mpp_box.enabled
    w.mpp_box.value = MPP
    _run(qtbot, w)
    assert errors() == [] and w.result is not None and w.result.mpp == pytest.approx(MPP)
    np.testing.assert_allclose(slide.scale, (MPP, MPP))  # now in µm like its result
    assert w.result.mpp_source == "user" and w.result.to_report()["mpp_source"] == "user"
    assert f"mpp {MPP:g} µm/px (given by the user)" in w.prediction.counts_label.text()
    assert w.mpp_box.enabled and w.mpp_box.value == pytest.approx(MPP)  # still the user's to change
    first = w.result

    _run(qtbot, w)  # the same again
    assert errors() == [] and w.result is not first and w.result.n_kept == first.n_kept
    assert slide.metadata["mpp_from"] == "user"
    w.lipn_box.value = False  # HDMIL†
    _run(qtbot, w)
    assert errors() == [] and not w.result.use_lipn and w.result.n_read == w.result.n_patches
    w.lipn_box.value = True
    _run(qtbot, w, "prescreen")
    _run(qtbot, w, "classify")
    assert errors() == [] and w.result.n_kept == first.n_kept

    w.mpp_box.value = 0.45  # another mpp: the slide layer follows
    viewer.add_points(np.zeros((1, 2)), name="mine")  # other layers changing keep the typed mpp
    w.slide_box.value = slide
    assert w.mpp_box.value == pytest.approx(0.45)
    _run(qtbot, w)
    assert errors() == [] and w.result.mpp == pytest.approx(0.45)
    np.testing.assert_allclose(slide.scale, (0.45, 0.45))
    heat = _heatmap(viewer, w.result.prediction, "nompp")
    np.testing.assert_allclose(heat.scale, (w.result.patch_size_level0 * 0.45,) * 2)
    # the box follows the chosen slide: the file's mpp (locked), the user's for this slide
    w.slide_box.value = viewer.layers[CMU]
    assert not w.mpp_box.enabled and w.mpp_box.value == pytest.approx(MPP)
    w.slide_box.value = slide
    assert w.mpp_box.enabled and w.mpp_box.value == pytest.approx(0.45)


# ---------------------------------------------------------------------------------------------
# 2. units


def test_every_layer_we_make_is_in_micrometres(viewer_widget, qtbot, nompp_slide, errors):
    import pint

    um = pint.get_application_registry().micrometer
    viewer, w = viewer_widget
    _run(qtbot, w)
    ours = _ours(viewer)
    assert {layer.metadata["hdmil_layer"] for layer in ours} == {"lipn", "heatmap", "topk", "bottomk"}
    for layer in ours:
        assert tuple(layer.units) == (um, um), layer.name
    # a slide without mpp is in µm too once the user gave one
    viewer.open(str(nompp_slide), plugin="napari-hdmil")
    w.slide_box.value = viewer.layers["nompp"]
    w.mpp_box.value = MPP
    _run(qtbot, w, "prescreen")
    assert errors() == []
    assert tuple(viewer.layers["nompp"].units) == (um, um)
    assert viewer.layers.selection.active is viewer.layers["nompp"]  # not the LIPN layer's brush
    assert viewer.layers["nompp"].mode == "pan_zoom"  # after Pre-screen: panning, no paint tool
    assert all(tuple(layer.units) == (um, um) for layer in _ours(viewer, "nompp"))


# ---------------------------------------------------------------------------------------------
# 3. the gallery after a second run


def test_the_gallery_shows_each_runs_patches(viewer_widget, qtbot):
    viewer, w = viewer_widget
    w.sections["top-k gallery"].set_expanded(True)  # closed by default (tests/test_panels_gui.py)
    for k in (3, 4):  # a second run on the same slide, another top-k
        w.k_box.value = k
        _run(qtbot, w)
        r, c = w.result, w.result.prediction_index
        want = _layers.top_k(r, c, k).tolist() + _layers.bottom_k(r, c, k).tolist()
        assert [b.property("patch_row") for b in w.gallery.buttons] == want
        assert all(b.isVisible() for b in w.gallery.buttons)
        assert len(set(want)) == len(want)  # the lowest never repeat the highest
    # a run whose worker could not read the thumbnails: the gallery reads them, not stays empty
    w.show_result(w.result, thumbnails={})
    assert [b.property("patch_row") for b in w.gallery.buttons] == want


# ---------------------------------------------------------------------------------------------
# 4. several slides


def test_several_slides_keep_their_own_results(viewer_widget, qtbot, second_slide, errors):
    viewer, w = viewer_widget
    first = viewer.layers[CMU]
    w.k_box.value = 3
    _run(qtbot, w)
    r1 = w.result
    assert r1.mpp_source == "file" and "(from the file)" in w.prediction.counts_label.text()
    mine = _ours(viewer)
    viewer.open(str(second_slide), plugin="napari-hdmil")
    second = viewer.layers["second"]
    assert w.slide_box.value is second  # the combo follows the newest slide
    assert w.result is None and "no result" in w.prediction_label.text()
    assert second.visible and not first.visible  # one slide at a time
    w.lipn_box.value = False  # another result for the second slide
    _run(qtbot, w)
    r2 = w.result
    assert errors() == [] and r2.slide_path == str(second_slide.resolve()) and not r2.use_lipn
    assert all(layer in viewer.layers for layer in mine)  # the first slide's layers stay
    assert {layer.metadata["slide_path"] for layer in _ours(viewer, "second")} == {r2.slide_path}

    w.slide_box.value = first  # switching back shows the first slide's result
    assert w.result is r1 and CMU in w.prediction_label.text()
    assert w.heatmap.result is r1 and first.visible and not second.visible
    assert viewer.layers[layer_name(f"attention: {r1.prediction}", CMU)].visible
    assert not any(layer.visible for layer in _ours(viewer, "second"))
    rows = _layers.top_k(r1, r1.prediction_index, 3).tolist()
    assert [b.property("patch_row") for b in w.gallery.buttons][:3] == rows
    viewer.layers.selection.active = _ours(viewer, "second")[0]  # selecting follows too
    assert w.slide_box.value is second and w.result is r2


# ---------------------------------------------------------------------------------------------
# 5. heatmaps a pathologist can read


def test_heatmaps_say_what_they_show(viewer_widget, qtbot):
    viewer, w = viewer_widget
    _run(qtbot, w)
    r = w.result
    c = r.prediction_index
    heat = _heatmap(viewer, r.prediction)
    lipn = _lipn(viewer)
    assert heat.visible and heat.colorbar.visible  # a legend
    assert not lipn.visible and lipn.contour == 1  # one overlay at a time; LIPN as outlines
    # hover: the patch's attention, rank and class, not only the scale's value
    best = int(_layers.top_k(r, c, 1)[0])
    where = _layers.patch_centres_um(r, [best])[0]
    status = heat.get_status(where, world=True)["coordinates"]
    n = int(np.isfinite(r.attention[:, c]).sum())
    assert f"{r.prediction}: attention {r.attention[best, c]:.4g}, rank 1 of {n}" in status
    # the lowest step of the scale is transparent, the top opaque
    assert heat.colormap.map(np.array([0.0]))[0, 3] == 0 and heat.colormap.map(np.array([1.0]))[0, 3] == 1
    # scales that mean the same on every slide
    row, col = r.grid_index[best]
    w.norm_box.value = "relative"
    assert heat.data[row, col] == pytest.approx(r.attention[best, c] * n, rel=1e-5)
    assert tuple(heat.contrast_limits) == (0.0, _layers.RELATIVE_MAX)
    w.norm_box.value = "logit"
    assert heat.data[row, col] == pytest.approx(r.scores[best, c], rel=1e-5)
    assert heat.contrast_limits[0] == pytest.approx(np.nanmin(heat.data))
    # the colorbar follows the shown class
    other = r.classes[1 - c]
    w.class_box.value = other
    assert not heat.colorbar.visible and _heatmap(viewer, other).colorbar.visible
    # under HDMIL† there is no LIPN decision to show
    w.lipn_box.value = False
    _run(qtbot, w)
    assert not w.result.use_lipn
    assert {layer.metadata["hdmil_layer"] for layer in _ours(viewer)} == {"heatmap", "topk", "bottomk"}


# ---------------------------------------------------------------------------------------------
# 6. patches that failed to decode


def test_prediction_panel_shows_the_share_that_failed_to_decode(qtbot):
    from napari_hdmil._qt.prediction import PredictionPanel

    panel = PredictionPanel()
    qtbot.addWidget(panel)
    r = _result()
    panel.show_result(r)
    assert "failed" not in panel.counts_label.text()
    r.failed = np.array([1], np.int64)  # one of the 4 kept patches
    panel.show_result(r)
    assert "failed to decode 25.0%" in panel.counts_label.text()
    assert ("1 of the 4 kept patches (25.0%) could not be read from the file (damaged image data) "
            "and were left out") in panel.warnings_label.text()


def test_the_gallery_says_when_a_class_pooled_fewer_patches_than_asked(qtbot):
    from napari_hdmil._qt.gallery import Gallery, fewer_note

    r = _result()  # tumor pooled 3 patches
    assert fewer_note(r, 1, 1) == ""
    note = fewer_note(r, 1, 8)
    assert note.startswith("tumor pooled 3 patches, fewer than twice top-k (8)")
    gallery = Gallery(lambda row: None)
    qtbot.addWidget(gallery)
    thumb = np.zeros((72, 72, 3), np.uint8)
    gallery.set_patches([(3, thumb, 0.5)], [(1, thumb, 0.2)], "tumor", note)
    assert gallery.note_label.text() == note and not gallery.note_label.isHidden()
    gallery.set_patches([(3, thumb, 0.5)], [(1, thumb, 0.2)], "tumor")
    assert gallery.note_label.isHidden()


# ---------------------------------------------------------------------------------------------
# 7. the widget fits its dock


def test_the_widget_fits_a_419_px_dock(viewer_widget, qtbot):
    viewer, w = viewer_widget
    _run(qtbot, w)  # with a result: probability bars, gallery, texts
    qtbot.wait(50)
    from qtpy.QtWidgets import QScrollArea

    scroll = w.findChild(QScrollArea)
    body = scroll.widget()
    assert w.minimumSizeHint().width() <= 419 and w.sizeHint().width() <= 419
    scrollbar = scroll.verticalScrollBar().sizeHint().width()
    assert body.minimumSizeHint().width() + scrollbar <= 419, body.minimumSizeHint()
    w.resize(419, 600)
    qtbot.wait(50)
    assert not scroll.horizontalScrollBar().isVisible()
