"""Kept-ratio budget: LIPN's thresholds -> kept mask, count, ratio and predicted seconds; the
widget's numbers (hdmil.budget) are `hdmil predict --lipn-threshold`'s, and a run reads what the
budget kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hdmil.budget import (
    apply_budget, budget_for, budget_thresholds, checkpoint_thresholds, kept_budget, record_budget,
)
from hdmil.checkpoint import default_model_path, load_model
from hdmil.cli import main
from hdmil.errors import HDMILError
from hdmil.pipeline import prescreen, run_slide
from hdmil.pipeline.result import load_result


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_path())


@pytest.fixture(scope="module")
def ps(synthetic_slide, model):
    return prescreen(synthetic_slide, model)


def test_checkpoint_thresholds_give_lipns_own_mask(model, ps):
    b = budget_for(model, ps)
    assert b.setting["kind"] == "checkpoint"
    np.testing.assert_array_equal(b.mask, ps.lipn_mask)
    np.testing.assert_array_equal(b.neighbour, ps.neighbour)
    assert b.n_kept == ps.n_kept and b.kept_ratio == pytest.approx(ps.kept_ratio)
    assert b.predicted_seconds is None  # no measured rate


def test_lower_thresholds_keep_more_and_predict_from_the_rate(model, ps):
    base = checkpoint_thresholds(model.lipn)
    half = budget_for(model, ps, seconds_per_patch=0.25, factor=0.5)
    np.testing.assert_allclose(half.thresholds, base * 0.5, rtol=1e-6)
    assert (half.mask >= budget_for(model, ps).mask).all()  # a set only grows as thresholds fall
    assert half.predicted_seconds == pytest.approx(0.25 * half.n_kept)
    none = budget_for(model, ps, per_class=[0.999999, 0.999999])
    everything = budget_for(model, ps, threshold=0.0)
    assert none.n_kept <= everything.n_kept == ps.n_patches


def test_keep_rule_on_known_probabilities():
    probs = np.array([[0.9, 0.1], [0.2, 0.6], [0.1, 0.1], [0.4, 0.05]], np.float32)
    index = np.array([[0, 0], [0, 1], [0, 2], [5, 5]])
    b = kept_budget(probs, [0.5, 0.5], index, dilation=(0, 1), classes=["a", "b"], seconds_per_patch=2.0)
    # class b keeps row 1 and grows one ring: row 0 and row 2 join; row 3 lies far away
    assert b.mask.tolist() == [[True, True], [False, True], [False, True], [False, False]]
    assert b.neighbour.tolist() == [False, False, True, False] and b.n_kept == 3
    assert b.to_report()["predicted_seconds"] == 6.0 and b.to_report()["kept_per_class"] == {"a": 1, "b": 3}


def test_bad_settings_refused():
    base = np.array([0.6, 0.4], np.float32)
    with pytest.raises(HDMILError, match="one of"):
        budget_thresholds(base, threshold=0.3, factor=2.0)
    with pytest.raises(HDMILError, match=r"\[0, 1\)"):
        budget_thresholds(base, threshold=1.0)
    with pytest.raises(HDMILError, match="2 per-class"):
        budget_thresholds(base, per_class=[0.1])
    t, _ = budget_thresholds(base, factor=10.0)
    assert (t < 1).all()  # clipped below 1


def test_a_run_reads_what_the_budget_kept_and_records_it(synthetic_slide, model, tmp_path):
    from hdmil.pipeline import encoder_for

    ps = prescreen(synthetic_slide, model)
    b = budget_for(model, ps, seconds_per_patch=0.01, factor=0.5)
    apply_budget(ps, b)
    res = record_budget(run_slide(synthetic_slide, model, encoder=encoder_for(model, "cpu"), prescreened=ps), ps)
    np.testing.assert_array_equal(res.kept, b.kept)
    assert res.n_read == b.n_kept
    res.save(tmp_path / "r")
    block = json.loads((tmp_path / "r" / "report.json").read_text())["budget"]
    assert block["setting"]["kind"] == "factor" and block["n_kept"] == b.n_kept
    assert block["predicted_seconds"] == pytest.approx(0.01 * b.n_kept) and block["measured_seconds"] > 0
    assert load_result(tmp_path / "r", find=False).blocks["budget"] == block


def test_cli_lipn_threshold_gives_the_budgets_numbers(synthetic_slide, model, tmp_path):
    """`hdmil predict --lipn-threshold T` and budget_for(threshold=T) (the widget's control) agree."""
    assert main(["predict", str(synthetic_slide), "--lipn-threshold", "0.3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / synthetic_slide.stem / "report.json").read_text())
    cli = report["budget"]
    ours = budget_for(model, prescreen(synthetic_slide, model), seconds_per_patch=cli["seconds_per_patch"],
                      threshold=0.3).to_report()
    for key in ("setting", "thresholds", "n_patches", "n_kept", "n_kept_as_neighbour", "kept_ratio",
                "kept_per_class", "predicted_seconds"):
        assert cli[key] == ours[key], key
    assert cli["n_kept"] == report["n_kept"] and cli["seconds_per_patch"] > 0
    assert cli["setting"]["checkpoint_thresholds"] == [round(float(v), 6) for v in checkpoint_thresholds(model.lipn)]
    assert main(["predict", str(synthetic_slide), "--lipn-threshold", "0.3", "--prescreen-only",
                 "--out", str(tmp_path / "p")]) == 0
    pre = json.loads((tmp_path / "p" / synthetic_slide.stem / "prescreen.json").read_text())["budget"]
    assert pre["n_kept"] == cli["n_kept"] and pre["predicted_seconds"] is None  # no encoder: no rate
