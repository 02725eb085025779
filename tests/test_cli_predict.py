"""`hdmil predict`: report folders per slide; bad slides fail in one line while the others finish."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hdmil.checkpoint import save_checkpoint
from hdmil.cli import main
from hdmil.models import DMIN, DMINConfig
from helpers import TINY, random_lipn


def _checkpoint(path: Path, in_dim: int = 8, with_lipn: bool = True) -> Path:
    torch.manual_seed(0)
    modules = {"dmin": DMIN(DMINConfig(in_dim=in_dim, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3))}
    if with_lipn:
        modules["lipn"] = random_lipn()  # keeps some patches, not all
    return save_checkpoint(path, modules, {"classes": ["normal", "tumor"], "encoder": TINY})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("cli") / "tiny.safetensors")


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("hdmil predict: error:")]


def test_predict_writes_report_and_patches(synthetic_slide, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["predict", str(synthetic_slide), "--model", str(ckpt), "--out", str(out), "--batch-size", "16"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    folder = out / synthetic_slide.stem
    report = json.loads((folder / "report.json").read_text())
    for key in ("slide", "classes", "probabilities", "prediction", "n_patches", "n_kept", "kept_ratio",
                "use_lipn", "timings", "model", "errors"):
        assert key in report, key
    assert report["slide"] == synthetic_slide.stem and report["use_lipn"] is True
    assert report["classes"] == ["normal", "tumor"] and report["prediction"] in report["classes"]
    assert set(report["timings"]) >= {"tissue", "lipn", "crop", "features", "dmin", "total"}
    assert report["model"]["name"] == ckpt.name and len(report["model"]["sha256"]) >= 12
    assert report["kept_ratio"] == pytest.approx(report["n_kept"] / report["n_patches"], abs=1e-5)
    with h5py.File(folder / "patches.h5") as f:
        assert f["coords"].shape == (report["n_patches"], 2)
        assert f["lipn_mask"].shape == (report["n_patches"], 2)
        assert f["attention"].shape == (report["n_patches"], 2)
        assert f["features"].shape == (report["n_kept"], 8)
    assert synthetic_slide.name in captured.out


def test_no_lipn_reads_every_patch(synthetic_slide, ckpt, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", str(synthetic_slide), "--model", str(ckpt), "--out", str(out), "--no-lipn"]) == 0
    report = json.loads((out / synthetic_slide.stem / "report.json").read_text())
    assert report["use_lipn"] is False and report["n_kept"] == report["n_patches"] and report["kept_ratio"] == 1.0


def test_bad_slides_fail_in_one_line_and_the_rest_complete(
    synthetic_slide, broken_slide, tiny_slide, ckpt, tmp_path, capsys
):
    import tifffile

    nompp = tmp_path / "nompp.tiff"
    tifffile.imwrite(nompp, np.full((512, 512, 3), 120, np.uint8), tile=(256, 256), photometric="rgb")
    missing = tmp_path / "missing.svs"
    out = tmp_path / "out"
    slides = [broken_slide, nompp, tiny_slide, missing, synthetic_slide]
    rc = main(["predict", *map(str, slides), "--model", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0
    errors = _errors(err)
    assert len(errors) == 4, err
    for path, needle in [(broken_slide, "not"), (nompp, "mpp"), (tiny_slide, "no tissue"), (missing, "no such file")]:
        line = next(e for e in errors if str(path) in e)
        assert needle in line.lower(), line
    assert (out / synthetic_slide.stem / "report.json").is_file()
    assert not (out / broken_slide.stem).exists() and not (out / tiny_slide.stem).exists()


def test_mpp_option_rescues_a_slide_without_mpp(synthetic_slide, ckpt, tmp_path, capsys):
    """The same pixels without mpp metadata: fails without --mpp, works with it."""
    import tifffile

    with tifffile.TiffFile(synthetic_slide) as tif:
        pixels = tif.pages[0].asarray()
    nompp = tmp_path / "nompp.tiff"
    tifffile.imwrite(nompp, pixels, tile=(256, 256), photometric="rgb", compression="jpeg")
    out = tmp_path / "out"
    assert main(["predict", str(nompp), "--model", str(ckpt), "--out", str(out)]) == 1
    assert "mpp" in _errors(capsys.readouterr().err)[0]
    assert main(["predict", str(nompp), "--model", str(ckpt), "--out", str(out), "--mpp", "0.5"]) == 0
    report = json.loads((out / "nompp" / "report.json").read_text())
    assert report["mpp"] == pytest.approx(0.5) and report["n_patches"] > 0


def test_checkpoint_that_does_not_fit(synthetic_slide, tmp_path, capsys):
    wide = _checkpoint(tmp_path / "wide.safetensors", in_dim=12)
    rc = main(["predict", str(synthetic_slide), "--model", str(wide), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and "wide.safetensors" in err[0] and "12-d" in err[0]
    no_lipn = _checkpoint(tmp_path / "dmin_only.safetensors", with_lipn=False)
    rc = main(["predict", str(synthetic_slide), "--model", str(no_lipn), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "no LIPN" in err[-1] and "--no-lipn" in err[-1]
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint")
    assert main(["predict", str(synthetic_slide), "--model", str(corrupt), "--out", str(tmp_path / "o")]) == 1
    assert "corrupt.safetensors" in capsys.readouterr().err


def test_bad_device_and_missing_default_model(synthetic_slide, ckpt, tmp_path, capsys, monkeypatch):
    rc = main(["predict", str(synthetic_slide), "--model", str(ckpt), "--out", str(tmp_path), "--device", "gpu9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--device gpu9" in err[0]
    import hdmil.checkpoint

    monkeypatch.setattr(hdmil.checkpoint, "default_model_path", lambda: tmp_path / "nope.safetensors", raising=False)
    rc = main(["predict", str(synthetic_slide), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--model" in err[0] and "nope.safetensors" in err[0]


def test_prescreen_only_reads_nothing_at_20x(synthetic_slide, ckpt, tmp_path, capsys, monkeypatch):
    from hdmil.reading import PatchReader

    def no_reading(*a, **k):
        raise AssertionError("an HR patch was read")

    monkeypatch.setattr(PatchReader, "batches", no_reading)
    out = tmp_path / "out"
    rc = main(["predict", str(synthetic_slide), "--model", str(ckpt), "--out", str(out), "--prescreen-only"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / synthetic_slide.stem / "prescreen.json").read_text())
    assert report["n_patches"] > 0 and 0 <= report["n_kept"] <= report["n_patches"]
    assert set(report["kept_ratio_per_class"]) == {"normal", "tumor"}
    assert not (out / synthetic_slide.stem / "report.json").exists()


def test_lipn_threshold_option(synthetic_slide, ckpt, tmp_path, capsys):
    """A lower threshold keeps at least what a higher one keeps; 0 keeps every patch; out of range
    is an error."""
    kept = {}
    for t in (0.0, 0.5, 0.99):
        out = tmp_path / f"t{t}"
        argv = ["predict", str(synthetic_slide), "--model", str(ckpt), "--out", str(out),
                "--prescreen-only", "--lipn-threshold", str(t)]
        assert main(argv) == 0
        report = json.loads((out / synthetic_slide.stem / "prescreen.json").read_text())
        kept[t] = report["n_kept"]
        n = report["n_patches"]
    assert kept[0.0] == n and kept[0.0] >= kept[0.5] >= kept[0.99]
    assert kept[0.5] != kept[0.99] or kept[0.5] != kept[0.0]  # the option changes the decision
    capsys.readouterr()
    rc = main(["predict", str(synthetic_slide), "--model", str(ckpt), "--out", str(tmp_path / "x"),
               "--lipn-threshold", "1.5"])
    assert rc != 0 and "--lipn-threshold must be in [0, 1)" in capsys.readouterr().err
