"""Opening annotation files in napari (issue 17): QuPath GeoJSON and ASAP XML become the annotation
Shapes layer in µm on the open slide's scale, in their class colours, MRXS bounds applied; a file
that is not an annotation file is refused with a message naming it."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from hdmil.errors import HDMILError
from napari_hdmil._annotation_reader import get_annotation_reader, read_annotation_file, slide_layer_for
from napari_hdmil._layers import EXCLUSION_COLOR, UNITS

TUMOR = (200, 0, 0)


def _slide_layer(name="s1", mpp=0.25, bounds=(0, 0)):
    from napari.layers import Image

    props = {"openslide.bounds-x": str(bounds[0]), "openslide.bounds-y": str(bounds[1])} if any(bounds) else {}
    meta = {"slide_path": f"/slides/{name}.mrxs", "mpp": mpp, "properties": props, "hdmil_slide": True}
    return Image(np.zeros((8, 8, 3), np.uint8), rgb=True, scale=(mpp, mpp), name=name, metadata=meta)


def _geojson(path):
    outer = [[0, 0], [400, 0], [400, 200], [0, 200], [0, 0]]
    hole = [[100, 50], [200, 50], [200, 150], [100, 150], [100, 50]]
    feat = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [outer, hole]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": list(TUMOR)}}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feat]}))
    return path


def test_qupath_geojson_opens_in_um_on_the_slide_with_its_bounds_and_colour(tmp_path):
    path = _geojson(tmp_path / "s1.geojson")
    assert get_annotation_reader(str(path)) is read_annotation_file
    slide = _slide_layer(mpp=0.25, bounds=(1000, 600))
    (data, kwargs, kind), = read_annotation_file(str(path), slide_layer=slide)
    assert kind == "shapes" and kwargs["units"] == UNITS and len(data) == 2  # outline and hole
    # QuPath's (0, 0) is OpenSlide's bounds: level-0 px = QuPath px + (1000, 600); µm = px * mpp
    xy = np.array([[0, 0], [400, 0], [400, 200], [0, 200]], float) + (1000, 600)
    got = {tuple(p) for p in np.round(data[0], 6).tolist()}
    assert got == {tuple(p) for p in (xy[:, ::-1] * 0.25).tolist()}
    np.testing.assert_allclose(kwargs["edge_color"][0], (*np.array(TUMOR) / 255, 1.0))
    feats = kwargs["features"]
    assert feats["classification"] == ["Tumor", "Tumor"] and feats["hole"] == [False, True]
    meta = kwargs["metadata"]
    assert meta["annotations"].frame == "level0" and meta["slide_path"] == "/slides/s1.mrxs"
    assert meta["annotations"].items[0].geometry.bounds == (1000.0, 600.0, 1400.0, 800.0)


def test_asap_xml_goes_on_the_slide_of_its_stem_with_exclusions(tmp_path):
    from napari.components import LayerList

    xml = """<?xml version="1.0"?><ASAP_Annotations><Annotations>
      <Annotation Name="A0" Type="Polygon" PartOfGroup="Tumor" Color="#F4FA58"><Coordinates>
        <Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="800" Y="0"/>
        <Coordinate Order="2" X="800" Y="800"/><Coordinate Order="3" X="0" Y="800"/></Coordinates></Annotation>
      <Annotation Name="A1" Type="Polygon" PartOfGroup="_2"><Coordinates>
        <Coordinate Order="0" X="100" Y="100"/><Coordinate Order="1" X="200" Y="100"/>
        <Coordinate Order="2" X="200" Y="200"/></Coordinates></Annotation>
    </Annotations></ASAP_Annotations>"""
    path = tmp_path / "tumor_001.xml"
    path.write_text(xml)
    assert get_annotation_reader([str(path)]) is read_annotation_file
    mine, other = _slide_layer("tumor_001", mpp=0.243), _slide_layer("tumor_002", mpp=0.5)
    layers = LayerList([mine, other])
    layers.selection.active = other
    assert slide_layer_for(path, layers) is mine  # the same stem wins over the selection
    (data, kwargs, _), = read_annotation_file(path, slide_layer=mine)
    np.testing.assert_allclose(np.ptp(data[0], axis=0), [800 * 0.243, 800 * 0.243])  # ASAP: no offset
    assert kwargs["features"]["exclusion"] == [False, True]
    np.testing.assert_allclose(kwargs["edge_color"][0][:3], np.array((0xF4, 0xFA, 0x58)) / 255)
    np.testing.assert_allclose(kwargs["edge_color"][1][:3], np.array(EXCLUSION_COLOR) / 255)
    # no slide of that stem: the selected slide, else the only one, else none
    unrelated = tmp_path / "notes.xml"
    unrelated.write_text(xml)
    assert slide_layer_for(unrelated, layers) is other
    layers.selection.clear()
    assert slide_layer_for(unrelated, layers) is None
    assert slide_layer_for(unrelated, LayerList([mine])) is mine


@pytest.mark.parametrize("name, text, why", [
    ("config.xml", "<settings><a>1</a></settings>", "no ASAP polygon annotation"),
    ("broken.xml", "<ASAP_Annotations><Annotations>", "not valid XML"),
    ("points.geojson", json.dumps({"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
                                   "properties": {}}), "no annotation with an area"),
    ("table.geojson", json.dumps({"rows": [1, 2]}), "not GeoJSON annotations"),
    ("text.geojson", "hello", "neither GeoJSON nor ASAP XML"),
])
def test_a_file_that_is_not_an_annotation_file_is_refused_saying_why(tmp_path, name, text, why):
    path = tmp_path / name
    path.write_text(text)
    with pytest.warns(UserWarning) as seen:
        assert get_annotation_reader(str(path)) is None
    msg = str(seen[0].message)
    assert str(path) in msg and why in msg and "QuPath GeoJSON and ASAP XML" in msg


def test_other_files_and_no_slide(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not ours: no word said
        assert get_annotation_reader(str(tmp_path / "slide.svs")) is None
        assert get_annotation_reader(str(tmp_path / "missing.geojson")) is None
        assert get_annotation_reader([str(tmp_path / "a.xml"), str(tmp_path / "b.xml")]) is None
    path = _geojson(tmp_path / "lonely.geojson")
    with pytest.raises(HDMILError, match="lonely.geojson: open its slide first"):
        read_annotation_file(path, slide_layer=None)
    no_mpp = _slide_layer(mpp=1.0)
    no_mpp.metadata = {**no_mpp.metadata, "mpp": None}
    (_, kwargs, _), = read_annotation_file(path, slide_layer=no_mpp)
    assert "units" not in kwargs  # a slide shown in pixels: its annotations too
