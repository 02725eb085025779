"""Inputs and run: the slide layer, checkpoint, mpp, LIPN on/off, top-k, the ROI and the exclusion
(Shapes or imported annotation layers) and the run buttons."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, SpinBox
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QVBoxLayout, QWidget

from hdmil.errors import CheckpointError, HDMILError
from hdmil.export import DEFAULT_TOP_K
from hdmil.slide import MPP_RANGE  # 0 means "from the file"; above the range open_slide refuses
from napari_hdmil._messages import Job

__all__ = ["InputsPanel", "check_unchanged", "file_mpp"]


class InputsPanel(QWidget):
    """Which slide and model to run, and the buttons that run them.

    The slide list holds the image layers our reader opened (or any layer with a ``slide_path``);
    the mpp box is needed only when the slide file has none.
    """

    def __init__(self, viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        from hdmil.checkpoint import default_model_path

        self.viewer = viewer
        self._mpp_slide: Any = None  # the slide layer the mpp box was last filled for
        self.slide_box = ComboBox(label="slide", choices=self.slide_choices, nullable=False)
        default = default_model_path()
        self.model_edit = FileEdit(
            label="model", mode="r", filter="Checkpoints (*.safetensors *.pt *.pth)",
            value=str(default) if default.is_file() else "",
        )
        self.model_edit.tooltip = f"checkpoint file; default: the bundled demo model ({default})"
        self.mpp_box = FloatSpinBox(label="mpp (µm/px)", min=0.0, max=MPP_RANGE[1], step=0.001, value=0.0)
        self.mpp_box.tooltip = "level-0 µm per pixel; needed only when the slide file has none"
        self.lipn_box = CheckBox(text="use LIPN (off: HDMIL†)", value=True)
        self.lipn_box.tooltip = "hierarchical: LIPN picks the patches to read at 20x; off = HDMIL†, read all patches"
        self.k_box = SpinBox(label="top-k", min=1, max=64, value=DEFAULT_TOP_K)
        self.roi_box = ComboBox(label="ROI", choices=self.roi_choices, nullable=False)
        self.roi_box.tooltip = ("analyse only the tissue patches inside this Shapes layer's rectangles, "
                                "polygons and ellipses (or an imported annotation layer); none: all tissue")
        self.exclude_box = ComboBox(label="exclude", choices=self.roi_choices, nullable=False)
        self.exclude_box.tooltip = ("leave out the tissue patches inside this Shapes or annotation layer "
                                    "(artefacts: folds, pen, bubbles); none: leave nothing out")
        # one row for both, so the fixed inputs stay as tall as they were
        regions = Container(widgets=[self.roi_box, self.exclude_box], layout="horizontal", labels=True,
                            label="regions")  # fmt: skip
        regions.margins = (0, 0, 0, 0)
        self.form = Container(widgets=[self.slide_box, self.model_edit, self.mpp_box, self.lipn_box, self.k_box,
                                       regions])  # fmt: skip
        self.slide_box.changed.connect(self.on_slide_changed)

        self.prescreen_button = _button("Pre-screen", "tissue + LIPN only: which patches would be read at 20x")
        self.classify_button = _button("Classify", "DMIN over the patches LIPN keeps (pre-screen first)")
        self.run_all_button = _button("Run all", "tissue, LIPN, features of the kept patches and DMIN in one go")
        self.cancel_button = _button("Cancel", "stop after the current batch")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.form.native)
        row = QHBoxLayout()
        for b in (self.prescreen_button, self.classify_button, self.run_all_button, self.cancel_button):
            row.addWidget(b)
        layout.addLayout(row)

    # -- the slide ------------------------------------------------------------------------------

    def slide_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        """(name, layer) of the slide layers in the viewer (not the layers HDMIL drew)."""
        from napari.layers import Image

        out = []
        for layer in self.viewer.layers:
            meta = layer.metadata or {}
            if not isinstance(layer, Image) or meta.get("hdmil_layer"):
                continue
            if meta.get("hdmil_slide") or (meta.get("slide_path") and meta.get("hdmil_slide") is None):
                out.append((layer.name, layer))
        return out

    def roi_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        """("none", None), then (name, layer) of the viewer's Shapes layers."""
        from napari.layers import Shapes

        return [("none", None)] + [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Shapes)]

    def refresh(self, added: Any = None) -> None:
        """The viewer's layers changed: list the slides and ROI layers again; a slide just opened
        (``added``) becomes the chosen one."""
        self.slide_box.reset_choices()
        self.roi_box.reset_choices()
        self.exclude_box.reset_choices()
        for _, layer in self.slide_choices():
            _remember_file(layer)
        if added is not None and any(layer is added for _, layer in self.slide_choices()):
            self.slide_box.value = added  # emits changed when it differs
            if not (added.metadata or {}).get("mpp"):
                from napari.utils.notifications import show_warning

                show_warning(f"{added.name}: the slide file has no microns-per-pixel, so it is shown in "
                             "pixels; type its mpp (µm/px) in the HDMIL widget to run it")
        self.on_slide_changed()

    def on_slide_changed(self, *_: Any) -> None:
        """The mpp box follows the slide: the file's mpp (locked), else the one the user gave
        this slide (editable: another mpp may be tried), else empty and required."""
        layer = self.slide_box.value
        meta = (layer.metadata or {}) if layer is not None else {}
        needs = layer is not None and not file_mpp(meta)
        self.mpp_box.enabled = needs
        self.mpp_box.label = "mpp (µm/px, required)" if needs else "mpp (µm/px)"
        if needs and layer is self._mpp_slide:
            return  # the same slide (other layers changed): keep what the user is typing
        self._mpp_slide = layer
        if meta.get("mpp"):
            self.mpp_box.value = float(meta["mpp"])
        elif needs:
            self.mpp_box.value = 0.0  # not another slide's

    def slide_layer_for(self, slide_path: str | None) -> Any:
        """The slide layer showing ``slide_path``, or None."""
        from napari_hdmil._qt.layer_store import slide_key

        for _, layer in self.slide_choices():
            if slide_key((layer.metadata or {}).get("slide_path")) == slide_key(slide_path):
                return layer
        return None

    def align_slide_layer(self, res: Any) -> None:
        """A slide without mpp in its file is shown in pixels; once the user gave one (``res.mpp``
        of a run on it), show it in µm like the result's layers (again when they change it)."""
        from napari_hdmil._layers import UNITS

        layer = self.slide_layer_for(res.slide_path)
        meta = (layer.metadata or {}) if layer is not None else {}
        if layer is not None and not file_mpp(meta) and res.mpp and meta.get("mpp") != float(res.mpp):
            layer.scale = (res.mpp, res.mpp)
            layer.units = UNITS
            layer.metadata = {**meta, "mpp": float(res.mpp), "mpp_from": "user"}

    def current_slide(self) -> tuple[str, float | None]:
        """(slide path, mpp: the file's, else the box's, else None) of the chosen slide."""
        layer = self.slide_box.value
        if layer is None or not (layer.metadata or {}).get("slide_path"):
            raise HDMILError("no slide: open a slide and pick its layer first")
        meta = layer.metadata
        mpp = file_mpp(meta) or (self.mpp_box.value if self.mpp_box.value > 0 else None)
        return str(meta["slide_path"]), mpp

    def current_slide_path(self) -> str | None:
        layer = self.slide_box.value
        return (layer.metadata or {}).get("slide_path") if layer is not None else None

    def current_slide_dir(self) -> Path | None:
        layer = self.slide_box.value
        p = (layer.metadata or {}).get("slide_path") if layer is not None else None
        return Path(p).parent if p else None

    # -- the job --------------------------------------------------------------------------------

    def model_path(self) -> Path:
        """The chosen checkpoint; the bundled demo model when none is chosen."""
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

    def job(self, kind: str, batch_size: int, device: Any = None) -> Job:
        """A ``Job`` of ``kind`` from the inputs as they are now (HDMILError when they are wrong)."""
        layer = self.slide_box.value
        if layer is None:
            raise HDMILError("no slide: open a slide (File > Open, or drag it in) and pick its layer")
        meta = layer.metadata or {}
        path = meta.get("slide_path")
        if not path:
            raise HDMILError(f"layer {layer.name!r}: no slide file behind it (metadata has no slide_path)")
        check_unchanged(meta)
        mpp = None
        if not file_mpp(meta) and self.mpp_box.value > 0:
            mpp = float(self.mpp_box.value)  # the file has none: the pipeline needs it, every run
        return Job(kind, str(path), mpp, self.model_path(), bool(self.lipn_box.value), int(batch_size),
                   int(self.k_box.value), device, roi=self.roi(layer), exclude=self.exclude(layer))  # fmt: skip

    def roi(self, slide_layer: Any) -> Any:
        """The chosen ROI layer as ``hdmil.annotations.Annotations`` in level-0 px of the slide
        (None: no ROI). An imported annotation layer left as it was gives its annotations
        (holes and exclusions kept); any other Shapes layer its shapes, mapped from world µm
        through the slide layer's scale (what the user sees them drawn over)."""
        return self._regions(self.roi_box.value, slide_layer, "ROI")

    def exclude(self, slide_layer: Any) -> Any:
        """The chosen exclusion layer as ``Annotations`` in level-0 px (None: nothing left out);
        every shape of it is left out (``hdmil.annotations.restrict_grid``), as ``roi`` maps it."""
        return self._regions(self.exclude_box.value, slide_layer, "exclusion")

    def _regions(self, layer: Any, slide_layer: Any, what: str) -> Any:
        from hdmil.annotations import shapes_to_annotations
        from napari_hdmil._layers import shapes_digest

        if layer is None:
            return None
        if layer not in self.viewer.layers:
            raise HDMILError(f"{what} layer {layer.name!r} is no longer in the viewer; choose another {what}")
        meta = layer.metadata or {}
        digest = shapes_digest(layer.data)
        if meta.get("annotations") is not None and meta.get("shapes_digest") == digest:
            return meta["annotations"]
        px_um = float(slide_layer.scale[-1])  # world units per level-0 px: mpp, or 1 when shown in px
        ann = shapes_to_annotations(layer.data, layer.shape_type, px_um, layer.scale, layer.translate)
        return dataclasses.replace(ann, source=f"Shapes layer {layer.name!r}", sha256=digest)

    def set_running(self, running: bool, can_classify: bool) -> None:
        for b in (self.prescreen_button, self.run_all_button):
            b.setEnabled(not running)
        self.classify_button.setEnabled(not running and can_classify)
        self.cancel_button.setEnabled(running)
        self.form.enabled = not running


def file_mpp(meta: dict[str, Any]) -> float | None:
    """The mpp the slide file has (a slide layer's metadata), None when the user gave it."""
    mpp = meta.get("mpp")
    return float(mpp) if mpp and meta.get("mpp_from") != "user" else None


def _file_stat(path: str) -> list[int] | None:
    """[size, mtime_ns] of the file at ``path``; None when it is not there."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def _remember_file(layer: Any) -> None:
    """Note the slide file's size and mtime on its layer the first time the widget sees it."""
    meta = layer.metadata or {}
    if meta.get("slide_path") and "file_stat" not in meta:
        layer.metadata = {**meta, "file_stat": _file_stat(str(meta["slide_path"]))}


def check_unchanged(meta: dict[str, Any]) -> None:
    """HDMILError when the slide file behind a layer was removed or rewritten since it was
    opened: the layer shows the old pixels, a run would classify the new ones."""
    path, seen = str(meta.get("slide_path")), meta.get("file_stat")
    if seen is None:
        return
    now = _file_stat(path)
    if now is None:
        raise HDMILError(f"{path}: the slide file is gone since it was opened (moved or deleted)")
    if list(now) != list(seen):
        what = "size" if now[0] != seen[0] else "modification time"
        raise HDMILError(f"{path}: the slide file changed on disk since it was opened (its {what} differs); "
                         "close its layer and open the file again to classify it")


def _button(text: str, tip: str) -> QPushButton:
    b = QPushButton(text)
    b.setToolTip(tip)
    return b
