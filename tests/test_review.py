"""Reopening saved results without any model, finding a moved slide, refusing a changed one,
and the batch review log (review.csv) with `hdmil review-summary`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hdmil.cli import main
from hdmil.errors import HDMILError
from hdmil.pipeline.result import (
    SavedResultError, SlideChangedError, SlideNotFoundError, load_result, result_folder, slide_fingerprint,
)
from hdmil.review import VERDICTS, batch_rows, filter_rows, load_verdicts, review_summary, save_verdict

CMU = "CMU-1-Small-Region"


def _no_models(monkeypatch):
    """Any attempt to build an encoder or load a checkpoint fails the test."""
    import hdmil.checkpoint
    import hdmil.features
    import hdmil.features.encoders
    import hdmil.pipeline.setup

    def boom(*a, **k):
        raise AssertionError("a model was built while reopening a result")

    monkeypatch.setattr(hdmil.features, "create_encoder", boom)
    monkeypatch.setattr(hdmil.features.encoders, "create_encoder", boom)
    monkeypatch.setattr(hdmil.pipeline.setup, "encoder_for", boom)
    monkeypatch.setattr(hdmil.checkpoint, "load_model", boom)


@pytest.fixture(scope="module")
def predicted(cmu_slide, tmp_path_factory):
    """`hdmil predict` on a copy of the CMU slide: (out folder, the copy, the results folder)."""
    root = tmp_path_factory.mktemp("predicted")
    slide = root / "slides" / cmu_slide.name
    slide.parent.mkdir()
    shutil.copy(cmu_slide, slide)
    out = root / "out"
    assert main(["predict", str(slide), "--out", str(out)]) == 0
    return out, slide, out / CMU


def test_report_records_the_slide_file_and_grid(predicted):
    _, slide, folder = predicted
    report = json.loads((folder / "report.json").read_text())
    fp = report["slide_file"]
    assert fp["path"] == str(slide.resolve()) and fp["size"] == slide.stat().st_size
    assert fp == slide_fingerprint(slide)
    # ceil(2967 / 256) x ceil(2220 / 256): the partial last row and column are padded patches
    assert report["grid"]["shape"] == [12, 9] and report["grid"]["dimensions"] == [2220, 2967]


def test_reopened_result_equals_the_saved_one_without_a_model(predicted, monkeypatch):
    _, slide, folder = predicted
    _no_models(monkeypatch)
    report = json.loads((folder / "report.json").read_text())
    for path in (folder, folder / "report.json", folder / "patches.h5"):
        res = load_result(path)
        assert res.slide_path == str(slide.resolve())
        assert res.prediction == report["prediction"]
        assert res.kept_ratio == pytest.approx(report["kept_ratio"], abs=1e-6)  # the report rounds it
        np.testing.assert_allclose(res.probabilities, report["probabilities"], rtol=0, atol=1e-7)
        assert res.to_report()["kept_per_class"] == report["kept_per_class"]
        # CMU-1-Small-Region, 2220 x 2967 px: ceil(2967 / 256) x ceil(2220 / 256), edges padded
        assert res.grid.shape == (12, 9) and res.grid.patch_size_level0 == 256


def test_reader_gives_slide_and_every_result_layer_without_a_model(predicted, monkeypatch):
    from napari_hdmil._reader import get_reader, get_result_reader, read_result

    _, slide, folder = predicted
    _no_models(monkeypatch)
    for path in (folder, folder / "report.json", folder / "patches.h5", [str(folder)]):
        assert get_result_reader(path) is read_result, path
    assert get_result_reader(folder.parent) is None  # the batch folder itself is not one result
    assert get_reader(folder) is None  # the slide reader leaves folders alone
    layers = read_result(str(folder))
    names = [kw["name"] for _, kw, _ in layers]
    predicted_class = json.loads((folder / "report.json").read_text())["prediction"]
    assert names == [CMU, "LIPN decision", "attention: normal", "attention: tumor",
                     f"bottom-k: {predicted_class}", f"top-k: {predicted_class}"]
    meta = layers[0][1]["metadata"]
    assert meta["slide_path"] == str(slide.resolve()) and meta["result_folder"] == str(folder.resolve())
    st = slide.stat()
    assert (meta["file_size"], meta["file_mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    heat = layers[3][0]  # attention: tumor, one pixel per patch, NaN where not pooled
    assert heat.shape == (12, 9) and np.isfinite(heat).sum() > 0  # the padded grid (12 x 9)


def test_moved_slide_found_beside_the_results(predicted, tmp_path):
    out, slide, _ = predicted
    moved = tmp_path / "out"
    shutil.copytree(out, moved)
    hidden = slide.with_suffix(".hidden")
    slide.rename(hidden)  # the recorded place is gone
    try:
        with pytest.raises(SlideNotFoundError) as err:  # nowhere: the message lists where it looked
            load_result(moved / CMU, slide_dirs=(tmp_path / "elsewhere",))
        msg = str(err.value)
        assert "\n" not in msg and str(slide.resolve()) in msg
        for place in (tmp_path / "elsewhere", moved / CMU, moved, tmp_path):
            assert str(place.resolve() / slide.name) in msg
        src = tmp_path / slide.name  # a copy beside the batch folder
        shutil.copy(hidden, src)
        assert load_result(moved / CMU).slide_path == str(src.resolve())
        named = tmp_path / "named"  # a folder the user names
        named.mkdir()
        src.rename(named / slide.name)
        assert load_result(moved / CMU, slide_dirs=(named,)).slide_path == str((named / slide.name).resolve())
    finally:
        hidden.rename(slide)


def test_changed_slide_refused(predicted, tmp_path):
    out, slide, _ = predicted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    report_path = copy / CMU / "report.json"
    report = json.loads(report_path.read_text())
    report["slide_file"]["size"] += 1  # the file on disk is now "another" file
    report_path.write_text(json.dumps(report))
    with pytest.raises(SlideChangedError, match="bytes, the results were made from"):
        load_result(copy / CMU)
    report["slide_file"]["size"] -= 1
    report["slide_file"]["sha256_head"] = "0" * 64
    report_path.write_text(json.dumps(report))
    with pytest.raises(SlideChangedError, match="other content"):
        load_result(copy / CMU)
    assert load_result(copy / CMU, find=False).slide_name == CMU  # the numbers still read


def test_not_a_result(tmp_path):
    with pytest.raises(SavedResultError, match="no report.json"):
        result_folder(tmp_path)
    (tmp_path / "report.json").write_text("{")
    (tmp_path / "patches.h5").write_bytes(b"not hdf5")
    with pytest.raises(SavedResultError, match="cannot be read as a report"):
        load_result(tmp_path)


# -- the review log ---------------------------------------------------------------------------


def _batch(out, names_preds):
    for name, pred, p in names_preds:
        (out / name).mkdir(parents=True)
        (out / name / "report.json").write_text(json.dumps(
            {"classes": ["normal", "tumor"], "probabilities": [1 - p, p] if pred == "tumor" else [p, 1 - p],
             "prediction": pred, "kept_ratio": 0.25, "errors": []}))


def test_verdicts_saved_atomically_and_counted(tmp_path, capsys):
    _batch(tmp_path, [("a", "tumor", 0.9), ("b", "normal", 0.8), ("c", "tumor", 0.6)])
    rows = batch_rows(tmp_path)
    assert [r.slide for r in rows] == ["a", "b", "c"] and not any(r.reviewed for r in rows)
    assert rows[0].probability == pytest.approx(0.9)
    save_verdict(tmp_path, "a", "agree", "clear  tumour\nat margin", "tumor")
    save_verdict(tmp_path, "b", "disagree", "", "normal")
    save_verdict(tmp_path, "c", "unsure")
    save_verdict(tmp_path, "c", "agree", "second look")  # replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "review.csv"]  # no temp left
    v = load_verdicts(tmp_path)
    assert v["a"].note == "clear tumour at margin" and v["c"].verdict == "agree" and v["a"].reviewed_at
    s = review_summary(tmp_path)
    assert s.counts == {"agree": 2, "disagree": 1, "unsure": 0} and s.agreement == pytest.approx(2 / 3)
    assert s.per_class == {"tumor": {"agree": 2, "disagree": 0, "unsure": 0},
                           "normal": {"agree": 0, "disagree": 1, "unsure": 0}}
    assert main(["review-summary", str(tmp_path), "--list"]) == 0
    out = capsys.readouterr().out
    assert "slides 3, reviewed 3, not reviewed 0" in out and "agree 2  disagree 1  unsure 0  agreement 66.7%" in out
    assert "a: predicted tumor: agree (clear tumour at margin)" in out
    save_verdict(tmp_path, "c", None)
    assert review_summary(tmp_path).counts["agree"] == 1
    assert [r.slide for r in filter_rows(batch_rows(tmp_path), show="not reviewed")] == ["c"]
    assert [r.slide for r in filter_rows(batch_rows(tmp_path), "MARGIN")] == ["a"]
    assert [r.slide for r in filter_rows(batch_rows(tmp_path), show="disagree")] == ["b"]
    with pytest.raises(ValueError):
        save_verdict(tmp_path, "a", "maybe")
    assert set(VERDICTS) == {"agree", "disagree", "unsure"}


def test_review_of_no_batch_folder(tmp_path, capsys):
    with pytest.raises(HDMILError, match="not a batch folder"):
        batch_rows(tmp_path)
    assert main(["review-summary", str(tmp_path / "missing")]) == 1
    assert "not a folder" in capsys.readouterr().err
    _batch(tmp_path, [("a", "tumor", 0.9)])
    (tmp_path / "review.csv").write_text("x,y\n1,2\n")
    with pytest.raises(HDMILError, match="not a review file"):
        batch_rows(tmp_path)


def test_opening_a_20k_slides_results_takes_well_under_a_second(tmp_path):
    """6084 patches (a 20k x 20k px slide at 256 px), 30% read with 1024-d features: reading the
    result back and making every layer (napari's colormaps imported first, as in a viewer)."""
    import time

    from hdmil.grid import PatchGrid
    from hdmil.pipeline.result import Result
    from napari_hdmil._layers import result_layers

    idx = np.argwhere(np.ones((78, 78), bool)).astype(np.int64)
    coords = idx[:, ::-1] * 256
    grid = PatchGrid.from_coords(coords, 256, (20000, 20000), 0.5, slide_name="big")
    rng = np.random.default_rng(0)
    kept = rng.random(len(coords)) < 0.3
    att = np.where(kept[:, None], rng.random((len(coords), 2)), np.nan).astype(np.float32)
    res = Result("big", None, ["normal", "tumor"], np.array([0.3, 0.7], np.float32), 1, coords, idx,
                 np.repeat(kept[:, None], 2, 1), kept, att, att,
                 rng.random((int(kept.sum()), 1024)).astype(np.float32), np.flatnonzero(kept),
                 np.zeros(0, np.int64), True, {"total": 1.0}, grid=grid, mpp=0.5, patch_size_level0=256)
    res.save(tmp_path / "big")
    result_layers(res)  # imports napari's colormaps (done once a viewer runs)
    t0 = time.perf_counter()
    back = load_result(tmp_path / "big", find=False)
    layers = result_layers(back)
    seconds = time.perf_counter() - t0
    assert seconds < 1.0, seconds
    np.testing.assert_array_equal(layers[2][0], result_layers(res)[2][0])  # the same heatmap


def test_region_details_and_neighbours_read_back(tmp_path):
    from hdmil.grid import PatchGrid
    from hdmil.pipeline.result import RegionDetails, Result

    idx = np.argwhere(np.ones((4, 4), bool)).astype(np.int64)
    coords = idx[:, ::-1] * 64
    grid = PatchGrid.from_coords(coords, 64, (300, 260), 2.0, slide_name="r")
    att = np.full((16, 2), 1 / 16, np.float32)
    regions = RegionDetails(coords=np.array([[0, 0]], np.int64), attention=np.ones((1, 2), np.float32),
                            scores=np.zeros((1, 2), np.float32), prototype=np.array([3], np.int64),
                            patch_region=np.zeros(16, np.int64), size_level0=1024, slpd_name="slpd.safetensors")
    kept = np.ones(16, bool)
    neighbour = np.zeros(16, bool)
    neighbour[5] = True
    res = Result("r", None, ["a", "b"], np.array([0.4, 0.6], np.float32), 1, coords, idx,
                 np.ones((16, 2), bool), kept, att, att, np.zeros((16, 3), np.float32), np.arange(16),
                 np.array([2], np.int64), False, {"total": 0.5}, grid=grid, mpp=2.0, patch_size_level0=64,
                 regions=regions, neighbour=neighbour)
    res.save(tmp_path / "r")
    back = load_result(tmp_path / "r", find=False)
    assert back.instances == "region" and back.regions.slpd_name == "slpd.safetensors"
    assert back.regions.size_level0 == 1024 and back.regions.prototype.tolist() == [3]
    assert back.neighbour.tolist() == neighbour.tolist() and back.failed.tolist() == [2]
    # 300 x 260 px in 64 px patches: 5 x 5 with the padded last row and column (ceil 260 / 64, 300 / 64)
    assert back.method == "HDMIL†" and back.grid.shape == (5, 5) and back.grid.dimensions == (300, 260)
    assert back.to_report()["n_kept_as_neighbour"] == 1
    np.testing.assert_array_equal(back.grid.tissue_fraction, grid.tissue_fraction)
