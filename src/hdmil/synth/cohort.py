"""A synthetic cohort: tumour and normal slides with pixel and patch ground truth.

Per slide ``<out>/<slide_id>.tiff``, ``<slide_id>.truth.geojson`` (tumour polygons, level-0 px)
and ``<slide_id>.truth.npz`` (tumour / tissue fraction per 256-px patch at 20x on the grid
``hdmil.grid.build_grid`` lays: patch (row, col) at level-0 ``(col * p, row * p)``); for the cohort
``labels.csv`` (``slide_id,label,case_id``) and ``cohort.json`` (what each slide holds).

Tumour burden runs from large areas down to foci of a few percent of the tissue (Camelyon16's
micro-metastases); stain varies between slides; artefacts (pen, folds, blur, debris) fall on
normal and tumour slides alike, so that pre-screening is a real task and not a label leak.
"""

from __future__ import annotations

import csv
import functools
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hdmil.errors import check_cancelled
from hdmil.files import atomic_write, dumps
from hdmil.synth.slide import ARTEFACTS, Progress, Stain, SynthError, SynthSlide, synth_slide

CLASSES = ("normal", "tumor")
DEFAULT_SIZE = (6144, 6144)
DEFAULT_BURDENS = (0.4, 0.2, 0.1, 0.05, 0.03)


@dataclass
class CohortSlide:
    """One slide of a cohort; ``tumor_burden`` is the tumour share of its tissue."""

    slide_id: str
    case_id: str
    label: str
    path: Path
    truth_geojson: Path
    truth_npz: Path
    tumor_burden: float
    seed: int
    artefacts: tuple[str, ...] = ()
    stain: Stain = field(default_factory=Stain)


@dataclass
class CohortInfo:
    out_dir: Path
    labels_csv: Path
    slides: list[CohortSlide] = field(default_factory=list)
    classes: tuple[str, ...] = CLASSES

    @property
    def labels(self) -> dict[str, str]:
        return {s.slide_id: s.label for s in self.slides}


@dataclass(frozen=True)
class _Plan:
    slide_id: str
    case_id: str
    label: str
    burden: float
    seed: int
    artefacts: tuple[str, ...]
    stain: Stain


def _plan(n_slides: int, seed: int, tumor_burdens: tuple[float, ...],
          positive_fraction: float, artefact_rate: float) -> list[_Plan]:
    rng = np.random.default_rng([seed, 0xC0407])
    n_pos = int(round(n_slides * positive_fraction))
    labels = np.array(["tumor"] * n_pos + ["normal"] * (n_slides - n_pos))
    rng.shuffle(labels)
    burdens = list(tumor_burdens)
    plans = []
    k = 0
    for i, label in enumerate(labels):
        if label == "tumor":  # cycle through the burdens so every level is represented
            burden = float(burdens[k % len(burdens)])
            k += 1
        else:
            burden = 0.0
        arts = tuple(a for a in ARTEFACTS if rng.random() < artefact_rate)
        slide_seed = int(rng.integers(0, 2**31 - 1))
        plans.append(_Plan(
            slide_id=f"synth_{i:03d}", case_id=f"case_{i:03d}", label=str(label), burden=burden,
            seed=slide_seed, artefacts=arts, stain=Stain.random(slide_seed, 1.0),
        ))
    return plans


def _make_one(out_dir: str, plan: _Plan, size: tuple[int, int], mpp: float,
              workers: int) -> dict:
    """Write one slide and its truth files (runs in a worker process)."""
    out = Path(out_dir)
    slide: SynthSlide = synth_slide(
        out / f"{plan.slide_id}.tiff", size=size, seed=plan.seed, tumor_fraction=plan.burden,
        mpp=mpp, stain=plan.stain, artefacts=plan.artefacts, workers=workers,
    )
    with atomic_write(out / f"{plan.slide_id}.truth.geojson") as fh:
        fh.write(dumps(slide.truth_geojson()))
    truth = slide.patch_truth()
    with atomic_write(out / f"{plan.slide_id}.truth.npz", "wb") as fh:
        np.savez_compressed(fh, **truth, tumor_mask=slide.tumor_mask,
                            tissue_mask=slide.tissue_mask,
                            mask_downsample=np.int64(slide.mask_downsample))
    return {"tumor_burden": slide.tumor_fraction}


def synth_cohort(
    out_dir: str | os.PathLike,
    n_slides: int,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    tumor_burdens: tuple[float, ...] = DEFAULT_BURDENS,
    positive_fraction: float = 0.5,
    mpp: float = 0.5,
    artefact_rate: float = 0.35,
    workers: int | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> CohortInfo:
    """Write ``n_slides`` synthetic slides (classes ``normal`` / ``tumor``) with ground truth.

    Args:
        out_dir: created if missing; existing slides of the same names are overwritten.
        n_slides: number of slides (one per case).
        seed: the whole cohort follows from it.
        size: level-0 (width, height) of every slide.
        tumor_burdens: tumour shares of the tissue that positive slides cycle through.
        positive_fraction: share of tumour slides.
        mpp: µm per level-0 px.
        artefact_rate: chance of each artefact (pen, fold, blur, debris) on any slide.
        workers: slides made in parallel (processes; default up to 2).
        progress: ``progress("cohort", slides_done, n_slides)``.
        cancel: ``threading.Event``; slides already written stay, ``Cancelled`` is raised.
    """
    out = Path(out_dir)
    n_slides = int(n_slides)
    burdens = _check_cohort_args(out, n_slides, positive_fraction, tumor_burdens)
    out.mkdir(parents=True, exist_ok=True)
    size = (int(size[0]), int(size[1]))
    plans = _plan(n_slides, int(seed), burdens, float(positive_fraction), float(artefact_rate))
    workers = max(1, min(2, os.cpu_count() or 1)) if workers is None else max(1, int(workers))
    workers = min(workers, n_slides)
    make = functools.partial(_make_one, str(out), size=size, mpp=mpp, workers=1)
    what = f"{out}: synthetic cohort"
    if workers == 1:
        results = _make_here(plans, make, what, progress, cancel)
    else:
        results = _make_in_pool(plans, make, workers, what, progress, cancel)

    slides = [
        CohortSlide(
            slide_id=p.slide_id, case_id=p.case_id, label=p.label,
            path=out / f"{p.slide_id}.tiff",
            truth_geojson=out / f"{p.slide_id}.truth.geojson",
            truth_npz=out / f"{p.slide_id}.truth.npz",
            tumor_burden=float(results[p.slide_id]["tumor_burden"]),
            seed=p.seed, artefacts=p.artefacts, stain=p.stain,
        )
        for p in plans
    ]
    labels_csv = _write_labels(out / "labels.csv", slides)
    _write_manifest(out / "cohort.json", slides, int(seed), size, mpp)
    return CohortInfo(out_dir=out, labels_csv=labels_csv, slides=slides)


def _check_cohort_args(out: Path, n_slides: int, positive_fraction: float,
                       tumor_burdens: tuple[float, ...]) -> tuple[float, ...]:
    """The burdens as floats, or a ``SynthError`` naming the bad argument."""
    if n_slides < 1:
        raise SynthError(f"{out}: a cohort needs at least one slide, got {n_slides}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise SynthError(f"{out}: positive_fraction must be in [0, 1], got {positive_fraction}")
    burdens = tuple(float(b) for b in tumor_burdens)
    if not burdens or any(not 0.0 < b <= 1.0 for b in burdens):
        raise SynthError(f"{out}: tumor_burdens must lie in (0, 1], got {tumor_burdens}")
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out}: exists and is not a directory")
    return burdens


def _make_here(plans: list[_Plan], make: Callable[[_Plan], dict], what: str,
               progress: Progress | None, cancel: threading.Event | None) -> dict[str, dict]:
    """Make the slides one after the other in this process."""
    results: dict[str, dict] = {}
    if progress is not None:
        progress("cohort", 0, len(plans))
    for plan in plans:
        check_cancelled(cancel, what)
        results[plan.slide_id] = make(plan)
        if progress is not None:
            progress("cohort", len(results), len(plans))
    return results


def _make_in_pool(plans: list[_Plan], make: Callable[[_Plan], dict], workers: int, what: str,
                  progress: Progress | None, cancel: threading.Event | None) -> dict[str, dict]:
    """Make the slides in ``workers`` spawned processes; cancel drops the slides not started."""
    results: dict[str, dict] = {}
    if progress is not None:
        progress("cohort", 0, len(plans))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        pending: dict[Future, _Plan] = {ex.submit(make, p): p for p in plans}
        try:
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                check_cancelled(cancel, what)
                for fut in done:
                    plan = pending.pop(fut)
                    results[plan.slide_id] = fut.result()
                    if progress is not None:
                        progress("cohort", len(results), len(plans))
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return results


def _write_labels(path: Path, slides: list[CohortSlide]) -> Path:
    """``labels.csv``: slide_id,label,case_id."""
    with atomic_write(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "case_id"])
        for s in slides:
            w.writerow([s.slide_id, s.label, s.case_id])
    return path


def _write_manifest(path: Path, slides: list[CohortSlide], seed: int, size: tuple[int, int],
                    mpp: float) -> None:
    """``cohort.json``: the cohort's settings and what each slide holds (file names relative)."""
    manifest = {
        "seed": seed, "size": list(size), "mpp": mpp, "classes": list(CLASSES),
        "slides": [{**asdict(s), "path": s.path.name, "truth_geojson": s.truth_geojson.name,
                    "truth_npz": s.truth_npz.name, "artefacts": list(s.artefacts)}
                   for s in slides],
    }
    with atomic_write(path) as fh:
        fh.write(dumps(manifest, indent=1))
