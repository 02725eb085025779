"""Region instances at inference: a DMIN trained on SLPD region embeddings classifies a slide.

Every tissue patch is read, the SLPD teacher embeds each block of patch features as one region,
DMIN pools the regions, and each patch carries its region's attention. The prediction must be
DMIN's own on those region embeddings, computed independently here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from hdmil.checkpoint import load_model, load_slpd, save_checkpoint, save_slpd
from hdmil.errors import CheckpointError
from hdmil.models import DMIN, DMINConfig
from hdmil.models.slpd import SLPD, embed_slide, slpd_config
from hdmil.pipeline import NoTissueError, RegionDetails, run_slide
from helpers import TINY  # registers the 8-d test encoder

SLPD_NAME = "slpd.safetensors"


def _region_model(folder, slpd_name: str | None = SLPD_NAME, region_dim: int = 16, **slpd_kw):
    """A tiny SLPD (8-d patches -> 16-d regions of 4 x 4 patches) and a region DMIN beside it."""
    torch.manual_seed(3)
    slpd = SLPD(slpd_config("tiny", in_dim=8, **slpd_kw)).eval()
    save_slpd(folder / SLPD_NAME, slpd, {})
    dmin = DMIN(DMINConfig(in_dim=region_dim, hidden=16, attn_dim=8, n_classes=2, cheby_degree=3)).eval()
    config = {"classes": ["normal", "tumor"], "encoder": TINY, "instances": "region"}
    if slpd_name:
        config["slpd_checkpoint"] = slpd_name
    return save_checkpoint(folder / "region-dmin.safetensors", {"dmin": dmin}, config)


@pytest.fixture(scope="module")
def region_run(synthetic_slide, tmp_path_factory):
    folder = tmp_path_factory.mktemp("regions")
    model = load_model(_region_model(folder))
    return folder, model, run_slide(synthetic_slide, model, use_lipn=False)


def test_region_prediction_is_dmin_on_slpd_regions(region_run):
    folder, model, result = region_run
    assert result.instances == "region" and result.use_lipn is False
    assert isinstance(result.regions, RegionDetails) and result.regions.n_regions == len(result.regions.coords)
    assert result.n_read == result.n_patches  # no LIPN: every tissue patch is read
    slpd = load_slpd(folder / SLPD_NAME)
    own = embed_slide(slpd, result.features, result.coords[result.feature_index],
                      result.patch_size_level0, slide_id=result.slide_name)
    assert len(own.region_embeddings) >= 2
    expected = model.dmin.predict(own.region_embeddings, mask=None)
    np.testing.assert_allclose(result.probabilities, expected.probabilities.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.regions.coords, own.region_coords)
    np.testing.assert_allclose(result.regions.attention, expected.attention.numpy(), rtol=1e-5, atol=1e-7)


def test_each_patch_shows_its_regions_attention(region_run):
    _, _, result = region_run
    region_px = result.regions.size_level0
    assert region_px == 4 * result.patch_size_level0  # the tiny preset's 4 x 4 patch regions
    inside = result.regions.patch_region >= 0
    assert inside.any()
    for row in np.flatnonzero(inside):
        r = result.regions.patch_region[row]
        x, y = result.coords[row]
        rx, ry = result.regions.coords[r]
        assert rx <= x < rx + region_px and ry <= y < ry + region_px  # the patch lies in its region
        np.testing.assert_array_equal(result.attention[row], result.regions.attention[r])
    assert np.isnan(result.attention[~inside]).all()  # patches of blocks too sparse for a region


def test_region_results_are_saved(region_run, tmp_path):
    _, _, result = region_run
    out = result.save(tmp_path / "slide")
    report = json.loads((out / "report.json").read_text())
    assert report["instances"] == "region" and report["n_regions"] == len(result.regions.coords)
    assert report["slpd"] == SLPD_NAME
    with h5py.File(out / "patches.h5") as f:
        assert f.attrs["instances"] == "region"
        np.testing.assert_array_equal(f["region_coords"][()], result.regions.coords)
        np.testing.assert_array_equal(f["patch_region"][()], result.regions.patch_region)


def test_region_model_errors(synthetic_slide, tmp_path):
    # no SLPD named, or the named one missing: say how to pass it
    for i, name in enumerate((None, "elsewhere.safetensors")):
        folder = tmp_path / str(i)
        folder.mkdir()
        model = load_model(_region_model(folder, slpd_name=name))
        with pytest.raises(CheckpointError, match="--slpd"):
            run_slide(synthetic_slide, model, use_lipn=False)
    # LIPN screens patches, not regions
    model = load_model(_region_model(tmp_path / "0"))
    with pytest.raises(CheckpointError, match="no-lipn|no LIPN"):
        run_slide(synthetic_slide, model, use_lipn=True)
    # a DMIN that takes another region width than the SLPD model gives
    folder = tmp_path / "wide"
    folder.mkdir()
    model = load_model(_region_model(folder, region_dim=12))
    with pytest.raises(CheckpointError, match="12-d region embeddings.*16-d"):
        run_slide(synthetic_slide, model, use_lipn=False)


def test_too_few_patches_for_a_region(synthetic_slide, tmp_path):
    # regions of 16 x 16 patches, 90% of them tissue: more than the 16 x 12 patch slide can hold
    model = load_model(_region_model(tmp_path, grid_size=16, region_min_tissue=0.9))
    with pytest.raises(NoTissueError, match="no SLPD region"):
        run_slide(synthetic_slide, model, use_lipn=False)


def test_cli_predict_with_region_model(synthetic_slide, tmp_path):
    ckpt = _region_model(tmp_path)
    out = tmp_path / "out"
    code = (
        "import sys, helpers; from hdmil.cli import main; "
        f"sys.exit(main(['predict', {str(synthetic_slide)!r}, '--model', {str(ckpt)!r}, "
        f"'--out', {str(out)!r}]))"
    )
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tests_dir,
                          env={**__import__("os").environ, "PYTHONPATH": tests_dir, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "pools SLPD regions" in proc.stderr  # told that LIPN is not used
    report = json.loads((out / synthetic_slide.stem / "report.json").read_text())
    assert report["instances"] == "region" and report["use_lipn"] is False
