"""Saving (issue 15 §8): a heatmap layer saved with our writer is a TIFF with its µm size (TIFF
resolution, read by other tools) that our reader reopens at the same scale, place and colours;
a slide layer is refused by the writer, never written as its thumbnail."""

from __future__ import annotations

import numpy as np
import pytest

from hdmil.errors import HDMILError

from napari_hdmil import _layers
from napari_hdmil._reader import get_reader, heatmap_description, read_heatmap
from test_layers import _result


def test_a_saved_heatmap_reopens_in_micrometres_at_the_same_place(make_napari_viewer, tmp_path):
    import tifffile

    viewer = make_napari_viewer()
    data, kwargs, _ = _layers.heatmap_layer(_result(), "normal")
    heat = viewer.add_image(data, **kwargs)
    out = tmp_path / "heat.tif"
    viewer.layers.selection = {heat}
    viewer.layers.save(str(out), selected=True, plugin="napari-hdmil")
    with tifffile.TiffFile(out) as tf:  # what another tool reads: the pixel size in µm
        x_px_per_cm = tf.pages[0].tags["XResolution"].value
    assert 1e4 * x_px_per_cm[1] / x_px_per_cm[0] == pytest.approx(heat.scale[-1], rel=1e-6)
    assert get_reader(str(out)) is read_heatmap and get_reader(str(tmp_path / "none.tif")) is None

    (back,) = viewer.open(str(out), plugin="napari-hdmil")
    assert back is not heat and back.name.startswith("attention: normal")
    np.testing.assert_allclose(back.scale, heat.scale)
    np.testing.assert_allclose(back.translate, heat.translate)
    assert [str(u) for u in back.units] == ["micrometer", "micrometer"]
    np.testing.assert_allclose(back.extent.world, heat.extent.world)  # over its slide again
    np.testing.assert_array_equal(np.isnan(back.data), np.isnan(heat.data))
    np.testing.assert_allclose(back.data[~np.isnan(back.data)], heat.data[~np.isnan(heat.data)])
    np.testing.assert_allclose(back.contrast_limits, heat.contrast_limits)
    assert back.colormap.name == heat.colormap.name  # the lowest step clear, as drawn
    assert back.opacity == pytest.approx(heat.opacity)
    assert back.metadata["hdmil_layer"] == "heatmap" and back.metadata["heatmap_file"] == str(out.resolve())


def test_other_tiffs_are_not_taken_for_heatmaps(tmp_path):
    import tifffile

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((8, 8), np.float32), description='{"name": "x"}')
    assert heatmap_description(plain) is None
    text = tmp_path / "text.tif"
    text.write_text("not a tiff")
    assert heatmap_description(text) is None


def test_a_slide_layer_is_refused_by_the_heatmap_writer(make_napari_viewer, cmu_slide, tmp_path):
    viewer = make_napari_viewer()
    (slide,) = viewer.open(str(cmu_slide), plugin="napari-hdmil")
    viewer.layers.selection = {slide}
    out = tmp_path / "slide.tif"
    # an HDMILError reaches the user with its words (napari would turn a ValueError into "not a
    # valid writer"); nothing is written
    with pytest.raises(HDMILError, match="'CMU-1-Small-Region' is a whole slide .* saves heatmaps only"):
        viewer.layers.save(str(out), selected=True, plugin="napari-hdmil")
    assert not out.exists()


# -- napari's own save path picks our writer for heatmaps (the dialog's first choice) ---------


def _heatmap_in_viewer(viewer, cmu_slide):
    """The CMU slide opened with our reader (which activates the plugin, as any real session
    does before it has a heatmap) and a heatmap over it."""
    viewer.open(str(cmu_slide), plugin="napari-hdmil")
    data, kwargs, _ = _layers.heatmap_layer(_result(), "normal")
    heat = viewer.add_image(data, **kwargs)
    viewer.layers.selection = {heat}
    return heat


def test_napari_saves_a_heatmap_with_our_writer_by_default(make_napari_viewer, cmu_slide, tmp_path):
    import tifffile
    from napari.plugins import _npe2

    viewer = make_napari_viewer()
    heat = _heatmap_in_viewer(viewer, cmu_slide)
    # the save dialog's filters: ours is the first entry, the one the dialog preselects
    filters, writers = _npe2.file_extensions_string_for_layers([heat])
    assert writers[0].command == "napari-hdmil.write_heatmap"
    assert filters.split(";;")[0].endswith("heatmap TIFF (µm) (*.tif *.tiff)")
    # no plugin named, as napari's "Save Selected Layers" and scripts call it
    out = tmp_path / "heat.tif"
    assert viewer.layers.save(str(out), selected=True) == [str(out)]
    assert heatmap_description(out)["name"] == heat.name
    with tifffile.TiffFile(out) as tf:  # what Fiji / QuPath read: pixels per µm
        x_per_um, y_per_um = tf.pages[0].get_resolution(tifffile.RESUNIT.MICROMETER)
    assert (1 / y_per_um, 1 / x_per_um) == pytest.approx(tuple(heat.scale), rel=1e-6)


def test_the_save_dialog_writes_a_heatmap_with_our_writer(make_napari_viewer, cmu_slide, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    viewer = make_napari_viewer()
    heat = _heatmap_in_viewer(viewer, cmu_slide)
    out = tmp_path / "dialog.tif"
    asked = {}

    def pick(*args, **kwargs):  # the user types a name and keeps the preselected (first) filter
        asked["filters"] = kwargs["filter"]
        return str(out), kwargs["filter"].split(";;")[0]

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(pick))
    viewer.window._qt_viewer._save_layers_dialog(selected=True)
    assert "heatmap TIFF (µm)" in asked["filters"].split(";;")[0]
    (back,) = viewer.open(str(out), plugin="napari-hdmil")
    np.testing.assert_allclose(back.scale, heat.scale)
    np.testing.assert_allclose(back.translate, heat.translate)


def test_other_image_layers_still_save_as_napari_saves_them(make_napari_viewer, cmu_slide, tmp_path):
    import tifffile

    viewer = make_napari_viewer()
    _heatmap_in_viewer(viewer, cmu_slide)
    plain = viewer.add_image(np.arange(64, dtype=np.uint16).reshape(8, 8), name="plain", scale=(2.0, 2.0))
    viewer.layers.selection = {plain}
    out = tmp_path / "plain.tif"
    assert viewer.layers.save(str(out), selected=True) == [str(out)]
    np.testing.assert_array_equal(tifffile.imread(out), plain.data)
    assert heatmap_description(out) is None  # napari's own file: not taken for one of our heatmaps


def test_napari_refuses_to_save_the_slide_layer_by_default(make_napari_viewer, cmu_slide, tmp_path):
    viewer = make_napari_viewer()
    _heatmap_in_viewer(viewer, cmu_slide)
    viewer.layers.selection = {viewer.layers["CMU-1-Small-Region"]}
    out = tmp_path / "slide.tif"
    with pytest.raises(HDMILError, match=r"is a whole slide .* slide file .*CMU-1-Small-Region.svs is its full"):
        viewer.layers.save(str(out), selected=True)
    assert not out.exists()


def test_the_widget_makes_our_writer_the_default(make_napari_viewer):
    """A widget opened without our reader (npe2 never activated the plugin) still puts our
    heatmap writer first."""
    from npe2 import PluginManager

    from napari_hdmil._widget import HDMILWidget

    entries = PluginManager.instance()._contrib._writers
    entries.sort(key=lambda e: e[3].plugin_name == "napari-hdmil")  # ours last, as before activation
    assert entries[0][3].plugin_name != "napari-hdmil"
    viewer = make_napari_viewer()
    viewer.window.add_dock_widget(HDMILWidget(viewer))
    assert entries[0][3].plugin_name == "napari-hdmil"
