"""Export: atomic writes, JSON reports, CSV and QuPath GeoJSON in level-0 coordinates, and the
one CSV / GeoJSON layout of a pipeline Result."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from hdmil.errors import HDMILError
from hdmil.export import (
    atomic_write,
    check_result_paths,
    result_csv_columns,
    result_patch_values,
    slide_path_template,
    tissue_outlines,
    tissue_polygons,
    to_jsonable,
    write_csv,
    write_geojson,
    write_json_atomic,
    write_result_csv,
    write_result_files,
    write_result_geojson,
)
from hdmil.grid import PatchGrid, build_grid
from hdmil.slide import open_slide


@pytest.fixture(scope="module")
def cmu_grid(cmu_slide):
    with open_slide(cmu_slide) as slide:
        return build_grid(slide)


def _grid_from_mask(mask: np.ndarray, ps0: int = 64, threshold: float = 0.25) -> PatchGrid:
    """A PatchGrid around a hand-made LR mask (16 LR px per patch)."""
    rows, cols = mask.shape[0] // 16, mask.shape[1] // 16
    cell = mask.reshape(rows, 16, cols, 16).mean(axis=(1, 3))
    index = np.argwhere(cell >= threshold).astype(np.int64)
    return PatchGrid(
        coords=index[:, ::-1] * ps0,
        index=index,
        shape=(rows, cols),
        patch_size_level0=ps0,
        mpp=0.5,
        tissue_fraction=cell[cell >= threshold].astype(np.float32),
        mask=mask,
        lr_image=np.zeros(mask.shape + (3,), np.uint8),
        dimensions=(cols * ps0, rows * ps0),
    )


# ---------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "report.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write('{"half": ')
            raise RuntimeError("crash mid-way")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "scores.csv"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, "wb") as fh:
            fh.write(b"new, partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    with atomic_write(target) as fh:
        fh.write("new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


def test_atomic_write_permissions_and_dirs(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    with atomic_write(target) as fh:
        fh.write("x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(target, "a"):
            pass


def test_write_json_atomic_converts_numpy(tmp_path):
    obj = {
        "probabilities": np.array([0.25, 0.75], np.float32),
        "n": np.int64(7),
        "kept": np.bool_(True),
        "nan": float("nan"),
        "path": tmp_path,
        "nested": ({"inf": np.float64("inf")},),
    }
    path = write_json_atomic(tmp_path / "r.json", obj)
    back = json.loads(path.read_text())
    assert back["probabilities"] == [0.25, 0.75] and back["n"] == 7 and back["kept"] is True
    assert back["nan"] is None and back["nested"] == [{"inf": None}]
    assert back["path"] == str(tmp_path)
    with pytest.raises(TypeError, match="object"):
        to_jsonable(object())


# ---------------------------------------------------------------------------------------------
# CSV


def test_write_csv_from_grid(tmp_path, cmu_grid):
    n = cmu_grid.n
    att = np.linspace(0, 1, n)
    att[0] = np.nan
    probs = np.stack([att, 1 - att], 1)
    path = write_csv(tmp_path / "s.csv", cmu_grid, {"attention": att, "p": probs, "kept": att > 0.5})
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["x", "y", "row", "col", "tissue_fraction", "attention", "p_0", "p_1", "kept"]
    assert len(rows) == n + 1
    body = rows[1:]
    assert [int(r[0]) for r in body] == cmu_grid.coords[:, 0].tolist()
    assert [int(r[3]) for r in body] == cmu_grid.index[:, 1].tolist()
    assert body[0][5] == ""  # NaN: an empty cell
    np.testing.assert_allclose([float(r[5]) for r in body[1:]], att[1:])
    np.testing.assert_allclose([float(r[7]) for r in body[1:]], 1 - att[1:])


def test_write_csv_from_coords_and_bad_columns(tmp_path):
    coords = np.array([[0, 0], [256, 512]])
    path = write_csv(tmp_path / "c.csv", coords, {"score": [0.5, 2]})
    assert path.read_text().splitlines() == ["x,y,score", "0,0,0.5", "256,512,2.0"]
    with pytest.raises(ValueError, match="score"):
        write_csv(tmp_path / "bad.csv", coords, {"score": [1, 2, 3]})
    assert not (tmp_path / "bad.csv").exists()


# ---------------------------------------------------------------------------------------------
# GeoJSON


def _all_points(feature):
    return [pt for ring in feature["geometry"]["coordinates"] for pt in ring]


QUPATH_KEEPS = {"objectType", "classification", "name", "isLocked", "measurements"}


def _assert_qupath_keeps_every_number(features):
    """What QuPath's importer keeps of a Feature's properties (docs/ECOSYSTEM: objectType,
    classification, name, isLocked, and measurements as a flat name -> number object): every
    number we write must sit there, or QuPath drops it."""
    for f in features:
        props = f["properties"]
        assert set(props) <= QUPATH_KEEPS, set(props) - QUPATH_KEEPS
        meas = props.get("measurements", {})
        assert isinstance(meas, dict)
        assert all(isinstance(k, str) and type(v) in (int, float) for k, v in meas.items()), meas


def test_geojson_of_cmu(tmp_path, cmu_grid):
    grid = cmu_grid
    w, h = grid.dimensions
    att = np.linspace(0, 1, grid.n)
    att[1] = np.nan
    path = write_geojson(tmp_path / "s.geojson", grid, {"attention": att}, top_k={"attention": 5})
    doc = json.loads(path.read_text())  # valid JSON (no NaN tokens)
    assert doc["type"] == "FeatureCollection"
    feats = doc["features"]
    tissue = [f for f in feats if f["properties"].get("classification", {}).get("name") == "Tissue"]
    tiles = [f for f in feats if f["properties"]["objectType"] == "tile"]
    top = [f for f in feats if f["properties"].get("name", "").startswith("Top ")]
    assert len(tissue) == len(tissue_outlines(grid)) >= 1
    assert len(tiles) == grid.n and len(top) == 5
    assert len(feats) == len(tissue) + len(tiles) + len(top)
    for f in feats:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4  # closed
        pts = np.array(_all_points(f))
        # tissue ends at the slide's edge; a padded patch's square runs past it, to the grid's edge
        ps = grid.patch_size_level0
        gw, gh = (w, h) if f in tissue else (grid.shape[1] * ps, grid.shape[0] * ps)
        assert (pts >= 0).all() and (pts[:, 0] <= gw).all() and (pts[:, 1] <= gh).all()
    over = [f for f in tiles if np.array(_all_points(f))[:, 1].max() > h]
    assert len(over) == grid.n_padded > 0
    # Patch squares at level-0 scale: corners are coords and coords + patch_size_level0.
    s = grid.patch_size_level0
    for f, (x, y), (r, c) in zip(tiles, grid.coords.tolist(), grid.index.tolist()):
        ring = np.array(f["geometry"]["coordinates"][0])
        assert ring[:, 0].min() == x and ring[:, 0].max() == x + s
        assert ring[:, 1].min() == y and ring[:, 1].max() == y + s
        assert (f["properties"]["measurements"]["row"], f["properties"]["measurements"]["col"]) == (r, c)
    assert "attention" not in tiles[1]["properties"]["measurements"]  # NaN left out
    assert tiles[2]["properties"]["measurements"]["attention"] == pytest.approx(att[2])
    # Top-k: the 5 highest attentions, best first.
    best = np.argsort(-np.nan_to_num(att, nan=-1))[:5]
    assert [f["properties"]["measurements"]["rank"] for f in top] == [1, 2, 3, 4, 5]
    assert [f["properties"]["measurements"]["row"] for f in top] == grid.index[best, 0].tolist()
    assert [f["properties"]["measurements"]["col"] for f in top] == grid.index[best, 1].tolist()
    assert [f["properties"]["measurements"]["attention"] for f in top] == pytest.approx(att[best])
    _assert_qupath_keeps_every_number(feats)
    # Tissue outlines span the tissue at level-0 scale (not LR pixels).
    pts = np.array([p for f in tissue for p in _all_points(f)])
    ys, xs = np.nonzero(grid.mask)
    scale = s / 16
    assert pts[:, 0].min() == pytest.approx(xs.min() * scale, abs=scale)
    assert pts[:, 1].max() == pytest.approx((ys.max() + 1) * scale, abs=scale)


def test_geojson_switches_and_errors(tmp_path, cmu_grid):
    only_tissue = write_geojson(tmp_path / "t.geojson", cmu_grid, include_patches=False)
    feats = json.loads(only_tissue.read_text())["features"]
    assert feats and all(f["properties"]["objectType"] == "annotation" for f in feats)
    only_tiles = write_geojson(tmp_path / "p.geojson", cmu_grid, include_tissue=False)
    assert len(json.loads(only_tiles.read_text())["features"]) == cmu_grid.n
    with pytest.raises(ValueError, match="score"):
        write_geojson(tmp_path / "x.geojson", cmu_grid, {"score": np.ones(cmu_grid.n + 2)})
    with pytest.raises(ValueError, match="needs patch_values"):
        write_geojson(tmp_path / "x.geojson", cmu_grid, top_k={"score": 3})
    assert not (tmp_path / "x.geojson").exists()
    # Explicit indices as top-k.
    path = write_geojson(tmp_path / "k.geojson", cmu_grid, include_tissue=False, include_patches=False,
                         top_k={"picked": [2, 0]})
    top = json.loads(path.read_text())["features"]
    assert [tuple(f["geometry"]["coordinates"][0][0]) for f in top] == [
        tuple(cmu_grid.coords[2]), tuple(cmu_grid.coords[0])
    ]
    assert [f["properties"]["measurements"] for f in top] == [  # nothing to rank by: no value
        {"row": int(cmu_grid.index[i, 0]), "col": int(cmu_grid.index[i, 1]), "rank": k}
        for k, i in ((1, 2), (2, 0))
    ]


def test_tissue_polygons_square_with_hole():
    mask = np.zeros((64, 64), bool)
    mask[8:40, 16:56] = True  # tissue: rows 8..39, cols 16..55
    mask[20:28, 30:40] = False  # a hole
    mask[50:54, 4:8] = True  # a separate island
    grid = _grid_from_mask(mask, ps0=64)  # 4 level-0 px per LR px
    polys = tissue_outlines(grid, tolerance=0)
    assert len(polys) == 2
    flat = tissue_polygons(grid, tolerance=0)
    assert len(flat) == 3 and all(r.ndim == 2 and r.shape[1] == 2 for r in flat)
    big = max(polys, key=lambda p: len(p[0]))
    assert len(big) == 2  # exterior + one hole
    ext, hole = big
    for ring in (ext, hole):
        np.testing.assert_array_equal(ring[0], ring[-1])
    # Outlines run along LR pixel edges (corners cut), scaled to level 0: 4 px per LR px.
    assert (ext[:, 0].min(), ext[:, 0].max()) == (16 * 4, 56 * 4)
    assert (ext[:, 1].min(), ext[:, 1].max()) == (8 * 4, 40 * 4)
    assert (hole[:, 0].min(), hole[:, 0].max()) == (30 * 4, 40 * 4)
    assert (hole[:, 1].min(), hole[:, 1].max()) == (20 * 4, 28 * 4)

    def signed_area(r):
        return 0.5 * np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1])

    assert signed_area(ext) > 0 > signed_area(hole)  # exterior and hole wound opposite ways
    # Area close to the mask's (in level-0 px²), hole subtracted.
    area = signed_area(ext) + signed_area(hole)
    assert area == pytest.approx((32 * 40 - 8 * 10) * 16, rel=0.02)


def test_tissue_polygons_contain_the_mask(cmu_grid):
    from skimage.measure import points_in_poly

    polys = tissue_outlines(cmu_grid)
    assert sum(len(p) for p in polys) == len(tissue_polygons(cmu_grid))
    scale = cmu_grid.patch_size_level0 / 16
    ys, xs = np.mgrid[: cmu_grid.mask.shape[0], : cmu_grid.mask.shape[1]]
    centres = np.stack([(xs.ravel() + 0.5) * scale, (ys.ravel() + 0.5) * scale], 1)
    inside = np.zeros(len(centres), bool)
    for ext, *holes in polys:
        in_piece = points_in_poly(centres, ext)
        for hole in holes:
            in_piece &= ~points_in_poly(centres, hole)
        inside |= in_piece
    truth = cmu_grid.mask.ravel()
    # Only pixels at cut corners and simplified edges may disagree.
    assert (inside == truth).mean() > 0.97
    assert inside[truth].mean() > 0.95 and (~inside[~truth]).mean() > 0.97


def test_empty_grid_exports(tmp_path):
    grid = _grid_from_mask(np.zeros((32, 48), bool))
    doc = json.loads(write_geojson(tmp_path / "e.geojson", grid).read_text())
    assert doc == {"type": "FeatureCollection", "features": []}
    assert write_csv(tmp_path / "e.csv", grid, {"a": np.zeros(0)}).read_text().strip() == (
        "x,y,row,col,tissue_fraction,a"
    )


# ---------------------------------------------------------------------------------------------
# a pipeline Result: the one CSV / GeoJSON layout of the widget and `hdmil predict`


def _result(tissue_fraction: np.ndarray | None = None):
    """4 tissue patches, classes normal / tumor; patch 2 not kept (NaN attention and score),
    patch 3 kept as a neighbour; tumor pools only patches 1 and 3."""
    from hdmil.pipeline import Result

    index = np.array([[0, 0], [0, 1], [1, 1], [2, 0]], np.int64)
    coords = index[:, ::-1] * 64
    grid = PatchGrid.from_coords(coords, 64, (128, 192), 0.5, slide_name="fake")
    if tissue_fraction is not None:
        grid.tissue_fraction = tissue_fraction
    kept = np.array([1, 1, 0, 1], bool)
    mask = np.stack([kept, np.array([0, 1, 0, 1], bool)], 1)
    att = np.array([[0.5, np.nan], [0.2, 0.75], [np.nan, np.nan], [0.3, 0.25]], np.float32)
    scores = np.array([[1.0, 2.0], [-1.0, 0.5], [np.nan, np.nan], [0.0, 3.0]], np.float32)
    return Result(
        slide_name="fake", slide_path=None, classes=["normal", "tumor"], probabilities=np.array([0.4, 0.6]),
        prediction_index=1, coords=coords, grid_index=index, lipn_mask=mask, kept=kept, attention=att,
        scores=scores, features=np.zeros((3, 8), np.float32), feature_index=np.flatnonzero(kept),
        failed=np.zeros(0, np.int64), use_lipn=True, timings={"total": 0.1}, grid=grid, mpp=0.5,
        patch_size_level0=64, neighbour=np.array([0, 0, 0, 1], bool),
    )  # fmt: skip


def test_result_csv_layout(tmp_path):
    r = _result(np.array([0.5, 1.0, 0.75, 0.25], np.float32))
    with open(write_result_csv(tmp_path / "r.csv", r), newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["x", "y", "row", "col", "tissue_fraction", "lipn_keep_normal", "lipn_keep_tumor", "kept",
                       "kept_as_neighbour", "attention_normal", "attention_tumor", "score_normal", "score_tumor"]  # fmt: skip
    assert rows[1] == ["0", "0", "0", "0", "0.5", "1", "0", "1", "0", "0.5", "", "1.0", "2.0"]
    assert rows[3][5:] == ["0", "0", "0", "0", "", "", "", ""]  # not kept: nothing pooled, nothing read
    assert rows[4][5:9] == ["1", "1", "1", "1"]  # kept (by both classes) as a neighbour
    assert list(result_csv_columns(r)) == rows[0][5:]


def test_result_geojson_layout(tmp_path):
    r = _result()  # tissue fraction unknown (NaN), as for a grid read back from a feature file
    doc = json.loads(write_result_geojson(tmp_path / "r.geojson", r, top_k=1).read_text())
    tiles = [f for f in doc["features"] if f["properties"]["objectType"] == "tile"]
    assert [t["properties"]["measurements"] for t in tiles] == [
        {"row": 0, "col": 0, "kept": 1, "attention_normal": 0.5},
        {"row": 0, "col": 1, "kept": 1, "attention_normal": pytest.approx(0.2), "attention_tumor": 0.75},
        {"row": 1, "col": 1, "kept": 0},
        {"row": 2, "col": 0, "kept": 1, "attention_normal": pytest.approx(0.3), "attention_tumor": 0.25},
    ]  # NaN tissue fraction and attention are left out, not written as invalid JSON
    tops = [f["properties"] for f in doc["features"] if f["properties"].get("name", "").startswith("Top")]
    assert [(t["name"], t["measurements"]) for t in tops] == [
        ("Top 1: attention_normal", {"row": 0, "col": 0, "rank": 1, "attention_normal": 0.5}),
        ("Top 1: attention_tumor", {"row": 0, "col": 1, "rank": 1, "attention_tumor": 0.75}),
    ]  # row, col and rank where QuPath keeps them, not as top-level properties it drops
    _assert_qupath_keeps_every_number(doc["features"])
    from hdmil.annotations import parse_geojson  # what an importer reading measurements gets back

    back = parse_geojson(doc, "r.geojson")
    assert [a.measurements for a in back if a.object_type == "tile"][3] == {
        "row": 2.0, "col": 0.0, "kept": 1.0, "attention_normal": pytest.approx(0.3), "attention_tumor": 0.25}
    assert [a.measurements["rank"] for a in back if a.name.startswith("Top")] == [1.0, 1.0]
    assert set(result_patch_values(r)) == {"kept", "attention_normal", "attention_tumor"}
    default = json.loads(write_result_geojson(tmp_path / "d.geojson", r).read_text())["features"]
    assert sum(f["properties"].get("name", "").startswith("Top") for f in default) == 3 + 2  # all pooled


def test_write_result_files_and_slide_paths(tmp_path):
    r = _result()
    written = write_result_files(r, "s1", tmp_path / "{slide}.geojson", tmp_path / "csv" / "{slide}.csv", top_k=1)
    assert written == [tmp_path / "s1.geojson", tmp_path / "csv" / "s1.csv"]
    assert written[0].read_text() == write_result_geojson(tmp_path / "x.geojson", r, top_k=1).read_text()
    assert written[1].read_text() == write_result_csv(tmp_path / "x.csv", r).read_text()
    assert write_result_files(r, "s1") == []
    assert slide_path_template("a/{slide}_{x}.csv", "b") == Path("a/b_{x}.csv")
    check_result_paths(1, geojson="one.geojson", csv=None)
    check_result_paths(3, geojson="{slide}.geojson", csv=None)
    with pytest.raises(HDMILError, match=r"--csv out\.csv: 2 slides would write the same file"):
        check_result_paths(2, geojson="{slide}.geojson", csv="out.csv")


def test_geojson_export_applies_the_mrxs_bounds_offset_and_round_trips(tmp_path):
    """QuPath's (0, 0) on an MRXS is OpenSlide's bounds: the export subtracts them, and
    ``hdmil.annotations`` reading the file for that slide lands every shape on its level-0 place."""
    import dataclasses

    from hdmil.annotations import read_annotations

    mask = np.zeros((48, 64), bool)
    mask[8:40, 10:50] = True
    plain = _grid_from_mask(mask)
    dx, dy = 1234, 5678
    grid = dataclasses.replace(plain, bounds_offset=(dx, dy))
    props = {"openslide.bounds-x": str(dx), "openslide.bounds-y": str(dy)}
    values = {"v": np.arange(grid.n, dtype=np.float64)}
    doc = json.loads(write_geojson(tmp_path / "m.geojson", grid, values, top_k={"v": 2}).read_text())
    ref = json.loads(write_geojson(tmp_path / "p.geojson", plain, values, top_k={"v": 2}).read_text())
    assert len(doc["features"]) == len(ref["features"]) > grid.n
    for got, want in zip(doc["features"], ref["features"]):  # the same shapes, moved by the offset
        assert got["properties"] == want["properties"]
        g = np.asarray(got["geometry"]["coordinates"][0], float)
        np.testing.assert_allclose(g, np.asarray(want["geometry"]["coordinates"][0], float) - (dx, dy))

    back = read_annotations(tmp_path / "m.geojson")
    assert back.frame == "qupath"
    on_slide = back.for_slide(props)
    tiles = [a for a in on_slide if a.object_type == "tile"]
    ps = grid.patch_size_level0
    for a, (x, y) in zip(tiles, grid.coords.tolist()):
        assert a.geometry.bounds == (x, y, x + ps, y + ps)
    tissue = [a for a in on_slide if a.classification == "Tissue"]
    outline = tissue_outlines(plain)[0][0]
    np.testing.assert_allclose(np.asarray(tissue[0].geometry.exterior.coords), outline, atol=0.01)
    top = [a for a in on_slide if a.name.startswith("Top 1")][0]
    x, y = grid.coords[int(np.argmax(values["v"]))]
    assert top.geometry.bounds == (x, y, x + ps, y + ps)
