"""Hierarchical inference on one slide: LIPN pre-screens at 1.25x, only kept patches are read at 20x.

    slide ─► tissue grid ─► LR patches ─► LIPN keep mask [N, C]
                                               │ union of kept rows
                                               ▼
             PatchReader (tile-aligned, prefetched) ─► encoder ─► DMIN.predict(features, mask)
                                                                        │
                                                                        ▼
                                                  Result (probabilities, attention, stage seconds)

The CLI (``hdmil predict``), the Dask batch runner and the napari widget all call ``run_slide``.
``use_lipn=False`` is HDMIL†: every tissue patch is read and DMIN pools over its own mask.
A DMIN trained on SLPD region embeddings (``train-dmin --instances region``) is run the same way
without LIPN: every tissue patch is read, the SLPD teacher embeds each 16 × 16 block of patch
features as one region, DMIN pools the regions, and each patch shows its region's attention.

Stage seconds (``Result.timings``):

* ``tissue``: open the slide, tissue mask and patch grid (with the 1.25x image LIPN reads);
* ``lipn``: cutting LR patches and running LIPN on them;
* ``crop``: read + decode + resize of the HR patches, measured in the reader's own thread (its
  working time, not time it waited for the encoder to take a batch);
* ``features``: the encoder, measured in the calling thread;
* ``dmin``: DMIN's masked pooling and classification;
* ``total``: wall-clock of the whole run. Reading overlaps feature extraction, so
  ``crop + features`` can exceed the time they took together; ``crop_wait`` is the part of the
  total the encoder sat waiting for patches (the crop time not hidden behind features).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import Cancelled, CheckpointError, HDMILError

__all__ = [
    "NoTissueError", "Result", "check_slpd_dims", "encoder_for", "fit_encoder", "instances_of",
    "lipn_applies",
    "run_slide", "slpd_for", "warm_up",
]

ProgressFn = Callable[[str, int, int], None]
STAGES = ("tissue", "lipn", "crop", "features", "dmin", "total")
# Failed-patch messages kept verbatim in the report; the rest are counted.
_MAX_FAILURE_MESSAGES = 10


class NoTissueError(HDMILError):
    """The slide has no patch with enough tissue: nothing to classify."""


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
    failed int64 [F] rows that were kept but could not be decoded.
    With ``instances == "region"`` DMIN pooled SLPD regions: region_coords int64 [R, 2] level-0
    top-left, region_attention / region_scores float32 [R, C], region_prototype int64 [R] (-1 none),
    patch_region int64 [N] each patch's region row (-1 none); a patch's attention is its region's.
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
    instances: str = "patch"
    region_coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    region_attention: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    region_scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    region_prototype: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    patch_region: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    region_size_level0: int = 0
    slpd_name: str = ""
    neighbour: np.ndarray | None = None  # None: no patch was kept only as a neighbour

    def __post_init__(self) -> None:
        self.neighbour = _neighbour_flags(self.neighbour, self.kept)

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
            "slide": self.slide_name,
            "path": self.slide_path,
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
            "kept_ratio": round(float(self.kept_ratio), 6),
            "kept_per_class": {c: int(n) for c, n in zip(self.classes, self.lipn_mask.sum(axis=0))},
            "timings": {k: round(float(v), 4) for k, v in self.timings.items()},
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "encoder": self.encoder,
            "mpp": self.mpp,
            "patch_size_level0": int(self.patch_size_level0),
            "reading": self.reading,
            "instances": self.instances,
            **(
                {"n_regions": int(len(self.region_coords)),
                 "region_size_level0": int(self.region_size_level0), "slpd": self.slpd_name}
                if self.instances == "region" else {}
            ),
            "errors": list(self.errors),
            "hdmil_version": __version__,
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``patches.h5`` then ``report.json`` into ``out_dir``, each atomically.

        The report is written last, so a folder with a report holds complete results.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_patches_h5(out / "patches.h5", self)
        _write_json(out / "report.json", self.to_report())
        return out


def _neighbour_flags(neighbour: np.ndarray | None, kept: np.ndarray) -> np.ndarray:
    """bool [N] like ``kept``: the patches kept only as a neighbour (all False when None)."""
    if neighbour is None:
        return np.zeros(np.shape(kept), bool)
    neighbour = np.asarray(neighbour, bool)
    if neighbour.shape != np.shape(kept):
        raise ValueError(f"neighbour must be bool {np.shape(kept)} like kept, got {neighbour.shape}")
    return neighbour


# ---------------------------------------------------------------------------------------------
# pre-screening: tissue + LIPN, nothing read at 20x


@dataclass
class PreScreen:
    """The first two stages of a run: the tissue grid and LIPN's decision, no HR pixel read.

    lipn_mask bool [N, C] which patches each class keeps (all True when ``use_lipn`` is off);
    kept bool [N] their union, the patches a run reads at 20x; neighbour bool [N] those kept only
    as a neighbour of a kept patch (LIPN's dilation); timings {tissue, lipn} seconds.
    """

    grid: Any
    classes: list[str]
    lipn_mask: np.ndarray
    kept: np.ndarray
    slide_path: str | None
    mpp: float | None
    use_lipn: bool = True
    model_name: str = ""
    model_sha256: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    neighbour: np.ndarray | None = None  # None: no patch was kept only as a neighbour

    def __post_init__(self) -> None:
        self.neighbour = _neighbour_flags(self.neighbour, self.kept)

    @property
    def coords(self) -> np.ndarray:
        return self.grid.coords

    @property
    def grid_index(self) -> np.ndarray:
        return self.grid.index

    @property
    def n_patches(self) -> int:
        return int(len(self.grid.coords))

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def kept_ratio(self) -> float:
        return self.n_kept / self.n_patches if self.n_patches else 0.0

    def to_report(self) -> dict[str, Any]:
        """A JSON-ready summary of the pre-screen (kept ratio overall and per class)."""
        return {
            "slide": Path(self.slide_path).stem if self.slide_path else None,
            "slide_path": self.slide_path,
            "classes": list(self.classes),
            "use_lipn": self.use_lipn,
            "n_patches": self.n_patches,
            "n_kept": self.n_kept,
            "n_kept_as_neighbour": int(self.neighbour.sum()),
            "kept_ratio": self.kept_ratio,
            "kept_ratio_per_class": {
                c: float(self.lipn_mask[:, i].mean()) if self.n_patches else 0.0
                for i, c in enumerate(self.classes)
            },
            "timings": dict(self.timings),
            "model": {"name": self.model_name, "sha256": self.model_sha256},
        }


def _check_model(model: Any, use_lipn: bool, need_dmin: bool = True) -> None:
    ckpt = getattr(model, "path", None) or "the model"
    if need_dmin and getattr(model, "dmin", None) is None:
        raise CheckpointError(f"{ckpt}: the checkpoint has no DMIN; it cannot classify slides")
    if use_lipn and getattr(model, "lipn", None) is None:
        raise CheckpointError(
            f"{ckpt}: the checkpoint has no LIPN, so hierarchical inference is not possible; "
            "run HDMIL† over all patches instead (use_lipn=False, --no-lipn)"
        )


def _prescreen_open(
    slide: Any,
    model: Any,
    use_lipn: bool,
    mpp: float | None,
    report: ProgressFn,
    cancel: threading.Event | None,
    t_start: float,
) -> PreScreen:
    """Tissue grid and LIPN mask on an open slide; ``t_start`` is when opening it began."""
    from hdmil.grid import build_grid

    _check(cancel, slide)
    report("tissue", 0, 1)
    grid = build_grid(
        slide,
        mpp=mpp,
        patch_px=int(getattr(model, "patch_px", 256)),
        magnification=float(getattr(model, "magnification", 20.0)),
        lr_magnification=float(getattr(model, "lr_magnification", 1.25)),
    )
    t_tissue = time.perf_counter() - t_start  # opening the file belongs here
    report("tissue", 1, 1)
    n = len(grid.coords)
    if n == 0:
        why = str(getattr(grid, "message", "") or "no patch has enough tissue")
        why = why.removeprefix(f"{slide.path}: ")
        raise NoTissueError(f"{slide.path}: no tissue found ({why})")
    classes = list(model.classes)
    _check(cancel, slide)

    report("lipn", 0, n)
    t0 = time.perf_counter()
    neighbour = np.zeros(n, dtype=bool)
    if use_lipn:
        plain, grown = model.lipn.keep_masks(grid.lr_patches(), index=grid.index)
        lipn_mask = np.asarray(grown, dtype=bool).reshape(n, len(classes))
        neighbour = lipn_mask.any(axis=1) & ~np.asarray(plain, dtype=bool).reshape(n, -1).any(axis=1)
    else:
        lipn_mask = np.ones((n, len(classes)), dtype=bool)
    t_lipn = time.perf_counter() - t0
    report("lipn", n, n)
    return PreScreen(
        grid=grid, classes=classes, lipn_mask=lipn_mask, kept=lipn_mask.any(axis=1), neighbour=neighbour,
        slide_path=str(slide.path), mpp=float(grid.mpp), use_lipn=use_lipn,
        model_name=Path(str(getattr(model, "path", "") or "")).name,
        model_sha256=str(getattr(model, "sha256", "") or ""),
        timings={"tissue": t_tissue, "lipn": t_lipn},
    )


def prescreen(
    slide_or_path: Any,
    model: Any,
    use_lipn: bool = True,
    mpp: float | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> PreScreen:
    """Tissue + LIPN only: which patches a run would read at 20x, without reading any.

    Pass the result to ``run_slide(..., prescreened=ps)`` to classify without redoing it.
    Raises the same errors as ``run_slide``'s first two stages.
    """
    from hdmil.slide import open_slide

    _check_model(model, use_lipn, need_dmin=False)
    report = progress or (lambda *a: None)
    t_start = time.perf_counter()
    own = isinstance(slide_or_path, (str, os.PathLike))
    slide = open_slide(slide_or_path, mpp=mpp) if own else slide_or_path
    try:
        return _prescreen_open(slide, model, use_lipn, mpp, report, cancel, t_start)
    finally:
        if own:
            slide.close()


# ---------------------------------------------------------------------------------------------
# the run


def run_slide(
    slide_or_path: Any,
    model: Any,
    use_lipn: bool = True,
    mpp: float | None = None,
    encoder: Any = None,
    batch_size: int = 64,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    device: Any = None,
    workers: int | None = None,
    prescreened: PreScreen | None = None,
    slpd: Any = None,
) -> Result:
    """Classify one slide with HDMIL (``use_lipn=True``) or HDMIL† (all tissue patches).

    Args:
        slide_or_path: a ``hdmil.slide.Slide`` or a path (opened here, closed at the end).
        model: a loaded ``HDMILModel`` (``hdmil.checkpoint.load_model``).
        mpp: level-0 µm per pixel for slides without that metadata (overrides the file's).
        encoder: an ``Encoder``; default: the one named in the checkpoint, built once per call
            (pass one in when running many slides).
        batch_size: HR patches per batch (reading and features).
        progress: ``progress(stage, done, total)`` for stages tissue, lipn, features, dmin.
        cancel: set it to stop between batches (raises ``Cancelled``).
        device: where the encoder runs when it is built here (default: CUDA if available).
        workers: decoding threads (default: all cores).
        prescreened: a ``prescreen`` of this slide with this model: its grid and LIPN mask are used
            as they are (its tissue and LIPN seconds are reported) instead of being computed again.
        slpd: for a DMIN trained on region instances: the SLPD model (or its checkpoint path) that
            embeds regions; default: the checkpoint named in the model's config, beside it.

    Raises:
        SlideError / MissingMPPError: the slide cannot be read, or has no mpp and none was given.
        NoTissueError: no patch of the slide has enough tissue.
        CheckpointError: the model has no DMIN, no LIPN while ``use_lipn``, or its feature width
            does not fit the encoder; a region DMIN with ``use_lipn`` or without its SLPD model.
        NoTissueError: also when a region DMIN finds too few tissue patches for one region.
        Cancelled: ``cancel`` was set.
    """
    from hdmil.reading import PatchReader
    from hdmil.slide import open_slide

    timings = dict.fromkeys(STAGES, 0.0)
    _check_model(model, use_lipn)
    if prescreened is not None and (
        prescreened.use_lipn != use_lipn or list(prescreened.classes) != list(model.classes)
    ):
        raise HDMILError(
            f"{prescreened.slide_path}: the pre-screen was made with another model or LIPN setting; "
            "pre-screen again"
        )
    regions = instances_of(model) == "region"
    if regions:
        if use_lipn:
            raise CheckpointError(
                f"{getattr(model, 'path', None) or 'the model'}: its DMIN pools SLPD regions and LIPN "
                "screens patches; run HDMIL† over all patches (use_lipn=False, --no-lipn)"
            )
    if encoder is None:
        encoder = encoder_for(model, device)
    slpd = fit_encoder(model, encoder, slpd)

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    # The clock starts after model setup: stage seconds are per slide.
    t_start = time.perf_counter()
    own = isinstance(slide_or_path, (str, os.PathLike))
    slide = open_slide(slide_or_path, mpp=mpp) if own else slide_or_path
    try:
        # -- tissue and LIPN: the grid at 1.25x and which patches each class keeps ----------------
        if prescreened is None:
            ps = _prescreen_open(slide, model, use_lipn, mpp, report, cancel, t_start)
        else:
            ps = prescreened
            report("tissue", 1, 1)
            report("lipn", ps.n_patches, ps.n_patches)
        grid, lipn_mask, kept = ps.grid, ps.lipn_mask, ps.kept
        timings["tissue"], timings["lipn"] = ps.timings.get("tissue", 0.0), ps.timings.get("lipn", 0.0)
        coords = np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2)
        n = len(coords)
        classes = list(model.classes)
        n_classes = len(classes)
        errors: list[str] = []
        if use_lipn and not kept.any():
            errors.append(
                f"warning: LIPN kept no patch of {slide.path}: no HR patch was read and every class "
                "was scored from an empty (zero) embedding"
            )

        # -- crop + features: only the kept rows are read at 20x --------------------------------
        rows = np.flatnonzero(kept)
        feats = np.zeros((len(rows), int(encoder.dim)), np.float32)
        got = np.zeros(len(rows), dtype=bool)
        position = np.full(n, -1, np.int64)
        position[rows] = np.arange(len(rows))
        failed: list[tuple[int, str]] = []
        reader = PatchReader(
            slide, coords[rows], grid.patch_size_level0,
            out_px=int(getattr(grid, "patch_px", getattr(model, "patch_px", 256))),
            batch_size=batch_size, workers=workers,
        )
        t_feat = 0.0
        report("features", 0, len(rows))
        batches = reader.batches(cancel=cancel)
        try:
            for batch in batches:
                local = np.asarray(batch.indices, dtype=np.int64)  # rows of coords[rows]
                failed.extend((int(rows[i]), msg) for i, msg in batch.failed)
                if len(local):
                    t0 = time.perf_counter()
                    feats[local] = _as_numpy(encoder.embed(batch.pixels))
                    t_feat += time.perf_counter() - t0
                    got[local] = True
                report("features", int(got.sum()) + len(failed), len(rows))
        finally:
            batches.close()  # stops the reader thread at once if the encoder raised
        _check(cancel, slide)
        timings["crop"] = reader.seconds
        timings["crop_wait"] = reader.wait_seconds
        timings["features"] = t_feat
        read_rows = rows[got]
        feats = feats[got]
        if failed:
            errors.append(f"{len(failed)} of {len(rows)} kept patches could not be decoded and were skipped")
            errors.extend(msg for _, msg in failed[:_MAX_FAILURE_MESSAGES])
            if len(failed) > _MAX_FAILURE_MESSAGES:
                errors.append(f"... and {len(failed) - _MAX_FAILURE_MESSAGES} more")

        # -- DMIN: per-class pooling over LIPN's mask (its own mask for HDMIL†) -----------------
        report("dmin", 0, 1)
        t0 = time.perf_counter()
        attention = np.full((n, n_classes), np.nan, np.float32)
        scores = np.full((n, n_classes), np.nan, np.float32)
        region_out: dict[str, Any] = {}
        if regions:  # SLPD embeds the regions (timed with DMIN), DMIN pools them
            sl = _embed_regions(slpd, feats, coords[read_rows], grid.patch_size_level0, slide)
            pred = model.dmin.predict(sl.region_embeddings, mask=None)
            r_att, r_scores = _as_numpy(pred.attention), _as_numpy(pred.scores)
            patch_region = np.full(n, -1, np.int64)
            patch_region[read_rows] = sl.patch_region
            inside = patch_region >= 0
            attention[inside] = r_att[patch_region[inside]]
            scores[inside] = r_scores[patch_region[inside]]
            region_out = dict(
                instances="region", region_coords=sl.region_coords.astype(np.int64),
                region_attention=r_att, region_scores=r_scores,
                region_prototype=sl.region_prototype.astype(np.int64), patch_region=patch_region,
                region_size_level0=int(sl.region_size_level0),
                slpd_name=Path(str(getattr(slpd, "path", "") or "")).name,
            )
        else:
            pred = model.dmin.predict(feats, mask=lipn_mask[read_rows] if use_lipn else None)
            if len(read_rows):
                attention[read_rows] = _as_numpy(pred.attention)
                scores[read_rows] = _as_numpy(pred.scores)
        timings["dmin"] = time.perf_counter() - t0
        report("dmin", 1, 1)
        for c in pred.empty_classes if kept.any() else ():  # none kept: warned above
            errors.append(
                f"warning: class {classes[c]!r} pooled no patch of {slide.path}; "
                "its score comes from an empty (zero) embedding"
            )
        probabilities = _as_numpy(pred.probabilities).astype(np.float64)
        timings["total"] = time.perf_counter() - t_start
        return Result(
            slide_name=str(getattr(slide, "name", Path(str(slide.path)).stem)),
            slide_path=str(slide.path) if getattr(slide, "path", None) else None,
            classes=classes,
            probabilities=probabilities,
            prediction_index=int(np.argmax(probabilities)),
            coords=coords,
            grid_index=np.asarray(grid.index, dtype=np.int64).reshape(-1, 2),
            lipn_mask=lipn_mask,
            kept=kept,
            neighbour=ps.neighbour,
            attention=attention,
            scores=scores,
            features=feats,
            feature_index=read_rows.astype(np.int64),
            failed=np.array(sorted(i for i, _ in failed), dtype=np.int64),
            use_lipn=bool(use_lipn),
            timings=timings,
            errors=errors,
            grid=grid,
            mpp=float(grid.mpp) if getattr(grid, "mpp", None) else None,
            patch_size_level0=int(grid.patch_size_level0),
            model_name=Path(str(getattr(model, "path", None) or "the model")).name,
            model_sha256=str(getattr(model, "sha256", "")),
            encoder=str(getattr(encoder, "name", "")),
            reading={
                "level": int(reader.level),
                "tiled": bool(reader.tiled),
                "n_tiles_decoded": int(reader.n_tiles_decoded),
                "bytes_decoded": int(reader.bytes_decoded),
            },
            **region_out,
        )
    finally:
        if own:
            slide.close()


def warm_up(model: Any, encoder: Any, patch_px: int = 256) -> None:
    """Run LIPN, the encoder and DMIN once on dummy input.

    The first call of a torch model pays one-time setup (kernel selection, thread pools, CUDA
    context): a quarter of a second for LIPN on a CPU, more than LIPN's whole per-slide cost. Call
    this once per process before timing slides so stage seconds are per slide, not per process.
    """
    lr = np.full((2, 16, 16, 3), 200, np.uint8)
    if getattr(model, "lipn", None) is not None:
        model.lipn.keep_mask(lr, index=np.array([[0, 0], [0, 1]]))
    encoder.embed(np.full((2, patch_px, patch_px, 3), 200, np.uint8))
    model.dmin.predict(np.zeros((2, int(model.dmin.cfg.in_dim)), np.float32), mask=None)


def instances_of(model: Any) -> str:
    """``"patch"`` or ``"region"``: what the checkpoint's DMIN was trained to pool."""
    return str((getattr(model, "config", {}) or {}).get("instances", "patch") or "patch")


def lipn_applies(model: Any, use_lipn: bool = True) -> bool:
    """Whether a run asked for ``use_lipn`` screens with LIPN: not for a DMIN of SLPD regions,
    which reads every patch (LIPN screens patches, not regions)."""
    return bool(use_lipn) and instances_of(model) != "region"


def slpd_for(model: Any, slpd: Any = None) -> Any:
    """The SLPD model that embeds regions for a region DMIN: ``slpd`` itself when it is a loaded
    model, loaded from it when it is a path, else the checkpoint the config names, beside it."""
    from hdmil.train.slpd_trainer import load_slpd

    if slpd is not None and not isinstance(slpd, (str, os.PathLike)):
        return slpd
    ckpt = getattr(model, "path", None) or "the model"
    if slpd is None:
        name = (getattr(model, "config", {}) or {}).get("slpd_checkpoint")
        if not name:
            raise CheckpointError(
                f"{ckpt}: its DMIN pools SLPD region embeddings but the checkpoint names no SLPD "
                "model; pass it (slpd=..., --slpd CKPT)"
            )
        path = Path(str(name)) if Path(str(name)).is_absolute() else Path(str(ckpt)).parent / str(name)
        if not path.is_file():
            raise CheckpointError(
                f"{ckpt}: its DMIN pools SLPD region embeddings of {name}, which is not beside it "
                f"at {path}; pass the SLPD checkpoint (slpd=..., --slpd CKPT)"
            )
    else:
        path = Path(slpd)
    loaded = load_slpd(path)
    loaded.path = str(path)
    return loaded


def fit_encoder(model: Any, encoder: Any, slpd: Any = None, source: str | None = None) -> Any:
    """CheckpointError unless the encoder's features fit the model; returns the SLPD model a
    region DMIN needs (``slpd_for``), None for a patch DMIN. ``source`` names the encoder in the
    error (default ``encoder <name>``)."""
    if instances_of(model) == "region":
        slpd = slpd_for(model, slpd)
        check_slpd_dims(model, slpd, encoder)
        return slpd
    model.check_feature_dim(encoder.dim, source=source or f"encoder {getattr(encoder, 'name', '?')}")
    return None


def check_slpd_dims(model: Any, slpd: Any, encoder: Any) -> None:
    """CheckpointError unless encoder → SLPD → DMIN widths chain up."""
    ckpt = getattr(model, "path", None) or "the model"
    where = getattr(slpd, "path", None) or "the SLPD model"
    enc = slpd.cfg.encoder
    if int(enc.in_dim) != int(encoder.dim):
        raise CheckpointError(
            f"{where}: the SLPD region encoder takes {enc.in_dim}-d patch features, the encoder "
            f"{getattr(encoder, 'name', '?')} gives {encoder.dim}-d ones"
        )
    if int(model.dmin.cfg.in_dim) != int(enc.embed_dim):
        raise CheckpointError(
            f"{ckpt}: its DMIN takes {model.dmin.cfg.in_dim}-d region embeddings, {where} gives "
            f"{enc.embed_dim}-d ones"
        )


def _embed_regions(slpd: Any, feats: np.ndarray, coords: np.ndarray, patch_size: int, slide: Any) -> Any:
    """SLPD outputs of the read patches; NoTissueError when they fill no region."""
    from hdmil.train.slpd_trainer import embed_slide

    name = str(getattr(slide, "name", Path(str(slide.path)).stem))
    out = embed_slide(slpd, feats, coords, patch_size, slide_id=name)
    if len(out.region_embeddings) == 0:
        g = slpd.cfg.region_size
        raise NoTissueError(
            f"{slide.path}: no SLPD region: no {g} × {g} block of the patch grid holds at least "
            f"{slpd.cfg.region_min_tissue:.0%} tissue patches ({len(coords)} patches read)"
        )
    return out


def encoder_for(model: Any, device: Any) -> Any:
    """The encoder the checkpoint's DMIN was trained on.

    The config names the architecture (``encoder``); when it also names a weights file
    (``encoder_weights``, relative to the checkpoint's folder) those weights are loaded, and a
    missing file is an error rather than a silent fall-back to other weights.
    """
    from hdmil.features import create_encoder

    config = getattr(model, "config", {}) or {}
    ckpt = getattr(model, "path", None) or "the model"
    name = config.get("encoder")
    if not name:
        raise CheckpointError(
            f"{ckpt}: the checkpoint does not name the encoder its DMIN was trained on; "
            "pass the encoder explicitly"
        )
    weights = config.get("encoder_weights")
    try:
        if weights:
            path = Path(str(ckpt)).parent / str(weights)
            if not path.is_file():
                raise CheckpointError(
                    f"{ckpt}: the encoder weights it names ({weights}) are not beside it at {path}"
                )
            return create_encoder(name, weights=path, device=device)
        return create_encoder(
            name, pretrained=bool(config.get("encoder_pretrained", False)), device=device
        )
    except CheckpointError:
        raise
    except HDMILError as exc:
        raise CheckpointError(f"{ckpt}: encoder {name!r}: {exc}") from exc


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _check(cancel: threading.Event | None, slide: Any) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{getattr(slide, 'path', 'slide')}: cancelled")


# ---------------------------------------------------------------------------------------------
# files


def _write_json(path: Path, obj: dict) -> None:
    from hdmil.export import write_json_atomic

    write_json_atomic(path, obj)


def _write_patches_h5(path: Path, r: Result) -> None:
    """coords, grid index, LIPN mask, kept, attention and scores per patch; features of the read
    patches with their rows; written to a temporary name in the same folder, then renamed."""
    import h5py

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
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
            if r.instances == "region":
                f.create_dataset("region_coords", data=r.region_coords.astype(np.int64))
                f.create_dataset("region_attention", data=r.region_attention.astype(np.float32))
                f.create_dataset("region_scores", data=r.region_scores.astype(np.float32))
                f.create_dataset("region_prototype", data=r.region_prototype.astype(np.int64))
                f.create_dataset("patch_region", data=r.patch_region.astype(np.int64))
                f.attrs["region_size_level0"] = int(r.region_size_level0)
                f.attrs["slpd"] = r.slpd_name
            f.attrs["instances"] = r.instances
            f.attrs["slide"] = r.slide_name
            f.attrs["classes"] = json.dumps(r.classes)
            f.attrs["use_lipn"] = bool(r.use_lipn)
            f.attrs["patch_size_level0"] = int(r.patch_size_level0)
            f.attrs["mpp"] = float(r.mpp) if r.mpp is not None else math.nan
            f.attrs["encoder"] = r.encoder
            f.attrs["model"] = r.model_name
            f.attrs["model_sha256"] = r.model_sha256
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
