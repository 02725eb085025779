"""What the benchmarks share: the real CMU slide, cached synthetic ones (git-ignored), the paper's
per-slide seconds and the machine's load (printed with every table)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"

# The paper's seconds per Camelyon16 slide on its GPU (Table 2): HDMIL / HDMIL†.
PAPER = {"total": (16.75, 23.46), "crop": (10.88, 13.45), "features": (5.84, 10.00), "lipn": (0.01, None)}


def synthetic_slide(size: int, seed: int, tumor_fraction: float = 0.3) -> Path:
    """A cached synthetic slide of ``size``² px (made on first use; ~30 s for 20k² on 2 idle cores)."""
    from hdmil.synth import synth_slide

    path = RESULTS / "slides" / f"synth-{size}-s{seed}.tiff"
    if not path.exists():
        print(f"making {path} (once) ...", file=sys.stderr, flush=True)
        synth_slide(path, size=(size, size), seed=seed, tumor_fraction=tumor_fraction)
    return path


def load_line() -> str:
    """``uptime``'s load averages and the clock, for the line under each table."""
    one, five, fifteen = os.getloadavg()
    stamp = time.strftime("%H:%M:%S UTC", time.gmtime())
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} at {stamp} on {os.cpu_count()} cores"


def paper_line() -> str:
    """The paper's per-slide seconds, to print beside ours (they are GPU seconds on Camelyon16)."""
    t, c, f = PAPER["total"], PAPER["crop"], PAPER["features"]
    return (f"paper (Camelyon16, GPU, s/slide): HDMIL {t[0]:.2f}, HDMIL† {t[1]:.2f} (ratio {t[0] / t[1]:.2f}); "
            f"crop {c[0]:.2f} / {c[1]:.2f}; features {f[0]:.2f} / {f[1]:.2f}; LIPN {PAPER['lipn'][0]:.2f}")


def warm_file(path: Path) -> None:
    """Read the file once so every method finds it in the page cache."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass
