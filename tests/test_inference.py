"""``hdmil.inference``: one bag in, one prediction out, HDMIL (LIPN's mask, then DMIN) or HDMIL†
(DMIN over its own mask); the same function evaluation, the recipe and the pipeline rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hdmil.checkpoint import HDMILModel
from hdmil.errors import CheckpointError
from hdmil.inference import dmin_pool, lipn_screen, predict_bag, screen_all
from hdmil.models import DMIN, DMINConfig
from hdmil.models.lipn import dilate_mask
from helpers import calibrated_lipn

N, D = 48, 8


@pytest.fixture(scope="module")
def bag():
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (N, 16, 16, 3), dtype=np.uint8)
    features = rng.normal(size=(N, D)).astype(np.float32)
    index = np.stack(np.divmod(np.arange(N), 8), axis=1).astype(np.int64)  # a 6 x 8 grid
    return features, lr, index


@pytest.fixture(scope="module")
def model(bag):
    torch.manual_seed(1)
    dmin = DMIN(DMINConfig(in_dim=D, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3)).eval()
    lipn = calibrated_lipn(bag[1], (0.35, 0.2)).eval()
    return HDMILModel(dmin=dmin, lipn=lipn, config={}, classes=["normal", "tumor"],
                      path=Path("m.safetensors"), sha256="")


def test_hdmil_pools_each_class_over_lipns_mask(model, bag):
    features, lr, index = bag
    pred = predict_bag(model, features, lr, index)
    mask = model.lipn.keep_mask(lr).numpy()
    assert 0 < mask.sum() < mask.size  # a proper subset, else the test proves nothing
    np.testing.assert_array_equal(pred.lipn_mask, mask)
    np.testing.assert_array_equal(pred.kept, mask.any(axis=1))
    np.testing.assert_array_equal(pred.dmin_mask, mask)  # DMIN pooled exactly LIPN's sets
    assert not pred.neighbour.any()  # no dilation
    expect = model.dmin.predict(torch.from_numpy(features), torch.from_numpy(mask))
    np.testing.assert_array_equal(pred.probabilities, expect.probabilities.numpy())
    np.testing.assert_array_equal(np.isnan(pred.attention), ~mask)
    np.testing.assert_array_equal(pred.scores, expect.scores.numpy())
    assert pred.kept_ratio == pytest.approx(mask.any(axis=1).mean())
    assert pred.prediction == int(expect.probabilities.argmax()) and pred.use_lipn


def test_hdmil_dagger_pools_over_dmins_own_mask(model, bag):
    features = bag[0]
    pred = predict_bag(model, features, use_lipn=False)
    expect = model.dmin.predict(features, mask=None)
    np.testing.assert_array_equal(pred.probabilities, expect.probabilities.numpy())
    assert pred.lipn_mask.all() and pred.kept.all() and not pred.neighbour.any()
    np.testing.assert_array_equal(pred.dmin_mask, expect.scores.numpy() > 0)
    assert pred.kept_ratio == pytest.approx(expect.kept_ratio)
    assert not pred.use_lipn


def test_a_dilating_lipn_needs_the_grid_and_marks_neighbours(model, bag):
    import copy

    features, lr, index = bag
    grown = copy.deepcopy(model)
    grown.lipn.cfg.dilation = (0, 1)
    with pytest.raises(ValueError, match="grid index"):
        predict_bag(grown, features, lr)
    pred = predict_bag(grown, features, lr, index)
    plain = model.lipn.keep_mask(lr).numpy()
    np.testing.assert_array_equal(pred.lipn_mask, dilate_mask(plain, index, (0, 1)))
    np.testing.assert_array_equal(pred.neighbour, pred.kept & ~plain.any(axis=1))
    assert pred.neighbour.any()


def test_bad_calls(model, bag):
    features, lr, _ = bag
    no_lipn = HDMILModel(dmin=model.dmin, lipn=None, config={}, classes=model.classes,
                         path=Path("dmin.safetensors"), sha256="")
    with pytest.raises(CheckpointError, match="dmin.safetensors.*no LIPN"):
        predict_bag(no_lipn, features, lr)
    with pytest.raises(ValueError, match="LR patches"):
        predict_bag(model, features)


def test_the_two_pieces_make_the_whole(model, bag):
    """The pipeline screens first and pools only what it read: the same prediction."""
    features, lr, index = bag
    screen = lipn_screen(model.lipn, lr, index)
    rows = np.flatnonzero(screen.kept)
    part = dmin_pool(model.dmin, features[rows], screen.mask[rows])
    whole = predict_bag(model, features, lr, index)
    np.testing.assert_allclose(part.probabilities, whole.probabilities, rtol=0, atol=1e-6)
    np.testing.assert_allclose(part.attention, whole.attention[rows], rtol=0, atol=1e-6)
    everything = screen_all(5, 3)
    assert everything.mask.shape == (5, 3) and everything.kept.all() and not everything.neighbour.any()
