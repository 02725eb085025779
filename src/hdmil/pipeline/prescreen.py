"""Stage 1, the pre-screen: the tissue grid at 1.25x and LIPN's keep mask; no HR pixel is read."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import check_cancelled
from hdmil.inference import LIPNScreen, lipn_screen, screen_all
from hdmil.pipeline.folders import printable
from hdmil.pipeline.setup import check_model
from hdmil.pipeline.result import NoTissueError, neighbour_flags

__all__ = ["PreScreen", "ProgressFn", "mpp_source", "prescreen", "prescreen_open"]

ProgressFn = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


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
    roi: dict[str, Any] | None = None  # the ROI / exclusions the grid was restricted to (restrict_grid)
    mpp_source: str | None = None  # "file" (the slide's metadata) or "user" (--mpp, the widget's box)
    budget: dict[str, Any] | None = None  # LIPN thresholds set before Classify (hdmil.budget); None: the checkpoint's

    def __post_init__(self) -> None:
        self.neighbour = neighbour_flags(self.neighbour, self.kept)

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
            "slide": printable(Path(self.slide_path).stem) if self.slide_path else None,
            "slide_path": printable(self.slide_path) if self.slide_path else None,
            "classes": list(self.classes),
            "use_lipn": self.use_lipn,
            "n_patches": self.n_patches,
            "n_kept": self.n_kept,
            "n_padded_patches": self.grid.n_padded,  # past the slide's edge, padded with background
            "n_kept_as_neighbour": int(self.neighbour.sum()),
            "kept_ratio": self.kept_ratio,
            "kept_ratio_per_class": {
                c: float(self.lipn_mask[:, i].mean()) if self.n_patches else 0.0
                for i, c in enumerate(self.classes)
            },
            "timings": dict(self.timings),
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "roi": self.roi,
            **({"budget": self.budget} if self.budget is not None else {}),
        }


def mpp_source(slide: Any, mpp: float | None) -> str:
    """Where a run's mpp comes from: ``"user"`` when given to the run (``--mpp``, the widget's
    box) or to ``open_slide``, else ``"file"`` (the slide's metadata)."""
    from hdmil.slide import Slide

    if mpp is not None or (isinstance(slide, Slide) and slide.mpp_source == "user"):
        return "user"
    return "file"


def _tissue_grid(slide: Any, model: Any, mpp: float | None) -> Any:
    """The slide's patch grid at the model's geometry (patch side, HR and LR magnification)."""
    from hdmil.grid import build_grid

    return build_grid(
        slide, mpp=mpp, patch_px=model.patch_px, magnification=model.magnification,
        lr_magnification=model.lr_magnification,
    )


def _require_tissue(grid: Any, slide: Any) -> None:
    if len(grid.coords) == 0:
        why = str(grid.message or "no patch has enough tissue").removeprefix(f"{slide.path}: ")
        raise NoTissueError(f"{slide.path}: no tissue found ({why})")


def _restrict(grid: Any, slide: Any, roi: Any, exclude: Any) -> tuple[Any, dict[str, Any] | None]:
    """The grid cut to the ROI and outside the exclusions (``hdmil.annotations``), and what the
    report records of it; the grid as it is when neither is given."""
    if roi is None and exclude is None:
        return grid, None
    from hdmil.annotations import restrict_grid

    grid, info = restrict_grid(grid, roi.for_slide(slide) if roi is not None else None,
                               exclude.for_slide(slide) if exclude is not None else None)
    if len(grid.coords) == 0:
        what = f"inside the ROI {printable(info['file'])}" if info["file"] else "outside the exclusions"
        raise NoTissueError(
            f"{slide.path}: none of its {info['n_tissue_patches']} tissue patches lies {what} by at "
            f"least {info['threshold']:.0%} of its area (is the annotation for this slide?)")
    return grid, info


def prescreen_open(
    slide: Any,
    model: Any,
    use_lipn: bool,
    mpp: float | None,
    report: ProgressFn,
    cancel: threading.Event | None,
    t_start: float,
    roi: Any = None,
    exclude: Any = None,
) -> PreScreen:
    """Tissue grid and LIPN mask on an open slide; ``t_start`` is when opening it began.
    ``roi`` / ``exclude``: ``hdmil.annotations.Annotations`` the grid is restricted to / by."""
    check_cancelled(cancel, f"{slide.path}: finding tissue")
    report("tissue", 0, 1)
    grid = _tissue_grid(slide, model, mpp)
    t_tissue = time.perf_counter() - t_start  # opening the file belongs here
    report("tissue", 1, 1)
    _require_tissue(grid, slide)
    grid, roi_info = _restrict(grid, slide, roi, exclude)
    n = len(grid.coords)
    check_cancelled(cancel, f"{slide.path}: LIPN")
    report("lipn", 0, n)
    t0 = time.perf_counter()
    screen: LIPNScreen = (
        lipn_screen(model.lipn, grid.lr_patches(), grid.index) if use_lipn
        else screen_all(n, len(model.classes))
    )
    t_lipn = time.perf_counter() - t0
    report("lipn", n, n)
    return PreScreen(
        grid=grid, classes=list(model.classes), lipn_mask=screen.mask, kept=screen.kept,
        neighbour=screen.neighbour, slide_path=str(slide.path), mpp=float(grid.mpp),
        use_lipn=use_lipn, model_name=model.name, model_sha256=str(model.sha256 or ""),
        timings={"tissue": t_tissue, "lipn": t_lipn}, roi=roi_info, mpp_source=mpp_source(slide, mpp),
    )


def prescreen(
    slide_or_path: Any,
    model: Any,
    use_lipn: bool = True,
    mpp: float | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    roi: Any = None,
    exclude: Any = None,
) -> PreScreen:
    """Tissue + LIPN only: which patches a run would read at 20x, without reading any.

    Pass the result to ``run_slide(..., prescreened=ps)`` to classify without redoing it.
    ``roi`` / ``exclude`` (``hdmil.annotations.Annotations``) restrict the grid first.
    Raises the same errors as ``run_slide``'s first two stages.
    """
    from hdmil.slide import open_slide

    check_model(model, use_lipn, need_dmin=False)
    t_start = time.perf_counter()
    own = isinstance(slide_or_path, (str, os.PathLike))
    slide = open_slide(slide_or_path, mpp=mpp) if own else slide_or_path
    try:
        return prescreen_open(slide, model, use_lipn, mpp, progress or _no_progress, cancel, t_start,
                              roi=roi, exclude=exclude)
    finally:
        if own:
            slide.close()
