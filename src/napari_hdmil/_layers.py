"""napari layers from a pipeline ``Result``: pure functions returning LayerData tuples (no Qt).

Every layer is in µm, one pixel per patch, and lies exactly over the slide layer our reader makes
(``scale = (mpp, mpp)``, translate 0). napari puts pixel *centres* at integer data coordinates, so
slide pixel (y, x) covers world ``[y·mpp − mpp/2, y·mpp + mpp/2)``; a patch whose level-0 top-left
is (y0, x0) therefore covers world ``[y0·mpp − mpp/2, y0·mpp + S − mpp/2)`` with
``S = patch_size_um``. A raster pixel (r, c) of scale S covers ``[t + r·S − S/2, t + r·S + S/2)``,
hence ``translate = origin·mpp + (S − mpp)/2`` (see ``grid_placement``).

>>> layers = result_layers(result, normalisation="percentile", k=8)
>>> for data, kwargs, kind in layers:
...     viewer._add_layer_from_data(data, kwargs, kind)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hdmil.pipeline import PreScreen  # re-exported: the LIPN layer draws pre-screens too

__all__ = [
    "LIPN_COLORS",
    "LIPN_LEGEND",
    "NORMALISATIONS",
    "LayerData",
    "PreScreen",
    "grid_placement",
    "heatmap_data",
    "heatmap_layer",
    "layer_metadata",
    "lipn_decision",
    "lipn_layer",
    "normalise_attention",
    "patch_centres_um",
    "prototype_layer",
    "result_layers",
    "result_warnings",
    "top_k",
    "topk_layer",
]

LayerData = tuple[Any, dict[str, Any], str]

NORMALISATIONS = ("percentile", "raw")
# LIPN decision values of the Labels layer; 0 is background, so "no tissue" stays transparent.
NO_TISSUE, DISCARDED, KEPT, NEIGHBOUR = 0, 1, 2, 3
LIPN_LEGEND = {
    NO_TISSUE: "no tissue",
    DISCARDED: "discarded (not read at 20x)",
    KEPT: "kept (read at 20x)",
    NEIGHBOUR: "kept as a neighbour (read at 20x)",  # LIPN's dilation: next to a kept patch
}
LIPN_COLORS = {
    NO_TISSUE: (0.0, 0.0, 0.0, 0.0),
    DISCARDED: (0.55, 0.55, 0.6, 1.0),
    KEPT: (0.1, 0.8, 0.35, 1.0),
    NEIGHBOUR: (0.65, 0.95, 0.3, 1.0),
    None: (0.0, 0.0, 0.0, 0.0),  # any other value: transparent
}
TOPK_COLOR = "#ff3030"
BOTTOMK_COLOR = "#30a0ff"


# ---------------------------------------------------------------------------------------------
# placement and metadata


def grid_placement(grid: Any, mpp: float | None = None) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(scale, translate)`` in µm, (y, x), of a one-pixel-per-patch raster of ``grid``.

    Chosen so raster pixel (r, c) covers exactly the slide pixels of patch (r, c) in a slide layer
    with ``scale = (mpp, mpp)`` and translate 0 (napari pixel centres, see the module docstring).
    """
    mpp = float(mpp if mpp is not None else grid.mpp)
    s = float(grid.patch_size_level0) * mpp
    ox, oy = grid.origin
    half = (s - mpp) / 2.0
    return (s, s), (oy * mpp + half, ox * mpp + half)


def patch_centres_um(result: Any, rows: np.ndarray) -> np.ndarray:
    """float64 [k, 2] world (y, x) µm of the centres of patches ``rows`` (napari convention)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    (s, _), (ty, tx) = grid_placement(result.grid, result.mpp)
    rc = np.asarray(result.grid_index, dtype=np.float64)[rows]
    return np.stack([ty + rc[:, 0] * s, tx + rc[:, 1] * s], axis=1) if len(rows) else np.zeros((0, 2))


def layer_metadata(result: Any, class_name: str | None = None, kind: str = "") -> dict[str, Any]:
    """What every HDMIL layer carries: slide path, class, patch size µm, mpp, model name / hash."""
    grid = result.grid
    mpp = float(result.mpp if result.mpp is not None else grid.mpp)
    return {
        "hdmil_layer": kind,
        "slide_path": result.slide_path,
        "class": class_name,
        "patch_size_um": float(grid.patch_size_level0) * mpp,
        "patch_size_level0": int(grid.patch_size_level0),
        "mpp": mpp,
        "model": result.model_name,
        "model_sha256": result.model_sha256,
        "method": "HDMIL" if result.use_lipn else "HDMIL†",
    }


def _class_index(result: Any, cls: int | str) -> int:
    if isinstance(cls, str):
        if cls not in result.classes:
            raise ValueError(f"unknown class {cls!r}; the model's classes are {list(result.classes)}")
        return list(result.classes).index(cls)
    c = int(cls)
    if not 0 <= c < len(result.classes):
        raise ValueError(f"class index {c} out of range for {len(result.classes)} classes")
    return c


# ---------------------------------------------------------------------------------------------
# LIPN decision


def lipn_decision(result: Any) -> np.ndarray:
    """uint8 (rows, cols): 0 = no tissue, 1 = tissue LIPN discarded, 2 = kept (read at 20x),
    3 = kept only as a neighbour of a kept patch (LIPN's dilation; read at 20x too)."""
    values = np.where(np.asarray(result.kept, bool), KEPT, DISCARDED).astype(np.uint8)
    values[result.neighbour] = NEIGHBOUR
    return result.grid.to_raster(values, fill=NO_TISSUE).astype(np.uint8)


def lipn_layer(result: Any, name: str = "LIPN decision") -> LayerData:
    """Labels layer of LIPN's decision with a legend (``features``: the words for each value)."""
    scale, translate = grid_placement(result.grid, result.mpp)
    meta = layer_metadata(result, kind="lipn")
    meta["legend"] = {int(k): v for k, v in LIPN_LEGEND.items()}
    meta["kept_per_class"] = {
        c: int(n) for c, n in zip(result.classes, np.asarray(result.lipn_mask).sum(axis=0))
    }
    meta["kept_as_neighbour"] = int(result.neighbour.sum())
    values = sorted(LIPN_LEGEND)
    kwargs = {
        "name": name,
        "scale": scale,
        "translate": translate,
        "colormap": dict(LIPN_COLORS),
        "opacity": 0.45,
        "blending": "translucent",
        "metadata": meta,
        # one row per label value: napari shows "decision: kept" in the status bar on hover
        "features": {"index": values, "decision": [LIPN_LEGEND[v] for v in values]},
    }
    return lipn_decision(result), kwargs, "labels"


# ---------------------------------------------------------------------------------------------
# heatmaps


def normalise_attention(values: np.ndarray, mode: str = "percentile", threshold: float = 0.0) -> np.ndarray:
    """[N] attention -> float32 [N] in [0, 1]; NaN stays NaN, and so does anything below ``threshold``.

    ``raw``: min-max over the finite (pooled) values. ``percentile``: the rank among them, 0 for the
    lowest and 1 for the highest (ties share their mean rank), as CLAM and TRIDENT draw heatmaps:
    attention is very peaked, so raw values leave all but a few patches dark.
    A single pooled patch (or all equal) maps to 1.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    out = np.full(v.shape, np.nan, np.float32)
    ok = np.isfinite(v)
    x = v[ok]
    if x.size:
        if mode == "raw":
            lo, hi = float(x.min()), float(x.max())
            y = (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)
        elif mode == "percentile":
            from scipy.stats import rankdata

            y = (rankdata(x) - 1.0) / (x.size - 1) if x.size > 1 else np.ones_like(x)
        else:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {mode!r}")
        out[ok] = y.astype(np.float32)
    if threshold > 0:
        out[out < threshold] = np.nan  # comparisons with NaN are False: NaN stays
    return out


def heatmap_data(result: Any, cls: int | str, normalisation: str = "percentile", threshold: float = 0.0) -> np.ndarray:
    """float32 (rows, cols) of class ``cls``'s normalised attention; NaN where it did not pool."""
    c = _class_index(result, cls)
    att = normalise_attention(np.asarray(result.attention)[:, c], normalisation, threshold)
    return result.grid.to_raster(att, fill=np.nan).astype(np.float32)


def heatmap_layer(
    result: Any,
    cls: int | str,
    normalisation: str = "percentile",
    threshold: float = 0.0,
    colormap: str = "inferno",
    opacity: float = 0.6,
    visible: bool = True,
) -> LayerData:
    """Image layer "attention: <class>": float32, NaN (transparent) outside the pooled tissue,
    ``contrast_limits`` fixed to (0, 1) so the colours mean the same on every slide."""
    c = _class_index(result, cls)
    name = result.classes[c]
    scale, translate = grid_placement(result.grid, result.mpp)
    meta = layer_metadata(result, name, kind="heatmap")
    meta.update(class_index=c, normalisation=normalisation, threshold=float(threshold))
    kwargs = {
        "name": f"attention: {name}",
        "scale": scale,
        "translate": translate,
        "colormap": colormap,
        "contrast_limits": (0.0, 1.0),
        "opacity": float(opacity),
        "blending": "translucent",
        "interpolation2d": "nearest",
        "visible": visible,
        "metadata": meta,
    }
    return heatmap_data(result, c, normalisation, threshold), kwargs, "image"


# ---------------------------------------------------------------------------------------------
# top-k


def top_k(result: Any, cls: int | str, k: int = 8, lowest: bool = False) -> np.ndarray:
    """int64 [≤ k] rows (patch indices) of the ``k`` highest (or lowest) attention for ``cls``,
    best first; patches the class did not pool are never listed. Ties keep patch order."""
    c = _class_index(result, cls)
    a = np.asarray(result.attention, dtype=np.float64)[:, c]
    rows = np.flatnonzero(np.isfinite(a))
    order = np.argsort(a[rows] if lowest else -a[rows], kind="stable")
    return rows[order[: max(0, int(k))]].astype(np.int64)


def topk_layer(result: Any, cls: int | str, k: int = 8, lowest: bool = False) -> LayerData:
    """Points layer "top-k: <class>" (or "bottom-k") at patch centres: a square outline the size
    of a patch, the rank as text, attention / rank / row / col / x / y as features."""
    c = _class_index(result, cls)
    name = result.classes[c]
    rows = top_k(result, c, k, lowest)
    centres = patch_centres_um(result, rows)
    meta = layer_metadata(result, name, kind="bottomk" if lowest else "topk")
    meta.update(class_index=c, rows=rows.tolist())
    s = meta["patch_size_um"]
    features = {
        "rank": np.arange(1, len(rows) + 1),
        "attention": np.asarray(result.attention, np.float64)[rows, c],
        "row": np.asarray(result.grid_index)[rows, 0],
        "col": np.asarray(result.grid_index)[rows, 1],
        "x": np.asarray(result.coords)[rows, 0],  # level-0 px, top-left
        "y": np.asarray(result.coords)[rows, 1],
    }
    kwargs = {
        "name": f"{'bottom' if lowest else 'top'}-k: {name}",
        "symbol": "square",
        "size": s,
        "face_color": "transparent",
        "border_color": BOTTOMK_COLOR if lowest else TOPK_COLOR,
        "border_width": 0.08,
        "features": features,
        "text": {"string": "{rank}", "color": "white", "size": 10, "anchor": "upper_left"},
        "metadata": meta,
        "visible": not lowest,
    }
    return centres, kwargs, "points"


# ---------------------------------------------------------------------------------------------
# all of it


def result_layers(
    result: Any,
    normalisation: str = "percentile",
    threshold: float = 0.0,
    colormap: str = "inferno",
    opacity: float = 0.6,
    k: int = 8,
    shown_class: int | str | None = None,
) -> list[LayerData]:
    """LIPN decision, one heatmap per class (only ``shown_class`` visible, default the predicted
    one) and the top-k points of the shown class, bottom order first."""
    shown = _class_index(result, result.prediction_index if shown_class is None else shown_class)
    layers = [lipn_layer(result)]
    for c in range(len(result.classes)):
        layers.append(heatmap_layer(result, c, normalisation, threshold, colormap, opacity, visible=c == shown))
    layers.append(topk_layer(result, shown, k, lowest=True))
    layers.append(topk_layer(result, shown, k))
    return layers


def result_warnings(result: Any) -> list[str]:
    """What the prediction panel warns about: LIPN kept nothing, a class pooled no patch,
    patches that could not be read; then the pipeline's own messages not already said."""
    out: list[str] = []
    kept = np.asarray(result.kept, bool)
    if result.use_lipn and kept.size and not kept.any():
        out.append("LIPN kept no patch: every class was scored from an empty embedding")
    elif kept.any():
        att = np.asarray(result.attention)
        for c, name in enumerate(result.classes):
            if not np.isfinite(att[:, c]).any():
                out.append(f"class {name!r} pooled no patch: its score comes from an empty embedding")
    if len(result.failed):
        out.append(f"{len(result.failed)} kept patches could not be decoded and were skipped")
    for e in result.errors:
        if "LIPN kept no patch" in e or "pooled no patch" in e or "could not be decoded" in e:
            continue  # said above, in shorter words
        out.append(e.removeprefix("warning: "))
    return out


# ---------------------------------------------------------------------------------------------
# SLPD prototype map


def prototype_layer(pmap: Any, mpp: float, slide_path: str | None = None, name: str = "prototype map") -> LayerData:
    """Labels layer of an SLPD ``PrototypeMap`` (0 = no region, k + 1 = prototype k), aligned in µm
    like the patch layers (one pixel per region of ``region_size_level0`` level-0 px)."""
    size = int(pmap.region_size_level0)
    s = size * float(mpp)
    half = (s - float(mpp)) / 2.0
    labels = np.asarray(pmap.labels, dtype=np.int32)
    meta = {
        "hdmil_layer": "prototypes",
        "slide_path": slide_path,
        "mpp": float(mpp),
        "region_size_level0": size,
        "region_size_um": s,
        "n_prototypes": int(labels.max()) if labels.size else 0,
    }
    kwargs = {"name": name, "scale": (s, s), "translate": (half, half), "opacity": 0.5, "metadata": meta}
    return labels, kwargs, "labels"
