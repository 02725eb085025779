"""Stain augmentation (``hdmil.augment``): what it changes and what it must leave alone."""

from __future__ import annotations

import numpy as np
import pytest

from hdmil.augment import REFERENCE_STAINS, StainJitter, apply_stain_matrix


def _dye_pixels(amounts_h: np.ndarray, amounts_e: np.ndarray) -> np.ndarray:
    """uint8 [N, 3] pixels holding the given haematoxylin / eosin amounts (Beer–Lambert)."""
    od = amounts_h[:, None] * REFERENCE_STAINS[0] + amounts_e[:, None] * REFERENCE_STAINS[1]
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.astype(np.float64) + 1.0) / 256.0)


def test_zero_strength_and_identity_matrix_leave_pixels_alone() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    assert StainJitter(0.0)(rgb, rng) is rgb
    # the round trip through optical density is exact to the uint8 step
    assert np.array_equal(apply_stain_matrix(rgb, np.eye(3)), rgb)


def test_glass_stays_white_and_dyes_change_amount_and_hue() -> None:
    rng = np.random.default_rng(1)
    white = np.full((16, 16, 3), 255, np.uint8)
    tissue = _dye_pixels(np.linspace(0.2, 1.2, 64), np.linspace(1.0, 0.1, 64)).reshape(8, 8, 3)
    jitter = StainJitter(strength=1.0)
    changed = 0
    for _ in range(20):
        m = jitter.sample(rng)
        assert np.array_equal(apply_stain_matrix(white, m), white)  # no dye, no absorbance
        out = apply_stain_matrix(tissue, m)
        assert out.shape == tissue.shape and out.dtype == np.uint8
        changed += int(np.abs(out.astype(int) - tissue).mean() > 2)
    assert changed >= 15  # most draws visibly restain the tissue


def test_scaling_only_multiplies_each_dyes_amount() -> None:
    """With no tilt, a pure haematoxylin pixel stays on the haematoxylin direction, scaled."""
    jitter = StainJitter(strength=1.0, tilt_sigma=0.0)
    h_only = _dye_pixels(np.array([0.3, 0.6, 0.9]), np.zeros(3))
    rng = np.random.default_rng(2)
    m = jitter.sample(rng)
    od_in, od_out = _od(h_only), _od(apply_stain_matrix(h_only, m))
    ratio = od_out / od_in  # every RGB channel scaled by the same factor
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(3, axis=1), rtol=0.05)
    factor = float(np.median(ratio))
    assert abs(factor - 1.0) > 0.01 and np.exp(-0.8) < factor < np.exp(0.8)  # within 4 sigma


def test_same_generator_state_same_result_and_per_item_differs() -> None:
    tissue = _dye_pixels(np.full(64, 0.6), np.full(64, 0.5)).reshape(1, 8, 8, 3).repeat(6, axis=0)
    a = StainJitter().per_item(tissue, np.random.default_rng(5))
    b = StainJitter().per_item(tissue, np.random.default_rng(5))
    assert np.array_equal(a, b)
    # one stain change per item: identical patches come out differently stained
    assert len({a[i].tobytes() for i in range(len(a))}) == len(a)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        StainJitter()(np.zeros((4, 4, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="strength"):
        StainJitter(strength=-1.0)
