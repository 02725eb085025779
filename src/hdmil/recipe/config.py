"""What the recipe makes and how: ``RecipeConfig`` (defaults are the bundled demo model's)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hdmil.errors import HDMILError

__all__ = ["DEMO_NAME", "HELDOUT_OFFSET", "TUMOR_AT", "Progress", "RecipeConfig", "RecipeError"]

Progress = Callable[[str, int, int], None]  # progress(stage, done, total)
DEMO_NAME = "hdmil-demo"
HELDOUT_OFFSET = 100_000  # held-out cohort seed = seed + this; never a training seed of the recipe
TUMOR_AT = 0.5  # a patch is ground-truth tumour when at least half of it is tumour


class RecipeError(HDMILError):
    """Bad recipe settings, or a recipe run that cannot go on (say, no slide had tissue)."""


@dataclass
class RecipeConfig:
    """What the recipe makes and how; defaults are the bundled demo model's.

    Sizes are chosen for ≤ 30 minutes on 2 CPU cores (see docs/demo_model.md for measurements).
    """

    seed: int = 0
    n_slides: int = 96  # training cohort (train + validation), half tumour
    n_heldout: int = 40  # held-out slides for the report, generated from another seed
    slide_size: int = 4096  # level-0 px of each square slide at 0.5 µm/px (~100-150 tissue patches)
    tumor_burdens: tuple[float, ...] = (0.4, 0.2, 0.1, 0.05, 0.03)
    heldout_burdens: tuple[float, ...] = (0.4, 0.2, 0.1, 0.05, 0.02)
    val_fraction: float = 0.2
    # a tiny timm architecture (0.2 M parameters, ~6 ms per 256 px patch on one CPU core), trained
    # here on the training slides' patch truth; DMIN still learns from slide labels only
    encoder: str = "test_byobnet"
    encoder_patches: int = 24  # patches per training slide for the encoder (tumour first)
    encoder_epochs: int = 4
    encoder_lr: float = 1e-3
    # random stain changes while training the encoder and LIPN (hdmil.augment.StainJitter
    # strengths; 0 = off): without them, held-out slides stained paler or bluer than the training
    # slides were missed whole (docs/demo_model.md)
    encoder_stain_jitter: float = 1.0
    lipn_stain_jitter: float = 1.0
    # a second round: the encoder_hard_negatives tumour-free patches per training slide that the
    # encoder rates most tumour-like (lymphoid aggregates, folds, ink) are added for
    # encoder_hard_epochs more epochs (0 = no second round)
    encoder_hard_negatives: int = 8
    encoder_hard_epochs: int = 2
    batch_size: int = 64
    # DMIN (docs/method.md §3; k = 8 for small bags) and LIPN (§4)
    keep_rate: float = 0.6
    k_sample: int = 8
    # CLAM's out-of-class instance negatives for two classes: off, as docs/method.md §3 (it did not
    # keep the tumour evidence in the tumour branch in the one run measured, docs/demo_model.md)
    inst_out_of_class: bool = False
    max_epochs: int = 200
    min_epochs: int = 50
    patience: int = 20
    # DMIN is trained again with seed + 1, + 2, ... (up to dmin_tries runs) while its validation
    # branch AUC is below branch_auc_min (its tumour evidence sits in the normal branch)
    dmin_tries: int = 3
    branch_auc_min: float = 0.9
    lipn_max_epochs: int = 100
    lipn_patience: int = 5
    lipn_batch_patches: int = 256  # ~2 slides per LIPN step: 8x the steps of the default 2048
    lipn_lr: float = 1e-3  # the paper's 1e-4 is for cohorts 100x larger: here it stops unconverged
    # one LIPN threshold per class, chosen together on the validation slides: as much of DMIN's
    # attention as LIPN can hold while it keeps at most this share of a slide's patches (dilation
    # included). It works whichever DMIN branch holds DMIN's own keep budget, which DMIN's losses
    # leave open (docs/demo_model.md): per-class attention shares assumed the tumour set small
    lipn_kept: float | None = 0.5
    lipn_attention: float | tuple[float, ...] | None = None  # or: per-class attention shares
    # rings of neighbours joining each patch LIPN keeps (normal, tumour): the tumour set's boundary
    lipn_dilation: tuple[int, ...] | None = (0, 1)
    lipn_recall: float | None = None  # or: one threshold keeping this share of DMIN's instances
    lipn_targets: str = "soft"  # σ(s/τ): LIPN learns DMIN's ranking, not only its 0/1 mask
    lipn_match: str = "bce"  # cross-entropy to σ(s/τ), not L1: ranks rare tumour patches higher
    # σ(s/(3τ)): DMIN scores tumour patches far above the boundary (s ≈ 9); at T = 1 they are all
    # ≈ 1 and LIPN's tumour ranking was worse (patch AUC 0.83 against 0.92, docs/demo_model.md)
    lipn_target_temperature: float = 3.0
    lipn_views: int = 4  # P averaged over the 4 quarter turns of each LR patch (docs/demo_model.md)
    threads: int = 2  # torch threads
    workers: int | None = None  # slide-making processes (default up to 2)

    @classmethod
    def quick(cls, seed: int = 0, n_slides: int = 4) -> RecipeConfig:
        """A few small slides and two epochs: checks that the recipe runs, trains nothing useful."""
        return cls(
            seed=seed, n_slides=n_slides, n_heldout=2, slide_size=1536, max_epochs=2,
            min_epochs=0, patience=1, lipn_max_epochs=2, lipn_patience=1, batch_size=32,
            tumor_burdens=(0.4,), heldout_burdens=(0.4,), workers=1, encoder_patches=8,
            encoder_epochs=1, encoder_hard_negatives=2, encoder_hard_epochs=1,
        )

    def __post_init__(self) -> None:
        if self.n_slides < 4:
            raise RecipeError(f"the recipe needs at least 4 training slides, got {self.n_slides}")
        if self.n_heldout < 0:
            raise RecipeError(f"n_heldout must be >= 0, got {self.n_heldout}")
        if self.slide_size < 1024:
            raise RecipeError(f"slide_size must be at least 1024 px, got {self.slide_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise RecipeError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        self.tumor_burdens = tuple(float(b) for b in self.tumor_burdens)
        self.heldout_burdens = tuple(float(b) for b in self.heldout_burdens)

    @property
    def heldout_seed(self) -> int:
        return int(self.seed) + HELDOUT_OFFSET

    def dmin_config(self, device: str = "cpu"):
        """This recipe's DMIN training config (``hdmil.train.DMINTrainConfig``), its fields
        mapped through the training options table (``hdmil.train.options``)."""
        from hdmil.train.options import dmin_config_from_settings

        return dmin_config_from_settings(self.to_dict(), device=device)

    def lipn_config(self, device: str = "cpu"):
        """This recipe's LIPN training config (``hdmil.train.LIPNTrainConfig``): its ``lipn_*``
        fields through the options table; ``lipn_kept`` / ``lipn_attention`` / ``lipn_recall``
        become the one calibration value (setting two is an error)."""
        from hdmil.train.options import lipn_config_from_settings

        return lipn_config_from_settings(self.to_dict(), device=device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
