"""Compare two runs of one slide: HDMIL vs HDMIL† of one model, or two checkpoints.

    Result A ─┐                         probabilities of each, seconds of each (per stage)
              ├─► compare_results ─►    attention difference B − A per class on the common grid
    Result B ─┘                         patches read by one run and not the other

The common grid is the patches both runs list (same level-0 corner; the patch side must be the
same). Attention is each run's own (softmax within the set each class pooled, NaN where a run did
not pool a patch; counted as 0 in the difference, which is NaN only where neither pooled). The
difference is of raw attention: a run that pools fewer patches gives each more.
``compare_slide`` runs both on a slide; ``Comparison.save`` writes compare.csv and compare.json (the
table) and compare.npz (the layers' rasters and points), each atomically. ``hdmil compare`` and
the napari compare panel call these.
"""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import HDMILError

__all__ = ["Comparison", "compare_results", "compare_slide", "run_label"]

TABLE_FILES = ("compare.csv", "compare.json", "compare.npz")


def run_label(result: Any) -> str:
    """``HDMIL · model-name``: what made a result."""
    return f"{result.method} · {result.model_name}" if result.model_name else result.method


@dataclass
class Comparison:
    """Two results of one slide on their common grid (M patches, C classes).

    rows_a / rows_b int64 [M] the common patches' rows in each result; attention_a / _b float32
    [M, C]; difference float32 [M, C] B − A (NaN where neither pooled); only_a / only_b bool [M]
    read at 20x by that run alone.
    """

    a: Any
    b: Any
    rows_a: np.ndarray
    rows_b: np.ndarray
    attention_a: np.ndarray
    attention_b: np.ndarray
    difference: np.ndarray
    only_a: np.ndarray
    only_b: np.ndarray

    @property
    def classes(self) -> list[str]:
        return list(self.a.classes)

    @property
    def coords(self) -> np.ndarray:
        """int64 [M, 2] level-0 (x, y) of the common patches."""
        return self.a.coords[self.rows_a]

    @property
    def grid_index(self) -> np.ndarray:
        return self.a.grid_index[self.rows_a]

    def table(self) -> list[dict[str, Any]]:
        """One row per quantity: field, A, B, B − A (numbers) or "" (words)."""
        rows: list[tuple[str, Any, Any]] = [
            ("run", run_label(self.a), run_label(self.b)),
            ("prediction", self.a.prediction, self.b.prediction),
        ]
        rows += [(f"p({c})", float(pa), float(pb))
                 for c, pa, pb in zip(self.classes, self.a.probabilities, self.b.probabilities)]
        rows += [("n_patches", self.a.n_patches, self.b.n_patches), ("n_read", self.a.n_read, self.b.n_read),
                 ("kept_ratio", self.a.kept_ratio, self.b.kept_ratio),
                 ("n_read_only_here", int(self.only_a.sum()), int(self.only_b.sum()))]
        stages = [k for k in self.a.timings if k in self.b.timings]
        rows += [(f"seconds_{k}", float(self.a.timings[k]), float(self.b.timings[k])) for k in stages]
        out = []
        for name, va, vb in rows:
            num = isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool)
            out.append({"field": name, "A": va, "B": vb, "B_minus_A": (vb - va) if num else ""})
        for c, d in zip(self.classes, self.difference.T):  # a difference only: no A or B of its own
            big = float(np.nanmax(np.abs(d))) if np.isfinite(d).any() else 0.0
            out.append({"field": f"max_abs_attention_difference({c})", "A": "", "B": "", "B_minus_A": big})
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "slide": self.a.slide_name, "slide_path": self.a.slide_path, "classes": self.classes,
            "A": _summary(self.a), "B": _summary(self.b), "table": self.table(),
            "n_common_patches": int(len(self.rows_a)),
            "read_only_by_A": int(self.only_a.sum()), "read_only_by_B": int(self.only_b.sum()),
            "same_prediction": self.a.prediction == self.b.prediction,
        }

    def rasters(self) -> dict[str, np.ndarray]:
        """The layers' data: float32 (C, rows, cols) rasters on A's grid (one pixel per patch,
        NaN off the common patches) and the read-by-one-only patches' level-0 corners."""
        idx = self.grid_index
        shape = tuple(int(v) for v in self.a.grid.shape) if self.a.grid is not None else tuple(idx.max(0) + 1)
        out: dict[str, np.ndarray] = {}
        for name, values in (("difference", self.difference), ("attention_a", self.attention_a),
                             ("attention_b", self.attention_b)):
            r = np.full((len(self.classes), *shape), np.nan, np.float32)
            r[:, idx[:, 0], idx[:, 1]] = values.T
            out[name] = r
        out["only_a"], out["only_b"] = self.coords[self.only_a], self.coords[self.only_b]
        out["grid_index"], out["coords"] = idx, self.coords
        return out

    def save(self, out_dir: str | Path) -> list[Path]:
        """compare.csv, compare.json and compare.npz in ``out_dir`` (each atomically)."""
        from hdmil.files import atomic_write, write_json_atomic

        out = Path(out_dir)
        paths = [out / name for name in TABLE_FILES]
        with atomic_write(paths[0], "w", newline="") as fh:
            fh.write(self.csv())
        write_json_atomic(paths[1], self.to_json())
        meta = {"classes": np.array(self.classes), "mpp": np.float64(self.a.mpp or np.nan),
                "patch_size_level0": np.int64(self.a.patch_size_level0),
                "origin": np.asarray(getattr(self.a.grid, "origin", (0, 0)), np.int64)}
        with atomic_write(paths[2], "wb") as fh:
            np.savez_compressed(fh, **self.rasters(), **meta)
        return paths

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["field", "A", "B", "B_minus_A"], lineterminator="\n")
        w.writeheader()
        for row in self.table():
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        return buf.getvalue()


def _summary(r: Any) -> dict[str, Any]:
    return {"run": run_label(r), "method": r.method, "model": r.model_name, "use_lipn": bool(r.use_lipn),
            "probabilities": {c: float(p) for c, p in zip(r.classes, r.probabilities)},
            "prediction": r.prediction, "n_patches": r.n_patches, "n_read": r.n_read,
            "kept_ratio": round(float(r.kept_ratio), 6), "timings": dict(r.timings)}


def _read_mask(r: Any) -> np.ndarray:
    read = np.zeros(r.n_patches, bool)
    read[np.asarray(r.feature_index, np.int64)] = True
    return read


def compare_results(a: Any, b: Any) -> Comparison:
    """Line two results of one slide up on their common patches (see ``Comparison``).
    HDMILError when their classes or patch sides differ, or they share no patch."""
    if list(a.classes) != list(b.classes):
        raise HDMILError(f"{a.slide_name}: the runs have other classes ({a.classes} vs {b.classes}): "
                         "nothing to compare per class")
    if int(a.patch_size_level0) != int(b.patch_size_level0):
        raise HDMILError(f"{a.slide_name}: the runs' patches are {a.patch_size_level0} and "
                         f"{b.patch_size_level0} level-0 px: no common grid")
    span = int(max(a.coords.max(initial=0), b.coords.max(initial=0))) + 1
    key = lambda xy: xy[:, 1].astype(np.int64) * span + xy[:, 0]  # noqa: E731
    _, rows_a, rows_b = np.intersect1d(key(a.coords), key(b.coords), return_indices=True)
    if not len(rows_a):
        raise HDMILError(f"{a.slide_name}: the two runs share no patch (another slide?)")
    att_a, att_b = a.attention[rows_a].astype(np.float32), b.attention[rows_b].astype(np.float32)
    diff = np.nan_to_num(att_b, nan=0.0) - np.nan_to_num(att_a, nan=0.0)
    diff[np.isnan(att_a) & np.isnan(att_b)] = np.nan
    read_a, read_b = _read_mask(a)[rows_a], _read_mask(b)[rows_b]
    return Comparison(a, b, rows_a.astype(np.int64), rows_b.astype(np.int64), att_a, att_b,
                      diff.astype(np.float32), read_a & ~read_b, read_b & ~read_a)


def compare_slide(slide_path: str | Path, model_a: Any, model_b: Any = None, *, mpp: float | None = None,
                  batch_size: int = 64, device: Any = None,
                  progress: Callable[[str, int, int], None] | None = None,
                  cancel: threading.Event | None = None) -> Comparison:
    """Run A (HDMIL of ``model_a``) and B (HDMIL of ``model_b``, or HDMIL† of ``model_a`` when
    None) on one slide, each with its encoder warmed up first, and compare them. ``progress``
    gets stages prefixed "A: " and "B: "."""
    from hdmil.pipeline import encoder_for, lipn_applies, run_slide, warm_up
    from hdmil.pipeline.setup import encoder_key

    runs = [(model_a, lipn_applies(model_a, True)),
            (model_b, lipn_applies(model_b, True)) if model_b is not None else (model_a, False)]
    if model_b is None and not runs[0][1]:
        raise HDMILError(f"{model_a.path}: its DMIN pools SLPD regions and runs without LIPN: "
                         "HDMIL and HDMIL† are the same run; compare with another checkpoint")
    results = []
    encoders: dict[Any, Any] = {}
    for label, (model, use_lipn) in zip("AB", runs):
        key = encoder_key(model)
        if key not in encoders:
            encoders[key] = encoder_for(model, device)
        if label == "A" or model is not model_a:  # one-time torch setup out of the stage seconds
            warm_up(model, encoders[key], patch_px=model.patch_px)
        tell = (lambda s, d, t, _l=label: progress(f"{_l}: {s}", d, t)) if progress else None
        results.append(run_slide(slide_path, model, use_lipn=use_lipn, mpp=mpp, batch_size=batch_size,
                                 encoder=encoders[key], device=device, progress=tell, cancel=cancel))
    return compare_results(*results)
