"""The compare and audit panel (its own dock widget): two runs of the chosen slide side by side,
and an audit of what LIPN discarded.

Compare runs ``hdmil.compare.compare_slide`` (A = HDMIL of model A; B = HDMIL of model B, or
HDMIL† of A when B is empty) in a thread worker and shows the two probability rows with their
seconds, one layer per class of the attention difference B − A (µm, a diverging colormap
centred on 0) and the patches read by one run only (points: A only orange, B only cyan).
Audit runs ``hdmil.audit.audit_result`` on run A (or on the HDMIL widget's result of the slide
when there is no comparison yet) and marks the audited patches with magenta crosses, distinct
from the top-k squares; the label says the share of attention that fell in them and whether the
prediction changes. ``hdmil compare`` and ``hdmil predict --audit N`` give the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, SpinBox
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from hdmil.errors import HDMILError
from napari_hdmil._layers import UNITS, grid_placement, layer_metadata, patch_centres_um

__all__ = ["ComparePanel", "audit_layer", "difference_layers", "read_only_layer"]

ONLY_COLORS = {"A only": (1.0, 0.6, 0.1, 1.0), "B only": (0.1, 0.85, 0.95, 1.0)}
AUDIT_COLOR = (0.95, 0.2, 0.85, 1.0)


def difference_layers(cmp: Any) -> list[tuple[Any, dict[str, Any], str]]:
    """One image layer per class: attention B − A on A's grid, one pixel per patch, in µm."""
    scale, translate = grid_placement(cmp.a.grid, cmp.a.mpp)
    out = []
    for c, (name, raster) in enumerate(zip(cmp.classes, cmp.rasters()["difference"])):
        top = float(np.nanmax(np.abs(raster))) if np.isfinite(raster).any() else 0.0
        meta = {**layer_metadata(cmp.a, name, kind="compare"), "runs": [cmp.a.method, cmp.b.method]}
        out.append((raster, {"name": f"attention B − A: {name}", "scale": scale, "translate": translate,
                             "units": UNITS, "colormap": "bwr", "contrast_limits": (-top or -1e-6, top or 1e-6),
                             "opacity": 0.75, "metadata": meta, "visible": c == len(cmp.classes) - 1}, "image"))
    return out


def read_only_layer(cmp: Any) -> tuple[Any, dict[str, Any], str]:
    """Points at the centres of the patches read at 20x by one run only."""
    rows = np.concatenate([cmp.rows_a[cmp.only_a], cmp.rows_a[cmp.only_b]])
    which = ["A only"] * int(cmp.only_a.sum()) + ["B only"] * int(cmp.only_b.sum())
    meta = layer_metadata(cmp.a, kind="read_only")
    return patch_centres_um(cmp.a, rows), {
        "name": "read by one run only", "units": UNITS, "symbol": "disc", "size": meta["patch_size_um"] * 0.35,
        "face_color": np.array([ONLY_COLORS[w] for w in which]).reshape(-1, 4), "border_width": 0,
        "features": {"read_by": which}, "metadata": meta,
    }, "points"


def audit_layer(result: Any, audit: Any) -> tuple[Any, dict[str, Any], str]:
    """Magenta crosses on the audited (discarded, then read) patches, with their attention."""
    meta = {**layer_metadata(result, kind="audit"), "audit": audit.to_report()}
    features = {f"attention_{c}": np.nan_to_num(audit.attention[audit.rows, i], nan=0.0)
                for i, c in enumerate(audit.classes)}
    return patch_centres_um(result, audit.rows), {
        "name": "audited (LIPN discarded)", "units": UNITS, "symbol": "cross", "size": meta["patch_size_um"] * 0.6,
        "face_color": np.tile(AUDIT_COLOR, (len(audit.rows), 1)), "border_width": 0, "features": features,
        "metadata": meta,
    }, "points"


def _row(r: Any, label: str) -> str:
    probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(r.classes, r.probabilities))
    return f"{label}: {r.method} · {r.model_name}: {r.prediction} ({probs}); read {r.n_read} in {r.timings.get('total', 0):.1f} s"


class ComparePanel(QWidget):
    """Compare two runs of a slide; audit what LIPN discarded.

    Public for scripts and tests: ``compare(sync=False)`` (returns the worker, or the
    ``Comparison`` when ``sync``), ``audit(sync=False)``, ``show_comparison(cmp)``,
    ``show_audit(result, audit)``; ``comparison``, ``audit_result``; ``layers`` (the ones added).
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.comparison: Any = None
        self.audit_result: Any = None
        self.layers: dict[str, Any] = {}
        self.worker: Any = None
        self._models: dict[str, Any] = {}
        self._encoder: tuple[Any, Any] = (None, None)
        self.slide_box = ComboBox(label="slide", choices=self._slides, nullable=False)
        self.model_a = FileEdit(label="model A", mode="r", filter="Checkpoints (*.safetensors)")
        self.model_b = FileEdit(label="model B", mode="r", filter="Checkpoints (*.safetensors)")
        self.model_b.tooltip = "empty: B is HDMIL† of model A (every tissue patch read)"
        self.n_box = SpinBox(label="audit patches", min=0, max=100_000, value=0)
        self.n_box.tooltip = "LIPN-discarded patches to read: 0 = all, else a seeded tissue-weighted sample"
        self.form = Container(widgets=[self.slide_box, self.model_a, self.model_b, self.n_box])
        self.compare_button, self.audit_button = QPushButton("Compare"), QPushButton("Audit discarded")
        self.compare_button.clicked.connect(lambda: self.compare())
        self.audit_button.clicked.connect(lambda: self.audit())
        self.a_label, self.b_label, self.audit_label = QLabel(""), QLabel(""), QLabel("")
        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        row = QHBoxLayout()
        row.addWidget(self.compare_button)
        row.addWidget(self.audit_button)
        layout.addLayout(row)
        for label in (self.a_label, self.b_label, self.audit_label):
            label.setWordWrap(True)
            layout.addWidget(label)
        layout.addStretch(1)
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            ev.connect(lambda *_: self.slide_box.reset_choices())

    def _slides(self, _w: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers
                if (layer.metadata or {}).get("slide_path") and not (layer.metadata or {}).get("hdmil_layer")]

    def _slide(self) -> tuple[str, float | None]:
        layer = self.slide_box.value
        if layer is None:
            raise HDMILError("no slide: open a slide and choose it in the compare panel")
        return str(layer.metadata["slide_path"]), layer.metadata.get("mpp") or None

    def _model(self, edit: Any) -> Any:
        from hdmil.checkpoint import default_model_path, load_model

        path = str(edit.value or "").strip()
        path = str(default_model_path()) if path in ("", ".") else path
        if path not in self._models:  # A and B stay loaded between presses
            self._models = {**dict(list(self._models.items())[-1:]), path: load_model(path)}
        return self._models[path]

    def _start(self, work: Any, done: Any, sync: bool) -> Any:
        if sync:
            return done(work())
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return None
        self.worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        self.worker.returned.connect(done)
        self.worker.errored.connect(lambda exc: show_error(f"HDMIL: {exc}"))
        self.worker.finished.connect(lambda: setattr(self, "worker", None))
        self.worker.start()
        return self.worker

    def compare(self, sync: bool = False) -> Any:
        """Run A and B on the chosen slide (``hdmil.compare.compare_slide``) and show them."""
        from hdmil.compare import compare_slide

        try:
            path, mpp = self._slide()
            a = self._model(self.model_a)
            b = self._model(self.model_b) if str(self.model_b.value or "").strip() not in ("", ".") else None
        except HDMILError as exc:
            show_error(str(exc))
            return None
        self.a_label.setText("comparing …")
        return self._start(lambda: compare_slide(path, a, b, mpp=mpp), self.show_comparison, sync)

    def show_comparison(self, cmp: Any) -> Any:
        self.comparison = cmp
        self.a_label.setText(_row(cmp.a, "A"))
        self.b_label.setText(_row(cmp.b, "B") + f"; read by one run only: A {int(cmp.only_a.sum())}, "
                             f"B {int(cmp.only_b.sum())}")
        for data, kwargs, kind in [*difference_layers(cmp), read_only_layer(cmp)]:
            self._put(data, kwargs, kind)
        return cmp

    def _target(self) -> Any:
        """The HDMIL result to audit: run A of the comparison, else the HDMIL widget's result."""
        if self.comparison is not None and self.comparison.a.use_lipn:
            return self.comparison.a
        from napari_hdmil._qt.review import docked_widget

        w = docked_widget(self.viewer)
        if w is not None and w.result is not None:
            return w.result
        raise HDMILError("nothing to audit: compare first (run A is HDMIL), or classify with LIPN in the HDMIL widget")

    def audit(self, sync: bool = False) -> Any:
        """Read what LIPN discarded (all, or the box's sample, seed 0) and pool it with the kept."""
        from hdmil.audit import audit_result
        from hdmil.pipeline import encoder_for

        try:
            result, model = self._target(), self._model(self.model_a)
        except HDMILError as exc:
            show_error(str(exc))
            return None
        n = int(self.n_box.value) or None
        self.audit_label.setText("auditing …")
        def work() -> Any:
            if self._encoder[0] is not model:  # one encoder kept, for the last model audited
                self._encoder = (model, encoder_for(model, None))
            return audit_result(result, model, self._encoder[1], n=n, seed=0)

        return self._start(work, lambda audit: self.show_audit(result, audit), sync)

    def show_audit(self, result: Any, audit: Any) -> Any:
        self.audit_result = audit
        share = ", ".join(f"{c} {s:.1%}" for c, s in zip(audit.classes, audit.share))
        change = f"changes to {audit.prediction}" if audit.changed else "stays " + audit.prediction
        self.audit_label.setText(f"audited {len(audit.rows)} of {audit.n_discarded} discarded patches: "
                                 f"attention in them {share}; the prediction {change}")
        self._put(*audit_layer(result, audit))
        return audit

    def _put(self, data: Any, kwargs: dict[str, Any], kind: str) -> None:
        old = self.layers.pop(kwargs["name"], None)
        if old is not None and old in self.viewer.layers:
            self.viewer.layers.remove(old)
        self.layers[kwargs["name"]] = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
