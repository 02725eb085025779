"""Results to files: QuPath GeoJSON, per-patch CSV, JSON reports, all written atomically.

Every result file goes through ``hdmil.files.atomic_write`` (re-exported here with
``write_json_atomic`` and ``to_jsonable``), so a crash or a cancelled run never leaves a
half-written file behind.

>>> write_geojson("slide.geojson", grid, {"attention_tumor": att[:, 1]}, top_k={"attention_tumor": 10})
>>> write_csv("slide.csv", grid, {"attention_tumor": att[:, 1], "kept": kept})
>>> write_json_atomic("slide.json", {"prediction": "tumor", "probabilities": [0.1, 0.9]})

A pipeline ``Result`` has one CSV and one GeoJSON layout, written alike by the widget's Export
buttons and by ``hdmil predict --csv / --geojson``:

>>> write_result_csv("slide.csv", result)
>>> write_result_geojson("slide.geojson", result, top_k=8)
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from hdmil.files import atomic_write, to_jsonable, write_json_atomic

__all__ = [
    "DEFAULT_TOP_K",
    "atomic_write",
    "check_result_paths",
    "result_csv_columns",
    "result_patch_values",
    "slide_path_template",
    "to_jsonable",
    "tissue_outlines",
    "tissue_polygons",
    "write_csv",
    "write_geojson",
    "write_json_atomic",
    "write_result_csv",
    "write_result_files",
    "write_result_geojson",
]

TISSUE_COLOR = (80, 160, 80)  # QuPath annotation colours are [r, g, b]
TOP_K_COLOR = (220, 40, 40)
DEFAULT_TOP_K = 8  # top-k patches per class in a result's GeoJSON (the widget's default k too)



# ---------------------------------------------------------------------------------------------
# CSV


def write_csv(
    path: str | os.PathLike,
    grid_or_coords: Any,
    columns: Mapping[str, Any] | None = None,
) -> Path:
    """One row per patch: x, y (level-0 top-left), row, col, tissue_fraction (with a grid), then
    ``columns``. A [N, C] column becomes ``name_0 … name_{C-1}``; NaN is written as an empty cell.

    Args:
        grid_or_coords: a ``PatchGrid`` or int [N, 2] level-0 (x, y) coordinates.
        columns: name -> [N] or [N, C] values.
    """
    header, data = _patch_table(grid_or_coords)
    n = len(data[0])
    for name, values in (columns or {}).items():
        values = np.asarray(values)
        if values.ndim == 0 or values.shape[0] != n or values.ndim > 2:
            raise ValueError(
                f"column {name!r} must have {n} rows ([N] or [N, C]), got shape {values.shape}"
            )
        if values.ndim == 1:
            header.append(str(name))
            data.append(values)
        else:
            for c in range(values.shape[1]):
                header.append(f"{name}_{c}")
                data.append(values[:, c])
    with atomic_write(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        cols = [[_cell(v) for v in col.tolist()] for col in data]
        w.writerows(zip(*cols))
    return Path(path)


def _patch_table(grid_or_coords: Any) -> tuple[list[str], list[np.ndarray]]:
    if hasattr(grid_or_coords, "coords") and hasattr(grid_or_coords, "index"):
        g = grid_or_coords
        return (
            ["x", "y", "row", "col", "tissue_fraction"],
            [g.coords[:, 0], g.coords[:, 1], g.index[:, 0], g.index[:, 1], g.tissue_fraction],
        )
    coords = np.asarray(grid_or_coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be [N, 2] (x, y), got shape {coords.shape}")
    return ["x", "y"], [coords[:, 0], coords[:, 1]]


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("" if math.isnan(v) else repr(v))
    return v


# ---------------------------------------------------------------------------------------------
# GeoJSON (QuPath)


def tissue_polygons(grid, tolerance: float = 0.5) -> list[np.ndarray]:
    """Tissue outlines of ``grid.mask`` as level-0 (x, y) rings: float64 [K, 2], closed.

    Every piece's exterior, each followed by its holes; exteriors wind counter-clockwise and
    holes clockwise in (x, y), which is how to tell them apart (``tissue_outlines`` keeps them
    grouped).
    """
    return [ring for rings in tissue_outlines(grid, tolerance) for ring in rings]


def tissue_outlines(grid, tolerance: float = 0.5) -> list[list[np.ndarray]]:
    """Tissue outlines of ``grid.mask`` in level-0 pixel coordinates, grouped by piece.

    Returns one polygon per connected piece of tissue: ``[exterior, *holes]``, each ring float64
    [K, 2] (x, y), closed (first point == last), exterior counter-clockwise and holes clockwise
    in (x, y). Outlines follow the LR pixel edges (corners cut diagonally), simplified by
    ``tolerance`` LR pixels, and end at the slide's edges (the padded grid runs past them).
    """
    from skimage.measure import approximate_polygon, find_contours

    mask = np.asarray(grid.mask, bool)
    scale = grid.patch_size_level0 / grid.lr_patch_px
    ox, oy = grid.origin
    w, h = (float(v) for v in getattr(grid, "dimensions", (0, 0)))

    def ring(region: np.ndarray, y0: int, x0: int, connect: str) -> np.ndarray | None:
        padded = np.pad(region, 1).astype(np.float32)
        contours = find_contours(padded, 0.5, fully_connected=connect)
        if not contours:
            return None
        c = max(contours, key=len)  # one filled region: one outline
        if tolerance > 0:
            c = approximate_polygon(c, tolerance)
        if len(c) < 4:
            return None
        # Padded (row, col) of LR pixel centres -> level-0 (x, y).
        xy = np.stack([(c[:, 1] - 1 + x0 + 0.5) * scale + ox, (c[:, 0] - 1 + y0 + 0.5) * scale + oy], 1)
        if w > 0 and h > 0:  # an LR pixel across the slide's edge: the outline stops at the edge
            np.clip(xy, 0, (w, h), out=xy)
        xy[-1] = xy[0]
        return xy

    polygons = []
    # 8-connected tissue, 4-connected holes: the same topology find_contours(high) draws.
    labels, _ = ndi.label(mask, structure=np.ones((3, 3), bool))
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        piece = labels[sl] == i
        filled = ndi.binary_fill_holes(piece)
        outer = ring(filled, sl[0].start, sl[1].start, "high")
        if outer is None:
            continue
        rings = [_oriented(outer, ccw=True)]
        holes, _ = ndi.label(filled & ~piece)
        for j, hs in enumerate(ndi.find_objects(holes), start=1):
            if hs is None:
                continue
            hole = ndi.binary_fill_holes(holes[hs] == j)
            r = ring(hole, sl[0].start + hs[0].start, sl[1].start + hs[1].start, "low")
            if r is not None:
                rings.append(_oriented(r, ccw=False))
        polygons.append(rings)
    return polygons


def _oriented(ring: np.ndarray, ccw: bool) -> np.ndarray:
    x, y = ring[:, 0], ring[:, 1]
    area2 = float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))
    return ring if (area2 > 0) == ccw else ring[::-1].copy()


def write_geojson(
    path: str | os.PathLike,
    grid,
    patch_values: Mapping[str, Any] | None = None,
    top_k: Mapping[str, Any] | None = None,
    include_tissue: bool = True,
    include_patches: bool = True,
) -> Path:
    """A QuPath-importable GeoJSON FeatureCollection in QuPath's pixel coordinates: level-0 px
    less the slide's ``grid.bounds_offset`` (OpenSlide's ``openslide.bounds-x/y``, MRXS; (0, 0)
    for other formats), so QuPath draws it on the same tissue; ``hdmil.annotations`` reads it back
    with ``for_slide`` (the inverse).

    Features:
        * tissue outlines: ``objectType: "annotation"``, classification "Tissue";
        * one square per tissue patch: ``objectType: "tile"`` with ``measurements`` ``row``,
          ``col``, ``tissue_fraction`` and {name: value} from ``patch_values`` (NaN left out);
        * top-k patches: annotations classified "Top <name>", with ``measurements`` ``row``,
          ``col``, ``rank`` and the ranked value.

    Every per-patch number sits in ``properties.measurements``, a flat name -> number object:
    QuPath's importer keeps only that (with objectType, classification, name, isLocked) and
    drops other properties, nested and non-numeric values.

    Args:
        grid: a ``PatchGrid``.
        patch_values: name -> [N] per-patch values (attention, probability, kept …).
        top_k: name -> k (the k highest of ``patch_values[name]``) or -> indices into the N
            patches, best first.
    """
    values = _patch_values(grid, patch_values)
    features: list[dict[str, Any]] = []
    if include_tissue:
        features += _tissue_features(grid)
    if include_patches:
        features += _tile_features(grid, values)
    for name, spec in (top_k or {}).items():
        features += _top_k_features(grid, name, _top_indices(name, spec, values, grid.coords.shape[0]), values)
    collection = {"type": "FeatureCollection", "features": features}
    with atomic_write(path, "w") as fh:
        json.dump(collection, fh, allow_nan=False, separators=(",", ":"))
    return Path(path)


def _patch_values(grid, patch_values: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    n = int(grid.coords.shape[0])
    values = {}
    for name, v in (patch_values or {}).items():
        v = np.asarray(v)
        if v.shape != (n,):
            raise ValueError(f"patch value {name!r} must have shape ({n},), got {v.shape}")
        values[name] = v
    return values


def _qupath_offset(grid) -> np.ndarray:
    """float64 (dx, dy) to subtract from level-0 px for QuPath's frame (``grid.bounds_offset``)."""
    return np.asarray(getattr(grid, "bounds_offset", (0, 0)) or (0, 0), np.float64).reshape(2)


def _tissue_features(grid) -> list[dict[str, Any]]:
    """One locked "Tissue" annotation per piece of tissue: exterior ring, then its holes."""
    off = _qupath_offset(grid)
    return [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [_round(r - off) for r in rings]},
            "properties": {
                "objectType": "annotation",
                "name": "Tissue",
                "classification": {"name": "Tissue", "color": list(TISSUE_COLOR)},
                "isLocked": True,
            },
        }
        for rings in tissue_outlines(grid)
    ]


def _tile_features(grid, values: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """One square "tile" per tissue patch: row, col, tissue fraction and ``values`` as
    measurements, NaN left out (not pooled, unknown)."""
    size = int(grid.patch_size_level0)
    cols = {name: v.tolist() for name, v in values.items()}
    frac = np.asarray(grid.tissue_fraction).tolist()
    features = []
    xy = (np.asarray(grid.coords, np.int64) - _qupath_offset(grid).astype(np.int64)).tolist()
    for i, ((x, y), (r, c)) in enumerate(zip(xy, grid.index.tolist())):
        meas: dict[str, float | int] = {"row": r, "col": c}
        for name, col in (("tissue_fraction", frac), *cols.items()):
            v = _number(col[i])
            if v is not None:
                meas[name] = v
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [_square(x, y, size)]},
                "properties": {"objectType": "tile", "measurements": meas},
            }
        )
    return features


def _top_k_features(grid, name: str, rows: np.ndarray, values: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Annotations "Top <rank>: <name>" on patches ``rows``, best first; row, col, rank and the
    ranked value as measurements."""
    size = int(grid.patch_size_level0)
    features = []
    dx, dy = (int(v) for v in _qupath_offset(grid))
    for rank, i in enumerate(rows.tolist(), start=1):
        x, y = grid.coords[i].tolist()
        x, y = x - dx, y - dy
        r, c = grid.index[i].tolist()
        props: dict[str, Any] = {
            "objectType": "annotation",
            "name": f"Top {rank}: {name}",
            "classification": {"name": f"Top {name}", "color": list(TOP_K_COLOR)},
            "measurements": {"row": r, "col": c, "rank": rank},
        }
        v = _number(values[name][i].item()) if name in values else None
        if v is not None:
            props["measurements"][name] = v
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [_square(x, y, size)]},
                "properties": props,
            }
        )
    return features


# ---------------------------------------------------------------------------------------------
# a pipeline Result: its CSV columns and GeoJSON measurements


def result_csv_columns(result: Any) -> dict[str, np.ndarray]:
    """The per-patch columns of a ``Result``'s CSV after x, y, row, col, tissue_fraction:
    ``lipn_keep_<class>``, ``kept``, ``kept_as_neighbour``, ``attention_<class>`` and
    ``score_<class>`` (NaN, an empty cell, where a class did not pool / a patch was not read)."""
    cols: dict[str, np.ndarray] = {}
    for c, name in enumerate(result.classes):
        cols[f"lipn_keep_{name}"] = result.lipn_mask[:, c].astype(np.int64)
    cols["kept"] = result.kept.astype(np.int64)
    cols["kept_as_neighbour"] = result.neighbour.astype(np.int64)
    for c, name in enumerate(result.classes):
        cols[f"attention_{name}"] = result.attention[:, c]
    for c, name in enumerate(result.classes):
        cols[f"score_{name}"] = result.scores[:, c]
    return cols


def result_patch_values(result: Any) -> dict[str, np.ndarray]:
    """The measurements of a ``Result``'s GeoJSON tiles: ``kept`` and ``attention_<class>``."""
    values: dict[str, np.ndarray] = {"kept": result.kept.astype(np.int64)}
    for c, name in enumerate(result.classes):
        values[f"attention_{name}"] = result.attention[:, c]
    return values


def write_result_csv(path: str | os.PathLike, result: Any) -> Path:
    """One row per tissue patch of ``result`` (``write_csv`` of ``result_csv_columns``)."""
    return write_csv(path, result.grid, result_csv_columns(result))


def write_result_geojson(path: str | os.PathLike, result: Any, top_k: int = DEFAULT_TOP_K) -> Path:
    """QuPath GeoJSON of ``result``: tissue outline, every tissue patch with its row, col,
    ``kept`` and attention per class as measurements, and the ``top_k`` highest attention of each
    class as annotations with row, col and rank (QuPath's pixel coordinates: level-0 less the
    slide's bounds offset, see ``write_geojson``)."""
    values = result_patch_values(result)
    top = {f"attention_{name}": int(top_k) for name in result.classes}
    return write_geojson(path, result.grid, values, top_k=top)


def write_result_files(
    result: Any,
    slide: str,
    geojson_path: str | os.PathLike | None = None,
    csv_path: str | os.PathLike | None = None,
    top_k: int = DEFAULT_TOP_K,
) -> list[Path]:
    """``result``'s GeoJSON and / or CSV (those given), as the widget's Export buttons write
    them; ``{slide}`` in a path becomes ``slide``. Returns the paths written."""
    out = []
    if geojson_path is not None:
        out.append(write_result_geojson(slide_path_template(geojson_path, slide), result, top_k=top_k))
    if csv_path is not None:
        out.append(write_result_csv(slide_path_template(csv_path, slide), result))
    return out


def slide_path_template(path: str | os.PathLike, slide: str) -> Path:
    """``path`` with ``{slide}`` replaced by the slide's name (no other braces are touched)."""
    return Path(os.fspath(path).replace("{slide}", slide))


def check_result_paths(n_slides: int, **paths: str | os.PathLike | None) -> None:
    """HDMILError when several slides would overwrite one file: with more than one slide every
    given path needs ``{slide}``. ``paths``: option name -> path (None: not asked for)."""
    from hdmil.errors import HDMILError

    for option, path in paths.items():
        if path is not None and n_slides > 1 and "{slide}" not in os.fspath(path):
            raise HDMILError(
                f"--{option} {path}: {n_slides} slides would write the same file; put {{slide}} in the "
                f"path (e.g. --{option} out/{{slide}}.{option})"
            )


def _top_indices(name: str, spec: Any, values: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    if np.ndim(spec) == 0:
        k = int(spec)
        if name not in values:
            raise ValueError(f"top_k[{name!r}] = {k} needs patch_values[{name!r}] to rank by")
        v = np.asarray(values[name], dtype=np.float64)
        finite = np.flatnonzero(np.isfinite(v))
        order = finite[np.argsort(-v[finite], kind="stable")]
        return order[: max(0, k)]
    idx = np.asarray(spec, dtype=np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"top_k[{name!r}] has patch indices outside 0..{n - 1}")
    return idx


def _square(x: int, y: int, size: int) -> list[list[int]]:
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]


def _round(ring: np.ndarray) -> list[list[float]]:
    return np.round(ring, 2).tolist()


def _number(v: Any) -> float | int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
