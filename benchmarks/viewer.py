"""Viewer benchmark: our napari reader against the plain tiffslide → dask → add_image approach.

    python benchmarks/viewer.py                 # 50k x 50k and 2k x 2k slides, 3 repeats

For each slide and each approach, in a fresh subprocess (so peak RSS is honest) under a real X
server (Xvfb + Mesa; one is started when $DISPLAY is unset):

* first frame: from opening (see APPROACHES: plain, our reader's layer data, or
  ``viewer.open(path, plugin="napari-hdmil")``) to the first rendered canvas frame;
* jump: random jumps to full resolution (camera centre + zoom to 1 screen px = 1 level-0 px),
  each timed until the canvas has rendered the new place (median and 90th percentile);
* peak RSS of the process over the whole run, which ends with a pan / zoom tour.

"Rendered" means: process Qt events, take a canvas screenshot (a real GL render), repeat until
two frames in a row are identical; the time is that of the first of the two. Both approaches pay
the same screenshot cost. The slides are made once into benchmarks/results/ (git-ignored) with
``hdmil.synth.synth_slide`` (small) or a fast tiled-JPEG pyramid writer below (large, or when
hdmil.synth is missing); ``--writer synth`` forces synth_slide for both.
Targets (issue 2): ours within 10% of plain on every figure, first frame large / small <= 1.2,
peak RSS <= 1 GB.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# plain: tiffslide zarr group -> dask.array.from_zarr per level -> viewer.add_image
# reader: our reader's layer data -> viewer.add_image (what the reader itself costs)
# open: viewer.open(path, plugin="napari-hdmil") (adds napari's own open machinery: npe2
#       reader lookup and the progress bar it shows while reading)
APPROACHES = ("plain", "reader", "open")
# hdmil.synth renders every pixel (~3 CPU-s per 12 Mpx): a 50k x 50k slide would take over an
# hour on a shared 2-core box, so bigger slides come from the tile writer below unless asked.
SYNTH_MAX_SIDE = 16_384


# -- slides ---------------------------------------------------------------------------------


def ensure_slide(size: int, cache: Path, writer: str, seed: int = 0) -> Path:
    """A synthetic size x size px slide at 0.5 µm/px in ``cache`` (made once)."""
    use_synth = writer == "synth"
    if writer == "auto" and size <= SYNTH_MAX_SIDE:
        try:
            import hdmil.synth  # noqa: F401

            use_synth = True
        except ImportError:
            use_synth = False
    how = "synth" if use_synth else "tiles"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"viewer-{size}px-{how}-s{seed}.tiff"
    if path.exists():
        return path
    t0 = time.perf_counter()
    tmp = path.with_suffix(".partial.tiff")
    if use_synth:
        from hdmil.synth import synth_slide

        synth_slide(tmp, size=(size, size), seed=seed, tumor_fraction=0.2, mpp=0.5)
    else:
        write_tile_pyramid(tmp, (size, size), mpp=0.5, seed=seed)
    tmp.replace(path)
    print(f"made {path.name} in {time.perf_counter() - t0:.0f} s "
          f"({path.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)
    return path


def write_tile_pyramid(
    path: Path, size: tuple[int, int], mpp: float = 0.5, tile: int = 256, seed: int = 0
) -> None:
    """A tiled JPEG pyramid (each level a top-level page, as scanners write) of H&E-like tiles.

    A few distinct tiles are JPEG-encoded once and streamed from a generator, so a 50k x 50k
    slide takes seconds and little memory. Tissue is a blob covering about half the slide.
    """
    import tifffile

    rng = np.random.default_rng(seed)
    tissue = [_encode_tile(_he_tile(rng, tile)) for _ in range(24)]
    background = [_encode_tile(_background_tile(rng, tile)) for _ in range(4)]
    w, h = size
    levels = [(w, h)]
    while max(levels[-1]) > 1024:
        lw, lh = levels[-1]
        levels.append(((lw + 1) // 2, (lh + 1) // 2))

    def segments(lw: int, lh: int):
        ds = w / lw
        nx, ny = math.ceil(lw / tile), math.ceil(lh / tile)
        for ty in range(ny):
            v = ((ty + 0.5) * tile * ds) / h
            for tx in range(nx):
                u = ((tx + 0.5) * tile * ds) / w
                # an irregular blob: an ellipse with a wavy border
                r = ((u - 0.5) / 0.38) ** 2 + ((v - 0.5) / 0.3) ** 2
                r += 0.15 * math.sin(9 * u) * math.cos(7 * v)
                bank = tissue if r < 1 else background
                yield bank[(tx * 7 + ty * 13) % len(bank)]

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, (lw, lh) in enumerate(levels):
            ds = w / lw
            tw.write(
                segments(lw, lh), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                photometric="rgb", compression="jpeg", subfiletype=0 if i == 0 else 1,
                resolutionunit="CENTIMETER", resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                description=f"hdmil benchmark slide level {i}" if i == 0 else None,
            )


def _encode_tile(img: np.ndarray) -> bytes:
    """One tile JPEG-encoded exactly as tifffile encodes tiles (so the bytes fit its IFD)."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, img, tile=img.shape[:2], photometric="rgb", compression="jpeg")
    buf.seek(0)
    with tifffile.TiffFile(buf) as tf:
        page = tf.pages[0]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    return buf.getvalue()[offset : offset + count]


def _he_tile(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pink stroma with purple nuclei (colours from the Kather 2016 means)."""
    base = np.array([166, 85, 118], np.float32)
    img = base + rng.normal(0, 6, (n, n, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:n, 0:n]
    for _ in range(int(rng.integers(30, 70))):
        cy, cx, rad = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(4, 9)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < rad**2
        img[disk] = np.array([84, 40, 100]) + rng.normal(0, 10, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _background_tile(rng: np.random.Generator, n: int) -> np.ndarray:
    img = np.array([242, 243, 243], np.float32) + rng.normal(0, 1, (n, n, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# -- X server -------------------------------------------------------------------------------


def start_xvfb() -> subprocess.Popen | None:
    """Start Xvfb when there is no display; returns the process (or None when not needed)."""
    if os.environ.get("DISPLAY"):
        return None
    exe = shutil.which("Xvfb")
    if exe is None:
        sys.exit("no $DISPLAY and no Xvfb: apt-get install xvfb (or run under a desktop)")
    r, w = os.pipe()
    proc = subprocess.Popen(
        [exe, "-displayfd", str(w), "-screen", "0", "1600x1200x24", "-nolisten", "tcp"],
        pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(w)
    with os.fdopen(r) as fh:
        display = fh.readline().strip()
    if not display:
        proc.kill()
        sys.exit("Xvfb did not start")
    os.environ["DISPLAY"] = f":{display}"
    return proc


# -- one measured run (child process) -------------------------------------------------------


def child(approach: str, path: str, jumps: int, seed: int) -> dict:
    import dask.array as da
    import napari
    import tiffslide
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1200, 900)
    app = QApplication.instance()
    for _ in range(20):
        _process_events(app)
        time.sleep(0.01)
    # Warm up what every first layer pays once (GL context, layer controls, dask's scheduler
    # import) so that the clock measures the slide, not napari's start-up.
    warm = viewer.add_image(
        [da.zeros((512, 512, 3), np.uint8, chunks=256), da.zeros((256, 256, 3), np.uint8)],
        multiscale=True, rgb=True,
    )
    _render(viewer, app)
    viewer.layers.remove(warm)
    _render(viewer, app)

    t0 = time.perf_counter()
    layer_data_s = None  # opening the file and making the layer data, before napari's part
    if approach == "open":
        viewer.open(path, plugin="napari-hdmil")
    elif approach == "reader":
        from napari_hdmil._reader import get_reader

        [(data, kwargs, _)] = get_reader(path)(path)
        layer_data_s = time.perf_counter() - t0
        viewer.add_image(data, **kwargs)
    else:
        ts = tiffslide.TiffSlide(path)
        grp = ts.zarr_group
        pyramid = [da.from_zarr(grp[str(i)]) for i in range(ts.level_count)]
        layer_data_s = time.perf_counter() - t0
        viewer.add_image(pyramid, multiscale=True, rgb=True, name=Path(path).stem)
    t_first, frame = _render(viewer, app)
    first_frame = t_first - t0
    lit = float((frame[..., :3].max(-1) > 30).mean())

    layer = viewer.layers[0]
    sy, sx = layer.scale[-2:]
    h, w = layer.data[0].shape[:2]
    rng = np.random.default_rng(seed)
    canvas_h, canvas_w = frame.shape[:2]
    margin_y, margin_x = canvas_h, canvas_w
    jump_times, levels = [], []
    for _ in range(jumps):
        y = rng.uniform(margin_y, max(margin_y + 1, h - margin_y))
        x = rng.uniform(margin_x, max(margin_x + 1, w - margin_x))
        t0 = time.perf_counter()
        viewer.camera.center = (y * sy, x * sx)
        viewer.camera.zoom = 1.0 / sx  # one screen pixel per level-0 pixel
        t_done, _ = _render(viewer, app)
        jump_times.append(t_done - t0)
        levels.append(int(layer.data_level))

    # a tour: pan at full resolution, zoom out to the whole slide, zoom back in elsewhere
    t0 = time.perf_counter()
    cy, cx = viewer.camera.center[-2:]
    for i in range(12):
        viewer.camera.center = (cy + (i % 3) * 0.5 * canvas_h * sy, cx + i * 0.5 * canvas_w * sx)
        _render(viewer, app)
    zoom = viewer.camera.zoom
    while zoom * max(h * sy, w * sx) > canvas_w:
        zoom /= 2
        viewer.camera.zoom = zoom
        _render(viewer, app)
    viewer.camera.center = (h * sy * 0.3, w * sx * 0.7)
    while zoom < 1.0 / sx:
        zoom *= 2
        viewer.camera.zoom = zoom
        _render(viewer, app)
    tour = time.perf_counter() - t0

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    viewer.close()
    return {
        "approach": approach,
        "first_frame_s": first_frame,
        "layer_data_s": layer_data_s,
        "first_frame_lit": lit,
        "jump_s": jump_times,
        "jump_levels": levels,
        "tour_s": tour,
        "peak_rss_mb": peak_rss_mb,
        "levels": len(layer.data),
        "size": [w, h],
    }


def _process_events(app) -> None:
    from qtpy.QtCore import QEvent

    app.processEvents()
    # deleteLater() runs only in a real event loop; without this napari's "in progress"
    # spinner (started by viewer.open) never stops and repaints the window 16 times a second.
    app.sendPostedEvents(None, QEvent.Type.DeferredDelete)


def _render(viewer, app, max_frames: int = 50) -> tuple[float, np.ndarray]:
    """Render until two frames in a row are identical; (time of the first of them, frame)."""
    prev, prev_t = None, None
    for _ in range(max_frames):
        _process_events(app)
        frame = viewer.screenshot(canvas_only=True, flash=False)
        t = time.perf_counter()
        if prev is not None and np.array_equal(frame, prev):
            return prev_t, frame
        prev, prev_t = frame, t
    return prev_t, prev


# -- parent: run, aggregate, print ----------------------------------------------------------


def run_child(approach: str, path: Path, jumps: int, seed: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", approach, str(path), "--jumps", str(jumps),
           "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{approach} on {path.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--large", type=int, default=50_000, help="side of the large slide (px)")
    p.add_argument("--small", type=int, default=2048, help="side of the small slide (px)")
    p.add_argument("--jumps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=RESULTS)
    p.add_argument("--writer", choices=("auto", "synth", "tiles"), default="auto")
    p.add_argument("--child", nargs=2, metavar=("APPROACH", "SLIDE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.jumps, args.seed)))
        return 0

    slides = {
        "small": ensure_slide(args.small, args.cache, args.writer, args.seed),
        "large": ensure_slide(args.large, args.cache, args.writer, args.seed),
    }
    _compile_packages()
    xvfb = start_xvfb()
    env = dict(os.environ)
    cfg = tempfile.mkdtemp(prefix="hdmil-bench-napari-")
    env["NAPARI_CONFIG"] = str(Path(cfg) / "settings.yaml")  # no user settings, nothing saved
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        for rep in range(args.repeats):
            for which, path in slides.items():
                order = APPROACHES[rep % 3 :] + APPROACHES[: rep % 3]  # rotate the order
                for approach in order:
                    r = run_child(approach, path, args.jumps, args.seed + rep, env)
                    runs.setdefault((which, approach), []).append(r)
                    print(f"  rep {rep} {which:5s} {approach:5s} first {r['first_frame_s']:.3f} s"
                          f"  jump {statistics.median(r['jump_s']):.3f} s"
                          f"  rss {r['peak_rss_mb']:.0f} MB", file=sys.stderr)
    finally:
        if xvfb is not None:
            xvfb.terminate()
        shutil.rmtree(cfg, ignore_errors=True)

    print_table(runs, slides, args)
    return 0


def _compile_packages() -> None:
    """Byte-compile hdmil and napari_hdmil, as installing a wheel does: an editable checkout
    under PYTHONDONTWRITEBYTECODE would otherwise recompile our modules in every run."""
    import compileall
    import importlib.util

    for name in ("hdmil", "napari_hdmil"):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                compileall.compile_dir(folder, quiet=1)


def print_table(runs: dict, slides: dict, args: argparse.Namespace) -> None:
    def med(which: str, approach: str, key: str) -> float:
        vals = []
        for r in runs[(which, approach)]:
            v = r[key]
            if v is None:  # not measurable for this approach
                return math.nan
            vals.append(statistics.median(v) if isinstance(v, list) else v)
        return statistics.median(vals)

    def p90(which: str, approach: str, key: str) -> float:
        return float(np.percentile([t for r in runs[(which, approach)] for t in r["jump_s"]], 90))

    rows = []  # (figure, slide, {approach: value})
    for which in ("small", "large"):
        r0 = runs[(which, "plain")][0]
        label = f"{r0['size'][0]}x{r0['size'][1]} ({r0['levels']} lv)"
        for name, key, fn in (
            ("open file -> layer data (s)", "layer_data_s", med),
            ("first frame (s)", "first_frame_s", med),
            ("jump to full res, median (s)", "jump_s", med),
            ("jump to full res, p90 (s)", "jump_s", p90),
            ("pan/zoom tour (s)", "tour_s", med),
            ("peak RSS (MB)", "peak_rss_mb", med),
        ):
            rows.append((name, label, {a: fn(which, a, key) for a in APPROACHES}))
    ff = {a: med("large", a, "first_frame_s") / med("small", a, "first_frame_s")
          for a in APPROACHES}
    rows.append(("first frame large / small", "", ff))

    print(f"\nviewer benchmark: median of {args.repeats} runs per cell, {args.jumps} jumps per run,"
          f" a fresh process per run, canvas ~1200x850 under Xvfb + Mesa")
    print("plain = tiffslide zarr -> da.from_zarr -> add_image; reader = our reader's layer data ->"
          " add_image; open = viewer.open(plugin='napari-hdmil')")
    head = (f"{'figure':30s} {'slide':22s} {'plain':>8s} {'reader':>8s} {'open':>8s}"
            f" {'reader/plain':>13s} {'open/plain':>11s}")
    print(head)
    print("-" * len(head))
    for name, label, v in rows:
        print(f"{name:30s} {label:22s} {v['plain']:8.3f} {v['reader']:8.3f} {v['open']:8.3f}"
              f" {v['reader'] / v['plain']:13.2f} {v['open'] / v['plain']:11.2f}"
              .replace("nan", "  -"))
    worst = {
        a: max(v[a] / v["plain"] for _, _, v in rows[:-1] if not math.isnan(v[a]))
        for a in ("reader", "open")
    }
    rss = max(med(w, a, "peak_rss_mb") for w in ("small", "large") for a in APPROACHES)
    levels = sorted({lv for a in APPROACHES for r in runs[("large", a)] for lv in r["jump_levels"]})
    ok = lambda c: "OK" if c else "MISSED"  # noqa: E731
    print(f"\ntargets: reader/plain <= 1.10 on every figure: worst {worst['reader']:.2f} "
          f"{ok(worst['reader'] <= 1.10)} (open/plain worst {worst['open']:.2f}); "
          f"first frame large/small <= 1.2: reader {ff['reader']:.2f}, open {ff['open']:.2f} "
          f"{ok(max(ff['reader'], ff['open']) <= 1.2)}; peak RSS <= 1024 MB: {rss:.0f} "
          f"{ok(rss <= 1024)}; jumps rendered at level(s) {levels}")


if __name__ == "__main__":
    sys.exit(main())
