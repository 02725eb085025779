"""Annotations: regions of interest, exclusions and outlines, read from the files pathologists use.

* QuPath GeoJSON (``read_annotations``): a FeatureCollection, a bare array of Features or one
  Feature; Polygon and MultiPolygon with holes; ``properties.classification`` (``name``,
  ``color`` [r, g, b]), ``objectType`` (annotation, detection, cell, tile) and ``measurements``.
  QuPath's origin is OpenSlide's ``openslide.bounds-x/y`` (MRXS), so its coordinates are moved by
  that offset onto our level-0 frame (``for_slide``), and back when we write (``write_geojson``).
* ASAP XML (Camelyon16): ``ASAP_Annotations/Annotations/Annotation`` with ``PartOfGroup`` and
  ``Coordinates/Coordinate`` (``Order``, ``X``, ``Y``, level-0 px, OpenSlide's frame); the group
  ``_2`` marks exclusions (non-tumour inside a tumour outline), as Camelyon16 uses it.
* napari Shapes (``shapes_to_annotations``): vertices in µm world coordinates, (y, x).

Every geometry is a shapely Polygon or MultiPolygon. An invalid one (a self-crossing outline) is
repaired with ``shapely.make_valid``; one with no area left is refused, naming its index.

A run is restricted with ``restrict_grid``: a tissue patch stays when at least the grid's tissue
threshold of its footprint lies inside the ROI and outside every exclusion.

>>> roi = read_annotations("tumor_001.xml")
>>> roi.region()            # union of the outlines, exclusions (group _2) cut out
>>> grid2, info = restrict_grid(grid, roi=roi.for_slide(slide))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import HDMILError

__all__ = [
    "ANNOTATION_SUFFIXES", "ASAP_EXCLUSION_GROUPS", "Annotation", "AnnotationError", "Annotations",
    "find_annotation_file", "parse_asap_xml", "parse_geojson", "patch_fractions", "read_annotations",
    "restrict_grid", "roi_key", "shapes_to_annotations", "slide_offset", "write_geojson",
]

ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml")  # looked for, in this order, beside a slide's stem

ASAP_EXCLUSION_GROUPS = ("_2",)  # Camelyon16: regions inside a tumour outline that are not tumour
_QUPATH_IDS = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
               "PathCellObject": "cell", "PathTileObject": "tile"}
MAX_ANNOTATION_BYTES = 512 * 2**20  # a larger file is not an annotation file


class AnnotationError(HDMILError):
    """An annotation file that cannot be read, or an annotation that cannot be used."""


@dataclass(frozen=True)
class Annotation:
    """One annotated object: a polygonal geometry (px) and what the file said about it.

    index: its position in the file (0-based), the number an error names; exclusion: an area to
    leave out (ASAP group ``_2``) rather than one to include.
    """

    geometry: Any  # shapely Polygon | MultiPolygon
    index: int = 0
    name: str = ""
    classification: str | None = None
    color: tuple[int, int, int] | None = None
    object_type: str = "annotation"
    group: str | None = None
    exclusion: bool = False
    measurements: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Annotations:
    """The annotations of one file (or one Shapes layer).

    frame: ``"qupath"`` (origin at OpenSlide's bounds, QuPath's pixels) or ``"level0"`` (our
    level-0 px, OpenSlide's full frame); ``skipped``: one line per object without an area
    (points, lines) that was left out; ``sha256``: of the file's bytes ("" when not from a file).
    """

    items: tuple[Annotation, ...]
    source: str | None = None
    format: str = ""
    frame: str = "level0"
    skipped: tuple[str, ...] = ()
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    @property
    def shown(self) -> str:
        return self.source or f"{self.format or 'annotations'}"

    def translated(self, dx: float, dy: float, frame: str) -> Annotations:
        """Every geometry moved by (dx, dy) px, now in ``frame``."""
        import shapely

        items = tuple(dataclasses.replace(a, geometry=shapely.transform(a.geometry, lambda c: c + (dx, dy)))
                      for a in self.items)
        return dataclasses.replace(self, items=items, frame=frame)

    def for_slide(self, slide: Any) -> Annotations:
        """In ``slide``'s level-0 px: QuPath's coordinates moved by the slide's bounds offset."""
        if self.frame == "level0":
            return self
        dx, dy = slide_offset(slide)
        return self.translated(dx, dy, "level0")

    def select(self, classes: Iterable[str] | None = None) -> Annotations:
        """Only the annotations of these classes (case-insensitive), exclusions always kept."""
        if classes is None:
            return self
        wanted = {c.casefold() for c in classes}
        items = tuple(a for a in self.items
                      if a.exclusion or (a.classification or a.group or "").casefold() in wanted)
        return dataclasses.replace(self, items=items)

    def region(self) -> Any:
        """The union of the included geometries, minus the union of the exclusions."""
        import shapely

        inside = shapely.union_all([a.geometry for a in self.items if not a.exclusion])
        out = [a.geometry for a in self.items if a.exclusion]
        return shapely.difference(inside, shapely.union_all(out)) if out else inside

    def union(self) -> Any:
        """The union of every geometry, exclusions too (an exclusion file's area)."""
        import shapely

        return shapely.union_all([a.geometry for a in self.items])

    def key(self) -> dict[str, Any]:
        """What identifies these annotations in a ``run_key``: the file and its content hash."""
        return {"file": self.source, "sha256": self.sha256}


def roi_key(roi: Annotations | None, exclude: Annotations | None) -> dict[str, Any] | None:
    """The ROI part of a ``run_key``: each annotation file and its content hash (None: none)."""
    if roi is None and exclude is None:
        return None
    return {"roi": roi.key() if roi is not None else None,
            "exclude": exclude.key() if exclude is not None else None}


def find_annotation_file(folder: str | os.PathLike, stem: str) -> Path:
    """``folder/<stem>.geojson`` (or ``.json``, ``.xml``); AnnotationError when there is none."""
    for suffix in ANNOTATION_SUFFIXES:
        path = Path(folder) / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise AnnotationError(f"{folder}: no annotation file for slide {stem} "
                          f"({', '.join(stem + s for s in ANNOTATION_SUFFIXES)})")


# --------------------------------------------------------------------------- geometry helpers


def _polygonal(geom: Any) -> Any:
    """The polygonal part of ``geom`` (a Polygon or MultiPolygon, possibly empty)."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    return shapely.union_all(parts) if parts else Polygon()


def _usable(geom: Any, index: int, where: str, repair: bool) -> Any:
    """``geom`` valid and with an area: repaired with make_valid, or AnnotationError naming it."""
    import shapely
    from shapely.validation import explain_validity

    if not geom.is_valid:
        if not repair:
            raise AnnotationError(f"{where}: annotation {index} is not a valid polygon "
                                  f"({explain_validity(geom)}); fix it or let it be repaired")
        geom = _polygonal(shapely.make_valid(geom))
    if geom.is_empty or not geom.area > 0:
        raise AnnotationError(f"{where}: annotation {index} has no area (a degenerate or "
                              "self-cancelling outline); remove it or redraw it")
    return geom


def slide_offset(slide: Any) -> tuple[int, int]:
    """OpenSlide's ``openslide.bounds-x/y`` of ``slide`` (a Slide or its properties): the level-0
    px where QuPath's (0, 0) lies. (0, 0) when the slide has no bounds (anything but MRXS)."""
    props = slide if isinstance(slide, dict) else getattr(slide, "properties", None) or {}
    try:
        return int(props.get("openslide.bounds-x", 0) or 0), int(props.get("openslide.bounds-y", 0) or 0)
    except (TypeError, ValueError):
        return 0, 0


# --------------------------------------------------------------------------- reading files


def read_annotations(path: str | os.PathLike, repair: bool = True) -> Annotations:
    """QuPath GeoJSON (.geojson / .json) or ASAP XML (.xml), told apart by their content.

    AnnotationError (one line naming the file) for a file that is missing, not one of these, or
    holds an annotation that cannot be used (its index named).
    """
    path = Path(path)
    where = str(path)
    try:
        if path.stat().st_size > MAX_ANNOTATION_BYTES:
            raise AnnotationError(f"{where}: {path.stat().st_size} bytes, too large for an annotation file")
        data = path.read_bytes()
    except OSError as exc:
        raise AnnotationError(f"{where}: cannot read the annotation file ({exc.strerror or exc})") from None
    if data.lstrip()[:1] == b"<":
        ann = parse_asap_xml(data, where, repair)
    else:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AnnotationError(f"{where}: neither GeoJSON nor ASAP XML ({exc})") from None
        ann = parse_geojson(obj, where, repair)
    return dataclasses.replace(ann, sha256=hashlib.sha256(data).hexdigest())


def _features(obj: Any, where: str) -> list[Any]:
    """The Features of a FeatureCollection, a bare array of Features, one Feature or a geometry."""
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        kind = obj.get("type")
        if kind == "FeatureCollection":
            return list(obj.get("features") or [])
        if kind == "Feature":
            return [obj]
        if kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
            return [{"type": "Feature", "geometry": obj, "properties": {}}]
    raise AnnotationError(f"{where}: not GeoJSON annotations (expected a FeatureCollection, an array "
                          "of Features or a Feature)")


def _qupath_class(props: dict) -> tuple[str | None, tuple[int, int, int] | None]:
    """``classification``'s name and colour: ``color`` [r, g, b] or the older ``colorRGB`` int."""
    cls = props.get("classification")
    if isinstance(cls, str):
        return cls, None
    if not isinstance(cls, dict):
        return None, None
    color = cls.get("color")
    if isinstance(cls.get("colorRGB"), int):
        rgb = cls["colorRGB"] & 0xFFFFFF
        color = [rgb >> 16, (rgb >> 8) & 255, rgb & 255]
    rgb = tuple(int(c) for c in color[:3]) if isinstance(color, list) and len(color) >= 3 else None
    return (str(cls["name"]) if cls.get("name") is not None else None), rgb


def _measurements(props: dict) -> dict[str, float]:
    """QuPath's ``measurements``: a mapping, or the older list of {name, value}."""
    m = props.get("measurements") or {}
    if isinstance(m, list):
        m = {d.get("name"): d.get("value") for d in m if isinstance(d, dict)}
    return {str(k): float(v) for k, v in m.items() if isinstance(v, (int, float)) and k is not None}


def _feature(feat: Any, i: int, where: str, repair: bool) -> Annotation | str:
    """One Feature as an Annotation, or the line saying why it was skipped (no area)."""
    from shapely.geometry import shape

    if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
        raise AnnotationError(f"{where}: annotation {i} is not a GeoJSON Feature with a geometry")
    kind = feat["geometry"].get("type")
    if kind not in ("Polygon", "MultiPolygon", "GeometryCollection"):
        return f"annotation {i}: a {kind} has no area; skipped"
    try:
        geom = _polygonal(shape(feat["geometry"]))
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise AnnotationError(f"{where}: annotation {i} has unreadable coordinates ({exc})") from None
    props = feat.get("properties") or {}
    name, color = _qupath_class(props)
    kind = (props.get("objectType") or props.get("object_type")
            or _QUPATH_IDS.get(feat.get("id"), "annotation"))
    return Annotation(
        geometry=_usable(geom, i, where, repair), index=i, name=str(props.get("name") or ""),
        classification=name, color=color, object_type=str(kind), measurements=_measurements(props),
        group=props.get("group"), exclusion=bool(props.get("exclusion")))


def parse_geojson(obj: Any, where: str = "GeoJSON", repair: bool = True) -> Annotations:
    """Annotations from a parsed QuPath GeoJSON object (``where`` names it in errors)."""
    items, skipped = [], []
    for i, feat in enumerate(_features(obj, where)):
        got = _feature(feat, i, where, repair)
        (skipped if isinstance(got, str) else items).append(got)
    if not items:
        raise AnnotationError(f"{where}: no annotation with an area (polygons) in the file")
    return Annotations(tuple(items), source=where, format="geojson", frame="qupath", skipped=tuple(skipped))


def _number(text: str | None) -> float:
    return float(str(text).replace(",", "."))  # some ASAP files were written with decimal commas


def _asap_one(el: Any, i: int, where: str, repair: bool, colors: dict[str, str]) -> Annotation | str:
    from shapely.geometry import Polygon

    kind = el.get("Type") or "Polygon"
    if kind not in ("Polygon", "Rectangle", "Spline"):
        return f"annotation {i}: a {kind} has no area; skipped"
    try:
        pts = sorted(((int(float(c.get("Order", n))), _number(c.get("X")), _number(c.get("Y")))
                      for n, c in enumerate(el.iter("Coordinate"))))
    except (TypeError, ValueError) as exc:
        raise AnnotationError(f"{where}: annotation {i} has unreadable coordinates ({exc})") from None
    if len(pts) < 3:
        raise AnnotationError(f"{where}: annotation {i} has {len(pts)} points; a polygon needs 3")
    group = el.get("PartOfGroup") or None
    color = el.get("Color") or colors.get(group or "")
    return Annotation(
        geometry=_usable(Polygon([(x, y) for _, x, y in pts]), i, where, repair), index=i,
        name=el.get("Name") or "", classification=group, color=_hex_rgb(color), group=group,
        exclusion=group in ASAP_EXCLUSION_GROUPS)


def _hex_rgb(color: str | None) -> tuple[int, int, int] | None:
    if not color or not color.startswith("#") or len(color) != 7:
        return None
    try:
        return tuple(int(color[k:k + 2], 16) for k in (1, 3, 5))  # type: ignore[return-value]
    except ValueError:
        return None


def parse_asap_xml(data: bytes | str, where: str = "ASAP XML", repair: bool = True) -> Annotations:
    """Annotations from ASAP XML (Camelyon16's layout); group ``_2`` becomes an exclusion."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise AnnotationError(f"{where}: not valid XML ({exc})") from None
    colors = {g.get("Name", ""): g.get("Color", "") for g in root.iter("Group")}
    items, skipped = [], []
    for i, el in enumerate(root.iter("Annotation")):
        got = _asap_one(el, i, where, repair, colors)
        (skipped if isinstance(got, str) else items).append(got)
    if not items:
        raise AnnotationError(f"{where}: no ASAP polygon annotation (Annotations/Annotation) in the file")
    return Annotations(tuple(items), source=where, format="asap", frame="level0", skipped=tuple(skipped))


# --------------------------------------------------------------------------- writing (our export)


def _feature_of(a: Annotation) -> dict[str, Any]:
    from shapely.geometry import mapping

    props: dict[str, Any] = {"objectType": a.object_type}
    if a.name:
        props["name"] = a.name
    if a.classification is not None or a.color is not None:
        color = {"color": list(a.color)} if a.color else {}
        props["classification"] = {"name": a.classification or "", **color}
    if a.measurements:
        props["measurements"] = dict(a.measurements)
    if a.group is not None:
        props["group"] = a.group  # ours (QuPath drops them); read back on import
    if a.exclusion:
        props["exclusion"] = True
    geom = mapping(a.geometry)
    return {"type": "Feature", "geometry": json.loads(json.dumps(geom)), "properties": props}


def write_geojson(path: str | os.PathLike, annotations: Annotations, slide: Any = None) -> Path:
    """``annotations`` as a QuPath GeoJSON FeatureCollection, written atomically. Level-0
    geometries are moved into QuPath's frame by ``slide``'s bounds offset (none without a slide)."""
    from hdmil.files import atomic_write, dumps

    ann = annotations
    if ann.frame == "level0" and slide is not None:
        dx, dy = slide_offset(slide)
        ann = ann.translated(-dx, -dy, "qupath")
    doc = {"type": "FeatureCollection", "features": [_feature_of(a) for a in ann.items]}
    with atomic_write(path) as fh:
        fh.write(dumps(doc))
    return Path(path)


# --------------------------------------------------------------------------- napari Shapes


def _ellipse(corners: np.ndarray, n: int = 64) -> np.ndarray:
    """An ellipse's outline from the 4 corners of its (possibly rotated) bounding box."""
    centre = (corners[0] + corners[2]) / 2
    u, v = (corners[1] - corners[0]) / 2, (corners[3] - corners[0]) / 2
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
    return centre + np.cos(t) * u + np.sin(t) * v


def shapes_to_annotations(
    data: Sequence[np.ndarray], shape_types: Sequence[str] | str, mpp: float,
    scale: Sequence[float] = (1.0, 1.0), translate: Sequence[float] = (0.0, 0.0),
    classification: str | None = None, repair: bool = True,
) -> Annotations:
    """A napari Shapes layer's shapes (``layer.data``, ``layer.shape_type``, ``layer.scale``,
    ``layer.translate``; world coordinates in µm, (y, x) last) as level-0 px polygons.
    Rectangles, polygons and ellipses have an area; lines and paths are skipped."""
    from shapely.geometry import Polygon

    types = [shape_types] * len(data) if isinstance(shape_types, str) else list(shape_types)
    s, t = np.asarray(scale, float)[-2:], np.asarray(translate, float)[-2:]
    items, skipped = [], []
    for i, (verts, kind) in enumerate(zip(data, types)):
        if kind not in ("rectangle", "polygon", "ellipse"):
            skipped.append(f"shape {i}: a {kind} has no area; skipped")
            continue
        yx = np.asarray(verts, float)[:, -2:] * s + t  # data -> world (µm)
        if kind == "ellipse":
            yx = _ellipse(yx)
        xy = yx[:, ::-1] / float(mpp)  # µm -> level-0 px, (x, y)
        items.append(Annotation(_usable(Polygon(xy), i, "Shapes layer", repair), index=i,
                                classification=classification))
    if not items:
        raise AnnotationError("Shapes layer: no rectangle, polygon or ellipse to use as a region")
    return Annotations(tuple(items), format="napari", frame="level0", skipped=tuple(skipped))


# --------------------------------------------------------------------------- restricting a grid


def patch_fractions(region: Any, coords: np.ndarray, size: int) -> np.ndarray:
    """float64 [N]: the share of each patch's footprint (``coords`` level-0 top-left, ``size``
    px square) that lies inside ``region``."""
    import shapely

    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    out = np.zeros(len(coords))
    if region is None or region.is_empty or not len(coords):
        return out
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size, coords[:, 1] + size)
    shapely.prepare(region)
    inside = shapely.contains(region, boxes)
    out[inside] = 1.0
    edge = ~inside & shapely.intersects(region, boxes)
    if edge.any():
        out[edge] = shapely.area(shapely.intersection(boxes[edge], region)) / float(size) ** 2
    return out


def _area_mm2(geom: Any, mpp: float) -> float:
    return float(geom.area) * float(mpp) ** 2 / 1e6


def restrict_grid(grid: Any, roi: Annotations | None = None, exclude: Annotations | None = None,
                  threshold: float | None = None) -> tuple[Any, dict[str, Any]]:
    """The grid's patches with at least ``threshold`` (default: the grid's tissue threshold) of
    their footprint inside ``roi`` and outside ``exclude`` (both in level-0 px, ``for_slide``),
    and what the report records of it (files, areas in mm², patches before and inside)."""
    import shapely

    t = float(grid.tissue_threshold if threshold is None else threshold)
    ps0 = int(grid.patch_size_level0)
    rows, cols = grid.shape  # the whole grid, padded edges too: padding lies outside exclusions
    allowed = roi.region() if roi is not None else shapely.box(0, 0, max(cols, 1) * ps0, max(rows, 1) * ps0)
    out = exclude.union() if exclude is not None else None
    if out is not None:
        allowed = shapely.difference(allowed, out)
    share = patch_fractions(allowed, grid.coords, ps0)
    keep = (share >= t) & (share > 0)
    info = {
        "file": roi.source if roi is not None else None,
        "exclude": exclude.source if exclude is not None else None,
        "area_mm2": round(_area_mm2(roi.region(), grid.mpp), 6) if roi is not None else None,
        "exclude_area_mm2": round(_area_mm2(out, grid.mpp), 6) if out is not None else None,
        "threshold": t,
        "n_tissue_patches": int(len(grid.coords)),
        "n_patches_inside": int(keep.sum()),
    }
    return _subset(grid, keep, info), info


def _subset(grid: Any, keep: np.ndarray, info: dict[str, Any]) -> Any:
    parts = [f"{info['n_patches_inside']} of {info['n_tissue_patches']} tissue patches"]
    parts.append("inside the ROI" if info["file"] else "")
    parts.append("outside the exclusions" if info["exclude"] else "")
    return dataclasses.replace(
        grid, coords=grid.coords[keep], index=grid.index[keep],
        tissue_fraction=grid.tissue_fraction[keep], message=" ".join(p for p in parts if p))
