"""Training configs as data: one for DMIN (docs/method.md §3), one for LIPN (§4).

Both are plain dataclasses with ``to_dict`` / ``from_dict``. ``from_dict`` also reads the one flat
``TrainConfig`` dict that earlier versions stored in checkpoints and ``state.json`` (DMIN fields
under their own names, LIPN fields as ``lipn_*``), so stored configs stay readable.

LIPN's threshold calibration is one value: ``None`` (the paper's fixed 0.5), ``RecallShare``,
``AttentionShare`` or ``KeptBudget`` (``hdmil.train.calibration``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Union

from hdmil.errors import HDMILError

__all__ = [
    "AttentionShare",
    "Calibration",
    "DMINTrainConfig",
    "KeptBudget",
    "LIPNTrainConfig",
    "RecallShare",
    "calibration_from_dict",
]

LEGACY_PREFIX = "lipn_"  # LIPN fields in the old flat TrainConfig dict


@dataclass
class DMINTrainConfig:
    """Everything a DMIN training run needs; defaults are docs/method.md §3."""

    # architecture (in_dim and n_classes come from the data)
    hidden: int = 512
    attn_dim: int = 256
    dropout: float = 0.25
    cheby_degree: int = 12  # 16 for TCGA-NSCLC
    tau: float = 0.7  # Gumbel-sigmoid temperature
    gamma: float = 0.5  # mask threshold
    k_sample: int = 32  # instances per side for the clustering loss (clamped to N/2)
    inst_out_of_class: bool = False  # other branches' top-k as negatives also for 2 classes (ours)
    # hybrid loss
    keep_rate: float = 0.6  # target kept ratio r (0.7 for TCGA-NSCLC / BRCA)
    w_ce: float = 0.7
    w_clu: float = 0.3
    w_emb: float = 0.5
    w_kl: float = 0.5
    w_rate: float = 2.0
    # optimisation
    lr: float = 3e-4  # 3e-5 for TCGA-NSCLC
    weight_decay: float = 1e-5
    max_epochs: int = 200
    min_epochs: int = 50  # early stopping may stop from this epoch on
    patience: int = 20
    # run
    seed: int = 0
    instances: str = "patch"  # "patch" features or SLPD "region" embeddings
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DMINTrainConfig:
        """From ``to_dict`` or an old flat TrainConfig dict (its LIPN fields are left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def dmin_config(self, in_dim: int, n_classes: int):
        """The model's ``DMINConfig`` for features of ``in_dim`` and ``n_classes`` classes."""
        from hdmil.models.dmin import DMINConfig

        wanted = {
            "in_dim": in_dim, "n_classes": n_classes, "hidden": self.hidden,
            "attn_dim": self.attn_dim, "dropout": self.dropout, "cheby_degree": self.cheby_degree,
            "tau": self.tau, "gamma": self.gamma, "k_sample": self.k_sample,
            "inst_out_of_class": self.inst_out_of_class, "target_keep_rate": self.keep_rate,
            "w_ce": self.w_ce, "w_clu": self.w_clu, "w_emb": self.w_emb, "w_kl": self.w_kl,
            "w_rate": self.w_rate,
        }
        names = {f.name for f in dataclasses.fields(DMINConfig)}
        return DMINConfig(**{k: v for k, v in wanted.items() if k in names})


@dataclass(frozen=True)
class RecallShare:
    """One threshold for every class, lowered from the paper's 0.5 until LIPN keeps ``share`` of
    the validation instances DMIN keeps (never raised above 0.5)."""

    share: float

    def to_dict(self) -> dict[str, Any]:
        return {"recall": self.share}


@dataclass(frozen=True)
class AttentionShare:
    """Ours: one threshold per class, the highest whose kept set holds ``shares`` of DMIN's
    attention (pooling weight) for the class on the validation slides. One share for every class,
    or a tuple with one per class (in class order)."""

    shares: float | tuple[float, ...]

    def __post_init__(self) -> None:
        if isinstance(self.shares, (list, tuple)):
            object.__setattr__(self, "shares", tuple(float(v) for v in self.shares))

    def to_dict(self) -> dict[str, Any]:
        return {"attention": list(self.shares) if isinstance(self.shares, tuple) else self.shares}


@dataclass(frozen=True)
class KeptBudget:
    """Ours: one threshold per class, chosen together so that LIPN keeps at most ``ratio`` of each
    validation slide's patches on average (its dilation included) while holding as much of DMIN's
    attention as it can, whichever class's attention is spread thin."""

    ratio: float

    def __post_init__(self) -> None:
        if not 0.0 < float(self.ratio) <= 1.0:
            raise HDMILError(f"the LIPN kept budget must be in (0, 1], got {self.ratio}")
        object.__setattr__(self, "ratio", float(self.ratio))

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.ratio}


Calibration = Union[RecallShare, AttentionShare, KeptBudget, None]


def calibration_from_dict(data: dict[str, Any] | None) -> Calibration:
    """Undo ``to_dict``: ``{"recall": s}``, ``{"attention": s | [s, ...]}``, ``{"kept": r}`` or
    None."""
    if not data:
        return None
    if set(data) == {"recall"}:
        return RecallShare(float(data["recall"]))
    if set(data) == {"attention"}:
        return AttentionShare(data["attention"])
    if set(data) == {"kept"}:
        return KeptBudget(float(data["kept"]))
    raise HDMILError(f"unknown LIPN calibration {data!r}: expected 'recall', 'attention' or 'kept'")


@dataclass
class LIPNTrainConfig:
    """Everything a LIPN training run needs; defaults are docs/method.md §4."""

    tau: float = 0.7
    lr: float = 1e-4
    weight_decay: float = 1e-5
    max_epochs: int = 100
    min_epochs: int = 0
    patience: int = 5
    batch_patches: int = 2048  # slides are batched into one LIPN step up to this many patches
    # after training: None keeps the paper's M_LR = 1[P > 0.5]; else RecallShare, AttentionShare or
    # KeptBudget
    calibration: Calibration = None
    # "mask": the paper's target M_HR = 1[s > 0] and LIPN's straight-through mask; "soft": target
    # σ(s / τ) and LIPN's probability, the same boundary (σ(s/τ) > 0.5 ⟺ s > 0) with DMIN's margin
    targets: str = "mask"
    # ours, soft targets only: σ(s / (T·τ)), a distillation temperature T. The boundary stays at
    # s = 0; with T > 1 the patches DMIN scores far above it (tumour, s ≈ 9) are no longer all
    # ≈ 1, so LIPN learns their ranking too instead of fitting the patches near the boundary
    target_temperature: float = 1.0
    # "l1": the paper's L1 between LIPN's and DMIN's masks; "bce" (ours, soft targets only):
    # cross-entropy between LIPN's probabilities and σ(s / τ), which ranks rare tumour patches higher
    match: str = "l1"
    # ours: per class, rings of neighbouring patches that join each patch LIPN keeps for the class
    # (LIPNConfig.dilation; None: none, the paper)
    dilation: tuple[int, ...] | None = None
    # ours: a random stain change per training slide (hdmil.augment.StainJitter strength; 0 = off,
    # the paper), so LIPN's 16 px view does not learn the training slides' stains
    stain_jitter: float = 0.0
    # ours: LIPN's probabilities (thresholds, inference) averaged over 1, 4 or 8 orientations
    views: int = 1
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.dilation is not None:
            self.dilation = tuple(int(r) for r in self.dilation)
        if self.targets not in ("mask", "soft"):
            raise HDMILError(f"LIPN targets must be 'mask' or 'soft', got {self.targets!r}")
        if self.match not in ("l1", "bce"):
            raise HDMILError(f"LIPN match must be 'l1' or 'bce', got {self.match!r}")
        if not self.target_temperature > 0:
            raise HDMILError(f"LIPN target_temperature must be > 0, got {self.target_temperature}")
        if self.target_temperature != 1.0 and self.targets != "soft":
            raise HDMILError("a target temperature softens DMIN's soft targets: set targets='soft'")
        if self.match == "bce" and self.targets != "soft":
            raise HDMILError("match='bce' compares LIPN's probabilities with DMIN's soft targets: "
                             "set targets='soft' too")

    @property
    def soft(self) -> bool:
        return self.targets == "soft"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["calibration"] = None if self.calibration is None else self.calibration.to_dict()
        d["dilation"] = None if self.dilation is None else list(self.dilation)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LIPNTrainConfig:
        """From ``to_dict`` or an old flat TrainConfig dict (``lipn_*`` keys, ``lipn_recall`` /
        ``lipn_attention`` for the calibration)."""
        if any(k.startswith(LEGACY_PREFIX) for k in data):
            data = _from_legacy(data)
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if isinstance(values.get("calibration"), dict):
            values["calibration"] = calibration_from_dict(values["calibration"])
        return cls(**values)


def _from_legacy(old: dict[str, Any]) -> dict[str, Any]:
    """The old flat TrainConfig dict's LIPN part under the new names."""
    new = {k[len(LEGACY_PREFIX):]: v for k, v in old.items() if k.startswith(LEGACY_PREFIX)}
    new.update({k: old[k] for k in ("seed", "device") if k in old})
    recall, attention = new.pop("recall", None), new.pop("attention", None)
    if recall is not None and attention is not None:
        raise HDMILError("lipn_recall and lipn_attention both calibrate LIPN's thresholds: set one")
    if recall is not None:
        new["calibration"] = RecallShare(float(recall))
    elif attention is not None:
        new["calibration"] = AttentionShare(attention)
    return new
