"""Test models shared by several test files: an 8-d encoder that costs next to nothing, and a LIPN
with a known kept set."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hdmil.features.encoders import Encoder, register_encoder
from hdmil.models import LIPN, LIPNConfig

TINY = "tiny_test_encoder"


@register_encoder(TINY)
def _tiny_encoder(pretrained: bool = False, device=None) -> Encoder:
    """An 8-d encoder that costs next to nothing: one strided conv, average pooled."""
    model = nn.Sequential(nn.Conv2d(3, 8, 16, stride=16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Encoder(model, TINY, input_size=256, dim=8, device=device, channels_last=False)


def calibrated_lipn(lr: np.ndarray, keep: tuple[float, float]) -> LIPN:
    """A seeded LIPN whose output bias makes class c keep the top ``keep[c]`` of these LR patches."""
    torch.manual_seed(0)
    lipn = LIPN(LIPNConfig(n_classes=2))
    for m in lipn.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics from these patches, else every logit is equal
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        lipn.train()(LIPN.prepare(lr))
        logits = lipn.eval()(LIPN.prepare(lr))
        for c, frac in enumerate(keep):
            lipn.fc.bias[c] -= torch.quantile(logits[:, c], 1.0 - frac)
    return lipn


def random_lipn(n_classes: int = 2) -> LIPN:
    """A random LIPN that keeps some patches and not others: PyTorch's default init. With the
    reference's init (zero bias, classifier N(0, 0.01)) a random LIPN keeps all patches or none."""
    lipn = LIPN(LIPNConfig(n_classes=n_classes))
    for m in lipn.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    return lipn
