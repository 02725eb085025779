"""SLPD: slide-level prototypical distillation (docs/method.md §6).

Self-supervised region representations. A *region* is a 16 × 16 block of HR patches, given to the
model as its grid of patch features ``[B, 16, 16, D]`` plus a validity mask for missing (background)
patches. The region encoder is a small ViT over that token grid (HIPT's ViT-4K-xs shape); it is
trained with DINO self-distillation on crops of the token grid, plus two prototype losses:

- intra-slide: every student crop is pulled to the teacher head applied to the prototype (k-means
  centroid of the teacher's embeddings inside the slide) of the region's own cluster;
- inter-slide: the same towards the most similar prototype of the slide's nearest other slide,
  where slide similarity is the best one-to-one matching of prototypes (an assignment problem).

Presets (``slpd_config(name)``):

- ``"reference"``: the values of docs/method.md §6 (depth 6, head 192 → 2048 → 2048 → 256 → 4096,
  2 global 14 × 14 + 8 local 6 × 6 crops, 100 epochs, 20 epochs of plain DINO before prototypes,
  32 regions needed for K = 4 prototypes). The reference uses 65,536 head outputs; we default to
  4096, plenty for thousands of regions.
- ``"small"`` (the default, trains on a CPU in minutes for a small cohort): depth 4, head
  192 → 512 → 512 → 256 → 1024, 2 global + 4 local crops, 30 epochs with 10 of plain DINO,
  batch 16 at lr 5e-4 (3 warm-up epochs), teacher momentum 0.99 → 1 (with 0.996 and a few
  hundred steps the teacher hardly moves and the DINO loss stalls near log P), 2 regions per
  prototype needed (8 for K = 4). Embedding width 192 and prototype width 256 are
  kept, so outputs have the same shapes as with the reference preset.

Shapes: B regions, h × w a (cropped) token grid, D patch-feature width, E = 192 embedding width,
Z = 256 bottleneck (prototype) width, P head outputs, K prototypes per slide.

This module is SLPD's one home: the model here, prototypes in ``slpd_prototypes``, a slide's regions
and their embeddings (what inference needs) in ``slpd_regions``, all re-exported from here.
Checkpoints are written and read by ``hdmil.checkpoint`` (``save_slpd`` / ``load_slpd``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdmil.models.slpd_prototypes import (
    cross_slide_targets,
    derived_seed,
    kmeans,
    prototype_matching,
    prototype_similarity,
    similarity_matrix,
    slide_kmeans_seed,
    slide_neighbours,
    slide_prototypes,
)
from hdmil.models.slpd_regions import (
    Regions,
    SlideSLPD,
    build_regions,
    center_index,
    embed_regions,
    embed_slide,
    embed_slide_regions,
    patch_size_of,
)

__all__ = [
    "RegionEncoderConfig",
    "SLPDConfig",
    "slpd_config",
    "list_slpd_presets",
    "RegionEncoder",
    "DINOHead",
    "SLPDNet",
    "SLPD",
    "SLPDTerms",
    "dino_loss",
    "prototype_loss",
    "kmeans",
    "slide_prototypes",
    "prototype_matching",
    "prototype_similarity",
    "similarity_matrix",
    "slide_neighbours",
    "cross_slide_targets",
    "derived_seed",
    "slide_kmeans_seed",
    "Regions",
    "SlideSLPD",
    "build_regions",
    "center_index",
    "embed_regions",
    "embed_slide",
    "embed_slide_regions",
    "patch_size_of",
]


# --------------------------------------------------------------------------------------------
# Configs and presets


@dataclass
class RegionEncoderConfig:
    """The ViT over a region's patch-feature grid."""

    in_dim: int = 1024  # D: patch-feature width (set from the feature files)
    embed_dim: int = 192  # E: token width and output [CLS] width
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    grid_size: int = 16  # patches per region side; the learned position grid
    drop_path_rate: float = 0.0


@dataclass
class SLPDConfig:
    """Model, views, prototypes and training schedule (all saved in the checkpoint)."""

    encoder: RegionEncoderConfig = field(default_factory=RegionEncoderConfig)
    # DINO head: E -> hidden -> hidden -> bottleneck (L2-normalised) -> weight-normed -> out_dim
    head_hidden: int = 2048
    head_bottleneck: int = 256  # Z: the space prototypes live in
    out_dim: int = 4096  # P (65,536 in the reference)
    # views: crops of the token grid
    global_crops: int = 2
    global_size: int = 14
    local_crops: int = 8
    local_size: int = 6
    flips: bool = True
    rotations: bool = True  # random multiples of 90°
    # DINO
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996  # -> 1 with a cosine over all steps
    # prototypes
    n_prototypes: int = 4  # K per slide (4 NSCLC, 2 BRCA in the reference)
    min_regions: int | None = None  # None: regions_per_prototype * K
    regions_per_prototype: int = 8  # 32 regions for K = 4, 16 for K = 2
    kmeans_iters: int = 50
    intra_weight: float = 1.0
    inter_weight: float = 1.0
    # regions from the patch grid
    region_min_tissue: float = 0.25  # fraction of a block's patches that must be tissue
    # training
    epochs: int = 100
    proto_warmup_epochs: int = 20  # plain DINO before the prototype losses
    batch_size: int = 64
    lr: float = 1.25e-4  # peak; the reference's 5e-4 x batch / 256
    min_lr: float = 1e-6
    lr_warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    seed: int = 0

    @property
    def region_size(self) -> int:
        return self.encoder.grid_size

    @property
    def min_regions_for_prototypes(self) -> int:
        """Fewest regions a slide needs to get prototypes (at least K)."""
        n = self.min_regions if self.min_regions is not None else (
            self.regions_per_prototype * self.n_prototypes
        )
        return max(int(n), self.n_prototypes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SLPDConfig:
        d = dict(d)
        enc = RegionEncoderConfig(**d.pop("encoder", {}))
        known = {f.name for f in fields(cls)}
        return cls(encoder=enc, **{k: v for k, v in d.items() if k in known})

    def validate(self) -> None:
        e = self.encoder
        if e.embed_dim % e.num_heads:
            raise ValueError(f"embed_dim {e.embed_dim} is not divisible by num_heads {e.num_heads}")
        for name in ("global_size", "local_size"):
            s = getattr(self, name)
            if not 1 <= s <= e.grid_size:
                raise ValueError(f"{name} {s} must be in 1..grid_size ({e.grid_size})")
        if self.global_crops < 1:
            raise ValueError("at least one global crop is needed")
        if self.global_crops + self.local_crops < 2:
            raise ValueError("DINO needs at least two views")
        if self.n_prototypes < 1:
            raise ValueError("n_prototypes must be >= 1")


_PRESETS: dict[str, dict[str, Any]] = {
    "reference": {},
    "small": dict(
        encoder=dict(depth=4),
        head_hidden=512,
        out_dim=1024,
        local_crops=4,
        epochs=30,
        proto_warmup_epochs=10,
        lr_warmup_epochs=3,
        batch_size=16,  # more steps per epoch on a small cohort
        teacher_momentum=0.99,  # the teacher must move within a few hundred steps
        lr=5e-4,
        regions_per_prototype=2,
    ),
    # for unit tests: tiny and fast
    "tiny": dict(
        encoder=dict(in_dim=8, embed_dim=16, depth=1, num_heads=2, grid_size=4),
        head_hidden=32,
        head_bottleneck=8,
        out_dim=32,
        global_size=3,
        local_crops=2,
        local_size=2,
        n_prototypes=2,
        regions_per_prototype=2,
        epochs=3,
        proto_warmup_epochs=1,
        lr_warmup_epochs=1,
        batch_size=8,
        lr=1e-3,
    ),
}


def list_slpd_presets() -> list[str]:
    return sorted(_PRESETS)


def slpd_config(name: str = "small", **overrides: Any) -> SLPDConfig:
    """A preset config with overrides; encoder fields (``in_dim``, ``depth`` ...) may be given flat."""
    if name not in _PRESETS:
        raise ValueError(f"unknown SLPD preset {name!r}; choose from {list_slpd_presets()}")
    preset = copy.deepcopy(_PRESETS[name])
    enc_over = preset.pop("encoder", {})
    enc_names = {f.name for f in fields(RegionEncoderConfig)}
    top: dict[str, Any] = {}
    for k, v in overrides.items():
        if k in enc_names:
            enc_over[k] = v
        elif k == "encoder" and isinstance(v, dict):
            enc_over.update(v)
        else:
            top[k] = v
    cfg = SLPDConfig(encoder=RegionEncoderConfig(**enc_over), **preset)
    cfg = replace(cfg, **top) if top else cfg
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------------------------
# Region encoder


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    """Multi-head self-attention whose keys can be masked (missing patches are never attended)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x [B, L, E], key_mask bool [B, L] (True = attend) -> [B, L, E]."""
        b, n, e = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, e // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, L, e/H]
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, e))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN x), x + MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + _drop_path(self.attn(self.norm1(x), key_mask), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class RegionEncoder(nn.Module):
    """ViT over a region's patch-feature grid: [B, h, w, D] (+ mask [B, h, w]) -> [CLS] [B, E].

    Linear D → E + GELU per patch, a [CLS] token, learned 2-D position embeddings on the
    ``grid_size`` × ``grid_size`` grid (bicubically interpolated to a crop's h × w), ``depth``
    pre-norm blocks, final LayerNorm. Missing patches are zeros in ``x`` and False in ``mask``:
    they are not attended to, so they do not change the output.
    """

    def __init__(self, cfg: RegionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim
        self.embed = nn.Sequential(nn.Linear(cfg.in_dim, e), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.pos_embed = nn.Parameter(torch.zeros(1, e, cfg.grid_size, cfg.grid_size))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, e))
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(e, cfg.num_heads, cfg.mlp_ratio, dpr[i]) for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(e, eps=1e-6)
        self._init_weights()

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def _init_weights(self) -> None:
        for p in (self.cls_token, self.pos_embed, self.cls_pos):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def pos_embedding(self, h: int, w: int) -> Tensor:
        """Position embeddings for an h × w crop: [1, h*w, E]."""
        pe = self.pos_embed
        if (h, w) != tuple(pe.shape[-2:]):
            pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [B, h, w, D] float, mask [B, h, w] bool (True = patch present) -> [B, E]."""
        b, h, w, _ = x.shape
        tok = self.embed(x.reshape(b, h * w, -1)) + self.pos_embedding(h, w)
        cls = (self.cls_token + self.cls_pos).expand(b, -1, -1)
        tok = torch.cat([cls, tok], dim=1)  # [B, 1 + h*w, E]
        key_mask = None
        if mask is not None:
            key_mask = torch.cat(
                [torch.ones(b, 1, dtype=torch.bool, device=x.device), mask.reshape(b, h * w)], 1
            )
        for blk in self.blocks:
            tok = blk(tok, key_mask)
        return self.norm(tok[:, 0])


class DINOHead(nn.Module):
    """E -> hidden -> hidden -> Z (L2-normalised) -> weight-normalised linear -> P logits.

    The last layer's weight rows are L2-normalised on the fly (weight norm with the gain fixed
    at 1, as DINO does), so ``logits_from_z`` of a unit vector is a cosine score per output.
    """

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )  # fmt: skip
        self.last_weight = nn.Parameter(torch.empty(out_dim, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.last_weight, std=0.02)

    def project(self, x: Tensor) -> Tensor:
        """[B, E] -> L2-normalised bottleneck [B, Z] (the space of the slide prototypes)."""
        return F.normalize(self.mlp(x), dim=-1)

    def logits_from_z(self, z: Tensor) -> Tensor:
        """[B, Z] -> [B, P]."""
        return z @ F.normalize(self.last_weight, dim=1).t()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.project(x)
        return self.logits_from_z(z), z


class SLPDNet(nn.Module):
    """Region encoder + DINO head (one of student / teacher)."""

    def __init__(self, cfg: SLPDConfig):
        super().__init__()
        self.encoder = RegionEncoder(cfg.encoder)
        self.head = DINOHead(
            cfg.encoder.embed_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.out_dim
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, h, w, D], mask [B, h, w] -> (logits [B, P], z [B, Z], cls [B, E])."""
        cls = self.encoder(x, mask)
        logits, z = self.head(cls)
        return logits, z, cls


# --------------------------------------------------------------------------------------------
# Losses


def _soft_ce(target: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """Mean over rows of -Σ target · log softmax(student / τs)."""
    return -(target * F.log_softmax(student_logits / student_temp, dim=-1)).sum(-1).mean()


def _sharpen(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    return F.softmax((teacher_logits - center) / teacher_temp, dim=-1).detach()


def dino_loss(
    student: list[Tensor],
    teacher: list[Tensor],
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> Tensor:
    """DINO cross-entropy between every (teacher global view, student view of another crop).

    ``student``: logits [B, P] of all views, the global views first (in the teacher's order);
    ``teacher``: logits [B, P] of the global views. Pairs of the same view are skipped.
    """
    targets = [_sharpen(t, center, teacher_temp) for t in teacher]
    total, n = student[0].new_zeros(()), 0
    for i, q in enumerate(targets):
        for j, s in enumerate(student):
            if i == j:
                continue
            total = total + _soft_ce(q, s, student_temp)
            n += 1
    return total / max(n, 1)


def prototype_loss(
    student: list[Tensor],
    target_logits: Tensor,
    valid: Tensor,
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> Tensor:
    """Cross-entropy between every student view and a prototype target (intra and inter loss).

    ``target_logits`` [B, P]: the teacher head's last layer applied to each region's target
    prototype; ``valid`` bool [B]: regions that have one. Zero (still a graph node) when none does.
    """
    if not bool(valid.any()):
        return sum(s.sum() for s in student) * 0.0
    q = _sharpen(target_logits[valid], center, teacher_temp)
    return sum(_soft_ce(q, s[valid], student_temp) for s in student) / len(student)


@dataclass
class SLPDTerms:
    """The loss terms of one step (tensors with grad, ``total`` = dino + intra + inter)."""

    total: Tensor
    dino: Tensor
    intra: Tensor
    inter: Tensor

    def items(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "dino", "intra", "inter")}


class SLPD(nn.Module):
    """Student and EMA teacher (same architecture) plus the DINO output center."""

    def __init__(self, cfg: SLPDConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.student = SLPDNet(cfg)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))

    def train(self, mode: bool = True) -> SLPD:
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for ps, pt in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
            pt.mul_(momentum).add_(ps.detach(), alpha=1.0 - momentum)

    @torch.no_grad()
    def update_center(self, teacher_logits: list[Tensor]) -> None:
        batch_center = torch.cat(teacher_logits).mean(0, keepdim=True)
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(batch_center, alpha=1.0 - m)

    @torch.no_grad()
    def teacher_prototype_logits(self, z: Tensor) -> Tensor:
        """Teacher head's last layer on prototypes [B, Z] (re-normalised) -> [B, P]."""
        return self.teacher.head.logits_from_z(F.normalize(z, dim=-1))

    def losses(
        self,
        views: list[tuple[Tensor, Tensor]],
        intra: tuple[Tensor, Tensor] | None = None,
        inter: tuple[Tensor, Tensor] | None = None,
        update_center: bool = True,
    ) -> SLPDTerms:
        """All loss terms for one batch of regions.

        views: ``(x [B, h, w, D], mask [B, h, w])`` per view, the ``cfg.global_crops`` global views
        first; intra / inter: ``(prototype z [B, Z], valid bool [B])`` target of each region, or None
        before the prototypes exist. Updates the center from the teacher outputs (no grad).
        """
        cfg = self.cfg
        ng = cfg.global_crops
        with torch.no_grad():
            t_logits = [self.teacher(x, m)[0] for x, m in views[:ng]]
        s_logits = [self.student(x, m)[0] for x, m in views]
        temps = (cfg.student_temp, cfg.teacher_temp)
        l_dino = dino_loss(s_logits, t_logits, self.center, *temps)
        zero = l_dino.new_zeros(())
        terms = {"intra": zero, "inter": zero}
        for name, tgt in (("intra", intra), ("inter", inter)):
            if tgt is None:
                continue
            z, valid = tgt
            tl = self.teacher_prototype_logits(z)
            terms[name] = prototype_loss(s_logits, tl, valid, self.center, *temps)
        if update_center:
            self.update_center(t_logits)
        total = l_dino + cfg.intra_weight * terms["intra"] + cfg.inter_weight * terms["inter"]
        return SLPDTerms(total=total, dino=l_dino, intra=terms["intra"], inter=terms["inter"])
