"""Where our DMIN / LIPN / loss follow the authors' reference exactly (issue 20, docs/method.md §3-§4):
LIPN's UIB layer order in both block forms, the initialisation statistics, the smooth SVM's
hard-hinge switch, and checkpoints saved before the UIB fix running as they were trained."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hdmil.checkpoint import METADATA_KEY, load_model, read_checkpoint_config, save_checkpoint
from hdmil.models import DMIN, LIPN, LIPNConfig, smooth_top1_svm
from hdmil.models.cka import ChebyKANLayer
from hdmil.models.lipn import LEGACY_UIB_FORM, UIB_FORMS, ConvBN, UIBlock

STAGES = ("start_dw", "expand", "mid_dw", "project")


def _has_relu(seq: nn.Sequential) -> bool:
    return any(isinstance(m, nn.ReLU) for m in seq)


# ----------------------------------------------------------------------- UIB layer order
@pytest.mark.parametrize(
    "form, relus",
    [("mnv4", (False, True, True, False)), ("all_relu", (True, True, True, True))],
)
def test_uib_layer_order(form: str, relus: tuple[bool, ...]) -> None:
    """Each conv: Conv2d, then BatchNorm, then (per form) ReLU; nothing else in between."""
    model = LIPN(LIPNConfig(uib_form=form))
    assert len(model.blocks) == 2
    for block in model.blocks:
        for stage, relu in zip(STAGES, relus):
            seq = getattr(block, stage)
            kinds = [type(m) for m in seq]
            assert kinds == [nn.Conv2d, nn.BatchNorm2d, *([nn.ReLU] if relu else [])], (form, stage)
    # the plain convs (stem and head) keep BatchNorm + ReLU in both forms
    for seq in (*model.stem, model.head):
        assert [type(m) for m in seq] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_default_form_is_the_references() -> None:
    assert LIPNConfig().uib_form == "mnv4" and UIB_FORMS["mnv4"] == (False, True, True, False)
    assert LEGACY_UIB_FORM == "all_relu"
    with pytest.raises(ValueError, match="uib_form"):
        LIPNConfig(uib_form="relu6")


def _bn(x: torch.Tensor, seq: nn.Sequential) -> torch.Tensor:
    conv, bn = seq[0], seq[1]
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, 1, conv.groups)
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _random_bn(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("form", ["mnv4", "all_relu"])
def test_uib_forward_is_conv_bn_then_relu_where_the_form_says(form: str) -> None:
    torch.manual_seed(0)
    block = UIBlock(8, 12, 5, 3, stride=2, form=form).eval()
    _random_bn(block, 1)
    x = torch.randn(3, 8, 6, 6)
    y = x
    for stage, relu in zip(STAGES, UIB_FORMS[form]):
        y = _bn(y, getattr(block, stage))
        y = torch.relu(y) if relu else y
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, y)
    # without a ReLU after the projection the block's output takes both signs
    assert (out < 0).any() == (form == "mnv4")


def test_both_forms_hold_the_same_weights_and_differ_in_output() -> None:
    torch.manual_seed(0)
    new, old = LIPN(LIPNConfig(uib_form="mnv4")), LIPN(LIPNConfig(uib_form="all_relu"))
    _random_bn(new, 2)
    assert new.state_dict().keys() == old.state_dict().keys()
    old.load_state_dict(new.state_dict())
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(new.eval()(x), old.eval()(x))


# ----------------------------------------------------------------------- initialisation
def _var_ratio_ok(w: torch.Tensor, std: float) -> bool:
    """mean(w²) / std² is 1 ± 5 standard errors (its standard error is sqrt(2 / n))."""
    n = w.numel()
    return abs(float((w.detach().double() ** 2).mean()) / std**2 - 1.0) < 5 * math.sqrt(2.0 / n)


def test_dmin_linear_layers_are_xavier_normal_with_zero_bias() -> None:
    torch.manual_seed(0)
    model = DMIN(in_dim=1024, n_classes=2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4  # projection, attention a / b / c
    for m in linears:
        fan_in, fan_out = m.in_features, m.out_features
        assert _var_ratio_ok(m.weight, math.sqrt(2.0 / (fan_in + fan_out))), m
        assert abs(float(m.weight.detach().mean())) < 5 * math.sqrt(2.0 / (fan_in + fan_out) / m.weight.numel())
        assert torch.count_nonzero(m.bias) == 0
    # the projection: 0.0361 (torch's default would give 1 / sqrt(3 · 1024) = 0.018)
    assert float(model.proj[0].weight.detach().std()) == pytest.approx(math.sqrt(2 / 1536), rel=0.01)
    for m in model.modules():  # CKA layers: Ω [in, out, K+1], Xavier over torch's 3-D fans
        if isinstance(m, ChebyKANLayer):
            k1 = m.degree + 1
            assert _var_ratio_ok(m.omega, math.sqrt(2.0 / ((m.in_features + m.out_features) * k1)))


def test_lipn_init_is_the_references_mobilenetv4() -> None:
    torch.manual_seed(0)
    model = LIPN()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5 + 2 * 4 + 1
    for m in convs:  # He-normal over fan-out: std sqrt(2 / (k·k·out)), depthwise convs included
        k = m.kernel_size[0] * m.kernel_size[1]
        assert _var_ratio_ok(m.weight, math.sqrt(2.0 / (k * m.out_channels))), m
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert _var_ratio_ok(model.fc.weight, 0.01)  # N(0, 0.01); torch's default: 1 / sqrt(3·64) = 0.072
    assert torch.count_nonzero(model.fc.bias) == 0


@pytest.mark.parametrize("make", [lambda: DMIN(in_dim=64, hidden=32, attn_dim=16), lambda: LIPN()])
def test_initialisation_is_seeded(make) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return make().state_dict()

    a, b, c = weights(5), weights(5), weights(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)
    # an explicit generator: the same seed, the same weights, whatever the global state
    m1, m2 = make(), make()
    m1.reset_parameters(torch.Generator().manual_seed(9))
    torch.manual_seed(123)
    m2.reset_parameters(torch.Generator().manual_seed(9))
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m1.state_dict().items())


# ----------------------------------------------------------------------- smooth SVM switch
LEAD = math.log(1e3)  # τ·log(1 / threshold) at τ = 1, threshold 1e-3: 6.9078


@pytest.mark.parametrize("lead", [LEAD - 0.01, 7.0 - 0.2, LEAD + 0.01, 7.0, 9.0])
def test_svm_switches_to_the_hinge_past_the_lead(lead: float) -> None:
    """Two classes, scores (s, s − d). Target = top class: smooth log(1 + e^(1 − d)), hinge
    max(0, 1 − d) = 0. Target = other class: smooth log(1 + e^(1 + d)), hinge 1 + d."""
    scores = torch.tensor([[2.0, 2.0 - lead], [2.0, 2.0 - lead]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1])
    loss = smooth_top1_svm(scores, target, reduction="none")
    if lead < LEAD:
        want = [math.log1p(math.exp(1 - lead)), math.log1p(math.exp(1 + lead))]
    else:
        want = [0.0, 1.0 + lead]
    torch.testing.assert_close(loss, torch.tensor(want, dtype=torch.float64))
    loss.sum().backward()
    if lead >= LEAD:  # the hinge's gradient: none for the correct row, ∓1 for the wrong one
        torch.testing.assert_close(scores.grad, torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64))


def test_svm_switch_reads_the_raw_lead_with_tau_and_threshold() -> None:
    s = torch.tensor([[0.0, -7.0, -8.0]], dtype=torch.float64)  # lead 7 of the top over the second score
    y = torch.tensor([0])
    assert float(smooth_top1_svm(s, y)) == 0.0  # 7 >= log(1000): the hinge max(0, 1 − 7)
    smooth = math.log(1 + math.exp(1 - 7) + math.exp(1 - 8))
    assert float(smooth_top1_svm(s, y, threshold=0.0)) == pytest.approx(smooth, rel=1e-5)  # never switches
    assert float(smooth_top1_svm(s, y, threshold=1e-4)) == pytest.approx(smooth, rel=1e-5)  # needs 9.2
    # τ = 2: the switch needs a lead of 2·log(1000) = 13.8; 7 stays smooth
    smooth2 = 2 * math.log(1 + math.exp((1 - 7) / 2) + math.exp((1 - 8) / 2))
    assert float(smooth_top1_svm(s, y, tau=2.0)) == pytest.approx(smooth2, rel=1e-5)
    with pytest.raises(ValueError, match="threshold"):
        smooth_top1_svm(s, y, threshold=1.0)


# ----------------------------------------------------------------------- old checkpoints
def _strip_uib_form(path, out) -> None:
    """The same file as written before ``uib_form`` existed: its LIPN config lacks the key."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta[METADATA_KEY])
    del config["modules"]["lipn"]["uib_form"]
    meta[METADATA_KEY] = json.dumps(config)
    save_file(tensors, str(out), metadata=meta)


def test_a_checkpoint_without_uib_form_runs_in_the_old_form(tmp_path) -> None:
    torch.manual_seed(0)
    trained_old = LIPN(LIPNConfig(uib_form="all_relu")).eval()
    _random_bn(trained_old, 3)
    new_file = save_checkpoint(tmp_path / "now.safetensors", {"lipn": trained_old}, {})
    assert read_checkpoint_config(new_file)["modules"]["lipn"]["uib_form"] == "all_relu"
    _strip_uib_form(new_file, tmp_path / "old.safetensors")

    loaded = load_model(tmp_path / "old.safetensors", require_dmin=False).lipn
    assert loaded.cfg.uib_form == LEGACY_UIB_FORM
    assert all(_has_relu(getattr(b, "project")) for b in loaded.blocks)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained_old(x), rtol=0, atol=0)
    # and a model saved today keeps the reference form
    torch.manual_seed(1)
    fresh = save_checkpoint(tmp_path / "fresh.safetensors", {"lipn": LIPN()}, {})
    assert load_model(fresh, require_dmin=False).lipn.cfg.uib_form == "mnv4"


def test_convbn_keys_do_not_depend_on_the_relu() -> None:
    assert ConvBN(4, 4, 3, act=True).state_dict().keys() == ConvBN(4, 4, 3).state_dict().keys()
