"""napari reader for annotation files: a QuPath GeoJSON (``.geojson``) or ASAP XML (``.xml``,
Camelyon16's) file opens as the annotation Shapes layer (``_layers.annotation_layer``): in µm on
the open slide's scale, in the file's class colours, ready to be the widget's ROI or exclusion.

The slide it belongs to is the open slide layer of the same file stem (Camelyon16:
``tumor_001.xml`` beside ``tumor_001.tif``), else the selected slide layer, else the only one.
QuPath's coordinates are moved by that slide's ``openslide.bounds-x/y`` (MRXS) first.

>>> viewer.open("tumor_001.xml", plugin="napari-hdmil")      # after the slide itself
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from hdmil.annotations import AnnotationError, read_annotations
from hdmil.errors import HDMILError

__all__ = ["ANNOTATION_FILE_SUFFIXES", "annotation_file_layer", "get_annotation_reader", "read_annotation_file"]

LayerData = tuple[Any, dict[str, Any], str]
ANNOTATION_FILE_SUFFIXES = (".geojson", ".xml")  # napari.yaml's filename_patterns for this reader

# (resolved path, mtime_ns, size) -> the file's Annotations, parsed once by get_annotation_reader
_PARSED: dict[tuple[str, int, int], Any] = {}


def get_annotation_reader(path: Any) -> Callable[[Any], list[LayerData]] | None:
    """The reader for one QuPath GeoJSON / ASAP XML annotation file, or None (never raises). A
    file of that suffix that is not one says why in a warning (napari's notification)."""
    import warnings

    try:
        p = _one_path(path)
        if p is None or p.suffix.lower() not in ANNOTATION_FILE_SUFFIXES or not p.is_file():
            return None
        _parsed(p)
    except HDMILError as exc:
        warnings.warn(f"{exc} (napari-hdmil opens QuPath GeoJSON and ASAP XML annotations)", stacklevel=2)
        return None
    except Exception:  # noqa: BLE001 - a reader check must never raise into napari
        return None
    return read_annotation_file


def read_annotation_file(path: Any, slide_layer: Any = None) -> list[LayerData]:
    """The annotation Shapes layer of the file at ``path``, placed on ``slide_layer`` (default:
    the current viewer's slide layer for it, ``slide_layer_for``). HDMILError naming the file
    when it is not an annotation file or no slide is open to place it on."""
    p = _one_path(path)
    if p is None:
        raise HDMILError(f"{path}: the HDMIL reader opens one annotation file at a time")
    annotations = _parsed(p)
    if slide_layer is None:
        slide_layer = slide_layer_for(p, _current_layers())
    if slide_layer is None:
        raise HDMILError(f"{p}: open its slide first; annotations are placed on the slide's µm scale")
    return [annotation_file_layer(annotations, slide_layer)]


def annotation_file_layer(annotations: Any, slide_layer: Any) -> LayerData:
    """``annotations`` (as read from a file) as the annotation layer over ``slide_layer``: moved
    by its slide's bounds offset, in its world units per level-0 px (µm; px for a slide without
    an mpp, then without units)."""
    from napari_hdmil._layers import annotation_layer

    meta = slide_layer.metadata or {}
    level0 = annotations.for_slide(meta.get("properties") or {})
    mpp = float(slide_layer.scale[-1])
    data, kwargs, kind = annotation_layer(level0, mpp, slide_name=str(slide_layer.name))
    if not meta.get("mpp"):
        kwargs.pop("units", None)  # the slide is shown in pixels: so are its annotations
    kwargs["metadata"]["slide_path"] = meta.get("slide_path")
    return data, kwargs, kind


def slide_layer_for(path: Path, layers: Any) -> Any:
    """The slide layer annotations at ``path`` belong to: the one of the same stem, else the
    selected one, else the only one (None when none fits)."""
    from napari.layers import Image

    slides = [lay for lay in layers if isinstance(lay, Image) and (lay.metadata or {}).get("slide_path")
              and not (lay.metadata or {}).get("hdmil_layer")]  # fmt: skip
    same = [lay for lay in slides if Path(lay.metadata["slide_path"]).stem == path.stem]
    if same:
        return same[-1]
    selection = getattr(layers, "selection", None)
    chosen = [lay for lay in slides if selection is not None and lay in selection]
    if len(chosen) == 1:
        return chosen[0]
    return slides[0] if len(slides) == 1 else None


def _current_layers() -> Any:
    import napari

    viewer = napari.current_viewer()
    return viewer.layers if viewer is not None else []


def _parsed(p: Path) -> Any:
    """The file's ``Annotations`` (AnnotationError naming it when it is not an annotation file),
    parsed once per version of the file."""
    try:
        st = p.stat()
    except OSError as exc:
        raise AnnotationError(f"{p}: cannot read the annotation file ({exc.strerror or exc})") from None
    key = (str(p.resolve()), int(st.st_mtime_ns), int(st.st_size))
    if key not in _PARSED:
        if len(_PARSED) > 16:
            _PARSED.clear()
        _PARSED[key] = read_annotations(p)
    return _PARSED[key]


def _one_path(path: Any) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return Path(path) if isinstance(path, (str, os.PathLike)) else None
