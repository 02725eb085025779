"""Crop-stage benchmark: tile-aligned patch reading against this machine's raw tile-decode rate.

    python benchmarks/reading.py                    # CMU-1-Small-Region + a 20480² synthetic slide
    python benchmarks/reading.py --size 8192        # a smaller synthetic slide (quicker to make)
    python benchmarks/reading.py --slides a.svs b.tiff

For each slide, measured in the same run:

* raw decode rate: every JPEG tile of level 0 decoded once from bytes already in memory, with
  tifffile's page decoder (imagecodecs), on one core and on a thread pool over all cores. This is
  the ceiling for any reader of this file on this machine;
* ``PatchReader``: all tissue patches of the slide's 20x grid (what HDMIL† reads), drained without
  any feature work, so its throughput is the crop stage's own: patches/s, MB/s of decoded tile
  pixels, and its tile rate as a share of the all-core raw rate (target >= 50%);
* naive baseline: tiffslide ``read_region`` per 256-px patch, one thread (the issue measured 203
  patches/s here, about 9% of the single-core decode rate).

The synthetic slide is made once with ``hdmil.synth.synth_slide`` and cached under
``benchmarks/results/slides/`` (git-ignored). Timings take the best of ``--repeat`` runs, so other
load on a shared machine shows less.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from _slides import CMU, synthetic_slide  # beside this script (benchmarks/)


def raw_decode_rate(path: Path, workers: int, repeat: int) -> tuple[int, float, float]:
    """(tiles, tiles/s on one core, tiles/s on ``workers`` threads): level 0, each tile once."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].keyframe
        fh = tif.filehandle
        blobs = []
        for off, n in zip(page.dataoffsets, page.databytecounts):
            fh.seek(off)
            blobs.append(fh.read(n))
        decode, tables = page.decode, page.jpegtables
        header = getattr(page, "jpegheader", None)

        def one(i: int) -> None:
            decode(blobs[i], i, jpegtables=tables, jpegheader=header)

        n = len(blobs)
        one_core = max_rate(lambda: [one(i) for i in range(min(n, 2000))], min(n, 2000), repeat)
        with ThreadPoolExecutor(workers) as pool:
            chunks = [range(s, min(s + 64, n)) for s in range(0, n, 64)]
            all_cores = max_rate(lambda: list(pool.map(lambda r: [one(i) for i in r], chunks)), n, repeat)
    return n, one_core, all_cores


def max_rate(fn, count: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return count / best


def reader_rate(path: Path, coords: np.ndarray, size: int, workers: int, repeat: int, batch: int):
    from hdmil.reading import PatchReader
    from hdmil.slide import open_slide

    best = None
    for _ in range(repeat):
        with open_slide(path) as slide:
            reader = PatchReader(slide, coords, size, batch_size=batch, workers=workers)
            t = time.perf_counter()
            n = sum(len(b) for b in reader)
            dt = time.perf_counter() - t
        assert n == len(coords), f"read {n} of {len(coords)} patches"
        if best is None or dt < best[0]:
            best = (dt, reader.n_tiles_decoded, reader.bytes_decoded, reader.peak_tiles_cached)
    return best


def naive_rate(path: Path, coords: np.ndarray, size: int, limit: int) -> float:
    import tiffslide

    rng = np.random.default_rng(0)
    pick = coords[rng.permutation(len(coords))[:limit]]
    with tiffslide.TiffSlide(path) as ts:
        t = time.perf_counter()
        for x, y in pick:
            ts.read_region((int(x), int(y)), 0, (size, size), as_array=True)
        return len(pick) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", nargs="*", type=Path, help="slides to measure (default: CMU + synthetic)")
    ap.add_argument("--size", type=int, default=20480, help="side of the synthetic slide (px)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts")
    ap.add_argument("--naive-patches", type=int, default=300, help="patches for the read_region baseline")
    args = ap.parse_args(argv)

    from hdmil.grid import build_grid
    from hdmil.slide import open_slide

    slides = args.slides or [p for p in (CMU,) if p.exists()] + [synthetic_slide(args.size, args.seed)]
    rows = []
    for path in slides:
        with open_slide(path) as slide:
            grid = build_grid(slide)
            dims = slide.dimensions
            tile = slide.tile_sizes[0]
        coords, size = grid.coords, grid.patch_size_level0
        n_tiles, one_core, all_cores = raw_decode_rate(path, args.workers, args.repeat)
        dt, tiles, nbytes, peak = reader_rate(path, coords, size, args.workers, args.repeat, args.batch_size)
        naive = naive_rate(path, coords, size, args.naive_patches)
        rows.append(
            dict(
                slide=path.name, size=f"{dims[0]}x{dims[1]}", tile=f"{tile[0]}", patches=len(coords),
                level_tiles=n_tiles, tiles_read=tiles, one_core=one_core, all_cores=all_cores,
                reader_pps=len(coords) / dt, reader_mbs=nbytes / dt / 1e6, reader_tps=tiles / dt,
                share=tiles / dt / all_cores, naive_pps=naive, peak_tiles=peak, tile_mb=tile[0] * tile[1] * 3 / 1e6,
            )
        )

    print(f"\nworkers {args.workers} (cores {os.cpu_count()}), batch {args.batch_size}, best of {args.repeat}\n")
    head = (
        "| slide | size | tile | patches | tiles decoded | raw decode 1 core (tiles/s) | raw decode all cores "
        "(tiles/s) | PatchReader patches/s | PatchReader MB/s | PatchReader tiles/s | share of all-core rate "
        "| read_region patches/s | speed-up vs read_region | peak tiles held (MB) |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['slide']} | {r['size']} | {r['tile']} | {r['patches']} | {r['tiles_read']} / {r['level_tiles']} "
            f"| {r['one_core']:.0f} | {r['all_cores']:.0f} | {r['reader_pps']:.0f} | {r['reader_mbs']:.0f} "
            f"| {r['reader_tps']:.0f} | {r['share']:.0%} | {r['naive_pps']:.0f} | {r['reader_pps'] / r['naive_pps']:.1f}x "
            f"| {r['peak_tiles']} ({r['peak_tiles'] * r['tile_mb']:.0f}) |"
        )
    ok = all(r["share"] >= 0.5 for r in rows)
    print(f"\ntarget: PatchReader >= 50% of the all-core raw decode rate: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
