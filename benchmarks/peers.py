"""Peers benchmark: other readers and another tool's patch-feature pipeline against ours, one table.

    python benchmarks/peers.py                          # CMU + an 8192² synthetic slide
    python benchmarks/peers.py --size 16384 --repeats 3
    python benchmarks/peers.py --peers-path /tmp/peers  # also LazySlide, installed there (below)
    python benchmarks/peers.py --device cuda            # encoders on a GPU

It installs nothing. Peers come from the ``bench`` extra (``pip install -e .[bench]``: tiffslide,
OpenSlide, fastslide) and, for the feature pipeline, LazySlide where it imports; a peer that does
not import gets a row that says "not installed". LazySlide's dependencies would move installed
versions (pandas, dask), so it is not in the extra; it can live in a folder of its own
(``pip install --target /tmp/peers --no-deps lazyslide wsidata ...``, every package its dry run
adds except those already installed) that ``--peers-path`` (or ``$HDMIL_PEERS_PATH``) appends to
``sys.path`` after ours, so our versions win.

Readers: every tool reads the same level-0 patches (the slide's tissue patches, at most
``--max-patches`` spread over the slide) of ``patch_size_level0`` px into uint8 arrays, on as many
threads as there are cores: ``read_region`` per patch for the peers (a handle per thread where the
library is not thread-safe), ``hdmil.reading.PatchReader`` for us. Pixels are compared with ours.

Pipelines, from the slide file to features of every tissue patch, the same encoder (the model's:
``--model``, default the bundled demo model) with the same normalisation: ``hdmil features``'s
path (``build_grid`` + ``extract_slide_features``), LazySlide's (``find_tissues``,
``tile_tissues`` at the same patch size and mpp, ``feature_extraction`` with our encoder's module
and our normalisation as its transform), and HDMIL end to end (``run_slide``: tissue, LIPN, kept
patches, features, DMIN) and HDMIL† beside them. Each tool finds its own tissue, so patch counts
differ: the table gives seconds per slide and per patch. "Same patches": LazySlide's
``feature_extraction`` on our tissue patches (our coords as its tile table) against our
``PatchReader`` + encoder on them, with the largest feature difference (0: the same encoder saw
the same pixels). Ratios: the tool's seconds over ours ("time ratio"), and its seconds per patch
over ours ("per-patch ratio"; for HDMIL, per patch read). Set-up (imports, building the encoder)
is outside every clock. Repeats are interleaved (the order rotates) and the fastest run counts;
the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from _slides import CMU, load_line, paper_line, synthetic_slide, warm_file  # benchmarks/

NOT_INSTALLED = "not installed"


# ------------------------------------------------------------------------------------------ readers


def _threaded(coords: np.ndarray, side: int, read_one: Callable, workers: int) -> np.ndarray:
    out = np.empty((len(coords), side, side, 3), np.uint8)

    def task(i: int) -> None:
        out[i] = read_one(int(coords[i, 0]), int(coords[i, 1]))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(task, range(len(coords))))
    return out


def _per_thread(make: Callable) -> Callable:
    """A handle per thread, made on first use (for libraries whose handles are not thread-safe)."""
    local = threading.local()

    def get():
        if not hasattr(local, "h"):
            local.h = make()
        return local.h

    return get


def reader_tiffslide(path: Path, side: int):
    import tiffslide

    get = _per_thread(lambda: tiffslide.TiffSlide(path))
    return lambda x, y: get().read_region((x, y), 0, (side, side), as_array=True)[..., :3]


def reader_openslide(path: Path, side: int):
    import openslide

    slide = openslide.OpenSlide(str(path))  # thread-safe handle
    return lambda x, y: np.asarray(slide.read_region((x, y), 0, (side, side)))[..., :3]


def reader_fastslide(path: Path, side: int):
    import fastslide

    slide = fastslide.FastSlide.from_file_path(str(path))  # releases the GIL while it reads
    return lambda x, y: slide.read_region((x, y), 0, (side, side)).numpy()[..., :3]


PEER_READERS = {"tiffslide": reader_tiffslide, "OpenSlide": reader_openslide, "fastslide": reader_fastslide}


def ours(path: Path, coords: np.ndarray, side: int, workers: int) -> np.ndarray:
    from hdmil.reading import PatchReader
    from hdmil.slide import open_slide

    out = np.empty((len(coords), side, side, 3), np.uint8)
    with open_slide(path) as slide:
        reader = PatchReader(slide, coords, side, out_px=side, workers=workers)
        for batch in reader:
            out[batch.indices] = batch.pixels
    return out


def bench_readers(path: Path, coords: np.ndarray, side: int, repeats: int) -> list[dict]:
    """Seconds (fastest, interleaved) and max pixel difference from ours, for each reader."""
    workers = os.cpu_count() or 1
    runs: dict[str, Callable[[], np.ndarray]] = {"hdmil PatchReader": lambda: ours(path, coords, side, workers)}
    rows = {}
    for name, make in PEER_READERS.items():
        try:
            one = make(path, side)
            one(int(coords[0, 0]), int(coords[0, 1]))
        except ImportError:
            rows[name] = {"tool": name, "status": NOT_INSTALLED}
            continue
        except Exception as exc:  # noqa: BLE001 - a peer that cannot read this file
            rows[name] = {"tool": name, "status": f"cannot read it ({type(exc).__name__})"}
            continue
        runs[name] = (lambda one=one: _threaded(coords, side, one, workers))
    best = {name: float("inf") for name in runs}
    pixels = {}
    names = list(runs)
    for rep in range(max(1, repeats)):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            pixels[name] = runs[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    ref = pixels["hdmil PatchReader"]
    for name in names:
        diff = int(np.abs(pixels[name].astype(np.int16) - ref).max())
        rows[name] = {"tool": name, "seconds": best[name], "n": len(coords), "diff": diff}
    return [rows[n] for n in ["hdmil PatchReader", *PEER_READERS]]


# ------------------------------------------------------------------------------------------ pipelines


def lazyslide_pipeline(encoder, patch_px: int, mpp: float, device: str | None) -> Callable[[Path], int] | str:
    """LazySlide from the file to features with our encoder and normalisation; or why not."""
    try:
        import lazyslide as zs
        import torch
        from wsidata import open_wsi
    except ImportError:
        return NOT_INSTALLED
    shift, scale = encoder._shift[0].cpu(), encoder._scale[0].cpu()

    def transform(img):  # our Encoder.preprocess, on one HWC uint8 tile
        x = torch.as_tensor(np.asarray(img)[..., :3]).permute(2, 0, 1).float()
        return (x - shift) / scale

    def run(path: Path) -> int:
        store = Path(tempfile.mkdtemp(prefix="lazyslide-"))
        try:
            wsi = open_wsi(path, store=str(store / "slide.zarr"))
            zs.pp.find_tissues(wsi)
            zs.pp.tile_tissues(wsi, patch_px, mpp=mpp)
            feats = zs.tl.feature_extraction(wsi, encoder.model, transform=transform, batch_size=64,
                                             device=device or str(encoder.device), return_features=True,
                                             pbar=False)
            return int(len(feats))
        finally:
            shutil.rmtree(store, ignore_errors=True)

    return run


def lazyslide_on_coords(encoder, coords: np.ndarray, patch_px: int, mpp: float, device: str | None):
    """LazySlide's ``feature_extraction`` on our patches (our coords as its tile table): the
    features of both, to compare the read + encode part on the same patches; or why not."""
    try:
        import lazyslide as zs
        import torch
        from wsidata import open_wsi
        from wsidata.io import add_tiles
    except ImportError:
        return NOT_INSTALLED
    shift, scale = encoder._shift[0].cpu(), encoder._scale[0].cpu()

    def transform(img):
        x = torch.as_tensor(np.asarray(img)[..., :3]).permute(2, 0, 1).float()
        return (x - shift) / scale

    def run(path: Path) -> np.ndarray:
        store = Path(tempfile.mkdtemp(prefix="lazyslide-"))
        try:
            wsi = open_wsi(path, store=str(store / "slide.zarr"))
            zs.pp.find_tissues(wsi)
            zs.pp.tile_tissues(wsi, patch_px, mpp=mpp)  # only for its TileSpec at this size and mpp
            add_tiles(wsi, "ours", np.asarray(coords, np.int64), wsi.tile_spec("tiles"),
                      tissue_ids=np.zeros(len(coords), int))
            return np.asarray(zs.tl.feature_extraction(
                wsi, encoder.model, transform=transform, batch_size=64, tile_key="ours",
                device=device or str(encoder.device), return_features=True, pbar=False))
        finally:
            shutil.rmtree(store, ignore_errors=True)

    return run


def hdmil_on_coords(path: Path, coords: np.ndarray, side: int, encoder) -> np.ndarray:
    """Our PatchReader + encoder on the same patches (what ``featurise`` does)."""
    from hdmil.inference import as_numpy
    from hdmil.reading import PatchReader
    from hdmil.slide import open_slide

    out = np.zeros((len(coords), encoder.dim), np.float32)
    with open_slide(path) as slide:
        for batch in PatchReader(slide, coords, side):
            out[batch.indices] = as_numpy(encoder.embed(batch.pixels))
    return out


def bench_same_patches(path: Path, coords: np.ndarray, side: int, encoder, model, device, repeats: int):
    """Read + encode of the same patches: ours and LazySlide's, and how far their features differ."""
    lz = lazyslide_on_coords(encoder, coords, model.patch_px, 10.0 / model.magnification, device)
    runs = {"hdmil read + encode": lambda: hdmil_on_coords(path, coords, side, encoder)}
    if callable(lz):
        runs["LazySlide feature_extraction"] = lambda: lz(path)
    best, feats = dict.fromkeys(runs, float("inf")), {}
    names = list(runs)
    for rep in range(max(1, repeats)):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            feats[name] = runs[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    ref = feats["hdmil read + encode"]
    rows = []
    for name in names:
        rel = float(np.abs(feats[name] - ref).max() / max(np.abs(ref).max(), 1e-12)) if feats[name].shape == ref.shape else float("nan")
        rows.append({"tool": name, "seconds": best[name], "n": len(coords), "rel": rel})
    if not callable(lz):
        rows.append({"tool": "LazySlide feature_extraction", "status": lz})
    return rows


def hdmil_features(encoder) -> Callable[[Path], int]:
    """``hdmil features``'s path without writing the file: grid, then every tissue patch's features."""
    from hdmil.features import extract_slide_features
    from hdmil.grid import build_grid
    from hdmil.slide import open_slide

    def run(path: Path) -> int:
        with open_slide(path) as slide:
            return int(len(extract_slide_features(slide, build_grid(slide), encoder).features))

    return run


def hdmil_run(model, encoder, use_lipn: bool) -> Callable[[Path], int]:
    from hdmil.pipeline import run_slide

    def run(path: Path) -> int:
        return int(run_slide(path, model, use_lipn=use_lipn, encoder=encoder).n_read)

    return run


def bench_pipelines(path: Path, model, encoder, device: str | None, repeats: int) -> list[dict]:
    runs: dict[str, Callable[[Path], int] | str] = {
        "hdmil features": hdmil_features(encoder),
        "LazySlide": lazyslide_pipeline(encoder, model.patch_px, 10.0 / model.magnification, device),
        "HDMIL end to end": hdmil_run(model, encoder, True),
        "HDMIL† end to end": hdmil_run(model, encoder, False),
    }
    live = [n for n, r in runs.items() if callable(r)]
    best, count = dict.fromkeys(live, float("inf")), {}
    for rep in range(max(1, repeats)):
        for name in live[rep % len(live):] + live[: rep % len(live)]:
            t0 = time.perf_counter()
            count[name] = runs[name](path)
            best[name] = min(best[name], time.perf_counter() - t0)
    return [{"tool": n, "seconds": best[n], "n": count[n]} if n in best else {"tool": n, "status": runs[n]}
            for n in runs]


# ------------------------------------------------------------------------------------------ table


def print_rows(slide: str, what: str, rows: list[dict], ref: str, unit: str) -> None:
    base = next(r for r in rows if r["tool"] == ref)
    base_rate = base["n"] / base["seconds"]
    for r in rows:
        if "status" in r:
            print(f"| {slide} | {what} | {r['tool']} | {r['status']} | | | | | |")
            continue
        rate = r["n"] / r["seconds"]
        extra = f"max |Δ| {r['diff']}" if "diff" in r else (f"features max rel. Δ {r['rel']:.1e}" if "rel" in r else "")
        print(f"| {slide} | {what} | {r['tool']} | {r['n']} | {r['seconds']:.3f} | {rate:.0f} {unit} "
              f"| {r['seconds'] / base['seconds']:.2f} | {base_rate / rate:.2f} | {extra} |", flush=True)


def pick(coords: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` of the coords, spread evenly over the slide's reading order."""
    if len(coords) <= limit:
        return coords
    return coords[np.linspace(0, len(coords) - 1, limit).round().astype(int)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", nargs="*", type=Path, help="slides (default: CMU + a synthetic one)")
    ap.add_argument("--size", type=int, default=8192, help="side of the synthetic slide (px)")
    ap.add_argument("--max-patches", type=int, default=1500, help="patches each reader reads")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; the fastest counts")
    ap.add_argument("--model", help="checkpoint whose encoder every pipeline uses (default: bundled)")
    ap.add_argument("--device", help="torch device for the encoders, e.g. cuda")
    ap.add_argument("--peers-path", default=os.environ.get("HDMIL_PEERS_PATH"),
                    help="a folder of peers installed apart (pip --target), appended to sys.path")
    ap.add_argument("--no-pipelines", action="store_true", help="readers only")
    args = ap.parse_args(argv)
    if args.peers_path:
        sys.path.append(str(Path(args.peers_path).resolve()))

    from hdmil.checkpoint import default_model_path, load_model
    from hdmil.grid import build_grid
    from hdmil.pipeline import encoder_for, warm_up
    from hdmil.slide import open_slide

    model = load_model(args.model or default_model_path(), map_location=args.device or "cpu")
    encoder = encoder_for(model, args.device)
    warm_up(model, encoder, patch_px=model.patch_px)
    slides = args.slides or [p for p in (CMU,) if p.exists()] + [synthetic_slide(args.size, 11)]
    print(f"\nencoder {encoder.name} ({encoder.dim}-d) on {encoder.device}, {os.cpu_count()} cores, "
          f"repeats {args.repeats} interleaved, fastest counted, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset: active spin)')}")
    print(paper_line())
    print(f"start: {load_line()}\n")
    print("| slide | what | tool | patches | seconds | rate | time ratio to ours | per-patch ratio | pixels vs ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in slides:
        warm_file(path)
        with open_slide(path) as slide:
            grid, (w, h) = build_grid(slide), slide.dimensions
        side = grid.patch_size_level0
        coords = np.asarray(grid.coords)
        inside = (coords >= 0).all(axis=1) & (coords[:, 0] + side <= w) & (coords[:, 1] + side <= h)
        coords = pick(coords[inside], args.max_patches)  # peers differ over the edge: inside only
        print_rows(path.name, "read_region", bench_readers(path, coords, side, args.repeats),
                   "hdmil PatchReader", "patches/s")
        if not args.no_pipelines:
            print_rows(path.name, "same patches → features", bench_same_patches(
                path, coords, side, encoder, model, args.device, args.repeats), "hdmil read + encode", "patches/s")
            print_rows(path.name, "slide → features", bench_pipelines(path, model, encoder, args.device,
                                                                    args.repeats), "hdmil features", "patches/s")
    print(f"\n{load_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
