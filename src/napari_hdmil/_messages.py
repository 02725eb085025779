"""What the dock widget and its worker thread tell each other: small typed messages, no Qt.

The widget hands the worker a ``Job``; while it runs, the worker sends ``Progress`` (through a
queued Qt signal, so it reaches the GUI thread); when it ends it returns one ``Outcome``:
``PrescreenDone``, ``ResultDone``, ``RunCancelled`` or ``RunFailed``. A bug (any other exception)
is not an outcome: napari's worker reports it through ``errored``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from hdmil.pipeline import PreScreen, Result

__all__ = ["Job", "Outcome", "PrescreenDone", "Progress", "ResultDone", "RunCancelled", "RunFailed"]

JobKind = Literal["prescreen", "classify", "all"]
JOB_KINDS: tuple[str, ...] = ("prescreen", "classify", "all")


@dataclass(frozen=True)
class Job:
    """One press of Pre-screen, Classify or Run all, with the inputs as they were then."""

    kind: JobKind
    slide_path: str
    mpp: float | None  # None: the slide file's own
    model_path: Path
    use_lipn: bool
    batch_size: int
    k: int  # top-k: the gallery's thumbnails are read in the worker
    device: Any = None  # encoder device; None: CUDA when available
    prescreened: PreScreen | None = None  # Classify after Pre-screen reuses its grid and LIPN mask
    roi: Any = None  # hdmil.annotations.Annotations (level-0 px) to restrict the run to; None: all tissue
    exclude: Any = None  # hdmil.annotations.Annotations (level-0 px) to leave out; None: nothing


@dataclass(frozen=True)
class Progress:
    """The pipeline's ``progress(stage, done, total)``: ``done`` of ``total`` in ``stage``."""

    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class PrescreenDone:
    prescreen: PreScreen


@dataclass(frozen=True)
class ResultDone:
    result: Result
    thumbnails: dict[int, np.ndarray] = field(default_factory=dict)  # patch row -> uint8 (h, w, 3)


@dataclass(frozen=True)
class RunCancelled:
    message: str


@dataclass(frozen=True)
class RunFailed:
    """An input the user can fix (a bad slide, a missing mpp, a checkpoint that does not fit)."""

    message: str


Outcome = Union[PrescreenDone, ResultDone, RunCancelled, RunFailed]
