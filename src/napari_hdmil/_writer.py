"""napari writer: a heatmap (or any single-scale image layer) as a TIFF that keeps its µm scale."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import HDMILError
from hdmil.files import atomic_write, dumps, to_jsonable

# A writer refuses gigapixel pyramids: saving a slide is not what this writer is for.
_MAX_BYTES = 512 * 2**20


def write_heatmap(path: str, data: Any, attributes: dict) -> list[str]:
    """Write one image layer to ``path`` (.tif/.tiff) with its scale (µm/px) as TIFF resolution.

    The layer's ``translate`` (µm), ``name`` and scalar metadata go to the TIFF description as JSON,
    so the heatmap can be placed back over its slide.
    """
    import tifffile

    # napari hands a multiscale layer over as MultiScaleData, whose array is one level: never
    # write a slide's overview as if it were the slide
    if isinstance(data, (list, tuple)) or attributes.get("multiscale"):
        if len(data) != 1 or (attributes.get("metadata") or {}).get("hdmil_slide"):
            raise HDMILError(  # not ValueError: napari would swallow it into "not a valid writer"
                f"{path}: {attributes.get('name', 'the layer')!r} is a whole slide ({len(data)} "
                "multiscale levels); the HDMIL writer saves heatmaps only (the slide file is the "
                "full-resolution copy)")
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
        "hdmil": _json_metadata(attributes.get("metadata") or {}),
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
