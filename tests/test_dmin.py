"""DMIN (docs/method.md §3, §7): masks, pooling, kept ratio, losses and the gradients they carry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hdmil.models import DMIN, DMINConfig, create_model, dmin_loss, keep_union, smooth_top1_svm
from hdmil.models.dmin import DMINOutput, _gumbel_like, _masked_pool
from hdmil.models.losses import binarize_st

SMALL = dict(in_dim=24, hidden=16, attn_dim=8, cheby_degree=4)


def _model(seed: int = 0, **kw) -> DMIN:
    torch.manual_seed(seed)
    return DMIN(DMINConfig(**{**SMALL, **kw}))


def _bag(n: int = 40, d: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------- masks
def test_straight_through_mask_has_the_sigmoid_gradient() -> None:
    model = _model()
    s = torch.randn(30, 2, requires_grad=True)
    weights = torch.randn(30, 2)
    torch.manual_seed(5)
    mask, hard = model.student_mask(s, train_mask=True)
    (g_mask,) = torch.autograd.grad((mask * weights).sum(), s)

    torch.manual_seed(5)  # the same Gumbel draws
    g1, g2 = _gumbel_like(s), _gumbel_like(s)
    soft = torch.sigmoid((s + g1 - g2) / model.cfg.tau)
    (g_soft,) = torch.autograd.grad((soft * weights).sum(), s)

    torch.testing.assert_close(g_mask, g_soft)
    # forward values are the binarised ones
    torch.testing.assert_close(mask.detach(), (soft > model.cfg.gamma).float())
    assert torch.equal(hard, soft.detach() > model.cfg.gamma)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}


def test_binarize_st_gradient_is_identity() -> None:
    soft = torch.rand(50, requires_grad=True)
    out = binarize_st(soft, 0.5)
    (g,) = torch.autograd.grad((out * torch.arange(50.0)).sum(), soft)
    torch.testing.assert_close(g, torch.arange(50.0))
    assert torch.equal(out.detach(), (soft > 0.5).float())


def test_gumbel_mask_keeps_with_probability_sigmoid_s() -> None:
    # g1 − g2 ~ Logistic(0, 1), so with γ = 0.5: P(M = 1) = P(s + L > 0) = sigmoid(s)
    model = _model()
    torch.manual_seed(3)
    s = torch.tensor([[-1.0, 1.5]]).repeat(20000, 1)
    mask, _ = model.student_mask(s, train_mask=True)
    freq = mask.mean(dim=0)
    torch.testing.assert_close(freq, torch.sigmoid(torch.tensor([-1.0, 1.5])), atol=0.015, rtol=0)


def test_eval_mask_is_s_positive() -> None:
    model = _model().eval()
    x = _bag()
    out = model(x)
    assert torch.equal(out.mask.bool(), out.scores > 0)
    pred = model.predict(x)
    assert torch.equal(pred.mask, pred.scores > 0)
    torch.testing.assert_close(pred.scores, out.scores.detach())
    # no noise at evaluation: two calls agree
    torch.testing.assert_close(model(x).logits_stu, out.logits_stu)


def test_training_mask_is_noisy_but_eval_mask_is_not() -> None:
    model = _model(dropout=0.0).train()
    x = _bag(200)
    torch.manual_seed(0)
    a = model(x).mask
    b = model(x).mask
    assert not torch.equal(a, b)
    assert torch.equal(model(x, train_mask=False).mask, model(x, train_mask=False).mask)


# ----------------------------------------------------------------------- pooling
def test_student_equals_teacher_when_every_instance_is_kept(monkeypatch) -> None:
    model = _model().eval()
    x = _bag()
    pred = model.predict(x, mask=torch.ones(40, 2, dtype=torch.bool))
    torch.testing.assert_close(pred.attention, pred.teacher_attention)
    torch.testing.assert_close(pred.probabilities, pred.teacher_probabilities)
    torch.testing.assert_close(pred.probabilities, model.teacher_probabilities(x))

    def all_kept(s, train_mask):
        return torch.ones_like(s), torch.ones_like(s, dtype=torch.bool)

    monkeypatch.setattr(model, "student_mask", all_kept)
    out = model(x)
    torch.testing.assert_close(out.emb_stu, out.emb_tea)
    torch.testing.assert_close(out.logits_stu, out.logits_tea)


def test_student_pooling_is_per_class_softmax_within_the_mask() -> None:
    model = _model().eval()
    x = _bag()
    pred = model.predict(x)
    for c in range(2):
        sel = pred.mask[:, c]
        expected = torch.softmax(pred.scores[sel, c], dim=0)
        torch.testing.assert_close(pred.attention[sel, c], expected)
        assert torch.isnan(pred.attention[~sel, c]).all()


def test_masked_pool_does_not_underflow_far_below_the_max() -> None:
    s = torch.tensor([[100.0], [-10.0], [-12.0]])
    h = torch.eye(3)
    hard = torch.tensor([[False], [True], [True]])
    emb, weights, empty = _masked_pool(s, h, hard.float(), hard)
    assert not empty.any()
    torch.testing.assert_close(weights[:, 0], torch.tensor([0.0, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))]))
    torch.testing.assert_close(emb[0], weights[:, 0])


def test_class_with_no_kept_instance_gets_zero_embedding_and_flag() -> None:
    model = _model().eval()
    x = _bag(10)
    mask = torch.zeros(10, 2, dtype=torch.bool)
    mask[:4, 0] = True
    pred = model.predict(x, mask=mask)
    assert pred.empty_classes == [1]
    assert torch.isnan(pred.attention[:, 1]).all()
    expected_logit = model.classifiers[1](torch.zeros(model.cfg.hidden))
    torch.testing.assert_close(pred.logits[1:], expected_logit.detach())
    assert torch.isfinite(pred.probabilities).all()
    assert pred.kept.tolist() == [True] * 4 + [False] * 6
    assert pred.kept_ratio == pytest.approx(0.4)


def test_forward_with_an_empty_class_gives_finite_gradients(monkeypatch) -> None:
    model = _model().train()

    def class0_only(s, train_mask):
        hard = torch.zeros_like(s, dtype=torch.bool)
        hard[:, 0] = True
        return binarize_st(torch.sigmoid(s), 0.5) * hard, hard

    monkeypatch.setattr(model, "student_mask", class0_only)
    out = model(_bag(), label=0)
    assert out.empty_classes == [1]
    assert torch.count_nonzero(out.emb_stu[1]) == 0
    loss, _ = dmin_loss(out, 0, model.cfg)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_predict_on_an_empty_bag() -> None:
    model = _model()
    pred = model.predict(torch.zeros(0, 24))
    assert pred.empty_classes == [0, 1]
    assert pred.attention.shape == (0, 2) and pred.kept_ratio == 0.0
    assert torch.isfinite(pred.probabilities).all()


def test_predict_mask_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="does not match"):
        _model().predict(_bag(5), mask=torch.ones(5, 3, dtype=torch.bool))


def test_predict_is_eval_no_grad_and_restores_mode() -> None:
    model = _model().train()
    x = _bag()
    a, b = model.predict(x), model.predict(x)
    assert model.training
    torch.testing.assert_close(a.probabilities, b.probabilities)  # no dropout, no noise
    assert not a.probabilities.requires_grad
    assert a.prediction == int(a.probabilities.argmax())


def test_instances_are_scored_independently_and_pooling_ignores_order() -> None:
    model = _model().eval()
    x = _bag(25)
    pred = model.predict(x)
    with torch.no_grad():
        one_by_one = torch.cat([model.encode(x[j : j + 1])[1] for j in range(25)])
    torch.testing.assert_close(one_by_one, pred.scores, atol=1e-6, rtol=1e-5)
    perm = torch.randperm(25, generator=torch.Generator().manual_seed(0))
    shuffled = model.predict(x[perm])
    torch.testing.assert_close(shuffled.probabilities, pred.probabilities, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(shuffled.attention, pred.attention[perm], equal_nan=True, atol=1e-6, rtol=1e-5)


def test_predict_accepts_numpy() -> None:
    model = _model()
    x = _bag()
    torch.testing.assert_close(model.predict(x.numpy()).probabilities, model.predict(x).probabilities)


# ----------------------------------------------------------------------- kept ratio
def test_kept_ratio_is_the_union_over_all_classes() -> None:
    mask = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    mask.requires_grad_(True)
    keep, ratio = keep_union(mask)
    assert keep.tolist() == [1, 1, 0, 1, 1]  # class 2 counts too (the reference looked at 0 and 1 only)
    assert ratio.item() == pytest.approx(0.8)
    (g,) = torch.autograd.grad(ratio, mask)  # straight-through on the per-instance sum
    torch.testing.assert_close(g, torch.full_like(mask, 1 / 5))


def test_model_kept_ratio_in_eval_is_fraction_with_any_positive_score() -> None:
    model = _model(n_classes=3).eval()
    out = model(_bag(60))
    expected = (out.scores > 0).any(dim=1).float().mean()
    torch.testing.assert_close(out.kept_ratio, expected)
    assert torch.equal(out.keep.bool(), (out.scores > 0).any(dim=1))


# ----------------------------------------------------------------------- losses
def _output(logits_tea, logits_stu, emb_tea, emb_stu, ratio, inst=0.0) -> DMINOutput:
    t = torch.as_tensor
    n = 4
    return DMINOutput(
        logits_tea=t(logits_tea, dtype=torch.float32),
        logits_stu=t(logits_stu, dtype=torch.float32),
        scores=torch.zeros(n, 2),
        attention=torch.full((n, 2), 1 / n),
        mask=torch.ones(n, 2),
        keep=torch.ones(n),
        kept_ratio=t(ratio, dtype=torch.float32),
        emb_tea=t(emb_tea, dtype=torch.float32),
        emb_stu=t(emb_stu, dtype=torch.float32),
        inst_loss=t(inst, dtype=torch.float32),
    )


def test_loss_terms_are_zero_exactly_where_they_must_be() -> None:
    cfg = DMINConfig(**SMALL)
    emb = torch.randn(2, 16)
    same = _output([1.0, -1.0], [1.0, -1.0], emb, emb, cfg.target_keep_rate)
    _, terms = dmin_loss(same, 0, cfg)
    assert terms["emb"] == 0.0 and terms["kl"] == pytest.approx(0.0, abs=1e-7) and terms["rate"] == 0.0
    assert terms["ce"] == pytest.approx(F.cross_entropy(torch.tensor([[1.0, -1.0]]), torch.tensor([0])).item())

    other = _output([1.0, -1.0], [-0.5, 0.5], emb, emb + 0.1, 0.9, inst=0.4)
    total, terms = dmin_loss(other, 1, cfg)
    assert terms["emb"] == pytest.approx(0.01, rel=1e-4)
    p_tea = torch.softmax(torch.tensor([1.0, -1.0]), 0)
    p_stu = torch.softmax(torch.tensor([-0.5, 0.5]), 0)
    assert terms["kl"] == pytest.approx(float((p_tea * (p_tea / p_stu).log()).sum()), rel=1e-5)
    assert terms["rate"] == pytest.approx((0.9 - 0.6) ** 2)
    weighted = 0.7 * terms["ce"] + 0.3 * 0.4 + 0.5 * terms["emb"] + 0.5 * terms["kl"] + 2.0 * terms["rate"]
    assert total.item() == pytest.approx(weighted, rel=1e-5)


def test_loss_weights_and_rate_come_from_the_config() -> None:
    cfg = DMINConfig(**SMALL, w_ce=0.0, w_clu=0.0, w_emb=0.0, w_kl=0.0, w_rate=1.0, target_keep_rate=0.7)
    out = _output([1.0, -1.0], [0.0, 0.0], torch.zeros(2, 16), torch.ones(2, 16), 0.2, inst=5.0)
    total, _ = dmin_loss(out, 0, cfg)
    assert total.item() == pytest.approx(0.25)


def test_gradient_routing_teacher_ce_vs_student_terms() -> None:
    model = _model().train()
    out = model(_bag(), label=1)
    ce = F.cross_entropy(out.logits_tea[None], torch.tensor([1]))
    assert torch.autograd.grad(ce, out.mask, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(out.inst_loss, out.mask, retain_graph=True, allow_unused=True)[0] is None
    emb = F.mse_loss(out.emb_stu, out.emb_tea)
    (g_emb,) = torch.autograd.grad(emb, out.mask, retain_graph=True)
    assert g_emb.abs().sum() > 0  # the student learns through distillation ...
    (g_rate,) = torch.autograd.grad((out.kept_ratio - 0.6) ** 2, out.scores, retain_graph=True)
    assert g_rate.abs().sum() > 0  # ... and through the rate term, straight-through to s
    # the teacher side of the distillation terms also trains the shared weights (not detached)
    (g_tea,) = torch.autograd.grad(emb, out.emb_tea, retain_graph=True)
    assert g_tea.abs().sum() > 0
    total, terms = dmin_loss(out, 1, model.cfg)
    total.backward()
    assert set(terms) >= {"total", "ce", "clu", "emb", "kl", "rate", "kept_ratio"}
    assert model.proj[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------- instance clustering loss
def test_instance_loss_uses_other_branches_only_for_multiclass() -> None:
    for n_classes, other_gets_grad in ((2, False), (3, True)):
        model = _model(n_classes=n_classes, k_sample=4).train()
        out = model(_bag(20), label=0)
        out.inst_loss.backward()
        assert model.instance_classifiers[0].omega.grad.abs().sum() > 0
        other = model.instance_classifiers[1].omega.grad
        assert (other is not None and other.abs().sum() > 0) == other_gets_grad


def test_out_of_class_negatives_for_binary_tasks(monkeypatch) -> None:
    """inst_out_of_class: on a class-0 bag, branch 1's top-k are negatives for classifier 1."""
    model = _model(k_sample=2, inst_loss="ce", inst_out_of_class=True)
    h = torch.randn(6, 16)
    s = torch.tensor([[5.0, -2.0], [4, 3], [0, 0], [-1, 6], [-3, -1], [-4, 1]])
    calls = []

    def spy(logits, target):
        calls.append(target.tolist())
        return logits.sum() * 0

    monkeypatch.setattr(F, "cross_entropy", spy)
    real = [clf.forward for clf in model.instance_classifiers]
    fed = []
    for c, clf in enumerate(model.instance_classifiers):
        monkeypatch.setattr(clf, "forward", lambda x, c=c: (fed.append((c, x)), real[c](x))[1])
    model.instance_loss(h, s, label=0)
    # classifier 0: top-2 of branch 0 (rows 0, 1) positive, bottom-2 (rows 5, 4) negative;
    # classifier 1: top-2 of branch 1 (rows 3, 1) negative
    assert calls == [[1, 1, 0, 0], [0, 0]]
    assert [c for c, _ in fed] == [0, 1]
    torch.testing.assert_close(fed[0][1], h[[0, 1, 5, 4]])
    torch.testing.assert_close(fed[1][1], h[[3, 1]])


def test_instance_loss_clamps_k_for_small_bags() -> None:
    model = _model(k_sample=32, inst_loss="ce").train()
    for n in (1, 2, 5):
        out = model(_bag(n), label=1)
        assert torch.isfinite(out.inst_loss) and out.inst_loss > 0


def test_instance_loss_targets_top_positive_bottom_negative(monkeypatch) -> None:
    model = _model(k_sample=2, inst_loss="ce")
    h = torch.randn(6, 16)
    s = torch.tensor([[0.0, 5.0], [0, 4], [0, 0], [0, -1], [0, -3], [0, -4]])
    seen = {}

    def spy(logits, target):
        seen["target"] = target.tolist()
        return logits.sum() * 0

    monkeypatch.setattr(F, "cross_entropy", spy)
    model.instance_loss(h, s, label=1)
    assert seen["target"] == [1, 1, 0, 0]


def test_smooth_svm_nonnegative_and_tends_to_hinge() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 4, generator=g) * 3
    target = torch.randint(0, 4, (64,), generator=g)
    margin = torch.ones(64, 4).scatter_(1, target[:, None], 0.0)
    hinge = (scores + margin).amax(1) - scores.gather(1, target[:, None]).squeeze(1)
    assert (hinge >= 0).all()
    for tau in (1.0, 0.5, 0.1):
        loss = smooth_top1_svm(scores, target, tau=tau, reduction="none")
        assert (loss >= hinge - 1e-6).all() and (loss <= hinge + tau * math.log(4) + 1e-6).all()
    torch.testing.assert_close(smooth_top1_svm(scores, target, tau=1e-4, reduction="none"), hinge, atol=2e-4, rtol=0)
    torch.testing.assert_close(smooth_top1_svm(scores, target, tau=0.0, reduction="none"), hinge)
    # τ = 1 without the hard-hinge switch: the closed form log Σ_j exp(Δ(j, y) + s_j) − s_y
    # (the switch itself: tests/test_reference_parity.py)
    expected = torch.logsumexp(scores + margin, 1) - scores.gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(smooth_top1_svm(scores, target, threshold=0.0), expected.mean())


# ----------------------------------------------------------------------- config
def test_config_round_trip_and_validation() -> None:
    cfg = DMINConfig(n_classes=3, tau=0.5, target_keep_rate=0.7)
    assert DMINConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DMIN config keys: bogus"):
        DMINConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="inst_loss"):
        DMINConfig(inst_loss="focal")
    model = create_model("dmin", **SMALL)
    assert isinstance(model, DMIN) and model.cfg.hidden == 16
    with pytest.raises(ValueError, match="unknown model"):
        create_model("transmil")


def test_reference_sized_shapes() -> None:
    torch.manual_seed(0)
    model = DMIN().eval()  # reference widths: 1024 -> 512 -> 256, C = 2, K = 12
    out = model(torch.randn(7, 1024))
    assert out.scores.shape == (7, 2) and out.emb_tea.shape == (2, 512) and out.logits_stu.shape == (2,)
    assert out.mask.shape == (7, 2) and out.keep.shape == (7,) and out.kept_ratio.ndim == 0
    assert np.isfinite(model.predict(torch.randn(3, 1024)).probabilities.numpy()).all()


def test_contract_call_forms() -> None:
    model = _model().eval()
    x = _bag(12)
    out = model(x, train_mask=False)  # docs/architecture.md: dmin(x, train_mask=...)
    assert torch.equal(out.mask.bool(), out.scores > 0)
    with pytest.raises(TypeError, match="train_mask"):
        model(x, True)
    pred = model.predict(x)
    assert pred.probs is pred.probabilities
