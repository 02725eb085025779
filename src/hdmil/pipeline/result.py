"""What a run found on one slide (``Result``), its region details, and its two files.

``Result.save`` writes ``patches.h5`` then ``report.json``; the report is written last, so a folder
with a report holds complete results. Both are written through ``hdmil.files`` (temp file, fsync,
rename).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import HDMILError, SlideError
from hdmil.pipeline.folders import printable

__all__ = ["STAGES", "NoTissueError", "RegionDetails", "Result", "UnreadablePatchesError", "neighbour_flags"]

STAGES = ("tissue", "lipn", "crop", "features", "dmin", "total")


class NoTissueError(HDMILError):
    """The slide has no patch with enough tissue: nothing to classify."""


class UnreadablePatchesError(SlideError):
    """Too many of the patches a run had to read could not be decoded (all of them, or more than
    ``RunOptions.max_failed_share``): a prediction from what is left would not be the slide's."""


@dataclass
class RegionDetails:
    """What a DMIN over SLPD regions pooled (R regions, C classes, N tissue patches).

    coords int64 [R, 2] level-0 (x, y) top-left of each region; attention / scores float32 [R, C]
    DMIN's per-class attention and raw logits over the regions; prototype int64 [R] the region's
    SLPD prototype (-1 none); patch_region int64 [N] each tissue patch's region row (-1 none);
    size_level0 the side of a region in level-0 px; slpd_name the SLPD checkpoint's file name.
    """

    coords: np.ndarray
    attention: np.ndarray
    scores: np.ndarray
    prototype: np.ndarray
    patch_region: np.ndarray
    size_level0: int
    slpd_name: str = ""

    @property
    def n_regions(self) -> int:
        return int(len(self.coords))

    def to_report(self) -> dict[str, Any]:
        """The region keys of ``report.json``."""
        return {"n_regions": self.n_regions, "region_size_level0": int(self.size_level0),
                "slpd": self.slpd_name}

    def write_h5(self, f: Any) -> None:
        """The region datasets and attributes of ``patches.h5`` (an open h5py file)."""
        f.create_dataset("region_coords", data=self.coords.astype(np.int64))
        f.create_dataset("region_attention", data=self.attention.astype(np.float32))
        f.create_dataset("region_scores", data=self.scores.astype(np.float32))
        f.create_dataset("region_prototype", data=self.prototype.astype(np.int64))
        f.create_dataset("patch_region", data=self.patch_region.astype(np.int64))
        f.attrs["region_size_level0"] = int(self.size_level0)
        f.attrs["slpd"] = self.slpd_name


@dataclass
class Result:
    """What hierarchical inference found on one slide. Arrays are over the N tissue patches.

    coords int64 [N, 2] level-0 (x, y) top-left; grid_index int64 [N, 2] (row, col);
    lipn_mask bool [N, C] which patches each class keeps (all True for HDMIL†);
    kept bool [N] patches read at 20x (the union of lipn_mask; all for HDMIL†);
    neighbour bool [N] kept only as a neighbour of a kept patch (LIPN's dilation; else all False);
    attention float32 [N, C] DMIN's per-class attention within the pooled set, NaN elsewhere;
    scores float32 [N, C] DMIN's raw attention logits s, NaN where not read;
    features float32 [K, D] of the patches read, rows ``feature_index`` int64 [K] of coords;
    failed int64 [F] rows that were kept but could not be decoded (``failed_share`` of the kept).
    ``run_key`` is what produced the result (``hdmil.pipeline.folders.run_key``): a later run
    reuses the result only when its own key is the same.
    ``regions`` holds what a DMIN over SLPD regions pooled (None for a patch DMIN); then a
    patch's attention and scores are its region's.
    """

    slide_name: str
    slide_path: str | None
    classes: list[str]
    probabilities: np.ndarray
    prediction_index: int
    coords: np.ndarray
    grid_index: np.ndarray
    lipn_mask: np.ndarray
    kept: np.ndarray
    attention: np.ndarray
    scores: np.ndarray
    features: np.ndarray
    feature_index: np.ndarray
    failed: np.ndarray
    use_lipn: bool
    timings: dict[str, float]
    errors: list[str] = field(default_factory=list)
    grid: Any = None
    mpp: float | None = None
    patch_size_level0: int = 0
    model_name: str = ""
    model_sha256: str = ""
    encoder: str = ""
    reading: dict[str, Any] = field(default_factory=dict)
    regions: RegionDetails | None = None  # None: DMIN pooled patches
    neighbour: np.ndarray | None = None  # None: no patch was kept only as a neighbour
    run_key: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.neighbour = neighbour_flags(self.neighbour, self.kept)

    @property
    def failed_share(self) -> float:
        """The share of the kept patches that could not be decoded (0 when none was kept)."""
        return len(self.failed) / self.n_kept if self.n_kept else 0.0

    @property
    def instances(self) -> str:
        """What DMIN pooled: ``"region"`` (SLPD regions, see ``regions``) or ``"patch"``."""
        return "region" if self.regions is not None else "patch"

    @property
    def prediction(self) -> str:
        return self.classes[self.prediction_index]

    @property
    def n_patches(self) -> int:
        return int(len(self.coords))

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def n_read(self) -> int:
        return int(len(self.feature_index))

    @property
    def kept_ratio(self) -> float:
        return self.n_kept / self.n_patches if self.n_patches else 0.0

    @property
    def method(self) -> str:
        return "HDMIL" if self.use_lipn else "HDMIL†"

    def to_report(self) -> dict[str, Any]:
        """A JSON-ready summary (``report.json``)."""
        from hdmil import __version__
        return {
            "slide": printable(self.slide_name),
            "path": printable(self.slide_path) if self.slide_path else None,
            "classes": list(self.classes),
            "probabilities": [float(p) for p in self.probabilities],
            "prediction": self.prediction,
            "prediction_index": int(self.prediction_index),
            "use_lipn": bool(self.use_lipn),
            "method": self.method,
            "n_patches": self.n_patches,
            "n_kept": self.n_kept,
            "n_kept_as_neighbour": int(self.neighbour.sum()),
            "n_read": self.n_read,
            "n_failed": int(len(self.failed)),
            "failed_share": round(float(self.failed_share), 6),
            "kept_ratio": round(float(self.kept_ratio), 6),
            "kept_per_class": {c: int(n) for c, n in zip(self.classes, self.lipn_mask.sum(axis=0))},
            "timings": {k: round(float(v), 4) for k, v in self.timings.items()},
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "encoder": self.encoder,
            "mpp": self.mpp,
            "patch_size_level0": int(self.patch_size_level0),
            "reading": self.reading,
            "instances": self.instances,
            **(self.regions.to_report() if self.regions is not None else {}),
            "errors": [printable(e) for e in self.errors],
            "run_key": dict(self.run_key),
            "hdmil_version": __version__,
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``patches.h5`` then ``report.json`` into ``out_dir``, each atomically.

        The report is written last, so a folder with a report holds complete results; an older
        report there is removed first, so new patches never sit beside an old report.
        WriteError (naming the file) when the folder cannot be made or written to.
        """
        from hdmil.files import WriteError, write_json_atomic

        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").unlink(missing_ok=True)
        except OSError as exc:
            raise WriteError(f"{out}: cannot write the results folder ({exc.strerror or exc})") from exc
        write_patches_h5(out / "patches.h5", self)
        write_json_atomic(out / "report.json", self.to_report())
        return out


def neighbour_flags(neighbour: np.ndarray | None, kept: np.ndarray) -> np.ndarray:
    """bool [N] like ``kept``: the patches kept only as a neighbour (all False when None)."""
    if neighbour is None:
        return np.zeros(np.shape(kept), bool)
    neighbour = np.asarray(neighbour, bool)
    if neighbour.shape != np.shape(kept):
        raise ValueError(f"neighbour must be bool {np.shape(kept)} like kept, got {neighbour.shape}")
    return neighbour


def write_patches_h5(path: Path, r: Result) -> None:
    """coords, grid index, LIPN mask, kept, attention and scores per patch; features of the read
    patches with their rows; the region details of a region DMIN. Written atomically."""
    import h5py

    from hdmil.files import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=r.coords.astype(np.int64))
        f.create_dataset("grid_index", data=r.grid_index.astype(np.int64))
        f.create_dataset("lipn_mask", data=r.lipn_mask.astype(bool))
        f.create_dataset("kept", data=r.kept.astype(bool))
        f.create_dataset("kept_as_neighbour", data=r.neighbour)
        f.create_dataset("attention", data=r.attention.astype(np.float32))
        f.create_dataset("scores", data=r.scores.astype(np.float32))
        f.create_dataset("features", data=r.features.astype(np.float32))
        f.create_dataset("feature_index", data=r.feature_index.astype(np.int64))
        f.create_dataset("failed", data=r.failed.astype(np.int64))
        if r.regions is not None:
            r.regions.write_h5(f)
        f.attrs["instances"] = r.instances
        f.attrs["slide"] = printable(r.slide_name)
        f.attrs["classes"] = json.dumps(r.classes)
        f.attrs["use_lipn"] = bool(r.use_lipn)
        f.attrs["patch_size_level0"] = int(r.patch_size_level0)
        f.attrs["mpp"] = float(r.mpp) if r.mpp is not None else math.nan
        f.attrs["encoder"] = r.encoder
        f.attrs["model"] = r.model_name
        f.attrs["model_sha256"] = r.model_sha256
