"""A Shapes layer drawn in µm as the widget's ROI or exclusion (issue 17 items 2 and 6): the run
analyses only the patches inside it (outside it), the same ones ``hdmil.pipeline.prescreen(...,
roi=..., exclude=...)`` keeps; annotation layers stay drawn above the heatmaps; an annotation file
opened in napari becomes such a layer over its slide."""

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


def test_a_rectangle_drawn_in_um_as_exclusion_leaves_its_patches_out(viewer_widget, qtbot, ckpts,  # noqa: F811
                                                                      cmu_slide):
    """Issue 17 item 2: the widget takes a Shapes layer as an exclusion too; the run leaves out
    the patches the pipeline's ``exclude`` leaves out, and its run key names the drawn shapes."""
    from hdmil.checkpoint import load_model
    from hdmil.pipeline import prescreen

    viewer, w = viewer_widget
    slide = w.slide_box.value
    mpp = float(slide.scale[-1])
    assert w.inputs.exclude_box.value is None and w.inputs.exclude_box.choices[0] is None
    art = viewer.add_shapes(name="artefact", scale=viewer.layers.extent.step)
    y0, x0, y1, x1 = 400.0, 300.0, 900.0, 700.0  # µm, across the tissue in the middle
    art.add_rectangles(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]]) / np.asarray(art.scale))
    w.inputs.refresh()
    w.inputs.exclude_box.value = art
    w.model_edit.value = ckpts["tiny"]
    _run(qtbot, w, kind="prescreen")
    ps = w.prescreened
    assert ps is not None and ps.roi["exclude"] == "Shapes layer 'artefact'" and ps.roi["file"] is None

    drawn = shapes_to_annotations(art.data, art.shape_type, mpp, art.scale, art.translate)
    model = load_model(ckpts["tiny"])
    direct = prescreen(cmu_slide, model, exclude=drawn)
    np.testing.assert_array_equal(ps.grid.coords, direct.grid.coords)  # the widget's is the pipeline's
    full = prescreen(cmu_slide, model)
    assert 0 < ps.n_patches < full.n_patches
    # every patch left has at least the tissue threshold of its footprint outside the rectangle
    coords, size = ps.grid.coords * mpp, ps.grid.patch_size_level0 * mpp
    wx = np.clip(np.minimum(coords[:, 0] + size, x1) - np.maximum(coords[:, 0], x0), 0, None)
    wy = np.clip(np.minimum(coords[:, 1] + size, y1) - np.maximum(coords[:, 1], y0), 0, None)
    assert (1 - wx * wy / size**2 >= ps.grid.tissue_threshold - 1e-6).all()
    # and the patches dropped are the full grid's patches mostly inside it
    gone = {tuple(c) for c in full.grid.coords.tolist()} - {tuple(c) for c in ps.grid.coords.tolist()}
    assert gone and all(x0 - size < cx * mpp < x1 and y0 - size < cy * mpp < y1 for cx, cy in gone)

    _run(qtbot, w, kind="classify")  # Classify reuses this pre-screen: same exclusion
    key = w.result.run_key["roi"]
    assert key["roi"] is None and key["exclude"]["sha256"] == _layers.shapes_digest(art.data)
    np.testing.assert_array_equal(w.result.coords, ps.grid.coords)
    art.data = [d + 50.0 for d in art.data]  # the user moves the rectangle: another exclusion
    job = w.inputs.job("classify", 16)
    assert job.exclude.sha256 == _layers.shapes_digest(art.data) != key["exclude"]["sha256"]


def test_an_annotation_file_opened_in_napari_lies_on_the_slide_and_serves_as_roi(viewer_widget,  # noqa: F811
                                                                                  tmp_path):
    """File > Open of a QuPath GeoJSON: the annotation layer in µm over the CMU slide, in its class
    colour, above the slide; the widget offers it as ROI and exclusion, giving its annotations."""
    import json

    viewer, w = viewer_widget
    slide = w.slide_box.value
    mpp = float(slide.scale[-1])
    square = [[400, 600], [1200, 600], [1200, 1800], [400, 1800], [400, 600]]  # level-0 px (x, y)
    doc = {"type": "FeatureCollection", "features": [{"type": "Feature",
           "geometry": {"type": "Polygon", "coordinates": [square]},
           "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [0, 0, 255]}}}]}
    path = tmp_path / "tumour.geojson"
    path.write_text(json.dumps(doc))
    (layer,) = viewer.open(str(path), plugin="napari-hdmil")
    assert layer.name == "annotations: tumour.geojson" and type(layer).__name__ == "Shapes"
    np.testing.assert_allclose(layer.data[0][:, ::-1] / mpp, np.asarray(square[:-1], float), atol=1e-3)
    np.testing.assert_allclose(layer.edge_color[0], (0, 0, 1, 1))
    assert tuple(str(u) for u in layer.units) == tuple(str(u) for u in slide.units)
    assert list(viewer.layers).index(layer) > list(viewer.layers).index(slide)
    w.inputs.refresh()
    w.inputs.roi_box.value = layer
    w.inputs.exclude_box.value = layer
    job = w.inputs.job("prescreen", 16)
    assert job.roi is layer.metadata["annotations"] and job.exclude is job.roi
    bad = tmp_path / "settings.xml"
    bad.write_text("<settings/>")
    # napari says the reader refused it; our warning (a notification) says why
    with pytest.raises(ValueError, match="refused"), pytest.warns(UserWarning, match="no ASAP polygon"):
        viewer.open(str(bad), plugin="napari-hdmil")
