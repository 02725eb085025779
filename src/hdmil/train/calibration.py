"""Setting LIPN's thresholds after training, on the validation slides (docs/method.md §4.2).

Three ways, one per ``LIPNTrainConfig.calibration``:

- ``RecallShare``: one threshold, lowered from the paper's 0.5 until LIPN keeps a share of the
  instances DMIN keeps (``calibrate_threshold``);
- ``AttentionShare`` (ours): per class, the highest threshold whose kept set holds a share of
  DMIN's attention for that class (``calibrate_attention``);
- ``KeptBudget`` (ours): per class, the thresholds that hold the most of DMIN's attention, every
  class and slide counted alike, while LIPN keeps at most a given share of each slide's patches on
  average, its dilation included (``calibrate_kept``). It does not need to know which class's
  attention is spread thin and which sits on a few patches: the budget is spent where it holds the
  most attention per patch read.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hdmil.errors import HDMILError, check_cancelled
from hdmil.train.data import Cohort

__all__ = ["attention_shares", "calibrate_attention", "calibrate_kept", "calibrate_threshold",
           "kept_sets"]

KEPT_STEPS = 50  # candidate thresholds per class: P's quantiles in steps of 2% of the patches


def kept_sets(lipn: torch.nn.Module, probs: list[torch.Tensor], bags: Any, slide_ids: Sequence[str]) -> torch.Tensor:
    """LIPN's kept sets at its current thresholds, dilation included: bool [sum N, C]."""
    kept = [lipn.keep_from(p, bags.grid_index(sid) if lipn.dilates else None)[1]
            for p, sid in zip(probs, slide_ids)]
    return torch.cat(kept) if kept else torch.zeros(0, lipn.cfg.n_classes, dtype=torch.bool)


def attention_shares(share: float | Sequence[float], classes: Sequence[str]) -> list[float]:
    """``lipn_attention`` as one share per class: a single share applies to every class."""
    n = len(classes)
    shares = [float(share)] * n if np.isscalar(share) else [float(v) for v in share]
    if len(shares) != n:
        raise HDMILError(f"lipn_attention has {len(shares)} shares for {n} classes "
                         f"({', '.join(classes)}): give one share, or one per class")
    if not all(0.0 < v <= 1.0 for v in shares):
        raise HDMILError(f"lipn_attention must be in (0, 1], got {share}")
    return shares


@torch.no_grad()
def calibrate_threshold(
    lipn: torch.nn.Module,
    cohort: Cohort,
    slide_ids: Sequence[str],
    targets: dict[str, torch.Tensor],
    recall: float,
    cancel: threading.Event | None = None,
) -> dict[str, float]:
    """Set ``lipn.cfg.threshold`` so LIPN keeps ``recall`` of the (slide, patch, class) instances
    DMIN keeps on ``slide_ids``; the threshold only goes down from the paper's 0.5.

    A missed instance is never read at 20x, while an extra one costs one patch of reading and
    features: for a screening step recall matters more than the paper's symmetric 0.5.
    Returns the threshold and, at it, the recall and the kept ratio on those slides.
    """
    if not 0.0 < recall <= 1.0:
        raise HDMILError(f"lipn_recall must be in (0, 1], got {recall}")
    bags = cohort.require_bags()
    probs, wanted = [], []
    for sid in slide_ids:
        check_cancelled(cancel, "training")
        probs.append(lipn.probabilities(bags.lr_patches(sid)))  # [N, C]
        wanted.append(targets[sid].cpu().float() > 0.5)  # [N, C]: DMIN keeps (σ(s/τ) > 0.5 ⟺ s > 0)
    p, m = torch.cat(probs), torch.cat(wanted)
    default = float(lipn.cfg.threshold)
    if m.any():
        # the largest t with share(P > t | M_HR) >= recall: just under the (1 - recall) quantile
        q = np.float32(torch.quantile(p[m].double(), 1.0 - recall, interpolation="lower").item())
        # one float32 step below it: P is float32, and so is the comparison P > threshold
        threshold = min(default, float(np.nextafter(q, np.float32(-np.inf))))
    else:
        threshold = default
    lipn.cfg.threshold = threshold
    kept = kept_sets(lipn, probs, bags, slide_ids)
    return {
        "threshold": threshold,
        "recall": float((kept & m).sum() / m.sum()) if m.any() else math.nan,
        "kept_ratio": float(kept.any(dim=1).float().mean()) if len(p) else math.nan,
        "recall_at_0.5": float(((p > default) & m).sum() / m.sum()) if m.any() else math.nan,
    }


@torch.no_grad()
def calibrate_attention(
    lipn: torch.nn.Module,
    dmin: torch.nn.Module,
    cohort: Cohort,
    slide_ids: Sequence[str],
    share: float | Sequence[float],
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Set one LIPN threshold per class (``lipn.cfg.class_thresholds``): the highest with which
    LIPN's kept set holds ``share`` of DMIN's attention for that class, on average over
    ``slide_ids``. ``share``: one for every class, or one per class.

    DMIN's attention for class c is its evaluation pooling weight: softmax of s[:, c] over the
    instances it keeps (s > 0). Pooling is a weighted mean, so instances with little weight change
    the prediction little whether LIPN keeps them or not; a class whose attention is spread thin
    over every patch (say, "normal" on any slide) then no longer keeps every patch it marks, while a
    class whose attention sits on a few patches (tumour) keeps those. Thresholds may lie above the
    paper's 0.5. The thresholds are set before LIPN's dilation (which only adds patches); the kept
    ratios returned count it. Returns per class the threshold, the attention share held, and the
    kept ratios.
    """
    n_classes = lipn.cfg.n_classes
    shares = attention_shares(share, cohort.classes)
    bags = cohort.require_bags()
    probs, weights = _probabilities_and_attention(lipn, dmin, bags, slide_ids, cancel)
    thresholds, held = [], []
    for c in range(n_classes):
        # each slide that keeps anything for c counts once: its weights sum to 1 over its instances
        slides = [i for i, w in enumerate(weights) if float(w[:, c].sum()) > 0]
        if not slides:
            thresholds.append(float(lipn.cfg.threshold))
            held.append(math.nan)
            continue
        p = torch.cat([probs[i][:, c] for i in slides]).numpy().astype(np.float32)
        w = torch.cat([weights[i][:, c] for i in slides]).numpy() / len(slides)
        order = np.argsort(-p, kind="stable")
        covered = np.cumsum(w[order])  # attention held when the threshold is just below p[order[i]]
        i = int(np.searchsorted(covered, shares[c] * (1 - 1e-9)))
        i = min(i, len(order) - 1)
        # just under that patch's P (float32, as P > threshold compares): it and its ties are kept
        t = float(np.nextafter(p[order[i]], np.float32(-np.inf)))
        thresholds.append(t)
        held.append(float(w[p > t].sum()))
    lipn.cfg.class_thresholds = tuple(thresholds)
    k_all = kept_sets(lipn, probs, bags, slide_ids)
    return {
        "share": shares if not np.isscalar(share) else float(share),
        "class_thresholds": thresholds,
        "attention_held": held,
        "dilation": list(lipn.cfg.dilation) if lipn.cfg.dilation is not None else None,
        "kept_ratio": float(k_all.any(dim=1).float().mean()) if len(k_all) else math.nan,
        "class_kept_ratio": [float(v) for v in k_all.float().mean(dim=0)] if len(k_all) else [],
    }


@torch.no_grad()
def calibrate_kept(
    lipn: torch.nn.Module,
    dmin: torch.nn.Module,
    cohort: Cohort,
    slide_ids: Sequence[str],
    ratio: float,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Set one LIPN threshold per class (``lipn.cfg.class_thresholds``) so that LIPN keeps at most
    ``ratio`` of each slide's patches on average over ``slide_ids`` (its dilation included) and
    its kept sets hold as much of DMIN's attention as they can: the mean over classes of the
    attention held, each slide with attention for the class counted once.

    Greedy, from thresholds that keep nothing: each step lowers one class's threshold to its next
    candidate (P's quantiles on these slides, ``KEPT_STEPS`` per class), the one that holds the
    most attention per patch it adds, while the budget allows. Returns the thresholds, the
    attention held per class, the kept ratios, and the budget.
    """
    if not 0.0 < ratio <= 1.0:
        raise HDMILError(f"lipn_kept must be in (0, 1], got {ratio}")
    bags = cohort.require_bags()
    probs, weights = _probabilities_and_attention(lipn, dmin, bags, slide_ids, cancel)
    search = _BudgetSearch(lipn, probs, weights, [bags.grid_index(s) if lipn.dilates else None
                                                  for s in slide_ids])
    while search.step(ratio):
        check_cancelled(cancel, "training")
    # no first step fits (P ties over many patches, or a tiny budget): never a LIPN that keeps
    # nothing; the smallest first step is taken and the result says it is over the budget
    over = search.kept == 0.0 and search.step(math.inf, cheapest=True)
    lipn.cfg.class_thresholds = tuple(search.thresholds)
    return {
        "kept_budget": float(ratio),
        "class_thresholds": list(search.thresholds),
        "attention_held": search.held_per_class(),
        "dilation": list(lipn.cfg.dilation) if lipn.cfg.dilation is not None else None,
        "kept_ratio": search.kept,  # mean over slides, as the budget counts
        "over_budget": bool(over),
        "class_kept_ratio": search.class_kept_ratio(),
    }


def _probabilities_and_attention(lipn: torch.nn.Module, dmin: torch.nn.Module, bags: Any,
                                 slide_ids: Sequence[str], cancel: threading.Event | None):
    """Per slide, LIPN's P [N, C] and DMIN's pooling weights [N, C] (0 outside its kept sets)."""
    probs, weights = [], []
    for sid in slide_ids:
        check_cancelled(cancel, "training")
        weights.append(torch.nan_to_num(dmin.predict(bags[sid].features, None).attention, nan=0.0))
        probs.append(lipn.probabilities(bags.lr_patches(sid)))
    return probs, weights


class _BudgetSearch:
    """``calibrate_kept``'s greedy search: the thresholds so far, each slide's kept sets at them
    (dilation included), their attention and kept ratio. A trial step recomputes only the class
    it lowers."""

    def __init__(self, lipn: torch.nn.Module, probs: list[torch.Tensor],
                 weights: list[torch.Tensor], index: list[np.ndarray | None]) -> None:
        from hdmil.models.lipn import dilate_mask

        self.dilate = dilate_mask
        self.p = [p.numpy().astype(np.float32) for p in probs]
        self.w = [w.numpy() for w in weights]
        self.index = index
        self.rings = lipn.cfg.dilation if lipn.dilates else None
        n_classes = lipn.cfg.n_classes
        self.has = [w.sum(axis=0) > 0 for w in self.w]  # each slide attending to a class counts once
        self.counted = np.sum(self.has, axis=0) if self.has else np.zeros(n_classes)
        pooled = np.concatenate(self.p) if self.p else np.zeros((0, n_classes), np.float32)
        # candidates, highest first; each just under a quantile, so that patch is kept (P > t)
        self.candidates = [
            [float(np.nextafter(np.float32(q), np.float32(-np.inf)))
             for q in np.unique(np.quantile(pooled[:, c], np.linspace(0, 1, KEPT_STEPS + 1)))[::-1]]
            for c in range(n_classes)]
        self.at = [-1] * n_classes  # -1: above every P (keeps nothing)
        self.thresholds = [1.0] * n_classes
        self.keep = [np.zeros(p.shape, bool) for p in self.p]  # bool [N, C] per slide
        self.held, self.kept = self._score(self.keep)

    def _trial(self, c: int, threshold: float) -> list[np.ndarray]:
        """Every slide's kept sets with class ``c`` at ``threshold``, the other classes as now."""
        out = []
        for i, keep in enumerate(self.keep):
            column = self.p[i][:, c] > threshold
            if self.rings and self.rings[c] > 0:
                column = self.dilate(column[:, None], self.index[i], (self.rings[c],))[:, 0]
            trial = keep.copy()
            trial[:, c] = column
            out.append(trial)
        return out

    def _measure(self, keeps: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """(attention held per class, NaN for a class no slide attends to; mean over slides of
        the kept share)."""
        held = np.zeros(len(self.candidates))
        for keep, w, has in zip(keeps, self.w, self.has):
            held += np.where(has, (w * keep).sum(axis=0), 0.0)
        kept = [keep.any(axis=1).mean() if len(keep) else 0.0 for keep in keeps]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(self.counted > 0, held / self.counted, np.nan)
        return per_class, float(np.mean(kept)) if kept else 0.0

    def _score(self, keeps: list[np.ndarray]) -> tuple[float, float]:
        """(mean over classes of the attention held, mean over slides of the kept share)."""
        per_class, kept = self._measure(keeps)
        return (float(np.nanmean(per_class)) if np.isfinite(per_class).any() else 0.0), kept

    def step(self, ratio: float, cheapest: bool = False) -> bool:
        """Lower the best class's threshold one candidate within ``ratio``; False when none can.
        Best: the most attention per patch added, or with ``cheapest`` the fewest patches."""
        best = None
        for c, cands in enumerate(self.candidates):
            if self.at[c] + 1 >= len(cands):
                continue
            trial = self._trial(c, cands[self.at[c] + 1])
            held, kept = self._score(trial)
            if kept > ratio:
                continue
            cost = kept - self.kept
            gain = -kept if cheapest else math.inf if cost <= 0 else (held - self.held) / cost
            if best is None or gain > best[0]:
                best = (gain, c, held, kept, trial)
        if best is None:
            return False
        _, c, self.held, self.kept, self.keep = best
        self.at[c] += 1
        self.thresholds[c] = self.candidates[c][self.at[c]]
        return True

    def held_per_class(self) -> list[float]:
        return [float(v) for v in self._measure(self.keep)[0]]

    def class_kept_ratio(self) -> list[float]:
        """Per class, the share of all the slides' patches its kept set holds (pooled)."""
        return [float(v) for v in np.concatenate(self.keep).mean(axis=0)] if self.keep else []
