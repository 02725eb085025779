"""Make the SLPD legacy fixtures with an OLD checkout of hdmil (before SLPD moved into models/).

Run from the old checkout, writing into this folder:

    cd <old checkout> && PYTHONPATH=src python <this repo>/tests/data/legacy/slpd/make_slpd_legacy.py \
        --out <this repo>/tests/data/legacy/slpd

It uses only the old API (``hdmil.train.slpd_trainer``) and writes:

- ``cohort/slide{0,1,2}.h5``, ``cohort/small.h5``: tiny feature files (8-d, 8 × 8 and 4 × 4 patch
  grids) with the SLPD outputs the old ``pretrain_slpd`` wrote into them;
- ``slpd_v1.safetensors``: the finished checkpoint of that 2-epoch run (tiny preset, seed 0);
- ``slpd_v1_partial.safetensors``: the same run cancelled in its 2nd epoch (epoch 1 saved, with
  optimizer state);
- ``expected.npz``: what the old code computed from those files (``embed_slide`` of slide0 with the
  loaded checkpoint), for the tests to compare the new code against.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from hdmil.errors import Cancelled
from hdmil.features.io import write_features
from hdmil.models.slpd import slpd_config
from hdmil.train.slpd_trainer import embed_slide, load_slpd, pretrain_slpd

PS = 64  # level-0 px per patch
DIM = 8
EPOCHS = 2


def toy_slide(rng: np.random.Generator, rows: int, cols: int, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """A rows × cols patch grid: left half one patch type, right half another (+ noise)."""
    rr, cc = np.mgrid[:rows, :cols]
    coords = np.stack([cc.ravel(), rr.ravel()], 1) * PS
    centers = np.eye(DIM, dtype=np.float32) * 3
    types = np.where(cc.ravel() < cols // 2, kind % DIM, (kind + 3) % DIM)
    feats = centers[types] + rng.normal(scale=0.3, size=(len(coords), DIM)).astype(np.float32)
    return feats, coords


def write_cohort(folder: Path) -> None:
    """3 slides of 8 × 8 patches (4 regions of 4 × 4: prototypes) and one of 4 × 4 (1 region: none)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        feats, coords = toy_slide(rng, 8, 8, kind=i)
        write_features(folder / f"slide{i}.h5", feats, coords, {"patch_size_level0": PS})
    feats, coords = toy_slide(rng, 4, 4, kind=0)
    write_features(folder / "small.h5", feats, coords, {"patch_size_level0": PS})


def config():
    return slpd_config("tiny", epochs=EPOCHS)


def partial_run(cohort: Path, out: Path) -> None:
    """Cancel the run at the first step of its last epoch: epoch 1 is saved, unfinished."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "cohort"
        shutil.copytree(cohort, copy)
        stop = threading.Event()

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "train" and done == total // EPOCHS + 1:
                stop.set()

        try:
            pretrain_slpd(copy, config(), out, progress=progress, cancel=stop, resume=False)
        except Cancelled:
            pass
        else:
            raise SystemExit("the partial run was not cancelled")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out: Path = args.out
    cohort = out / "cohort"
    if cohort.exists():
        shutil.rmtree(cohort)
    write_cohort(cohort)
    # inputs as they were before training (the new code retrains on these)
    inputs = {p.name: p.read_bytes() for p in sorted(cohort.glob("*.h5"))}
    ckpt = out / "slpd_v1.safetensors"
    pretrain_slpd(cohort, config(), ckpt, resume=False)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "inputs"
        raw.mkdir()
        for name, data in inputs.items():
            (raw / name).write_bytes(data)
        partial_run(raw, out / "slpd_v1_partial.safetensors")

    import h5py

    model = load_slpd(ckpt)
    with h5py.File(cohort / "slide0.h5") as f:
        feats, coords = f["features"][()], f["coords"][()]
    got = embed_slide(model, feats, coords, PS, slide_id="slide0")
    np.savez(
        out / "expected.npz",
        region_embeddings=got.region_embeddings,
        region_coords=got.region_coords,
        region_prototype=got.region_prototype,
        prototypes=got.prototypes,
        patch_region=got.patch_region,
        region_size_level0=np.int64(got.region_size_level0),
    )
    print(f"wrote fixtures into {out}")


if __name__ == "__main__":
    main()
