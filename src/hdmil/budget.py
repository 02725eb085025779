"""Kept-ratio budget: LIPN's thresholds -> which patches a run reads at 20x, how many, how long.

    pre-screen ─► LIPN probabilities P [N, C] ─┐
    thresholds [C] (one value, a factor × the   ├─► kept_budget ─► Budget: mask [N, C], kept count,
    checkpoint's, or one per class) ────────────┘                  kept ratio, predicted seconds

The keep rule is LIPN's own (``P > threshold`` per class, then ``cfg.dilation`` rings on the patch
grid, ``hdmil.models.lipn.dilate_mask``), so a budget gives the mask a LIPN with those thresholds
would. The predicted reading time is the kept count times the slide's own seconds per HR patch,
measured on a small seeded sample of its tissue patches (``probe_seconds_per_patch``: read at 20x
and encoded, as a run does). ``hdmil predict --lipn-threshold`` and the widget's budget control
both go through ``kept_budget``; ``apply_budget`` puts a budget into a ``PreScreen``, which
``run_slide(prescreened=ps)`` then reads, and ``record_budget`` copies the setting into the
result's ``report.json`` (its ``budget`` block).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from hdmil.errors import HDMILError

__all__ = [
    "Budget", "PROBE_PATCHES", "apply_budget", "budget_for", "budget_thresholds", "checkpoint_thresholds",
    "kept_budget", "lipn_probabilities", "measure_rate", "probe_seconds_per_patch", "record_budget",
]

# HR patches the probe reads and encodes: enough to average over tile decoding, a few
# hundredths of a run's reading on a slide of thousands of patches.
PROBE_PATCHES = 16


@dataclass
class Budget:
    """What a set of LIPN thresholds keeps on one slide (N tissue patches, C classes).

    thresholds float32 [C]; mask bool [N, C] each class's kept set (after dilation); neighbour
    bool [N] kept only through the dilation; seconds_per_patch: the slide's measured HR seconds
    per patch (None: not measured); setting: how the thresholds were chosen (``budget_thresholds``).
    """

    classes: list[str]
    thresholds: np.ndarray
    mask: np.ndarray
    neighbour: np.ndarray
    seconds_per_patch: float | None = None
    setting: dict[str, Any] | None = None

    @property
    def kept(self) -> np.ndarray:
        """bool [N]: kept by any class, the patches a run reads at 20x."""
        return self.mask.any(axis=1)

    @property
    def n_patches(self) -> int:
        return int(len(self.mask))

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def kept_ratio(self) -> float:
        return self.n_kept / self.n_patches if self.n_patches else 0.0

    @property
    def predicted_seconds(self) -> float | None:
        """Predicted seconds to read and encode the kept patches (None without a measured rate)."""
        return None if self.seconds_per_patch is None else self.n_kept * float(self.seconds_per_patch)

    def to_report(self) -> dict[str, Any]:
        """The ``budget`` block of report.json / prescreen.json."""
        return {
            "setting": dict(self.setting or {}),
            "thresholds": {c: round(float(t), 6) for c, t in zip(self.classes, self.thresholds)},
            "n_patches": self.n_patches,
            "n_kept": self.n_kept,
            "n_kept_as_neighbour": int(self.neighbour.sum()),
            "kept_ratio": round(self.kept_ratio, 6),
            "kept_per_class": {c: int(n) for c, n in zip(self.classes, self.mask.sum(axis=0))},
            "seconds_per_patch": self.seconds_per_patch,
            "predicted_seconds": self.predicted_seconds,
        }


def checkpoint_thresholds(lipn: Any) -> np.ndarray:
    """float32 [C]: the thresholds the checkpoint's LIPN uses (per class when calibrated)."""
    return lipn.cfg.thresholds().numpy().astype(np.float32)


def budget_thresholds(base: np.ndarray, threshold: float | None = None, factor: float | None = None,
                      per_class: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Thresholds float32 [C] and the setting that made them, from at most one of: ``threshold``
    (every class, as ``--lipn-threshold``), ``factor`` × ``base`` (the checkpoint's, clipped below
    1) or ``per_class`` [C] values; none given: ``base``. HDMILError outside [0, 1)."""
    base = np.asarray(base, np.float32).reshape(-1)
    given = [k for k, v in (("threshold", threshold), ("factor", factor), ("per_class", per_class))
             if v is not None]
    if len(given) > 1:
        raise HDMILError(f"LIPN budget: give one of threshold, factor or per-class values, not {given}")
    if threshold is not None:
        out, setting = np.full_like(base, float(threshold)), {"kind": "threshold", "value": float(threshold)}
    elif factor is not None:
        if not float(factor) >= 0:
            raise HDMILError(f"LIPN budget: the threshold factor must be >= 0, not {factor}")
        out = np.minimum(base * np.float32(factor), np.nextafter(np.float32(1), np.float32(0)))
        setting = {"kind": "factor", "value": float(factor)}
    elif per_class is not None:
        out = np.asarray(per_class, np.float32).reshape(-1)
        if out.shape != base.shape:
            raise HDMILError(f"LIPN budget: {len(base)} per-class thresholds needed, got {out.size}")
        setting = {"kind": "per_class", "value": [float(v) for v in out]}
    else:
        out, setting = base.copy(), {"kind": "checkpoint"}
    if not np.all((out >= 0) & (out < 1)):
        raise HDMILError(f"LIPN thresholds must be in [0, 1), not {[round(float(v), 4) for v in out]}")
    setting["checkpoint_thresholds"] = [round(float(v), 6) for v in base]
    return out.astype(np.float32), setting


def lipn_probabilities(lipn: Any, ps: Any) -> np.ndarray:
    """float32 [N, C]: LIPN's P on a pre-screen's LR patches (``PreScreen.grid``)."""
    return lipn.probabilities(ps.grid.lr_patches()).numpy().astype(np.float32)


def kept_budget(probs: np.ndarray, thresholds: np.ndarray, grid_index: np.ndarray,
                dilation: Any = None, classes: list[str] | None = None,
                seconds_per_patch: float | None = None, setting: dict[str, Any] | None = None) -> Budget:
    """LIPN's keep rule at ``thresholds`` [C] over probabilities [N, C]: ``P > t`` per class, grown
    by ``dilation`` [C] rings on the grid (``grid_index`` [N, 2] (row, col)); see ``Budget``."""
    from hdmil.models.lipn import dilate_mask

    probs = np.asarray(probs, np.float32)
    thresholds = np.asarray(thresholds, np.float32).reshape(-1)
    if probs.ndim != 2 or probs.shape[1] != thresholds.size:
        raise ValueError(f"kept_budget: probabilities [N, {thresholds.size}] needed, got {probs.shape}")
    plain = probs > thresholds
    grown = plain
    if dilation is not None and max(dilation, default=0) > 0:
        grown = dilate_mask(plain, grid_index, tuple(int(r) for r in dilation))
    neighbour = grown.any(axis=1) & ~plain.any(axis=1)
    names = list(classes) if classes is not None else [str(c) for c in range(thresholds.size)]
    return Budget(names, thresholds, grown, neighbour, seconds_per_patch, setting)


def apply_budget(ps: Any, budget: Budget) -> Any:
    """Put ``budget``'s kept sets into the pre-screen ``ps`` (in place, so a widget that keeps it
    classifies with it) and record its setting (``ps.budget``); returns ``ps``."""
    if not ps.use_lipn:
        raise HDMILError(f"{ps.slide_path}: HDMIL† reads every patch: no LIPN thresholds to set")
    if budget.n_patches != ps.n_patches:
        raise HDMILError(f"{ps.slide_path}: the budget is for {budget.n_patches} patches, the "
                         f"pre-screen has {ps.n_patches}")
    ps.lipn_mask, ps.neighbour = budget.mask.copy(), budget.neighbour.copy()
    ps.kept = ps.lipn_mask.any(axis=1)
    ps.budget = budget.to_report()
    return ps


def record_budget(result: Any, ps: Any) -> Any:
    """Copy a budgeted pre-screen's setting into ``result`` (``report.json``'s ``budget``), with
    the seconds the run's reading and encoding took beside the predicted ones."""
    if ps is not None and getattr(ps, "budget", None):
        t = result.timings
        measured = float(t.get("crop_wait", 0.0)) + float(t.get("features", 0.0))
        result.blocks["budget"] = {**ps.budget, "measured_seconds": round(measured, 4)}
    return result


def probe_seconds_per_patch(slide: Any, grid: Any, encoder: Any, n: int = PROBE_PATCHES,
                            seed: int = 0, batch_size: int = PROBE_PATCHES) -> float | None:
    """The slide's seconds per HR patch on this machine: a seeded sample of ``n`` tissue patches
    read at 20x and encoded, wall-clock over the number read (None when none could be read)."""
    from hdmil.pipeline.featurise import featurise

    count = len(grid.coords)
    if count == 0 or n <= 0:
        return None
    rows = np.random.default_rng(seed).choice(count, size=min(n, count), replace=False)
    sample = np.zeros(count, bool)
    sample[rows] = True
    t0 = time.perf_counter()
    read = featurise(slide, grid, sample, encoder, batch_size, None, lambda *a: None, None)
    seconds = time.perf_counter() - t0
    return seconds / len(read.read_rows) if len(read.read_rows) else None


def measure_rate(ps: Any, encoder: Any, n: int = PROBE_PATCHES) -> float | None:
    """``probe_seconds_per_patch`` on the slide of a pre-screen (opened here with its mpp)."""
    from hdmil.slide import open_slide

    with open_slide(ps.slide_path, mpp=ps.mpp) as slide:
        return probe_seconds_per_patch(slide, ps.grid, encoder, n)


def budget_for(model: Any, ps: Any, seconds_per_patch: float | None = None, base: Any = None,
               probs: np.ndarray | None = None, **choice: Any) -> Budget:
    """The ``Budget`` of pre-screen ``ps`` at the thresholds ``choice`` asks (``threshold``,
    ``factor`` or ``per_class``, see ``budget_thresholds``; none: the checkpoint's). ``base``:
    the checkpoint's thresholds (default: the model's LIPN's now); ``probs``: LIPN's P on ``ps``
    when already at hand (the widget keeps them while the control moves)."""
    if model.lipn is None or not ps.use_lipn:
        raise HDMILError(f"{ps.slide_path}: HDMIL† (or a model without LIPN) reads every patch: no budget")
    base = checkpoint_thresholds(model.lipn) if base is None else base
    thresholds, setting = budget_thresholds(base, **choice)
    probs = lipn_probabilities(model.lipn, ps) if probs is None else probs
    return kept_budget(probs, thresholds, ps.grid_index, model.lipn.cfg.dilation, list(ps.classes),
                       seconds_per_patch, setting)
