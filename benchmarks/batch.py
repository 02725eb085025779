"""Slides per hour of `hdmil batch` with 1 and 2 Dask worker processes, on the same synthetic slides.

    python benchmarks/batch.py [--slides 6] [--size 4096] [--model CKPT]

Without --model a checkpoint over the registered ``resnet18_trunc`` encoder (seeded weights) is
made, so the run needs no download. The 1-worker run is the baseline; each run writes to a fresh
folder so neither skips work.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from hdmil.batch import run_batch
from hdmil.checkpoint import save_checkpoint
from hdmil.models import DMIN, LIPN, DMINConfig, LIPNConfig
from hdmil.synth import synth_slide

CACHE = Path(__file__).resolve().parent / "results" / "batch"


def make_model(path: Path) -> Path:
    torch.manual_seed(0)
    dmin = DMIN(DMINConfig(in_dim=256, n_classes=2)).eval()
    lipn = LIPN(LIPNConfig(n_classes=2)).eval()
    with torch.no_grad():  # keeps every patch: the benchmark measures the batch machinery, not LIPN
        lipn.fc.bias.copy_(torch.tensor([20.0, 20.0]))
    return save_checkpoint(path, {"dmin": dmin, "lipn": lipn},
                           {"classes": ["normal", "tumor"], "encoder": "resnet18_trunc"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--model")
    args = ap.parse_args(argv)

    slide_dir = CACHE / f"slides-{args.size}"
    slide_dir.mkdir(parents=True, exist_ok=True)
    slides = []
    for seed in range(args.slides):
        path = slide_dir / f"s{seed}.tiff"
        if not path.exists():
            synth_slide(path, size=(args.size, args.size), seed=100 + seed, tumor_fraction=0.1 * (seed % 2))
        slides.append(path)
    model = Path(args.model) if args.model else make_model(CACHE / "model.safetensors")

    rows = []
    for workers in (1, 2):
        out = Path(tempfile.mkdtemp(prefix=f"batch-{workers}w-"))
        t0 = time.perf_counter()
        summary = run_batch(slides, out, model_path=model, workers=workers)
        wall = time.perf_counter() - t0  # includes starting the cluster, as a user waits for it
        rows.append((workers, summary.n_ok, summary.n_failed, wall, 3600 * summary.n_ok / wall,
                     summary.mean_seconds()["total"]))
        shutil.rmtree(out, ignore_errors=True)

    base = rows[0][4]
    print(f"\n{args.slides} synthetic slides of {args.size}² px, 'hdmil batch' on a LocalCluster\n")
    print(f"{'workers':>7} {'ok':>4} {'failed':>6} {'wall s':>8} {'slides/h':>9} {'s/slide (task)':>15} {'vs 1 worker':>12}")
    for w, ok, failed, wall, sph, per in rows:
        print(f"{w:>7} {ok:>4} {failed:>6} {wall:>8.1f} {sph:>9.0f} {per:>15.2f} {sph / base:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
