"""Hierarchical inference: only LIPN's kept patches are read, the prediction is DMIN's masked one,
HDMIL† reads everything, results are saved atomically, bad input raises clear errors."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hdmil.checkpoint import load_model, save_checkpoint
from hdmil.errors import Cancelled, CheckpointError, HDMILError, MissingMPPError, SlideError
from hdmil.features.encoders import create_encoder
from hdmil.files import WriteError
from hdmil.grid import build_grid
from hdmil.models import DMIN, LIPN, DMINConfig, LIPNConfig
from hdmil.pipeline import NoTissueError, run_slide
from hdmil.reading import PatchReader
from hdmil.slide import open_slide
from helpers import TINY, calibrated_lipn



def _calibrated_lipn(lr: np.ndarray, keep: tuple[float, float] = (0.35, 0.2)) -> LIPN:
    return calibrated_lipn(lr, keep)


def _save(path: Path, lipn: LIPN | None, in_dim: int = 8, encoder: str = TINY) -> Path:
    torch.manual_seed(1)
    dmin = DMIN(DMINConfig(in_dim=in_dim, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3)).eval()
    modules = {"dmin": dmin} if lipn is None else {"dmin": dmin, "lipn": lipn}
    return save_checkpoint(path, modules, {"classes": ["normal", "tumor"], "encoder": encoder})


@pytest.fixture(scope="module")
def ckpt(synthetic_slide, tmp_path_factory) -> Path:
    with open_slide(synthetic_slide) as slide:
        lr = build_grid(slide).lr_patches()
    return _save(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", _calibrated_lipn(lr))


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)


@pytest.fixture(scope="module")
def encoder():
    return create_encoder(TINY, device="cpu")


class _Recorder:
    """Records the level-0 coords of every HR patch the reader actually assembles."""

    def __init__(self, monkeypatch):
        self.coords: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        cut = PatchReader._cut_from_tiles
        region = PatchReader._read_region

        def cut_rec(reader, tl, row, *a):
            with self.lock:
                self.coords.append(tuple(int(v) for v in reader.coords[row]))
            return cut(reader, tl, row, *a)

        def region_rec(reader, row, *a):
            with self.lock:
                self.coords.append(tuple(int(v) for v in reader.coords[row]))
            return region(reader, row, *a)

        monkeypatch.setattr(PatchReader, "_cut_from_tiles", cut_rec)
        monkeypatch.setattr(PatchReader, "_read_region", region_rec)


def _independent_features(slide, coords: np.ndarray, encoder, size: int) -> torch.Tensor:
    pixels = np.stack([slide.read_region((int(x), int(y)), 0, (size, size)) for x, y in coords])
    return encoder.embed(pixels)


# --------------------------------------------------------------------------------------- the point


def test_only_lipn_kept_patches_are_read(synthetic_slide, model, encoder, monkeypatch):
    rec = _Recorder(monkeypatch)
    result = run_slide(synthetic_slide, model, encoder=encoder, batch_size=8)
    n = result.n_patches
    kept = result.kept
    assert 0 < kept.sum() < n, "the test LIPN must keep a proper subset"
    np.testing.assert_array_equal(kept, result.lipn_mask.any(axis=1))
    read = set(rec.coords)
    assert len(rec.coords) == len(read) == kept.sum()  # each kept patch read once
    assert read == {tuple(c) for c in result.coords[kept]}
    assert read.isdisjoint({tuple(c) for c in result.coords[~kept]})
    assert result.n_read == kept.sum() and result.reading["tiled"]
    # only the tiles under kept patches were decoded
    s = result.patch_size_level0
    tiles = {(tx, ty) for x, y in result.coords[kept]
             for tx in range(x // 256, (x + s - 1) // 256 + 1) for ty in range(y // 256, (y + s - 1) // 256 + 1)}
    assert result.reading["n_tiles_decoded"] == len(tiles)
    assert result.kept_ratio == pytest.approx(kept.sum() / n)


def test_prediction_equals_dmin_masked_prediction_on_the_same_patches(synthetic_slide, model, encoder):
    result = run_slide(synthetic_slide, model, encoder=encoder, batch_size=8)
    rows = np.flatnonzero(result.kept)
    np.testing.assert_array_equal(result.feature_index, rows)
    with open_slide(synthetic_slide) as slide:
        feats = _independent_features(slide, result.coords[rows], encoder, result.patch_size_level0)
    np.testing.assert_allclose(result.features, feats.numpy(), rtol=1e-4, atol=1e-5)
    expect = model.dmin.predict(feats, mask=torch.from_numpy(result.lipn_mask[rows]))
    np.testing.assert_allclose(result.probabilities, expect.probabilities.numpy(), rtol=1e-4, atol=1e-6)
    assert result.prediction == model.classes[int(expect.probabilities.argmax())]
    np.testing.assert_allclose(result.attention[rows], expect.attention.numpy(), rtol=1e-4, atol=1e-6)
    assert np.isnan(result.attention[~result.kept]).all()
    # attention is NaN exactly where a class did not pool the patch, and sums to 1 per class
    assert (np.isnan(result.attention) == ~(result.lipn_mask & result.kept[:, None])).all()
    for c in range(2):
        if result.lipn_mask[:, c].any():
            assert np.nansum(result.attention[:, c]) == pytest.approx(1.0, abs=1e-5)


def test_hdmil_dagger_reads_all_patches_with_dmins_own_mask(synthetic_slide, model, encoder, monkeypatch):
    rec = _Recorder(monkeypatch)
    result = run_slide(synthetic_slide, model, use_lipn=False, encoder=encoder, batch_size=16)
    n = result.n_patches
    assert len(rec.coords) == n and result.n_read == n and result.kept.all() and result.lipn_mask.all()
    assert result.kept_ratio == 1.0
    with open_slide(synthetic_slide) as slide:
        feats = _independent_features(slide, result.coords, encoder, result.patch_size_level0)
    expect = model.dmin.predict(feats, mask=None)
    np.testing.assert_allclose(result.probabilities, expect.probabilities.numpy(), rtol=1e-4, atol=1e-6)


def test_timings_progress_and_report(synthetic_slide, model, encoder, tmp_path):
    stages = []
    result = run_slide(
        synthetic_slide, model, encoder=encoder, batch_size=8,
        progress=lambda stage, done, total: stages.append((stage, done, total)),
    )
    t = result.timings
    for k in ("tissue", "lipn", "crop", "features", "dmin", "total"):
        assert t[k] >= 0.0
    assert t["total"] >= t["tissue"] + t["lipn"] + t["dmin"]
    first = {}
    for i, (stage, _, _) in enumerate(stages):
        first.setdefault(stage, i)
    assert first["tissue"] < first["lipn"] < first["features"] < first["dmin"]
    assert ("features", result.n_kept, result.n_kept) in stages

    out = result.save(tmp_path / "slide")
    report = json.loads((out / "report.json").read_text())
    for key in ("slide", "classes", "probabilities", "prediction", "n_patches", "n_kept", "kept_ratio",
                "use_lipn", "timings", "model", "errors"):
        assert key in report
    assert report["n_kept"] == result.n_kept and report["use_lipn"] is True
    assert report["model"]["sha256"] == model.sha256 and report["model"]["name"] == model.path.name
    assert set(report["timings"]) >= {"tissue", "lipn", "crop", "features", "dmin", "total"}
    assert sum(report["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    with h5py.File(out / "patches.h5") as f:
        np.testing.assert_array_equal(f["coords"][:], result.coords)
        np.testing.assert_array_equal(f["lipn_mask"][:], result.lipn_mask)
        np.testing.assert_array_equal(f["attention"][:], result.attention)
        assert f["features"].shape == (result.n_kept, 8)
        np.testing.assert_array_equal(f["feature_index"][:], np.flatnonzero(result.kept))
        assert json.loads(f.attrs["classes"]) == ["normal", "tumor"]
    assert sorted(p.name for p in out.iterdir()) == ["patches.h5", "report.json"]


def test_interrupted_save_leaves_no_report(synthetic_slide, model, encoder, tmp_path, monkeypatch):
    result = run_slide(synthetic_slide, model, encoder=encoder)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(WriteError, match="patches.h5.*disk full"):  # the OSError, naming the file
        result.save(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no half-written patches.h5, no report


def test_cancel_between_batches(synthetic_slide, model, encoder):
    cancel = threading.Event()
    seen = []

    def progress(stage, done, total):
        seen.append((stage, done))
        if stage == "features" and done > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        run_slide(synthetic_slide, model, use_lipn=False, encoder=encoder, batch_size=4,
                  progress=progress, cancel=cancel)
    assert max(d for s, d in seen if s == "features") <= 4
    assert not any(s == "dmin" for s, _ in seen)


def test_corrupt_tile_is_counted_and_skipped(synthetic_slide, model, encoder, tmp_path):
    import tifffile

    with open_slide(synthetic_slide) as slide:
        x, y = (int(v) for v in build_grid(slide).coords[0])
    bad = tmp_path / "corrupt.tiff"
    shutil.copy(synthetic_slide, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[0]
        k = (y // 256) * (-(-page.imagewidth // 256)) + x // 256
        off, n = page.dataoffsets[k], page.databytecounts[k]
    with open(bad, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\x00" * n)
    result = run_slide(bad, model, use_lipn=False, encoder=encoder)
    assert len(result.failed) >= 1 and 0 in result.failed
    assert result.n_read == result.n_patches - len(result.failed)
    assert any("could not be decoded" in e for e in result.errors)
    assert np.isnan(result.attention[result.failed]).all()
    assert result.to_report()["n_failed"] == len(result.failed)


def test_lipn_keeping_nothing_is_a_warning_not_a_crash(synthetic_slide, tmp_path, encoder, monkeypatch):
    with open_slide(synthetic_slide) as slide:
        lr = build_grid(slide).lr_patches()
    lipn = _calibrated_lipn(lr)
    with torch.no_grad():
        lipn.fc.bias.fill_(-1e4)
    m = load_model(_save(tmp_path / "none.safetensors", lipn))
    rec = _Recorder(monkeypatch)
    result = run_slide(synthetic_slide, m, encoder=encoder)
    assert result.n_kept == 0 and result.n_read == 0 and rec.coords == []
    assert any("LIPN kept no patch" in e for e in result.errors)
    assert np.isfinite(result.probabilities).all()


# --------------------------------------------------------------------------------------- bad input


def test_no_tissue_raises_naming_the_file(tiny_slide, model, encoder):
    with pytest.raises(NoTissueError, match="no tissue found") as info:
        run_slide(tiny_slide, model, encoder=encoder)
    assert str(tiny_slide) in str(info.value)
    assert isinstance(info.value, HDMILError)


def test_blank_slide_has_no_tissue(tmp_path, model, encoder):
    import tifffile

    path = tmp_path / "blank.tiff"
    tifffile.imwrite(path, np.full((1024, 1024, 3), 243, np.uint8), tile=(256, 256), photometric="rgb",
                     compression="jpeg", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with pytest.raises(NoTissueError, match="blank.tiff"):
        run_slide(path, model, encoder=encoder)


def test_bad_slide_and_missing_mpp(broken_slide, tmp_path, model, encoder):
    import tifffile

    with pytest.raises(SlideError, match="broken.svs"):
        run_slide(broken_slide, model, encoder=encoder)
    nompp = tmp_path / "nompp.tiff"
    tifffile.imwrite(nompp, np.full((512, 512, 3), 120, np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(MissingMPPError, match="nompp.tiff"):
        run_slide(nompp, model, encoder=encoder)


def test_model_without_lipn_or_wrong_width(synthetic_slide, tmp_path, encoder):
    no_lipn = load_model(_save(tmp_path / "dmin_only.safetensors", None))
    with pytest.raises(CheckpointError, match="no LIPN"):
        run_slide(synthetic_slide, no_lipn, encoder=encoder)
    wide = load_model(_save(tmp_path / "wide.safetensors", None, in_dim=12))
    with pytest.raises(CheckpointError, match="12-d"):
        run_slide(synthetic_slide, wide, use_lipn=False, encoder=encoder)


def test_cmu_slide_end_to_end(cmu_slide, model, encoder):
    """The real SVS (240-px tiles): kept patches read exactly, prediction equals DMIN's."""
    result = run_slide(cmu_slide, model, encoder=encoder)
    assert result.n_patches > 0 and result.n_read == result.n_kept
    rows = result.feature_index
    with open_slide(cmu_slide) as slide:
        feats = _independent_features(slide, result.coords[rows], encoder, result.patch_size_level0)
    expect = model.dmin.predict(feats, mask=torch.from_numpy(result.lipn_mask[rows]))
    np.testing.assert_allclose(result.probabilities, expect.probabilities.numpy(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------- pre-screen


def test_prescreen_then_classify_reuses_the_grid_and_mask(synthetic_slide, model, encoder, monkeypatch):
    from hdmil.pipeline import prescreen

    ps = prescreen(synthetic_slide, model)
    assert ps.lipn_mask.shape == (ps.n_patches, 2) and 0 < ps.n_kept < ps.n_patches
    np.testing.assert_array_equal(ps.kept, ps.lipn_mask.any(axis=1))
    report = ps.to_report()
    assert report["n_kept"] == ps.n_kept and set(report["kept_ratio_per_class"]) == {"normal", "tumor"}

    full = run_slide(synthetic_slide, model, encoder=encoder, batch_size=8)
    np.testing.assert_array_equal(full.lipn_mask, ps.lipn_mask)

    import hdmil.grid

    def no_grid(*a, **k):
        raise AssertionError("the grid was built again")

    monkeypatch.setattr(hdmil.grid, "build_grid", no_grid)
    rec = _Recorder(monkeypatch)
    again = run_slide(synthetic_slide, model, encoder=encoder, batch_size=8, prescreened=ps)
    assert sorted(rec.coords) == sorted(map(tuple, ps.coords[ps.kept].tolist()))
    np.testing.assert_allclose(again.probabilities, full.probabilities, atol=1e-5)
    assert again.timings["tissue"] == ps.timings["tissue"]


def test_the_report_says_where_the_mpp_came_from(synthetic_slide, model, encoder, tmp_path):
    """``mpp_source``: "file" when the slide's metadata gave the mpp, "user" when the run (--mpp,
    the widget's box) or ``open_slide`` did; kept by the pre-screen, the result, and reloading."""
    from hdmil.pipeline.prescreen import prescreen
    from hdmil.pipeline.result import load_result

    ps = prescreen(synthetic_slide, model)
    assert ps.mpp_source == "file" and ps.to_report()["mpp_source"] == "file"
    assert ps.to_report()["mpp"] == pytest.approx(0.5)
    with open_slide(synthetic_slide, mpp=0.5) as slide:
        assert slide.mpp_source == "user" and prescreen(slide, model).mpp_source == "user"
    with open_slide(synthetic_slide) as slide:
        assert slide.mpp_source == "file"
    typed = prescreen(synthetic_slide, model, mpp=0.5)
    assert typed.mpp_source == "user" and typed.to_report()["mpp_source"] == "user"
    result = run_slide(synthetic_slide, model, encoder=encoder, batch_size=8, prescreened=typed)
    assert result.mpp_source == "user"
    out = result.save(tmp_path / "res")
    assert json.loads((out / "report.json").read_text())["mpp_source"] == "user"
    assert load_result(out).mpp_source == "user"


def test_dilating_lipn_keeps_the_neighbours_of_its_kept_patches(synthetic_slide, model, encoder, tmp_path):
    """A LIPN with dilation (0, 1) keeps, for class 1, its thresholded patches plus their 8
    neighbours on the slide's patch grid; class 0 keeps what it kept without dilation."""
    import copy

    from hdmil.models.lipn import dilate_mask
    from hdmil.pipeline import prescreen

    grown = copy.deepcopy(model)
    with open_slide(synthetic_slide) as slide:
        grid = build_grid(slide)
        probs = model.lipn.probabilities(grid.lr_patches()).numpy()
    # class 1 keeps its top tenth, so there are neighbours to add
    grown.lipn.cfg.class_thresholds = (0.5, float(np.quantile(probs[:, 1], 0.9)))
    grown.lipn.cfg.dilation = (0, 1)
    plain = probs > np.array(grown.lipn.cfg.class_thresholds, np.float32)
    ps = prescreen(synthetic_slide, grown)
    np.testing.assert_array_equal(ps.lipn_mask, dilate_mask(plain, grid.index, (0, 1)))
    assert ps.lipn_mask[:, 1].sum() > plain[:, 1].sum()
    np.testing.assert_array_equal(ps.lipn_mask[:, 0], plain[:, 0])
    # the patches only the dilation kept are marked, in the pre-screen, the result and its files
    only_grown = ps.kept & ~plain.any(axis=1)
    assert only_grown.any()
    np.testing.assert_array_equal(ps.neighbour, only_grown)
    assert ps.to_report()["n_kept_as_neighbour"] == int(only_grown.sum())
    result = run_slide(synthetic_slide, grown, encoder=encoder, batch_size=8, prescreened=ps)
    np.testing.assert_array_equal(result.lipn_mask, ps.lipn_mask)
    np.testing.assert_array_equal(result.neighbour, only_grown)
    out = result.save(tmp_path / "grown")
    with h5py.File(out / "patches.h5") as f:
        np.testing.assert_array_equal(f["kept_as_neighbour"][:], only_grown)
    assert json.loads((out / "report.json").read_text())["n_kept_as_neighbour"] == int(only_grown.sum())
    assert not prescreen(synthetic_slide, model).neighbour.any()  # no dilation, no neighbours


def test_prescreen_from_another_setting_is_refused(synthetic_slide, model, encoder):
    from hdmil.pipeline import prescreen

    ps = prescreen(synthetic_slide, model, use_lipn=False)
    with pytest.raises(HDMILError, match="pre-screen"):
        run_slide(synthetic_slide, model, encoder=encoder, use_lipn=True, prescreened=ps)


def test_encoder_weights_named_by_the_checkpoint_must_be_there(tmp_path):
    from hdmil.pipeline import encoder_for

    torch.manual_seed(1)
    dmin = DMIN(DMINConfig(in_dim=8, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3))
    path = save_checkpoint(tmp_path / "m.safetensors", {"dmin": dmin},
                           {"classes": ["normal", "tumor"], "encoder": TINY,
                            "encoder_weights": "missing-encoder.safetensors"})
    with pytest.raises(CheckpointError, match="missing-encoder.safetensors"):
        encoder_for(load_model(path), "cpu")


# --------------------------------------------------------------------------------------- the stages


def test_run_options_are_the_keywords(synthetic_slide, model, encoder):
    from hdmil.pipeline import RunOptions

    by_keywords = run_slide(synthetic_slide, model, use_lipn=False, batch_size=16, encoder=encoder)
    by_options = run_slide(synthetic_slide, model, RunOptions(use_lipn=False, batch_size=16), encoder=encoder)
    np.testing.assert_array_equal(by_options.probabilities, by_keywords.probabilities)
    assert not by_options.use_lipn and by_options.n_read == by_options.n_patches
    # a keyword overrides the options it is given with
    mixed = run_slide(synthetic_slide, model, RunOptions(use_lipn=False), use_lipn=True, encoder=encoder)
    assert mixed.use_lipn and mixed.n_read < mixed.n_patches
    with pytest.raises(TypeError):
        run_slide(synthetic_slide, model, encoder=encoder, batch_sise=8)


def test_patch_pooling_gives_no_region_details(synthetic_slide, model, encoder):
    from hdmil.pipeline import PatchPooler, pooler_for

    assert isinstance(pooler_for(model, None, True), PatchPooler)
    result = run_slide(synthetic_slide, model, encoder=encoder, batch_size=16)
    assert result.regions is None and result.instances == "patch"
    assert result.to_report()["instances"] == "patch" and "n_regions" not in result.to_report()


def test_pipeline_prediction_is_predict_bag_on_the_read_patches(synthetic_slide, model, encoder):
    """The pipeline pools only the patches it read; predict_bag on the same bag agrees."""
    from hdmil.inference import predict_bag

    dagger = run_slide(synthetic_slide, model, use_lipn=False, encoder=encoder, batch_size=16)
    np.testing.assert_array_equal(
        dagger.probabilities, predict_bag(model, dagger.features, use_lipn=False).probabilities)
    hdmil = run_slide(synthetic_slide, model, encoder=encoder, batch_size=16)
    whole = predict_bag(model, dagger.features, dagger.grid.lr_patches(), dagger.grid_index)
    np.testing.assert_array_equal(whole.lipn_mask, hdmil.lipn_mask)
    np.testing.assert_allclose(whole.probabilities, hdmil.probabilities, rtol=0, atol=1e-6)
