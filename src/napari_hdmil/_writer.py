"""napari writer: a heatmap (or any single-scale image layer) as a TIFF that keeps its µm scale."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.files import atomic_write, dumps, to_jsonable

# A writer refuses gigapixel pyramids: saving a slide is not what this writer is for.
_MAX_BYTES = 512 * 2**20


def write_heatmap(path: str, data: Any, attributes: dict) -> list[str]:
    """Write one image layer to ``path`` (.tif/.tiff) with its scale (µm/px) as TIFF resolution.

    The layer's ``translate`` (µm), ``name`` and scalar metadata go to the TIFF description as JSON,
    so the heatmap can be placed back over its slide.
    """
    import tifffile

    if isinstance(data, (list, tuple)):
        if len(data) != 1:
            raise ValueError(f"{path}: multiscale layers (whole slides) are not written as heatmaps")
        data = data[0]
    array = np.asarray(data)
    if array.nbytes > _MAX_BYTES:
        raise ValueError(f"{path}: layer is {array.nbytes / 2**20:.0f} MB, too large for a heatmap TIFF")
    scale = [float(s) for s in attributes.get("scale", (1.0,) * array.ndim)]
    translate = [float(t) for t in attributes.get("translate", (0.0,) * array.ndim)]
    sy, sx = scale[-2], scale[-1]
    description = {
        "name": attributes.get("name", Path(path).stem),
        "unit": "um",
        "scale_um": scale,
        "translate_um": translate,
        "hdmil": _json_metadata(attributes.get("metadata") or {}),
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


def _json_metadata(metadata: dict) -> dict[str, Any]:
    """The layer metadata JSON can carry (numpy values as plain numbers); the rest left out."""
    out = {}
    for key, value in metadata.items():
        try:
            out[str(key)] = to_jsonable(value)
        except TypeError:
            continue  # e.g. a napari object in the metadata: not the heatmap's business
    return out
