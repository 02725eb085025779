"""One bag in, one prediction out: LIPN's screen, then DMIN's pooling (docs/method.md §3, §4).

    LR patches uint8 [N, 16, 16, 3] + grid index ─► lipn_screen ─► keep mask bool [N, C]
                                                                        │ (HDMIL; all kept for HDMIL†)
    features float32 [N, D] ─────────────────────────────────────► dmin_pool ─► probabilities [C]

``predict_bag`` is the whole of it for a bag whose features are all at hand (evaluation on feature
files, the recipe's held-out metrics). The pipeline uses the two pieces apart, because it reads
only the patches LIPN kept: ``lipn_screen`` before reading, ``dmin_pool`` on what was read.

* **HDMIL** (``use_lipn=True``): class c pools over the patches LIPN keeps for c;
* **HDMIL†** (``use_lipn=False``): every patch is kept and DMIN pools class c over its own
  ``s[:, c] > 0`` (the student's evaluation path).

This module imports nothing from ``hdmil.train``: inference does not depend on training code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hdmil.errors import CheckpointError

__all__ = [
    "BagPrediction",
    "DMINPool",
    "LIPNScreen",
    "as_numpy",
    "dmin_pool",
    "lipn_screen",
    "predict_bag",
    "screen_all",
]


def as_numpy(x: Any) -> np.ndarray:
    """float32 numpy from a tensor (any device) or an array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


@dataclass
class LIPNScreen:
    """Which patches each class keeps, decided at 1.25x before any HR pixel is read.

    mask bool [N, C] the kept set of each class (after LIPN's dilation, when it dilates);
    neighbour bool [N] patches kept only as a neighbour of a kept patch (the dilation's share).
    """

    mask: np.ndarray
    neighbour: np.ndarray

    @property
    def kept(self) -> np.ndarray:
        """bool [N]: kept by any class, the patches a run reads at 20x."""
        return self.mask.any(axis=1)


def lipn_screen(lipn: Any, lr_patches: np.ndarray, grid_index: np.ndarray | None = None) -> LIPNScreen:
    """LIPN's keep mask over a bag's LR patches uint8 [N, 16, 16, 3].

    ``grid_index`` int [N, 2] (row, col) is needed only when the LIPN dilates its kept sets.
    """
    n = int(len(lr_patches))
    plain, grown = lipn.keep_masks(lr_patches, index=grid_index)
    mask = np.asarray(grown, dtype=bool).reshape(n, int(lipn.cfg.n_classes))
    neighbour = mask.any(axis=1) & ~np.asarray(plain, dtype=bool).reshape(n, -1).any(axis=1)
    return LIPNScreen(mask=mask, neighbour=neighbour)


def screen_all(n: int, n_classes: int) -> LIPNScreen:
    """HDMIL†'s screen: every patch kept for every class, none as a neighbour."""
    return LIPNScreen(mask=np.ones((n, n_classes), dtype=bool), neighbour=np.zeros(n, dtype=bool))


@dataclass
class DMINPool:
    """DMIN's evaluation output as numpy (N instances, C classes).

    probabilities float32 [C]; attention float32 [N, C] softmax of s within each class's pooled
    set, NaN elsewhere; scores float32 [N, C] raw attention logits s; mask bool [N, C] the set
    each class pooled; kept_ratio the share pooled by any class; empty_classes pooled nothing.
    """

    probabilities: np.ndarray
    attention: np.ndarray
    scores: np.ndarray
    mask: np.ndarray
    kept_ratio: float
    empty_classes: list[int] = field(default_factory=list)


def dmin_pool(dmin: Any, features: Any, mask: Any = None) -> DMINPool:
    """DMIN over features [N, D]: class c pools the rows of ``mask[:, c]`` (bool [N, C]), or its
    own ``s > 0`` when ``mask`` is None."""
    pred = dmin.predict(features, mask)
    return DMINPool(
        probabilities=as_numpy(pred.probabilities),
        attention=as_numpy(pred.attention),
        scores=as_numpy(pred.scores),
        mask=np.asarray(pred.mask, dtype=bool),
        kept_ratio=float(pred.kept_ratio),
        empty_classes=list(pred.empty_classes),
    )


@dataclass
class BagPrediction:
    """``predict_bag``'s answer for one bag of N patches and C classes.

    lipn_mask bool [N, C] LIPN's keep mask (all True for HDMIL†); neighbour bool [N];
    dmin_mask bool [N, C] the set DMIN pooled per class (LIPN's mask, or DMIN's own for HDMIL†);
    probabilities float32 [C]; attention / scores float32 [N, C].
    """

    use_lipn: bool
    screen: LIPNScreen
    pool: DMINPool

    @property
    def probabilities(self) -> np.ndarray:
        return self.pool.probabilities

    @property
    def prediction(self) -> int:
        return int(np.argmax(self.pool.probabilities))

    @property
    def lipn_mask(self) -> np.ndarray:
        return self.screen.mask

    @property
    def kept(self) -> np.ndarray:
        """bool [N]: kept by LIPN for any class (all True for HDMIL†)."""
        return self.screen.kept

    @property
    def neighbour(self) -> np.ndarray:
        return self.screen.neighbour

    @property
    def dmin_mask(self) -> np.ndarray:
        return self.pool.mask

    @property
    def attention(self) -> np.ndarray:
        return self.pool.attention

    @property
    def scores(self) -> np.ndarray:
        return self.pool.scores

    @property
    def kept_ratio(self) -> float:
        """Share of the bag's patches DMIN pooled over (any class)."""
        return self.pool.kept_ratio

    @property
    def empty_classes(self) -> list[int]:
        return self.pool.empty_classes


def predict_bag(
    model: Any,
    features: Any,
    lr_patches: np.ndarray | None = None,
    grid_index: np.ndarray | None = None,
    use_lipn: bool = True,
) -> BagPrediction:
    """HDMIL (LIPN's mask, then DMIN) or HDMIL† (DMIN alone) on one bag.

    Args:
        model: an ``HDMILModel`` (its ``dmin``; its ``lipn`` for HDMIL).
        features: float [N, D], the bag's patch features (array or tensor).
        lr_patches: uint8 [N, 16, 16, 3] the same patches at 1.25x; needed for HDMIL.
        grid_index: int [N, 2] their (row, col) on the slide's grid; needed when LIPN dilates.
        use_lipn: HDMIL when True, HDMIL† when False.
    """
    n = int(features.shape[0])
    if not use_lipn:
        return BagPrediction(False, screen_all(n, model.n_classes), dmin_pool(model.dmin, features))
    if model.lipn is None:
        raise CheckpointError(f"{model.path}: the checkpoint has no LIPN; predict with use_lipn=False")
    if lr_patches is None:
        raise ValueError("predict_bag with use_lipn needs the bag's LR patches")
    screen = lipn_screen(model.lipn, lr_patches, grid_index)
    return BagPrediction(True, screen, dmin_pool(model.dmin, features, screen.mask))
