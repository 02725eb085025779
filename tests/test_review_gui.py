"""The batch review panel in a real viewer: a batch folder of three slides (one failed), the table
sorted and filtered, slides opened with their saved results (no model built), next / previous,
verdicts that survive closing and reopening the panel, and the HDMIL widget filled when docked."""

from __future__ import annotations

import shutil

import pytest

from hdmil.batch import process_slide, write_summary
from hdmil.cli import main
from napari_hdmil._qt.review import HEADERS, ReviewPanel
from test_review import _no_models

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def batch_out(cmu_slide, synthetic_slide, tiny_slide, tmp_path_factory):
    """What `hdmil batch` leaves: OUT/<slide>/ results and OUT/summary.csv (run without Dask)."""
    root = tmp_path_factory.mktemp("review_batch")
    slides = root / "slides"
    slides.mkdir()
    for s in (cmu_slide, synthetic_slide, tiny_slide):
        shutil.copy(s, slides / s.name)
    out = root / "out"
    rows = [process_slide(str(p), str(out), batch_size=16) for p in sorted(slides.iterdir())]
    write_summary(out, rows)
    return out


def _panel(make_napari_viewer, out):
    viewer = make_napari_viewer()
    panel = ReviewPanel(viewer)
    viewer.window.add_dock_widget(panel, name="HDMIL review", area="right")
    panel.open_folder(out)
    return viewer, panel


def test_batch_reviewed_through_the_panel(make_napari_viewer, batch_out, monkeypatch, capsys):
    _no_models(monkeypatch)
    viewer, panel = _panel(make_napari_viewer, batch_out)
    assert [r.slide for r in panel.rows] == ["CMU-1-Small-Region", "small-16px", "synthetic"]
    failed = next(r for r in panel.rows if r.slide == "small-16px")
    assert failed.status == "failed" and failed.error and panel.table.rowCount() == 3
    assert panel.table.columnCount() == len(HEADERS)

    panel.sort_by("kept ratio")  # numbers sort as numbers, the failed row (no number) last
    assert panel.shown[-1].slide == "small-16px"
    ratios = [r.kept_ratio for r in panel.shown[:2]]
    assert ratios == sorted(ratios)
    panel.sort_by("kept ratio", descending=True)
    assert [r.kept_ratio for r in panel.shown if r.kept_ratio is not None] == sorted(ratios, reverse=True)
    panel.show_box.setCurrentText("failed")
    assert [r.slide for r in panel.shown] == ["small-16px"]
    panel.show_box.setCurrentText("all")
    panel.filter_edit.setText("synth")
    assert [r.slide for r in panel.shown] == ["synthetic"]
    panel.filter_edit.setText("")
    panel.sort_by("slide")

    panel.select(0)
    res = panel.open_current()  # double-click does the same
    assert res is not None and res.slide_name == "CMU-1-Small-Region"
    names = [layer.name for layer in viewer.layers]
    assert names[0] == "CMU-1-Small-Region" and "attention: tumor" in names
    assert f"top-k: {res.prediction}" in names  # the predicted class's top patches
    assert f"CMU-1-Small-Region: {res.prediction}" in panel.slide_label.text()
    panel.set_verdict("agree", "looks normal")
    assert panel.next() is None  # the failed slide has no results: an error, nothing opened
    panel.set_verdict("unsure", "tiny")
    res = panel.next()
    assert res.slide_name == "synthetic"
    assert not any(layer.name == "CMU-1-Small-Region" for layer in viewer.layers)  # the last slide's went
    panel.set_verdict("disagree", "tumour missed")
    assert panel.previous() is None and panel.current_row().slide == "small-16px"
    assert "reviewed 3" in panel.summary_label.text()
    viewer.close()

    # closing and reopening: the verdicts are read back from review.csv
    viewer, panel = _panel(make_napari_viewer, batch_out)
    got = {r.slide: (r.verdict.verdict, r.verdict.note) for r in panel.rows}
    assert got == {"CMU-1-Small-Region": ("agree", "looks normal"), "small-16px": ("unsure", "tiny"),
                   "synthetic": ("disagree", "tumour missed")}
    panel.select(2)
    assert panel.verdict_buttons["disagree"].isChecked() and panel.note_edit.text() == "tumour missed"
    assert panel.table.item(2, HEADERS.index("verdict")).text() == "disagree"
    assert main(["review-summary", str(batch_out)]) == 0
    assert "agree 1  disagree 1  unsure 1  agreement 50.0%" in capsys.readouterr().out


def test_reopened_result_fills_the_docked_hdmil_widget(make_napari_viewer, batch_out, monkeypatch):
    from napari_hdmil._widget import HDMILWidget

    viewer, panel = _panel(make_napari_viewer, batch_out)
    widget = HDMILWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HDMIL", area="right")
    _no_models(monkeypatch)
    panel.select(0)
    res = panel.open_current()
    assert widget.result is res
    assert res.prediction in widget.prediction_label.text()
    assert any("attention: tumor" in layer.name for layer in viewer.layers)


def test_reader_opens_a_result_folder_in_napari(make_napari_viewer, batch_out, monkeypatch):
    _no_models(monkeypatch)
    viewer = make_napari_viewer()
    layers = viewer.open(str(batch_out / "synthetic"), plugin="napari-hdmil")
    assert [la.name for la in layers][:1] == ["synthetic"] and len(layers) == 6


def test_reader_hands_the_result_to_a_docked_hdmil_widget(make_napari_viewer, batch_out, monkeypatch, qtbot):
    from napari_hdmil._widget import HDMILWidget

    viewer = make_napari_viewer()
    widget = HDMILWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HDMIL", area="right")
    _no_models(monkeypatch)
    layers = viewer.open(str(batch_out / "synthetic" / "report.json"), plugin="napari-hdmil")
    assert [la.name for la in layers] == ["synthetic"]  # the widget adds the result layers
    qtbot.waitUntil(lambda: widget.result is not None, timeout=5000)
    assert widget.result.slide_name == "synthetic" and widget.prediction_label.text()
    assert any(la.name.startswith("attention: tumor") for la in viewer.layers)
