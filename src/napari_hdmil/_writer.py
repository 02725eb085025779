"""napari writer: a heatmap as a TIFF that keeps its µm scale; napari's default for heatmaps.

npe2 offers the writers of an extension in the order their plugins were registered, so napari's
own image writer (which drops the scale) would come first in the save dialog and win
``viewer.layers.save("heat.tif")``. ``prefer_heatmap_writer`` puts ours first; npe2 runs it when
it activates the plugin (the first time napari uses one of its commands: a reader, the widget, the
sample), so before any heatmap of ours exists. An image layer that is not ours is handed on
unchanged to napari's own writer, so other layers save exactly as before.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import HDMILError
from hdmil.files import atomic_write, dumps, to_jsonable

# A writer refuses gigapixel pyramids: saving a slide is not what this writer is for.
_MAX_BYTES = 512 * 2**20
PLUGIN = "napari-hdmil"


def activate(ctx: Any = None) -> None:
    """npe2's ``on_activate`` hook: our heatmap writer first (see the module docstring)."""
    prefer_heatmap_writer()


def prefer_heatmap_writer() -> bool:
    """Put napari-hdmil's writer before every other plugin's in npe2's writer index (napari's save
    dialog lists it first, so it is the default; ties on ``.tif`` go to it). Idempotent. False
    when npe2 is missing or its index is not laid out as in npe2 0.10 (nothing changed then:
    the writer is still offered, after napari's)."""
    try:
        from npe2 import PluginManager

        entries = PluginManager.instance()._contrib._writers
        ours = [e for e in entries if e[3].plugin_name == PLUGIN]
        rest = [e for e in entries if e[3].plugin_name != PLUGIN]
    except (ImportError, AttributeError, IndexError, TypeError):
        return False
    if not ours:
        return False
    entries[:] = ours + rest  # in place: the list npe2 iterates
    return True


def _napari_writer(path: str, data: Any, attributes: dict) -> list[str]:
    """An image layer that is not ours, written by napari's built-in image writer."""
    from napari_builtins.io import napari_write_image

    out = napari_write_image(path, data, attributes)
    return [out] if out else []


def write_heatmap(path: str, data: Any, attributes: dict) -> list[str]:
    """Write a heatmap layer to ``path`` (.tif/.tiff) with its scale (µm/px) as TIFF resolution;
    refuse a slide layer (HDMILError saying why); hand any other image layer to napari's writer.

    The layer's ``translate`` (µm), ``name`` and scalar metadata go to the TIFF description as JSON,
    so the heatmap can be placed back over its slide.
    """
    import tifffile

    meta = attributes.get("metadata") or {}
    if not (meta.get("hdmil_layer") or meta.get("hdmil_slide")):
        return _napari_writer(path, data, attributes)  # not ours: as napari would save it
    name = attributes.get("name", "the layer")
    multiscale = isinstance(data, (list, tuple)) or bool(attributes.get("multiscale"))
    # never write a slide's overview (napari hands the writer one level) as if it were the slide
    if meta.get("hdmil_slide") or (multiscale and len(data) != 1):
        levels = f"{len(data)} multiscale levels" if multiscale else "one level"
        raise HDMILError(  # not ValueError: napari would swallow it into "not a valid writer"
            f"{path}: {name!r} is a whole slide ({levels}); the HDMIL writer saves heatmaps only "
            f"(the slide file{' ' + str(meta['slide_path']) if meta.get('slide_path') else ''} is its "
            "full-resolution copy)")
    if multiscale:
        data = data[0]
    array = np.asarray(data)
    if array.nbytes > _MAX_BYTES:
        raise HDMILError(f"{path}: layer is {array.nbytes / 2**20:.0f} MB, too large for a heatmap TIFF")
    scale = [float(s) for s in attributes.get("scale", (1.0,) * array.ndim)]
    translate = [float(t) for t in attributes.get("translate", (0.0,) * array.ndim)]
    sy, sx = scale[-2], scale[-1]
    description = {
        "name": attributes.get("name", Path(path).stem),
        "unit": "um",
        "scale_um": scale,
        "translate_um": translate,
        "hdmil": _json_metadata(meta),
        **_display(attributes),
    }
    buffer = io.BytesIO()  # heatmaps are small: encode in memory, then write atomically
    tifffile.imwrite(
        buffer,
        array,
        resolution=(1e4 / sx, 1e4 / sy),
        resolutionunit="CENTIMETER",
        description=dumps(description),
        metadata=None,
    )
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getvalue())
    return [path]


def _display(attributes: dict) -> dict[str, Any]:
    """How the layer was drawn (contrast limits, opacity, blending, colormap name), so our reader
    draws the heatmap again with the same colours."""
    out: dict[str, Any] = {}
    if attributes.get("contrast_limits") is not None:
        out["contrast_limits"] = [float(v) for v in attributes["contrast_limits"]]
    for key in ("opacity", "blending"):
        if attributes.get(key) is not None:
            out[key] = to_jsonable(attributes[key])
    cmap = attributes.get("colormap")
    name = cmap.get("name") if isinstance(cmap, dict) else getattr(cmap, "name", cmap)
    if isinstance(name, str):
        out["colormap"] = name
    return out


def _json_metadata(metadata: dict) -> dict[str, Any]:
    """The layer metadata JSON can carry (numpy values as plain numbers); the rest left out."""
    out = {}
    for key, value in metadata.items():
        try:
            out[str(key)] = to_jsonable(value)
        except TypeError:
            continue  # e.g. a napari object in the metadata: not the heatmap's business
    return out
