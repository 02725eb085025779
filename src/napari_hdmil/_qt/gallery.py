"""Top-k gallery: thumbnails of the highest- and lowest-attention patches; a click jumps there."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import QGridLayout, QGroupBox, QLabel, QToolButton, QVBoxLayout, QWidget

from napari_hdmil import _layers
from napari_hdmil._gallery import THUMB_PX, gallery_rows, read_result_thumbnails

__all__ = ["Gallery", "GalleryPanel", "fewer_note", "go_to_patch"]

ZOOM_PATCH_PX = 250  # a gallery click shows the patch this many screen pixels wide


class Gallery(QWidget):
    """Two rows of thumbnail buttons: highest attention, lowest attention.

    ``on_click(row)`` gets the patch index of the clicked thumbnail.
    """

    def __init__(self, on_click: Callable[[int], None], columns: int = 4, parent: QWidget | None = None):
        super().__init__(parent)
        self._on_click = on_click
        self._columns = columns
        self.buttons: list[QToolButton] = []
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self._title_top = QLabel("highest attention")
        self._top = QGridLayout()
        self._title_bottom = QLabel("lowest attention")
        self._bottom = QGridLayout()
        self.note_label = QLabel("")
        self.note_label.setWordWrap(True)
        self.note_label.setVisible(False)
        for w in (self._title_top, self._top, self._title_bottom, self._bottom, self.note_label):
            (layout.addWidget if isinstance(w, QWidget) else layout.addLayout)(w)

    def clear(self) -> None:
        for b in self.buttons:
            b.setParent(None)
            b.deleteLater()
        self.buttons = []

    def set_patches(
        self,
        top: Sequence[tuple[int, np.ndarray, float]],
        bottom: Sequence[tuple[int, np.ndarray, float]],
        class_name: str = "",
        note: str = "",
    ) -> None:
        """Each entry: (patch row, thumbnail uint8 (h, w, 3), attention); ``note`` says why the
        lists are short."""
        self.clear()
        self.note_label.setText(note)
        self.note_label.setVisible(bool(note))
        self._title_top.setText(f"highest attention: {class_name}" if class_name else "highest attention")
        self._title_bottom.setText(f"lowest attention: {class_name}" if class_name else "lowest attention")
        for grid, entries in ((self._top, top), (self._bottom, bottom)):
            for i, (row, thumb, value) in enumerate(entries):
                b = QToolButton(self)
                b.setIcon(QIcon(_pixmap(thumb)))
                b.setIconSize(QSize(THUMB_PX, THUMB_PX))
                b.setToolButtonStyle(Qt.ToolButtonTextUnderIcon)
                b.setText(f"{value:.3g}")
                b.setToolTip(f"patch {row}: attention {value:.4g} (click to go there)")
                b.setProperty("patch_row", int(row))
                b.clicked.connect(lambda _=False, r=int(row): self._on_click(r))
                grid.addWidget(b, i // self._columns, i % self._columns)
                self.buttons.append(b)


class GalleryPanel(QGroupBox):
    """The gallery of a result's shown class, with the thumbnails read so far (per slide, by
    patch row)."""

    def __init__(self, on_click: Callable[[int], None], parent: QWidget | None = None):
        super().__init__("top-k gallery", parent)
        self.gallery = Gallery(on_click)
        self._by_slide: dict[str, dict[int, np.ndarray]] = {}
        self.thumbnails: dict[int, np.ndarray] = {}  # the shown slide's
        QVBoxLayout(self).addWidget(self.gallery)

    def clear(self) -> None:
        self.gallery.clear()

    def set_thumbnails(self, slide: str, thumbnails: dict[int, np.ndarray] | None) -> None:
        """A new result's thumbnails (read in the worker) replace the ones kept for ``slide``
        (a slide key): the patches are new."""
        self._by_slide[slide] = dict(thumbnails or {})

    def show_class(self, result: Any, cls: int, k: int, thumbnails: dict[int, np.ndarray] | None = None) -> None:
        """The top-k and bottom-k of class ``cls``. ``thumbnails``: a new result's (see
        ``set_thumbnails``); the missing ones are read now."""
        from napari_hdmil._qt.layer_store import slide_key

        key = slide_key(result.slide_path)
        if thumbnails is not None:
            self.set_thumbnails(key, thumbnails)
        self.thumbnails = self._by_slide.setdefault(key, {})
        missing = [r for r in gallery_rows(result, cls, k).tolist() if r not in self.thumbnails]
        if missing:
            self.thumbnails.update(read_result_thumbnails(result, np.array(missing, np.int64)))

        def entries(rows: np.ndarray) -> list[tuple[int, np.ndarray, float]]:
            return [(int(i), self.thumbnails[int(i)], float(result.attention[i, cls]))
                    for i in rows if int(i) in self.thumbnails]  # fmt: skip

        self.gallery.set_patches(
            entries(_layers.top_k(result, cls, k)), entries(_layers.bottom_k(result, cls, k)),
            result.classes[cls], fewer_note(result, cls, k),
        )


def fewer_note(result: Any, cls: int, k: int) -> str:
    """Why the lists are shorter than top-k: "" when the class pooled at least 2k patches."""
    n = int(np.isfinite(np.asarray(result.attention)[:, cls]).sum())
    if n >= 2 * k:
        return ""
    return (f"{result.classes[cls]} pooled {n} patches, fewer than twice top-k ({k}): "
            "the lists are shorter and never share a patch")  # fmt: skip


def go_to_patch(viewer: Any, src: Any, row: int) -> None:
    """Centre ``viewer``'s camera on patch ``row`` of ``src`` (a Result or PreScreen) and zoom so
    the patch is ``ZOOM_PATCH_PX`` screen pixels wide."""
    centre = _layers.patch_centres_um(src, [row])[0]
    size = float(src.grid.patch_size_level0) * float(src.mpp)
    viewer.camera.center = (float(centre[0]), float(centre[1]))
    viewer.camera.zoom = ZOOM_PATCH_PX / size


def _pixmap(rgb: np.ndarray) -> QPixmap:
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    h, w = rgb.shape[:2]
    image = QImage(rgb.data, w, h, 3 * w, QImage.Format_RGB888)
    return QPixmap.fromImage(image.copy())  # copy: the numpy buffer may go away
