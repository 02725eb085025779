"""Starting, cancelling and finishing the widget's work in a napari thread worker.

The worker runs ``_runner.Runner.work`` off the GUI thread. Its ``Progress`` messages reach the
GUI thread through a Qt signal (a queued connection); its return value is one ``Outcome``
(``_messages``), handed to ``on_outcome``. Cancel sets the event the pipeline checks between
batches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal

from napari_hdmil._messages import Job, Outcome
from napari_hdmil._runner import Runner


class _Bridge(QObject):
    """Carries the worker's ``Progress`` messages into the GUI thread."""

    progress = Signal(object)


class RunControl:
    """One run at a time: ``start(job)`` returns the worker (None while one runs)."""

    def __init__(self, on_outcome: Callable[[Outcome], None], on_running: Callable[[bool], None],
                 on_status: Callable[[str], None]) -> None:
        self.runner = Runner()
        self.bridge = _Bridge()
        self.worker: Any = None
        self._cancel = threading.Event()
        self._on_outcome, self._on_running, self._on_status = on_outcome, on_running, on_status

    def start(self, job: Job) -> Any:
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return None
        self._cancel = threading.Event()
        worker = create_worker(self.runner.work, job, self._cancel, self.bridge.progress.emit,
                               _start_thread=False, _ignore_errors=True)  # fmt: skip
        worker.returned.connect(self._on_outcome)
        worker.errored.connect(self._errored)  # a bug, not bad input (that is returned)
        worker.finished.connect(self._finished)
        self.worker = worker
        self._on_running(True)
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running work to stop; the pipeline checks between batches."""
        self._cancel.set()
        if self.worker is not None:
            self._on_status("cancelling …")

    def _errored(self, exc: BaseException) -> None:
        self._on_status("failed: see the notification")
        show_error(f"HDMIL: unexpected {type(exc).__name__}: {exc}")

    def _finished(self) -> None:
        self.worker = None
        self._on_running(False)
