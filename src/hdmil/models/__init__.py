"""HDMIL's networks: DMIN (with its CKA classifiers), LIPN, SLPD, their losses, and a small registry.

    model = create_model("dmin", in_dim=1024, n_classes=2)
    model = create_model("lipn", n_classes=2)
    model = create_model("slpd", **slpd_config("small", in_dim=1024).to_dict())

A registered model keeps its config dataclass at ``model.cfg`` (with ``to_dict`` / ``from_dict``);
checkpoints store that dict under the registry name and rebuild the model with ``create_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from hdmil.models.cka import ChebyKANLayer
from hdmil.models.dmin import DMIN, DMINConfig, DMINOutput, DMINPrediction
from hdmil.models.lipn import LIPN, LIPNConfig
from hdmil.models.losses import dmin_loss, keep_union, lipn_loss, smooth_top1_svm
from hdmil.models.slpd import SLPD, SLPDConfig, slpd_config

__all__ = [
    "DMIN",
    "LIPN",
    "ChebyKANLayer",
    "DMINConfig",
    "DMINOutput",
    "DMINPrediction",
    "LIPNConfig",
    "SLPD",
    "SLPDConfig",
    "create_model",
    "dmin_loss",
    "keep_union",
    "lipn_loss",
    "list_models",
    "model_config_class",
    "register_model",
    "slpd_config",
    "smooth_top1_svm",
]


@dataclass(frozen=True)
class _Entry:
    model_cls: type[nn.Module]
    config_cls: type


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, model_cls: type[nn.Module], config_cls: type) -> None:
    """Register ``model_cls(config_cls(...))`` under ``name`` (also its key in checkpoints)."""
    _REGISTRY[name] = _Entry(model_cls, config_cls)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config_class(name: str) -> type:
    return _entry(name).config_cls


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None


def create_model(name: str, **cfg: Any) -> nn.Module:
    """Build a registered model from config keywords (unknown keywords raise ValueError)."""
    entry = _entry(name)
    from_dict = getattr(entry.config_cls, "from_dict", None)
    config = from_dict(cfg) if from_dict is not None else entry.config_cls(**cfg)
    return entry.model_cls(config)


register_model("dmin", DMIN, DMINConfig)
register_model("lipn", LIPN, LIPNConfig)
register_model("slpd", SLPD, SLPDConfig)
