"""Comparing two runs of one slide: the common grid, the attention difference per class, the
patches read by one run only, and `hdmil compare`'s table and layers' data."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from hdmil.cli import main
from hdmil.compare import compare_results
from hdmil.errors import HDMILError
from hdmil.grid import PatchGrid
from hdmil.pipeline.result import Result, load_result


def _result(rows: list[int], read: list[int], att: np.ndarray, use_lipn: bool, total: float,
            classes=("normal", "tumor"), ps0: int = 64) -> Result:
    """A result on a 3 x 3 grid of 64 px patches listing ``rows`` (row-major cells)."""
    rows = np.asarray(rows)
    idx = np.stack([rows // 3, rows % 3], axis=1).astype(np.int64)
    coords = idx[:, ::-1] * ps0
    grid = PatchGrid.from_coords(coords, ps0, (3 * ps0, 3 * ps0), 1.0, slide_name="s")
    kept = np.isin(np.arange(len(rows)), read)
    return Result("s", None, list(classes), np.array([0.4, 0.6], np.float32), 1, coords, idx,
                  np.repeat(kept[:, None], 2, 1), kept, att.astype(np.float32), att.astype(np.float32),
                  np.zeros((len(read), 4), np.float32), np.asarray(read, np.int64), np.zeros(0, np.int64),
                  use_lipn, {"total": total}, grid=grid, mpp=1.0, patch_size_level0=ps0, model_name="m")


def test_difference_on_the_common_grid():
    nan = np.nan
    # A lists cells 0, 1, 2, 4 and read 1, 2 (rows); B lists 4, 2, 1, 8 in another order, read all
    a = _result([0, 1, 2, 4], [1, 2], np.array([[nan, nan], [0.7, 0.2], [0.3, 0.8], [nan, nan]]), True, 2.0)
    b = _result([1, 2, 4, 8], [0, 1, 2, 3], np.array([[0.4, 0.1], [0.1, 0.5], [0.5, nan], [0.0, 0.4]]),
                False, 5.0)
    cmp = compare_results(a, b)
    assert [tuple(v) for v in cmp.coords] == [(64, 0), (128, 0), (64, 64)]  # cells 1, 2, 4
    np.testing.assert_allclose(cmp.difference, [[0.4 - 0.7, 0.1 - 0.2], [0.1 - 0.3, 0.5 - 0.8], [0.5, nan]],
                               atol=1e-6)
    assert cmp.only_a.tolist() == [False, False, False] and cmp.only_b.tolist() == [False, False, True]
    table = {r["field"]: r for r in cmp.table()}
    assert table["seconds_total"]["B_minus_A"] == 3.0 and table["n_read"]["A"] == 2
    r = cmp.rasters()
    assert r["difference"].shape == (2, 3, 3) and r["difference"][0, 0, 1] == pytest.approx(-0.3)
    assert np.isnan(r["difference"][:, 0, 0]).all() and r["only_b"].tolist() == [[64, 64]]


def test_runs_that_cannot_be_compared():
    att = np.zeros((2, 2))
    a = _result([0, 1], [0], att, True, 1.0)
    with pytest.raises(HDMILError, match="other classes"):
        compare_results(a, _result([0, 1], [0], att, True, 1.0, classes=("x", "y")))
    with pytest.raises(HDMILError, match="level-0 px"):
        compare_results(a, _result([0, 1], [0], att, True, 1.0, ps0=32))


@pytest.fixture(scope="module")
def compared(synthetic_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert main(["compare", str(synthetic_slide), "--no-lipn", "--out", str(out)]) == 0
    return out


def test_cli_writes_the_table_and_the_layers(compared):
    a, b = load_result(compared / "A", find=False), load_result(compared / "B", find=False)
    assert a.method == "HDMIL" and b.method == "HDMIL†"
    data = json.loads((compared / "compare.json").read_text())
    assert data["A"]["probabilities"] == dict(zip(a.classes, map(float, a.probabilities)))
    assert data["B"]["timings"]["total"] == pytest.approx(b.timings["total"], abs=1e-3)  # the report rounds
    with open(compared / "compare.csv", newline="") as fh:
        rows = {r["field"]: r for r in csv.DictReader(fh)}
    assert float(rows["p(tumor)"]["B"]) == pytest.approx(b.probabilities[1], abs=1e-5)
    # HDMIL† reads every patch: what HDMIL read is a subset, the rest is B's alone
    assert int(rows["n_read_only_here"]["A"]) == 0 and int(rows["n_read_only_here"]["B"]) == b.n_read - a.n_read
    with np.load(compared / "compare.npz") as z:
        expect = np.nan_to_num(b.attention) - np.nan_to_num(a.attention)
        expect[np.isnan(a.attention) & np.isnan(b.attention)] = np.nan  # neither pooled the patch
        got = z["difference"][:, a.grid_index[:, 0], a.grid_index[:, 1]].T
        np.testing.assert_allclose(got, expect, atol=1e-6)
        assert len(z["only_b"]) == b.n_read - a.n_read and z["classes"].tolist() == a.classes


def test_cli_needs_one_of_no_lipn_or_a_second_model(synthetic_slide, tmp_path, capsys):
    assert main(["compare", str(synthetic_slide), "--out", str(tmp_path)]) == 1
    assert "--no-lipn" in capsys.readouterr().err


def test_cli_compares_two_checkpoints(synthetic_slide, tmp_path):
    """The bundled model (A) against a tiny checkpoint on another encoder (B): both run, each
    with its own encoder, on the same grid."""
    import torch

    from hdmil.checkpoint import default_model_path, save_checkpoint
    from hdmil.grid import build_grid
    from hdmil.models import DMIN, DMINConfig
    from hdmil.slide import open_slide
    from helpers import TINY, calibrated_lipn

    with open_slide(synthetic_slide) as slide:
        lr = build_grid(slide).lr_patches()
    torch.manual_seed(1)
    dmin = DMIN(DMINConfig(in_dim=8, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3)).eval()
    tiny = save_checkpoint(tmp_path / "tiny.safetensors", {"dmin": dmin, "lipn": calibrated_lipn(lr, (0.3, 0.2))},
                           {"classes": ["normal", "tumor"], "encoder": TINY})
    out = tmp_path / "out"
    assert main(["compare", str(synthetic_slide), "--model", str(default_model_path()), "--model", str(tiny),
                 "--out", str(out)]) == 0
    a, b = load_result(out / "A", find=False), load_result(out / "B", find=False)
    assert a.method == b.method == "HDMIL" and a.encoder != b.encoder == TINY
    data = json.loads((out / "compare.json").read_text())
    only_a = int((a.kept & ~b.kept).sum())
    assert data["read_only_by_A"] == only_a and data["read_only_by_B"] == int((b.kept & ~a.kept).sum())
    assert data["n_common_patches"] == a.n_patches == b.n_patches
