"""Layers from a pipeline Result, without a GUI: exact µm alignment with the slide layer,
LIPN decision values, heatmap normalisation and NaN, top-k points, warnings, prototype map.

``make_checkpoint`` and the tiny encoders are reused by tests/test_widget_gui.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from napari.layers import Image, Labels, Points
from torch import nn

from hdmil.checkpoint import save_checkpoint
from hdmil.features.encoders import Encoder, register_encoder
from hdmil.grid import PatchGrid
from hdmil.models import DMIN, LIPN, DMINConfig
from hdmil.pipeline import Result
from napari_hdmil import _layers
from helpers import calibrated_lipn

TINY = "gui_tiny_encoder"
SLOW = "gui_slow_encoder"
# Batches the slow encoder has embedded (tests reset it); it sleeps SLOW_SECONDS per batch.
SLOW_CALLS: list[int] = []
SLOW_SECONDS = 0.4


def _tiny_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 16, stride=16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@register_encoder(TINY)
def _tiny_encoder(pretrained: bool = False, device=None) -> Encoder:
    """8-d, one strided conv: costs next to nothing."""
    return Encoder(_tiny_model(), TINY, input_size=256, dim=8, device="cpu", channels_last=False)


class _SlowEncoder(Encoder):
    def embed(self, patches):
        SLOW_CALLS.append(len(patches))
        time.sleep(SLOW_SECONDS)
        return super().embed(patches)


@register_encoder(SLOW)
def _slow_encoder(pretrained: bool = False, device=None) -> Encoder:
    """The tiny encoder, slowed down so a run lasts long enough to cancel and to watch."""
    return _SlowEncoder(_tiny_model(), SLOW, input_size=256, dim=8, device="cpu", channels_last=False)


def _calibrated_lipn(lr: np.ndarray, keep: tuple[float, float] = (0.4, 0.25)) -> LIPN:
    return calibrated_lipn(lr, keep)


def make_checkpoint(path: Path, slide_path: Path, encoder: str = TINY, in_dim: int = 8) -> Path:
    """A DMIN + LIPN checkpoint for the tiny encoder; LIPN keeps a proper subset of the slide."""
    from hdmil.grid import build_grid
    from hdmil.slide import open_slide

    with open_slide(slide_path) as slide:
        lr = build_grid(slide).lr_patches()
    torch.manual_seed(1)
    dmin = DMIN(DMINConfig(in_dim=in_dim, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3)).eval()
    return save_checkpoint(
        path, {"dmin": dmin, "lipn": _calibrated_lipn(lr)}, {"classes": ["normal", "tumor"], "encoder": encoder}
    )


# ---------------------------------------------------------------------------------------------
# a hand-made Result on a known grid


MPP = 0.499
PS0 = 256


def _result(att: np.ndarray | None = None, kept: np.ndarray | None = None) -> Result:
    """6 tissue patches on a 4 x 5 grid at 0.499 µm/px, classes normal / tumor."""
    index = np.array([[0, 1], [1, 1], [1, 2], [2, 0], [2, 3], [3, 4]], np.int64)
    coords = index[:, ::-1] * PS0
    grid = PatchGrid.from_coords(coords, PS0, (5 * PS0 + 17, 4 * PS0 + 9), MPP, slide_name="fake")
    n = len(coords)
    if kept is None:
        kept = np.array([1, 1, 0, 1, 0, 1], bool)
    mask = np.stack([kept, kept & (np.arange(n) % 2 == 1)], 1)
    if att is None:
        att = np.full((n, 2), np.nan, np.float32)
        a0 = np.array([0.1, 0.5, 0.0, 0.15, 0.0, 0.25], np.float32)
        att[mask[:, 0], 0] = a0[mask[:, 0]] / a0[mask[:, 0]].sum()
        att[mask[:, 1], 1] = np.array([0.2, 0.5, 0.3], np.float32)  # rows 1, 3, 5
    return Result(
        slide_name="fake", slide_path="/slides/fake.svs", classes=["normal", "tumor"],
        probabilities=np.array([0.3, 0.7]), prediction_index=1, coords=coords,
        grid_index=index, lipn_mask=mask, kept=kept, attention=att,
        scores=np.where(np.isnan(att), np.nan, 0.0).astype(np.float32),
        features=np.zeros((int(kept.sum()), 8), np.float32), feature_index=np.flatnonzero(kept),
        failed=np.zeros(0, np.int64), use_lipn=True, timings=dict.fromkeys(("tissue", "lipn", "total"), 0.1),
        grid=grid, mpp=MPP, patch_size_level0=PS0, model_name="m.safetensors", model_sha256="abc123",
    )  # fmt: skip


def _slide_layer() -> Image:
    """Stands in for our reader's slide layer: scale (mpp, mpp), translate 0."""
    return Image(np.zeros((4 * PS0 + 9, 5 * PS0 + 17), np.uint8), scale=(MPP, MPP))


def _layer(data_kwargs_kind):
    data, kwargs, kind = data_kwargs_kind
    return {"image": Image, "labels": Labels, "points": Points}[kind](data, **kwargs)


# ---------------------------------------------------------------------------------------------


def test_heatmap_pixels_cover_exactly_their_patches_slide_pixels():
    r = _result()
    slide = _slide_layer()
    heat = _layer(_layers.heatmap_layer(r, "tumor"))
    np.testing.assert_allclose(heat.scale, (PS0 * MPP, PS0 * MPP))
    for (x0, y0), (row, col) in zip(r.coords, r.grid_index):
        # the patch's top-left corner is the slide's pixel (y0, x0) top-left corner, in µm
        corner = heat.data_to_world((row - 0.5, col - 0.5))
        np.testing.assert_allclose(slide.world_to_data(corner), (y0 - 0.5, x0 - 0.5), atol=1e-6)
        np.testing.assert_allclose(corner, (y0 * MPP - MPP / 2, x0 * MPP - MPP / 2), atol=1e-9)
        # first and last slide pixel of the patch fall in its heatmap pixel, the next one outside
        for dy, dx, expect in ((0, 0, (row, col)), (PS0 - 1, PS0 - 1, (row, col)), (PS0, PS0, (row + 1, col + 1))):
            d = heat.world_to_data(slide.data_to_world((y0 + dy, x0 + dx)))
            assert tuple(np.floor(np.asarray(d) + 0.5).astype(int)) == expect


def test_lipn_decision_values_and_layer():
    r = _result()
    data, kwargs, kind = _layers.lipn_layer(r)
    assert kind == "labels" and kwargs["name"] == "LIPN decision"
    rows, cols = r.grid.shape
    assert data.shape == (rows, cols)
    expect = np.zeros((rows, cols), np.uint8)
    expect[r.grid_index[:, 0], r.grid_index[:, 1]] = np.where(r.kept, 2, 1)
    np.testing.assert_array_equal(data, expect)
    layer = _layer((data, kwargs, kind))
    cmap = layer.colormap.map(np.array([0, 1, 2]))
    assert cmap[0, 3] == 0 and cmap[1, 3] > 0 and cmap[2, 3] > 0  # no tissue is transparent
    assert not np.allclose(cmap[1], cmap[2])  # kept and discarded differ
    assert list(layer.features["decision"]) == [_layers.LIPN_LEGEND[v] for v in (0, 1, 2, 3)]
    assert kwargs["metadata"]["kept_per_class"] == {"normal": 4, "tumor": 3}
    assert kwargs["metadata"]["kept_as_neighbour"] == 0
    # patches kept only through LIPN's dilation get their own value and colour
    r.neighbour = r.kept & (np.arange(len(r.kept)) % 2 == 0)
    assert r.neighbour.any() and not r.neighbour.all()
    grown, kwargs, _ = _layers.lipn_layer(r)
    expect[r.grid_index[:, 0], r.grid_index[:, 1]] = np.where(r.neighbour, 3, np.where(r.kept, 2, 1))
    np.testing.assert_array_equal(grown, expect)
    assert kwargs["metadata"]["kept_as_neighbour"] == int(r.neighbour.sum())
    cmap = _layer((grown, kwargs, "labels")).colormap.map(np.array([2, 3]))
    assert cmap[1, 3] > 0 and not np.allclose(cmap[0], cmap[1])


@pytest.mark.parametrize("mode", ["raw", "percentile"])
def test_normalise_attention(mode):
    v = np.array([0.05, np.nan, 0.6, 0.2, 0.15, np.nan], np.float32)
    y = _layers.normalise_attention(v, mode)
    assert np.isnan(y[[1, 5]]).all() and np.isfinite(y[[0, 2, 3, 4]]).all()
    assert y[0] == 0.0 and y[2] == 1.0
    assert list(np.argsort(y[[0, 2, 3, 4]])) == list(np.argsort(v[[0, 2, 3, 4]]))  # order kept
    if mode == "raw":
        assert y[3] == pytest.approx((0.2 - 0.05) / (0.6 - 0.05))
    else:  # ranks 0, 3, 2, 1 of 4 -> evenly spaced
        np.testing.assert_allclose(y[[0, 4, 3, 2]], [0, 1 / 3, 2 / 3, 1], atol=1e-6)
    t = _layers.normalise_attention(v, mode, threshold=0.5)
    assert np.isnan(t[[0, 1, 4, 5]]).all() and t[2] == 1.0
    assert (np.isnan(t) | (t >= 0.5)).all()


def test_normalise_attention_edge_cases():
    np.testing.assert_array_equal(_layers.normalise_attention(np.array([np.nan, 0.3]), "raw")[1:], [1.0])
    np.testing.assert_array_equal(_layers.normalise_attention(np.array([0.2, 0.2]), "percentile"), [0.5, 0.5])
    assert np.isnan(_layers.normalise_attention(np.full(3, np.nan), "raw")).all()
    with pytest.raises(ValueError, match="normalisation"):
        _layers.normalise_attention(np.ones(2), "zscore")


def test_heatmap_layer_nan_outside_pooled_tissue_and_metadata():
    r = _result()
    data, kwargs, kind = _layers.heatmap_layer(r, 1, normalisation="raw", colormap="viridis", opacity=0.4)
    assert kind == "image" and kwargs["name"] == "attention: tumor" and data.dtype == np.float32
    assert kwargs["contrast_limits"] == (0.0, 1.0) and kwargs["blending"] == "translucent"
    pooled = r.lipn_mask[:, 1] & r.kept
    vals = data[r.grid_index[:, 0], r.grid_index[:, 1]]
    assert np.isfinite(vals[pooled]).all() and np.isnan(vals[~pooled]).all()
    assert np.isfinite(data).sum() == pooled.sum()  # off-tissue cells are NaN too
    assert np.nanmin(data) == 0.0 and np.nanmax(data) == 1.0
    meta = kwargs["metadata"]
    assert meta["slide_path"] == "/slides/fake.svs" and meta["class"] == "tumor"
    assert meta["patch_size_um"] == pytest.approx(PS0 * MPP) and meta["mpp"] == MPP
    assert meta["model"] == "m.safetensors" and meta["model_sha256"] == "abc123"
    with pytest.raises(ValueError, match="unknown class"):
        _layers.heatmap_layer(r, "stroma")


def test_top_k_and_points_at_patch_centres():
    r = _result()
    top = _layers.top_k(r, "normal", 3)
    a = r.attention[:, 0]
    assert list(top) == list(np.argsort(-np.nan_to_num(a, nan=-1))[:3])
    low = _layers.top_k(r, "normal", 10, lowest=True)
    assert len(low) == np.isfinite(a).sum() and a[low[0]] == np.nanmin(a)  # never a NaN patch
    data, kwargs, kind = _layers.topk_layer(r, "normal", 3)
    assert kind == "points" and kwargs["name"] == "top-k: normal" and data.shape == (3, 2)
    np.testing.assert_allclose(kwargs["features"]["attention"], a[top])
    heat = _layer(_layers.heatmap_layer(r, "normal"))
    for (y, x), i in zip(data, top):
        np.testing.assert_allclose(heat.world_to_data((y, x)), r.grid_index[i], atol=1e-9)
    slide = _slide_layer()
    x0, y0 = r.coords[top[0]]
    centre_px = slide.world_to_data(data[0])  # centre of the patch's slide pixels
    np.testing.assert_allclose(centre_px, (y0 + (PS0 - 1) / 2, x0 + (PS0 - 1) / 2), atol=1e-6)


def test_bottom_k_never_repeats_a_top_k_patch():
    r = _result()  # tumor pooled rows 1, 3, 5 (attention 0.2, 0.5, 0.3)
    assert list(_layers.top_k(r, "tumor", 2)) == [3, 5]
    assert list(_layers.bottom_k(r, "tumor", 2)) == [1]  # the lowest two would repeat row 5
    assert list(_layers.bottom_k(r, "tumor", 1)) == [1]
    data, kwargs, _ = _layers.topk_layer(r, "tumor", 2, lowest=True)
    assert kwargs["metadata"]["rows"] == [1] and data.shape == (1, 2)


def test_result_layers_names_and_visibility():
    r = _result()
    layers = _layers.result_layers(r, k=2)
    names = [kw["name"] for _, kw, _ in layers]
    assert names == ["LIPN decision", "attention: normal", "attention: tumor", "bottom-k: tumor", "top-k: tumor"]
    visible = {kw["name"]: kw["visible"] for _, kw, kind in layers if kind == "image"}
    assert visible == {"attention: normal": False, "attention: tumor": True}  # the predicted class
    lipn = layers[0][1]
    assert not lipn["visible"] and lipn["metadata"]["outline"]  # one overlay at a time: the heatmap
    assert all(kw["units"] == ("µm", "µm") for _, kw, _ in layers)
    r.use_lipn = False  # HDMIL†: no LIPN decision to show
    assert [kw["name"] for _, kw, _ in _layers.result_layers(r, k=2)][0] == "attention: normal"


def test_result_warnings():
    """The panel's words are a pathologist's; the report's (``result.errors``) are not repeated."""
    assert _layers.result_warnings(_result()) == []
    nothing = _result(kept=np.zeros(6, bool), att=np.full((6, 2), np.nan, np.float32))
    nothing.errors = ["warning: LIPN kept no patch of /s.svs: no HR patch was read and every class "
                      "was scored from an empty (zero) embedding"]
    assert _layers.result_warnings(nothing) == [
        "The pre-screen chose no patch to read at high magnification, so no tissue was looked at "
        "closely and every class's score is uninformative."
    ]
    att = _result().attention.copy()
    att[:, 1] = np.nan
    one = _result(att=att)
    one.errors = ["warning: class 'tumor' pooled no patch of /s.svs; its score comes from an empty (zero) embedding",
                  "warning: something else"]
    w = _layers.result_warnings(one)
    assert w == ["No patch was kept for tumor, so its score is uninformative.", "something else"]
    assert not any("embedding" in line or "pooled" in line for line in w)


def test_prototype_layer_alignment():
    from hdmil.slpd_index import PrototypeMap

    labels = np.array([[0, 1], [2, 3]], np.int32)
    size = 16 * PS0
    data, kwargs, kind = _layers.prototype_layer(PrototypeMap(labels, size), MPP, "/s.svs")
    layer = _layer((data, kwargs, kind))
    slide = _slide_layer()
    # region (1, 1) covers level-0 [size, 2 size) in x and y
    for px in (size, 2 * size - 1):
        d = layer.world_to_data(slide.data_to_world((px, px)))
        assert tuple(np.floor(np.asarray(d) + 0.5).astype(int)) == (1, 1)
    assert kwargs["metadata"]["n_prototypes"] == 3


def test_layers_from_a_real_run_on_the_cmu_slide(cmu_slide, tmp_path):
    from hdmil.checkpoint import load_model
    from hdmil.pipeline import run_slide

    model = load_model(make_checkpoint(tmp_path / "tiny.safetensors", cmu_slide))
    r = run_slide(cmu_slide, model, batch_size=32)
    assert 0 < r.n_kept < r.n_patches
    layers = {kw["name"]: (d, kw, k) for d, kw, k in _layers.result_layers(r, k=4)}
    lipn = layers["LIPN decision"][0]
    assert (lipn == 2).sum() == r.n_kept and (lipn == 1).sum() == r.n_patches - r.n_kept
    slide = Image(np.zeros((2967, 2220), np.uint8), scale=(r.mpp, r.mpp))
    heat = _layer(layers[f"attention: {r.prediction}"])
    x0, y0 = r.coords[np.flatnonzero(r.kept)[0]]
    d = heat.world_to_data(slide.data_to_world((y0, x0)))
    row, col = np.floor(np.asarray(d) + 0.5).astype(int)
    assert lipn[row, col] == 2



def test_rank_labels_are_readable_at_every_zoom():
    # a 128 µm patch: at 2 px/µm (256 px on screen) the largest label, at 0.5 a share of it
    assert _layers.rank_text_size(128.0, 2.0) == (_layers.RANK_TEXT_PX[1], True)
    assert _layers.rank_text_size(128.0, 0.5) == (pytest.approx(0.3 * 64), True)
    # small on screen: never below the smallest readable size, hidden once neighbours would overlap
    assert _layers.rank_text_size(128.0, 0.15) == (_layers.RANK_TEXT_PX[0], True)  # 19 px patch
    assert _layers.rank_text_size(128.0, 0.1) == (_layers.RANK_TEXT_PX[0], False)  # 12.8 px patch


def test_an_empty_heatmap_says_why_in_plain_words():
    from types import SimpleNamespace

    att = _result().attention.copy()
    att[:, 1] = np.nan  # tumor pooled no patch
    r = _result(att=att)
    _, kwargs, _ = _layers.heatmap_layer(r, "tumor")
    assert kwargs["metadata"]["note"] == "No patch was kept for tumor, so its score is uninformative."
    assert "note" not in _layers.heatmap_layer(r, "normal")[1]["metadata"]
    empty = SimpleNamespace(hover=_layers.heatmap_hover(r, "tumor"))
    assert _layers.hover_text(empty, (1, 1), world=False) == " · No patch was kept for tumor, so its score is uninformative."
    assert _layers.hover_text(empty, (40, 40), world=False) == ""  # off the grid: nothing
    full = SimpleNamespace(hover=_layers.heatmap_hover(r, "normal"))
    assert _layers.hover_text(full, (1, 1), world=False).startswith(" · normal: attention ")
