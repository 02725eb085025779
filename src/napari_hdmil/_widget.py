"""The HDMIL dock widget: one click from an opened slide to a prediction, heatmaps and exports.

Thin over the model package: Classify and Run all call ``hdmil.pipeline.run_slide``; Pre-screen
builds the tissue grid and LIPN's keep mask (``prescreen``); layers come from ``_layers``;
exports from ``hdmil.export``. Slow work runs in a napari thread worker; the pipeline's
``progress(stage, done, total)`` reaches the progress bars through a Qt signal (queued into the
GUI thread), and Cancel sets the pipeline's ``cancel`` event, which it checks between batches.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSlider, FloatSpinBox, SpinBox
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from hdmil.errors import Cancelled, CheckpointError, HDMILError
from hdmil.pipeline import PreScreen
from hdmil.pipeline import prescreen as pipeline_prescreen
from napari_hdmil import _layers
from napari_hdmil._gallery import Gallery, read_thumbnails

__all__ = ["HDMILWidget", "prescreen"]

PROGRESS_STAGES = ("tissue", "lipn", "features", "dmin")
STAGE_TITLES = {"tissue": "tissue", "lipn": "LIPN", "features": "crop + features", "dmin": "DMIN"}
TIMING_ROWS = (("tissue", "tissue"), ("lipn", "LIPN"), ("crop", "crop"), ("features", "features"),
               ("dmin", "DMIN"), ("total", "total"))  # fmt: skip
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "jet", "hot")
ZOOM_PATCH_PX = 250  # a gallery click shows the patch this many screen pixels wide


# ---------------------------------------------------------------------------------------------
# pre-screen (tissue + LIPN): the first two stages of run_slide, without reading at 20x


# The GUI holds no logic of its own: pre-screening is the pipeline's (the CLI has it too).
prescreen = pipeline_prescreen


@dataclass
class _Job:
    kind: str  # "prescreen" | "classify" | "all"
    slide_path: str
    mpp: float | None
    model_path: Path
    use_lipn: bool
    batch_size: int
    k: int
    prescreened: Any = None  # Classify after Pre-screen reuses its grid and LIPN mask


class _Bridge(QObject):
    """Carries progress from the worker thread to the GUI thread (a queued Qt connection)."""

    progress = Signal(str, int, int)


# ---------------------------------------------------------------------------------------------
# the widget


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
        self._models: dict[tuple, Any] = {}
        self._encoders: dict[tuple, Any] = {}
        self._warm: set[tuple] = set()
        self._layers: dict[str, Any] = {}  # our layers by name
        self._thumbs: dict[int, np.ndarray] = {}
        self._bridge = _Bridge()
        self._bridge.progress.connect(self._on_progress)

        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        outer.addWidget(scroll)
        body = QWidget()
        scroll.setWidget(body)
        self._body = QVBoxLayout(body)

        self._build_inputs()
        self._build_progress()
        self._build_prediction()
        self._build_heatmap_controls()
        self._build_gallery()
        self._build_export()
        self._build_similar()
        self._body.addStretch(1)

        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            ev.connect(self._on_layers_changed)
        self._on_layers_changed()
        self._set_running(False)

    # -- building ------------------------------------------------------------------------------

    def _build_inputs(self) -> None:
        from hdmil.checkpoint import default_model_path

        self.slide_box = ComboBox(label="slide", choices=self._slide_choices, nullable=False)
        default = default_model_path()
        self.model_edit = FileEdit(
            label="model", mode="r", filter="Checkpoints (*.safetensors *.pt *.pth)",
            value=str(default) if default.is_file() else "",
        )
        self.model_edit.tooltip = f"checkpoint file; default: the bundled demo model ({default})"
        self.mpp_box = FloatSpinBox(label="mpp (µm/px)", min=0.0, max=100.0, step=0.001, value=0.0)
        self.mpp_box.tooltip = "level-0 µm per pixel; needed only when the slide file has none"
        self.lipn_box = CheckBox(text="use LIPN (hierarchical; off = HDMIL†, read all patches)", value=True)
        self.k_box = SpinBox(label="top-k", min=1, max=64, value=8)
        self.inputs = Container(widgets=[self.slide_box, self.model_edit, self.mpp_box, self.lipn_box, self.k_box])
        self.slide_box.changed.connect(self._on_slide_changed)
        self._body.addWidget(self.inputs.native)

        row = QHBoxLayout()
        self.prescreen_button = QPushButton("Pre-screen")
        self.prescreen_button.setToolTip("tissue + LIPN only: which patches would be read at 20x")
        self.classify_button = QPushButton("Classify")
        self.classify_button.setToolTip("DMIN over the patches LIPN keeps (pre-screen first)")
        self.run_all_button = QPushButton("Run all")
        self.run_all_button.setToolTip("tissue, LIPN, features of the kept patches and DMIN in one go")
        self.cancel_button = QPushButton("Cancel")
        for b in (self.prescreen_button, self.classify_button, self.run_all_button, self.cancel_button):
            row.addWidget(b)
        self.prescreen_button.clicked.connect(lambda: self.run("prescreen"))
        self.classify_button.clicked.connect(lambda: self.run("classify"))
        self.run_all_button.clicked.connect(lambda: self.run("all"))
        self.cancel_button.clicked.connect(self.cancel)
        self._body.addLayout(row)

    def _build_progress(self) -> None:
        box = QGroupBox("progress")
        grid = QGridLayout(box)
        self.progress_bars: dict[str, QProgressBar] = {}
        for i, stage in enumerate(PROGRESS_STAGES):
            bar = QProgressBar()
            bar.setRange(0, 1)
            bar.setValue(0)
            bar.setFormat("%v / %m")
            grid.addWidget(QLabel(STAGE_TITLES[stage]), i, 0)
            grid.addWidget(bar, i, 1)
            self.progress_bars[stage] = bar
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        grid.addWidget(self.status_label, len(PROGRESS_STAGES), 0, 1, 2)
        self._body.addWidget(box)

    def _build_prediction(self) -> None:
        box = QGroupBox("prediction")
        v = QVBoxLayout(box)
        self.prediction_label = QLabel("no result yet")
        self.prediction_label.setTextFormat(Qt.RichText)
        v.addWidget(self.prediction_label)
        self._prob_grid = QGridLayout()
        v.addLayout(self._prob_grid)
        self.probability_bars: dict[str, QProgressBar] = {}
        self.counts_label = QLabel("")
        self.counts_label.setWordWrap(True)
        v.addWidget(self.counts_label)
        self.timings_label = QLabel("")
        self.timings_label.setTextFormat(Qt.RichText)
        v.addWidget(self.timings_label)
        self.warnings_label = QLabel("")
        self.warnings_label.setWordWrap(True)
        self.warnings_label.setStyleSheet("color: #ffb000;")
        v.addWidget(self.warnings_label)
        legend = " · ".join(
            f'<span style="color: rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})">■</span> {_layers.LIPN_LEGEND[k]}'
            for k, (r, g, b, _) in ((k, _layers.LIPN_COLORS[k]) for k in (_layers.KEPT, _layers.NEIGHBOUR, _layers.DISCARDED))
        )
        self.legend_label = QLabel(f"LIPN decision: {legend}")
        self.legend_label.setTextFormat(Qt.RichText)
        self.legend_label.setWordWrap(True)
        v.addWidget(self.legend_label)
        self._body.addWidget(box)

    def _build_heatmap_controls(self) -> None:
        self.class_box = ComboBox(label="class", choices=[])
        self.norm_box = ComboBox(label="normalisation", choices=list(_layers.NORMALISATIONS), value="percentile")
        self.threshold_slider = FloatSlider(label="threshold", min=0.0, max=1.0, step=0.01, value=0.0)
        self.colormap_box = ComboBox(label="colormap", choices=list(COLORMAPS), value="inferno")
        self.opacity_slider = FloatSlider(label="opacity", min=0.0, max=1.0, step=0.05, value=0.6)
        self.heatmap_controls = Container(
            widgets=[self.class_box, self.norm_box, self.threshold_slider, self.colormap_box, self.opacity_slider]
        )
        self.class_box.changed.connect(self._on_class_changed)
        for w in (self.norm_box, self.threshold_slider):
            w.changed.connect(self._update_heatmap_data)
        for w in (self.colormap_box, self.opacity_slider):
            w.changed.connect(self._update_heatmap_style)
        box = QGroupBox("heatmap")
        QVBoxLayout(box).addWidget(self.heatmap_controls.native)
        self._body.addWidget(box)

    def _build_gallery(self) -> None:
        box = QGroupBox("top-k gallery")
        self.gallery = Gallery(self.go_to_patch)
        QVBoxLayout(box).addWidget(self.gallery)
        self._body.addWidget(box)

    def _build_export(self) -> None:
        box = QGroupBox("export")
        row = QHBoxLayout(box)
        self.export_buttons = {}
        for key, text, filt in (
            ("geojson", "GeoJSON (QuPath)", "GeoJSON (*.geojson)"),
            ("csv", "CSV", "CSV (*.csv)"),
            ("png", "PNG", "PNG (*.png)"),
            ("report", "report JSON", "JSON (*.json)"),
        ):
            b = QPushButton(text)
            b.clicked.connect(lambda _=False, k=key, f=filt: self._export_dialog(k, f))
            row.addWidget(b)
            self.export_buttons[key] = b
        self._body.addWidget(box)

    def _build_similar(self) -> None:
        box = QGroupBox("similar slides (SLPD)")
        v = QVBoxLayout(box)
        self.index_edit = FileEdit(label="index folder", mode="d", value="")
        self.index_edit.tooltip = "folder of feature files (<slide>.h5) with SLPD prototypes"
        v.addWidget(Container(widgets=[self.index_edit]).native)
        row = QHBoxLayout()
        self.protomap_button = QPushButton("Prototype map")
        self.similar_button = QPushButton("Find similar")
        self.protomap_button.clicked.connect(self.show_prototype_map)
        # clicked sends `checked` (False), which would land in find_similar's `top`
        self.similar_button.clicked.connect(lambda *_: self.find_similar())
        row.addWidget(self.protomap_button)
        row.addWidget(self.similar_button)
        v.addLayout(row)
        self.similar_list = QListWidget()
        self.similar_list.setMaximumHeight(120)
        self.similar_list.itemClicked.connect(self._open_similar)
        v.addWidget(self.similar_list)
        self._body.addWidget(box)

    # -- inputs --------------------------------------------------------------------------------

    def _slide_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        out = []
        for layer in self.viewer.layers:
            meta = layer.metadata or {}
            if not isinstance(layer, Image) or meta.get("hdmil_layer"):
                continue
            if meta.get("hdmil_slide") or (meta.get("slide_path") and meta.get("hdmil_slide") is None):
                out.append((layer.name, layer))
        return out

    def _on_layers_changed(self, event: Any = None) -> None:
        self.slide_box.reset_choices()
        gone = [name for name, layer in self._layers.items() if layer not in self.viewer.layers]
        for name in gone:
            del self._layers[name]
        self._on_slide_changed()

    def _on_slide_changed(self, *_: Any) -> None:
        layer = self.slide_box.value
        mpp = (layer.metadata or {}).get("mpp") if layer is not None else None
        needs = layer is not None and not mpp
        self.mpp_box.enabled = needs
        self.mpp_box.label = "mpp (µm/px, required)" if needs else "mpp (µm/px)"
        if mpp:
            self.mpp_box.value = float(mpp)

    def _model_path(self) -> Path:
        from hdmil.checkpoint import default_model_path

        value = str(self.model_edit.value or "").strip()
        if value in ("", "."):
            default = default_model_path()
            if default.is_file():
                return default
            raise CheckpointError(
                f"{default}: the bundled demo model is missing; choose a checkpoint file (or build it: make model)"
            )
        return Path(value)

    def _job(self, kind: str) -> _Job:
        layer = self.slide_box.value
        if layer is None:
            raise HDMILError("no slide: open a slide (File > Open, or drag it in) and pick its layer")
        meta = layer.metadata or {}
        path = meta.get("slide_path")
        if not path:
            raise HDMILError(f"layer {layer.name!r}: no slide file behind it (metadata has no slide_path)")
        mpp = None
        if not meta.get("mpp") and self.mpp_box.value > 0:
            mpp = float(self.mpp_box.value)  # the file has none: the pipeline needs it
        job = _Job(kind, str(path), mpp, self._model_path(), bool(self.lipn_box.value),
                   int(self.batch_size), int(self.k_box.value))  # fmt: skip
        ps = self.prescreened
        if (kind == "classify" and ps is not None and str(ps.slide_path) == job.slide_path
                and ps.use_lipn == job.use_lipn and ps.model_sha256 == self._model_sha(job.model_path)):
            job.prescreened = ps
        return job

    def _model_sha(self, path: Path) -> str:
        try:
            return str(self._load_model(path).sha256)
        except HDMILError:
            return ""

    # -- running -------------------------------------------------------------------------------

    def run(self, kind: str = "all") -> Any:
        """Start ``kind`` ("prescreen", "classify" or "all") in a thread worker; returns it
        (None when a run is already going or the inputs are wrong: that is shown as an error)."""
        from napari.qt.threading import create_worker

        if kind not in ("prescreen", "classify", "all"):
            raise ValueError(f"kind must be 'prescreen', 'classify' or 'all', not {kind!r}")
        if self.worker is not None:
            return None
        try:
            job = self._job(kind)
        except HDMILError as exc:
            show_error(str(exc))
            return None
        self._cancel = threading.Event()
        for bar in self.progress_bars.values():
            bar.setRange(0, 1)
            bar.setValue(0)
        verb = {"prescreen": "pre-screening", "classify": "classifying", "all": "running"}[kind]
        self.status_label.setText(f"{verb} {Path(job.slide_path).name} …")
        worker = create_worker(self._work, job, self._cancel, _start_thread=False, _ignore_errors=True)
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
            self.status_label.setText("cancelling …")

    def _work(self, job: _Job, cancel: threading.Event) -> tuple[str, Any, Any]:
        """Worker thread. Input errors come back as values so the GUI shows them in one line."""
        try:
            return self._compute(job, cancel)
        except Cancelled as exc:
            return ("cancelled", exc, None)
        except HDMILError as exc:
            return ("error", exc, None)

    def _compute(self, job: _Job, cancel: threading.Event) -> tuple[str, Any, Any]:
        from hdmil.pipeline import lipn_applies, run_slide

        def progress(stage: str, done: int, total: int) -> None:
            self._bridge.progress.emit(stage, int(done), int(total))

        model = self._load_model(job.model_path)
        use_lipn = lipn_applies(model, job.use_lipn)
        if job.kind == "prescreen":
            ps = prescreen(job.slide_path, model, use_lipn, job.mpp, progress, cancel)
            return ("prescreen", ps, None)
        encoder = self._encoder(model)
        result = run_slide(
            job.slide_path, model, use_lipn=use_lipn, mpp=job.mpp, encoder=encoder,
            batch_size=job.batch_size, progress=progress, cancel=cancel, prescreened=job.prescreened,
        )
        thumbs = self._read_thumbs(result, result.prediction_index, job.k)
        return ("result", result, thumbs)

    def _load_model(self, path: Path) -> Any:
        from hdmil.checkpoint import load_model

        path = Path(path)
        try:
            st = path.stat()
            key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        except OSError:
            key = (str(path), 0, 0)  # load_model says what is wrong with it
        if key not in self._models:
            self._models = {key: load_model(path)}  # one model at a time
        return self._models[key]

    def _encoder(self, model: Any) -> Any:
        from hdmil.pipeline import encoder_for, warm_up

        key = (model.encoder, bool(model.config.get("encoder_pretrained", False)), str(self.device))
        if key not in self._encoders:
            self._encoders = {key: encoder_for(model, self.device)}
        encoder = self._encoders[key]
        warm = (id(model), key)
        if warm not in self._warm:  # one-time torch setup stays out of the stage seconds
            warm_up(model, encoder, patch_px=model.patch_px)
            self._warm.add(warm)
        return encoder

    def _read_thumbs(self, result: Any, cls: int, k: int) -> dict[int, np.ndarray]:
        from hdmil.slide import open_slide

        rows = np.concatenate([_layers.top_k(result, cls, k), _layers.top_k(result, cls, k, lowest=True)])
        rows = np.array([r for r in dict.fromkeys(rows.tolist()) if r not in self._thumbs], dtype=np.int64)
        if not len(rows) or not result.slide_path:
            return {}
        try:
            with open_slide(result.slide_path, mpp=result.mpp) as slide:
                thumbs = read_thumbnails(slide, result.coords[rows], result.patch_size_level0)
        except HDMILError:
            return {}  # thumbnails are a nicety: the result stands without them
        return dict(zip(rows.tolist(), thumbs))

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        bar = self.progress_bars.get(stage)
        if bar is None:
            return
        bar.setRange(0, max(int(total), 1))
        bar.setValue(min(int(done), max(int(total), 1)))

    def _on_returned(self, value: tuple[str, Any, Any]) -> None:
        kind, payload, extra = value
        if kind == "cancelled":
            self.status_label.setText("cancelled")
            show_info(str(payload))
        elif kind == "error":
            self.status_label.setText("failed: see the notification")
            show_error(str(payload))
        elif kind == "prescreen":
            self.show_prescreen(payload)
        else:
            self._thumbs = dict(extra or {})
            self.show_result(payload)

    def _on_errored(self, exc: BaseException) -> None:
        self.status_label.setText("failed: see the notification")
        show_error(f"HDMIL: unexpected {type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        for b in (self.prescreen_button, self.run_all_button):
            b.setEnabled(not running)
        self.classify_button.setEnabled(not running and self.prescreened is not None)
        self.cancel_button.setEnabled(running)
        self.inputs.enabled = not running
        has = self.result is not None and not running
        for b in self.export_buttons.values():
            b.setEnabled(has)
        self.heatmap_controls.enabled = has

    # -- showing -------------------------------------------------------------------------------

    def _slide_layer_for(self, slide_path: str | None) -> Any:
        for name, layer in self._slide_choices():
            if str((layer.metadata or {}).get("slide_path")) == str(slide_path):
                return layer
        return None

    def _align_slide_layer(self, res: Any) -> None:
        """A slide without mpp was shown in pixels; once the user gave one, show it in µm."""
        layer = self._slide_layer_for(res.slide_path)
        if layer is not None and not (layer.metadata or {}).get("mpp") and res.mpp:
            layer.scale = (res.mpp, res.mpp)
            layer.metadata = {**layer.metadata, "mpp": float(res.mpp), "mpp_from": "widget"}

    def _put_layer(self, data: Any, kwargs: dict[str, Any], kind: str) -> Any:
        """Add a layer, replacing our previous one of the same name."""
        name = kwargs["name"]
        old = self._layers.pop(name, None)
        if old is not None and old in self.viewer.layers:
            self.viewer.layers.remove(old)
        layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        self._layers[name] = layer
        return layer

    def _clear_layers(self, keep: tuple[str, ...] = ()) -> None:
        for name in list(self._layers):
            if name in keep:
                continue
            layer = self._layers.pop(name)
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    def show_prescreen(self, ps: PreScreen) -> None:
        """LIPN decision layer and counts of a pre-screen."""
        self.prescreened = ps
        self.result = None
        self._align_slide_layer(ps)
        self._clear_layers()
        self._put_layer(*_layers.lipn_layer(ps))
        self.prediction_label.setText(f"pre-screened <b>{Path(str(ps.slide_path)).name}</b>: press Classify")
        self._set_probabilities([], [])
        self.counts_label.setText(
            f"tissue patches {ps.n_patches} · kept {ps.n_kept} ({ps.kept_ratio:.0%}) · per class "
            + ", ".join(f"{c} {int(n)}" for c, n in zip(ps.classes, ps.lipn_mask.sum(axis=0)))
            + (f" · {int(ps.neighbour.sum())} as neighbours" if ps.neighbour.any() else "")
        )
        t = ps.timings or {}
        self.timings_label.setText(_timings_html(t))
        self.warnings_label.setText(
            "LIPN kept no patch: classifying would score every class from an empty embedding"
            if ps.use_lipn and ps.n_kept == 0 else ""
        )
        self.gallery.clear()
        self.status_label.setText(f"pre-screen done: {ps.n_kept} of {ps.n_patches} patches to read at 20x")

    def show_result(self, result: Any) -> None:
        """All layers of a ``Result`` and the prediction panel."""
        self.result = result
        self.prescreened = None
        self._align_slide_layer(result)
        self._clear_layers()
        with self.class_box.changed.blocked():  # the layers below are built for this class
            self.class_box.choices = list(result.classes)
            self.class_box.value = result.prediction
        for data, kwargs, kind in _layers.result_layers(
            result, self.norm_box.value, float(self.threshold_slider.value), self.colormap_box.value,
            float(self.opacity_slider.value), int(self.k_box.value), result.prediction_index,
        ):
            self._put_layer(data, kwargs, kind)

        probs = [float(p) for p in result.probabilities]
        self.prediction_label.setText(
            f"<b style='font-size: 14pt'>{result.prediction}</b> &nbsp;({result.method}, "
            f"{Path(str(result.slide_path)).name})"
        )
        self._set_probabilities(list(result.classes), probs)
        self.counts_label.setText(
            f"kept ratio {result.kept_ratio:.1%} · tissue patches {result.n_patches} · "
            f"kept {result.n_kept} · read {result.n_read}"
        )
        self.timings_label.setText(_timings_html(result.timings))
        self.warnings_label.setText("\n".join(f"⚠ {w}" for w in _layers.result_warnings(result)))
        self._fill_gallery()
        self.status_label.setText(f"done in {result.timings.get('total', 0.0):.1f} s")

    def _set_probabilities(self, classes: list[str], probs: list[float]) -> None:
        while self._prob_grid.count():
            w = self._prob_grid.takeAt(0).widget()
            if w is not None:
                w.setParent(None)
        self.probability_bars = {}
        for i, (c, p) in enumerate(zip(classes, probs)):
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setValue(int(round(p * 1000)))
            bar.setFormat(f"{p:.1%}")
            self._prob_grid.addWidget(QLabel(c), i, 0)
            self._prob_grid.addWidget(bar, i, 1)
            self.probability_bars[c] = bar

    # -- heatmap controls ----------------------------------------------------------------------

    def heatmap_layers(self) -> dict[str, Any]:
        """class name -> its heatmap layer."""
        return {
            layer.metadata["class"]: layer for layer in self._layers.values()
            if (layer.metadata or {}).get("hdmil_layer") == "heatmap"
        }  # fmt: skip

    def _shown_class(self) -> int:
        return list(self.result.classes).index(self.class_box.value)

    def _on_class_changed(self, *_: Any) -> None:
        if self.result is None or self.class_box.value is None:
            return
        for name, layer in self.heatmap_layers().items():
            layer.visible = name == self.class_box.value
        c = self._shown_class()
        k = int(self.k_box.value)
        for lowest in (False, True):
            data, kwargs, _ = _layers.topk_layer(self.result, c, k, lowest=lowest)
            layer = next((ly for ly in self._layers.values()
                          if (ly.metadata or {}).get("hdmil_layer") == ("bottomk" if lowest else "topk")), None)  # fmt: skip
            if layer is None:
                continue
            old = layer.name
            layer.data = data  # in place: same layer, new patches
            layer.features = kwargs["features"]
            layer.metadata = kwargs["metadata"]
            layer.name = kwargs["name"]
            self._layers[layer.name] = self._layers.pop(old)
        self._thumbs.update(self._read_thumbs(self.result, c, k))
        self._fill_gallery()

    def _update_heatmap_data(self, *_: Any) -> None:
        if self.result is None:
            return
        mode, thr = self.norm_box.value, float(self.threshold_slider.value)
        for layer in self.heatmap_layers().values():
            c = int(layer.metadata["class_index"])
            layer.data = _layers.heatmap_data(self.result, c, mode, thr)
            layer.contrast_limits = (0.0, 1.0)
            layer.metadata = {**layer.metadata, "normalisation": mode, "threshold": thr}

    def _update_heatmap_style(self, *_: Any) -> None:
        for layer in self.heatmap_layers().values():
            layer.colormap = self.colormap_box.value
            layer.opacity = float(self.opacity_slider.value)

    # -- gallery -------------------------------------------------------------------------------

    def _fill_gallery(self) -> None:
        r = self.result
        if r is None:
            return
        c = self._shown_class()
        k = int(self.k_box.value)

        def entries(rows: np.ndarray) -> list[tuple[int, np.ndarray, float]]:
            return [(int(i), self._thumbs[int(i)], float(r.attention[i, c])) for i in rows if int(i) in self._thumbs]

        self.gallery.set_patches(
            entries(_layers.top_k(r, c, k)), entries(_layers.top_k(r, c, k, lowest=True)), r.classes[c]
        )

    def go_to_patch(self, row: int) -> None:
        """Centre the camera on patch ``row`` and zoom so it is ~250 screen pixels wide."""
        src = self.result if self.result is not None else self.prescreened
        if src is None:
            return
        centre = _layers.patch_centres_um(src, [row])[0]
        size = float(src.grid.patch_size_level0) * float(src.mpp)
        self.viewer.camera.center = (float(centre[0]), float(centre[1]))
        self.viewer.camera.zoom = ZOOM_PATCH_PX / size

    # -- export --------------------------------------------------------------------------------

    def _need_result(self) -> Any:
        if self.result is None:
            raise HDMILError("nothing to export yet: run the classification first")
        return self.result

    def _export_dialog(self, key: str, filt: str) -> None:
        r = self.result
        stem = r.slide_name if r is not None else "slide"
        suffix = {"geojson": ".geojson", "csv": ".csv", "png": ".png", "report": ".report.json"}[key]
        path, _ = QFileDialog.getSaveFileName(self, f"Export {key}", f"{stem}{suffix}", filt)
        if not path:
            return
        try:
            out = getattr(self, f"export_{key}")(path)
        except (HDMILError, OSError, ValueError) as exc:
            show_error(f"{path}: export failed: {exc}")
            return
        show_info(f"wrote {out}")

    def export_geojson(self, path: str | os.PathLike) -> Path:
        """QuPath GeoJSON: tissue outline, every tissue patch with ``kept`` and attention per class
        as measurements, the top-k of each class as annotations (level-0 pixel coordinates)."""
        from hdmil.export import write_geojson

        r = self._need_result()
        values: dict[str, np.ndarray] = {"kept": r.kept.astype(np.int64)}
        for c, name in enumerate(r.classes):
            values[f"attention_{name}"] = r.attention[:, c]
        top = {f"attention_{name}": int(self.k_box.value) for name in r.classes}
        return write_geojson(path, r.grid, values, top_k=top)

    def export_csv(self, path: str | os.PathLike) -> Path:
        """One row per tissue patch: x, y, row, col, tissue fraction, LIPN keep per class, kept,
        attention and raw score per class (empty where not pooled / not read)."""
        from hdmil.export import write_csv

        r = self._need_result()
        cols: dict[str, np.ndarray] = {}
        for c, name in enumerate(r.classes):
            cols[f"lipn_keep_{name}"] = r.lipn_mask[:, c].astype(np.int64)
        cols["kept"] = r.kept.astype(np.int64)
        cols["kept_as_neighbour"] = r.neighbour.astype(np.int64)
        for c, name in enumerate(r.classes):
            cols[f"attention_{name}"] = r.attention[:, c]
        for c, name in enumerate(r.classes):
            cols[f"score_{name}"] = r.scores[:, c]
        return write_csv(path, r.grid, cols)

    def export_png(self, path: str | os.PathLike) -> Path:
        """The canvas as it is now (slide + overlays) as a PNG."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.viewer.screenshot(str(path), canvas_only=True, flash=False)
        return path

    def export_report(self, path: str | os.PathLike) -> Path:
        """The pipeline's JSON report (prediction, probabilities, kept ratio, stage seconds)."""
        from hdmil.export import write_json_atomic

        return write_json_atomic(path, self._need_result().to_report())

    # -- SLPD: prototype map and similar slides -----------------------------------------------

    def _current_slide(self) -> tuple[str, float | None]:
        layer = self.slide_box.value
        if layer is None or not (layer.metadata or {}).get("slide_path"):
            raise HDMILError("no slide: open a slide and pick its layer first")
        meta = layer.metadata
        mpp = meta.get("mpp") or (self.mpp_box.value if self.mpp_box.value > 0 else None)
        return str(meta["slide_path"]), mpp

    def _index_dir(self) -> Path:
        value = str(self.index_edit.value or "").strip()
        if value in ("", "."):
            raise HDMILError("choose the index folder (feature files with SLPD prototypes) first")
        return Path(value)

    def show_prototype_map(self) -> Any:
        """Labels layer of the slide's SLPD prototypes, from ``<index>/<slide>.h5``."""
        from hdmil.slpd_index import feature_file_for, prototype_map

        try:
            slide_path, mpp = self._current_slide()
            index = self._index_dir()
            h5 = feature_file_for(slide_path, index)
            if mpp is None:
                raise HDMILError(f"{slide_path}: no mpp: set it in the widget to place the prototype map")
            if h5 is None:
                raise HDMILError(
                    f"{slide_path}: no SLPD outputs in {index} (no {Path(slide_path).stem}.h5 and no "
                    "file for this slide; run `hdmil features` and `hdmil pretrain-slpd` on it)"
                )
            pmap = prototype_map(h5)
            if not (pmap.labels > 0).any():  # too few regions: k-means gave no prototypes
                raise HDMILError(
                    f"{h5}: no SLPD prototypes for this slide (too few regions for them, or "
                    "`hdmil pretrain-slpd` has not run on it)"
                )
            layer = self._put_layer(*_layers.prototype_layer(pmap, float(mpp), slide_path))
        except HDMILError as exc:
            show_error(str(exc))
            return None
        return layer

    def find_similar(self, top: int = 5) -> list[tuple[str, float, Path]]:
        """Fill the list with the slides of the index most like this one (best first)."""
        from hdmil.slpd_index import feature_file_for, similar_slides

        self.similar_list.clear()
        try:
            slide_path, _ = self._current_slide()
            index = self._index_dir()
            # its own feature file when there, so a file without prototypes says so
            h5 = feature_file_for(slide_path, index)
            hits = similar_slides(h5 if h5 is not None else slide_path, index, top=top)
        except HDMILError as exc:
            show_error(str(exc))
            return []
        for sid, score, h5 in hits:
            item = QListWidgetItem(f"{sid}    {score:.3f}")
            item.setData(Qt.UserRole, (sid, str(h5)))
            item.setToolTip(f"{h5}: prototype similarity {score:.4f}; click to open the slide")
            self.similar_list.addItem(item)
        return hits

    def _open_similar(self, item: QListWidgetItem) -> None:
        sid, h5 = item.data(Qt.UserRole)
        path = _find_slide_file(sid, Path(h5), self._current_slide_dir())
        if path is None:
            show_error(f"{h5}: cannot find the slide file of {sid!r} beside it or beside the open slide")
            return
        try:
            self.viewer.open(str(path), plugin="napari-hdmil")
        except Exception as exc:  # noqa: BLE001 - napari wraps reader errors in its own types
            show_error(f"{path}: cannot open: {exc}")

    def _current_slide_dir(self) -> Path | None:
        layer = self.slide_box.value
        p = (layer.metadata or {}).get("slide_path") if layer is not None else None
        return Path(p).parent if p else None


def _find_slide_file(slide_id: str, h5: Path, extra_dir: Path | None) -> Path | None:
    """The slide behind a feature file: its ``slide_path`` attribute, else ``<slide_id>.<ext>``
    beside the feature file, in its parent folder, or beside the open slide."""
    from hdmil.slide import SLIDE_EXTENSIONS

    try:
        import h5py

        with h5py.File(h5, "r") as f:
            p = f.attrs.get("slide_path")
        if isinstance(p, bytes):
            p = p.decode()
        if p and Path(p).is_file():
            return Path(p)
    except (OSError, ImportError):
        pass
    for d in (h5.parent, h5.parent.parent, extra_dir):
        if d is None or not d.is_dir():
            continue
        for ext in SLIDE_EXTENSIONS:
            cand = d / f"{slide_id}{ext}"
            if cand.is_file():
                return cand
    return None


def _timings_html(t: dict[str, float]) -> str:
    cells = "".join(
        f"<tr><td>{title}</td><td align='right'>{t[key]:.2f} s</td></tr>" for key, title in TIMING_ROWS if key in t
    )
    return f"<table cellspacing='2'><tr><th align='left'>stage</th><th>seconds</th></tr>{cells}</table>"
