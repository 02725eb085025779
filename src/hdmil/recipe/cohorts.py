"""The recipe's synthetic cohorts: made (or re-used), split, read back with their ground truth."""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import check_cancelled
from hdmil.files import write_json_atomic
from hdmil.recipe.config import Progress, RecipeError

__all__ = ["check_disjoint", "load_training_cohort", "make_cohort", "manifest", "slide_grids",
           "slide_truth", "stratified_split"]

MARKER = "recipe-cohort.json"  # the settings a cohort folder was made with


def manifest(cohort_dir: Path) -> list[dict[str, Any]]:
    """The slides of ``cohort_dir/cohort.json`` (one dict per slide: slide_id, path, label, ...)."""
    return json.loads((Path(cohort_dir) / "cohort.json").read_text())["slides"]


def make_cohort(
    folder: Path, n: int, seed: int, size: int, burdens: tuple[float, ...],
    workers: int | None, progress: Progress | None, cancel: threading.Event | None,
) -> str:
    """Make a cohort of ``n`` square slides of ``size`` px in ``folder``, or re-use the one a
    previous run made there with the same settings; says which ("made" / "re-used")."""
    from hdmil.synth import synth_cohort

    marker = folder / MARKER
    want = {"n_slides": n, "seed": seed, "size": size, "burdens": list(burdens)}
    if marker.exists() and json.loads(marker.read_text()) == want and _complete(folder):
        return "re-used"
    marker.unlink(missing_ok=True)
    synth_cohort(folder, n, seed=seed, size=(size, size), tumor_burdens=burdens,
                 workers=workers, progress=progress, cancel=cancel)
    write_json_atomic(marker, want, indent=None)
    return "made"


def _complete(cohort_dir: Path) -> bool:
    try:
        slides = manifest(cohort_dir)
    except (OSError, ValueError):
        return False
    return all((cohort_dir / s["path"]).exists() and (cohort_dir / s["truth_npz"]).exists()
               for s in slides) and (cohort_dir / "labels.csv").exists()


def _seeds(cohort_dir: Path) -> set[int]:
    return {int(s["seed"]) for s in manifest(cohort_dir)}


def check_disjoint(train_dir: Path, heldout_dir: Path) -> None:
    """Raise when a held-out slide was drawn from a training slide's seed (31-bit seeds drawn per
    slide: never seen, but the held-out report relies on it)."""
    shared = _seeds(train_dir) & _seeds(heldout_dir)
    if shared:
        raise RecipeError(f"{train_dir.parent}: held-out slides share seeds with training: "
                          f"{sorted(shared)}")


def stratified_split(slide_ids: Sequence[str], labels: Sequence[str], val_fraction: float,
                     seed: int):
    """Train / validation ids, stratified by label, seeded; no test set (it is generated apart)."""
    from hdmil.train import Split

    rng = np.random.default_rng([seed, 0x5B17])
    train, val = [], []
    for label in sorted(set(labels)):
        ids = [s for s, y in zip(slide_ids, labels) if y == label]
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n_val = max(1, int(round(val_fraction * len(ids)))) if len(ids) > 1 else 0
        val += ids[:n_val]
        train += ids[n_val:]
    return Split(tuple(sorted(train)), tuple(sorted(val)), (), fold=0)


def load_training_cohort(labels: Path, features_dir: Path, skipped: dict[str, str]):
    """``hdmil.train.load_cohort`` of the slides with features (those without tissue, ``skipped``,
    are listed in the report instead of warned about)."""
    from hdmil.train import load_cohort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_cohort(labels, features_dir, skip_missing=bool(skipped))


def slide_truth(truth_npz: str | os.PathLike, coords: np.ndarray) -> np.ndarray:
    """Tumour share of each patch at level-0 ``coords`` [N, 2] (x, y), from ``<slide>.truth.npz``."""
    with np.load(truth_npz) as t:
        frac = np.asarray(t["tumor_fraction"], np.float32)
        p = int(t["patch_size_level0"])
    rows = np.clip(np.asarray(coords)[:, 1] // p, 0, frac.shape[0] - 1)
    cols = np.clip(np.asarray(coords)[:, 0] // p, 0, frac.shape[1] - 1)
    return frac[rows, cols]


def slide_grids(
    cohort_dir: Path, slide_ids: Sequence[str], progress: Progress | None,
    cancel: threading.Event | None,
) -> Iterator[tuple[Any, Any, np.ndarray]]:
    """(open slide, its tissue grid, each grid patch's tumour share) for each slide with tissue."""
    from hdmil.grid import build_grid
    from hdmil.slide import open_slide

    slides = {s["slide_id"]: s for s in manifest(cohort_dir)}
    for done, sid in enumerate(slide_ids):
        check_cancelled(cancel, "recipe")
        if progress is not None:
            progress("slides", done, len(slide_ids))
        s = slides[sid]
        with open_slide(cohort_dir / s["path"]) as slide:
            grid = build_grid(slide)
            if len(grid.coords):
                yield slide, grid, slide_truth(cohort_dir / s["truth_npz"], grid.coords)
    if progress is not None:
        progress("slides", len(slide_ids), len(slide_ids))
