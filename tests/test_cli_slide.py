"""``hdmil info | tissue | synth | model-card``: output on real slides and checkpoints, and
one-line errors on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hdmil.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def bad_inputs(tmp_path, broken_slide) -> list[Path]:
    text = tmp_path / "notes.svs"
    text.write_text("a text file, not a slide\n")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    return [broken_slide, text, tmp_path / "missing.svs", folder]


def _assert_one_line_error(code: int, err: str, path: Path) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0]
    assert "Traceback" not in err


def test_info_cmu(capsys, cmu_slide):
    code, out, err = _run(capsys, "info", cmu_slide, "--no-tissue")
    assert code == 0, err
    assert "2220 × 2967 px" in out
    assert "mpp            0.499 µm/px" in out
    assert "20x" in out and "aperio" in out
    assert "tiles 240 × 240" in out
    assert "label" in out and "macro" in out


def test_info_json_and_mpp_override(capsys, cmu_slide):
    code, out, _ = _run(capsys, "info", cmu_slide, "--json", "--mpp", "0.25", "--no-tissue")
    assert code == 0
    data = json.loads(out)
    assert (data["width"], data["height"]) == (2220, 2967)
    assert data["mpp"] == 0.25
    assert data["levels"] == [
        {"level": 0, "width": 2220, "height": 2967, "downsample": 1.0,
         "tile_width": 240, "tile_height": 240}
    ]
    assert {"label", "macro"} <= set(data["associated_images"])
    assert data["size_mm"] == pytest.approx([2220 * 0.25 / 1000, 2967 * 0.25 / 1000])


def test_info_counts_tissue_patches(capsys, cmu_slide):
    pytest.importorskip("hdmil.grid")
    code, out, _ = _run(capsys, "info", cmu_slide, "--json")
    assert code == 0
    tissue = json.loads(out)["tissue"]
    rows, cols = tissue["grid_shape"]
    # 256 px @ 20x on a 20x slide: ~256 px patches, about a third of the region is tissue
    assert tissue["patch_size_level0"] == pytest.approx(256, abs=2)
    assert 0 < tissue["patches"] < rows * cols


def test_info_without_mpp(capsys, tmp_path):
    path = tmp_path / "no-mpp.tif"
    tifffile.imwrite(path, np.full((300, 300, 3), 220, np.uint8), tile=(64, 64), photometric="rgb")
    code, out, _ = _run(capsys, "info", path)
    assert code == 0
    assert "mpp            unknown (pass --mpp)" in out
    assert "--mpp" in out.splitlines()[-1]  # tissue count not guessed


def test_info_bad_inputs(capsys, bad_inputs):
    for path in bad_inputs:
        code, _, err = _run(capsys, "info", path)
        _assert_one_line_error(code, err, path)


def test_tissue_bad_inputs(capsys, bad_inputs, tmp_path):
    out = tmp_path / "t.geojson"
    for path in bad_inputs:
        code, _, err = _run(capsys, "tissue", path, "--out", out)
        _assert_one_line_error(code, err, path)
    assert not out.exists()


def test_tissue_without_mpp_asks_for_it(capsys, tmp_path):
    path = tmp_path / "no-mpp.tif"
    tifffile.imwrite(path, np.full((300, 300, 3), 220, np.uint8), tile=(64, 64), photometric="rgb")
    code, _, err = _run(capsys, "tissue", path, "--out", tmp_path / "t.geojson")
    _assert_one_line_error(code, err, path)
    assert "--mpp" in err


def test_tissue_tiny_slide_fails_cleanly(capsys, tiny_slide, tmp_path):
    pytest.importorskip("hdmil.grid")
    pytest.importorskip("hdmil.export")
    out = tmp_path / "t.geojson"
    code, _, err = _run(capsys, "tissue", tiny_slide, "--out", out)
    _assert_one_line_error(code, err, tiny_slide)
    assert not out.exists()


def test_tissue_cmu_writes_geojson(capsys, cmu_slide, tmp_path):
    pytest.importorskip("hdmil.grid")
    pytest.importorskip("hdmil.export")
    out = tmp_path / "cmu.geojson"
    code, stdout, err = _run(capsys, "tissue", cmu_slide, "--out", out, "--threshold", "0.5")
    assert code == 0, err
    doc = json.loads(out.read_text())
    features = doc["features"] if isinstance(doc, dict) else doc
    assert len(features) > 0
    assert str(len(features)) in stdout or "tissue" in stdout


def test_synth_then_info(capsys, tmp_path):
    pytest.importorskip("hdmil.synth")
    out = tmp_path / "s.tiff"
    code, stdout, err = _run(
        capsys, "synth", "--out", out, "--size", "1024", "768", "--seed", "3", "--mpp", "0.5"
    )
    assert code == 0, err
    assert out.is_file()
    code, stdout, _ = _run(capsys, "info", out, "--json", "--no-tissue")
    data = json.loads(stdout)
    assert (data["width"], data["height"]) == (1024, 768)
    assert data["mpp"] == pytest.approx(0.5, rel=1e-3)


def test_synth_rejects_bad_arguments(capsys, tmp_path):
    code, _, err = _run(capsys, "synth", "--out", tmp_path / "s.tiff", "--size", "0", "10")
    assert code != 0 and "--size" in err and "Traceback" not in err
    code, _, err = _run(capsys, "synth", "--out", tmp_path / "s.tiff", "--size", "64", "64",
                        "--tumor", "1.5")
    assert code != 0 and "--tumor" in err


def test_console_script_one_line_error(broken_slide):
    exe = shutil.which("hdmil", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "hdmil.cli"]
    proc = subprocess.run([*cmd, "info", str(broken_slide)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(broken_slide) in lines[0] and "not a TIFF" in lines[0]


# -- model-card ---------------------------------------------------------------------------------


def test_model_card_prints_the_card_the_widget_shows(capsys, tmp_path):
    from hdmil.checkpoint import default_model_path
    from hdmil.model_card import DEMO_WARNING, read_model_card

    code, out, _ = _run(capsys, "model-card")  # the bundled demo model by default, as the widget
    card = read_model_card(default_model_path())
    assert code == 0 and out.splitlines() == card.lines()
    assert out.splitlines()[0] == DEMO_WARNING and "trained on: 96 synthetic slides" in out
    code, out, _ = _run(capsys, "model-card", default_model_path(), "--json")
    data = json.loads(out)
    assert code == 0 and data["demo"] is True and data["classes"] == ["normal", "tumor"]
    assert data["lines"] == card.lines() and data["sha256"] == card.sha256


def test_model_card_of_a_bad_file_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    for path in (bad, tmp_path / "missing.safetensors"):
        code, _, err = _run(capsys, "model-card", path)
        _assert_one_line_error(code, err, path)
