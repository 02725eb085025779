"""napari reader: a whole-slide image as one multiscale RGB layer in µm; a saved result (its
folder, ``report.json`` or ``patches.h5``) as its slide plus every result layer, no model run.

The layer's data has the plain approach's chunks (one dask chunk per file tile, per level), each
read with ``Slide.read_region``, so opening and panning cost the same; a tile that fails to decode
is drawn white, with one warning per slide (``viewable_pyramid``). The reader adds ``scale`` (µm
per pixel) and metadata. Open slides live in a module-level cache, one per file,
so repeated ``get_reader`` calls and the layers that read from a slide share one file handle.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

from hdmil.errors import HDMILError, SlideError
from hdmil.slide import SLIDE_EXTENSIONS, Slide, check_decodable, open_slide

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[Any], list[LayerData]]

# (resolved path, mtime_ns, size) -> open Slide. One handle per file for the session; a file that
# changed on disk gets a new key (the old Slide stays alive only while a layer still uses it).
_SLIDES: dict[tuple[str, int, int], Slide] = {}
_LOCK = threading.Lock()
# napari decodes a multiscale layer's smallest level whole (its overview and thumbnail): 256 MP
# is 768 MB of RGB. A real pyramid ends far below it; a header claiming 10^6 x 10^6 px with no
# pyramid would hang napari for minutes and exhaust memory.
MAX_SMALLEST_LEVEL_PIXELS = 256 * 2**20


def get_reader(path: str | os.PathLike | list) -> ReaderFunction | None:
    """The reader for a slide path, or None for anything this plugin cannot open (never raises)."""
    try:
        p = _single_path(path)
        if p is None or p.suffix.lower() not in SLIDE_EXTENSIONS or not p.is_file():
            return None
        if heatmap_description(p) is not None:
            return read_heatmap  # a heatmap our writer saved, not a slide
        cached_slide(p)  # the header parses, one tile per level decodes, the pyramid is viewable
    except HDMILError as exc:
        # napari then says no reader opens the file; the warning says why (a notification)
        warnings.warn(str(exc), stacklevel=2)
        return None
    except Exception:  # noqa: BLE001 - a reader check must never raise into napari
        return None
    return read_slide


def get_result_reader(path: str | os.PathLike | list) -> ReaderFunction | None:
    """The reader for a saved result (a folder with ``report.json`` and ``patches.h5``, or one of
    those files), or None (never raises; a result whose slide cannot be used warns why)."""
    from hdmil.pipeline.result import result_folder

    try:
        p = _single_path(path)
        if p is None or not (p.is_dir() or p.name in ("report.json", "patches.h5")):
            return None
        result_folder(p)
    except HDMILError:
        return None  # not a result (a plain folder): another reader may open it
    except Exception:  # noqa: BLE001 - a reader check must never raise into napari
        return None
    return read_result


def read_result(path: str | os.PathLike | list, slide_dirs: tuple = ()) -> list[LayerData]:
    """The slide of a saved result (found where the report says, or beside the results, or in
    ``slide_dirs``; refused when the file changed) and every result layer of
    ``napari_hdmil._layers.result_layers``. Nothing is computed: no model, no encoder."""
    from hdmil.pipeline.result import load_result
    from napari_hdmil._layers import result_layers

    p = _single_path(path)
    if p is None:
        raise HDMILError(f"{path}: the HDMIL reader opens one result at a time")
    result = load_result(p, slide_dirs=slide_dirs)
    layers = read_slide(result.slide_path)
    layers[0][1]["metadata"]["result_folder"] = str(Path(p if p.is_dir() else p.parent).resolve())
    if _hand_to_widget(result):
        return layers  # the widget adds the result layers (its own, with their controls)
    return layers + result_layers(result)


def _hand_to_widget(result: Any) -> bool:
    """When the current viewer has the HDMIL widget docked, have it show ``result`` (prediction
    panel, heatmap controls, gallery) once napari added the slide layer; False when it has none."""
    try:
        import napari
        from qtpy.QtCore import QTimer

        from napari_hdmil._qt.review import docked_widget

        viewer = napari.current_viewer()
        widget = docked_widget(viewer) if viewer is not None else None
    except ImportError:
        return False
    if widget is None:
        return False
    QTimer.singleShot(0, lambda: widget.show_result(result))
    return True


def read_slide(path: str | os.PathLike | list) -> list[LayerData]:
    """One multiscale RGB image layer for the slide at ``path`` (µm scale when mpp is known).
    Its metadata records the file's size and mtime when opened (``file_size``, ``file_mtime_ns``):
    a file changed on disk since then no longer matches them."""
    p = _single_path(path)
    if p is None:
        raise HDMILError(f"{path}: the HDMIL reader opens one slide at a time")
    slide = cached_slide(p)
    mpp = slide.mpp
    st = Path(slide.path).stat()
    metadata: dict[str, Any] = {
        "slide_path": str(slide.path),
        "file_size": int(st.st_size),
        "file_mtime_ns": int(st.st_mtime_ns),
        "mpp": mpp,
        "objective_power": slide.objective_power,
        "vendor": slide.vendor,
        "level_dimensions": [tuple(d) for d in slide.level_dimensions],
        "properties": dict(slide.properties),
        "hdmil_slide": True,
    }
    if mpp is None:
        metadata["note"] = (
            "no microns-per-pixel in the file: the layer is in pixels (scale 1.0); "
            "set the mpp in the HDMIL widget or pass --mpp to the CLI"
        )
    scale = (mpp, mpp) if mpp else (1.0, 1.0)
    add_kwargs = {
        "name": slide.name,
        "multiscale": True,
        "rgb": True,
        "scale": scale,
        "metadata": metadata,
    }
    if mpp:  # in µm like our result layers, so napari's scale bar measures µm (pixels: no units)
        add_kwargs["units"] = ("µm", "µm")
    return [(viewable_pyramid(slide), add_kwargs, "image")]


# Slide -> the guard of its tiles in the viewer (one count, one warning, per slide). The guard does
# not hold the slide: the layers' arrays do, so a slide no layer uses is freed with its entry.
_GUARDS: weakref.WeakKeyDictionary[Slide, _TileGuard] = weakref.WeakKeyDictionary()
_WHITE = 255  # a tile that cannot be decoded is drawn as glass, never black (reads as stain)


def viewable_pyramid(slide: Slide) -> list:
    """The slide's levels as dask arrays for napari, largest first: the same tiles (chunks) as
    ``slide.pyramid()``, but a tile that fails to decode while panning is drawn white and said
    once per slide (one warning notification), not raised again on every redraw."""
    with _LOCK:
        guard = _GUARDS.get(slide)
        if guard is None:
            guard = _GUARDS[slide] = _TileGuard(str(slide.path), slide.compressions)
    return [guard.level(slide, i) for i in range(slide.level_count)]


class _TileGuard:
    """Reads a slide's tiles for napari; counts the ones that fail and warns on the first."""

    def __init__(self, path: str, compressions: tuple) -> None:
        self.path, self.compressions = path, compressions
        self.failed = 0
        self._lock = threading.Lock()

    def level(self, slide: Slide, level: int) -> Any:
        """Level ``level`` of ``slide`` as a dask array, one chunk per file tile."""
        import dask.array as da
        import numpy as np

        chunks = slide.level_array(level).chunks  # the file's tiles, as the plain pyramid
        ds = float(slide.level_downsamples[level])

        def tile(block_info=None):
            (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
            # level-0 corner that maps back to (x0, y0) exactly (read_region floors x / ds)
            loc = (math.ceil(x0 * ds - 1e-9), math.ceil(y0 * ds - 1e-9))
            try:
                return slide.read_region(loc, level, (x1 - x0, y1 - y0))
            except SlideError as exc:
                self._failed(level, exc)
                return np.full((y1 - y0, x1 - x0, 3), _WHITE, np.uint8)

        meta = np.empty((0, 0, 3), np.uint8)
        name = f"hdmil-view-{uuid.uuid4().hex[:12]}-{level}"  # napari's chunk cache is keyed by it
        return da.map_blocks(tile, chunks=chunks, dtype=np.uint8, name=name, meta=meta)

    def _failed(self, level: int, exc: SlideError) -> None:
        with self._lock:
            self.failed += 1
            if self.failed > 1:
                return
        codec = self.compressions[level]
        why = str(exc).removeprefix(f"{self.path}: ")
        _warn(f"{self.path}: some tiles of level {level} cannot be decoded"
              f"{f' (codec {codec})' if codec else ''}; they are drawn blank (white). First: {why}")  # fmt: skip


def tile_failures(slide: Slide) -> int:
    """How many tile reads of ``slide`` failed in the viewer so far (drawn white)."""
    guard = _GUARDS.get(slide)
    return 0 if guard is None else guard.failed


def _warn(message: str) -> None:
    """A warning notification in napari (from any thread), a Python warning elsewhere."""
    try:
        from napari.utils.notifications import show_warning
    except ImportError:
        warnings.warn(message, stacklevel=3)
        return
    show_warning(message)


def heatmap_description(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON description ``napari_hdmil._writer.write_heatmap`` puts in a heatmap TIFF, or None
    for any other file (a slide, a plain TIFF, not a TIFF). Reads the first page's header only."""
    import json

    import tifffile

    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with tifffile.TiffFile(path) as tf:
            text = tf.pages[0].description
        desc = json.loads(text) if text.lstrip().startswith("{") else None
    except Exception:  # noqa: BLE001 - not one of our heatmaps
        return None
    if not isinstance(desc, dict) or not {"hdmil", "scale_um", "translate_um"} <= set(desc):
        return None
    return desc


def read_heatmap(path: str | os.PathLike | list) -> list[LayerData]:
    """A heatmap TIFF our writer saved, as the image layer it was: its µm scale and position (so
    it lies over its slide again), name, colours and the HDMIL metadata."""
    import tifffile

    p = _single_path(path)
    desc = heatmap_description(p) if p is not None else None
    if desc is None:
        raise HDMILError(f"{path}: not a heatmap saved by napari-hdmil")
    data = tifffile.imread(p)
    meta = dict(desc["hdmil"])
    meta["heatmap_file"] = str(p.resolve())
    kwargs: dict[str, Any] = {
        "name": str(desc.get("name") or p.stem),
        "scale": tuple(float(v) for v in desc["scale_um"][-data.ndim:]),
        "translate": tuple(float(v) for v in desc["translate_um"][-data.ndim:]),
        "units": ("µm",) * data.ndim,
        "interpolation2d": "nearest",
        "metadata": meta,
        **{k: desc[k] for k in ("contrast_limits", "opacity", "blending") if k in desc},
    }
    cmap = _heatmap_colormap(meta.get("colormap") or desc.get("colormap"))
    if cmap is not None:
        kwargs["colormap"] = cmap
    return [(data, kwargs, "image")]


def _heatmap_colormap(name: Any) -> Any:
    """The heatmap's colormap (the lowest step clear, as ``_layers.heatmap_colormap`` draws it)
    from its base name; None when the name is not a napari colormap."""
    if not isinstance(name, str):
        return None
    from napari_hdmil._layers import heatmap_colormap

    base = name.removesuffix(" (lowest clear)")
    try:
        return heatmap_colormap(base)
    except (KeyError, ValueError):
        return None


def read_associated(path: str | os.PathLike) -> list[LayerData]:
    """The slide's label / macro / thumbnail images as small RGB image layers (on request only)."""
    p = _single_path(path)
    if p is None:
        raise HDMILError(f"{path}: the HDMIL reader opens one slide at a time")
    slide = cached_slide(p)
    layers: list[LayerData] = []
    for name, rgb in slide.associated_images.items():
        meta = {"slide_path": str(slide.path), "associated_image": name, "hdmil_slide": False}
        kwargs = {"name": f"{slide.name} [{name}]", "rgb": True, "metadata": meta}
        layers.append((rgb, kwargs, "image"))
    return layers


def cached_slide(path: str | os.PathLike) -> Slide:
    """The open Slide for ``path`` from the module cache (opened on first use)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    with _LOCK:
        slide = _SLIDES.get(key)
        if slide is None or slide._closed:
            for old in [k for k in _SLIDES if k[0] == key[0]]:
                del _SLIDES[old]  # stale version of a changed file; layers keep their own ref
            slide = _open_viewable(p)
            _SLIDES[key] = slide
    return slide


def _open_viewable(path: Path) -> Slide:
    """The open slide, or SlideError when napari could not show it: a level that does not
    decode (``check_decodable``) or a smallest level too large to be decoded whole."""
    slide = open_slide(path)
    try:
        check_decodable(slide)
        w, h = slide.level_dimensions[-1]
        if w * h > MAX_SMALLEST_LEVEL_PIXELS:
            raise SlideError(
                f"{slide.path}: its smallest pyramid level is {w} x {h} px, which napari would "
                f"decode whole; over the {MAX_SMALLEST_LEVEL_PIXELS // 2**20} MP cap (the slide "
                "has no usable pyramid)"
            )
    except BaseException:
        slide.close()
        raise
    return slide


def close_cached(path: str | os.PathLike | None = None) -> None:
    """Close cached slides (all, or those of ``path``); their layers can no longer read pixels."""
    with _LOCK:
        keys = list(_SLIDES) if path is None else [
            k for k in _SLIDES if k[0] == str(Path(path).expanduser().resolve())
        ]
        for k in keys:
            _SLIDES.pop(k).close()


def _single_path(path: Any) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)):
        return None
    return Path(path)
