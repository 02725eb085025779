"""Edge patches (issue 17 item 4): the grid's partial last row and column are analysed, padded
with background as CLAM and TRIDENT pad them, and the report says how many patches were."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hdmil.checkpoint import load_model, save_checkpoint
from hdmil.features.encoders import create_encoder
from hdmil.models import DMIN, DMINConfig
from hdmil.pipeline import run_slide
from hdmil.pipeline.result import load_result
from helpers import TINY

W, H = 4 * 256 + 150, 3 * 256  # 4 whole patch columns and 150 px of a fifth


@pytest.fixture(scope="module")
def edge_slide(tmp_path_factory):
    """A tiled TIFF at 0.5 µm/px: glass, with pink tissue only in the partial last column."""
    import tifffile

    rng = np.random.default_rng(11)
    img = np.full((H, W, 3), 240, np.uint8)
    img[:, 1024:] = np.clip(rng.normal((200, 120, 180), 15, (H, W - 1024, 3)), 0, 255)
    path = tmp_path_factory.mktemp("edge") / "edge.tiff"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(2)
    dmin = DMIN(DMINConfig(in_dim=8, hidden=16, attn_dim=8, n_classes=2, cheby_degree=3)).eval()
    path = tmp_path_factory.mktemp("m") / "dmin.safetensors"
    save_checkpoint(path, {"dmin": dmin}, {"classes": ["normal", "tumor"], "encoder": TINY})
    return load_model(path)


def test_tissue_in_the_partial_last_column_is_analysed_and_reported(edge_slide, model, tmp_path):
    encoder = create_encoder(TINY, device="cpu")
    result = run_slide(edge_slide, model, use_lipn=False, mpp=0.5, encoder=encoder, batch_size=2)
    # the whole-patch grid (floor) had no tissue patch at all here: 3 rows of the last column
    assert result.grid.shape == (3, 5)
    np.testing.assert_array_equal(result.coords, [[1024, 0], [1024, 256], [1024, 512]])
    assert result.n_read == 3 and np.isfinite(result.probabilities).all()
    assert result.n_padded == 3
    out = result.save(tmp_path / "r")
    report = json.loads((out / "report.json").read_text())
    assert report["n_padded_patches"] == 3 and report["n_patches"] == 3
    assert report["grid"]["shape"] == [3, 5] and report["grid"]["bounds_offset"] == [0, 0]
    back = load_result(out, find=False)
    assert back.n_padded == 3 and back.grid.shape == (3, 5)
    # features were computed on the patches as padded: the slide's pixels, then white
    from hdmil.reading import PatchReader
    from hdmil.slide import open_slide

    with open_slide(edge_slide) as slide:
        batch = next(iter(PatchReader(slide, result.coords[:1], 256)))
    assert (batch.pixels[0][:, 150:] == 255).all() and (batch.pixels[0][:, :150] != 255).any()


def test_the_prescreen_report_counts_padded_patches(edge_slide, model):
    from hdmil.pipeline import prescreen

    ps = prescreen(edge_slide, model, False, 0.5)
    assert ps.to_report()["n_padded_patches"] == ps.grid.n_padded == 3
