"""A slide's SLPD regions and their embeddings: what inference needs of a trained SLPD model.

A region is a G × G block of the slide's patch grid (G = 16 for the presets, docs/method.md §6).
``build_regions`` cuts the grid into blocks, ``embed_regions`` runs the teacher over blocks of patch
features, and ``embed_slide`` gives one slide's region embeddings and prototypes (``SlideSLPD``):

    regions = build_regions(coords, patch_size_level0, cfg.region_size, cfg.region_min_tissue)
    out = embed_slide(model, features, coords, patch_size_level0, slide_id="slide-1")
    out.region_embeddings  # float32 [R, E], what a region DMIN pools

Shapes: N patches of the slide, D patch-feature width, R regions, G region side in patches,
E embedding width, Z bottleneck (prototype) width, K prototypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hdmil.errors import FeatureFileError
from hdmil.models.slpd_prototypes import slide_kmeans_seed, slide_prototypes

if TYPE_CHECKING:
    from hdmil.models.slpd import SLPD

__all__ = [
    "Regions",
    "SlideSLPD",
    "build_regions",
    "center_index",
    "embed_regions",
    "embed_slide",
    "embed_slide_regions",
    "patch_size_of",
]


@dataclass
class Regions:
    """The regions of one slide: G × G blocks of its patch grid.

    patch_index: int64 [R, G, G], row of ``features`` for each cell, -1 where no tissue patch;
    coords: int64 [R, 2] level-0 (x, y) of each region's top-left corner;
    grid_index: int64 [R, 2] (row, col) of each region in the grid of regions.
    """

    patch_index: np.ndarray
    coords: np.ndarray
    grid_index: np.ndarray
    region_size: int
    patch_size_level0: int

    def __len__(self) -> int:
        return int(self.patch_index.shape[0])

    @property
    def region_size_level0(self) -> int:
        return self.region_size * self.patch_size_level0

    @property
    def mask(self) -> np.ndarray:
        """bool [R, G, G]: True where a patch is present."""
        return self.patch_index >= 0

    def tokens(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x float32 [R, G, G, D] with zeros for missing patches, mask bool [R, G, G])."""
        feats = np.asarray(features, dtype=np.float32)
        mask = self.mask
        x = feats[np.where(mask, self.patch_index, 0)] if len(feats) else np.zeros(
            mask.shape + (feats.shape[1],), np.float32
        )
        x[~mask] = 0.0
        return x, mask

    def patch_region(self, n_patches: int) -> np.ndarray:
        """int64 [N]: the region row of each patch, -1 for patches in no region."""
        out = np.full(n_patches, -1, np.int64)
        cells = self.patch_index.reshape(len(self), self.region_size**2)  # [R, G*G]
        r, c = np.nonzero(cells >= 0)
        out[cells[r, c]] = r
        return out


def patch_size_of(coords: np.ndarray, attrs: dict[str, Any], where: str = "") -> int:
    """``patch_size_level0`` from the file's attributes, else the smallest step between coords."""
    ps = attrs.get("patch_size_level0")
    if ps:
        return int(ps)
    steps = []
    for axis in (0, 1):
        u = np.unique(np.asarray(coords)[:, axis])
        d = np.diff(u)
        steps.extend(d[d > 0].tolist())
    if not steps:
        raise FeatureFileError(
            f"{where}: no 'patch_size_level0' attribute and too few patches to infer it"
        )
    return int(min(steps))


def build_regions(
    coords: np.ndarray,
    patch_size_level0: int,
    region_size: int = 16,
    min_tissue: float = 0.25,
) -> Regions:
    """Cut the patch grid into ``region_size`` × ``region_size`` blocks.

    coords int [N, 2] level-0 (x, y) of the patches. Grid position = (coords - offset) //
    patch_size_level0, where offset (< one patch) is the grid's phase (0 for grids that start at
    the slide origin, like ours). Blocks with at least ``min_tissue`` of their cells present (and
    at least one) become regions, in row-major order; missing cells are -1 in ``patch_index``.
    """
    g, ps = int(region_size), int(patch_size_level0)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(coords) == 0:
        z = np.zeros((0, 2), np.int64)
        return Regions(np.zeros((0, g, g), np.int64), z, z.copy(), g, ps)
    offset = coords.min(0) % ps
    cell = (coords - offset) // ps  # (col, row) per patch
    col, row = cell[:, 0], cell[:, 1]
    blocks, inverse, counts = np.unique(
        np.stack([row // g, col // g], 1), axis=0, return_inverse=True, return_counts=True
    )
    keep = (counts >= max(1, math.ceil(min_tissue * g * g))).nonzero()[0]
    new_id = np.full(len(blocks), -1, np.int64)
    new_id[keep] = np.arange(len(keep))
    patch_index = np.full((len(keep), g, g), -1, np.int64)
    rid = new_id[inverse.reshape(-1)]
    sel = rid >= 0
    patch_index[rid[sel], (row % g)[sel], (col % g)[sel]] = np.nonzero(sel)[0]
    grid_index = blocks[keep].astype(np.int64)
    region_coords = offset[None, :] + grid_index[:, ::-1] * (g * ps)  # (x, y)
    return Regions(patch_index, region_coords.astype(np.int64), grid_index, g, ps)


def center_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size × size cells of index maps [B, G, G] -> [B, size, size]."""
    g = index.shape[1]
    o = (g - size) // 2
    return index[:, o : o + size, o : o + size]


@torch.no_grad()
def embed_regions(
    model: SLPD,
    index: torch.Tensor,
    features: torch.Tensor,
    crop: int | None = None,
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher outputs for regions: (cls [R, E], z [R, Z] L2-normalised), on the CPU.

    index [R, G, G] into ``features`` [N + 1, D] (last row zeros, where missing patches point);
    ``crop``: centre crop side (None = the whole region). Puts the teacher in eval mode.
    """
    net = model.teacher.eval()
    missing = features.shape[0] - 1
    cls_out, z_out = [], []
    for b0 in range(0, index.shape[0], batch_size):
        idx = index[b0 : b0 + batch_size].to(features.device)
        if crop is not None:
            idx = center_index(idx, crop)
        _, z, cls = net(features[idx], idx != missing)
        cls_out.append(cls.cpu())
        z_out.append(z.cpu())
    if not cls_out:
        return torch.zeros(0, model.cfg.encoder.embed_dim), torch.zeros(0, model.cfg.head_bottleneck)
    return torch.cat(cls_out), torch.cat(z_out)


@dataclass
class SlideSLPD:
    """SLPD outputs of one slide (what goes into its feature h5)."""

    region_embeddings: np.ndarray  # float32 [R, E]
    region_coords: np.ndarray  # int64 [R, 2]
    region_prototype: np.ndarray  # int64 [R], -1 = none
    prototypes: np.ndarray  # float32 [K, Z] or [0, Z]
    region_size_level0: int
    region_patches: int
    patch_region: np.ndarray | None = None  # int64 [N]: region row of each input patch, -1 = none

    def datasets(self) -> dict[str, np.ndarray]:
        return {
            "region_embeddings": self.region_embeddings.astype(np.float32),
            "region_coords": self.region_coords.astype(np.int64),
            "region_prototype": self.region_prototype.astype(np.int64),
            "prototypes": self.prototypes.astype(np.float32),
        }

    def attrs(self, checkpoint: str = "") -> dict[str, Any]:
        """The feature file's attributes that describe these outputs."""
        return {
            "slpd_region_size_level0": int(self.region_size_level0),
            "slpd_region_patches": int(self.region_patches),
            "slpd_checkpoint": str(checkpoint),
        }


def _index_tensors(features: np.ndarray, regions: Regions) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [R, G, G] with missing cells -> the zero row, features [N + 1, D])."""
    feats = torch.from_numpy(np.asarray(features, dtype=np.float32))
    feats = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
    idx = torch.from_numpy(regions.patch_index.copy())
    idx[idx < 0] = feats.shape[0] - 1
    return idx, feats


def embed_slide_regions(
    model: SLPD, regions: Regions, features: np.ndarray, slide_id: str, device: torch.device
) -> SlideSLPD:
    """``SlideSLPD`` of regions already cut from ``features`` [N, D] (the model on ``device``).

    Embeddings are the teacher's [CLS] of whole regions; prototypes are k-means of the centre
    crops' bottleneck embeddings, seeded by the config's seed and ``slide_id``.
    """
    cfg = model.cfg
    idx, feats = _index_tensors(features, regions)
    feats = feats.to(device)
    cls, _ = embed_regions(model, idx, feats)
    _, zc = embed_regions(model, idx, feats, crop=cfg.global_size)
    protos, labels = slide_prototypes(
        zc.numpy(), cfg.n_prototypes, cfg.min_regions_for_prototypes,
        seed=slide_kmeans_seed(cfg.seed, slide_id), iters=cfg.kmeans_iters,
    )  # fmt: skip
    if protos is None:
        protos = np.zeros((0, cfg.head_bottleneck), np.float32)
    return SlideSLPD(
        cls.numpy().astype(np.float32), regions.coords, labels, protos,
        regions.region_size_level0, cfg.region_size, regions.patch_region(len(features)),
    )  # fmt: skip


def embed_slide(
    model: SLPD,
    features: np.ndarray,
    coords: np.ndarray,
    patch_size_level0: int,
    slide_id: str = "",
    device: str | torch.device | None = None,
) -> SlideSLPD:
    """Region embeddings and prototypes of one slide with a trained SLPD model (any slide).

    features float [N, D], coords int [N, 2] level-0 (x, y). Uses the teacher; the k-means seed
    comes from the config's seed and ``slide_id``, as in ``pretrain_slpd``'s outputs, so the same
    slide gets the same prototypes.
    """
    cfg = model.cfg
    regions = build_regions(coords, patch_size_level0, cfg.region_size, cfg.region_min_tissue)
    dev = torch.device(device or "cpu")
    return embed_slide_regions(model.to(dev), regions, features, slide_id, dev)
