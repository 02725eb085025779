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

import functools
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.pipeline import PreScreen  # re-exported: the LIPN layer draws pre-screens too

__all__ = [
    "ANNOTATION_COLOR",
    "LIPN_COLORS",
    "LIPN_LEGEND",
    "NORMALISATIONS",
    "NORMALISATION_TITLES",
    "UNITS",
    "HeatmapImage",
    "LayerData",
    "PreScreen",
    "annotation_layer",
    "grid_placement",
    "heatmap_colormap",
    "heatmap_data",
    "heatmap_hover",
    "heatmap_layer",
    "heatmap_limits",
    "layer_metadata",
    "lipn_decision",
    "lipn_layer",
    "normalise_attention",
    "patch_centres_um",
    "prototype_layer",
    "rank_text_size",
    "result_layers",
    "NOTHING_KEPT",
    "no_patch_for",
    "result_warnings",
    "shapes_digest",
    "bottom_k",
    "top_k",
    "topk_layer",
]

LayerData = tuple[Any, dict[str, Any], str]

# The heatmap's scales. percentile and raw are per slide (0 = this slide's lowest, 1 = its
# highest); relative and logit mean the same on every slide (see ``heatmap_values``).
NORMALISATIONS = ("percentile", "raw", "relative", "logit")
NORMALISATION_TITLES = {
    "percentile": "rank on this slide (0-1)",
    "raw": "attention, min-max on this slide (0-1)",
    "relative": "attention × pooled patches (1 = average; same on every slide)",
    "logit": "raw attention logit (same on every slide)",
}
RELATIVE_MAX = 4.0  # colour scale top of "relative": four times an average patch's attention
# Every layer we make is in micrometres: the scale bar reads µm and layers mix with other µm layers.
UNITS = ("µm", "µm")
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
ANNOTATION_COLOR = (255, 200, 0)  # an annotation whose file gives no colour
EXCLUSION_COLOR = (128, 128, 128)  # an exclusion (ASAP group _2) without a colour


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
        "slide_name": slide_name_of(result),
        "class": class_name,
        "patch_size_um": float(grid.patch_size_level0) * mpp,
        "patch_size_level0": int(grid.patch_size_level0),
        "mpp": mpp,
        "model": result.model_name,
        "model_sha256": result.model_sha256,
        "method": "HDMIL" if result.use_lipn else "HDMIL†",
    }


def slide_name_of(result: Any) -> str:
    """The slide's name as our reader names its layer (the grid's), else the file's stem."""
    name = result.grid.slide_name if result.grid is not None else ""
    return str(name or (Path(str(result.slide_path)).stem if result.slide_path else ""))


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


def lipn_layer(result: Any, name: str = "LIPN decision", outline: bool = False, visible: bool = True) -> LayerData:
    """Labels layer of LIPN's decision with a legend (``features``: the words for each value).
    ``outline``: draw only the borders of the decision's areas (beside a heatmap, whose colours
    filled areas would mix with)."""
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
        "units": UNITS,
        "colormap": dict(LIPN_COLORS),
        "opacity": 0.45,
        "blending": "translucent",
        "metadata": meta,
        "visible": visible,
        # one row per label value: napari shows "decision: kept" in the status bar on hover
        "features": {"index": values, "decision": [LIPN_LEGEND[v] for v in values]},
    }
    if outline:  # napari's Labels takes ``contour`` only once made: the layer store sets it
        kwargs["opacity"] = 0.8
        meta["outline"] = True
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
            raise ValueError(f"normalisation must be one of {NORMALISATIONS[:2]}, not {mode!r}")
        out[ok] = y.astype(np.float32)
    if threshold > 0:
        out[out < threshold] = np.nan  # comparisons with NaN are False: NaN stays
    return out


def heatmap_values(result: Any, cls: int | str, normalisation: str = "percentile") -> np.ndarray:
    """float32 [N] what class ``cls``'s heatmap shows per patch, NaN where it did not pool.

    percentile / raw: ``normalise_attention``. relative: attention × the number of pooled patches
    (1 = the attention every patch would get if DMIN looked at all alike; independent of the
    slide's size). logit: DMIN's raw attention logit before the softmax.
    """
    c = _class_index(result, cls)
    att = np.asarray(result.attention, dtype=np.float64)[:, c]
    pooled = np.isfinite(att)
    if normalisation == "relative":
        return (att * pooled.sum()).astype(np.float32)
    if normalisation == "logit":
        return np.where(pooled, np.asarray(result.scores, np.float64)[:, c], np.nan).astype(np.float32)
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {normalisation!r}")
    return normalise_attention(att, normalisation)


def heatmap_limits(result: Any, cls: int | str, normalisation: str = "percentile") -> tuple[float, float]:
    """The heatmap's contrast limits: (0, 1) per slide, (0, RELATIVE_MAX) for relative, and for
    logit the range of the class's logits on this slide (the colorbar says which)."""
    if normalisation == "relative":
        return (0.0, RELATIVE_MAX)
    if normalisation != "logit":
        return (0.0, 1.0)
    v = heatmap_values(result, cls, "logit")
    v = v[np.isfinite(v)]
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def heatmap_data(result: Any, cls: int | str, normalisation: str = "percentile", threshold: float = 0.0) -> np.ndarray:
    """float32 (rows, cols) of class ``cls``'s heatmap values; NaN where it did not pool and below
    ``threshold`` (a share of the colour scale: 0.5 hides the lower half)."""
    c = _class_index(result, cls)
    values = heatmap_values(result, c, normalisation)
    if threshold > 0:
        lo, hi = heatmap_limits(result, c, normalisation)
        values[values < lo + threshold * (hi - lo)] = np.nan
    return result.grid.to_raster(values, fill=np.nan).astype(np.float32)


def heatmap_colormap(name: str) -> Any:
    """napari colormap ``name`` whose lowest step is transparent: the bottom of the scale (rank 0,
    the slide's least attended patch) shows the tissue, never a dark colour that reads as stain."""
    from napari.utils.colormaps import AVAILABLE_COLORMAPS, Colormap, ensure_colormap

    key = f"{name} (lowest clear)"
    if key not in AVAILABLE_COLORMAPS:
        colors = ensure_colormap(name).map(np.linspace(0.0, 1.0, 256))
        colors[0, 3] = 0.0
        controls = np.linspace(0.0, 1.0, 257)
        ensure_colormap(Colormap(colors, controls=controls, interpolation="zero", name=key))
    return AVAILABLE_COLORMAPS[key]


def heatmap_hover(result: Any, cls: int | str) -> dict[str, Any]:
    """What hovering a heatmap cell says: per grid cell the patch's attention (NaN: not pooled),
    its rank (1 = most attention, 0 = not pooled), and the number of pooled patches."""
    c = _class_index(result, cls)
    att = np.asarray(result.attention, np.float64)[:, c]
    order = top_k(result, c, len(att))
    rank = np.zeros(len(att), np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    return {"class": result.classes[c], "n": int(len(order)),
            "attention": result.grid.to_raster(att, fill=np.nan).astype(np.float64),
            "rank": result.grid.to_raster(rank, fill=0).astype(np.int64)}  # fmt: skip


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
    ``contrast_limits`` fixed per scale (``heatmap_limits``) so the colours mean the same on
    every slide, the lowest step transparent, a colorbar."""
    c = _class_index(result, cls)
    name = result.classes[c]
    scale, translate = grid_placement(result.grid, result.mpp)
    meta = layer_metadata(result, name, kind="heatmap")
    meta.update(class_index=c, normalisation=normalisation, threshold=float(threshold), colormap=colormap)
    if not np.isfinite(np.asarray(result.attention, np.float64)[:, c]).any():
        meta["note"] = no_patch_for(name)  # an empty layer says why (its hover too)
    kwargs = {
        "name": f"attention: {name}",
        "scale": scale,
        "translate": translate,
        "units": UNITS,
        "colormap": heatmap_colormap(colormap),
        "contrast_limits": heatmap_limits(result, c, normalisation),
        "opacity": float(opacity),
        "blending": "translucent",
        "interpolation2d": "nearest",
        "visible": visible,
        "metadata": meta,
    }
    return heatmap_data(result, c, normalisation, threshold), kwargs, "image"


@functools.lru_cache(maxsize=None)
def _heatmap_image_class() -> type:
    from napari.layers import Image

    class HeatmapImage(Image):
        """A heatmap layer whose status line (hover) names the patch's attention, rank and class
        beside the scale's value; ``hover`` is ``heatmap_hover``'s dict (None: plain Image)."""

        hover: dict[str, Any] | None = None

        def get_status(self, position=None, *, view_direction=None, dims_displayed=None, world=False, value=None):
            status = super().get_status(position, view_direction=view_direction, dims_displayed=dims_displayed,
                                        world=world, value=value)  # fmt: skip
            if position is not None and self.hover is not None:
                status["coordinates"] += hover_text(self, position, world)
            return status

    return HeatmapImage


def hover_text(layer: Any, position: Any, world: bool) -> str:
    """" · tumor: attention 0.0123, rank 3 of 40" for the grid cell under ``position``."""
    h = layer.hover
    data = np.asarray(layer.world_to_data(position) if world else position, np.float64)[-2:]
    r, c = (int(v) for v in np.floor(data + 0.5))
    att = h["attention"]
    if not (0 <= r < att.shape[0] and 0 <= c < att.shape[1]):
        return ""
    if h["n"] == 0:
        return f" · {no_patch_for(h['class'])}"
    if not np.isfinite(att[r, c]):
        return ""
    return f" · {h['class']}: attention {att[r, c]:.4g}, rank {int(h['rank'][r, c])} of {h['n']}"


def __getattr__(name: str) -> Any:  # HeatmapImage imports napari's layers only when used
    if name == "HeatmapImage":
        return _heatmap_image_class()
    raise AttributeError(name)


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


def bottom_k(result: Any, cls: int | str, k: int = 8) -> np.ndarray:
    """int64 [≤ k] rows of the ``k`` lowest attention for ``cls``, lowest first, never one of its
    top ``k`` (fewer than ``k`` when the class pooled fewer than 2k patches)."""
    top = set(top_k(result, cls, k).tolist())
    low = top_k(result, cls, len(result.attention), lowest=True)
    return np.array([r for r in low.tolist() if r not in top][: max(0, int(k))], dtype=np.int64)


RANK_TEXT_PX = (11.0, 28.0)  # rank labels: never smaller (unreadable), never larger (covers the patch)
RANK_TEXT_SHARE = 0.3  # of the patch's width on screen


def rank_text_size(patch_um: float, zoom: float) -> tuple[float, bool]:
    """(font px, shown) of the rank labels when a patch of ``patch_um`` µm is drawn at ``zoom``
    screen px per µm: a share of the patch, within ``RANK_TEXT_PX``; hidden when the patch is
    narrower than the smallest label (labels of neighbouring patches would overlap)."""
    patch_px = float(patch_um) * float(zoom)
    lo, hi = RANK_TEXT_PX
    return float(np.clip(RANK_TEXT_SHARE * patch_px, lo, hi)), patch_px >= 1.5 * lo


def topk_layer(result: Any, cls: int | str, k: int = 8, lowest: bool = False) -> LayerData:
    """Points layer "top-k: <class>" (or "bottom-k") at patch centres: a square outline the size
    of a patch, the rank as text, attention / rank / row / col / x / y as features. The bottom-k
    never repeat a top-k patch (``bottom_k``)."""
    c = _class_index(result, cls)
    name = result.classes[c]
    rows = bottom_k(result, c, k) if lowest else top_k(result, c, k)
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
        "units": UNITS,
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
    """LIPN decision (HDMIL only, hidden), one heatmap per class (only ``shown_class`` visible,
    default the predicted one) and the top-k points of the shown class, bottom order first."""
    shown = _class_index(result, result.prediction_index if shown_class is None else shown_class)
    # one overlay at a time: LIPN's decision as outlines, hidden while the heatmap shows; none
    # under HDMIL† (every patch read: there is no decision to show)
    layers = [lipn_layer(result, outline=True, visible=False)] if result.use_lipn else []
    for c in range(len(result.classes)):
        layers.append(heatmap_layer(result, c, normalisation, threshold, colormap, opacity, visible=c == shown))
    layers.append(topk_layer(result, shown, k, lowest=True))
    layers.append(topk_layer(result, shown, k))
    return layers


# The prediction panel's words for what the CLI and report.json say in the model's terms
# ("pooled no patch: its score comes from an empty (zero) embedding"; those stay as they are).
NOTHING_KEPT = ("The pre-screen chose no patch to read at high magnification, so no tissue was "
                "looked at closely and every class's score is uninformative.")  # fmt: skip


def no_patch_for(name: str) -> str:
    """Plain words for "class ``name`` pooled no patch"."""
    return f"No patch was kept for {name}, so its score is uninformative."


def result_warnings(result: Any) -> list[str]:
    """What the prediction panel warns about, in plain words: LIPN kept nothing, a class pooled
    no patch, patches that could not be read; then the pipeline's own messages not already said."""
    out: list[str] = []
    kept = np.asarray(result.kept, bool)
    if result.use_lipn and kept.size and not kept.any():
        out.append(NOTHING_KEPT)
    elif kept.any():
        att = np.asarray(result.attention)
        out.extend(no_patch_for(name) for c, name in enumerate(result.classes) if not np.isfinite(att[:, c]).any())
    if len(result.failed):
        out.append(f"{len(result.failed)} of the {result.n_kept} kept patches ({result.failed_share:.1%}) "
                   "could not be read from the file (damaged image data) and were left out")
    for e in result.errors:
        if "LIPN kept no patch" in e or "pooled no patch" in e or "could not be decoded" in e:
            continue  # said above, in shorter words
        out.append(e.removeprefix("warning: "))
    return out


# ---------------------------------------------------------------------------------------------
# SLPD prototype map


def prototype_layer(pmap: Any, mpp: float, slide_path: str | None = None, name: str = "prototype map",
                    slide_name: str = "") -> LayerData:  # fmt: skip
    """Labels layer of an SLPD ``PrototypeMap`` (0 = no region, k + 1 = prototype k), aligned in µm
    like the patch layers (one pixel per region of ``region_size_level0`` level-0 px)."""
    size = int(pmap.region_size_level0)
    s = size * float(mpp)
    half = (s - float(mpp)) / 2.0
    labels = np.asarray(pmap.labels, dtype=np.int32)
    meta = {
        "hdmil_layer": "prototypes",
        "slide_path": slide_path,
        "slide_name": slide_name or (Path(slide_path).stem if slide_path else ""),
        "mpp": float(mpp),
        "region_size_level0": size,
        "region_size_um": s,
        "n_prototypes": int(labels.max()) if labels.size else 0,
    }
    kwargs = {"name": name, "scale": (s, s), "translate": (half, half), "units": UNITS, "opacity": 0.5,
              "metadata": meta}  # fmt: skip
    return labels, kwargs, "labels"


# ---------------------------------------------------------------------------------------------
# imported annotations


def _rings(geometry: Any) -> list[tuple[np.ndarray, bool]]:
    """(ring level-0 (x, y) [K, 2] without the closing point, is_hole) of a Polygon or
    MultiPolygon: each part's exterior, then its holes."""
    parts = getattr(geometry, "geoms", [geometry])
    out = []
    for part in parts:
        out.append((np.asarray(part.exterior.coords, np.float64)[:-1], False))
        out.extend((np.asarray(h.coords, np.float64)[:-1], True) for h in part.interiors)
    return out


def _annotation_rgb(a: Any) -> tuple[int, int, int]:
    if a.color is not None:
        return tuple(int(c) for c in a.color)  # type: ignore[return-value]
    return EXCLUSION_COLOR if a.exclusion else ANNOTATION_COLOR


def annotation_layer(annotations: Any, mpp: float, slide_name: str = "", name: str | None = None,
                     edge_width: float | None = None) -> LayerData:
    """Shapes layer of ``hdmil.annotations.Annotations`` (level-0 px, ``for_slide`` first) in µm,
    drawn over the slide layer and above the heatmaps (added after them): one polygon outline
    per ring in the annotation's class colour (holes fainter; the ``hole`` and ``exclusion``
    features say which), faces transparent so the heatmap underneath stays visible.

    Vertices are ``px · mpp`` with scale 1 and translate 0, the inverse of
    ``hdmil.annotations.shapes_to_annotations``: the layer used as a ROI gives back the same
    polygons; its metadata keeps the annotations themselves (holes and exclusions included).
    """
    if annotations.frame != "level0":
        raise ValueError(f"{annotations.shown}: annotations in QuPath's frame; call for_slide(slide) first "
                         "so that the slide's bounds offset is applied")
    mpp = float(mpp)
    data, colors, feats = [], [], {"index": [], "classification": [], "name": [], "hole": [], "exclusion": []}
    for a in annotations:
        rgb = np.asarray(_annotation_rgb(a), np.float64) / 255.0
        for ring, hole in _rings(a.geometry):
            data.append(ring[:, ::-1] * mpp)  # (x, y) px -> (y, x) µm
            colors.append((*rgb, 0.6 if hole else 1.0))
            for key, value in (("index", a.index), ("classification", a.classification or ""),
                               ("name", a.name), ("hole", hole), ("exclusion", a.exclusion)):
                feats[key].append(value)
    if edge_width is None:  # a few screen pixels when the whole annotated area is in view
        extent = max((float(np.ptp(d, axis=0).max()) for d in data), default=0.0)
        edge_width = max(4 * mpp, extent / 250.0)
    meta = {"hdmil_layer": "annotations", "slide_name": slide_name, "mpp": mpp, "source": annotations.source,
            "format": annotations.format, "sha256": annotations.sha256, "annotations": annotations,
            "shapes_digest": shapes_digest(data)}  # fmt: skip
    kwargs = {
        "name": name or f"annotations: {Path(annotations.source).name if annotations.source else slide_name}",
        "shape_type": "polygon", "units": UNITS, "edge_color": np.asarray(colors).reshape(-1, 4),
        "face_color": "transparent", "edge_width": float(edge_width), "features": feats, "metadata": meta,
    }
    return data, kwargs, "shapes"


def shapes_digest(data: Any) -> str:
    """sha256 of a Shapes layer's vertices: tells an annotation layer left as imported from one
    the user edited, and names a drawn ROI in a run's key. In float32, as napari keeps them."""
    import hashlib

    h = hashlib.sha256()
    for verts in data:
        v = np.ascontiguousarray(verts, np.float32)
        h.update(np.asarray(v.shape, np.int64).tobytes())
        h.update(v.tobytes())
    return h.hexdigest()
