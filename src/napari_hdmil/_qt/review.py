"""The batch review panel (its own dock widget): a batch folder's slides in a sortable, filterable
table; double-click (or next / previous) opens a slide with its saved results, no model run; a
verdict (agree, disagree, unsure) and a note per slide, saved atomically to ``OUT/review.csv``.

Everything it shows and writes comes from ``hdmil.review`` (rows, verdicts) and
``napari_hdmil._reader.read_result`` (the slide and its layers); ``hdmil review-summary OUT``
prints the same counts. When the HDMIL widget is docked, a reopened result is handed to its
``show_result`` (prediction panel, heatmap controls, gallery); otherwise the layers are added here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView, QButtonGroup, QComboBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit,
    QPushButton, QRadioButton, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
)

from hdmil.errors import HDMILError
from hdmil.review import VERDICTS, SlideRow, batch_rows, filter_rows, review_summary, save_verdict

__all__ = ["HEADERS", "ReviewPanel", "docked_widget", "open_result_in_viewer"]

HEADERS = ("slide", "prediction", "probability", "kept ratio", "status", "error", "verdict", "note")
MAX_COLUMN_PX = 220
SHOW = ("all", "not reviewed", "reviewed", "failed", *VERDICTS)


class _Item(QTableWidgetItem):
    """A cell that sorts numbers as numbers (blank last)."""

    def __init__(self, value: Any) -> None:
        shown = f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))
        super().__init__(shown)
        self.value = value
        self.setFlags(self.flags() & ~Qt.ItemIsEditable)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        a, b = self.value, getattr(other, "value", None)
        if isinstance(a, (int, float)) or isinstance(b, (int, float)):
            return (a is None, a or 0.0) < (b is None, b or 0.0)
        return str(a or "") < str(b or "")


class ReviewPanel(QWidget):
    """Open a batch folder, review its slides one by one.

    Public for scripts and tests: ``open_folder(path)``; ``rows`` (all) and ``shown`` (after the
    filter, in the table's order); ``select(i)``, ``open_current()``, ``next()``, ``previous()``;
    ``set_verdict(verdict, note)``; ``result`` (the opened slide's ``Result``).
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.folder: Path | None = None
        self.rows: list[SlideRow] = []
        self.shown: list[SlideRow] = []
        self.result: Any = None
        self._layers: list[Any] = []  # the layers this panel added for the opened slide
        self._build()

    # -- building -----------------------------------------------------------------------------

    def _build(self) -> None:
        self.folder_edit = QLineEdit(placeholderText="batch folder (hdmil batch --out)")
        self.slides_edit = QLineEdit(placeholderText="folder of moved slides (optional)")
        browse, open_button = QPushButton("Browse…"), QPushButton("Open")
        browse.clicked.connect(self._browse)
        open_button.clicked.connect(lambda: self.open_folder(self.folder_edit.text()))
        self.filter_edit = QLineEdit(placeholderText="filter: slide, class, error, note")
        self.show_box = QComboBox()
        self.show_box.addItems(SHOW)
        self.filter_edit.textChanged.connect(self._fill)
        self.show_box.currentTextChanged.connect(self._fill)
        self.table = QTableWidget(0, len(HEADERS))
        self.table.setHorizontalHeaderLabels(HEADERS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.horizontalHeader().setSortIndicator(0, Qt.AscendingOrder)  # Qt's default: descending
        self.table.setSortingEnabled(True)
        self.table.cellDoubleClicked.connect(lambda r, _c: (self.select(r), self.open_current()))
        self.prev_button, self.next_button = QPushButton("◀ Previous"), QPushButton("Next ▶")
        self.prev_button.clicked.connect(self.previous)
        self.next_button.clicked.connect(self.next)
        self.verdict_buttons = {v: QRadioButton(v) for v in VERDICTS}
        self._group = QButtonGroup(self)
        for b in self.verdict_buttons.values():
            self._group.addButton(b)
        self.note_edit = QLineEdit(placeholderText="note")
        self.save_button = QPushButton("Save verdict")
        self.save_button.clicked.connect(self._save_clicked)
        self.slide_label, self.summary_label = QLabel("no slide opened"), QLabel("")
        for label in (self.slide_label, self.summary_label):
            label.setWordWrap(True)
        self._lay_out(browse, open_button)

    def _lay_out(self, browse: QPushButton, open_button: QPushButton) -> None:
        layout = QVBoxLayout(self)
        layout.addLayout(_row(self.folder_edit, browse, open_button))
        layout.addWidget(self.slides_edit)
        layout.addLayout(_row(self.filter_edit, self.show_box))
        layout.addWidget(self.table, 1)
        layout.addLayout(_row(self.prev_button, self.next_button))
        layout.addWidget(self.slide_label)
        layout.addLayout(_row(*self.verdict_buttons.values()))
        layout.addLayout(_row(self.note_edit, self.save_button))
        layout.addWidget(self.summary_label)

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Batch folder")
        if path:
            self.open_folder(path)

    # -- the table ----------------------------------------------------------------------------

    def open_folder(self, path: str | Path) -> list[SlideRow]:
        """Read the batch folder's slides and verdicts into the table (errors as a notification)."""
        try:
            rows = batch_rows(path)
        except HDMILError as exc:
            show_error(str(exc))
            return []
        self.folder, self.rows = Path(path), rows
        self.folder_edit.setText(str(path))
        self._fill()
        return rows

    def _fill(self, *_: Any) -> None:
        current = self.current_row()
        rows = filter_rows(self.rows, self.filter_edit.text(), self.show_box.currentText())
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            for j, value in enumerate(r.cells()):
                item = _Item(value)
                item.setData(Qt.UserRole, r.slide)
                self.table.setItem(i, j, item)
        self.table.setSortingEnabled(True)
        self.table.resizeColumnsToContents()
        for j in range(len(HEADERS)):  # a long error or note does not push the rest out of view
            self.table.setColumnWidth(j, min(self.table.columnWidth(j), MAX_COLUMN_PX))
        self._update_shown()
        if current is not None and current in self.shown:
            self.select(self.shown.index(current))
        self._show_summary()

    def _update_shown(self) -> None:
        """``shown``: the filtered rows in the table's (sorted) order."""
        by_name = {r.slide: r for r in self.rows}
        self.shown = [by_name[self.table.item(i, 0).data(Qt.UserRole)] for i in range(self.table.rowCount())]

    def sort_by(self, column: str, descending: bool = False) -> None:
        self.table.sortItems(HEADERS.index(column), Qt.DescendingOrder if descending else Qt.AscendingOrder)
        self._update_shown()

    def current_row(self) -> SlideRow | None:
        i = self.table.currentRow()
        if not 0 <= i < self.table.rowCount():
            return None
        self._update_shown()
        return self.shown[i]

    def select(self, i: int) -> None:
        self.table.selectRow(int(i))
        self.table.setCurrentCell(int(i), 0)
        row = self.current_row()
        v = row.verdict if row is not None else None
        self._group.setExclusive(False)  # so that no button is checked for an unreviewed slide
        for name, b in self.verdict_buttons.items():
            b.setChecked(v is not None and v.verdict == name)
        self._group.setExclusive(True)
        self.note_edit.setText(v.note if v else "")

    # -- opening, moving, verdicts ------------------------------------------------------------

    def open_current(self) -> Any:
        """Open the selected slide with its saved results; returns its Result (None: failed)."""
        row = self.current_row()
        if row is None:
            return None
        if not row.has_result:
            show_error(f"{row.slide}: no results to open ({row.status}: {row.error})")
            return None
        dirs = tuple(p for p in [self.slides_edit.text().strip()] if p)
        try:
            self.result, self._layers = open_result_in_viewer(self.viewer, row.folder, dirs, self._layers)
        except HDMILError as exc:
            show_error(str(exc))
            return None
        r = self.result
        self.slide_label.setText(f"{row.slide}: {r.prediction} ({r.probabilities[r.prediction_index]:.3f}), "
                                 f"{r.method}, kept {r.n_kept}/{r.n_patches} ({r.kept_ratio:.0%}) "
                                 f"- {Path(str(r.slide_path)).name}")
        return self.result

    def _step(self, by: int) -> Any:
        n = self.table.rowCount()
        if not n:
            return None
        i = self.table.currentRow()
        self.select(min(max(i + by, 0), n - 1) if i >= 0 else 0)
        return self.open_current()

    def next(self) -> Any:
        return self._step(+1)

    def previous(self) -> Any:
        return self._step(-1)

    def set_verdict(self, verdict: str | None, note: str = "") -> None:
        """Record the selected slide's verdict and note in ``review.csv`` (atomically)."""
        row = self.current_row()
        if row is None or self.folder is None:
            raise HDMILError("no slide selected: open a batch folder and pick a slide first")
        verdicts = save_verdict(self.folder, row.slide, verdict, note, row.prediction)
        for r in self.rows:
            r.verdict = verdicts.get(r.slide)
        self._fill()

    def _save_clicked(self) -> None:
        chosen = [v for v, b in self.verdict_buttons.items() if b.isChecked()]
        try:
            self.set_verdict(chosen[0] if chosen else None, self.note_edit.text())
        except (HDMILError, OSError) as exc:
            show_error(str(exc))

    def _show_summary(self) -> None:
        """The counts ``hdmil review-summary`` prints (its first two lines)."""
        if self.folder is not None:
            try:
                self.summary_label.setText("\n".join(review_summary(self.folder).table().splitlines()[:2]))
            except HDMILError as exc:
                self.summary_label.setText(str(exc))


def _row(*widgets: QWidget) -> QHBoxLayout:
    row = QHBoxLayout()
    for w in widgets:
        row.addWidget(w)
    return row


def open_result_in_viewer(viewer: Any, folder: Path, slide_dirs: tuple = (), previous: list | None = None) -> tuple[Any, list]:
    """Show a saved result in ``viewer``: its slide (the open layer of that file is reused) and its
    layers, or, when the HDMIL widget is docked, its ``show_result``. ``previous``: the layers
    this returned for the last slide, removed first. Returns (Result, the layers added)."""
    from napari.layers import Layer

    from hdmil.pipeline.result import load_result
    from napari_hdmil._layers import result_layers
    from napari_hdmil._reader import read_slide

    result = load_result(folder, slide_dirs=slide_dirs)  # before removing anything: it may fail
    for layer in previous or []:
        if layer in viewer.layers:
            viewer.layers.remove(layer)
    added = []
    slide = _slide_layer(viewer, result.slide_path)
    if slide is None:
        data, kwargs, kind = read_slide(result.slide_path)[0]
        kwargs["metadata"]["result_folder"] = str(Path(folder).resolve())
        slide = viewer.add_layer(Layer.create(data, kwargs, kind))
        added.append(slide)
    widget = docked_widget(viewer)
    if widget is not None:
        widget.show_result(result)
        return result, added
    for data, kwargs, kind in result_layers(result):
        added.append(viewer.add_layer(Layer.create(data, kwargs, kind)))
    return result, added


def _slide_layer(viewer: Any, slide_path: Any) -> Any:
    """The open slide layer of the file ``slide_path``, if it still shows the file as it is on
    disk now (the size and mtime the reader recorded); None otherwise."""
    from napari_hdmil._qt.layer_store import slide_key

    want = slide_key(slide_path)
    st = Path(want).stat()
    for layer in viewer.layers:
        meta = layer.metadata or {}
        if (meta.get("hdmil_slide") and slide_key(meta.get("slide_path")) == want
                and (meta.get("file_size"), meta.get("file_mtime_ns")) == (st.st_size, st.st_mtime_ns)):
            return layer
    return None


def docked_widget(viewer: Any) -> Any:
    """The docked HDMILWidget of ``viewer`` (None: none, or a viewer without a window)."""
    from napari_hdmil._widget import HDMILWidget

    try:
        docks = viewer.window.dock_widgets
    except AttributeError:
        return None
    for w in dict(docks).values():
        if isinstance(w, HDMILWidget):
            return w
    return None
