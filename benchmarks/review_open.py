"""Reopening benchmark: a saved result against recomputing it (issue 16: opening a result folder of
a 20k x 20k slide's results takes under a second).

    python benchmarks/review_open.py                 # 20000² synthetic slide, bundled model, 3 repeats
    python benchmarks/review_open.py --size 8192 --repeats 5

Two ways to the same layers, timed in one process and interleaved (open, recompute, open, ...),
the fastest of each counted, so other load on a shared machine shows less:

* open: ``hdmil.pipeline.result.load_result`` on the results folder (the slide found from the
  report and its fingerprint checked: size + SHA-256 of its first MiB) and every result layer
  built (``napari_hdmil._layers.result_layers``), no model loaded;
* recompute: ``run_slide`` with the bundled model (encoder built and warmed once, outside the
  timing) and the same layers built from its result.

The slide is made once with ``hdmil.synth`` and cached in benchmarks/results/slides/ (git-ignored);
its results folder is written by the first recompute.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from _slides import RESULTS, synthetic_slide  # beside this script (benchmarks/)


def _open(folder: Path) -> tuple[float, int]:
    from hdmil.pipeline.result import load_result
    from napari_hdmil._layers import result_layers

    t0 = time.perf_counter()
    layers = result_layers(load_result(folder))
    return time.perf_counter() - t0, len(layers)


def _recompute(slide: Path, model, encoder, folder: Path | None) -> tuple[float, int, object]:
    from hdmil.pipeline import run_slide
    from napari_hdmil._layers import result_layers

    t0 = time.perf_counter()
    res = run_slide(slide, model, encoder=encoder)
    layers = result_layers(res)
    seconds = time.perf_counter() - t0
    if folder is not None:
        res.save(folder)
    return seconds, len(layers), res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="synthetic slide side in px (default 20000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from hdmil.checkpoint import default_model_path, load_model
    from hdmil.pipeline import encoder_for, warm_up

    slide = synthetic_slide(args.size, args.seed)
    model = load_model(default_model_path())
    encoder = encoder_for(model, None)
    warm_up(model, encoder, patch_px=model.patch_px)
    folder = RESULTS / "review_open" / slide.stem
    opened: list[float] = []
    recomputed: list[float] = []
    res = None
    for i in range(args.repeats):
        t, _, res = _recompute(slide, model, encoder, folder if i == 0 else None)
        recomputed.append(t)
        if i == 0:
            _open(folder)  # first import of h5py / napari layer code, not counted
        t, n_layers_o = _open(folder)
        opened.append(t)
        print(f"repeat {i + 1}: open {t:.3f} s, recompute {recomputed[-1]:.2f} s", file=sys.stderr, flush=True)
    size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    best_o, best_r = min(opened), min(recomputed)
    print(f"\nslide {slide.name}: {args.size} x {args.size} px, {res.n_patches} tissue patches, "
          f"{res.n_read} read ({res.kept_ratio:.0%}), results folder {size_mb:.1f} MB, "
          f"{n_layers_o} layers; cpu count {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    print(f"\n| way | fastest of {args.repeats} (s) | median (s) |\n|---|---|---|")
    print(f"| open (load_result + layers) | {best_o:.3f} | {np.median(opened):.3f} |")
    print(f"| recompute (run_slide + layers) | {best_r:.2f} | {np.median(recomputed):.2f} |")
    print(f"| ratio recompute / open | {best_r / best_o:.0f}x | |")
    print(f"\nopen under a second: {'yes' if best_o < 1.0 else 'NO'}")
    return 0 if best_o < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
