"""Auditing what LIPN discarded: the share of the slide's attention in discarded patches, exact on
cases built to know it, small on a synthetic slide whose tumour LIPN kept; `hdmil predict --audit`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hdmil.audit import audit_pool, audit_result, audit_rows, parse_audit
from hdmil.cli import main
from hdmil.errors import HDMILError
from hdmil.pipeline.result import load_result


class _ScoreDMIN:
    """A DMIN whose attention logit of a patch is its first feature, for both classes (s > 0 pools,
    softmax within the pooled set, as DMIN's HDMIL† path); probabilities from the pooled mean."""

    def predict(self, x, mask=None):
        s = torch.as_tensor(np.asarray(x, np.float32))[:, :1].repeat(1, 2)
        hard = s > 0 if mask is None else torch.as_tensor(mask)
        w = torch.where(hard, torch.exp(s), torch.zeros_like(s))
        w = w / w.sum(0).clamp_min(1e-30)
        pooled = (w * s).sum(0)
        return SimpleNamespace(probabilities=torch.softmax(pooled * torch.tensor([-1.0, 1.0]), 0),
                               attention=torch.where(hard, w, torch.full_like(s, float("nan"))), scores=s,
                               mask=hard, kept_ratio=float(hard.any(1).float().mean()), empty_classes=[])


def test_audit_pool_gives_the_share_built_in():
    # kept: three patches of logit 1 (weight e each); audited: one of logit 1 + ln 3 (weight 3e),
    # one of logit -1 (not pooled by HDMIL†). Share = 3e / (3e + 3e) = 1/2 in each class.
    kept = np.array([[1.0], [1.0], [1.0]], np.float32)
    audited = np.array([[1.0 + np.log(3.0)], [-1.0]], np.float32)
    probs, att, share, est = audit_pool(_ScoreDMIN(), kept, np.array([0, 1, 2]), audited,
                                        np.array([5, 7]), n_patches=8)
    np.testing.assert_allclose(share, [0.5, 0.5], rtol=1e-6)
    assert est is None  # every discarded patch audited: the share is exact
    np.testing.assert_allclose(att[[0, 1, 2, 5], 0], [1 / 6, 1 / 6, 1 / 6, 1 / 2], rtol=1e-6)
    assert np.isnan(att[7]).all() and np.isnan(att[[3, 4, 6]]).all()
    # the same audited patch drawn with chance 1/4 of 4 discarded ones: were all four like it, the
    # discarded weight would be 4 x 3e against 3e kept, a share of 12 / 15
    _, _, share, est = audit_pool(_ScoreDMIN(), kept, np.array([0, 1, 2]), audited[:1], np.array([5]),
                                  n_patches=8, draw=np.array([0.25]))
    np.testing.assert_allclose(share, [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(est, [0.8, 0.8], rtol=1e-6)


def test_parse_audit():
    assert parse_audit("0") == 0 and parse_audit("all") is None and parse_audit("-1") is None
    assert parse_audit("12") == 12
    for bad in ("x", "-3"):
        with pytest.raises(HDMILError, match="--audit"):
            parse_audit(bad)


@pytest.fixture(scope="module")
def truth_slide(tmp_path_factory):
    """A synthetic slide with tumour and its ground truth."""
    from hdmil.synth import synth_slide

    return synth_slide(tmp_path_factory.mktemp("audit") / "tumour.tiff", size=(4096, 3072), seed=7,
                       tumor_fraction=0.2)


@pytest.fixture(scope="module")
def audited(truth_slide, tmp_path_factory):
    """`hdmil predict --audit all` with the bundled model: (its report, the result)."""
    out = tmp_path_factory.mktemp("audit-out")
    assert main(["predict", str(truth_slide.path), "--audit", "all", "--out", str(out)]) == 0
    folder = out / truth_slide.path.stem
    return json.loads((folder / "report.json").read_text()), load_result(folder)


def test_tumour_kept_by_lipn_leaves_a_small_share_in_the_discarded(truth_slide, audited):
    report, res = audited
    truth = truth_slide.patch_truth(res.patch_size_level0)
    tumour = truth["tumor_fraction"][res.grid_index[:, 0], res.grid_index[:, 1]] > 0.5
    assert tumour.any() and res.kept[tumour].all()  # LIPN kept the tumour
    a = report["audit"]
    assert a["sample"] == "all" and a["n_audited"] == a["n_discarded"] == int((~res.kept).sum()) > 0
    assert sorted(a["rows"]) == np.flatnonzero(~res.kept).tolist()
    assert a["discarded_attention_share"]["tumor"] < 0.05
    assert a["discarded_attention_share_estimated"] is None
    assert a["prediction_without_audit"] == report["prediction"] == "tumor"
    assert a["prediction_changes"] == (a["prediction"] != report["prediction"])
    assert res.blocks["audit"] == a  # read back by load_result


def test_uniform_attention_gives_the_audited_share_of_the_read_patches(truth_slide, audited):
    """With every pooled patch scored alike, the share is exactly A / (K + A); the estimate for a
    sample follows from the tissue fractions it was drawn by."""
    from hdmil.checkpoint import default_model_path, load_model
    from hdmil.pipeline import encoder_for

    _, res = audited
    encoder = encoder_for(load_model(default_model_path()), "cpu")  # the encoder of the run
    flat = SimpleNamespace(dmin=_FlatDMIN(), feature_dim=None)
    k = res.n_read
    audit = audit_result(res, flat, encoder, n=5, seed=3)
    assert len(audit.rows) == 5 and not res.kept[audit.rows].any()
    np.testing.assert_allclose(audit.share, [5 / (k + 5)] * 2, rtol=1e-5)
    rows, draw = audit_rows(res, 5, seed=3)
    assert rows.tolist() == audit.rows.tolist()  # seeded
    discarded = np.flatnonzero(~res.kept)
    tf = res.grid.tissue_fraction[discarded].astype(np.float64)
    p = dict(zip(discarded.tolist(), tf / tf.sum()))
    total = np.mean([(1 / (k + 5)) / p[r] for r in rows])
    np.testing.assert_allclose(audit.share_estimated, [total / (k / (k + 5) + total)] * 2, rtol=1e-5)


class _FlatDMIN(_ScoreDMIN):
    def predict(self, x, mask=None):
        return super().predict(np.ones((len(x), 1), np.float32), mask)


def test_audit_refused_where_nothing_was_discarded(truth_slide, tmp_path, capsys):
    assert main(["predict", str(truth_slide.path), "--no-lipn", "--audit", "4", "--out", str(tmp_path)]) == 1
    assert "--audit" in capsys.readouterr().err
