"""Synthetic slide generation: seconds, px/s and peak memory against tifffile's own floor.

    python benchmarks/synth.py            # 2k² and 10k² slides
    python benchmarks/synth.py --large    # and a 50k x 50k slide

Each run happens in a fresh process (so peak RSS is its own). The baseline, measured in the same
run, is tifffile writing the same pyramid (same levels, tiles, JPEG settings) from a generator of
constant tiles: the cost of the file format alone. ``ratio`` = synth seconds / baseline seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child_synth(size: int, out: Path, workers: int | None) -> dict:
    from hdmil.synth import synth_slide

    t = time.perf_counter()
    c = time.process_time()
    synth_slide(out, size=(size, size), seed=1, tumor_fraction=0.1, workers=workers)
    return {
        "seconds": time.perf_counter() - t,
        "cpu_main": time.process_time() - c,
        "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "bytes": out.stat().st_size,
    }


def _child_baseline(size: int, out: Path) -> dict:
    import numpy as np
    import tifffile

    from hdmil.synth import slide as sm

    dims = sm._level_dims((size, size))
    tile = np.full((256, 256, 3), (200, 120, 160), np.uint8)
    t = time.perf_counter()
    with tifffile.TiffWriter(out, bigtiff=size * size * 3 > 2**31) as tw:
        for k, (w, h) in enumerate(dims):
            n = (-(-w // 256)) * (-(-h // 256))
            tw.write((tile for _ in range(n)), shape=(h, w, 3), dtype=np.uint8, tile=(256, 256),
                     compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                     subfiletype=1 if k else 0, metadata=None, buffersize=8 << 20, maxworkers=1)
    return {"seconds": time.perf_counter() - t,
            "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_child(kind: str, size: int, out: Path, workers: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(size), str(out)]
    if workers:
        cmd += ["--workers", str(workers)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also a 50k x 50k px slide")
    ap.add_argument("--workers", type=int, default=None, help="rendering processes")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "SIZE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, size, out = args.child
        fn = _child_synth if kind == "synth" else _child_baseline
        kw = {"workers": args.workers} if kind == "synth" else {}
        print(json.dumps(fn(int(size), Path(out), **kw)))
        return 0

    sizes = [2048, 10240] + ([50000] if args.large else [])
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    print(f"{'size':>13} {'tiles':>7} {'synth s':>8} {'cpu main s':>10} {'Mpx/s':>7} "
          f"{'RSS main MB':>11} {'RSS worker MB':>13} {'MB file':>8} {'baseline s':>10} "
          f"{'ratio':>6}")
    with tempfile.TemporaryDirectory() as d:
        for size in sizes:
            from hdmil.synth import slide as sm

            n_tiles = sum((-(-w // 256)) * (-(-h // 256)) for w, h in sm._level_dims((size, size)))
            base = _run_child("baseline", size, Path(d) / f"b{size}.tiff", None)
            res = _run_child("synth", size, Path(d) / f"s{size}.tiff", args.workers)
            print(f"{size:>6} x {size:<6} {n_tiles:>7} {res['seconds']:>8.1f} "
                  f"{res['cpu_main']:>10.1f} {size * size / res['seconds'] / 1e6:>7.2f} "
                  f"{res['rss_main_mb']:>11.0f} {res['rss_worker_mb']:>13.0f} "
                  f"{res['bytes'] / 1e6:>8.1f} {base['seconds']:>10.2f} "
                  f"{res['seconds'] / base['seconds']:>6.1f}", flush=True)
            for p in Path(d).glob("*"):
                p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
