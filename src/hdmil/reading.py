"""Fast, bounded reading of HR patches: tile-aligned, each file tile decoded once, prefetched.

The crop stage (read + decode + resize) is the largest cost of hierarchical inference wherever
features are fast, so patches are not read one ``read_region`` at a time. Instead:

* patches are sorted in tile order (row-major by the tile holding their top-left corner) and
  cut out of decoded file tiles; each tile is decoded exactly once per slide, straight from the
  TIFF bytes with the page's own codec (imagecodecs, which releases the GIL);
* a decoded tile is kept only until the last patch that needs it has been cut, so memory holds a
  band of tile rows, never a whole level;
* a thread pool on all cores decodes tiles and cuts patches, and a background thread prefetches
  fixed-size batches into a bounded queue, so decoding overlaps the caller's feature computation.

Slides that are not tiled TIFFs (OpenSlide formats, stripped TIFFs, unusual layouts) are read with
``slide.read_region`` per patch, on the same pool and prefetch queue.

>>> reader = PatchReader(slide, grid.coords, grid.patch_size_level0)
>>> for batch in reader:
...     feats = encoder.embed(batch.pixels)      # batch.indices: rows of grid.coords
>>> reader.n_read, reader.n_tiles_decoded
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import check_cancelled

__all__ = [
    "PatchBatch", "PatchReader", "area_resize", "choose_level", "iter_patches", "quiet_zarr_orphans",
    "settle_zarr_reads",
]

ProgressFn = Callable[[str, int, int], None]

# Out-of-bounds pixels (a patch hanging over the slide edge) are white, as Slide.read_region pads.
OUT_OF_BOUNDS_FILL = 255
# A tile the file does not store (byte count 0) reads as tifffile's fill value.
MISSING_TILE_FILL = 0
# Batches submitted to the pool ahead of the one being finished (keeps all cores busy at batch
# boundaries without holding more tiles).
_IN_FLIGHT = 2


class _ZarrOrphans(logging.Filter):
    """Drops asyncio's reports of zarr's orphaned chunk tasks.

    zarr reads a window's chunks as concurrent asyncio tasks; when one chunk of a corrupt or
    truncated slide fails, the first error reaches us (and becomes one ``SlideError`` line) while
    the sibling tasks are left to the garbage collector, which logs "Task exception was never
    retrieved" / "Task was destroyed but it is pending!" with a traceback each: hundreds of lines
    about the one error already reported.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        orphan = text.startswith(("Task exception was never retrieved", "Task was destroyed but"))
        return not (orphan and "zarr" in text)


_ZARR_FILTER = _ZarrOrphans()


def quiet_zarr_orphans() -> None:
    """Install the filter on asyncio's logger (once; cheap to call on every slide opened)."""
    log = logging.getLogger("asyncio")
    if _ZARR_FILTER not in log.filters:
        log.addFilter(_ZARR_FILTER)


def settle_zarr_reads(timeout: float = 5.0) -> None:
    """After a failed zarr read: let its sibling chunk tasks finish and collect their errors.

    Left alone they are still queued on zarr's event loop at exit, where each prints a
    "coroutine was never awaited" / "Event loop is closed" traceback of its own.
    """
    import asyncio

    try:
        from zarr.core.sync import sync
    except ImportError:  # zarr 2 reads synchronously: nothing is left behind
        return

    async def drain() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            done, _ = await asyncio.wait(others, timeout=timeout)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: asyncio does not report it again

    try:
        sync(drain())
    except Exception:  # noqa: BLE001 - best effort: the read's own error is what matters
        pass


@dataclass
class PatchBatch:
    """One batch of HR patches, in tile order.

    indices: int64 [B] rows of the ``coords`` given to the reader.
    pixels: uint8 [B, out_px, out_px, 3].
    failed: (row, message) for patches of this batch that could not be decoded (not in ``indices``).
    """

    indices: np.ndarray
    pixels: np.ndarray
    failed: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------------------------------------
# geometry


def choose_level(
    level_downsamples: tuple[float, ...] | list[float], patch_size_level0: int, out_px: int
) -> int:
    """The coarsest level at which a patch still has at least ``out_px`` pixels.

    20x slide: level 0. 40x slide (512 level-0 px per patch) with a 2x-down level: that level;
    with only 4x-down levels: level 0, downsampled afterwards.
    """
    best, best_ds = 0, 0.0
    for level, ds in enumerate(level_downsamples):
        # Half a pixel of slack: 256.5 level-0 px at ds 1.002 still counts as 256.
        if patch_size_level0 / ds >= out_px - 0.5 and ds > best_ds:
            best, best_ds = level, ds
    return best


@lru_cache(maxsize=32)
def _area_taps(n_in: int, n_out: int) -> tuple[tuple[Any, ...], tuple[np.ndarray, ...]]:
    """Exact area-averaging weights for resizing ``n_in`` → ``n_out`` pixels along one axis.

    Output pixel i covers input interval [i·s, (i+1)·s), s = n_in / n_out; it is the sum over
    K taps of ``w[k][i] · in[idx[k][i]]`` (weights = overlap lengths / s). Indices that form an
    arithmetic progression become slices (no gather copy).
    """
    s = n_in / n_out
    k_max = int(math.ceil(s)) + 1
    idx = np.zeros((k_max, n_out), np.intp)
    w = np.zeros((k_max, n_out), np.float64)
    for i in range(n_out):
        a, b = i * s, (i + 1) * s
        j0 = int(math.floor(a + 1e-9))
        for k in range(k_max):
            j = j0 + k
            overlap = min(b, j + 1) - max(a, j)
            if j < n_in and overlap > 1e-9:
                idx[k, i], w[k, i] = j, overlap / s
    used = w.max(axis=1) > 0
    idx, w = idx[used], (w[used] / w[used].sum(axis=0, keepdims=True)).astype(np.float32)
    index: list[Any] = []
    for row in idx:
        step = int(row[1] - row[0]) if n_out > 1 else 1
        if step > 0 and np.array_equal(row, row[0] + step * np.arange(n_out)):
            index.append(slice(int(row[0]), int(row[0]) + step * (n_out - 1) + 1, step))
        else:
            index.append(row)
    return tuple(index), tuple(w)


def area_resize(img: np.ndarray, out_px: int, out: np.ndarray | None = None) -> np.ndarray:
    """Resize a square-ish uint8 (h, w, 3) image to (out_px, out_px, 3) by exact area averaging.

    Separable: each output pixel is the mean of the input pixels its footprint covers, weighted by
    the covered fraction (257 → 256 mixes two neighbours; 512 → 256 averages 2 × 2 blocks).
    """
    h, w = img.shape[:2]
    if out is None:
        out = np.empty((out_px, out_px, img.shape[2]), np.uint8)
    if h == out_px and w == out_px:
        out[...] = img
        return out
    k = h // out_px
    if h == w == k * out_px and k <= 16:
        # Whole factor (40x → 20x): k x k block sums in uint16 (255·k² fits), about twice as
        # fast as the general path and the same numbers (round half up).
        v = img.reshape(out_px, k, out_px, k, -1)
        acc = v[:, 0, :, 0].astype(np.uint16)
        for i in range(k):
            for j in range(k):
                if i or j:
                    acc += v[:, i, :, j]
        acc += (k * k) // 2
        acc //= k * k
        out[...] = acc
        return out
    f = img.astype(np.float32)
    ridx, rw = _area_taps(h, out_px)
    rows = f[ridx[0]] * rw[0][:, None, None]
    for k in range(1, len(ridx)):
        rows += f[ridx[k]] * rw[k][:, None, None]
    cidx, cw = _area_taps(w, out_px)
    cols = rows[:, cidx[0]] * cw[0][None, :, None]
    for k in range(1, len(cidx)):
        cols += rows[:, cidx[k]] * cw[k][None, :, None]
    np.clip(cols + 0.5, 0, 255, out=cols)
    out[...] = cols.astype(np.uint8)  # +0.5 then truncate = round half up
    return out


# ---------------------------------------------------------------------------------------------
# tiled-TIFF access


class _TiledLevel:
    """Raw tiles of one pyramid level of a tiled TIFF: bytes by ``os.pread``, the page's decoder.

    ``open`` returns None when the level is not something this fast path handles (not a TIFF,
    stripped, planar, not 8-bit RGB, ...); the reader then falls back to ``slide.read_region``.
    """

    def __init__(self, path: Path, page: Any, tif: Any) -> None:
        self.path = path
        self._tif = tif
        self.page = page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.n_tx = -(-self.width // self.tile_w)
        self.n_ty = -(-self.height // self.tile_h)
        self.offsets = tuple(int(o) for o in page.dataoffsets)
        self.counts = tuple(int(c) for c in page.databytecounts)
        self._decode = page.decode  # tifffile's per-page decoder (handles JPEG tables, colour)
        self._jpegtables = page.jpegtables
        self._jpegheader = getattr(page, "jpegheader", None)
        self._fd = os.open(path, os.O_RDONLY)

    @classmethod
    def open(cls, path: Path | None, level_shape: tuple[int, int]) -> _TiledLevel | None:
        """The TIFF page of level size (w, h) = ``level_shape``, or None if not usable."""
        if path is None:
            return None
        try:
            import tifffile

            tif = tifffile.TiffFile(path)
        except Exception:
            return None
        try:
            page = _find_page(tif, level_shape)
            if page is None or not _usable(page):
                tif.close()
                return None
            return cls(Path(path), page, tif)
        except Exception:
            tif.close()
            return None

    def tile_index(self, tx: int, ty: int) -> int:
        return ty * self.n_tx + tx

    def decode(self, index: int) -> np.ndarray:
        """Tile ``index`` as uint8 (tile_h, tile_w, 3); raises on a corrupt tile."""
        count = self.counts[index]
        if count == 0:
            return np.full((self.tile_h, self.tile_w, 3), MISSING_TILE_FILL, np.uint8)
        data = os.pread(self._fd, count, self.offsets[index])
        if len(data) != count:
            raise OSError(f"file truncated: {len(data)} of {count} bytes")
        arr = self._decode(data, index, jpegtables=self._jpegtables, jpegheader=self._jpegheader)[0]
        if arr is None:
            raise ValueError("tile could not be decoded")
        arr = np.asarray(arr).reshape(self.tile_h, self.tile_w, -1)
        return arr[..., :3]

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._tif.close()


def _find_page(tif: Any, level_shape: tuple[int, int]) -> Any:
    w, h = level_shape
    for series in tif.series:  # series 0 (the slide) first; associated images never match in size
        for level in series.levels:
            page = level.keyframe
            if tuple(page.shape[:2]) == (h, w) and len(page.shape) == 3:
                return page
    return None


def _usable(page: Any) -> bool:
    return bool(
        page.is_tiled
        and int(getattr(page, "tiledepth", 1) or 1) == 1
        and int(getattr(page, "imagedepth", 1) or 1) == 1
        and int(page.planarconfig) == 1  # contiguous samples
        and int(page.samplesperpixel) == 3
        and int(page.bitspersample) == 8
        and np.dtype(page.dtype) == np.uint8
        and (int(page.photometric) == 2 or (int(page.photometric) == 6 and int(page.compression) == 7))
        and len(page.dataoffsets) == -(-page.imagewidth // page.tilewidth) * -(-page.imagelength // page.tilelength)
    )


class _Slot:
    """One decoded tile: the first patch that needs it decodes it, the others wait on the lock."""

    __slots__ = ("lock", "tile", "error")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tile: np.ndarray | None = None
        self.error: str | None = None


# ---------------------------------------------------------------------------------------------
# the reader


class PatchReader:
    """Reads HR patches of a slide in tile-aligned, prefetched batches.

    Args:
        slide: a ``hdmil.slide.Slide`` (anything with ``path``, ``level_dimensions``,
            ``level_downsamples`` and ``read_region``), or a path, which is opened.
        coords: int [N, 2] level-0 (x, y) of each patch's top-left corner.
        patch_size_level0: side of a patch in level-0 pixels (257 for 256 px at 20x on 0.499 mpp).
        out_px: side of the patches handed out (area-averaged from the read level when different).
        batch_size: patches per batch (the last batch, and batches with failures, are smaller).
        prefetch: batches waiting in the queue for the caller.
        workers: decoding threads; default all cores.

    Counters (valid during and after iteration): ``n_read`` HR patches read, ``n_failed`` patches
    that could not be decoded, ``n_tiles_decoded``, ``bytes_decoded`` (decoded pixel bytes),
    ``bytes_read`` (compressed bytes), ``peak_tiles_cached`` (most tiles held at once, decoded or
    about to be), ``seconds`` (the reader thread's working time, not counting
    time it waited for the caller to take a batch), ``wait_seconds`` (time the caller waited).
    """

    def __init__(
        self,
        slide: Any,
        coords: np.ndarray,
        patch_size_level0: int,
        out_px: int = 256,
        batch_size: int = 64,
        prefetch: int = 2,
        workers: int | None = None,
    ) -> None:
        if isinstance(slide, (str, os.PathLike)):
            from hdmil.slide import open_slide

            slide = open_slide(slide)
            self._own_slide = True
        else:
            self._own_slide = False
        self.slide = slide
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        if patch_size_level0 < 1 or out_px < 1 or batch_size < 1:
            raise ValueError("patch_size_level0, out_px and batch_size must be positive")
        self.coords = coords
        self.patch_size_level0 = int(patch_size_level0)
        self.out_px = int(out_px)
        self.batch_size = int(batch_size)
        self.prefetch = max(1, int(prefetch))
        self.workers = max(1, int(workers or os.cpu_count() or 1))

        downsamples = tuple(float(d) for d in slide.level_downsamples)
        self.level = choose_level(downsamples, self.patch_size_level0, self.out_px)
        self.downsample = downsamples[self.level]
        # Patch side at the read level; level location = floor(x0 / ds), as Slide.read_region does.
        self.patch_px_level = max(1, round(self.patch_size_level0 / self.downsample))
        self._level_xy = np.floor(coords / self.downsample).astype(np.int64)
        self.level_size = tuple(int(v) for v in slide.level_dimensions[self.level])

        self._tiles: _TiledLevel | None = None
        self._tiles_probed = False
        self._tiled: bool | None = None

        self.n_read = 0
        self.n_failed = 0
        self.n_tiles_decoded = 0
        self.bytes_decoded = 0
        self.bytes_read = 0
        self.peak_tiles_cached = 0
        self.seconds = 0.0
        self.wait_seconds = 0.0
        self._lock = threading.Lock()
        self._started = False

    # -- public ----------------------------------------------------------------------------------

    @property
    def tiled(self) -> bool:
        """True when patches are cut from decoded file tiles (else: ``read_region`` per patch)."""
        if self._tiled is None:
            self._tiled = self._tiled_level() is not None
        return self._tiled

    def __iter__(self) -> Iterator[PatchBatch]:
        return self.batches()

    def __len__(self) -> int:
        return len(self.coords)

    def batches(self, progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> Iterator[PatchBatch]:
        """Yield ``PatchBatch`` es until every patch was read (or failed). A reader runs once.

        ``progress("crop", done, total)`` after each batch; ``cancel`` set → ``Cancelled`` before
        the next batch is handed out (the background work stops too).
        """
        if self._started:
            raise RuntimeError("a PatchReader reads its patches once; make a new one")
        self._started = True
        return self._run(progress, cancel)

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
            self._tiles = None
        if self._own_slide:
            self.slide.close()

    # -- planning --------------------------------------------------------------------------------

    def _tiled_level(self) -> _TiledLevel | None:
        if not self._tiles_probed:
            self._tiles_probed = True
            path = getattr(self.slide, "path", None)
            self._tiles = _TiledLevel.open(Path(path) if path else None, self.level_size)
        return self._tiles

    def _patch_tiles(self, tl: _TiledLevel, row: int) -> list[tuple[int, int, int]]:
        """(tile index, tx, ty) of the tiles a patch overlaps (inside the level)."""
        x, y = (int(v) for v in self._level_xy[row])
        s = self.patch_px_level
        tx0, tx1 = max(x, 0) // tl.tile_w, min(x + s, tl.width) - 1
        ty0, ty1 = max(y, 0) // tl.tile_h, min(y + s, tl.height) - 1
        if tx1 < max(x, 0) or ty1 < max(y, 0):
            return []  # the patch lies wholly outside the level
        tx1 //= tl.tile_w
        ty1 //= tl.tile_h
        return [(tl.tile_index(tx, ty), tx, ty) for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]

    def _order(self, tl: _TiledLevel | None) -> np.ndarray:
        """Rows of coords in reading order: row-major by the tile holding the top-left corner."""
        xy = self._level_xy
        if tl is None:
            return np.lexsort((xy[:, 0], xy[:, 1]))
        tx = np.clip(xy[:, 0], 0, None) // tl.tile_w
        ty = np.clip(xy[:, 1], 0, None) // tl.tile_h
        return np.lexsort((xy[:, 0], xy[:, 1], tx, ty))

    # -- the consumer side -----------------------------------------------------------------------

    def _run(self, progress: ProgressFn | None, cancel: threading.Event | None) -> Iterator[PatchBatch]:
        total = len(self.coords)
        # slides of other backends may lack a path (or a name)
        name = getattr(self.slide, "path", None) or getattr(self.slide, "name", "the slide")
        what = f"{name}: reading patches"
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        thread: threading.Thread | None = None
        try:
            if total == 0:
                return
            tl = self._tiled_level()
            self._tiled = tl is not None
            order = self._order(tl)
            thread = threading.Thread(
                target=self._produce, args=(tl, order, q, stop, cancel), name="hdmil-patch-reader", daemon=True
            )
            thread.start()
            done = 0
            while True:
                check_cancelled(cancel, what)
                t0 = time.perf_counter()
                item = None
                while item is None:
                    try:
                        item = q.get(timeout=0.05)
                    except queue.Empty:
                        check_cancelled(cancel, what)
                        if not thread.is_alive() and q.empty():
                            raise RuntimeError("the patch reader thread stopped unexpectedly")
                self.wait_seconds += time.perf_counter() - t0
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                check_cancelled(cancel, what)
                done += len(item.indices) + len(item.failed)
                if progress is not None:
                    progress("crop", done, total)
                yield item
        finally:
            stop.set()
            if thread is not None:
                # Unblock a producer waiting on a full queue, then let it finish its batch.
                while thread.is_alive():
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        thread.join(timeout=0.05)
            self.close()

    # -- the producer side (background thread) ---------------------------------------------------

    def _produce(
        self,
        tl: _TiledLevel | None,
        order: np.ndarray,
        q: queue.Queue,
        stop: threading.Event,
        cancel: threading.Event | None,
    ) -> None:
        t_start = time.perf_counter()
        blocked = 0.0

        def put(item: Any) -> bool:
            nonlocal blocked
            t0 = time.perf_counter()
            try:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        return True
                    except queue.Full:
                        continue
                return False
            finally:
                blocked += time.perf_counter() - t0

        def halted() -> bool:
            return stop.is_set() or (cancel is not None and cancel.is_set())

        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hdmil-decode")
        try:
            n = len(order)
            bs = self.batch_size
            starts = list(range(0, n, bs))
            slots: dict[int, _Slot] = {}
            patch_tiles, evict_after = self._tile_use(tl, order, len(starts))
            pending: list[tuple[int, np.ndarray, list[Future]]] = []
            for b, start in enumerate(starts):
                if halted():
                    return
                stop_pos = min(start + bs, n)
                rows = order[start:stop_pos]
                out = np.empty((len(rows), self.out_px, self.out_px, 3), np.uint8)
                if tl is not None:
                    for pos in range(start, stop_pos):
                        for tid, _, _ in patch_tiles[pos]:
                            if tid not in slots:
                                slots[tid] = _Slot()
                    self.peak_tiles_cached = max(self.peak_tiles_cached, len(slots))
                    futures = [
                        pool.submit(self._cut_from_tiles, tl, int(row), patch_tiles[start + j], slots, out, j)
                        for j, row in enumerate(rows)
                    ]
                else:
                    futures = [pool.submit(self._read_region, int(row), out, j) for j, row in enumerate(rows)]
                pending.append((b, out, futures))
                if len(pending) >= _IN_FLIGHT:
                    if not self._finish(pending.pop(0), starts, order, slots, evict_after, put):
                        return
            while pending:
                if not self._finish(pending.pop(0), starts, order, slots, evict_after, put):
                    return
            put(_END)
        except BaseException as exc:  # handed to the caller's thread
            put(_Failure(exc))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.seconds = time.perf_counter() - t_start - blocked

    def _tile_use(
        self, tl: _TiledLevel | None, order: np.ndarray, n_batches: int
    ) -> tuple[list[list[tuple[int, int, int]]], list[list[int]]]:
        """The tiles of each patch (in reading order), and per batch the tiles no later batch
        needs: the cache drops them once that batch is done."""
        patch_tiles: list[list[tuple[int, int, int]]] = []
        evict_after: list[list[int]] = [[] for _ in range(n_batches)]
        if tl is None:
            return patch_tiles, evict_after
        last_use: dict[int, int] = {}
        for pos, row in enumerate(order):
            tiles = self._patch_tiles(tl, int(row))
            patch_tiles.append(tiles)
            for tid, _, _ in tiles:
                last_use[tid] = pos
        for tid, pos in last_use.items():
            evict_after[pos // self.batch_size].append(tid)
        return patch_tiles, evict_after

    def _finish(self, item, starts, order, slots, evict_after, put) -> bool:
        b, out, futures = item
        errors = [f.result() for f in futures]  # a bug in a task re-raises here
        for tid in evict_after[b]:
            slots.pop(tid, None)
        start = starts[b]
        rows = order[start : start + len(futures)].astype(np.int64)
        ok = np.array([e is None for e in errors], bool)
        failed = [(int(r), e) for r, e in zip(rows, errors) if e is not None]
        if failed:
            rows, out = rows[ok], out[ok]
        with self._lock:
            self.n_read += len(rows)
            self.n_failed += len(failed)
        return put(PatchBatch(indices=rows, pixels=out, failed=failed))

    # -- pool tasks ------------------------------------------------------------------------------

    def _tile(self, tl: _TiledLevel, slot: _Slot, tid: int) -> np.ndarray | None:
        with slot.lock:
            if slot.tile is None and slot.error is None:
                try:
                    tile = tl.decode(tid)
                except Exception as exc:  # a corrupt tile: its patches fail, the slide goes on
                    slot.error = f"{type(exc).__name__}: {exc}".strip()[:200]
                else:
                    slot.tile = tile
                    with self._lock:
                        self.n_tiles_decoded += 1
                        self.bytes_decoded += tile.nbytes
                        self.bytes_read += tl.counts[tid]
            return slot.tile

    def _cut_from_tiles(
        self,
        tl: _TiledLevel,
        row: int,
        tiles: list[tuple[int, int, int]],
        slots: dict[int, _Slot],
        out: np.ndarray,
        j: int,
    ) -> str | None:
        x, y = (int(v) for v in self._level_xy[row])
        s = self.patch_px_level
        direct = s == self.out_px
        buf = out[j] if direct else np.empty((s, s, 3), np.uint8)
        if x < 0 or y < 0 or x + s > tl.width or y + s > tl.height:
            buf[...] = OUT_OF_BOUNDS_FILL
        for tid, tx, ty in tiles:
            slot = slots[tid]
            tile = self._tile(tl, slot, tid)
            if tile is None:
                return f"{self._where(row)}: tile ({tx}, {ty}) of level {self.level} cannot be decoded ({slot.error})"
            # Intersection of the patch with this tile (and with the level), in level pixels.
            gx0, gy0 = tx * tl.tile_w, ty * tl.tile_h
            ix0, iy0 = max(x, gx0), max(y, gy0)
            ix1 = min(x + s, gx0 + tl.tile_w, tl.width)
            iy1 = min(y + s, gy0 + tl.tile_h, tl.height)
            buf[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = tile[iy0 - gy0 : iy1 - gy0, ix0 - gx0 : ix1 - gx0]
        if not direct:
            area_resize(buf, self.out_px, out=out[j])
        return None

    def _read_region(self, row: int, out: np.ndarray, j: int) -> str | None:
        x0, y0 = (int(v) for v in self.coords[row])
        s = self.patch_px_level
        try:
            region = np.asarray(self.slide.read_region((x0, y0), self.level, (s, s)))
        except Exception as exc:
            return f"{self._where(row)}: cannot be read ({type(exc).__name__}: {exc})"[:300]
        region = region[..., :3]
        with self._lock:
            self.bytes_decoded += region.nbytes
        area_resize(region, self.out_px, out=out[j])
        return None

    def _where(self, row: int) -> str:
        x, y = (int(v) for v in self.coords[row])
        name = getattr(self.slide, "path", None) or getattr(self.slide, "name", "slide")
        return f"{name}: patch {row} at ({x}, {y})"


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


def iter_patches(
    slide: Any,
    coords: np.ndarray,
    patch_size_level0: int,
    out_px: int = 256,
    batch_size: int = 64,
    prefetch: int = 2,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[PatchBatch]:
    """Batches of HR patches at ``coords`` (see ``PatchReader``; use it directly for counters)."""
    reader = PatchReader(
        slide, coords, patch_size_level0, out_px=out_px, batch_size=batch_size,
        prefetch=prefetch, workers=workers,
    )
    return reader.batches(progress=progress, cancel=cancel)
