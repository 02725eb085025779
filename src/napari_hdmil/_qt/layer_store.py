"""The layers the widget put in the viewer, per slide, so a new result replaces only its slide's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["LayerStore", "layer_name", "slide_key"]


def slide_key(slide_path: Any) -> str:
    """The key of a slide's results and layers: its resolved path ("" for none)."""
    return str(Path(str(slide_path)).expanduser().resolve()) if slide_path else ""


def layer_name(base: str, slide_name: str) -> str:
    """A result layer's name: what it shows, then its slide ("attention: tumor · CMU-1")."""
    return f"{base} · {slide_name}" if slide_name else base


class LayerStore:
    """Our layers in ``viewer``, keyed by (slide, what they show): a layer of the same slide and
    kind replaces its predecessor, other slides' layers stay; layers the user deleted are
    forgotten (``forget_removed``). The slide comes from the layer's ``slide_path`` metadata."""

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.layers: dict[tuple[str, str], Any] = {}
        self._hidden: list[Any] = []  # layers ``show_only`` hid, shown again with their slide

    def put(self, data: Any, kwargs: dict[str, Any], kind: str) -> Any:
        """Add a layer (``LayerData`` of ``napari_hdmil._layers``), replacing ours of that slide
        and name; the layer is named for its slide."""
        meta = kwargs.get("metadata") or {}
        key = (slide_key(meta.get("slide_path")), kwargs["name"])
        old = self.layers.pop(key, None)
        if old is not None and old in self.viewer.layers:
            self.viewer.layers.remove(old)
        kwargs = {**kwargs, "name": layer_name(kwargs["name"], meta.get("slide_name") or "")}
        if kind == "image" and meta.get("hdmil_layer") == "heatmap":  # says attention and rank on hover
            from napari_hdmil._layers import HeatmapImage

            layer = self.viewer.add_layer(HeatmapImage(data, **kwargs))
        else:
            layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        if kind == "labels" and meta.get("outline"):
            layer.contour = 1  # the areas' borders only (``_layers.lipn_layer(outline=True)``)
        if kind in ("image", "labels"):
            _shapes_on_top(self.viewer)
        self.layers[key] = layer
        return layer

    def clear(self, slide_path: Any = None) -> None:
        """Remove our layers of ``slide_path`` (all slides' when None) from the viewer."""
        for key in self._keys(slide_path):
            layer = self.layers.pop(key)
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    def of_slide(self, slide_path: Any) -> list[Any]:
        return [self.layers[key] for key in self._keys(slide_path)]

    def of_kind(self, kind: str, slide_path: Any = None) -> list[Any]:
        """Our layers of ``slide_path`` (all when None) whose metadata says
        ``hdmil_layer == kind`` ("heatmap", "topk", ...)."""
        return [self.layers[key] for key in self._keys(slide_path)
                if (self.layers[key].metadata or {}).get("hdmil_layer") == kind]  # fmt: skip

    def rename(self, layer: Any, base: str) -> None:
        """Show ``base`` (named for its slide) on one of our layers, keeping it ours."""
        key = next(k for k, v in self.layers.items() if v is layer)
        layer.name = layer_name(base, (layer.metadata or {}).get("slide_name") or "")
        self.layers[(key[0], base)] = self.layers.pop(key)

    def show_only(self, slide_path: Any) -> None:
        """Hide other slides' layers (remembering which were shown); show again those of
        ``slide_path`` that ``show_only`` hid."""
        want = slide_key(slide_path)
        for (slide, _), layer in self.layers.items():
            if slide != want and layer.visible:
                layer.visible = False
                self._hidden.append(layer)
            elif slide == want and any(layer is h for h in self._hidden):
                layer.visible = True
                self._hidden = [h for h in self._hidden if h is not layer]

    def forget_removed(self) -> None:
        for key in [k for k, layer in self.layers.items() if layer not in self.viewer.layers]:
            del self.layers[key]
        self._hidden = [h for h in self._hidden if h in self.viewer.layers]

    def _keys(self, slide_path: Any) -> list[tuple[str, str]]:
        want = None if slide_path is None else slide_key(slide_path)
        return [k for k in self.layers if want is None or k[0] == want]


def _shapes_on_top(viewer: Any) -> None:
    """Annotations and drawn ROIs (Shapes layers) stay drawn above the heatmaps added after them."""
    from napari.layers import Image, Labels, Shapes

    layers = list(viewer.layers)
    rasters = [i for i, layer in enumerate(layers) if isinstance(layer, (Image, Labels))]
    top = max(rasters, default=-1)
    for layer in [layer for i, layer in enumerate(layers) if isinstance(layer, Shapes) and i < top]:
        viewer.layers.move(viewer.layers.index(layer), len(viewer.layers))
