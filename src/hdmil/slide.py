"""Whole-slide images: open, levels, mpp, ``read_region`` and a lazy dask pyramid.

Two backends behind one small API:

* tiffslide (default) for SVS, generic tiled TIFF, NDPI and SCN. Each level is
  ``dask.array.from_zarr`` over tiffslide's zarr array for that level, so dask chunks are the
  file's own tiles: one tile decoded per chunk, no rechunking, no per-tile ``delayed``.
* OpenSlide (optional, imported lazily) for MRXS, VMS, VMU, BIF and DICOM. Its levels are dask
  arrays built with one ``map_blocks`` over tile-sized chunks, each chunk one ``read_region``.

>>> with open_slide("CMU-1-Small-Region.svs") as slide:
...     slide.dimensions, slide.mpp
((2220, 2967), 0.499)
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import MissingMPPError, SlideError

__all__ = [
    "MAX_OVERVIEW_PIXELS",
    "MAX_OVERVIEW_SIDE",
    "MAX_THUMBNAIL_SOURCE_PIXELS",
    "MAX_WINDOW_PIXELS",
    "MPP_RANGE",
    "OPENSLIDE_EXTENSIONS",
    "SLIDE_EXTENSIONS",
    "TIFF_EXTENSIONS",
    "Slide",
    "check_decodable",
    "check_mpp",
    "check_overview_size",
    "open_slide",
]

# Formats tiffslide reads (TIFF containers); everything here starts with a TIFF header.
TIFF_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".svslide"})
# Formats only OpenSlide reads (multi-file, vendor containers or DICOM).
OPENSLIDE_EXTENSIONS = frozenset({".mrxs", ".vms", ".vmu", ".bif", ".dcm"})
SLIDE_EXTENSIONS = TIFF_EXTENSIONS | OPENSLIDE_EXTENSIONS

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_OPENSLIDE_HINT = "install the OpenSlide backend: pip install napari-hdmil[openslide]"
# Out-of-bounds fill: white, like glass. (tiffslide pads with 0; OpenSlide gives transparent
# pixels, which we composite on white.)
_WHITE = 255

# Level-0 µm per pixel a scan can plausibly have: 0.05 is finer than a 100x oil objective
# (~0.1 µm/px), 20 coarser than any overview camera. Outside it an mpp is a typo (--mpp 100 gives
# 1 px patches and an LR image larger than the slide) or a unit mix-up.
MPP_RANGE = (0.05, 20.0)
# The most pixels decoded for one overview (the tissue LR image, a thumbnail): 64 MP = 192 MB of
# RGB. A whole 75 x 25 mm glass slide at 1.25x (8 µm/px) is 9375 x 3125 px = 29 MP, so only a
# header lying about the slide's size reaches it; without this cap such a header (10^6 x 10^6 px)
# makes us allocate an 11 GiB LR image.
MAX_OVERVIEW_PIXELS = 64 * 2**20
# ... and at most 65536 px a side (524 mm at 8 µm/px), so its resampling weights stay small too.
MAX_OVERVIEW_SIDE = 65536
# The most pixels one window or one tile may hold when decoded at once (same 64 MP): a level
# stored as a single huge strip or tile would otherwise be decoded whole for any read.
MAX_WINDOW_PIXELS = 64 * 2**20
# The largest level a thumbnail decodes (strided, tile by tile): 1 GP, a 32k x 32k slide without
# a pyramid. A header claiming 10^6 x 10^6 px with no pyramid would mean a million-tile graph.
MAX_THUMBNAIL_SOURCE_PIXELS = 2**30


def open_slide(path: str | os.PathLike, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a whole-slide image.

    Args:
        path: the slide file.
        mpp: µm per level-0 pixel; overrides whatever the file says (for slides without it).
        backend: "auto" (tiffslide for TIFF formats, OpenSlide for the rest), "tiffslide" or
            "openslide".

    Raises:
        SlideError: the path is missing, a directory, not a slide, or its format needs a backend
            that is not installed. The message names the file.
    """
    return Slide(path, mpp=mpp, backend=backend)


class Slide:
    """An open whole-slide image. Coordinates are level-0 pixels, sizes are (width, height)."""

    def __init__(
        self, path: str | os.PathLike, mpp: float | None = None, backend: str = "auto"
    ) -> None:
        self.path = Path(path).expanduser()
        self.name = self.path.stem
        if backend not in ("auto", "tiffslide", "openslide"):
            raise ValueError(f"backend must be 'auto', 'tiffslide' or 'openslide': {backend!r}")
        if mpp is not None:
            check_mpp(mpp, self.path)
        _check_file(self.path)

        suffix = self.path.suffix.lower()
        requested = backend
        if backend == "auto":
            backend = "openslide" if suffix in OPENSLIDE_EXTENSIONS else "tiffslide"
        self.backend = backend
        self._level_arrays: dict[int, Any] = {}
        self._associated: dict[str, np.ndarray] | None = None
        self._closed = False
        self._impl: _Backend
        if backend == "openslide":
            self._impl = _OpenSlideBackend(self.path)
        else:
            try:
                self._impl = _TiffSlideBackend(self.path)
            except SlideError:
                # A TIFF variant tiffslide cannot parse may still be one OpenSlide reads.
                fallback = _try_openslide(self.path) if requested == "auto" else None
                if fallback is None:
                    raise  # tiffslide's error: it names the problem with the file
                self._impl, self.backend = fallback, "openslide"

        props = self._impl.properties
        self.properties: dict[str, Any] = props
        self.level_dimensions: tuple[tuple[int, int], ...] = self._impl.level_dimensions
        self.level_count = len(self.level_dimensions)
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        w0 = self.dimensions[0]
        # The backend's downsamples; from the widths (as OpenSlide does) when it has none.
        self.level_downsamples: tuple[float, ...] = self._impl.level_downsamples or tuple(
            w0 / w for w, _ in self.level_dimensions
        )
        self.tile_sizes: tuple[tuple[int, int], ...] = self._impl.tile_sizes
        # Each level's codec ("JPEG, Compression tag 7"), None where the backend does not say.
        self.compressions: tuple[str | None, ...] = self._impl.compressions
        self.mpp: float | None = float(mpp) if mpp is not None else self._impl.mpp
        # where it came from (report.json's mpp_source): the caller ("user"), the file, or nowhere
        self.mpp_source: str | None = "user" if mpp is not None else ("file" if self.mpp else None)
        self.objective_power: float | None = self._impl.objective_power
        self.vendor: str | None = self._impl.vendor

    # -- context manager / lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Release the file. Level arrays made before become unreadable."""
        if not self._closed:
            self._closed = True
            self._level_arrays.clear()
            self._impl.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = f"{self.mpp:.4g}" if self.mpp else "unknown"
        return f"Slide({str(self.path)!r}, {w}x{h} px, levels={self.level_count}, mpp={mpp})"

    # -- metadata --------------------------------------------------------------------------------

    def require_mpp(self) -> float:
        """The level-0 µm per pixel, or MissingMPPError telling the user how to give it."""
        if self.mpp is None:
            raise MissingMPPError(
                f"{self.path}: the slide has no microns-per-pixel (mpp) metadata; pass --mpp "
                "(e.g. --mpp 0.5 for 20x, 0.25 for 40x) or set the mpp field"
            )
        return self.mpp

    def best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level (largest downsample) whose downsample is <= ``downsample``."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):  # tolerate float noise in stored downsamples
                best = i
        return best

    @property
    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro, thumbnail …: name -> uint8 (H, W, 3). Decoded on first access."""
        if self._associated is None:
            self._check_open()
            self._associated = {
                name: _to_rgb(np.asarray(img), f"{self.path} [{name}]")
                for name, img in self._impl.associated_images().items()
            }
        return self._associated

    @property
    def associated_image_names(self) -> tuple[str, ...]:
        """Names of the associated images without decoding them."""
        return self._impl.associated_names()

    # -- pixels ----------------------------------------------------------------------------------

    def level_array(self, level: int):
        """Level ``level`` as a lazy dask array (H, W, 3) uint8; chunks are the file's tiles."""
        self._check_open()
        level = self._check_level(level)
        arr = self._level_arrays.get(level)
        if arr is None:
            arr = self._impl.level_array(level)
            self._level_arrays[level] = arr
        return arr

    def pyramid(self) -> list:
        """All levels as dask arrays, largest first (napari's multiscale layout)."""
        return [self.level_array(i) for i in range(self.level_count)]

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Pixels (h, w, 3) uint8 of a ``size`` = (w, h) window at ``level``.

        ``location`` is the window's top-left corner in level-0 pixels; out-of-bounds is white.
        """
        self._check_open()
        level = self._check_level(level)
        w, h = (int(v) for v in size)
        if w < 0 or h < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        ds = self.level_downsamples[level]
        # Level-0 → level coordinates the way tiffslide does (floor of x / downsample).
        x = math.floor(location[0] / ds)
        y = math.floor(location[1] / ds)
        self._check_window(level, w, h)
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), _WHITE, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lw), min(y + h, lh)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._impl.read_window(level, x0, y0, x1, y1)
        return out

    def thumbnail(self, max_size: int | tuple[int, int] = 1024) -> np.ndarray:
        """The whole slide as (h, w, 3) uint8 fitting in ``max_size`` px, aspect ratio kept.

        Reads the smallest level that is still large enough, strided when that level is far
        bigger than asked (a slide without a pyramid), so memory stays near the output size.
        """
        mw, mh = (max_size, max_size) if isinstance(max_size, int) else max_size
        if mw < 1 or mh < 1:
            raise ValueError(f"max_size must be positive, got {max_size}")
        w0, h0 = self.dimensions
        scale = max(w0 / mw, h0 / mh, 1.0)
        out_w, out_h = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        check_overview_size(self, (out_w, out_h), "thumbnail")
        level = self.best_level_for_downsample(scale)
        self._check_window(level, 0, 0)  # its tiles: dask decodes them one at a time
        lw, lh = self.level_dimensions[level]
        if lw * lh > MAX_THUMBNAIL_SOURCE_PIXELS:
            raise SlideError(
                f"{self.path}: a thumbnail would decode level {level} of {lw} x {lh} px, over the "
                f"{_mp(MAX_THUMBNAIL_SOURCE_PIXELS)} cap; the slide has no pyramid level small "
                "enough"
            )
        arr = self.level_array(level)
        step = max(1, int(scale / self.level_downsamples[level]))
        # Stride first (cheap), then a proper resize to the exact size.
        small = np.asarray(arr[::step, ::step].compute())
        if small.shape[1] == out_w and small.shape[0] == out_h:
            return small
        from PIL import Image

        return np.asarray(Image.fromarray(small).resize((out_w, out_h), Image.Resampling.LANCZOS))

    # -- helpers ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(f"{self.path}: the slide was closed")

    def _check_window(self, level: int, w: int, h: int) -> None:
        """SlideError when a ``w`` x ``h`` window of ``level``, or one of the tiles it is decoded
        from, holds more than ``MAX_WINDOW_PIXELS``: a header must not size our allocations."""
        tw, th = self.tile_sizes[level]
        if w * h > MAX_WINDOW_PIXELS:
            raise SlideError(
                f"{self.path}: a window of {w} x {h} px would be decoded at once, more than the "
                f"{_mp(MAX_WINDOW_PIXELS)} cap; read it in tiles"
            )
        if tw * th > MAX_WINDOW_PIXELS:
            raise SlideError(
                f"{self.path}: level {level}'s tiles of {tw} x {th} px would be decoded whole for "
                f"any read, more than the {_mp(MAX_WINDOW_PIXELS)} cap; the file is not a tiled "
                "slide we can read"
            )

    def _check_level(self, level: int) -> int:
        level = int(level)
        if level < 0:
            level += self.level_count
        if not 0 <= level < self.level_count:
            raise IndexError(f"{self.path}: level {level} out of range (0..{self.level_count - 1})")
        return level


# ---------------------------------------------------------------------------------------------
# input checks


def check_mpp(mpp: float, where: object = "slide") -> float:
    """``mpp`` as a float, or SlideError (naming ``where``) unless it is within ``MPP_RANGE``."""
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise SlideError(f"{where}: mpp must be a number of µm per pixel, not {mpp!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise SlideError(f"{where}: mpp must be a positive number of µm per pixel, not {value:.6g}")
    lo, hi = MPP_RANGE
    if not lo <= value <= hi:
        raise SlideError(
            f"{where}: mpp {value:.6g} µm/px is outside the plausible range of a scan's level-0 "
            f"pixel size ({lo:g} to {hi:g} µm/px; 0.25 is 40x, 0.5 is 20x)"
        )
    return value


def check_decodable(slide: Slide) -> None:
    """Decode one tile of every level; SlideError naming the level and its codec when one fails.

    Opening reads only the header, so a slide whose pixels no decoder here reads (an unknown or
    unsupported compression) would otherwise open fine and fail on every patch later.
    """
    for level, (lw, lh) in enumerate(slide.level_dimensions):
        tw, th = slide.tile_sizes[level]
        size = (max(1, min(tw, lw)), max(1, min(th, lh)))
        try:
            slide.read_region((0, 0), level, size)
        except SlideError as exc:
            codec = slide.compressions[level]
            why = _short(exc.__cause__) if exc.__cause__ is not None else str(exc)
            using = f" (codec {codec})" if codec else ""
            raise SlideError(
                f"{slide.path}: the pixels of level {level} cannot be decoded{using}: {why}"
            ) from exc


def _mp(pixels: float) -> str:
    """Pixels as megapixels for messages: ``64 MP``."""
    return f"{pixels / 2**20:,.0f} MP"


def check_overview_size(slide: Any, size_wh: tuple[int, int], what: str = "overview") -> None:
    """SlideError when an overview of ``size_wh`` px of ``slide`` (its tissue LR image, a
    thumbnail) is over ``MAX_OVERVIEW_PIXELS``: only a header lying about the size gets there."""
    w, h = (int(v) for v in size_wh)
    if w * h > MAX_OVERVIEW_PIXELS or max(w, h) > MAX_OVERVIEW_SIDE:
        sw, sh = slide.dimensions
        raise SlideError(
            f"{slide_label(slide)}: its {what} would be {w} x {h} px ({_mp(w * h)}), over the cap "
            f"of {_mp(MAX_OVERVIEW_PIXELS)} and {MAX_OVERVIEW_SIDE} px a side; the header claims "
            f"{sw} x {sh} px, more than a glass slide holds at this mpp"
        )


def slide_label(slide: Any) -> str:
    """What messages call a slide: its path, else its name."""
    return str(getattr(slide, "path", None) or getattr(slide, "name", None) or "slide")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory, not a slide file")
    if not os.access(path, os.R_OK):
        raise SlideError(f"{path}: permission denied")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix in TIFF_EXTENSIONS:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head not in _TIFF_MAGIC:
            what = _describe(head, path)
            raise SlideError(f"{path}: not a slide: the file is {what}, not a TIFF")


def _describe(head: bytes, path: Path) -> str:
    """A few words on what a non-TIFF file looks like (for the error message)."""
    with open(path, "rb") as fh:
        sample = fh.read(512)
    if head.startswith(b"\xff\xd8"):
        return "a JPEG image"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"PK"):
        return "a ZIP archive"
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown binary content"
    return "a text file"


def _float_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


# Level-0 µm per pixel of anything scanned through a microscope. A generic TIFF's default
# 72 or 96 dpi (≈ 350 / 265 µm/px) is not a scan's mpp: treat it as missing, never guess.
_MPP_RANGE = (0.01, 100.0)


def _mpp_or_none(value: Any) -> float | None:
    v = _float_or_none(value)
    return v if v is not None and _MPP_RANGE[0] <= v <= _MPP_RANGE[1] else None


def _to_rgb(arr: np.ndarray, what: str) -> np.ndarray:
    """uint8 (H, W, 3) from gray, RGB or RGBA (alpha composited on white)."""
    if arr.dtype != np.uint8:
        raise SlideError(f"{what}: {arr.dtype} pixels; only 8-bit RGB (brightfield) is supported")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return arr
    if arr.ndim == 3 and arr.shape[2] == 4:
        return _rgba_on_white(arr)
    raise SlideError(f"{what}: pixels of shape {arr.shape}; expected RGB")


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * a + _WHITE * (255 - a) + 127) // 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# backends


class _Backend:
    def __init__(self) -> None:
        self._uid = uuid.uuid4().hex[:12]

    properties: dict[str, Any]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...] | None
    tile_sizes: tuple[tuple[int, int], ...]
    compressions: tuple[str | None, ...]
    mpp: float | None
    objective_power: float | None
    vendor: str | None

    def level_array(self, level: int): ...
    def read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray: ...
    def associated_images(self) -> Mapping[str, Any]: ...
    def associated_names(self) -> tuple[str, ...]: ...
    def close(self) -> None: ...


class _TiffSlideBackend(_Backend):
    def __init__(self, path: Path) -> None:
        import tiffslide

        from hdmil.reading import quiet_zarr_orphans

        quiet_zarr_orphans()  # a corrupt tile: one SlideError line, not zarr's orphaned tasks
        super().__init__()
        self.path = path
        try:
            self._ts = tiffslide.TiffSlide(path)
            props = dict(self._ts.properties)
            dims = tuple((int(w), int(h)) for w, h in self._ts.level_dimensions)
            group = self._ts.zarr_group
            arrays = [group[str(i)] for i in range(len(dims))]
        except SlideError:
            raise
        except Exception as exc:  # tifffile / tiffslide raise many kinds for unreadable files
            raise SlideError(
                f"{path}: cannot be read as a slide by tiffslide: {_short(exc)}"
            ) from exc
        if not dims or min(min(d) for d in dims) < 1:
            raise SlideError(f"{path}: the slide has no image data")
        axes = str(props.get("tiffslide.series-axes") or "YXS")
        for i, a in enumerate(arrays):
            channels = 1 if axes == "YX" else a.shape[0] if axes == "CYX" else a.shape[-1]
            if a.dtype != np.uint8 or axes not in ("YXS", "YX", "CYX") or channels not in (1, 3, 4):
                raise SlideError(
                    f"{path}: level {i} has {a.dtype} pixels of shape {a.shape} ({axes}); "
                    "only 8-bit RGB (brightfield) slides are supported"
                )
        self._axes = axes
        self._arrays = arrays
        self.properties = props
        self.level_dimensions = dims
        self.level_downsamples = tuple(float(d) for d in self._ts.level_downsamples)
        yx = (0, 1) if axes != "CYX" else (1, 2)
        self.tile_sizes = tuple((int(a.chunks[yx[1]]), int(a.chunks[yx[0]])) for a in arrays)
        self.compressions = _tiff_compressions(self._ts, props, len(arrays))
        self.mpp = _mpp_or_none(props.get("tiffslide.mpp-x"))
        self.objective_power = _float_or_none(props.get("tiffslide.objective-power"))
        vendor = props.get("tiffslide.vendor")
        self.vendor = str(vendor) if vendor else None

    def level_array(self, level: int):
        import dask.array as da

        # A unique, cheap name: dask would otherwise tokenize the zarr store, and napari's chunk
        # cache is keyed by it, so it must never repeat for another file.
        name = f"hdmil-slide-{self._uid}-{level}"
        arr = da.from_zarr(self._arrays[level], name=name)
        # Only non-RGB layouts get a (chunk-preserving) view on top of from_zarr.
        if self._axes == "CYX":
            arr = arr.transpose(1, 2, 0)
        elif self._axes == "YX":
            arr = arr[:, :, None]
        if arr.shape[2] == 1:
            arr = da.concatenate([arr, arr, arr], axis=2)
        elif arr.shape[2] == 4:
            arr = arr.map_blocks(_rgba_on_white, chunks=arr.chunks[:2] + ((3,),), dtype=np.uint8)
        return arr

    def read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        z = self._arrays[level]
        try:
            if self._axes == "CYX":
                win = np.asarray(z[:, y0:y1, x0:x1]).transpose(1, 2, 0)
            else:
                win = np.asarray(z[y0:y1, x0:x1])
        except Exception as exc:
            from hdmil.reading import settle_zarr_reads

            settle_zarr_reads()  # its other chunk reads, else each is a traceback at exit
            raise SlideError(
                f"{self.path}: cannot decode level {level} at ({x0}, {y0}): {_short(exc)}"
            ) from exc
        if win.ndim == 3 and win.shape[2] == 1:
            win = win[:, :, 0]
        return _to_rgb(win, str(self.path))

    def associated_names(self) -> tuple[str, ...]:
        return tuple(self._ts.associated_images.keys())

    def associated_images(self) -> Mapping[str, Any]:
        out = {}
        for name in self.associated_names():
            try:
                out[name] = np.asarray(self._ts.associated_images[name].convert("RGB"))
            except Exception:  # a corrupt label must not stop the slide from opening
                continue
        return out

    def close(self) -> None:
        self._ts.close()


class _OpenSlideBackend(_Backend):
    def __init__(self, path: Path) -> None:
        try:
            import openslide
        except ImportError as exc:
            raise SlideError(
                f"{path}: {path.suffix or 'this'} slides need OpenSlide, which is not installed; "
                f"{_OPENSLIDE_HINT}"
            ) from exc
        except OSError as exc:  # openslide-python without a loadable libopenslide
            raise SlideError(
                f"{path}: the OpenSlide library cannot be loaded ({exc}); {_OPENSLIDE_HINT}"
            ) from exc
        super().__init__()
        self.path = path
        try:
            self._os = openslide.OpenSlide(str(path))
        except Exception as exc:
            raise SlideError(
                f"{path}: cannot be read as a slide by OpenSlide: {_short(exc)}"
            ) from exc
        props = dict(self._os.properties)
        self.properties = props
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._os.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._os.level_downsamples)
        tiles = []
        for i in range(len(self.level_dimensions)):
            tw = int(props.get(f"openslide.level[{i}].tile-width", 0) or 0)
            th = int(props.get(f"openslide.level[{i}].tile-height", 0) or 0)
            # Chunks of whole tiles, at least 256 px (MRXS tiles can be tiny): a small graph.
            tiles.append((_whole_tiles(tw), _whole_tiles(th)))
        self.tile_sizes = tuple(tiles)
        self.compressions = (None,) * len(tiles)
        self.mpp = _mpp_or_none(props.get("openslide.mpp-x"))
        self.objective_power = _float_or_none(props.get("openslide.objective-power"))
        self.vendor = props.get("openslide.vendor") or None

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        loc = (int(round(x0 * ds)), int(round(y0 * ds)))
        img = self._os.read_region(loc, level, (x1 - x0, y1 - y0))
        return _rgba_on_white(np.asarray(img))

    def level_array(self, level: int):
        import dask.array as da

        w, h = self.level_dimensions[level]
        tw, th = self.tile_sizes[level]
        chunks = (_chunk_sizes(h, th), _chunk_sizes(w, tw), (3,))

        def block(block_info=None):
            (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
            return self._read(level, x0, y0, x1, y1)

        name = f"hdmil-openslide-{self._uid}-{level}"
        meta = np.empty((0, 0, 3), np.uint8)
        return da.map_blocks(block, chunks=chunks, dtype=np.uint8, name=name, meta=meta)

    def read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        try:
            return self._read(level, x0, y0, x1, y1)
        except Exception as exc:
            raise SlideError(
                f"{self.path}: cannot decode level {level} at ({x0}, {y0}): {_short(exc)}"
            ) from exc

    def associated_names(self) -> tuple[str, ...]:
        return tuple(self._os.associated_images.keys())

    def associated_images(self) -> Mapping[str, Any]:
        return {k: np.asarray(v) for k, v in self._os.associated_images.items()}

    def close(self) -> None:
        self._os.close()


def _tiff_compressions(ts: Any, props: Mapping[str, Any], n: int) -> tuple[str | None, ...]:
    """Each level's codec from its first page's Compression tag; None when it cannot be read."""
    import tifffile

    try:
        series = ts.ts_tifffile.series[int(props.get("tiffslide.series-index") or 0)]
        codes = [int(lv.pages[0].tags["Compression"].value) for lv in series.levels[:n]]
    except Exception:  # noqa: BLE001 - only a label for messages: never stop a slide opening
        return (None,) * n
    names: list[str | None] = []
    for code in codes:
        try:
            names.append(f"{tifffile.COMPRESSION(code).name}, Compression tag {code}")
        except ValueError:
            names.append(f"unknown, Compression tag {code}")
    return tuple(names + [None] * (n - len(names)))


def _try_openslide(path: Path) -> _OpenSlideBackend | None:
    try:
        return _OpenSlideBackend(path)
    except SlideError:
        return None


def _whole_tiles(tile: int, at_least: int = 256) -> int:
    return tile * math.ceil(at_least / tile) if tile > 0 else 512


def _chunk_sizes(n: int, tile: int) -> tuple[int, ...]:
    full, rest = divmod(n, tile)
    return (tile,) * full + ((rest,) if rest else ())


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."
