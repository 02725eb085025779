"""The HDMIL dock widget in a real viewer (pytest-xvfb gives the X server, Mesa renders):
Run all on the CMU slide, layers aligned with the slide, the heatmap on screen over tissue,
heatmap controls, gallery, exports, Cancel within one batch, errors as notifications, and a
GUI that keeps processing events while a run goes on.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from napari_hdmil import _layers
from napari_hdmil._messages import Progress
from napari_hdmil._qt.layer_store import layer_name
from napari_hdmil._widget import HDMILWidget
from test_layers import SLOW, SLOW_CALLS, make_checkpoint

pytestmark = pytest.mark.gui

CMU = "CMU-1-Small-Region"


def _n(base: str, slide: str = CMU) -> str:
    """A result layer's name: named for its slide."""
    return layer_name(base, slide)


@pytest.fixture(scope="module")
def ckpts(cmu_slide, tmp_path_factory):
    d = tmp_path_factory.mktemp("gui_ckpt")
    return {
        "tiny": make_checkpoint(d / "tiny.safetensors", cmu_slide),
        "slow": make_checkpoint(d / "slow.safetensors", cmu_slide, encoder=SLOW),
        "wide": make_checkpoint(d / "wide.safetensors", cmu_slide, in_dim=12),
    }


@pytest.fixture
def viewer_widget(make_napari_viewer, cmu_slide):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1100, 800)
    viewer.open(str(cmu_slide), plugin="napari-hdmil")
    widget = HDMILWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HDMIL", area="right")
    return viewer, widget


def _run(qtbot, widget, kind="all", timeout=60_000):
    worker = widget.run(kind)
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)
    return worker


def _cell(layer, world):
    return tuple(int(v) for v in np.floor(np.asarray(layer.world_to_data(world)) + 0.5))


@pytest.mark.slow
def test_run_all_layers_aligned_panel_and_controls(viewer_widget, qtbot, ckpts, errors):
    viewer, w = viewer_widget
    slide = viewer.layers["CMU-1-Small-Region"]
    assert w.slide_box.value is slide and not w.mpp_box.enabled  # the file has its mpp
    w.model_edit.value = ckpts["tiny"]
    _run(qtbot, w)
    assert errors() == []
    r = w.result
    assert r is not None and 0 < r.n_kept < r.n_patches

    names = {layer.name for layer in viewer.layers}
    assert {_n("LIPN decision"), _n("attention: normal"), _n("attention: tumor"), _n("top-k: " + r.prediction),
            _n("bottom-k: " + r.prediction)} <= names  # fmt: skip
    lipn = viewer.layers[_n("LIPN decision")]
    heat = viewer.layers[_n(f"attention: {r.prediction}")]
    assert heat.visible and not viewer.layers[_n(f"attention: {r.classes[1 - r.prediction_index]}")].visible
    assert tuple(heat.contrast_limits) == (0.0, 1.0) and heat.metadata["model_sha256"] == r.model_sha256

    # a kept patch's world position equals its level-0 coordinates x mpp (the slide layer's pixels)
    mpp = slide.metadata["mpp"]
    for i in np.flatnonzero(r.kept)[:5]:
        x0, y0 = r.coords[i]
        row, col = r.grid_index[i]
        corner = np.asarray(heat.data_to_world((row - 0.5, col - 0.5)))
        np.testing.assert_allclose(corner, np.asarray(slide.data_to_world((y0 - 0.5, x0 - 0.5))), atol=1e-6)
        np.testing.assert_allclose(corner + mpp / 2, (y0 * mpp, x0 * mpp), atol=1e-6)
        for dy in (0, r.patch_size_level0 - 1):  # first and last slide pixel of the patch
            world = slide.data_to_world((y0 + dy, x0 + dy))
            assert _cell(heat, world) == (row, col) and _cell(lipn, world) == (row, col)
        assert lipn.data[row, col] == 2 and np.isfinite(heat.data[row, col]) == r.lipn_mask[i, r.prediction_index]
    top = viewer.layers[_n("top-k: " + r.prediction)]
    assert len(top.data) == min(8, np.isfinite(r.attention[:, r.prediction_index]).sum())
    np.testing.assert_allclose(top.features["attention"], np.sort(r.attention[:, r.prediction_index][
        np.isfinite(r.attention[:, r.prediction_index])])[::-1][: len(top.data)])  # fmt: skip

    # prediction panel
    assert r.prediction in w.prediction_label.text()
    assert set(w.probability_bars) == {"normal", "tumor"}
    for c, p in zip(r.classes, r.probabilities):
        assert w.probability_bars[c].value() == round(p * 1000)
    assert f"kept {r.n_kept}" in w.counts_label.text() and f"{r.n_patches}" in w.counts_label.text()
    for title in ("tissue", "LIPN", "crop", "features", "DMIN", "total"):
        assert title in w.timings_label.text()
    assert w.progress_bars["features"].value() == w.progress_bars["features"].maximum() == r.n_kept

    # heatmap controls update the same layers in place
    other = r.classes[1 - r.prediction_index]
    w.class_box.value = other
    assert viewer.layers[_n(f"attention: {other}")].visible and not heat.visible
    assert top in viewer.layers and top.name == _n(f"top-k: {other}")
    np.testing.assert_array_equal(top.metadata["rows"], _layers.top_k(r, other, 8))
    before = heat.data.copy()
    w.threshold_slider.value = 0.5
    assert np.isfinite(heat.data).sum() < np.isfinite(before).sum()
    assert np.nanmin(heat.data) >= 0.5 and heat in viewer.layers
    w.norm_box.value = "raw"
    w.colormap_box.value = "viridis"
    w.opacity_slider.value = 0.3
    assert heat.metadata["colormap"] == "viridis" and heat.colormap.name.startswith("viridis") and heat.opacity == pytest.approx(0.3)
    assert heat.metadata["normalisation"] == "raw"

    # gallery: thumbnails of the top and bottom patches; a click goes there
    assert len(w.gallery.buttons) >= 2
    button = w.gallery.buttons[0]
    row = button.property("patch_row")
    button.click()
    np.testing.assert_allclose(viewer.camera.center[-2:], _layers.patch_centres_um(r, [row])[0], atol=1e-6)
    assert viewer.camera.zoom == pytest.approx(250 / (r.patch_size_level0 * r.mpp))


@pytest.mark.slow
def test_screenshot_shows_heatmap_over_tissue(viewer_widget, qtbot, ckpts):
    viewer, w = viewer_widget
    w.model_edit.value = ckpts["tiny"]
    _run(qtbot, w)
    for layer in viewer.layers:
        if layer.metadata.get("hdmil_layer") in ("lipn", "topk", "bottomk"):
            layer.visible = False
    w.colormap_box.value = "viridis"
    w.opacity_slider.value = 1.0
    heat = viewer.layers[_n(f"attention: {w.result.prediction}")]
    assert heat.colorbar.visible
    heat.colorbar.visible = False  # its legend is drawn in heatmap colours beside the tissue
    viewer.reset_view()

    def shot():
        qtbot.wait(300)
        return viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(np.int16)

    with_heat = shot()
    heat.visible = False
    without = shot()
    lut = (heat.colormap.map(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.int16)

    def on_colormap(img):
        d = np.abs(img.reshape(-1, 1, 3) - lut[None]).max(-1).min(-1)
        return (d <= 6).reshape(img.shape[:2])

    changed = np.abs(with_heat - without).max(-1) > 20
    heat_px = on_colormap(with_heat) & changed
    assert heat_px.mean() > 0.01, f"only {heat_px.mean():.2%} of the canvas shows heatmap colours"
    assert not (on_colormap(without) & changed).any() or on_colormap(without)[changed].mean() < 0.05
    # under the heatmap the slide is tissue: coloured, neither white background nor black canvas
    tissue = (without.min(-1) < 200) & (without.max(-1) > 40)
    slide_area = without.max(-1) > 40
    assert tissue[heat_px].mean() > 0.6
    assert tissue[heat_px].mean() > 1.5 * tissue[slide_area].mean()


def test_exports(viewer_widget, qtbot, ckpts, tmp_path):
    viewer, w = viewer_widget
    w.model_edit.value = ckpts["tiny"]
    w.k_box.value = 3
    _run(qtbot, w)
    r = w.result
    gj = json.loads(w.export_geojson(tmp_path / "s.geojson").read_text())
    tiles = [f for f in gj["features"] if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == r.n_patches
    kept_tiles = [t for t in tiles if t["properties"]["measurements"]["kept"] == 1]
    assert len(kept_tiles) == r.n_kept
    tops = [f for f in gj["features"] if f["properties"].get("classification", {}).get("name", "").startswith("Top")]
    assert len(tops) == sum(min(3, np.isfinite(r.attention[:, c]).sum()) for c in range(2))
    assert any(f["properties"].get("name") == "Tissue" for f in gj["features"])
    with open(w.export_csv(tmp_path / "s.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == r.n_patches and sum(int(x["kept"]) for x in rows) == r.n_kept
    assert {"attention_normal", "attention_tumor", "lipn_keep_tumor", "score_normal"} <= set(rows[0])
    report = json.loads(w.export_report(tmp_path / "report.json").read_text())
    assert report["prediction"] == r.prediction and report["n_kept"] == r.n_kept
    png = w.export_png(tmp_path / "overlay.png")
    from skimage.io import imread

    assert imread(png).ndim == 3


def test_cli_writes_the_widgets_geojson_and_csv(viewer_widget, qtbot, ckpts, cmu_slide, tmp_path, capsys):
    """`hdmil predict --geojson --csv` on the same slide and model: byte for byte the widget's exports."""
    from hdmil.cli import main
    from hdmil.export import DEFAULT_TOP_K

    viewer, w = viewer_widget
    w.model_edit.value = ckpts["tiny"]
    assert w.k_box.value == DEFAULT_TOP_K  # the CLI's top-k
    _run(qtbot, w)
    assert w.result is not None
    gui_geojson, gui_csv = w.export_geojson(tmp_path / "w.geojson"), w.export_csv(tmp_path / "w.csv")
    rc = main(["predict", str(cmu_slide), "--model", str(ckpts["tiny"]), "--out", str(tmp_path / "out"),
               "--geojson", str(tmp_path / "cli.geojson"), "--csv", str(tmp_path / "cli.csv")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "cli.geojson").read_bytes() == gui_geojson.read_bytes()
    assert (tmp_path / "cli.csv").read_bytes() == gui_csv.read_bytes()


def test_prescreen_then_classify(viewer_widget, qtbot, ckpts, errors):
    viewer, w = viewer_widget
    w.model_edit.value = ckpts["tiny"]
    assert not w.classify_button.isEnabled()
    _run(qtbot, w, "prescreen")
    ps = w.prescreened
    assert ps is not None and w.result is None and errors() == []
    names = [layer.name for layer in viewer.layers]
    assert _n("LIPN decision") in names and not any(n.startswith("attention") for n in names)
    assert (viewer.layers[_n("LIPN decision")].data == 2).sum() == ps.n_kept > 0
    assert w.progress_bars["features"].value() == 0  # nothing read at 20x
    assert w.classify_button.isEnabled()
    _run(qtbot, w, "classify")
    assert w.result is not None and w.result.n_kept == ps.n_kept
    assert _n(f"attention: {w.result.prediction}") in [layer.name for layer in viewer.layers]
    assert [layer.name for layer in viewer.layers].count(_n("LIPN decision")) == 1


def test_cancel_stops_within_one_batch_and_gui_keeps_ticking(viewer_widget, qtbot, ckpts):
    viewer, w = viewer_widget
    w.model_edit.value = ckpts["slow"]
    w.batch_size = 4
    seen: dict[str, int] = {}

    def on_progress(msg: Progress):  # the worker's typed message
        if msg.stage == "features" and "start" not in seen:
            seen["start"], seen["total"] = len(SLOW_CALLS), msg.total  # after the warm-up call
        if msg.stage == "features" and msg.done > 0:
            w.cancel()

    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(w.worker is not None))
    timer.start(20)
    w._bridge.progress.connect(on_progress)
    SLOW_CALLS.clear()
    worker = _run(qtbot, w, "all", timeout=30_000)
    timer.stop()
    assert seen["total"] > 3 * 4, "the run must have more than 3 batches for this test to mean anything"
    assert len(SLOW_CALLS) - seen["start"] <= 2
    assert w.result is None and "cancelled" in w.status_label.text()
    assert not any(layer.name.startswith("attention") for layer in viewer.layers)
    assert w.run_all_button.isEnabled() and not w.cancel_button.isEnabled()
    assert not worker.is_running
    # the event loop ran while the worker did (>= 0.4 s per slow batch, a tick every 20 ms)
    assert sum(ticks) >= 5


def test_errors_become_notifications_and_the_widget_runs_again(viewer_widget, qtbot, ckpts, errors,
                                                               broken_slide, cmu_slide, tmp_path):  # fmt: skip
    import tifffile

    viewer, w = viewer_widget
    w.model_edit.value = ckpts["tiny"]
    # a corrupt slide (our reader refuses it, so a layer pointing at it stands in)
    viewer.add_image(np.zeros((8, 8, 3), np.uint8), rgb=True, name="broken",
                     metadata={"slide_path": str(broken_slide), "hdmil_slide": True, "mpp": 0.5})  # fmt: skip
    w.slide_box.value = viewer.layers["broken"]
    _run(qtbot, w)
    assert len(errors()) == 1 and "broken.svs" in errors()[0]
    assert w.run_all_button.isEnabled()

    # a TIFF without mpp and none given
    nompp = tmp_path / "nompp.tif"
    tifffile.imwrite(nompp, np.full((600, 600, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    viewer.open(str(nompp), plugin="napari-hdmil")
    w.slide_box.value = viewer.layers["nompp"]
    assert w.mpp_box.enabled
    _run(qtbot, w)
    assert len(errors()) == 2 and "nompp.tif" in errors()[1] and "mpp" in errors()[1].lower()

    # a checkpoint whose DMIN wants another feature width
    w.slide_box.value = viewer.layers["CMU-1-Small-Region"]
    w.model_edit.value = ckpts["wide"]
    _run(qtbot, w)
    assert len(errors()) == 3 and "12-d" in errors()[2] and "wide.safetensors" in errors()[2]
    assert w.result is None

    # and then it works
    w.model_edit.value = ckpts["tiny"]
    _run(qtbot, w)
    assert len(errors()) == 3 and w.result is not None
    assert w.result.slide_path == str(cmu_slide.resolve())
    assert _n(f"attention: {w.result.prediction}") in [layer.name for layer in viewer.layers]


@pytest.mark.slow
def test_region_model_runs_without_lipn(viewer_widget, qtbot, tmp_path, errors):
    """A DMIN of SLPD regions: the widget reads every patch (LIPN screens patches, not regions)
    with the SLPD model named beside the checkpoint, and shows region attention on the patches."""
    from test_pipeline_regions import _region_model

    viewer, w = viewer_widget
    w.model_edit.value = _region_model(tmp_path)
    assert w.lipn_box.value  # left on: the widget knows it does not apply
    _run(qtbot, w, "all")
    assert errors() == []
    r = w.result
    assert r is not None and r.instances == "region" and not r.use_lipn
    assert r.n_read == r.n_patches and len(r.regions.coords) > 0
    assert _n(f"attention: {r.prediction}") in [layer.name for layer in viewer.layers]
