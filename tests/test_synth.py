"""The synthetic slide and cohort generator: format, determinism, colour, morphology, truth."""

from __future__ import annotations

import csv
import json
import os
import threading

import numpy as np
import pytest
import tifffile
import tiffslide
from scipy import ndimage

from hdmil.errors import Cancelled, HDMILError
from hdmil.synth import Stain, synth_cohort, synth_slide
from hdmil.synth import slide as synth_mod


def _read(path, level=0) -> np.ndarray:
    with tiffslide.TiffSlide(path) as s:
        return np.asarray(s.read_region((0, 0), level, s.level_dimensions[level]).convert("RGB"))


def _up(mask: np.ndarray, ds: int, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(mask, ds, 0), ds, 1)[: shape[0], : shape[1]]


@pytest.fixture(scope="module")
def tumour_slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "t.tiff"
    s = synth_slide(out, size=(2048, 2048), seed=3, tumor_fraction=0.3, workers=1)
    return s, _read(out)


def test_lead_fixture_reads_multilevel_with_mpp(synthetic_slide):
    with tiffslide.TiffSlide(synthetic_slide) as s:
        assert s.dimensions == (4096, 3072)
        assert s.level_count == 2
        assert s.level_downsamples == pytest.approx((1.0, 4.0))
        assert float(s.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
        assert float(s.properties["tiffslide.mpp-y"]) == pytest.approx(0.5)
        assert s.properties["tiffslide.level[0].tile-width"] == 256
    with tifffile.TiffFile(synthetic_slide) as tf:
        assert len(tf.pages) == 2 and not tf.is_ome
        assert all(p.is_tiled and p.compression == 7 for p in tf.pages)  # JPEG
        assert tf.pages[1].subfiletype == 1 and not tf.pages[0].subifds


def test_other_mpp_and_uneven_size(tmp_path):
    out = tmp_path / "s.tiff"
    s = synth_slide(out, size=(1300, 1100), seed=1, mpp=0.25, tumor_fraction=0.1)
    with tiffslide.TiffSlide(out) as ts:
        assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
        assert ts.level_dimensions == ((1300, 1100), (325, 275))
        assert ts.level_downsamples == pytest.approx((1.0, 4.0))
    assert s.level_dimensions == ((1300, 1100), (325, 275))
    # the reduced level is the 4x4 average of level 0 (up to JPEG)
    lv0 = _read(out, 0)[:1100 // 4 * 4, :1300 // 4 * 4].astype(float)
    box = lv0.reshape(275, 4, 325, 4, 3).mean((1, 3))
    assert np.abs(box - _read(out, 1)).mean() < 3.0


def test_openslide_reads_it(tumour_slide):
    openslide = pytest.importorskip("openslide")
    s, pixels = tumour_slide
    with openslide.OpenSlide(str(s.path)) as o:
        assert o.level_count == 2
        assert o.level_downsamples == pytest.approx((1.0, 4.0))
        assert float(o.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        region = np.asarray(o.read_region((512, 512), 0, (256, 256)).convert("RGB"))
    assert np.abs(region.astype(int) - pixels[512:768, 512:768]).mean() < 2.0


def test_same_seed_same_pixels_other_seed_differs(tmp_path):
    a = synth_slide(tmp_path / "a.tiff", size=(1024, 768), seed=11, tumor_fraction=0.2)
    b = synth_slide(tmp_path / "b.tiff", size=(1024, 768), seed=11, tumor_fraction=0.2)
    c = synth_slide(tmp_path / "c.tiff", size=(1024, 768), seed=12, tumor_fraction=0.2)
    pa, pb, pc = _read(a.path), _read(b.path), _read(c.path)
    assert np.array_equal(pa, pb)
    assert np.array_equal(a.tumor_mask, b.tumor_mask)
    assert np.abs(pa.astype(int) - pc).mean() > 10


def test_tiles_are_independent_and_continuous(tumour_slide):
    """A window rendered on its own equals the same pixels assembled from the four tiles it
    straddles: nuclei crossing tile edges are the same nuclei on both sides."""
    s, pixels = tumour_slide
    lay = synth_mod._make_layout(s.size, s.seed, 0.3, 0.5, s.stain, (), 256)
    r = synth_mod._Renderer(lay)
    tiles = np.concatenate([
        np.concatenate([r.render(x, y, 256, 256) for x in (512, 768)], axis=1)
        for y in (512, 768)
    ])
    win = r.render(768 - 70, 768 - 50, 150, 120)
    ref = tiles[256 - 50: 256 + 70, 256 - 70: 256 + 80]
    diff = np.abs(win.astype(int) - ref)
    assert diff.max() <= 1 and diff.mean() < 0.05  # float rounding at most
    assert win.std() > 5  # not an empty window
    # and the file holds these tiles, up to JPEG
    assert np.abs(tiles.astype(int) - pixels[512:1024, 512:1024]).mean() < 4.0


def test_writer_gets_tile_generators_not_level_arrays(tmp_path, monkeypatch):
    seen = []
    real = tifffile.TiffWriter.write

    def spy(self, data=None, *args, **kwargs):
        seen.append((type(data), kwargs.get("shape"), kwargs.get("tile")))
        assert not isinstance(data, np.ndarray), "a whole level was handed to the writer"
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffWriter, "write", spy)
    synth_slide(tmp_path / "s.tiff", size=(2048, 1536), seed=2, workers=1)
    assert len(seen) == 2
    assert all(hasattr(d, "__next__") for d, _, _ in seen)
    assert [sh for _, sh, _ in seen] == [(1536, 2048, 3), (384, 512, 3)]
    assert all(t == (256, 256) for _, _, t in seen)


def test_colours_near_real_he(tumour_slide):
    s, pixels = tumour_slide
    tissue = _up(s.tissue_mask, s.mask_downsample, pixels.shape[:2])
    inner = ndimage.binary_erosion(tissue, iterations=24)
    outer = ~ndimage.binary_dilation(tissue, iterations=24)
    bg = pixels[outer].reshape(-1, 3).astype(float)
    assert np.all(np.abs(bg.mean(0) - 242) < 6)  # glass, ECOSYSTEM.md: 242, 243, 243
    t = pixels[inner].reshape(-1, 3).astype(float)
    mean = t.mean(0)
    # H&E: pink-purple, green absorbed most; CMU-1 tissue mean 149, 94, 134
    assert 120 < mean[0] < 200 and 60 < mean[1] < 150 and 95 < mean[2] < 180
    assert mean[1] < mean[2] < mean[0]
    lum = t.mean(1)
    nuclei = t[lum < np.quantile(lum, 0.1)].mean(0)  # CMU-1 darkest 10%: 43, 20, 59
    assert np.all(nuclei < mean - 60) and nuclei[1] < 60 and nuclei[2] > nuclei[1]


def test_tumour_differs_by_morphology_and_density(tumour_slide):
    s, pixels = tumour_slide
    ds = s.mask_downsample
    tum = ndimage.binary_erosion(_up(s.tumor_mask, ds, pixels.shape[:2]), iterations=16)
    normal = ndimage.binary_erosion(
        _up(s.tissue_mask & ~ndimage.binary_dilation(s.tumor_mask, iterations=3), ds,
            pixels.shape[:2]), iterations=16)
    assert tum.sum() > 50_000 and normal.sum() > 50_000
    dark = pixels.astype(float).mean(2) < 100  # haematoxylin-dense: nuclei
    frac_t, frac_n = dark[tum].mean(), dark[normal].mean()
    assert frac_t > 2.5 * frac_n
    # haematoxylin by colour deconvolution with the reference H&E vectors: nuclei cover more of
    # the tumour and form larger (bigger, crowded) blobs there
    od = -np.log((pixels.astype(float) + 1) / 256)
    stains = np.stack([synth_mod.REFERENCE_H, synth_mod.REFERENCE_E]).T
    hem = ndimage.gaussian_filter((od @ np.linalg.pinv(stains).T)[..., 0], 1.5)
    nuc = ndimage.binary_opening(hem > 1.0)
    assert nuc[tum].mean() > 2 * nuc[normal].mean()

    def mean_blob(mask):
        lab, _ = ndimage.label(nuc & mask)
        area = np.bincount(lab.ravel())[1:]
        return area[area > 20].mean()

    assert mean_blob(tum) > 1.5 * mean_blob(normal)


def test_truth_masks_polygons_and_patches(tumour_slide):
    s, _ = tumour_slide
    assert s.tumor_mask.shape == s.tissue_mask.shape
    assert not (s.tumor_mask & ~s.tissue_mask).any()
    assert 0.3 <= s.tumor_fraction < 0.36
    assert 0.2 < s.tissue_mask.mean() < 0.7
    geo = s.truth_geojson()
    assert geo["type"] == "FeatureCollection" and geo["features"]
    area = 0.0
    for feat in geo["features"]:
        rings = [np.asarray(r) for r in feat["geometry"]["coordinates"]]
        assert all(np.array_equal(r[0], r[-1]) for r in rings)
        area += abs(synth_mod._ring_area(rings[0])) - sum(abs(synth_mod._ring_area(r))
                                                          for r in rings[1:])
    assert area == pytest.approx(s.tumor_mask.sum() * s.mask_downsample**2, rel=0.15)
    json.dumps(geo)
    truth = s.patch_truth()
    assert truth["tumor_fraction"].shape == (8, 8)
    assert truth["coords"][9].tolist() == [256, 256]  # (row 1, col 1)
    mean_frac = (truth["tumor_fraction"].sum() / truth["tissue_fraction"].sum())
    assert mean_frac == pytest.approx(s.tumor_fraction, abs=0.02)


def test_normal_slide_has_no_tumour(tmp_path):
    s = synth_slide(tmp_path / "n.tiff", size=(1024, 1024), seed=5)
    assert s.tissue_mask.any() and not s.tumor_mask.any()
    assert s.truth_geojson()["features"] == []


@pytest.mark.slow
def test_artefacts_change_only_their_regions(tmp_path):
    clean = synth_slide(tmp_path / "c.tiff", size=(2048, 2048), seed=21)
    dirty = synth_slide(tmp_path / "d.tiff", size=(2048, 2048), seed=21, artefacts="all")
    assert np.array_equal(clean.tissue_mask, dirty.tissue_mask)
    a, b = _read(clean.path).astype(float), _read(dirty.path).astype(float)
    ds = clean.mask_downsample
    pen = _up(dirty.artefact_masks["pen"], ds, a.shape[:2])
    assert pen.any()
    assert b[pen].mean() < a[pen].mean() - 20  # ink absorbs
    fold = _up(dirty.artefact_masks["fold"], ds, a.shape[:2]) & ~pen
    if fold.sum() > 1000:
        assert b[fold].mean() < a[fold].mean() - 15  # a double layer of tissue
    tissue = _up(clean.tissue_mask, ds, a.shape[:2])
    blur = ndimage.binary_erosion(_up(dirty.artefact_masks["blur"], ds, a.shape[:2]),
                                  iterations=8) & tissue & ~pen & ~fold
    if blur.sum() > 1000:
        lap_a = np.abs(ndimage.laplace(a.mean(2)))[blur].mean()
        lap_b = np.abs(ndimage.laplace(b.mean(2)))[blur].mean()
        assert lap_b < 0.6 * lap_a
    glass = ~ndimage.binary_dilation(tissue, iterations=16) & ~ndimage.binary_dilation(
        pen, iterations=16)
    specks_a = (a.mean(2) < 200)[glass].sum()
    specks_b = (b.mean(2) < 200)[glass].sum()
    assert specks_b > specks_a + 20  # debris on the glass


def test_stain_varies_between_slides():
    a, b = Stain.random(1), Stain.random(2)
    assert a != b and Stain.random(1) == a
    assert Stain.random(1, 0.0) == Stain()
    assert np.linalg.norm(a.h) == pytest.approx(1.0)


def test_progress_cancel_and_bad_arguments(tmp_path):
    calls = []
    synth_slide(tmp_path / "p.tiff", size=(2048, 1024), progress=lambda *a: calls.append(a))
    assert calls[-1] == ("synth", 32 + 2, 32 + 2)  # level-0 tiles, then the 512 x 256 level
    assert all(c[0] == "synth" and c[1] <= c[2] for c in calls)

    ev = threading.Event()

    def stop_halfway(stage, done, total):
        if done >= total // 2:
            ev.set()

    out = tmp_path / "x.tiff"
    with pytest.raises(Cancelled, match=r"x\.tiff: synthetic slide cancelled"):
        synth_slide(out, size=(2048, 2048), progress=stop_halfway, cancel=ev)
    assert not out.exists() and list(tmp_path.glob("x.tiff*")) == []
    assert list(tmp_path.glob(".x.tiff*")) == []  # nor its hidden temporary file
    assert list(tmp_path.glob("hdmil-synth-*")) == []  # scratch removed
    with pytest.raises(HDMILError, match="size"):
        synth_slide(tmp_path / "b.tiff", size=(0, 10))
    with pytest.raises(HDMILError, match="artefact"):
        synth_slide(tmp_path / "b.tiff", size=(64, 64), artefacts=["smudge"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HDMILError, match="cannot write"):
        synth_slide(blocker / "s.tiff", size=(64, 64))
    with pytest.raises(HDMILError, match="tumor_fraction"):
        synth_slide(tmp_path / "b.tiff", size=(64, 64), tumor_fraction=1.5)


@pytest.mark.slow
def test_cohort_labels_truth_and_burdens(tmp_path):
    info = synth_cohort(tmp_path / "c", n_slides=4, seed=1, size=(1536, 1536),
                        tumor_burdens=(0.25, 0.02), workers=1)
    with open(info.labels_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "label", "case_id"]
    assert sorted(r["label"] for r in rows) == ["normal", "normal", "tumor", "tumor"]
    assert {r["slide_id"] for r in rows} == {s.path.stem for s in info.slides}
    burdens = []
    for s in info.slides:
        assert s.path.exists()
        geo = json.loads(s.truth_geojson.read_text())
        truth = np.load(s.truth_npz)
        assert truth["tumor_fraction"].shape == (6, 6)
        assert truth["coords"].shape == (36, 2) and int(truth["patch_size_level0"]) == 256
        frac = truth["tumor_mask"].sum() / truth["tissue_mask"].sum()
        if s.label == "tumor":
            assert frac >= 0.02 and geo["features"]
            # a large area fills whole patches; a small focus may fit inside one
            assert truth["tumor_fraction"].max() > (0.5 if frac > 0.2 else 0.0)
            burdens.append(frac)
        else:
            assert frac == 0 and not geo["features"] and truth["tumor_fraction"].max() == 0
    assert min(burdens) < 0.05 < 0.2 < max(burdens)  # a large area and a small focus
    manifest = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert [m["slide_id"] for m in manifest["slides"]] == [s.slide_id for s in info.slides]
    # stain differs between slides
    assert len({m["stain"]["h_scale"] for m in manifest["slides"]}) == 4


def test_slide_and_cohort_files_are_whole_with_normal_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    normal = 0o666 & ~umask  # what a plain open() gives, not a temp file's 0600
    slide = synth_slide(tmp_path / "s.tiff", size=(512, 512), seed=2)
    info = synth_cohort(tmp_path / "c", n_slides=1, seed=2, size=(512, 512), workers=1)
    written = [slide.path, info.labels_csv, tmp_path / "c" / "cohort.json"]
    written += [p for s in info.slides for p in (s.path, s.truth_geojson, s.truth_npz)]
    for path in written:
        assert path.stat().st_mode & 0o777 == normal, path
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert names == sorted(p.name for p in written)  # no temporary file left behind
    np.load(info.slides[0].truth_npz)["tumor_fraction"]  # the npz is complete


def test_cohort_stops_when_cancelled(tmp_path):
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled, match=r"c: synthetic cohort cancelled"):
        synth_cohort(tmp_path / "c", n_slides=2, size=(512, 512), workers=1, cancel=ev)
    assert list((tmp_path / "c").iterdir()) == []


def test_cohort_cli(tmp_path):
    from hdmil.cli import main

    rc = main(["synth-cohort", "--out", str(tmp_path / "c"), "--slides", "2", "--seed", "3",
               "--size", "768", "768", "--workers", "1"])
    assert rc == 0
    assert (tmp_path / "c" / "labels.csv").read_text().startswith("slide_id,label,case_id")
    assert main(["synth-cohort", "--out", str(tmp_path / "d"), "--slides", "0"]) == 1


def test_demo_slide_path_and_napari_sample(tmp_path, monkeypatch):
    from hdmil.synth import demo_slide_path

    monkeypatch.setenv("HDMIL_CACHE", str(tmp_path / "cache"))
    p = demo_slide_path(create=False)
    assert p.parent == tmp_path / "cache" and not p.exists()
    monkeypatch.setitem(synth_mod.DEMO, "size", (1024, 1024))  # the real one takes ~a minute
    pytest.importorskip("napari_hdmil._reader")
    from napari_hdmil._sample_data import demo_slide

    layers = demo_slide()
    assert p.exists() and p.with_name(p.stem + ".truth.geojson").exists()
    assert len(layers) == 1
    data, kwargs, kind = layers[0]
    assert kind == "image" and kwargs.get("rgb") is True
    assert demo_slide_path() == p  # made once
