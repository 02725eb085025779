"""LIPN (docs/method.md §4): architecture, input scaling, masks and its loss."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from hdmil.models import LIPN, LIPNConfig, create_model, lipn_loss
from hdmil.models.lipn import UIBlock


def _lipn(seed: int = 0, **kw) -> LIPN:
    torch.manual_seed(seed)
    model = LIPN(LIPNConfig(**kw))
    # non-trivial BatchNorm statistics, so eval mode differs from training mode
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 3, 16, 16) * 0.3)
    return model.eval()


def _lr(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def _lipn_on_lr(**kw) -> LIPN:
    """A random LIPN whose BatchNorm holds the statistics of random LR patches, so its eval
    probabilities differ from patch to patch."""
    torch.manual_seed(0)
    model = LIPN(LIPNConfig(**kw)).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model(LIPN.prepare(_lr(256, seed=1)))
    return model.eval()


def test_output_shape_and_spatial_size_per_stage() -> None:
    model = _lipn(n_classes=3)
    sizes: list[tuple[int, int, int]] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
        for m in [*model.stem, *model.blocks]
    ]
    logits = model(torch.zeros(5, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert logits.shape == (5, 3)
    assert sizes == [(16, 8, 8), (16, 4, 4), (16, 4, 4), (48, 2, 2), (24, 2, 2), (48, 1, 1), (64, 1, 1)]


def test_uib_blocks_follow_the_spec() -> None:
    model = LIPN()
    (b1, b2) = model.blocks
    for block, cin, cout, ka, kb in ((b1, 24, 48, 5, 5), (b2, 48, 64, 3, 3)):
        start, expand, mid, project = block.start_dw[0], block.expand[0], block.mid_dw[0], block.project[0]
        assert start.kernel_size == (ka, ka) and start.groups == cin and start.stride == (1, 1)
        assert expand.in_channels == cin and expand.out_channels == 2 * cin and expand.kernel_size == (1, 1)
        assert mid.kernel_size == (kb, kb) and mid.groups == 2 * cin and mid.stride == (2, 2)
        assert project.out_channels == cout and project.kernel_size == (1, 1)
        assert not block.residual
    # every conv is followed by BatchNorm; which ReLUs follow is pinned in test_reference_parity.py
    for seq in (m for m in model.modules() if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv2d)):
        assert isinstance(seq[1], nn.BatchNorm2d)
    assert model.head[0].in_channels == 64 and model.head[0].out_channels == 64
    assert model.fc.in_features == 64 and model.fc.out_features == 2
    assert sum(p.numel() for p in model.parameters()) < 100_000  # tiny on purpose


def test_uib_residual_when_shape_is_kept() -> None:
    torch.manual_seed(0)
    block = UIBlock(8, 8, 3, 3, stride=1).eval()
    x = torch.randn(2, 8, 5, 5)
    inner = block.project(block.mid_dw(block.expand(block.start_dw(x))))
    torch.testing.assert_close(block(x), x + inner)


def test_prepare_scales_and_moves_channels() -> None:
    lr = _lr(4)
    lr[0, 0, 0] = (0, 255, 128)
    x = LIPN.prepare(lr)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 16, 16)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-0.5, 0.5, 128 / 255 - 0.5]))
    np.testing.assert_allclose(x.numpy(), lr.transpose(0, 3, 1, 2) / 255.0 - 0.5, atol=1e-6)
    torch.testing.assert_close(LIPN.prepare(torch.from_numpy(lr)), x)
    with pytest.raises(ValueError, match="uint8"):
        LIPN.prepare(np.zeros((4, 3, 16, 16), np.uint8))


def test_batch_and_one_at_a_time_agree_in_eval() -> None:
    model = _lipn()
    lr = _lr(9)
    x = LIPN.prepare(lr)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[j : j + 1]) for j in range(9)])
    torch.testing.assert_close(single, batch, atol=1e-5, rtol=1e-4)
    assert torch.equal(model.keep_mask(lr, batch_size=2), model.keep_mask(lr))


def test_keep_mask_is_eval_threshold_and_restores_mode() -> None:
    model = _lipn(n_classes=2)
    model.train()
    lr = _lr(50, seed=3)
    mask = model.keep_mask(lr)
    assert model.training
    assert mask.dtype == torch.bool and mask.shape == (50, 2)
    model.eval()
    with torch.no_grad():
        expected = model(LIPN.prepare(lr)) > 0  # sigmoid(l / τ) > 0.5  <=>  l > 0
    assert torch.equal(mask, expected)
    assert model.keep_mask(np.zeros((0, 16, 16, 3), np.uint8)).shape == (0, 2)


def test_soft_mask_is_straight_through_sigmoid() -> None:
    model = LIPN(LIPNConfig(tau=0.7))
    logits = torch.randn(20, 2, requires_grad=True)
    mask = model.soft_mask(logits)
    assert torch.equal(mask.detach(), (logits > 0).float())
    weights = torch.randn(20, 2)
    (g,) = torch.autograd.grad((mask * weights).sum(), logits)
    p = torch.sigmoid(logits.detach() / 0.7)
    torch.testing.assert_close(g, weights * p * (1 - p) / 0.7)


def test_lipn_loss_terms() -> None:
    target = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1]], dtype=torch.bool)
    same = target.float().requires_grad_(True)
    total, terms = lipn_loss(same, target)
    assert total.item() == 0.0 and terms["l1"] == 0.0 and terms["rate"] == 0.0

    lr = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.float32, requires_grad=True)
    total, terms = lipn_loss(lr, target)
    # class 0 disagrees on 2 of 4, class 1 on 2 of 4 -> mean L1 0.5; kept ratios 0.5 vs 0.75
    assert terms["l1"] == pytest.approx(0.5)
    assert terms["kept_ratio_lr"] == pytest.approx(0.5) and terms["kept_ratio_hr"] == pytest.approx(0.75)
    assert terms["rate"] == pytest.approx(0.0625)
    assert total.item() == pytest.approx(0.5625)
    total.backward()
    assert lr.grad.abs().sum() > 0


def test_lipn_loss_cross_entropy_ranks_a_rare_positive_higher_than_l1() -> None:
    """match='bce': per-class mean binary cross-entropy in place of L1; unlike L1 its gradient
    grows for a rare positive scored low, which is what lifts LIPN's recall of small tumours."""
    target = torch.tensor([[0.9, 0.1], [0.2, 0.0], [0.0, 0.0], [0.1, 0.0]])
    probs = torch.tensor([[0.3, 0.2], [0.2, 0.1], [0.1, 0.1], [0.1, 0.1]], requires_grad=True)
    total, terms = lipn_loss(probs, target, match="bce")
    want = torch.nn.functional.binary_cross_entropy(probs.detach(), target, reduction="none").mean(0).mean()
    assert terms["l1"] == pytest.approx(float(want), rel=1e-5)
    total.backward()
    bce_push = float(-probs.grad[0, 0])  # the rare positive, scored 0.3 against 0.9
    probs.grad = None
    lipn_loss(probs, target, match="l1")[0].backward()
    assert bce_push > float(-probs.grad[0, 0]) > 0
    with pytest.raises(ValueError, match="match"):
        lipn_loss(probs, target, match="l2")


def test_lipn_loss_trains_logits_through_soft_mask() -> None:
    model = _lipn().train()
    lr = LIPN.prepare(_lr(32))
    target = torch.ones(32, 2, dtype=torch.bool)
    loss, _ = lipn_loss(model.soft_mask(model(lr)), target)
    loss.backward()
    assert model.stem[0][0].weight.grad.abs().sum() > 0


def test_config_round_trip_is_json() -> None:
    cfg = LIPNConfig(n_classes=3)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert LIPNConfig.from_dict(d) == cfg
    assert isinstance(create_model("lipn", **d), LIPN)
    with pytest.raises(ValueError, match="unknown LIPN config keys"):
        LIPNConfig.from_dict({"n_classes": 2, "width": 3})


@pytest.mark.parametrize("views", [4, 8])
def test_averaged_views_are_orientation_free(views: int) -> None:
    """With views=4 (quarter turns) P does not change when the LR patches are turned; with views=8
    (also mirrored) not when they are mirrored either; with one view it does. P equals the mean
    of the single-view probabilities over those orientations."""
    plain = _lipn_on_lr()
    averaged = LIPN(dataclasses.replace(plain.cfg, views=views))
    averaged.load_state_dict(plain.state_dict())
    lr = _lr(24)
    turned = np.ascontiguousarray(np.rot90(lr, 1, axes=(1, 2)))
    mirrored = np.ascontiguousarray(lr[:, :, ::-1])
    p = averaged.probabilities(lr)
    torch.testing.assert_close(averaged.probabilities(turned), p, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(plain.probabilities(turned), plain.probabilities(lr), atol=1e-4)
    assert torch.allclose(averaged.probabilities(mirrored), p, atol=1e-6) == (views == 8)
    sides = (lr, lr[:, :, ::-1]) if views == 8 else (lr,)
    orientations = [np.ascontiguousarray(np.rot90(v, k, axes=(1, 2))) for v in sides for k in range(4)]
    manual = torch.stack([plain.probabilities(v) for v in orientations]).mean(0)
    torch.testing.assert_close(p, manual, atol=1e-6, rtol=1e-5)
    # the setting travels with the config (and so with the checkpoint)
    back = LIPNConfig.from_dict(json.loads(json.dumps(averaged.cfg.to_dict())))
    assert back.views == views
    with pytest.raises(ValueError, match="views"):
        LIPNConfig(views=2)


def test_dilate_mask_grows_each_class_by_its_rings_on_the_grid() -> None:
    """One kept patch in the middle of a 5 x 5 grid with a hole: ring 1 adds its 8 neighbours that
    are tissue patches (not the hole), ring 2 the whole square; a class with 0 rings is unchanged."""
    from hdmil.models.lipn import dilate_mask

    rows, cols = np.mgrid[0:5, 0:5]
    index = np.stack([rows.ravel(), cols.ravel()], 1) + 10  # anywhere on the slide's grid
    hole = (index[:, 0] == 11) & (index[:, 1] == 12)
    index = index[~hole]
    centre = (index[:, 0] == 12) & (index[:, 1] == 12)
    corner = (index[:, 0] == 10) & (index[:, 1] == 10)
    mask = np.stack([centre | corner, centre], 1)  # [24, 2]
    one = dilate_mask(mask, index, (0, 1))
    assert np.array_equal(one[:, 0], mask[:, 0])
    near = np.abs(index - 12).max(axis=1) <= 1
    assert np.array_equal(one[:, 1], near) and int(one[:, 1].sum()) == 8  # 9 cells minus the hole
    two = dilate_mask(mask, index, (1, 2))
    assert two[:, 1].all()
    assert np.array_equal(two[:, 0], near | (np.abs(index - 10).max(axis=1) <= 1))
    assert dilate_mask(mask[:0], index[:0], (1, 1)).shape == (0, 2)
    with pytest.raises(ValueError, match="index"):
        dilate_mask(mask, index[:5], (0, 1))


def test_keep_mask_dilates_with_the_grid_index() -> None:
    from hdmil.models.lipn import dilate_mask, grid_index

    model = _lipn_on_lr(n_classes=2)
    lr = _lr(40, seed=5)
    t1 = float(torch.quantile(model.probabilities(lr)[:, 1], 0.9))  # class 1 keeps a few patches
    grown = LIPN(dataclasses.replace(model.cfg, dilation=(0, 1), class_thresholds=(0.5, t1)))
    grown.load_state_dict(model.state_dict())
    coords = np.stack([np.arange(40) % 8, np.arange(40) // 8], 1) * 512  # level-0 (x, y)
    index = grid_index(coords, 512)
    assert np.array_equal(index[9], [1, 1])  # (row, col)
    plain = grown.probabilities(lr) > torch.tensor([0.5, t1])
    mask = grown.keep_mask(lr, index=index)
    assert torch.equal(mask, torch.from_numpy(dilate_mask(plain.numpy(), index, (0, 1))))
    assert bool((mask | ~plain).all()) and int(mask[:, 1].sum()) > int(plain[:, 1].sum())
    with pytest.raises(ValueError, match="grid index"):
        grown.keep_mask(lr)
    assert torch.equal(model.keep_mask(lr), model.keep_mask(lr, index=index))  # no dilation: no grid
    back = LIPNConfig.from_dict(json.loads(json.dumps(grown.cfg.to_dict())))
    assert back.dilation == (0, 1)
    with pytest.raises(ValueError, match="dilation"):
        LIPNConfig(n_classes=2, dilation=(1,))
    from hdmil.errors import FeatureFileError

    with pytest.raises(FeatureFileError, match="slide_7.h5.*no patch coords"):
        grid_index(None, 512, "slide_7.h5")
