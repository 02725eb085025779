"""Errors about the user's input. The CLI prints them as one line; the GUI as a notification."""

from __future__ import annotations

from typing import Any


class HDMILError(Exception):
    """A problem with the input (a file, an argument, a checkpoint), not a bug.

    The message names the file and the problem, in words a user can act on.
    """


class SlideError(HDMILError):
    """A slide that cannot be opened or read."""


class MissingMPPError(SlideError):
    """The slide has no microns-per-pixel metadata and physical size is needed."""


class CheckpointError(HDMILError):
    """A checkpoint that is corrupt or does not fit the model or features at hand."""


class FeatureFileError(HDMILError):
    """A feature file (h5 / pt) that cannot be read."""


class Cancelled(HDMILError):
    """Long work stopped because the user asked."""


def check_cancelled(cancel: Any, what: str = "work") -> None:
    """Raise ``Cancelled("<what> cancelled")`` once ``cancel`` (a ``threading.Event``) is set.

    The one cancellation check: long work calls it between batches, epochs and slides, so
    Cancel stops within one step. ``None`` means the work cannot be cancelled.
    """
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} cancelled")
