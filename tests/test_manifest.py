"""The plugin manifest: one file at the top level, valid, and shipped inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_manifest_is_single_source():
    shipped = resources.files("napari_hdmil") / "napari.yaml"
    assert shipped.read_text() == (REPO / "napari.yaml").read_text()


def test_npe2_validate_with_imports():
    npe2 = Path(sys.executable).with_name("npe2")
    proc = subprocess.run(
        [str(npe2), "validate", "napari-hdmil", "--imports"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout


def test_manifest_contributions():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-hdmil")
    assert pm.name == "napari-hdmil"
    patterns = pm.contributions.readers[0].filename_patterns
    for ext in ("*.svs", "*.tif", "*.tiff", "*.ndpi", "*.scn"):
        assert ext in patterns
    assert pm.contributions.widgets and pm.contributions.sample_data and pm.contributions.writers


@pytest.mark.slow
def test_wheel_ships_manifest(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         str(REPO), "-w", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("napari_hdmil-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("napari_hdmil/napari.yaml").decode() == (REPO / "napari.yaml").read_text()
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt")))
    assert b"napari_hdmil:napari.yaml" in entry_points
    assert b"hdmil.cli:main" in entry_points


def test_writer_keeps_um_scale(tmp_path):
    import json

    import numpy as np
    import tifffile

    from napari_hdmil._writer import write_heatmap

    heat = np.random.default_rng(0).random((12, 9)).astype("float32")
    heat[0, 0] = np.nan
    out = tmp_path / "heat.tif"
    written = write_heatmap(str(out), heat, {"scale": (127.7, 127.7), "translate": (64.0, 32.0),
                                             "name": "tumor attention",
                                             "metadata": {"cls": "tumor", "hdmil_layer": "heatmap"}})
    assert written == [str(out)]
    with tifffile.TiffFile(out) as tf:
        page = tf.pages[0]
        back = page.asarray()
        xres = page.tags["XResolution"].value
        desc = json.loads(page.description)
    np.testing.assert_array_equal(np.isnan(back), np.isnan(heat))
    np.testing.assert_allclose(back[~np.isnan(back)], heat[~np.isnan(heat)])
    assert abs(1e4 / (xres[0] / xres[1]) - 127.7) < 1e-3
    assert desc["translate_um"] == [64.0, 32.0] and desc["hdmil"]["cls"] == "tumor"
