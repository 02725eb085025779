"""The layers the widget put in the viewer, by name, so a new result replaces them."""

from __future__ import annotations

from typing import Any

__all__ = ["LayerStore"]


class LayerStore:
    """Our layers in ``viewer``: a layer of the same name replaces its predecessor; layers the
    user deleted are forgotten (``forget_removed``)."""

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.layers: dict[str, Any] = {}

    def put(self, data: Any, kwargs: dict[str, Any], kind: str) -> Any:
        """Add a layer (``LayerData`` of ``napari_hdmil._layers``), replacing ours of that name."""
        name = kwargs["name"]
        old = self.layers.pop(name, None)
        if old is not None and old in self.viewer.layers:
            self.viewer.layers.remove(old)
        layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        self.layers[name] = layer
        return layer

    def clear(self) -> None:
        """Remove all our layers from the viewer."""
        for name in list(self.layers):
            layer = self.layers.pop(name)
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    def of_kind(self, kind: str) -> list[Any]:
        """Our layers whose metadata says ``hdmil_layer == kind`` ("heatmap", "topk", ...)."""
        return [layer for layer in self.layers.values() if (layer.metadata or {}).get("hdmil_layer") == kind]

    def rename(self, layer: Any, name: str) -> None:
        """Rename one of our layers, keeping it ours."""
        old = layer.name
        layer.name = name
        self.layers[layer.name] = self.layers.pop(old)

    def forget_removed(self) -> None:
        for name in [n for n, layer in self.layers.items() if layer not in self.viewer.layers]:
            del self.layers[name]
