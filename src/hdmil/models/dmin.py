"""DMIN: the dynamic multi-instance network, teacher and student in one network (docs/method.md §3).

Shapes: N instances, D input width (1024), H hidden (512), A attention width (256), C classes.

    h = Dropout(ReLU(Linear(D→H) x))                                   [N, H]
    s = Linear(A→C)(Dropout(tanh(Linear h)) ⊙ Dropout(sigmoid(Linear h)))   [N, C]  one branch per class
    teacher: α = softmax_j(s),            E_tea[c] = Σ_j α[j, c] h[j]       [C, H]
    student: M = Gumbel-sigmoid mask (training) or 1[s > 0] (eval)       [N, C]
             w = exp(s − max) · M,        E_stu[c] = Σ_j w[j, c] h[j] / Σ_j w[j, c]   (per class)
    logits[c] = CKA_c(E[c])   (one Chebyshev-KAN classifier H → 1 per class)     [C]

Our choices where the reference differs (docs/method.md §7): the student's weights are normalised per class
in training and in evaluation, the max is subtracted before exp, the kept ratio is the union over
all C classes. Initialisation is the reference's: Linear layers Xavier-normal with zero bias, the
CKA layers' Ω Xavier-normal (``DMIN.reset_parameters``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hdmil.models._eval import evaluating
from hdmil.models.cka import ChebyKANLayer
from hdmil.models.losses import binarize_st, keep_union, smooth_top1_svm

__all__ = ["DMIN", "DMINConfig", "DMINOutput", "DMINPrediction", "GatedAttention"]


@dataclass
class DMINConfig:
    """Hyper-parameters of DMIN and of its loss (reference values, docs/method.md §3)."""

    in_dim: int = 1024
    hidden: int = 512
    attn_dim: int = 256
    n_classes: int = 2
    cheby_degree: int = 12
    dropout: float = 0.25
    tau: float = 0.7  # Gumbel-sigmoid temperature
    gamma: float = 0.5  # binarisation threshold of the training mask
    k_sample: int = 32  # instances per side for the clustering loss (clamped to N // 2)
    inst_loss: str = "svm"  # "svm" (smooth top-1 SVM) or "ce"
    # ours for binary tasks: the top-k of the other class's branch are negatives too, which fixes
    # which branch's top attention is the positive evidence; the reference (docs/method.md §3) does
    # this only for more than two classes (CLAM's subtyping mode)
    inst_out_of_class: bool = False
    w_ce: float = 0.7
    w_clu: float = 0.3
    w_emb: float = 0.5
    w_kl: float = 0.5
    w_rate: float = 2.0
    target_keep_rate: float = 0.6  # r: 0.6 Camelyon16 / TCGA-RCC, 0.7 TCGA-NSCLC / TCGA-BRCA

    def __post_init__(self) -> None:
        for name in ("in_dim", "hidden", "attn_dim", "k_sample"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DMINConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_classes < 2:
            raise ValueError(f"DMINConfig.n_classes must be >= 2, got {self.n_classes}")
        if self.cheby_degree < 0:
            raise ValueError(f"DMINConfig.cheby_degree must be >= 0, got {self.cheby_degree}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DMINConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.tau <= 0:
            raise ValueError(f"DMINConfig.tau must be > 0, got {self.tau}")
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"DMINConfig.gamma must be in (0, 1), got {self.gamma}")
        if self.inst_loss not in ("svm", "ce"):
            raise ValueError(f"DMINConfig.inst_loss must be 'svm' or 'ce', got {self.inst_loss!r}")
        if not 0.0 <= self.target_keep_rate <= 1.0:
            raise ValueError(f"DMINConfig.target_keep_rate must be in [0, 1], got {self.target_keep_rate}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DMINConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DMIN config keys: {', '.join(unknown)}")
        return cls(**d)


@dataclass
class DMINOutput:
    """What ``DMIN.forward`` returns for one bag (tensors keep their graph)."""

    logits_tea: torch.Tensor  # [C]
    logits_stu: torch.Tensor  # [C]
    scores: torch.Tensor  # [N, C] raw attention logits s
    attention: torch.Tensor  # [N, C] teacher attention α = softmax_j(s)
    mask: torch.Tensor  # [N, C] student mask M (straight-through in training, 0/1)
    keep: torch.Tensor  # [N] kept by any class (straight-through on the sum)
    kept_ratio: torch.Tensor  # 0-d, r̃ = mean_j keep[j]
    emb_tea: torch.Tensor  # [C, H]
    emb_stu: torch.Tensor  # [C, H]
    inst_loss: torch.Tensor | None = None  # 0-d L_clu, when a label was given
    empty_classes: list[int] = field(default_factory=list)  # classes whose mask kept nothing


@dataclass
class DMINPrediction:
    """DMIN's evaluation output for one bag (CPU tensors, no graph)."""

    probabilities: torch.Tensor  # [C] softmax of the student logits
    logits: torch.Tensor  # [C]
    attention: torch.Tensor  # [N, C] softmax of s within each class's pooled set, NaN elsewhere
    teacher_attention: torch.Tensor  # [N, C] softmax of s over all instances
    teacher_probabilities: torch.Tensor  # [C] teacher (unmasked) softmax
    scores: torch.Tensor  # [N, C] raw attention logits s
    mask: torch.Tensor  # bool [N, C] the set each class pooled over
    kept: torch.Tensor  # bool [N] pooled by any class
    kept_ratio: float
    empty_classes: list[int] = field(default_factory=list)

    @property
    def prediction(self) -> int:
        return int(torch.argmax(self.probabilities))

    @property
    def probs(self) -> torch.Tensor:
        """Alias of ``probabilities`` (the name in docs/architecture.md)."""
        return self.probabilities


class GatedAttention(nn.Module):
    """Gated attention with one branch per class (CLAM multi-branch): h [N, H] -> s [N, C]."""

    def __init__(self, hidden: int, attn_dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.attn_a = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attn_b = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attn_c = nn.Linear(attn_dim, n_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn_c(self.attn_a(h) * self.attn_b(h))


def _gumbel_like(x: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(x).clamp_(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _masked_pool(
    s: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, hard: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student pooling, normalised per class.

    s [N, C], h [N, H], mask [N, C] (0/1 or straight-through), hard bool [N, C] (its forward values)
    -> (emb [C, H], weights [N, C] summing to 1 per non-empty class, empty bool [C]).
    """
    n, c = s.shape
    if n == 0:
        empty = torch.ones(c, dtype=torch.bool, device=s.device)
        return s.new_zeros(c, h.shape[1]), s.new_zeros(0, c), empty
    # max over each class's kept set, so a low-scoring kept set cannot underflow to an empty sum;
    # it cancels in the normalisation, hence detached
    top = s.detach().masked_fill(~hard, float("-inf")).amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    # kept entries are <= 0 already; the cap keeps a dropped instance scoring far above the kept set
    # from overflowing (its weight is 0 forward; only its straight-through gradient is bounded)
    w = torch.exp((s - top).clamp(max=0.0)) * mask  # [N, C]
    denom = w.sum(dim=0)  # [C]
    empty = ~hard.any(dim=0)
    # empty classes: zero weights and no gradient (where() passes none to the unused branch)
    safe = torch.where(empty, torch.ones_like(denom), denom)
    weights = torch.where(empty, torch.zeros_like(w), w / safe)
    return weights.transpose(0, 1) @ h, weights, empty


class DMIN(nn.Module):
    """Dynamic multi-instance network: attention MIL with a teacher (all instances) and a student
    (masked instances) branch sharing every weight, and CKA classifiers.

    ``forward`` is the training path (one bag per call); ``predict`` the evaluation path.
    """

    def __init__(self, cfg: DMINConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if cfg is None:
            cfg = DMINConfig(**kwargs)
        elif kwargs:
            cfg = dataclasses.replace(cfg, **kwargs)
        self.cfg = cfg
        c = cfg.n_classes
        self.proj = nn.Sequential(nn.Linear(cfg.in_dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.attention = GatedAttention(cfg.hidden, cfg.attn_dim, c, cfg.dropout)
        self.classifiers = nn.ModuleList(ChebyKANLayer(cfg.hidden, 1, cfg.cheby_degree) for _ in range(c))
        self.instance_classifiers = nn.ModuleList(
            ChebyKANLayer(cfg.hidden, 2, cfg.cheby_degree) for _ in range(c)
        )
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The reference's initialisation (``init_type xaiver``): every Linear layer (projection
        and attention) Xavier-normal with zero bias; the CKA layers' Ω Xavier-normal too.

        Draws from ``generator``, or from torch's global generator (the trainers seed it), so
        the same seed gives the same initial weights.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight, generator=generator)
                nn.init.zeros_(m.bias)
            elif isinstance(m, ChebyKANLayer):
                m.reset_parameters(generator)

    @property
    def n_classes(self) -> int:
        return self.cfg.n_classes

    @property
    def in_dim(self) -> int:
        return self.cfg.in_dim

    # ----------------------------------------------------------------- building blocks
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (h [N, H], s [N, C])."""
        if x.ndim != 2 or x.shape[1] != self.cfg.in_dim:
            raise ValueError(f"DMIN expects features [N, {self.cfg.in_dim}], got {tuple(x.shape)}")
        h = self.proj(x)
        return h, self.attention(h)

    def classify(self, emb: torch.Tensor) -> torch.Tensor:
        """emb [C, H] -> logits [C]: class c's CKA classifier on class c's embedding."""
        return torch.cat([clf(emb[i]) for i, clf in enumerate(self.classifiers)])

    def student_mask(self, s: torch.Tensor, train_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """s [N, C] -> (M [N, C] float, hard bool [N, C]).

        Training: M̂ = sigmoid((s + g1 − g2) / τ), B = 1[M̂ > γ], M = B − sg(M̂) + M̂.
        Evaluation: M = 1[s > 0], no noise.
        """
        if train_mask:
            soft = torch.sigmoid((s + _gumbel_like(s) - _gumbel_like(s)) / self.cfg.tau)
            mask = binarize_st(soft, self.cfg.gamma)
            return mask, soft.detach() > self.cfg.gamma
        hard = s.detach() > 0
        return hard.to(s.dtype), hard

    def instance_loss(self, h: torch.Tensor, s: torch.Tensor, label: int) -> torch.Tensor:
        """CLAM's instance clustering loss L_clu for true class ``label``.

        Branch y: top-k instances by attention are positives, bottom-k negatives for classifier y.
        With more than two classes (or ``inst_out_of_class``), the top-k of every other branch c are
        negatives for classifier c.
        k = clamp(k_sample, 1, N // 2). Averaged over the classifiers that got instances.
        """
        n = h.shape[0]
        k = max(1, min(self.cfg.k_sample, n // 2))
        losses = []
        for c, clf in enumerate(self.instance_classifiers):
            if c == label:
                top = torch.topk(s[:, c], k).indices
                bottom = torch.topk(-s[:, c], k).indices
                idx = torch.cat([top, bottom])
                target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
            elif self.cfg.n_classes > 2 or self.cfg.inst_out_of_class:
                idx = torch.topk(s[:, c], k).indices
                target = torch.zeros(k, dtype=torch.long, device=h.device)
            else:
                continue
            logits = clf(h[idx])  # [2k or k, 2]
            if self.cfg.inst_loss == "svm":
                losses.append(smooth_top1_svm(logits, target, tau=1.0, alpha=1.0))
            else:
                losses.append(F.cross_entropy(logits, target))
        return torch.stack(losses).mean()

    # ----------------------------------------------------------------- training path
    def forward(
        self, x: torch.Tensor, label: int | torch.Tensor | None = None, train_mask: bool | None = None
    ) -> DMINOutput:
        """One bag: x [N, D] -> DMINOutput.

        ``train_mask`` picks the Gumbel mask (True) or the evaluation mask 1[s > 0] (False); by default
        it follows ``self.training``. With ``label`` the instance clustering loss is computed too.
        """
        if x.shape[0] == 0:
            raise ValueError("DMIN.forward got an empty bag (N = 0)")
        if train_mask is None:
            train_mask = self.training
        h, s = self.encode(x)
        attention = torch.softmax(s, dim=0)  # [N, C]
        emb_tea = attention.transpose(0, 1) @ h  # [C, H]
        mask, hard = self.student_mask(s, train_mask)
        emb_stu, _, empty = _masked_pool(s, h, mask, hard)
        keep, ratio = keep_union(mask)
        inst = None
        if isinstance(label, bool):  # dmin(x, True) would silently mean label 1
            raise TypeError("DMIN.forward: pass train_mask by keyword; label must be a class index")
        if label is not None:
            y = int(label)
            if not 0 <= y < self.cfg.n_classes:
                raise ValueError(f"label {y} out of range for {self.cfg.n_classes} classes")
            inst = self.instance_loss(h, s, y)
        return DMINOutput(
            logits_tea=self.classify(emb_tea),
            logits_stu=self.classify(emb_stu),
            scores=s,
            attention=attention,
            mask=mask,
            keep=keep,
            kept_ratio=ratio,
            emb_tea=emb_tea,
            emb_stu=emb_stu,
            inst_loss=inst,
            empty_classes=[int(i) for i in torch.nonzero(empty).flatten().tolist()],
        )

    # ----------------------------------------------------------------- evaluation path
    def _evaluating(self) -> contextlib.AbstractContextManager[None]:
        return evaluating(self)

    def _as_input(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        p = next(self.parameters())
        return torch.as_tensor(x).to(device=p.device, dtype=p.dtype)

    def predict(
        self, x: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None
    ) -> DMINPrediction:
        """Evaluation (student) path, no noise, no dropout, no grad.

        x [N, D]; mask bool [N, C]: the instances each class pools over (LIPN's keep mask in
        hierarchical inference); None uses DMIN's own 1[s > 0]. Every class pools over its own set
        (attention = softmax of s within the set); a class with an empty set gets a zero embedding
        and is listed in ``empty_classes``. N = 0 is allowed (every class is empty).
        """
        with self._evaluating():
            x = self._as_input(x)
            h, s = self.encode(x)
            if mask is None:
                hard = s > 0
            else:
                hard = torch.as_tensor(mask, device=s.device).bool()
                if hard.shape != s.shape:
                    raise ValueError(f"DMIN.predict: mask {tuple(hard.shape)} does not match scores {tuple(s.shape)}")
            emb, weights, empty = _masked_pool(s, h, hard.to(s.dtype), hard)
            logits = self.classify(emb)
            attention = torch.where(hard, weights, torch.full_like(s, float("nan")))
            tea_att = torch.softmax(s, dim=0)
            tea_logits = self.classify(tea_att.transpose(0, 1) @ h)
            kept = hard.any(dim=1)
            return DMINPrediction(
                probabilities=torch.softmax(logits, dim=0).cpu(),
                logits=logits.cpu(),
                attention=attention.cpu(),
                teacher_attention=tea_att.cpu(),
                teacher_probabilities=torch.softmax(tea_logits, dim=0).cpu(),
                scores=s.cpu(),
                mask=hard.cpu(),
                kept=kept.cpu(),
                kept_ratio=float(kept.float().mean()) if kept.numel() else 0.0,
                empty_classes=[int(i) for i in torch.nonzero(empty).flatten().tolist()],
            )

    def predict_teacher(self, x: torch.Tensor | np.ndarray) -> DMINPrediction:
        """HDMIL† without masking: every class pools over all instances (teacher pooling)."""
        n = int(x.shape[0])
        return self.predict(x, mask=torch.ones(n, self.cfg.n_classes, dtype=torch.bool))

    def teacher_probabilities(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """x [N, D] -> teacher softmax [C] (eval, no grad)."""
        with self._evaluating():
            h, s = self.encode(self._as_input(x))
            emb = torch.softmax(s, dim=0).transpose(0, 1) @ h
            return torch.softmax(self.classify(emb), dim=0).cpu()
