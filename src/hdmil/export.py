"""Results to files: QuPath GeoJSON, per-patch CSV, JSON reports, all written atomically.

Every result file goes through ``atomic_write``: a temporary file in the same directory, fsync,
then ``os.replace``, so a crash or a cancelled run never leaves a half-written file behind.

>>> write_geojson("slide.geojson", grid, {"attention_tumor": att[:, 1]}, top_k={"attention_tumor": 10})
>>> write_csv("slide.csv", grid, {"attention_tumor": att[:, 1], "kept": kept})
>>> write_json_atomic("slide.json", {"prediction": "tumor", "probabilities": [0.1, 0.9]})
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "atomic_write",
    "to_jsonable",
    "tissue_outlines",
    "tissue_polygons",
    "write_csv",
    "write_geojson",
    "write_json_atomic",
]

TISSUE_COLOR = (80, 160, 80)  # QuPath annotation colours are [r, g, b]
TOP_K_COLOR = (220, 40, 40)


# ---------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it appears complete or not at all.

    Yields a file object on a temporary file beside ``path``; on a clean exit it is flushed,
    fsynced and renamed over ``path``; on an exception it is removed and ``path`` is untouched.
    ``mode`` is "w" (text) or "wb" (binary).
    """
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"atomic_write mode must be 'w', 'wt' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(
            fd, "wb" if binary else "w", encoding=None if binary else encoding, newline=newline
        ) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON (numpy values and paths converted, NaN/inf as null), written atomically."""
    path = Path(path)
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)
    with atomic_write(path, "w") as fh:
        fh.write(text)
        fh.write("\n")
    return path


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars / arrays, paths, tuples and sets; NaN and inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors and the like
        return to_jsonable(obj.item())
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON")


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
    ``tolerance`` LR pixels.
    """
    from skimage.measure import approximate_polygon, find_contours

    mask = np.asarray(grid.mask, bool)
    scale = grid.patch_size_level0 / grid.lr_patch_px
    ox, oy = getattr(grid, "origin", (0, 0))

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
    """A QuPath-importable GeoJSON FeatureCollection in level-0 pixel coordinates.

    Features:
        * tissue outlines: ``objectType: "annotation"``, classification "Tissue";
        * one square per tissue patch: ``objectType: "tile"`` with ``row``, ``col`` and
          ``measurements`` {name: value} from ``patch_values`` (NaN left out);
        * top-k patches: annotations classified "Top <name>", with ``rank`` and ``value``.

    Args:
        grid: a ``PatchGrid``.
        patch_values: name -> [N] per-patch values (attention, probability, kept …).
        top_k: name -> k (the k highest of ``patch_values[name]``) or -> indices into the N
            patches, best first.
    """
    patch_values = dict(patch_values or {})
    n = int(grid.coords.shape[0])
    values = {}
    for name, v in patch_values.items():
        v = np.asarray(v)
        if v.shape != (n,):
            raise ValueError(f"patch value {name!r} must have shape ({n},), got {v.shape}")
        values[name] = v
    size = int(grid.patch_size_level0)
    features: list[dict[str, Any]] = []

    if include_tissue:
        for rings in tissue_outlines(grid):
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [_round(r) for r in rings]},
                    "properties": {
                        "objectType": "annotation",
                        "name": "Tissue",
                        "classification": {"name": "Tissue", "color": list(TISSUE_COLOR)},
                        "isLocked": True,
                    },
                }
            )

    if include_patches:
        cols = {name: v.tolist() for name, v in values.items()}
        frac = np.asarray(grid.tissue_fraction).tolist()
        for i, ((x, y), (r, c)) in enumerate(zip(grid.coords.tolist(), grid.index.tolist())):
            meas = {"tissue_fraction": frac[i]}
            for name, col in cols.items():
                v = _number(col[i])
                if v is not None:
                    meas[name] = v
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [_square(x, y, size)]},
                    "properties": {"objectType": "tile", "row": r, "col": c, "measurements": meas},
                }
            )

    for name, spec in (top_k or {}).items():
        idx = _top_indices(name, spec, values, n)
        for rank, i in enumerate(idx.tolist(), start=1):
            x, y = grid.coords[i].tolist()
            r, c = grid.index[i].tolist()
            props: dict[str, Any] = {
                "objectType": "annotation",
                "name": f"Top {rank}: {name}",
                "classification": {"name": f"Top {name}", "color": list(TOP_K_COLOR)},
                "row": r,
                "col": c,
                "rank": rank,
            }
            if name in values:
                v = _number(values[name][i].item())
                props["measurements"] = {name: v} if v is not None else {}
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [_square(x, y, size)]},
                    "properties": props,
                }
            )

    collection = {"type": "FeatureCollection", "features": features}
    with atomic_write(path, "w") as fh:
        json.dump(collection, fh, allow_nan=False, separators=(",", ":"))
    return Path(path)


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


# ---------------------------------------------------------------------------------------------
# helpers


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race with other threads)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
