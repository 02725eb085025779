"""Imported annotations as a napari Shapes layer (issue 17 item 6) and the worker's ROI: outlines
in µm in their class colours, the inverse of ``shapes_to_annotations``, and a Job's ROI reaching
``prescreen`` / ``run_slide``."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from hdmil.annotations import parse_geojson, shapes_to_annotations
from napari_hdmil._layers import ANNOTATION_COLOR, UNITS, annotation_layer, shapes_digest

HOLED = {"type": "Polygon", "coordinates": [[[0, 0], [400, 0], [400, 200], [0, 200], [0, 0]],
                                            [[100, 50], [100, 150], [200, 150], [200, 50], [100, 50]]]}
MULTI = {"type": "MultiPolygon", "coordinates": [[[[600, 0], [700, 0], [700, 100], [600, 0]]],
                                                 [[[800, 800], [900, 800], [900, 900], [800, 800]]]]}


def _doc():
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": HOLED,
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": MULTI, "properties": {"objectType": "annotation", "name": "no colour"}},
    ]}  # fmt: skip


def _level0():
    return parse_geojson(_doc(), "t.geojson").for_slide({})  # no bounds offset: QuPath's frame is level 0


def test_annotation_layer_in_um_with_class_colours():
    data, kw, kind = annotation_layer(_level0(), 0.5, "s1")
    assert kind == "shapes" and kw["units"] == UNITS and kw["shape_type"] == "polygon"
    assert len(data) == 4  # exterior + hole, and two parts of the MultiPolygon
    np.testing.assert_allclose(data[0], [[0, 0], [0, 200], [100, 200], [100, 0]])  # (y, x) µm = px · 0.5
    np.testing.assert_allclose(data[1].min(0), [25, 50])  # the hole at (x 100..200, y 50..150) px
    assert kw["features"]["hole"] == [False, True, False, False]
    assert kw["features"]["classification"] == ["Tumor", "Tumor", "", ""]
    edge = np.asarray(kw["edge_color"])
    np.testing.assert_allclose(edge[0], [200 / 255, 0, 0, 1])
    np.testing.assert_allclose(edge[2, :3], np.asarray(ANNOTATION_COLOR) / 255)  # no colour in the file
    assert kw["face_color"] == "transparent"  # outlines: the heatmap under them stays visible
    meta = kw["metadata"]
    assert meta["hdmil_layer"] == "annotations" and meta["slide_name"] == "s1" and meta["mpp"] == 0.5
    assert meta["shapes_digest"] == shapes_digest(data) and meta["annotations"].frame == "level0"


def test_annotation_layer_round_trips_through_shapes_to_annotations():
    import shapely
    from napari.layers import Shapes

    ann = _level0()
    data, kw, _ = annotation_layer(ann, 0.25, "s1")
    layer = Shapes(data, **kw)
    assert shapes_digest(layer.data) == layer.metadata["shapes_digest"]  # napari keeps float32 vertices
    back = shapes_to_annotations(layer.data, layer.shape_type, 0.25, layer.scale, layer.translate)
    hole = np.asarray(layer.features["hole"], bool)
    outside = shapely.union_all([b.geometry for b, h in zip(back, hole) if not h])
    holes = shapely.union_all([b.geometry for b, h in zip(back, hole) if h])
    # exteriors minus holes: the same area as the annotations' own (level-0 px, float32 µm)
    assert shapely.difference(outside, holes).symmetric_difference(ann.region()).area < 1e-3


def test_annotation_layer_refuses_qupath_frame():
    with pytest.raises(ValueError, match="for_slide"):
        annotation_layer(parse_geojson(_doc(), "t.geojson"), 0.5)


# ---------------------------------------------------------------------------------------------
# the worker restricts a Job to its ROI


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from test_cli_predict import _checkpoint

    return _checkpoint(tmp_path_factory.mktemp("roi_runner") / "tiny.safetensors")


def _roi(box_um, mpp=0.5):
    """A drawn rectangle (y0, x0, y1, x1) µm as a Shapes layer would give it."""
    y0, x0, y1, x1 = box_um
    rect = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)
    return dataclasses.replace(shapes_to_annotations([rect], "rectangle", mpp), source="Shapes layer 'roi'",
                               sha256=shapes_digest([rect]))  # fmt: skip


def test_runner_passes_the_roi_and_screens_again_when_it_changed(synthetic_slide, ckpt):
    from hdmil.checkpoint import load_model
    from hdmil.pipeline import prescreen
    from napari_hdmil._messages import Job
    from napari_hdmil._runner import Runner

    def job(kind, **kw):
        return Job(kind, str(synthetic_slide), None, ckpt, use_lipn=True, batch_size=16, k=3, **kw)

    roi = _roi((0, 0, 768, 1024))  # the top-left 1536 x 2048 px
    runner = Runner()
    ps = runner.work(job("prescreen", roi=roi), threading.Event(), lambda m: None).prescreen
    direct = prescreen(synthetic_slide, load_model(ckpt), roi=roi)
    np.testing.assert_array_equal(ps.grid.coords, direct.grid.coords)
    assert ps.roi["file"] == "Shapes layer 'roi'" and ps.n_patches == ps.roi["n_patches_inside"] > 0
    size = ps.grid.patch_size_level0
    assert (ps.grid.coords[:, 0] + size / 2 <= 2048).all() and (ps.grid.coords[:, 1] + size / 2 <= 1536).all()
    done = runner.work(job("classify", prescreened=ps, roi=roi), threading.Event(), lambda m: None)
    np.testing.assert_array_equal(done.result.coords, ps.grid.coords)  # the pre-screen reused
    other = runner.work(job("classify", prescreened=ps, roi=None), threading.Event(), lambda m: None)
    assert other.result.n_patches > ps.n_patches and other.result.roi is None  # ROI dropped: screened again
