"""A Shapes layer drawn in µm as the widget's ROI (issue 17 items 2 and 6): the run analyses only
the patches inside it, the same ones ``hdmil.pipeline.prescreen(..., roi=...)`` keeps, and
annotation layers stay drawn above the heatmaps."""

from __future__ import annotations

import numpy as np
import pytest

from hdmil.annotations import shapes_to_annotations
from napari_hdmil import _layers
from test_widget_gui import _run, ckpts, viewer_widget  # noqa: F401  (fixtures)

pytestmark = pytest.mark.gui


def test_a_rectangle_drawn_in_um_restricts_the_widgets_run(viewer_widget, qtbot, ckpts, cmu_slide):  # noqa: F811
    from hdmil.checkpoint import load_model
    from hdmil.pipeline import prescreen

    viewer, w = viewer_widget
    slide = w.slide_box.value
    mpp = float(slide.scale[-1])
    assert w.inputs.roi_box.value is None and w.inputs.roi_choices()[0] == ("none", None)
    # as napari's "new shapes layer" button makes it: scaled like the finest layer
    roi_layer = viewer.add_shapes(name="roi", scale=viewer.layers.extent.step)
    y0, x0, y1, x1 = 150.0, 200.0, 650.0, 800.0  # µm
    world = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
    roi_layer.add_rectangles(world / np.asarray(roi_layer.scale))
    w.inputs.roi_box.value = roi_layer
    w.model_edit.value = ckpts["tiny"]
    _run(qtbot, w)
    r = w.result
    assert r is not None and r.roi["file"] == "Shapes layer 'roi'"

    roi = shapes_to_annotations(roi_layer.data, roi_layer.shape_type, mpp, roi_layer.scale, roi_layer.translate)
    model = load_model(ckpts["tiny"])
    direct = prescreen(cmu_slide, model, roi=roi)
    np.testing.assert_array_equal(r.coords, direct.grid.coords)  # the widget's run is the pipeline's
    full = prescreen(cmu_slide, model)
    assert 0 < r.n_patches < full.n_patches
    # every patch analysed has at least the tissue threshold of its footprint inside the rectangle
    lo, hi, size = r.coords * mpp, (r.coords + r.patch_size_level0) * mpp, r.patch_size_level0 * mpp
    wx = np.clip(np.minimum(hi[:, 0], x1) - np.maximum(lo[:, 0], x0), 0, None)
    wy = np.clip(np.minimum(hi[:, 1], y1) - np.maximum(lo[:, 1], y0), 0, None)
    assert (wx * wy / size**2 >= direct.grid.tissue_threshold - 1e-6).all()

    # an annotation layer of the same rectangle: above the heatmaps, also after another run
    ann = _layers.annotation_layer(roi, mpp, slide.name)
    layer = viewer._add_layer_from_data(*ann)[0]
    w.inputs.roi_box.value = None
    _run(qtbot, w)
    assert w.result.n_patches == full.n_patches and w.result.roi is None  # none: all tissue again
    names = [lay.name for lay in viewer.layers]
    heat = [i for i, lay in enumerate(viewer.layers) if (lay.metadata or {}).get("hdmil_layer") == "heatmap"]
    assert heat and names.index(layer.name) > max(heat) and names.index("roi") > max(heat)
    # the annotation layer itself as the ROI: its annotations, as imported
    w.inputs.refresh()
    w.inputs.roi_box.value = layer
    job = w.inputs.job("prescreen", 16)
    assert job.roi is layer.metadata["annotations"]
