"""What a checkpoint is, in a few lines a pathologist can read: its model card.

Read from the checkpoint's config alone (no module is built): name and hash, classes, encoder,
scale, what it was trained on and when, and its intended use. The bundled demo model
(``config["demo"]``) says plainly that it was trained on synthetic slides and is not for
diagnosis (docs/demo_model.md). The napari widget shows ``ModelCard.lines()``; so does
``python -m hdmil.model_card CHECKPOINT``.

>>> card = read_model_card(default_model_path())
>>> card.demo, card.classes
(True, ('normal', 'tumor'))
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEMO_SHORT", "DEMO_WARNING", "ModelCard", "model_card", "read_model_card"]

DEMO_WARNING = ("Demo model: trained on synthetic slides made by this project, not on real tissue. "
                "Not for diagnosis: its predictions on real slides mean nothing.")  # fmt: skip
DEMO_SHORT = "Demo model, trained on synthetic slides only: not for diagnosis."  # where room is short


@dataclass(frozen=True)
class ModelCard:
    """A checkpoint described; every field is plain text ("" when the checkpoint does not say)."""

    name: str
    sha256: str  # first 12 hex digits, as reports show it
    classes: tuple[str, ...]
    encoder: str
    scale: str  # e.g. "0.5 µm/px (20x)"
    trained_on: str
    created: str
    intended_use: str
    demo: bool

    def lines(self) -> list[str]:
        """The card as short lines, the demo warning first."""
        out = [DEMO_WARNING] if self.demo else []
        out.append(f"model {self.name}" + (f" (sha {self.sha256})" if self.sha256 else ""))
        out.append("classes: " + ", ".join(self.classes))
        for title, value in (("encoder", self.encoder), ("scale", self.scale), ("trained on", self.trained_on),
                             ("created", self.created), ("intended use", self.intended_use)):  # fmt: skip
            if value:
                out.append(f"{title}: {value}")
        return out


def model_card(config: dict[str, Any], name: str, sha256: str = "") -> ModelCard:
    """The card of a checkpoint whose config is ``config`` (``read_checkpoint_config``)."""
    prov = config.get("provenance") or {}
    return ModelCard(
        name=name, sha256=sha256, classes=tuple(str(c) for c in config.get("classes") or ()),
        encoder=_encoder(config), scale=_scale(config), trained_on=_trained_on(prov),
        created=str(prov.get("created") or prov.get("date") or "")[:10],
        intended_use=str(config.get("intended_use") or ""), demo=bool(config.get("demo")),
    )


def read_model_card(path: str | os.PathLike) -> ModelCard:
    """The card of the checkpoint file at ``path`` (CheckpointError when it cannot be read)."""
    from hdmil.checkpoint import file_sha256, read_checkpoint_config

    path = Path(path)
    config = read_checkpoint_config(path)
    return model_card(config, path.name, file_sha256(path)[:12])


def _encoder(config: dict[str, Any]) -> str:
    enc = str(config.get("encoder") or "")
    if config.get("instances") == "region":
        enc = f"{enc}, pooled over SLPD regions" if enc else "SLPD regions"
    if enc and config.get("feature_dim"):
        enc += f" ({config['feature_dim']}-d features)"
    return enc


def _scale(config: dict[str, Any]) -> str:
    mpp, mag = config.get("mpp"), config.get("magnification")
    parts = [f"{float(mpp):g} µm/px" if mpp else "", f"{float(mag):g}x" if mag else ""]
    return " at ".join(p for p in parts if p)


def _trained_on(prov: dict[str, Any]) -> str:
    """"96 synthetic slides (76 training, 20 validation)" from the training provenance."""
    split = prov.get("split") or {}
    n_train, n_val = len(split.get("train") or ()), len(split.get("val") or ())
    cohort = prov.get("training_cohort") or {}
    n = int(cohort.get("n_slides") or n_train + n_val)
    if not n:
        return ""
    kind = "synthetic slides" if prov.get("stage") == "recipe" else "slides"
    detail = f" ({n_train} training, {n_val} validation)" if n_train or n_val else ""
    return f"{n} {kind}{detail}"


if __name__ == "__main__":  # python -m hdmil.model_card CHECKPOINT
    from hdmil.checkpoint import default_model_path

    print("\n".join(read_model_card(sys.argv[1] if len(sys.argv) > 1 else default_model_path()).lines()))
