"""Export: the result as QuPath GeoJSON, per-patch CSV, the canvas as PNG, the JSON report.

GeoJSON and CSV are ``hdmil.export``'s layout of a result, the same files ``hdmil predict
--geojson / --csv`` writes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog, QGroupBox, QHBoxLayout, QPushButton, QWidget

from hdmil.errors import HDMILError

__all__ = ["ExportPanel"]

# key, button text, file dialog filter, default suffix
EXPORTS = (
    ("geojson", "GeoJSON (QuPath)", "GeoJSON (*.geojson)", ".geojson"),
    ("csv", "CSV", "CSV (*.csv)", ".csv"),
    ("png", "PNG", "PNG (*.png)", ".png"),
    ("report", "report JSON", "JSON (*.json)", ".report.json"),
)


class ExportPanel(QGroupBox):
    """One button per export; each asks for a file name. ``result()`` gives the result to write
    (None before the first), ``k()`` the top-k of the GeoJSON."""

    def __init__(self, viewer: Any, result: Callable[[], Any], k: Callable[[], int], parent: QWidget | None = None):
        super().__init__("export", parent)
        from napari_hdmil._writer import prefer_heatmap_writer

        prefer_heatmap_writer()  # also when the widget was opened without our reader (npe2 not activated)
        self.viewer = viewer
        self._result = result
        self._k = k
        row = QHBoxLayout(self)
        self.export_buttons: dict[str, QPushButton] = {}
        for key, text, filt, suffix in EXPORTS:
            b = QPushButton(text)
            b.clicked.connect(lambda _=False, k=key, f=filt, s=suffix: self._export_dialog(k, f, s))
            row.addWidget(b)
            self.export_buttons[key] = b

    def set_enabled(self, enabled: bool) -> None:
        for b in self.export_buttons.values():
            b.setEnabled(enabled)

    def _need_result(self) -> Any:
        r = self._result()
        if r is None:
            raise HDMILError("nothing to export yet: run the classification first")
        return r

    def _export_dialog(self, key: str, filt: str, suffix: str) -> None:
        r = self._result()
        stem = r.slide_name if r is not None else "slide"
        path, _ = QFileDialog.getSaveFileName(self, f"Export {key}", f"{stem}{suffix}", filt)
        if not path:
            return
        write = {"geojson": self.export_geojson, "csv": self.export_csv, "png": self.export_png,
                 "report": self.export_report}[key]  # fmt: skip
        try:
            out = write(path)
        except (HDMILError, OSError, ValueError) as exc:
            show_error(f"{path}: export failed: {exc}")
            return
        show_info(f"wrote {out}")

    def export_geojson(self, path: str | os.PathLike) -> Path:
        """QuPath GeoJSON: tissue outline, every tissue patch with ``kept`` and attention per class
        as measurements, the top-k of each class as annotations (level-0 pixel coordinates)."""
        from hdmil.export import write_result_geojson

        return write_result_geojson(path, self._need_result(), top_k=int(self._k()))

    def export_csv(self, path: str | os.PathLike) -> Path:
        """One row per tissue patch: x, y, row, col, tissue fraction, LIPN keep per class, kept,
        attention and raw score per class (empty where not pooled / not read)."""
        from hdmil.export import write_result_csv

        return write_result_csv(path, self._need_result())

    def export_png(self, path: str | os.PathLike) -> Path:
        """The canvas as it is now (slide + overlays) as a PNG, written atomically."""
        import imageio.v3 as iio

        from hdmil.files import atomic_write

        image = self.viewer.screenshot(canvas_only=True, flash=False)
        buffer = io.BytesIO()
        iio.imwrite(buffer, image, extension=".png")
        with atomic_write(path, "wb") as fh:
            fh.write(buffer.getvalue())
        return Path(path)

    def export_report(self, path: str | os.PathLike) -> Path:
        """The pipeline's JSON report (prediction, probabilities, kept ratio, stage seconds)."""
        from hdmil.files import write_json_atomic

        return write_json_atomic(path, self._need_result().to_report())
