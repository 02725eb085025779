"""LIPN's kept-budget calibration (``hdmil.train.calibration.calibrate_kept``) on cases whose answer
is known, and the distillation temperature of LIPN's soft targets."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hdmil.errors import HDMILError
from hdmil.models.lipn import LIPN, LIPNConfig
from hdmil.train.calibration import calibrate_kept
from hdmil.train.config import KeptBudget, LIPNTrainConfig, calibration_from_dict
from hdmil.train.options import LIPN_OPTIONS, add_options, config_from_args


class _Table(LIPN):
    """A LIPN whose P per slide is given: ``lr_patches`` below hands it the slide's id."""

    def __init__(self, probs: dict[str, np.ndarray], dilation: tuple[int, ...] | None = None):
        super().__init__(LIPNConfig(n_classes=2, dilation=dilation))
        self.table = probs

    def probabilities(self, lr_uint8, batch_size: int = 4096) -> torch.Tensor:
        return torch.as_tensor(self.table[lr_uint8], dtype=torch.float32)


class _Bags:
    """Each slide one row of patches; ``lr_patches`` and ``features`` are the slide's id."""

    def __init__(self, cols: int) -> None:
        self.cols = cols

    def __getitem__(self, sid: str) -> SimpleNamespace:
        return SimpleNamespace(features=sid)

    def lr_patches(self, sid: str) -> str:
        return sid

    def grid_index(self, sid: str) -> np.ndarray:
        return np.stack([np.zeros(self.cols, int), np.arange(self.cols)], axis=1)


def _case(weights: dict[str, np.ndarray], cols: int = 10):
    """DMIN and cohort stand-ins: DMIN's attention per slide is given."""
    dmin = SimpleNamespace(predict=lambda f, m: SimpleNamespace(
        attention=torch.as_tensor(weights[f], dtype=torch.float32)))
    bags = _Bags(cols)
    return dmin, SimpleNamespace(require_bags=lambda: bags)


def _one_slide():
    """Ten patches. Class 0's attention is spread thin (0.1 each); class 1's sits on patches 8, 9
    (0.5 each). Class 0's P falls along the row and class 1's rises: each ranks its own end first."""
    p = np.stack([np.linspace(0.95, 0.05, 10), np.linspace(0.01, 0.99, 10)], axis=1)
    w = np.stack([np.full(10, 0.1), np.r_[np.zeros(8), 0.5, 0.5]], axis=1)
    return {"s": p}, {"s": w}


def test_the_budget_goes_where_attention_is_dense():
    probs, weights = _one_slide()
    dmin, cohort = _case(weights)
    lipn = _Table(probs)
    out = calibrate_kept(lipn, dmin, cohort, ["s"], ratio=0.2)
    keep = lipn.keep_from(torch.as_tensor(probs["s"], dtype=torch.float32))[1].numpy()
    # two patches may be read: class 1's two hold all its attention, class 0's two 0.2 of its own
    assert keep.any(axis=1).tolist() == [False] * 8 + [True, True]
    assert out["kept_ratio"] == pytest.approx(0.2)
    assert out["attention_held"] == pytest.approx([0.0, 1.0])
    assert lipn.cfg.class_thresholds == tuple(out["class_thresholds"]) and not out["over_budget"]
    # a larger budget spends the rest on the spread class: its first four patches
    wide = calibrate_kept(lipn, dmin, cohort, ["s"], ratio=0.6)
    keep = lipn.keep_from(torch.as_tensor(probs["s"], dtype=torch.float32))[1].numpy()
    assert keep[:, 0].tolist() == [True] * 4 + [False] * 6
    assert wide["kept_ratio"] == pytest.approx(0.6)
    assert wide["attention_held"] == pytest.approx([0.4, 1.0])


def test_the_budget_counts_the_dilation():
    """Class 1 grows by one ring: keeping patch 9 reads patch 8 too, inside the same budget."""
    probs, weights = _one_slide()
    dmin, cohort = _case(weights)
    lipn = _Table(probs, dilation=(0, 1))
    out = calibrate_kept(lipn, dmin, cohort, ["s"], ratio=0.2)
    index = cohort.require_bags().grid_index("s")
    keep = lipn.keep_from(torch.as_tensor(probs["s"], dtype=torch.float32), index)[1].numpy()
    assert keep.any(axis=1).tolist() == [False] * 8 + [True, True]
    assert out["kept_ratio"] == pytest.approx(0.2) and out["dilation"] == [0, 1]
    assert out["attention_held"] == pytest.approx([0.0, 1.0])
    # without the ring the same thresholds would keep patch 9 alone for class 1
    plain = (torch.as_tensor(probs["s"]) > torch.tensor(out["class_thresholds"])).numpy()
    assert plain[:, 1].sum() == 1


def test_the_budget_is_an_average_over_slides():
    """Two slides: one with class 1 attention on a few patches, one without any (a normal
    slide); the kept share is the mean of the two slides' shares."""
    p1, w1 = _one_slide()
    p2 = {"n": np.stack([np.linspace(0.95, 0.05, 10), np.full(10, 0.02)], axis=1)}
    w2 = {"n": np.stack([np.full(10, 0.1), np.zeros(10)], axis=1)}
    probs, weights = {**p1, **p2}, {**w1, **w2}
    dmin, cohort = _case(weights)
    lipn = _Table(probs)
    out = calibrate_kept(lipn, dmin, cohort, ["s", "n"], ratio=0.3)
    kept = [lipn.keep_from(torch.as_tensor(probs[s], dtype=torch.float32))[1].any(dim=1)
            .float().mean().item() for s in ("s", "n")]
    assert out["kept_ratio"] == pytest.approx(np.mean(kept)) and out["kept_ratio"] <= 0.3
    assert out["attention_held"][1] == pytest.approx(1.0)  # only slide "s" attends to class 1


def test_a_budget_too_small_for_any_step_still_keeps_something_and_says_so():
    """P tied over every patch of a class: its first candidate keeps all of them. With no step
    inside the budget the cheapest is taken, never a LIPN that keeps nothing."""
    p = {"s": np.stack([np.full(10, 0.4), np.r_[np.full(5, 0.3), np.full(5, 0.9)]], axis=1)}
    w = {"s": np.stack([np.full(10, 0.1), np.r_[np.zeros(5), np.full(5, 0.2)]], axis=1)}
    dmin, cohort = _case(w)
    lipn = _Table(p)
    out = calibrate_kept(lipn, dmin, cohort, ["s"], ratio=0.2)
    keep = lipn.keep_from(torch.as_tensor(p["s"], dtype=torch.float32))[1].numpy()
    assert out["over_budget"] and out["kept_ratio"] == pytest.approx(0.5)
    assert keep.any(axis=1).tolist() == [False] * 5 + [True] * 5  # class 1's five, not all ten
    assert not calibrate_kept(lipn, dmin, cohort, ["s"], ratio=0.5)["over_budget"]
    with pytest.raises(HDMILError, match="lipn_kept must be in"):
        calibrate_kept(lipn, dmin, cohort, ["s"], ratio=1.5)
    with pytest.raises(HDMILError, match="kept budget must be in"):
        KeptBudget(0.0)


def test_the_kept_budget_and_target_temperature_come_from_the_command_line():
    parser = argparse.ArgumentParser()
    add_options(parser, LIPN_OPTIONS, LIPNTrainConfig)
    args = parser.parse_args(["--kept", "0.5", "--soft-targets", "--target-temperature", "3"])
    cfg = config_from_args(LIPNTrainConfig, LIPN_OPTIONS, args)
    assert cfg.calibration == KeptBudget(0.5) and cfg.target_temperature == 3.0
    assert calibration_from_dict(cfg.to_dict()["calibration"]) == KeptBudget(0.5)
    assert LIPNTrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SystemExit):  # one calibration at a time
        parser.parse_args(["--kept", "0.5", "--attention", "0.9"])
    with pytest.raises(HDMILError, match="targets='soft'"):
        LIPNTrainConfig(target_temperature=3.0)
    with pytest.raises(HDMILError, match="> 0"):
        LIPNTrainConfig(targets="soft", target_temperature=0.0)


def test_soft_targets_at_a_temperature_keep_dmin_s_boundary():
    """σ(s/(T·τ)): the same patches lie above 0.5 at every T; far above it, T spreads them."""
    from hdmil.train.lipn_trainer import hr_targets

    s = torch.tensor([[-6.0, 9.0], [-0.5, 3.0], [0.5, 12.0]])
    dmin = SimpleNamespace(cfg=SimpleNamespace(tau=0.7), eval=lambda: None,
                           predict=lambda f, m: SimpleNamespace(scores=s))
    bags = _Bags(3)
    cohort = SimpleNamespace(require_bags=lambda: bags)
    t1 = hr_targets(dmin, cohort, ["a"], soft=True)["a"]
    t3 = hr_targets(dmin, cohort, ["a"], soft=True, temperature=3.0)["a"]
    assert torch.allclose(t3, torch.sigmoid(s / 2.1))
    assert torch.equal(t1 > 0.5, t3 > 0.5)
    # s = 9 and s = 12 are both ≈ 1 at T = 1 (within 1e-5); at T = 3 they stay apart
    assert float(t1[2, 1] - t1[0, 1]) < 1e-5 < 1e-2 < float(t3[2, 1] - t3[0, 1])
