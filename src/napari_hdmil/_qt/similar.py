"""Similar slides (SLPD): the slide's prototype map, and the slides of an index most like it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from magicgui.widgets import Container, FileEdit
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QLineEdit, QListWidget, QListWidgetItem, QPushButton, QVBoxLayout, QWidget

from hdmil.errors import HDMILError
from napari_hdmil import _layers
from napari_hdmil._qt.inputs import InputsPanel
from napari_hdmil._qt.layer_store import LayerStore

__all__ = ["SimilarPanel", "find_slide_file"]


class SimilarPanel(QGroupBox):
    """An index folder (feature files with SLPD prototypes), Prototype map, Find similar, and the
    list of similar slides (click one to open it)."""

    def __init__(self, inputs: InputsPanel, store: LayerStore, parent: QWidget | None = None):
        super().__init__("similar slides (SLPD)", parent)
        self._inputs = inputs
        self._store = store
        v = QVBoxLayout(self)
        self.index_edit = FileEdit(label="index folder", mode="d", value="")
        self.index_edit.tooltip = "folder of feature files (<slide>.h5) with SLPD prototypes"
        # no label column: the dock is narrow; the field says what it wants
        v.addWidget(Container(widgets=[self.index_edit], labels=False).native)
        for line in self.index_edit.native.findChildren(QLineEdit):
            line.setPlaceholderText("index folder")
        row = QHBoxLayout()
        self.protomap_button = QPushButton("Prototype map")
        self.similar_button = QPushButton("Find similar")
        self.protomap_button.clicked.connect(self.show_prototype_map)
        # clicked sends `checked` (False), which would land in find_similar's `top`
        self.similar_button.clicked.connect(lambda *_: self.find_similar())
        row.addWidget(self.protomap_button)
        row.addWidget(self.similar_button)
        v.addLayout(row)
        self.similar_list = QListWidget()
        self.similar_list.setMaximumHeight(120)
        self.similar_list.itemClicked.connect(self._open_similar)
        v.addWidget(self.similar_list)

    def _index_dir(self) -> Path:
        value = str(self.index_edit.value or "").strip()
        if value in ("", "."):
            raise HDMILError("choose the index folder (feature files with SLPD prototypes) first")
        return Path(value)

    def show_prototype_map(self) -> Any:
        """Labels layer of the slide's SLPD prototypes, from ``<index>/<slide>.h5``; None (and a
        notification) when there are none."""
        try:
            return self._store.put(*self._prototype_layer())
        except HDMILError as exc:
            show_error(str(exc))
            return None

    def _prototype_layer(self) -> _layers.LayerData:
        from hdmil.slpd_index import feature_file_for, prototype_map

        slide_path, mpp = self._inputs.current_slide()
        index = self._index_dir()
        h5 = feature_file_for(slide_path, index)
        if mpp is None:
            raise HDMILError(f"{slide_path}: no mpp: set it in the widget to place the prototype map")
        if h5 is None:
            raise HDMILError(
                f"{slide_path}: no SLPD outputs in {index} (no {Path(slide_path).stem}.h5 and no "
                "file for this slide; run `hdmil features` and `hdmil pretrain-slpd` on it)"
            )
        pmap = prototype_map(h5)
        if not (pmap.labels > 0).any():  # too few regions: k-means gave no prototypes
            raise HDMILError(
                f"{h5}: no SLPD prototypes for this slide (too few regions for them, or "
                "`hdmil pretrain-slpd` has not run on it)"
            )
        return _layers.prototype_layer(pmap, float(mpp), slide_path)

    def find_similar(self, top: int = 5) -> list[tuple[str, float, Path]]:
        """Fill the list with the slides of the index most like this one (best first)."""
        from hdmil.slpd_index import feature_file_for, similar_slides

        self.similar_list.clear()
        try:
            slide_path, _ = self._inputs.current_slide()
            index = self._index_dir()
            # its own feature file when there, so a file without prototypes says so
            h5 = feature_file_for(slide_path, index)
            hits = similar_slides(h5 if h5 is not None else slide_path, index, top=top)
        except HDMILError as exc:
            show_error(str(exc))
            return []
        for sid, score, path in hits:
            item = QListWidgetItem(f"{sid}    {score:.3f}")
            item.setData(Qt.UserRole, (sid, str(path)))
            item.setToolTip(f"{path}: prototype similarity {score:.4f}; click to open the slide")
            self.similar_list.addItem(item)
        return hits

    def _open_similar(self, item: QListWidgetItem) -> None:
        sid, h5 = item.data(Qt.UserRole)
        path = find_slide_file(sid, Path(h5), self._inputs.current_slide_dir())
        if path is None:
            show_error(f"{h5}: cannot find the slide file of {sid!r} beside it or beside the open slide")
            return
        try:
            self._inputs.viewer.open(str(path), plugin="napari-hdmil")
        except Exception as exc:  # noqa: BLE001 - napari wraps reader errors in its own types
            show_error(f"{path}: cannot open: {exc}")


def find_slide_file(slide_id: str, h5: Path, extra_dir: Path | None) -> Path | None:
    """The slide behind a feature file: its ``slide_path`` attribute, else ``<slide_id>.<ext>``
    beside the feature file, in its parent folder, or beside the open slide."""
    from hdmil.slide import SLIDE_EXTENSIONS

    try:
        import h5py

        with h5py.File(h5, "r") as f:
            p = f.attrs.get("slide_path")
        if isinstance(p, bytes):
            p = p.decode()
        if p and Path(p).is_file():
            return Path(p)
    except (OSError, ImportError):
        pass
    for d in (h5.parent, h5.parent.parent, extra_dir):
        if d is None or not d.is_dir():
            continue
        for ext in SLIDE_EXTENSIONS:
            cand = d / f"{slide_id}{ext}"
            if cand.is_file():
                return cand
    return None
