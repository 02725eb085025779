"""Annotations (issue 17): QuPath GeoJSON and ASAP XML import, our export's round trip, napari
Shapes in µm, OpenSlide's bounds offset, and --roi / --exclude restricting a run's patches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hdmil.annotations import (
    AnnotationError, Annotations, parse_geojson, read_annotations, restrict_grid,
    shapes_to_annotations, write_geojson,
)
from hdmil.checkpoint import load_model, save_checkpoint
from hdmil.cli import main
from hdmil.models import DMIN, DMINConfig
from helpers import TINY, random_lipn

PATCH = 256  # level-0 px of a patch at 0.5 µm/px and 20x


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(geometry, name="Tumor", color=(200, 0, 0), kind="annotation", **props):
    return {"type": "Feature", "geometry": geometry,
            "properties": {"objectType": kind, "classification": {"name": name, "color": list(color)}, **props}}


HOLED = {"type": "Polygon", "coordinates": [_square(0, 0, 100, 100), _square(25, 25, 75, 75)]}
MULTI = {"type": "MultiPolygon", "coordinates": [[_square(200, 0, 210, 10)], [_square(300, 0, 320, 20)]]}


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 2048 x 1536 px synthetic slide at 0.5 µm/px with a tumour, and its ground truth."""
    from hdmil.synth import synth_slide

    path = tmp_path_factory.mktemp("ann") / "ann.tiff"
    truth = synth_slide(path, size=(2048, 1536), seed=3, tumor_fraction=0.3)
    return path, truth


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    lipn = random_lipn()  # this test needs a kept set with and without annotation
    modules = {"dmin": DMIN(DMINConfig(in_dim=8, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3)),
               "lipn": lipn}
    return save_checkpoint(tmp_path_factory.mktemp("ann_ckpt") / "tiny.safetensors", modules,
                           {"classes": ["normal", "tumor"], "encoder": TINY})


# --------------------------------------------------------------------------- QuPath GeoJSON


def test_qupath_geojson_in_all_three_top_level_shapes(tmp_path):
    features = [
        _feature(HOLED),
        _feature(MULTI, name="Stroma", color=(0, 150, 0), kind="detection", measurements={"area": 3.5}),
        _feature({"type": "Point", "coordinates": [5, 5]}),
    ]
    layouts = {"collection": {"type": "FeatureCollection", "features": features},
               "array": features, "single": features[0]}
    for name, doc in layouts.items():
        path = tmp_path / f"{name}.geojson"
        path.write_text(json.dumps(doc))
        ann = read_annotations(path)
        assert ann.frame == "qupath" and ann.format == "geojson" and len(ann.sha256) == 64
        first = ann.items[0]
        assert first.geometry.area == 100 * 100 - 50 * 50  # the hole is cut out
        assert first.classification == "Tumor" and first.color == (200, 0, 0)
        assert first.object_type == "annotation"
        if name != "single":
            assert len(ann) == 2 and ann.skipped == ("annotation 2: a Point has no area; skipped",)
            multi = ann.items[1]
            assert multi.geometry.geom_type == "MultiPolygon" and multi.geometry.area == 100 + 400
            assert multi.object_type == "detection" and multi.classification == "Stroma"
            assert multi.color == (0, 150, 0) and multi.measurements == {"area": 3.5}
    assert read_annotations(tmp_path / "collection.geojson").select(["stroma"]).items[0].index == 1


def test_invalid_polygons_are_repaired_or_refused_by_index(tmp_path):
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    doc = {"type": "FeatureCollection", "features": [_feature(HOLED), _feature(bowtie)]}
    ann = parse_geojson(doc, "t.geojson")
    assert ann.items[1].geometry.is_valid and ann.items[1].geometry.area == pytest.approx(50)
    with pytest.raises(AnnotationError, match=r"t.geojson: annotation 1 is not a valid polygon"):
        parse_geojson(doc, "t.geojson", repair=False)
    flat = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [20, 0], [0, 0]]]}
    with pytest.raises(AnnotationError, match=r"t.geojson: annotation 1 has no area"):
        parse_geojson([_feature(HOLED), _feature(flat)], "t.geojson")
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="bad.geojson: neither GeoJSON nor ASAP XML"):
        read_annotations(bad)
    with pytest.raises(AnnotationError, match="missing.xml: cannot read the annotation file"):
        read_annotations(tmp_path / "missing.xml")


def test_our_export_round_trips_with_the_bounds_offset(tmp_path):
    doc = [_feature(HOLED, measurements={"attention": 0.25}),
           _feature(MULTI, name="Stroma", color=(0, 150, 0), kind="detection")]
    ann = parse_geojson(doc, "in.geojson")
    mrxs = {"openslide.bounds-x": "1000", "openslide.bounds-y": "2000"}
    level0 = ann.for_slide(mrxs)
    assert level0.frame == "level0"
    assert level0.items[0].geometry.bounds == (1000.0, 2000.0, 1100.0, 2100.0)  # QuPath's origin moved
    out = write_geojson(tmp_path / "out.geojson", level0, slide=mrxs)
    written = json.loads(out.read_text())
    assert written["features"][0]["geometry"]["coordinates"][0][0] == [0.0, 0.0]  # back in QuPath's frame
    back = read_annotations(out).for_slide(mrxs)
    assert back.items == level0.items  # geometry, class, colour, object type, measurements
    assert ann.for_slide({}).items == ann.items  # no bounds: no offset


# --------------------------------------------------------------------------- ASAP XML


def _asap_xml(polygons: list[tuple[str, np.ndarray]]) -> str:
    """Camelyon16's layout: one Annotation per polygon, its group, its ordered coordinates."""
    parts = ['<?xml version="1.0"?>\n<ASAP_Annotations>\n<Annotations>']
    for i, (group, ring) in enumerate(polygons):
        parts.append(f'<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">'
                     "<Coordinates>")
        parts += [f'<Coordinate Order="{k}" X="{x:.1f}" Y="{y:.1f}" />' for k, (x, y) in enumerate(ring)]
        parts.append("</Coordinates></Annotation>")
    parts.append('</Annotations>\n<AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#FF0000">'
                 "<Attributes /></Group></AnnotationGroups>\n</ASAP_Annotations>")
    return "\n".join(parts)


def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def test_asap_xml_from_the_synthetic_tumour_truth(slide, tmp_path):
    _, truth = slide
    ring = np.asarray(truth.truth_geojson()["features"][0]["geometry"]["coordinates"][0])
    x0, y0 = ring.mean(axis=0)
    cut = np.array(_square(x0 - 20, y0 - 20, x0 + 20, y0 + 20), float)  # inside the tumour
    path = tmp_path / "tumor.xml"
    path.write_text(_asap_xml([("_0", ring[:-1]), ("_2", cut[:-1])]))
    ann = read_annotations(path)
    assert ann.format == "asap" and ann.frame == "level0" and len(ann) == 2
    assert [a.exclusion for a in ann] == [False, True] and ann.items[0].color == (0xF4, 0xFA, 0x58)
    assert ann.region().area == pytest.approx(_shoelace(ring) - 40 * 40, rel=1e-6)
    assert ann.for_slide({"openslide.bounds-x": "7"}).items == ann.items  # ASAP is OpenSlide's frame


# --------------------------------------------------------------------------- napari Shapes


def test_shapes_in_micrometres_become_level0_polygons():
    rect = np.array([[100.0, 50.0], [100.0, 150.0], [200.0, 150.0], [200.0, 50.0]])  # (y, x) µm
    ellipse = np.array([[0.0, 0.0], [0.0, 40.0], [20.0, 40.0], [20.0, 0.0]])
    path = np.array([[0.0, 0.0], [5.0, 5.0]])
    ann = shapes_to_annotations([rect, ellipse, path], ["rectangle", "ellipse", "path"], mpp=0.5,
                                translate=(10.0, 0.0))
    assert ann.items[0].geometry.bounds == (100.0, 220.0, 300.0, 420.0)  # (x, y) px = µm / 0.5
    assert ann.items[1].geometry.area == pytest.approx(math.pi * 40 * 20, rel=0.01)
    assert ann.skipped == ("shape 2: a path has no area; skipped",)


# --------------------------------------------------------------------------- restricting a run


def _share(coords: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The share of each 256 px patch inside an axis-aligned box, by hand (not shapely)."""
    x0, y0, x1, y1 = box
    ox = np.clip(np.minimum(coords[:, 0] + PATCH, x1) - np.maximum(coords[:, 0], x0), 0, None)
    oy = np.clip(np.minimum(coords[:, 1] + PATCH, y1) - np.maximum(coords[:, 1], y0), 0, None)
    return ox * oy / PATCH**2


def _write_box(path: Path, box: tuple[int, int, int, int]) -> Path:
    path.write_text(json.dumps(_feature({"type": "Polygon", "coordinates": [_square(*box)]})))
    return path


ROI_BOX = (400, 300, 1500, 1100)
EXCLUDE_BOX = (700, 500, 1100, 900)


def test_restrict_grid_keeps_patches_inside_by_the_tissue_threshold(slide, ckpt):
    from hdmil.pipeline import prescreen

    path, _ = slide
    model = load_model(ckpt)
    full = prescreen(path, model)
    roi = parse_geojson(_feature({"type": "Polygon", "coordinates": [_square(*ROI_BOX)]}), "roi")
    ps = prescreen(path, model, roi=roi)
    share = _share(full.coords, ROI_BOX)
    expected = full.coords[share >= full.grid.tissue_threshold]
    assert 0 < len(ps.coords) < len(full.coords)
    np.testing.assert_array_equal(ps.coords, expected)
    assert ps.roi["n_tissue_patches"] == full.n_patches and ps.roi["n_patches_inside"] == len(expected)
    assert ps.roi["area_mm2"] == pytest.approx(1100 * 800 * 0.25 / 1e6)
    grid, info = restrict_grid(full.grid, exclude=roi)
    assert info["n_patches_inside"] == int((share <= 0.75).sum()) and info["exclude_area_mm2"] > 0


def test_cli_roi_and_exclude(slide, ckpt, tmp_path, capsys):
    path, _ = slide
    roi, exclude = _write_box(tmp_path / "roi.geojson", ROI_BOX), _write_box(tmp_path / "ex.geojson", EXCLUDE_BOX)
    base = ["predict", str(path), "--model", str(ckpt), "--batch-size", "16", "--no-lipn"]
    runs = {"all": [], "roi": ["--roi", str(roi)], "both": ["--roi", str(roi), "--exclude", str(exclude)]}
    coords, reports = {}, {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert main([*base, "--out", str(out), *extra]) == 0, capsys.readouterr().err
        with h5py.File(out / path.stem / "patches.h5") as f:
            coords[name] = f["coords"][:]
        reports[name] = json.loads((out / path.stem / "report.json").read_text())
    share = _share(coords["all"], ROI_BOX)
    np.testing.assert_array_equal(coords["roi"], coords["all"][share >= 0.25])  # only those inside
    allowed = share - _share(coords["all"], EXCLUDE_BOX)  # the exclusion box lies inside the ROI
    np.testing.assert_array_equal(coords["both"], coords["all"][allowed >= 0.25])
    assert len(coords["both"]) < len(coords["roi"])
    report = reports["roi"]
    assert report["roi"]["file"] == str(roi) and report["roi"]["n_patches_inside"] == report["n_patches"]
    assert report["roi"]["area_mm2"] == pytest.approx(0.22)
    assert reports["all"]["roi"] is None and reports["all"]["run_key"]["roi"] is None
    assert report["run_key"]["roi"]["roi"]["sha256"] == read_annotations(roi).sha256
    assert reports["both"]["roi"]["exclude"] == str(exclude)


def test_cli_roi_outside_the_slide_and_missing_files(slide, ckpt, tmp_path, capsys):
    path, _ = slide
    far = _write_box(tmp_path / "far.geojson", (90000, 90000, 91000, 91000))
    base = ["predict", str(path), "--model", str(ckpt), "--out", str(tmp_path / "o"), "--prescreen-only"]
    assert main([*base, "--roi", str(far)]) == 1
    err = capsys.readouterr().err
    assert "lies inside the ROI" in err and "far.geojson" in err and "none of its" in err
    assert main([*base, "--roi", str(tmp_path / "{slide}.xml")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / (path.stem + '.xml')}: cannot read the annotation file" in err
    assert isinstance(read_annotations(far), Annotations)


def test_batch_roi_dir_one_file_per_slide_and_resume(slide, ckpt, tmp_path):
    from hdmil.batch import process_slide, run_batch

    path, _ = slide
    rois, out = tmp_path / "rois", tmp_path / "out"
    rois.mkdir()
    _write_box(rois / f"{path.stem}.geojson", ROI_BOX)
    row = process_slide(str(path), str(out), str(ckpt), use_lipn=False, roi_dir=str(rois))
    assert row["status"] == "ok", row
    report = json.loads((out / path.stem / "report.json").read_text())
    assert report["roi"]["file"] == str(rois / f"{path.stem}.geojson")
    assert report["n_patches"] == report["roi"]["n_patches_inside"] < report["roi"]["n_tissue_patches"]
    # Same ROI file: done, skipped without a task (no cluster is started); another ROI: recomputed.
    summary = run_batch([path], out, model_path=ckpt, use_lipn=False, roi_dir=rois)
    assert [r["status"] for r in summary.rows] == ["skipped"]
    _write_box(rois / f"{path.stem}.geojson", EXCLUDE_BOX)
    row = process_slide(str(path), str(out), str(ckpt), use_lipn=False, roi_dir=str(rois))
    assert row["status"] == "ok" and "recomputed" in row["note"] and "roi" in row["note"]
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = run_batch([path], tmp_path / "out2", model_path=ckpt, use_lipn=False, roi_dir=empty)
    assert failed.rows[0]["status"] == "failed"
    assert failed.rows[0]["error"] == (f"{empty}: no annotation file for slide {path.stem} "
                                       f"({path.stem}.geojson, {path.stem}.json, {path.stem}.xml)")


# --------------------------------------------------------------------------- evaluate-annotations


def _truth_xml(truth, square: tuple[int, int, int, int]) -> tuple[str, np.ndarray]:
    """ASAP XML of the tumour mask traced exactly (pixel edges), with one ``_2`` exclusion square
    (coarse pixels); and that mask with the square cut out, the oracle."""
    import shapely

    ds = truth.mask_downsample
    mask = truth.tumor_mask.copy()
    r, c = np.nonzero(mask)
    union = shapely.union_all(shapely.box(c * ds, r * ds, (c + 1) * ds, (r + 1) * ds))
    polys = [("_0", np.asarray(p.exterior.coords)[:-1]) for p in getattr(union, "geoms", [union])]
    polys += [("_2", np.asarray(h.coords)[:-1]) for p in getattr(union, "geoms", [union]) for h in p.interiors]
    r0, c0, r1, c1 = square
    mask[r0:r1, c0:c1] = False
    polys.append(("_2", np.array(_square(c0 * ds, r0 * ds, c1 * ds, r1 * ds), float)[:-1]))
    return _asap_xml(polys), mask


def _mask_fraction(mask: np.ndarray, coords: np.ndarray, ds: int) -> np.ndarray:
    n = PATCH // ds
    return np.array([mask[y // ds:y // ds + n, x // ds:x // ds + n].mean() for x, y in coords])


def test_evaluate_annotations_equals_the_ground_truth_mask(slide, ckpt, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    from hdmil.synth import synth_slide

    path, truth = slide
    normal = tmp_path / "normal.tiff"
    synth_slide(normal, size=(1024, 1024), seed=5, tumor_fraction=0.0)
    out, ann_dir = tmp_path / "results", tmp_path / "annotations"
    assert main(["predict", str(path), str(normal), "--model", str(ckpt), "--out", str(out),
                 "--batch-size", "16"]) == 0, capsys.readouterr().err
    r, c = np.argwhere(truth.tumor_mask)[len(np.argwhere(truth.tumor_mask)) // 2]
    xml, oracle = _truth_xml(truth, (r - 2, c - 2, r + 2, c + 2))
    ann_dir.mkdir()
    (ann_dir / f"{path.stem}.xml").write_text(xml)  # Camelyon16's layout; no file for the normal slide
    assert read_annotations(ann_dir / f"{path.stem}.xml").region().area == oracle.sum() * 16 * 16
    csv_path = tmp_path / "eval.csv"
    assert main(["evaluate-annotations", "--results", str(out), "--annotations", str(ann_dir),
                 "--class", "tumor", "--out", str(csv_path)]) == 0
    printed = capsys.readouterr().out
    with h5py.File(out / path.stem / "patches.h5") as f:
        coords, kept, scores = f["coords"][:], f["kept"][:], f["scores"][:, 1]
    annotated = _mask_fraction(oracle, coords, truth.mask_downsample) >= 0.5
    scored = np.isfinite(scores)
    import csv

    rows = {row["slide"]: row for row in csv.DictReader(csv_path.open())}
    assert set(rows) == {path.stem, "normal"} and "cohort" in printed
    tumour = rows[path.stem]
    assert int(tumour["n_annotated"]) == annotated.sum() > 0
    assert float(tumour["lipn_recall"]) == pytest.approx((annotated & kept).sum() / annotated.sum())
    assert float(tumour["attention_auc"]) == pytest.approx(roc_auc_score(annotated[scored], scores[scored]))
    assert rows["normal"]["has_annotation"] == "False" and rows["normal"]["n_annotated"] == "0"
    assert rows["normal"]["lipn_recall"] == "" and rows["normal"]["attention_auc"] == ""
    for col in ("slide", "n_patches", "n_annotated", "lipn_recall", "attention_auc", "topk_precision"):
        assert col in tumour


def test_a_shapes_layer_in_micrometres_and_qupath_bounds_restrict_a_run(slide, ckpt):
    from hdmil.pipeline import prescreen
    from hdmil.slide import open_slide

    path, _ = slide
    model = load_model(ckpt)
    x0, y0, x1, y1 = ROI_BOX
    rect_um = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float) * 0.5  # (y, x) µm at 0.5 µm/px
    shapes = shapes_to_annotations([rect_um], "rectangle", mpp=0.5)
    level0 = parse_geojson(_feature({"type": "Polygon", "coordinates": [_square(*ROI_BOX)]}), "roi").for_slide({})
    expected = prescreen(path, model, roi=level0).coords
    np.testing.assert_array_equal(prescreen(path, model, roi=shapes).coords, expected)
    # An MRXS-style slide: QuPath's coordinates are relative to OpenSlide's bounds.
    qupath = parse_geojson(_feature({"type": "Polygon", "coordinates": [_square(x0 - 300, y0 - 200, x1 - 300, y1 - 200)]}))
    with open_slide(path) as s:
        s.properties.update({"openslide.bounds-x": "300", "openslide.bounds-y": "200"})
        np.testing.assert_array_equal(prescreen(s, model, roi=qupath).coords, expected)


def test_evaluate_annotations_refuses_a_class_the_model_lacks(slide, ckpt, tmp_path, capsys):
    path, _ = slide
    out = tmp_path / "results"
    ann = tmp_path / "ann"
    ann.mkdir()
    argv = ["evaluate-annotations", "--results", str(out), "--annotations", str(ann)]
    assert main(argv) == 1
    assert f"{out}: no results" in capsys.readouterr().err
    assert main(["predict", str(path), "--model", str(ckpt), "--out", str(out), "--no-lipn"]) == 0
    assert main([*argv, "--class", "stroma"]) == 1
    assert "have no 'stroma' (--class)" in capsys.readouterr().err
    assert main([*argv, "--min-overlap", "0"]) == 1
    assert "--min-overlap must be in (0, 1]" in capsys.readouterr().err


def test_older_qupath_and_asap_spellings():
    from hdmil.annotations import parse_asap_xml

    old = {"type": "Feature", "id": "PathDetectionObject",
           "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 10, 10)]},
           "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016},
                          "measurements": [{"name": "Area", "value": 100.0}]}}
    a = parse_geojson(old).items[0]
    assert a.object_type == "detection" and a.color == (200, 0, 0) and a.measurements == {"Area": 100.0}
    xml = ('<ASAP_Annotations><Annotations><Annotation Name="A" Type="Polygon" PartOfGroup="Tumor">'
           '<Coordinates><Coordinate Order="2" X="10,5" Y="10" /><Coordinate Order="0" X="0" Y="0" />'
           '<Coordinate Order="1" X="10,5" Y="0" /><Coordinate Order="3" X="0" Y="10" /></Coordinates>'
           '</Annotation><Annotation Name="B" Type="Dot" PartOfGroup="Tumor"><Coordinates>'
           '<Coordinate Order="0" X="1" Y="1" /></Coordinates></Annotation></Annotations></ASAP_Annotations>')
    ann = parse_asap_xml(xml, "c.xml")
    assert ann.items[0].geometry.area == pytest.approx(105.0)  # decimal commas, points in Order
    assert ann.skipped == ("annotation 1: a Dot has no area; skipped",)
    with pytest.raises(AnnotationError, match="c.xml: annotation 0 has 2 points; a polygon needs 3"):
        parse_asap_xml(xml.replace('<Coordinate Order="3" X="0" Y="10" />', "").replace(
            '<Coordinate Order="2" X="10,5" Y="10" />', ""), "c.xml")
