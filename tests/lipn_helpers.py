"""A LIPN with a known kept set, shared by the pipeline and viewer tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hdmil.models import LIPN, LIPNConfig


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
