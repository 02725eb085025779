"""The HDMIL dock widget: one click from an opened slide to a prediction, heatmaps and exports.

This module only assembles the panels of ``napari_hdmil._qt`` (inputs and run, progress,
prediction, heatmap, gallery, export, similar slides) and runs the work. Classify and Run all call
``hdmil.pipeline.run_slide``, Pre-screen ``hdmil.pipeline.prescreen``, in a napari thread worker
(``_runner.Runner``). Widget and worker exchange the typed messages of ``_messages``: the worker's
``Progress`` reaches the progress bars through a Qt signal (queued into the GUI thread); its
return value is one ``Outcome``. Cancel sets the pipeline's ``cancel`` event, checked between
batches.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QScrollArea, QVBoxLayout, QWidget

from hdmil.errors import HDMILError
from hdmil.pipeline import PreScreen
from hdmil.pipeline import prescreen as prescreen  # re-exported: the GUI's pre-screen is the pipeline's
from napari_hdmil import _layers
from napari_hdmil._messages import (
    JOB_KINDS, Job, Outcome, PrescreenDone, ResultDone, RunCancelled, RunFailed,
)
from napari_hdmil._qt.export import ExportPanel
from napari_hdmil._qt.gallery import GalleryPanel, go_to_patch
from napari_hdmil._qt.heatmap import HeatmapPanel
from napari_hdmil._qt.inputs import InputsPanel
from napari_hdmil._qt.layer_store import LayerStore
from napari_hdmil._qt.prediction import PredictionPanel
from napari_hdmil._qt.progress import ProgressPanel
from napari_hdmil._qt.similar import SimilarPanel
from napari_hdmil._runner import Runner

__all__ = ["HDMILWidget", "prescreen"]

# The panels' controls and actions, reachable on the widget too (scripts, tests, the demo):
# panel -> attribute names. ``export_*(path)`` return the path written.
_FROM_PANELS = {
    "inputs": ("slide_box", "model_edit", "mpp_box", "lipn_box", "k_box", "prescreen_button",
               "classify_button", "run_all_button", "cancel_button"),
    "progress": ("progress_bars", "status_label"),
    "prediction": ("prediction_label", "probability_bars", "counts_label", "timings_label", "warnings_label"),
    "heatmap": ("class_box", "norm_box", "threshold_slider", "colormap_box", "opacity_slider"),
    "exports": ("export_buttons", "export_geojson", "export_csv", "export_png", "export_report"),
    "similar": ("index_edit", "protomap_button", "similar_button", "similar_list", "show_prototype_map",
                "find_similar"),
}  # fmt: skip


class _Bridge(QObject):
    """Carries the worker's ``Progress`` messages into the GUI thread (a queued Qt connection)."""

    progress = Signal(object)


class HDMILWidget(QWidget):
    """Dock widget: choose slide, model, mpp; Pre-screen / Classify / Run all / Cancel; see the
    prediction, steer the heatmaps, browse the top-k gallery, export, find similar slides.

    Public for scripts and tests: ``run(kind)`` returns the worker; ``result`` is the last
    ``Result``; ``export_*``; ``go_to_patch(row)``; ``batch_size`` and ``device``.
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.result: Any = None
        self.prescreened: PreScreen | None = None
        self.worker: Any = None
        self.batch_size = 64
        self.device: Any = None  # encoder device; None: CUDA when available
        self._cancel = threading.Event()
        self._runner = Runner()
        self._store = LayerStore(napari_viewer)
        self._bridge = _Bridge()

        self.inputs = InputsPanel(napari_viewer)
        self.progress = ProgressPanel()
        self.prediction = PredictionPanel()
        self.heatmap = HeatmapPanel(self._store, self._top_k)
        self.gallery_panel = GalleryPanel(self.go_to_patch)
        self.exports = ExportPanel(napari_viewer, lambda: self.result, self._top_k)
        self.similar = SimilarPanel(self.inputs, self._store)
        for panel, names in _FROM_PANELS.items():
            for name in names:
                setattr(self, name, getattr(getattr(self, panel), name))
        self.gallery = self.gallery_panel.gallery
        self._lay_out(self.inputs, self.progress, self.prediction, self.heatmap, self.gallery_panel,
                      self.exports, self.similar)  # fmt: skip

        self._bridge.progress.connect(self.progress.show_progress)
        self.heatmap.class_changed.connect(self._on_class_changed)
        self.prescreen_button.clicked.connect(lambda: self.run("prescreen"))
        self.classify_button.clicked.connect(lambda: self.run("classify"))
        self.run_all_button.clicked.connect(lambda: self.run("all"))
        self.cancel_button.clicked.connect(self.cancel)
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            ev.connect(self._on_layers_changed)
        self._on_layers_changed()
        self._set_running(False)

    def _top_k(self) -> int:
        return int(self.k_box.value)

    def _lay_out(self, *panels: QWidget) -> None:
        """The panels top to bottom in a scroll area (the dock can be shorter than the widget)."""
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        outer.addWidget(scroll)
        body = QWidget()
        scroll.setWidget(body)
        column = QVBoxLayout(body)
        for panel in panels:
            column.addWidget(panel)
        column.addStretch(1)

    # -- running -------------------------------------------------------------------------------

    def run(self, kind: str = "all") -> Any:
        """Start ``kind`` ("prescreen", "classify" or "all") in a thread worker; returns it
        (None when a run is already going or the inputs are wrong: that is shown as an error)."""
        from napari.qt.threading import create_worker

        if kind not in JOB_KINDS:
            raise ValueError(f"kind must be 'prescreen', 'classify' or 'all', not {kind!r}")
        if self.worker is not None:
            return None
        try:
            job = self._job(kind)
        except HDMILError as exc:
            show_error(str(exc))
            return None
        self._cancel = threading.Event()
        self.progress.reset()
        verb = {"prescreen": "pre-screening", "classify": "classifying", "all": "running"}[kind]
        self.progress.set_status(f"{verb} {Path(job.slide_path).name} …")
        worker = create_worker(self._runner.work, job, self._cancel, self._bridge.progress.emit,
                               _start_thread=False, _ignore_errors=True)  # fmt: skip
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)  # a bug, not bad input (that is returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._set_running(True)
        worker.start()
        return worker

    def prescreen(self) -> Any:
        return self.run("prescreen")

    def classify(self) -> Any:
        return self.run("classify")

    def run_all(self) -> Any:
        return self.run("all")

    def cancel(self) -> None:
        """Ask the running work to stop; the pipeline checks between batches."""
        self._cancel.set()
        if self.worker is not None:
            self.progress.set_status("cancelling …")

    def _job(self, kind: str) -> Job:
        """The inputs as a job; Classify reuses a pre-screen of the same slide, model and LIPN."""
        job = self.inputs.job(kind, self.batch_size, self.device)
        ps = self.prescreened
        if (kind == "classify" and ps is not None and str(ps.slide_path) == job.slide_path
                and ps.use_lipn == job.use_lipn and ps.model_sha256 == self._runner.model_sha(job.model_path)):
            job = dataclasses.replace(job, prescreened=ps)
        return job

    def _on_returned(self, outcome: Outcome) -> None:
        if isinstance(outcome, RunCancelled):
            self.progress.set_status("cancelled")
            show_info(outcome.message)
        elif isinstance(outcome, RunFailed):
            self.progress.set_status("failed: see the notification")
            show_error(outcome.message)
        elif isinstance(outcome, PrescreenDone):
            self.show_prescreen(outcome.prescreen)
        elif isinstance(outcome, ResultDone):
            self.show_result(outcome.result, outcome.thumbnails)

    def _on_errored(self, exc: BaseException) -> None:
        self.progress.set_status("failed: see the notification")
        show_error(f"HDMIL: unexpected {type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self.inputs.set_running(running, can_classify=self.prescreened is not None)
        has = self.result is not None and not running
        self.exports.set_enabled(has)
        self.heatmap.controls.enabled = has

    # -- showing -------------------------------------------------------------------------------

    def _on_layers_changed(self, event: Any = None) -> None:
        self.inputs.refresh()
        self._store.forget_removed()

    def show_prescreen(self, ps: PreScreen) -> None:
        """LIPN decision layer and counts of a pre-screen."""
        self.prescreened = ps
        self.result = None
        self.heatmap.clear()
        self.inputs.align_slide_layer(ps)
        self._store.clear()
        self._store.put(*_layers.lipn_layer(ps))
        self.prediction.show_prescreen(ps)
        self.gallery_panel.clear()
        self.progress.set_status(f"pre-screen done: {ps.n_kept} of {ps.n_patches} patches to read at 20x")

    def show_result(self, result: Any, thumbnails: dict | None = None) -> None:
        """All layers of a ``Result``, the prediction panel and the gallery (``thumbnails``:
        patch row -> image, read in the worker; without them they are read now)."""
        self.result = result
        self.prescreened = None
        self.inputs.align_slide_layer(result)
        self._store.clear()
        for layer in self.heatmap.set_result(result):
            self._store.put(*layer)
        self.prediction.show_result(result)
        self.gallery_panel.show_class(result, result.prediction_index, self._top_k(), thumbnails)
        self.progress.set_status(f"done in {result.timings.get('total', 0.0):.1f} s")

    def heatmap_layers(self) -> dict[str, Any]:
        """class name -> its heatmap layer."""
        return self.heatmap.heatmap_layers()

    def _on_class_changed(self, cls: int) -> None:
        self.gallery_panel.show_class(self.result, cls, self._top_k())

    def go_to_patch(self, row: int) -> None:
        """Centre the camera on patch ``row`` and zoom so it is ~250 screen pixels wide."""
        src = self.result if self.result is not None else self.prescreened
        if src is not None:
            go_to_patch(self.viewer, src, row)
