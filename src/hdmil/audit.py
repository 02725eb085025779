"""Audit what LIPN discarded: read discarded patches at 20x after all and see what DMIN makes of them.

    HDMIL Result (kept patches' features) ─┐
    discarded patches (all, or a seeded,   ├─► encoder ─► DMIN, HDMIL† attention over kept + audited
    tissue-weighted sample of n) ──────────┘                       │
                                     share of the attention in the audited patches, per class;
                                     the prediction with them, and whether it changes

DMIN's HDMIL† path pools class c over its own ``s[:, c] > 0``: the attention a patch gets does not
depend on what LIPN decided, so the audited patches' share is the part of the slide's attention
LIPN's screening left unread (exact when every discarded patch is audited). For a sample it is
also scaled up to the whole discarded set: each audited patch's attention weight over its chance
of being drawn (Hansen-Hurwitz, with replacement as the approximation), ``share_estimated``.
``hdmil predict --audit N`` writes ``Audit.to_report()`` as report.json's ``audit`` block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hdmil.errors import HDMILError, check_cancelled

__all__ = ["Audit", "audit_pool", "audit_result", "audit_rows", "parse_audit"]


@dataclass
class Audit:
    """An audit of one HDMIL result (N tissue patches, C classes).

    rows int64 [A] the audited (discarded, now read) rows; attention float32 [N, C] DMIN's HDMIL†
    attention over the kept and audited patches (NaN elsewhere); probabilities [C] with them;
    share [C] the attention in audited patches; share_estimated [C] scaled up to every discarded
    patch (None when all were audited: ``share`` is exact); sample: n asked (None: all).
    """

    classes: list[str]
    rows: np.ndarray
    n_discarded: int
    attention: np.ndarray
    probabilities: np.ndarray
    share: np.ndarray
    prediction_before: str
    sample: int | None = None
    seed: int = 0
    share_estimated: np.ndarray | None = None
    failed: np.ndarray | None = None  # rows drawn that could not be decoded
    seconds: float = 0.0

    @property
    def prediction(self) -> str:
        return self.classes[int(np.argmax(self.probabilities))]

    @property
    def changed(self) -> bool:
        """Whether the prediction with the audited patches differs from the result's."""
        return self.prediction != self.prediction_before

    def to_report(self) -> dict[str, Any]:
        """report.json's ``audit`` block."""
        per = lambda v: None if v is None else {c: round(float(x), 6) for c, x in zip(self.classes, v)}  # noqa: E731
        return {
            "sample": "all" if self.sample is None else int(self.sample),
            "seed": int(self.seed),
            "n_discarded": int(self.n_discarded),
            "n_audited": int(len(self.rows)),
            "n_failed": int(len(self.failed)) if self.failed is not None else 0,
            "pooling": "HDMIL† (DMIN's own mask) over the kept and audited patches",
            "discarded_attention_share": per(self.share),
            "discarded_attention_share_estimated": per(self.share_estimated),
            "probabilities": per(self.probabilities),
            "prediction": self.prediction,
            "prediction_without_audit": self.prediction_before,
            "prediction_changes": self.changed,
            "seconds": round(float(self.seconds), 4),
            "rows": [int(r) for r in self.rows],
        }


def parse_audit(value: str | int | None) -> int | None:
    """``--audit``: 0 = off (returns 0), -1 or 'all' = every discarded patch (None), N = a sample."""
    if value is None:
        return 0
    if str(value).strip().lower() in ("all", "-1"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise HDMILError(f"--audit must be a number of patches, 0 (off), -1 or 'all', not {value!r}") from None
    if n < -1:
        raise HDMILError(f"--audit must be 0 (off), -1 / 'all', or a positive number of patches, not {n}")
    return None if n == -1 else n


def _draw_weights(result: Any, rows: np.ndarray) -> np.ndarray:
    """float64 [len(rows)]: each discarded patch's chance of being drawn, ∝ its tissue fraction."""
    grid = result.grid
    tf = np.asarray(grid.tissue_fraction, np.float64)[rows] if grid is not None else np.ones(len(rows))
    tf = np.where(np.isfinite(tf) & (tf > 0), tf, 0.0)
    return tf / tf.sum() if tf.sum() > 0 else np.full(len(rows), 1.0 / max(len(rows), 1))


def audit_rows(result: Any, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows int64 [A] to audit, their draw chances float64 [A]): every discarded tissue patch
    (``n`` None), or ``n`` of them drawn without replacement ∝ tissue fraction, seeded."""
    discarded = np.flatnonzero(~np.asarray(result.kept, bool))
    p = _draw_weights(result, discarded)
    if n is None or n >= len(discarded):
        return discarded.astype(np.int64), p
    pick = np.random.default_rng(seed).choice(len(discarded), size=int(n), replace=False, p=p)
    pick.sort()
    return discarded[pick].astype(np.int64), p[pick]


def audit_pool(dmin: Any, kept_features: np.ndarray, kept_rows: np.ndarray, audit_features: np.ndarray,
               rows: np.ndarray, n_patches: int, draw: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """DMIN's HDMIL† pooling over kept [K, D] and audited [A, D] features together.

    Returns (probabilities [C], attention float32 [N, C] at ``kept_rows`` and ``rows``, share [C]
    of the attention in the audited rows, the share scaled up to the whole discarded set from the
    draw chances ``draw`` [A] (None when ``draw`` is None: every discarded patch was audited)).
    """
    from hdmil.inference import dmin_pool

    feats = np.concatenate([np.asarray(kept_features, np.float32), np.asarray(audit_features, np.float32)])
    pool = dmin_pool(dmin, feats, None)
    att = np.nan_to_num(pool.attention, nan=0.0)
    k = len(kept_rows)
    attention = np.full((n_patches, att.shape[1]), np.nan, np.float32)
    attention[np.concatenate([kept_rows, rows]).astype(np.int64)] = pool.attention
    share = att[k:].sum(axis=0)
    if draw is None or not len(rows):
        return pool.probabilities, attention, share, None
    # attention ∝ exp(s) within each class's set: Hansen-Hurwitz total of the discarded weights
    total = (att[k:] / np.asarray(draw, np.float64)[:, None]).sum(axis=0) / len(rows)
    kept = att[:k].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        estimated = np.where(kept + total > 0, total / (kept + total), 0.0)
    return pool.probabilities, attention, share, estimated


def _check(result: Any, model: Any, encoder: Any) -> None:
    where = result.slide_path or result.slide_name
    if not result.use_lipn:
        raise HDMILError(f"{where}: an HDMIL† result read every tissue patch: LIPN discarded nothing to audit")
    if result.instances == "region":
        raise HDMILError(f"{where}: a region DMIN reads every patch: nothing was discarded to audit")
    if len(result.feature_index) and result.features.shape[0] != len(result.feature_index):
        raise HDMILError(f"{where}: the result holds no features of its kept patches, so they cannot be pooled "
                         "again (run hdmil predict on the slide again)")
    sha = str(getattr(model, "sha256", "") or "")
    if sha and result.model_sha256 and sha != str(result.model_sha256):
        raise HDMILError(f"{where}: the result was made by model {result.model_name!r}, not by this "
                         "checkpoint: audit with the model of the run")
    if result.encoder and str(encoder.name) != str(result.encoder):
        raise HDMILError(f"{where}: the result's features come from encoder {result.encoder!r}, not "
                         f"{encoder.name!r}: audit with the encoder of the run")
    if len(result.feature_index) and int(result.features.shape[1]) != int(model.feature_dim or encoder.dim):
        raise HDMILError(f"{where}: the result's features are {result.features.shape[1]}-d, the model "
                         f"takes {model.feature_dim}")


def audit_result(result: Any, model: Any, encoder: Any, n: int | None = None, seed: int = 0,
                 slide: Any = None, batch_size: int = 64,
                 progress: Callable[[str, int, int], None] | None = None,
                 cancel: threading.Event | None = None) -> Audit:
    """Read the discarded patches of an HDMIL ``result`` (all, or ``n`` drawn ∝ tissue, seeded)
    with ``encoder`` and pool them with the kept ones (see the module docstring).

    ``slide``: the open slide (default: ``result.slide_path`` opened here, with the result's mpp).
    HDMILError for an HDMIL† or region result, or one without its kept patches' features.
    """
    from hdmil.pipeline.featurise import featurise
    from hdmil.slide import open_slide

    _check(result, model, encoder)
    t0 = time.perf_counter()
    rows, draw = audit_rows(result, n, seed)
    n_discarded = int((~np.asarray(result.kept, bool)).sum())
    mask = np.zeros(result.n_patches, bool)
    mask[rows] = True
    check_cancelled(cancel, f"{result.slide_path}: audit")
    own = slide is None
    slide = open_slide(result.slide_path, mpp=result.mpp) if own else slide
    try:
        read = featurise(slide, result.grid, mask, encoder, batch_size, None,
                         progress or (lambda *a: None), cancel)
    finally:
        if own:
            slide.close()
    got = np.isin(rows, read.read_rows)
    kept = result.features if len(result.feature_index) else np.zeros((0, read.features.shape[1]), np.float32)
    probs, attention, share, est = audit_pool(
        model.dmin, kept, result.feature_index, read.features, read.read_rows,
        result.n_patches, None if n is None or len(rows) == n_discarded else draw[got])
    return Audit(classes=list(result.classes), rows=read.read_rows.astype(np.int64), n_discarded=n_discarded,
                 attention=attention, probabilities=np.asarray(probs, np.float64), share=share,
                 prediction_before=result.prediction, sample=n, seed=seed, share_estimated=est,
                 failed=rows[~got], seconds=time.perf_counter() - t0)
