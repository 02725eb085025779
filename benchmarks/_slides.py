"""Slides the benchmarks share: the real CMU slide and cached synthetic ones (git-ignored)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def synthetic_slide(size: int, seed: int, tumor_fraction: float = 0.3) -> Path:
    """A cached synthetic slide of ``size``² px (made on first use; ~30 s for 20k² on 2 idle cores)."""
    from hdmil.synth import synth_slide

    path = RESULTS / "slides" / f"synth-{size}-s{seed}.tiff"
    if not path.exists():
        print(f"making {path} (once) ...", file=sys.stderr, flush=True)
        synth_slide(path, size=(size, size), seed=seed, tumor_fraction=tumor_fraction)
    return path
