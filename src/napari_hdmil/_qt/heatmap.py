"""Heatmap: which class to show, its scale, threshold, colormap and opacity.

The controls change the result's layers in place (same layers, new data or style), so the user's
own changes to other layers and the layer order stay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from magicgui.widgets import ComboBox, Container, FloatSlider
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QGroupBox, QVBoxLayout, QWidget

from napari_hdmil import _layers
from napari_hdmil._qt.layer_store import LayerStore

__all__ = ["COLORMAPS", "HeatmapPanel"]

COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "jet", "hot")
NORM_LABELS = {"percentile": "rank (this slide)", "raw": "min-max (this slide)",
               "relative": "× pooled (all slides)", "logit": "logit (all slides)"}  # fmt: skip


class HeatmapPanel(QGroupBox):
    """Steers the heatmap and top-k layers of ``result`` (set by ``set_result``).

    ``class_changed(index)`` is emitted after the shown class changed and its layers followed.
    ``k()`` gives the top-k to draw.
    """

    class_changed = Signal(int)

    def __init__(self, store: LayerStore, k: Callable[[], int], parent: QWidget | None = None):
        super().__init__("heatmap", parent)
        self._store = store
        self._k = k
        self.result: Any = None
        self._follows_zoom = False
        self.class_box = ComboBox(label="class", choices=[])
        self.norm_box = ComboBox(label="scale", choices=[(NORM_LABELS[m], m) for m in _layers.NORMALISATIONS],
                                 value="percentile")  # fmt: skip
        self.norm_box.tooltip = "\n".join(f"{NORM_LABELS[m]}: {t}" for m, t in _layers.NORMALISATION_TITLES.items())
        self.threshold_slider = FloatSlider(label="threshold", min=0.0, max=1.0, step=0.01, value=0.0)
        self.threshold_slider.tooltip = "hide the patches below this share of the colour scale (transparent)"
        self.colormap_box = ComboBox(label="colormap", choices=list(COLORMAPS), value="inferno")
        self.opacity_slider = FloatSlider(label="opacity", min=0.0, max=1.0, step=0.05, value=0.6)
        self.controls = Container(
            widgets=[self.class_box, self.norm_box, self.threshold_slider, self.colormap_box, self.opacity_slider]
        )
        self.class_box.changed.connect(self._on_class_changed)
        for w in (self.norm_box, self.threshold_slider):
            w.changed.connect(self._update_data)
        for w in (self.colormap_box, self.opacity_slider):
            w.changed.connect(self._update_style)
        QVBoxLayout(self).addWidget(self.controls.native)

    def set_result(self, result: Any) -> list[_layers.LayerData]:
        """Show ``result``'s predicted class; returns its layers drawn with the current settings
        (put them in the store, then call ``attach``)."""
        self.show(result, result.prediction)
        return _layers.result_layers(
            result, self.norm_box.value, float(self.threshold_slider.value), self.colormap_box.value,
            float(self.opacity_slider.value), int(self._k()), result.prediction_index,
        )

    def attach(self) -> None:
        """The result's heatmap layers in the store say attention, rank and class on hover; the
        shown one has a colorbar."""
        for layer in self.heatmap_layers().values():
            layer.hover = _layers.heatmap_hover(self.result, int(layer.metadata["class_index"]))
            layer.colorbar.visible = layer.visible
        camera = self._store.viewer.camera
        if not self._follows_zoom:  # rank labels readable at every zoom
            camera.events.zoom.connect(self.fit_rank_labels)
            self._follows_zoom = True
        self.fit_rank_labels()

    def fit_rank_labels(self, *_: Any) -> None:
        """Size the top-k / bottom-k rank labels of every slide for the camera's zoom."""
        zoom = float(self._store.viewer.camera.zoom)
        for kind in ("topk", "bottomk"):
            for layer in self._store.of_kind(kind):
                size, shown = _layers.rank_text_size(layer.metadata["patch_size_um"], zoom)
                layer.text.size, layer.text.visible = size, shown

    def show(self, result: Any, class_name: str | None = None) -> None:
        """Steer ``result``'s layers (already in the store); the class box shows ``class_name``,
        else the class whose heatmap is visible, else the predicted one."""
        self.result = result
        if class_name is None:
            shown = [c for c, layer in self.heatmap_layers().items() if layer.visible]
            class_name = shown[0] if shown else result.prediction
        with self.class_box.changed.blocked():  # the layers are built for this class
            self.class_box.choices = list(result.classes)
            self.class_box.value = class_name

    def clear(self) -> None:
        self.result = None

    def shown_class(self) -> int:
        return list(self.result.classes).index(self.class_box.value)

    def heatmap_layers(self) -> dict[str, Any]:
        """class name -> its heatmap layer (of the shown result's slide)."""
        if self.result is None:
            return {}
        return {layer.metadata["class"]: layer for layer in self._store.of_kind("heatmap", self.result.slide_path)}

    def _on_class_changed(self, *_: Any) -> None:
        if self.result is None or self.class_box.value is None:
            return
        for name, layer in self.heatmap_layers().items():
            layer.visible = layer.colorbar.visible = name == self.class_box.value
        c = self.shown_class()
        for lowest in (False, True):
            self._redraw_points(c, lowest)
        self.class_changed.emit(c)

    def _redraw_points(self, c: int, lowest: bool) -> None:
        """The top-k (or bottom-k) points layer, in place, for class ``c``."""
        layers = self._store.of_kind("bottomk" if lowest else "topk", self.result.slide_path)
        if not layers:
            return
        layer = layers[0]
        data, kwargs, _ = _layers.topk_layer(self.result, c, int(self._k()), lowest=lowest)
        layer.data = data  # in place: same layer, new patches
        layer.features = kwargs["features"]
        layer.metadata = kwargs["metadata"]
        self._store.rename(layer, kwargs["name"])

    def _update_data(self, *_: Any) -> None:
        if self.result is None:
            return
        mode, thr = self.norm_box.value, float(self.threshold_slider.value)
        for layer in self.heatmap_layers().values():
            c = int(layer.metadata["class_index"])
            layer.data = _layers.heatmap_data(self.result, c, mode, thr)
            layer.contrast_limits = _layers.heatmap_limits(self.result, c, mode)
            layer.metadata = {**layer.metadata, "normalisation": mode, "threshold": thr}

    def _update_style(self, *_: Any) -> None:
        name = self.colormap_box.value
        for layer in self.heatmap_layers().values():
            layer.colormap = _layers.heatmap_colormap(name)
            layer.opacity = float(self.opacity_slider.value)
            layer.metadata = {**layer.metadata, "colormap": name}
