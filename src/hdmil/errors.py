"""Errors about the user's input. The CLI prints them as one line; the GUI as a notification."""

from __future__ import annotations


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
