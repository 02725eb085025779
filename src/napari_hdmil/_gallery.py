"""Top-k gallery: thumbnails of the highest- and lowest-attention patches; a click jumps there.

``read_thumbnails`` is plain numpy (run it in a worker); ``Gallery`` is the Qt strip of buttons.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import QGridLayout, QLabel, QToolButton, QVBoxLayout, QWidget

THUMB_PX = 72


def read_thumbnails(slide: Any, coords: np.ndarray, patch_size_level0: int, px: int = THUMB_PX) -> list[np.ndarray]:
    """uint8 (px, px, 3) thumbnails of patches at level-0 (x, y) ``coords``, read from the
    coarsest pyramid level that still has ``px`` pixels per patch."""
    ps0 = int(patch_size_level0)
    level = int(slide.best_level_for_downsample(ps0 / px))
    ds = float(slide.level_downsamples[level])
    side = max(1, int(round(ps0 / ds)))
    out = []
    for x, y in np.asarray(coords, dtype=np.int64).reshape(-1, 2):
        region = np.asarray(slide.read_region((int(x), int(y)), level, (side, side)))[..., :3]
        # nearest-neighbour down to px: thumbnails, not analysis
        iy = np.minimum((np.arange(px) * side / px).astype(int), region.shape[0] - 1)
        ix = np.minimum((np.arange(px) * side / px).astype(int), region.shape[1] - 1)
        out.append(np.ascontiguousarray(region[iy][:, ix]))
    return out


def _pixmap(rgb: np.ndarray) -> QPixmap:
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    h, w = rgb.shape[:2]
    image = QImage(rgb.data, w, h, 3 * w, QImage.Format_RGB888)
    return QPixmap.fromImage(image.copy())  # copy: the numpy buffer may go away


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
        for w in (self._title_top, self._top, self._title_bottom, self._bottom):
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
    ) -> None:
        """Each entry: (patch row, thumbnail uint8 (h, w, 3), attention)."""
        self.clear()
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
