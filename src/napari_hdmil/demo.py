"""``python -m napari_hdmil.demo``: the demo slide, the whole pipeline, the result in napari.

    python -m napari_hdmil.demo                          # opens the viewer (needs a display)
    python -m napari_hdmil.demo --screenshot shot.png    # saves the window, report.json beside it
    python -m napari_hdmil.demo --screenshot shot.png --dock-shot dock.png   # and the widget's dock
    python -m napari_hdmil.demo --slide S.svs --model M.safetensors --out results/

Without the bundled demo model (``hdmil.checkpoint.default_model_path()``; build it with
``make model``) the demo says so and shows the slide with its tissue patch grid only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import HDMILError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m napari_hdmil.demo", description=__doc__.splitlines()[0])
    p.add_argument("--screenshot", metavar="PNG", help="save the window (widget + canvas) here and exit")
    p.add_argument("--out", metavar="DIR", help="also write report.json, patches.csv and slide.geojson here")
    p.add_argument("--slide", metavar="PATH", help="slide to open (default: the synthetic demo slide)")
    p.add_argument("--model", metavar="CKPT", help="checkpoint (default: the bundled demo model)")
    p.add_argument("--size", default="1500x950", help="window size WxH for the screenshot (default 1500x950)")
    p.add_argument("--dock-shot", metavar="PNG", help="with --screenshot: also save the widget's dock alone")
    return p


def _wait(app: Any, until: Any, timeout: float) -> None:
    t0 = time.monotonic()
    while not until() and time.monotonic() - t0 < timeout:
        app.processEvents()
        time.sleep(0.02)


def _tissue_grid_layer(viewer: Any, slide_path: Path) -> str:
    """The tissue patches as a Labels layer (what the demo can show without a model)."""
    from hdmil.grid import build_grid
    from hdmil.slide import open_slide
    from napari_hdmil._layers import grid_placement

    with open_slide(slide_path) as slide:
        grid = build_grid(slide)
    scale, translate = grid_placement(grid)
    raster = grid.to_raster(np.ones(grid.n, np.uint8), fill=0).astype(np.uint8)
    viewer.add_labels(raster, name="tissue patches", scale=scale, translate=translate, opacity=0.4,
                      colormap={0: "transparent", 1: "lime", None: "transparent"})  # fmt: skip
    return grid.message


def _close_toasts(viewer: Any) -> None:
    """Close napari's notification pop-ups (they sit over the canvas's corner)."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:  # another napari: leave them
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()


DOCK_WIDTH = 420  # px: the dock the widget is made to fit (issue 15 §4)


def _dock_width(viewer: Any, dock: Any, width: int) -> None:
    """Give the widget's dock ``width`` px (napari's default dock is narrower)."""
    from qtpy.QtCore import Qt

    viewer.window._qt_window.resizeDocks([dock], [width], Qt.Horizontal)


def _scale_bar(viewer: Any) -> Any:
    """napari's scale bar overlay (``viewer.canvas.overlays`` since 0.9, ``viewer.scale_bar`` before)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    return overlays.scale_bar if overlays is not None and hasattr(overlays, "scale_bar") else viewer.scale_bar


def _save_dock(dock: Any, png: Path) -> None:
    """The widget's dock as it is drawn (its width is the dock's: ``DOCK_WIDTH``)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    if not dock.grab().save(str(png)):
        raise HDMILError(f"{png}: cannot write the dock's screenshot")
    print(f"{png} ({dock.width()} x {dock.height()} px)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import napari
    from qtpy.QtWidgets import QApplication

    from hdmil.checkpoint import default_model_path
    from napari_hdmil._widget import HDMILWidget

    if args.slide:
        slide_path = Path(args.slide)
    else:
        from hdmil.synth import demo_slide_path

        slide_path = demo_slide_path(create=False)
        if not slide_path.exists():
            print(f"making the demo slide (once): {slide_path}", file=sys.stderr)
            slide_path = demo_slide_path(create=True)
    model_path = Path(args.model) if args.model else default_model_path()

    viewer = napari.Viewer(title="napari-hdmil demo", show=True)
    w, h = (int(v) for v in args.size.lower().split("x"))
    viewer.window.resize(w, h)
    app = QApplication.instance()
    try:
        layers = viewer.open(str(slide_path), plugin="napari-hdmil")
    except Exception as exc:  # noqa: BLE001 - napari wraps the reader's error
        print(f"napari_hdmil.demo: error: {slide_path}: cannot open: {exc}", file=sys.stderr)
        return 1
    widget = HDMILWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="HDMIL classification", area="right")
    _dock_width(viewer, dock, DOCK_WIDTH)
    _scale_bar(viewer).visible = True  # in µm: the slide layer has units
    widget.slide_box.value = layers[0]

    if not model_path.is_file():
        print(
            f"no model at {model_path}: showing the slide and its tissue grid only. Build the demo "
            "model with `make model` (or pass --model CKPT) to classify.",
            file=sys.stderr,
        )
        print(_tissue_grid_layer(viewer, slide_path))
    else:
        widget.model_edit.value = str(model_path)
        widget.run("all")
        if args.screenshot or args.out:
            _wait(app, lambda: widget.worker is None, timeout=3600)
            r = widget.result
            if r is None:
                print(f"napari_hdmil.demo: error: {widget.status_label.text()}", file=sys.stderr)
                return 1
            probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(r.classes, r.probabilities))
            print(f"{r.slide_name}: {r.prediction} ({probs}); kept {r.n_kept}/{r.n_patches} patches "
                  f"({r.kept_ratio:.0%}) in {r.timings['total']:.1f} s")  # fmt: skip
            if args.out:
                out = Path(args.out)
                for path in (widget.export_report(out / "report.json"), widget.export_csv(out / "patches.csv"),
                             widget.export_geojson(out / "slide.geojson")):  # fmt: skip
                    print(path)
    if args.screenshot:
        png = Path(args.screenshot)
        png.parent.mkdir(parents=True, exist_ok=True)
        viewer.reset_view()
        _wait(app, lambda: False, timeout=2.0)  # let the tiles load and the canvas draw
        _close_toasts(viewer)  # napari's own notices would cover the scale bar
        viewer.screenshot(str(png), canvas_only=False, flash=False)
        print(png)
        if args.dock_shot:
            _save_dock(dock, Path(args.dock_shot))
        if widget.result is not None:
            print(widget.export_report(png.with_name("report.json")))
        viewer.close()
        return 0
    napari.run()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HDMILError as exc:
        print(f"napari_hdmil.demo: error: {exc}", file=sys.stderr)
        sys.exit(1)
