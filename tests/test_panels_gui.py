"""The widget in a 914 px tall panel (issue 15 §4, §6): collapsible sections, the run buttons
always in view, the model's card beside the prediction, warnings in a pathologist's words."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtWidgets import QScrollArea

from hdmil.model_card import DEMO_SHORT, DEMO_WARNING
from napari_hdmil._qt.prediction import PredictionPanel
from napari_hdmil._widget import HDMILWidget
from test_layers import _result, make_checkpoint
from test_viewer_gui import nompp_slide  # noqa: F401 - a fixture: the CMU pixels without mpp

pytestmark = pytest.mark.gui

PANEL_HEIGHT = 914  # the dock panel's height in a 1600 x 1000 napari window
# What is open by default: the head (inputs and run buttons, not collapsible), progress and the
# prediction with the model card. Closed: heatmap controls (the heatmap is drawn anyway), gallery,
# export, similar slides, and the prediction's details (LIPN legend, stage seconds).
OPEN = {"progress": True, "prediction": True, "heatmap": False, "top-k gallery": False, "export": False,
        "similar slides (SLPD)": False}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(cmu_slide, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("panels_ckpt") / "tiny.safetensors", cmu_slide)


@pytest.fixture
def viewer_widget(make_napari_viewer, cmu_slide, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1000, 700)
    viewer.open(str(cmu_slide), plugin="napari-hdmil")
    widget = HDMILWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HDMIL", area="right")
    qtbot.wait(50)  # let napari paint once before the tests change things
    return viewer, widget


def _run(qtbot, widget, kind="all"):
    assert widget.run(kind) is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    qtbot.wait(50)


def test_the_widget_fits_a_914_px_panel_with_its_sections(viewer_widget, qtbot):
    viewer, w = viewer_widget
    _run(qtbot, w)  # the bundled model (its card is the longest) with a result: bars, counts
    assert {t: s.expanded for t, s in w.sections.items()} == OPEN
    assert not w.prediction.details_section.expanded
    assert w.sizeHint().height() <= PANEL_HEIGHT, w.sizeHint()
    assert w.prediction.isVisible() and w.prediction.model_label.isVisible() and not w.heatmap.isVisible()
    scroll = w.findChild(QScrollArea)
    # the run buttons are above the scrolling column: they stay in view however it scrolls
    for b in (w.run_all_button, w.prescreen_button, w.cancel_button):
        assert b.isVisible() and not scroll.isAncestorOf(b)
    assert scroll.isAncestorOf(w.prediction)

    closed = w.sizeHint().height()
    gallery = w.sections["top-k gallery"]
    gallery.header.click()  # the user opens a section: it shows and the column grows
    qtbot.wait(20)
    assert gallery.expanded and w.gallery_panel.isVisible() and w.sizeHint().height() > closed
    assert all(b.isVisible() for b in w.gallery.buttons)
    for section in w.sections.values():
        section.set_expanded(True)
    qtbot.wait(50)
    # all open: taller than the panel, so the column scrolls below the head
    assert w.sizeHint().height() > PANEL_HEIGHT and w.run_all_button.isVisible()
    gallery.header.click()
    assert not gallery.expanded and not w.gallery_panel.isVisible()


def test_the_model_card_is_beside_the_prediction(viewer_widget, qtbot, tiny, tmp_path):
    viewer, w = viewer_widget
    card = w.prediction.model_label
    # the bundled demo model (the default): it says what it is, first, in plain words
    assert w.prediction.card.demo and DEMO_SHORT in card.text() and card.isVisible()
    assert card.toolTip().startswith(DEMO_WARNING)  # the whole warning on hover
    assert "hdmil-demo.safetensors" in card.text() and "classes: normal, tumor" in card.text()
    assert "trained on 96 synthetic slides" in card.text()
    w.model_edit.value = tiny  # another model: its own card, no demo warning
    assert w.prediction.card.name == "tiny.safetensors" and DEMO_SHORT not in card.text()
    assert "Demo" not in card.toolTip()
    assert "gui_tiny_encoder" in card.text()
    _run(qtbot, w)
    assert card.isVisible() and "tiny.safetensors" in card.text()  # still there with a result
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    w.model_edit.value = bad
    assert w.prediction.card is None and "cannot be read" in card.text() and "broken.safetensors" in card.text()


def test_the_cli_prints_the_card_the_panel_shows(viewer_widget, tiny, capsys):
    from hdmil.cli import main

    _, w = viewer_widget
    for model in (None, tiny):  # the bundled demo model (the default), then a trained one
        if model is not None:
            w.model_edit.value = model
        assert main(["model-card"] + ([str(model)] if model is not None else [])) == 0
        printed = capsys.readouterr().out.splitlines()
        assert printed == w.prediction.model_label.toolTip().splitlines() == w.prediction.card.lines()
        assert w.prediction.card.name in printed[int(w.prediction.card.demo)]


def test_warnings_in_the_prediction_panel_are_in_plain_words(qtbot):
    panel = PredictionPanel()
    qtbot.addWidget(panel)
    att = _result().attention.copy()
    att[:, 1] = np.nan  # tumor pooled no patch
    r = _result(att=att)
    r.errors = ["warning: class 'tumor' pooled no patch of /slides/fake.svs; its score comes from an "
                "empty (zero) embedding"]  # the report's words stay (tests/test_pipeline.py)
    panel.show_result(r)
    text = panel.warnings_label.text()
    assert text == "⚠ No patch was kept for tumor, so its score is uninformative."
    nothing = _result(kept=np.zeros(6, bool), att=np.full((6, 2), np.nan, np.float32))
    panel.show_result(nothing)
    assert "chose no patch to read at high magnification" in panel.warnings_label.text()
    assert "embedding" not in panel.warnings_label.text()
    # without inputs the card is the bundled model's, shown by path
    assert panel.card is None
    from hdmil.checkpoint import default_model_path

    panel.show_model(default_model_path())
    assert panel.card.demo and DEMO_SHORT in panel.model_label.text()


def test_a_slide_file_rewritten_while_open_is_refused(viewer_widget, qtbot, cmu_slide, tmp_path, errors):
    import os
    import shutil

    viewer, w = viewer_widget
    copy = tmp_path / "copy.svs"
    shutil.copyfile(cmu_slide, copy)
    viewer.open(str(copy), plugin="napari-hdmil")
    assert w.slide_box.value is viewer.layers["copy"]
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten: same size, newer
    assert w.run("all") is None and w.worker is None
    (msg,) = errors()
    assert msg == (f"{copy.resolve()}: the slide file changed on disk since it was opened (its modification "
                   "time differs); close its layer and open the file again to classify it")
    with open(copy, "ab") as fh:
        fh.write(b"\0" * 16)
    assert w.run("prescreen") is None and "(its size differs)" in errors()[1]
    copy.unlink()
    assert w.run("all") is None and "the slide file is gone since it was opened" in errors()[2]
    # the slide whose file is as it was still runs
    w.slide_box.value = viewer.layers["CMU-1-Small-Region"]
    _run(qtbot, w, "prescreen")
    assert len(errors()) == 3 and w.prescreened is not None


def test_rank_labels_follow_the_zoom(viewer_widget, qtbot, tiny):
    viewer, w = viewer_widget
    w.model_edit.value = tiny
    _run(qtbot, w)
    (top,) = [la for la in viewer.layers if la.metadata.get("hdmil_layer") == "topk"]
    s = top.metadata["patch_size_um"]
    w.go_to_patch(int(top.metadata["rows"][0]))  # a patch ~250 px wide: the largest label
    assert top.text.visible and top.text.size == 28.0
    viewer.camera.zoom = 60 / s  # 60 px: a share of the patch
    assert top.text.visible and top.text.size == pytest.approx(18.0)
    viewer.camera.zoom = 10 / s  # 10 px patches: labels would overlap, hidden (the squares stay)
    assert not top.text.visible and top.visible
    w.heatmap.class_box.value = w.result.classes[1 - w.result.prediction_index]  # same layer, same rule
    assert not top.text.visible
    viewer.camera.zoom = 60 / s
    assert top.text.visible
    assert viewer.layers.selection.active is viewer.layers["CMU-1-Small-Region"]  # selected after the run
    assert viewer.layers.selection.active.mode == "pan_zoom"


def test_a_slide_without_mpp_says_so_on_opening(viewer_widget, qtbot, nompp_slide):
    from napari.utils.notifications import NotificationSeverity, notification_manager

    viewer, w = viewer_widget
    start = len(notification_manager.records)
    viewer.open(str(nompp_slide), plugin="napari-hdmil")
    said = [str(n.message) for n in notification_manager.records[start:] if n.severity == NotificationSeverity.WARNING]
    assert ("nompp: the slide file has no microns-per-pixel, so it is shown in pixels; type its mpp "
            "(µm/px) in the HDMIL widget to run it") in said
    assert w.mpp_box.enabled and w.mpp_box.label == "mpp (µm/px, required)" and w.mpp_box.value == 0
    start = len(notification_manager.records)
    w.slide_box.value = viewer.layers["CMU-1-Small-Region"]  # choosing a slide again says nothing
    w.slide_box.value = viewer.layers["nompp"]
    assert not any(n.severity == NotificationSeverity.WARNING for n in notification_manager.records[start:])
