"""``run_slide``: the three stages on one slide, pre-screen -> read and featurise -> pool."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from hdmil.annotations import roi_key
from hdmil.errors import CheckpointError, HDMILError
from hdmil.pipeline.featurise import Featurised, featurise
from hdmil.pipeline.folders import printable, run_key
from hdmil.pipeline.setup import EncoderBuild, check_model, fit_encoder, start_encoder
from hdmil.pipeline.pool import Pooled, Pooler, pooler_for
from hdmil.pipeline.prescreen import PreScreen, ProgressFn, prescreen_open
from hdmil.pipeline.result import STAGES, Result, UnreadablePatchesError

__all__ = ["RunOptions", "run_slide"]


@dataclass
class RunOptions:
    """How one slide is run (the same for every slide of a batch).

    use_lipn: HDMIL (LIPN pre-screens, only kept patches are read) or HDMIL† (every patch);
    mpp: level-0 µm per pixel for slides without that metadata (overrides the file's);
    batch_size: HR patches per batch (reading and features); workers: decoding threads (default:
    all cores); device: where the encoder runs when it is built here (default: CUDA if available);
    max_failed_share: the slide fails (``UnreadablePatchesError``) when more than this share of
    the kept patches cannot be decoded; below it the share is reported (``Result.failed_share``).
    A run that decodes none of its kept patches always fails.
    roi / exclude: ``hdmil.annotations.Annotations`` (``read_annotations``): only the tissue
    patches with at least the tissue threshold of their footprint inside ``roi`` and outside
    ``exclude`` are analysed; the report records them (``Result.roi``).
    """

    use_lipn: bool = True
    mpp: float | None = None
    batch_size: int = 64
    workers: int | None = None
    device: Any = None
    max_failed_share: float = 0.5
    roi: Any = None
    exclude: Any = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.max_failed_share) <= 1.0:
            raise HDMILError(f"max_failed_share must be in [0, 1], not {self.max_failed_share}")


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def run_slide(
    slide_or_path: Any,
    model: Any,
    options: RunOptions | None = None,
    *,
    encoder: Any = None,
    slpd: Any = None,
    prescreened: PreScreen | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    **option_kw: Any,
) -> Result:
    """Classify one slide with HDMIL (``use_lipn=True``) or HDMIL† (all tissue patches).

    Args:
        slide_or_path: a ``hdmil.slide.Slide`` or a path (opened here, closed at the end).
        model: a loaded ``HDMILModel`` (``hdmil.checkpoint.load_model``).
        options: ``RunOptions``; or give its fields as keywords (``use_lipn=False, mpp=0.5``).
        encoder: an ``Encoder``, or an ``EncoderBuild`` (``start_encoder``) still being built: the
            pre-screen runs meanwhile and the wait is reported as ``timings["encoder_wait"]``, not
            in ``total``. Default: the one named in the checkpoint, built in a thread while the
            pre-screen runs, once per call (pass one in when running many slides).
        slpd: for a DMIN trained on region instances: the SLPD model (or its checkpoint path) that
            embeds regions; default: the checkpoint named in the model's config, beside it.
        prescreened: a ``prescreen`` of this slide with this model: its grid and LIPN mask are used
            as they are (its tissue and LIPN seconds are reported) instead of being computed again.
        progress: ``progress(stage, done, total)`` for stages tissue, lipn, features, dmin.
        cancel: set it to stop between batches (raises ``Cancelled``).

    Raises:
        SlideError / MissingMPPError: the slide cannot be read, or has no mpp and none was given.
        NoTissueError: no patch of the slide has enough tissue; for a region DMIN also when too
            few tissue patches make one region.
        UnreadablePatchesError: none of the kept patches could be decoded, or more than
            ``max_failed_share`` of them.
        CheckpointError: the model has no DMIN, no LIPN while ``use_lipn``, or its feature width
            does not fit the encoder; a region DMIN with ``use_lipn`` or without its SLPD model.
        Cancelled: ``cancel`` was set.
    """
    from hdmil.slide import open_slide

    opts = _options(options, option_kw)
    setup = _prepare(model, opts, encoder, slpd, prescreened)
    # The clock starts after model setup: stage seconds are per slide.
    t_start = time.perf_counter()
    own = isinstance(slide_or_path, (str, os.PathLike))
    slide = open_slide(slide_or_path, mpp=opts.mpp) if own else slide_or_path
    t_open = time.perf_counter() - t_start
    try:
        result = _run_open(slide, model, setup, opts, prescreened, progress or _no_progress, cancel,
                           t_start)
        result.timings["open"] = t_open
        return result
    finally:
        if own:
            slide.close()


def _options(options: RunOptions | None, option_kw: dict[str, Any]) -> RunOptions:
    if options is not None and not isinstance(options, RunOptions):
        raise TypeError(f"run_slide: options must be RunOptions, not {type(options).__name__}")
    return dataclasses.replace(options or RunOptions(), **option_kw)


@dataclass
class _Setup:
    """The encoder, SLPD model and pooler of a run; ``build`` while the encoder is still being
    built in a thread (``EncoderBuild``): ``ready`` waits for it after the pre-screen."""

    model: Any
    use_lipn: bool
    encoder: Any = None
    slpd: Any = None
    pooler: Pooler | None = None
    build: EncoderBuild | None = None

    def ready(self) -> float:
        """Wait for the encoder when it is being built; the seconds waited."""
        if self.build is None:
            return 0.0
        t0 = time.perf_counter()
        self.encoder, built_slpd = self.build.result()
        self.slpd = built_slpd if built_slpd is not None else self.slpd
        self.pooler = pooler_for(self.model, self.slpd, self.use_lipn)
        self.build = None
        return time.perf_counter() - t0


def _prepare(model: Any, opts: RunOptions, encoder: Any, slpd: Any,
             prescreened: PreScreen | None) -> _Setup:
    """Check the model fits the run. An encoder given is checked now; none given is built in a
    thread (``start_encoder``) while the pre-screen runs, and checked when it is ready."""
    check_model(model, opts.use_lipn)
    if prescreened is not None and (
        prescreened.use_lipn != opts.use_lipn or list(prescreened.classes) != list(model.classes)
    ):
        raise HDMILError(
            f"{prescreened.slide_path}: the pre-screen was made with another model or LIPN setting; "
            "pre-screen again"
        )
    if model.instances == "region" and opts.use_lipn:
        raise CheckpointError(
            f"{model.path}: its DMIN pools SLPD regions and LIPN screens patches; run HDMIL† over "
            "all patches (use_lipn=False, --no-lipn)"
        )
    if encoder is None:
        encoder = start_encoder(model, opts.device, slpd=slpd)
    if isinstance(encoder, EncoderBuild):
        return _Setup(model, opts.use_lipn, slpd=slpd, build=encoder)
    slpd = fit_encoder(model, encoder, slpd)
    return _Setup(model, opts.use_lipn, encoder, slpd, pooler_for(model, slpd, opts.use_lipn))


def _run_open(slide: Any, model: Any, setup: _Setup, opts: RunOptions,
              prescreened: PreScreen | None, report: ProgressFn, cancel: threading.Event | None,
              t_start: float) -> Result:
    """The three stages on an open slide; ``t_start`` is when opening it began."""
    if prescreened is None:
        ps = prescreen_open(slide, model, opts.use_lipn, opts.mpp, report, cancel, t_start,
                            roi=opts.roi, exclude=opts.exclude)
    else:
        ps = prescreened
        report("tissue", 1, 1)
        report("lipn", ps.n_patches, ps.n_patches)
    waited = setup.ready()  # the encoder built meanwhile; its wait is setup, not this slide's
    encoder = setup.encoder
    errors = _nothing_kept(ps, slide)
    read = featurise(slide, ps.grid, ps.kept, encoder, opts.batch_size, opts.workers, report, cancel)
    _check_decoded(read, ps, slide, opts.max_failed_share)
    errors += read.failure_messages(ps.n_kept)
    report("dmin", 0, 1)
    t0 = time.perf_counter()
    pooled = setup.pooler.pool(read, ps, slide)
    t_dmin = time.perf_counter() - t0
    report("dmin", 1, 1)
    errors += _empty_classes(pooled, ps, slide)
    timings = _timings(ps, read, t_dmin, t_start)
    timings["total"] -= waited
    timings["encoder_wait"] = waited
    result = _result(slide, model, encoder, ps, read, pooled, timings, errors)
    result.run_key = run_key(model, ps.use_lipn, opts.mpp, encoder.name, slide.path or None)
    result.run_key["roi"] = roi_key(opts.roi, opts.exclude)
    from hdmil.compute import compute_of  # imports torch: not at module level (the CLI parser)

    result.blocks["compute"] = compute_of(encoder).to_report()  # how the encoder ran (hdmil.compute)
    return result


def _check_decoded(read: Featurised, ps: PreScreen, slide: Any, max_share: float) -> None:
    """UnreadablePatchesError when no kept patch was decoded, or more than ``max_share``."""
    n_failed, n_kept = len(read.failed), ps.n_kept
    if not n_failed:
        return
    first = " ".join(str(read.failed[0][1]).split())
    if n_failed == n_kept:
        raise UnreadablePatchesError(
            f"{printable(slide.path)}: none of the {n_kept} kept patches could be decoded, so there "
            f"is no prediction (first error: {first})")
    if n_failed / n_kept > max_share:
        raise UnreadablePatchesError(
            f"{printable(slide.path)}: {n_failed} of {n_kept} kept patches ({n_failed / n_kept:.0%}) "
            f"could not be decoded, more than the {max_share:.0%} allowed (--max-failed-share), so "
            f"there is no prediction (first error: {first})")


def _nothing_kept(ps: PreScreen, slide: Any) -> list[str]:
    if ps.use_lipn and not ps.kept.any():
        return [f"warning: LIPN kept no patch of {slide.path}: no HR patch was read and every class "
                "was scored from an empty (zero) embedding"]
    return []


def _empty_classes(pooled: Pooled, ps: PreScreen, slide: Any) -> list[str]:
    if not ps.kept.any():  # none kept: warned already
        return []
    return [f"warning: class {ps.classes[c]!r} pooled no patch of {slide.path}; "
            "its score comes from an empty (zero) embedding" for c in pooled.empty_classes]


def _timings(ps: PreScreen, read: Featurised, t_dmin: float, t_start: float) -> dict[str, float]:
    timings = dict.fromkeys(STAGES, 0.0)
    timings["tissue"], timings["lipn"] = ps.timings.get("tissue", 0.0), ps.timings.get("lipn", 0.0)
    timings.update(read.timings)  # crop, crop_wait, features
    timings["dmin"] = t_dmin
    timings["total"] = time.perf_counter() - t_start
    return timings


def _result(slide: Any, model: Any, encoder: Any, ps: PreScreen, read: Featurised, pooled: Pooled,
            timings: dict[str, float], errors: list[str]) -> Result:
    grid = ps.grid
    return Result(
        slide_name=str(slide.name),
        slide_path=str(slide.path) if slide.path else None,
        classes=list(model.classes),
        probabilities=pooled.probabilities,
        prediction_index=int(np.argmax(pooled.probabilities)),
        coords=np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2),
        grid_index=np.asarray(grid.index, dtype=np.int64).reshape(-1, 2),
        lipn_mask=ps.lipn_mask,
        kept=ps.kept,
        neighbour=ps.neighbour,
        attention=pooled.attention,
        scores=pooled.scores,
        features=read.features,
        feature_index=read.read_rows.astype(np.int64),
        failed=np.array(sorted(i for i, _ in read.failed), dtype=np.int64),
        use_lipn=bool(ps.use_lipn),
        timings=timings,
        errors=errors,
        grid=grid,
        mpp=float(grid.mpp) if grid.mpp else None,
        mpp_source=ps.mpp_source,
        patch_size_level0=int(grid.patch_size_level0),
        model_name=model.name,
        model_sha256=str(model.sha256),
        encoder=str(encoder.name),
        reading=read.reading,
        regions=pooled.regions,
        roi=ps.roi,
    )
