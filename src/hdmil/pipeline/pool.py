"""Stage 3, pool: DMIN turns the read patches' features into the slide's prediction.

Two poolers, one answer (``Pooled``): ``PatchPooler`` pools the patches themselves, over LIPN's
mask (HDMIL) or DMIN's own (HDMIL†); ``RegionPooler`` lets SLPD embed each block of patch features
as one region and pools the regions, each patch then showing its region's attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hdmil.inference import DMINPool, dmin_pool
from hdmil.pipeline.featurise import Featurised
from hdmil.pipeline.setup import slpd_label
from hdmil.pipeline.prescreen import PreScreen
from hdmil.pipeline.result import NoTissueError, RegionDetails

__all__ = ["PatchPooler", "Pooled", "Pooler", "RegionPooler", "pooler_for"]


@dataclass
class Pooled:
    """What a pooler gives, over the slide's N tissue patches and C classes.

    probabilities float64 [C]; attention / scores float32 [N, C] (NaN for patches not pooled);
    empty_classes: classes that pooled nothing; regions: the SLPD region details, if any.
    """

    probabilities: np.ndarray
    attention: np.ndarray
    scores: np.ndarray
    empty_classes: list[int] = field(default_factory=list)
    regions: RegionDetails | None = None


class Pooler(Protocol):
    def pool(self, read: Featurised, screen: PreScreen, slide: Any) -> Pooled: ...


def _per_patch(n: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty attention and scores float32 [N, C]: NaN until a pooled value is written."""
    return np.full((n, n_classes), np.nan, np.float32), np.full((n, n_classes), np.nan, np.float32)


def _pooled(pool: DMINPool, attention: np.ndarray, scores: np.ndarray,
            regions: RegionDetails | None = None) -> Pooled:
    return Pooled(probabilities=pool.probabilities.astype(np.float64), attention=attention,
                  scores=scores, empty_classes=pool.empty_classes, regions=regions)


@dataclass
class PatchPooler:
    """DMIN over the read patches: class c pools LIPN's kept set for c (``use_lipn``), else its own."""

    dmin: Any
    use_lipn: bool

    def pool(self, read: Featurised, screen: PreScreen, slide: Any) -> Pooled:
        rows = read.read_rows
        mask = screen.lipn_mask[rows] if self.use_lipn else None
        pool = dmin_pool(self.dmin, read.features, mask)
        attention, scores = _per_patch(screen.n_patches, len(screen.classes))
        if len(rows):
            attention[rows] = pool.attention
            scores[rows] = pool.scores
        return _pooled(pool, attention, scores)


@dataclass
class RegionPooler:
    """SLPD embeds each block of read patches as one region; DMIN pools the regions."""

    dmin: Any
    slpd: Any

    def pool(self, read: Featurised, screen: PreScreen, slide: Any) -> Pooled:
        coords = np.asarray(screen.coords, dtype=np.int64).reshape(-1, 2)
        sl = self._embed(read.features, coords[read.read_rows], int(screen.grid.patch_size_level0), slide)
        pool = dmin_pool(self.dmin, sl.region_embeddings, None)
        patch_region = np.full(screen.n_patches, -1, np.int64)
        patch_region[read.read_rows] = sl.patch_region
        inside = patch_region >= 0
        attention, scores = _per_patch(screen.n_patches, len(screen.classes))
        attention[inside] = pool.attention[patch_region[inside]]
        scores[inside] = pool.scores[patch_region[inside]]
        regions = RegionDetails(
            coords=sl.region_coords.astype(np.int64), attention=pool.attention, scores=pool.scores,
            prototype=sl.region_prototype.astype(np.int64), patch_region=patch_region,
            size_level0=int(sl.region_size_level0), slpd_name=Path(slpd_label(self.slpd)).name,
        )
        return _pooled(pool, attention, scores, regions)

    def _embed(self, feats: np.ndarray, coords: np.ndarray, patch_size: int, slide: Any) -> Any:
        """SLPD outputs of the read patches; NoTissueError when they fill no region."""
        from hdmil.models.slpd import embed_slide

        out = embed_slide(self.slpd, feats, coords, patch_size, slide_id=str(slide.name))
        if len(out.region_embeddings) == 0:
            g = self.slpd.cfg.region_size
            raise NoTissueError(
                f"{slide.path}: no SLPD region: no {g} × {g} block of the patch grid holds at least "
                f"{self.slpd.cfg.region_min_tissue:.0%} tissue patches ({len(coords)} patches read)"
            )
        return out


def pooler_for(model: Any, slpd: Any, use_lipn: bool) -> Pooler:
    """The pooler the checkpoint's DMIN was trained for: regions when it names SLPD, else patches."""
    if model.instances == "region":
        return RegionPooler(model.dmin, slpd)
    return PatchPooler(model.dmin, use_lipn)

