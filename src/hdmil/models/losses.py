"""Losses of DMIN and LIPN (docs/method.md §3, §4) and the pieces they share.

DMIN's hybrid loss, with the weights and target keep rate r from ``DMINConfig``:

    L = w_ce·CE(logits_tea, y) + w_clu·L_clu + w_emb·MSE(E_stu, E_tea)
        + w_kl·KL(p_tea ‖ p_stu) + w_rate·(r̃ − r)²        (0.7, 0.3, 0.5, 0.5, 2.0; r = 0.6)

LIPN's loss: L = β1·mean_c L1(M_LR[:, c], M_HR[:, c]) + β2·MSE(r̃_LR, r̃_HR)   (β1 = β2 = 1).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from hdmil.models.dmin import DMINConfig, DMINOutput

__all__ = [
    "binarize_st",
    "dmin_loss",
    "keep_union",
    "lipn_loss",
    "smooth_top1_svm",
]


def binarize_st(soft: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Straight-through binarisation: forward ``1[soft > threshold]``, gradient of ``soft``.

    M = B − stopgrad(soft) + soft.  Where B = 0 the forward value is exactly 0 (−a + a == 0).
    """
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft


def keep_union(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Instances kept by any class and the kept ratio (docs/method.md §3, all C classes, not just 0 and 1).

    mask: [N, C] binary or straight-through mask -> (keep [N], ratio 0-d), straight-through on the
    sum: forward keep[j] = 1[Σ_c M[j, c] > 0], gradient of Σ_c M[j, c].
    """
    total = mask.sum(dim=1)  # [N]
    hard = (total.detach() > 0.5).to(mask.dtype)  # forward values of M are 0/1 (up to rounding)
    keep = hard - total.detach() + total
    ratio = keep.mean() if keep.numel() else keep.sum()
    return keep, ratio


def smooth_top1_svm(
    scores: torch.Tensor,
    target: torch.Tensor,
    tau: float = 1.0,
    alpha: float = 1.0,
    reduction: str = "mean",
    threshold: float = 1e-3,
) -> torch.Tensor:
    """Smooth top-1 multiclass SVM (Berrada et al., ICLR 2018, k = 1), as smooth-topk computes it.

    The hinge ``max_j (Δ(j, y) + s_j) − s_y`` with Δ(j, y) = α·1[j ≠ y], its max smoothed by a
    log-sum-exp at temperature τ:  L = τ·log Σ_j exp((Δ(j, y) + s_j) / τ) − s_y.
    L ≥ hinge ≥ 0 (the j = y term alone gives s_y) and L → hinge as τ → 0; τ = 0 gives the hinge.

    A sample whose top score leads the second by at least τ·log(1 / threshold) (6.9 at the
    reference's 1e-3) gets the hard hinge instead: there the smoothing changes the loss by
    less than about ``threshold`` and its exp terms only underflow. ``threshold=0``: never switch.

    scores: [B, C] float, target: [B] int -> 0-d (``mean`` / ``sum``) or [B] (``none``).
    """
    if scores.ndim != 2:
        raise ValueError(f"smooth_top1_svm expects scores [B, C], got {tuple(scores.shape)}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"smooth_top1_svm threshold must be in [0, 1), got {threshold}")
    target = target.long().reshape(-1)
    margin = torch.full_like(scores, float(alpha))
    margin.scatter_(1, target[:, None], 0.0)  # Δ(y, y) = 0
    augmented = scores + margin
    true = scores.gather(1, target[:, None]).squeeze(1)
    hinge = augmented.amax(dim=1) - true
    if tau > 0:
        loss = tau * torch.logsumexp(augmented / tau, dim=1) - true
        if threshold > 0 and scores.shape[1] > 1:
            top2 = scores.detach().topk(2, dim=1).values  # the lead is read on the raw scores
            hard = top2[:, 0] - top2[:, 1] >= tau * math.log(1.0 / threshold)
            loss = torch.where(hard, hinge, loss)
    else:
        loss = hinge
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def _as_target(y: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(y, device=device).long().reshape(1)


def dmin_loss(
    out: DMINOutput, y: int | torch.Tensor, cfg: DMINConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """DMIN's hybrid loss for one bag. Returns (total, {term: value}) with the unweighted terms.

    Gradients: CE and L_clu depend on the teacher path only; the student's mask and pooling get
    gradient only from the two distillation terms and the rate term. The teacher side of the
    distillation terms is not detached: like the paper, both terms train the shared weights.
    """
    target = _as_target(y, out.logits_tea.device)
    ce = F.cross_entropy(out.logits_tea[None], target)
    clu = out.inst_loss if out.inst_loss is not None else ce.new_zeros(())
    emb = F.mse_loss(out.emb_stu, out.emb_tea)
    # KL(p_tea ‖ p_stu) = Σ_c p_tea (log p_tea − log p_stu); kl_div(input, target) = KL(target ‖ input)
    kl = F.kl_div(
        F.log_softmax(out.logits_stu, dim=-1),
        F.log_softmax(out.logits_tea, dim=-1),
        reduction="sum",
        log_target=True,
    )
    rate = (out.kept_ratio - cfg.target_keep_rate) ** 2
    total = cfg.w_ce * ce + cfg.w_clu * clu + cfg.w_emb * emb + cfg.w_kl * kl + cfg.w_rate * rate
    terms = {
        "total": float(total.detach()),
        "ce": float(ce.detach()),
        "clu": float(clu.detach()),
        "emb": float(emb.detach()),
        "kl": float(kl.detach()),
        "rate": float(rate.detach()),
        "kept_ratio": float(out.kept_ratio.detach()),
    }
    return total, terms


def lipn_loss(
    mask_lr: torch.Tensor,
    mask_hr: torch.Tensor,
    beta1: float = 1.0,
    beta2: float = 1.0,
    match: str = "l1",
) -> tuple[torch.Tensor, dict[str, float]]:
    """LIPN's loss for one slide: β1·mean_c L1(M_LR[:, c], M_HR[:, c]) + β2·(r̃_LR − r̃_HR)².

    mask_lr: [N, C] LIPN's straight-through mask (``LIPN.soft_mask``) or its probabilities;
    mask_hr: [N, C] the frozen DMIN's evaluation mask 1[s > 0] (bool or float), the target.
    Kept ratios are the union over classes (``keep_union``). ``match="bce"`` (ours, for
    probabilities against soft targets) puts binary cross-entropy in the L1 term's place: L1's
    gradient has the same size for every patch, so with few tumour patches among many it settles
    for the majority; cross-entropy keeps ranking the rare ones high. The term is still named "l1".
    """
    if mask_lr.shape != mask_hr.shape:
        raise ValueError(f"lipn_loss: mask shapes differ, {tuple(mask_lr.shape)} vs {tuple(mask_hr.shape)}")
    target = mask_hr.to(mask_lr.dtype).detach()
    if match == "bce":
        l1 = F.binary_cross_entropy(mask_lr.clamp(1e-6, 1 - 1e-6), target, reduction="none").mean(0).mean()
    elif match == "l1":
        l1 = (mask_lr - target).abs().mean(dim=0).mean()  # per-class L1, then the mean over classes
    else:
        raise ValueError(f"lipn_loss: match must be 'l1' or 'bce', got {match!r}")
    _, r_lr = keep_union(mask_lr)
    _, r_hr = keep_union(target)
    rate = (r_lr - r_hr) ** 2
    total = beta1 * l1 + beta2 * rate
    terms = {
        "total": float(total.detach()),
        "l1": float(l1.detach()),
        "rate": float(rate.detach()),
        "kept_ratio_lr": float(r_lr.detach()),
        "kept_ratio_hr": float(r_hr.detach()),
    }
    return total, terms
