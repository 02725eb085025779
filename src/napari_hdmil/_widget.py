"""The HDMIL dock widget: one click from an opened slide to a prediction, heatmaps and exports.

This module only assembles the panels of ``napari_hdmil._qt`` (inputs and run, progress,
prediction, heatmap, gallery, export, similar slides) and shows what the work returns: Classify
and Run all call ``hdmil.pipeline.run_slide``, Pre-screen ``hdmil.pipeline.prescreen``, in a
thread worker (``_qt.run_control``) that answers with the typed messages of ``_messages``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QVBoxLayout, QWidget

from hdmil.errors import HDMILError
from hdmil.pipeline import PreScreen
from hdmil.pipeline import prescreen as prescreen  # re-exported: the GUI's pre-screen is the pipeline's
from napari_hdmil import _layers
from napari_hdmil._messages import (
    JOB_KINDS, Job, Outcome, PrescreenDone, ResultDone, RunCancelled, RunFailed,
)
from napari_hdmil._qt.column import ScrollColumn
from napari_hdmil._qt.export import ExportPanel
from napari_hdmil._qt.gallery import GalleryPanel, go_to_patch
from napari_hdmil._qt.heatmap import HeatmapPanel
from napari_hdmil._qt.inputs import InputsPanel
from napari_hdmil._qt.layer_store import LayerStore, slide_key
from napari_hdmil._qt.prediction import PredictionPanel
from napari_hdmil._qt.progress import ProgressPanel
from napari_hdmil._qt.run_control import RunControl
from napari_hdmil._qt.similar import SimilarPanel

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


class HDMILWidget(QWidget):
    """Dock widget: choose slide, model, mpp; Pre-screen / Classify / Run all / Cancel; see the
    prediction and the model's card, steer the heatmaps, browse the top-k gallery, export, find
    similar slides. Results are kept per slide (``results``, ``prescreens``: slide key -> the last
    of each, ``layer_store.slide_key``), with their layers; the panels show the chosen slide's.

    Public for scripts and tests: ``run(kind)`` returns the worker; ``result`` is the chosen
    slide's last ``Result``; ``export_*``; ``go_to_patch(row)``; ``batch_size``, ``device``;
    ``sections`` (title -> collapsible Section)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.results: dict[str, Any] = {}
        self.prescreens: dict[str, PreScreen] = {}
        self.batch_size = 64
        self.device: Any = None  # encoder device; None: CUDA when available
        self._store = LayerStore(napari_viewer)

        self.inputs = InputsPanel(napari_viewer)
        self.progress = ProgressPanel()
        self.prediction = PredictionPanel(self.inputs)  # with the chosen model's card
        self.heatmap = HeatmapPanel(self._store, self._top_k)
        self.gallery_panel = GalleryPanel(self.go_to_patch)
        self.exports = ExportPanel(napari_viewer, lambda: self.result, self._top_k)
        self.similar = SimilarPanel(self.inputs, self._store)
        self._run = RunControl(self._on_returned, self._set_running, self.progress.set_status)
        self._bridge = self._run.bridge
        for panel, names in _FROM_PANELS.items():
            for name in names:
                setattr(self, name, getattr(getattr(self, panel), name))
        self.gallery = self.gallery_panel.gallery
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        column = ScrollColumn(self.inputs, (self.progress, True), (self.prediction, True), (self.heatmap, False),
                              (self.gallery_panel, False), (self.exports, False), (self.similar, False))  # fits 914 px
        layout.addWidget(column)
        self.sections = column.sections

        self._bridge.progress.connect(self.progress.show_progress)
        self.heatmap.class_changed.connect(self._on_class_changed)
        self.prescreen_button.clicked.connect(lambda: self.run("prescreen"))
        self.classify_button.clicked.connect(lambda: self.run("classify"))
        self.run_all_button.clicked.connect(lambda: self.run("all"))
        self.cancel_button.clicked.connect(self._run.cancel)
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            ev.connect(self._on_layers_changed)
        napari_viewer.layers.selection.events.active.connect(self._on_active_layer)
        self.slide_box.changed.connect(self._show_slide)
        self._on_layers_changed()
        self._set_running(False)

    @property
    def result(self) -> Any:
        """The chosen slide's last Result (None before its first)."""
        return self.results.get(slide_key(self.inputs.current_slide_path()))

    @property
    def prescreened(self) -> PreScreen | None:
        """The chosen slide's pre-screen waiting for Classify (None when there is none)."""
        return self.prescreens.get(slide_key(self.inputs.current_slide_path()))

    def _top_k(self) -> int:
        return int(self.k_box.value)

    def run(self, kind: str = "all") -> Any:
        """Start ``kind`` ("prescreen", "classify" or "all") in a thread worker; returns it
        (None when a run is already going or the inputs are wrong: that is shown as an error)."""
        if kind not in JOB_KINDS:
            raise ValueError(f"kind must be 'prescreen', 'classify' or 'all', not {kind!r}")
        if self.worker is not None:
            return None
        try:
            job = self._job(kind)
        except HDMILError as exc:
            show_error(str(exc))
            return None
        self.progress.reset()
        verb = {"prescreen": "pre-screening", "classify": "classifying", "all": "running"}[kind]
        self.progress.set_status(f"{verb} {Path(job.slide_path).name} …")
        return self._run.start(job)

    def cancel(self) -> None:
        self._run.cancel()

    @property
    def worker(self) -> Any:
        """The running thread worker, None when idle."""
        return self._run.worker

    def _job(self, kind: str) -> Job:
        """The inputs as a job; Classify reuses a pre-screen of the same slide, model and LIPN."""
        job = self.inputs.job(kind, self.batch_size, self.device)
        ps = self.prescreened
        if (kind == "classify" and ps is not None and str(ps.slide_path) == job.slide_path
                and ps.use_lipn == job.use_lipn and ps.model_sha256 == self._run.runner.model_sha(job.model_path)):
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

    def _set_running(self, running: bool) -> None:
        self.inputs.set_running(running, can_classify=self.prescreened is not None)
        has = self.result is not None and not running
        self.exports.set_enabled(has)
        self.heatmap.controls.enabled = has

    # -- showing -------------------------------------------------------------------------------

    def _on_layers_changed(self, event: Any = None) -> None:
        added = event.value if event is not None and event.type == "inserted" else None
        self._store.forget_removed()
        self.inputs.refresh(added)  # a slide just opened becomes the chosen one

    def _on_active_layer(self, event: Any = None) -> None:
        """The widget follows the selected slide layer (or one of its result layers)."""
        layer = self.viewer.layers.selection.active
        path = (layer.metadata or {}).get("slide_path") if layer is not None else None
        slide = self.inputs.slide_layer_for(path) if path else None
        if slide is not None and slide is not self.slide_box.value:
            self.slide_box.value = slide

    def show_prescreen(self, ps: PreScreen) -> None:
        """LIPN decision layer and counts of a pre-screen (its slide becomes the chosen one)."""
        key = slide_key(ps.slide_path)
        self.prescreens[key] = ps
        self.results.pop(key, None)
        self.inputs.align_slide_layer(ps)
        self._store.clear(key)
        self._store.put(*_layers.lipn_layer(ps))
        self._choose_slide(ps.slide_path)
        self.progress.set_status(f"pre-screen done: {ps.n_kept} of {ps.n_patches} patches to read at 20x")

    def show_result(self, result: Any, thumbnails: dict | None = None) -> None:
        """All layers of a ``Result``, the prediction panel and the gallery (``thumbnails``:
        patch row -> image, read in the worker; without them they are read now). Its slide
        becomes the chosen one; other slides' results and layers stay."""
        key = slide_key(result.slide_path)
        self.results[key] = result
        self.prescreens.pop(key, None)
        self.gallery_panel.set_thumbnails(key, thumbnails)  # before the layers: adding one selects it
        self.inputs.align_slide_layer(result)
        self._store.clear(key)
        for layer in self.heatmap.set_result(result):
            self._store.put(*layer)
        self.heatmap.attach()
        self._choose_slide(result.slide_path)
        self.progress.set_status(f"done in {result.timings.get('total', 0.0):.1f} s")

    def _choose_slide(self, slide_path: Any) -> None:
        """Make ``slide_path``'s layer the chosen slide, show what it has, and select the slide
        layer (napari selected the last layer added, with its tools: a paint brush for labels)."""
        slide = self.inputs.slide_layer_for(slide_path)
        if slide is not None and slide is not self.slide_box.value:
            self.slide_box.value = slide  # emits changed: _show_slide
        else:
            self._show_slide()
        if slide is not None:
            self.viewer.layers.selection.active = slide

    def _show_slide(self, *_: Any) -> None:
        """The chosen slide and its layers are shown, other slides' hidden (they lie at the same
        place); the panels show its result or pre-screen (or nothing yet)."""
        chosen = self.slide_box.value
        for _, slide in self.inputs.slide_choices():
            slide.visible = slide is chosen
        self._store.show_only(self.inputs.current_slide_path())
        result, ps = self.result, self.prescreened
        if result is not None:
            self.heatmap.show(result)
            self.prediction.show_result(result)
            self.gallery_panel.show_class(result, self.heatmap.shown_class(), self._top_k())
        else:
            self.heatmap.clear()
            self.gallery_panel.clear()
            if ps is not None:
                self.prediction.show_prescreen(ps)
            else:
                self.prediction.show_nothing()
        self._set_running(self.worker is not None)

    def _on_class_changed(self, cls: int) -> None:
        self.gallery_panel.show_class(self.result, cls, self._top_k())

    def go_to_patch(self, row: int) -> None:
        """Centre the camera on patch ``row`` and zoom so it is ~250 screen pixels wide."""
        src = self.result if self.result is not None else self.prescreened
        if src is not None:
            go_to_patch(self.viewer, src, row)
