"""The panels top to bottom: a fixed head (inputs and run buttons, always in view), then the
others as collapsible sections in a scroll area, so the widget fits a 914 px tall dock panel."""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, QSignalBlocker, QSize, Qt
from qtpy.QtWidgets import QGroupBox, QScrollArea, QSizePolicy, QToolButton, QVBoxLayout, QWidget

__all__ = ["ScrollColumn", "Section"]


class Section(QWidget):
    """A panel under a header button that shows or hides it (▼ open, ▶ closed).

    The panel's own group box title moves to the header; a hidden panel takes no height, so the
    column's size hint is what is open.
    """

    def __init__(self, panel: QGroupBox, expanded: bool = True) -> None:
        super().__init__()
        title = panel.title()
        self.panel = panel
        self.header = QToolButton()
        self.header.setText(title)
        self.header.setCheckable(True)
        self.header.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.header.setStyleSheet("QToolButton { border: none; font-weight: bold; }")
        self.header.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.header.toggled.connect(self.set_expanded)
        panel.setTitle("")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.header)
        layout.addWidget(panel)
        self.set_expanded(expanded)

    @property
    def expanded(self) -> bool:
        return self.header.isChecked()

    def set_expanded(self, expanded: bool) -> None:
        with QSignalBlocker(self.header):
            self.header.setChecked(expanded)
        self.header.setArrowType(Qt.DownArrow if expanded else Qt.RightArrow)
        self.panel.setVisible(expanded)


class ScrollColumn(QWidget):
    """``head`` fixed on top, then each of ``sections`` ((group box, open by default)) under its
    title, stacked in a vertically scrolling column as wide as its widest panel.
    ``sections``: title -> Section."""

    def __init__(self, head: QWidget, *sections: tuple[QGroupBox, bool]) -> None:
        super().__init__()
        self.sections = {panel.title(): Section(panel, open_) for panel, open_ in sections}
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QScrollArea.NoFrame)
        body = QWidget()
        self.scroll.setWidget(body)
        column = QVBoxLayout(body)
        column.setContentsMargins(0, 0, 0, 0)
        for section in self.sections.values():
            column.addWidget(section)
        column.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(head)
        layout.addWidget(self.scroll, 1)
        self._head = head
        body.installEventFilter(self)  # a panel grew or a section opened: our size hint changes

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        if event.type() == QEvent.LayoutRequest:
            self.updateGeometry()  # the scroll area does not pass its body's changes on
        return False

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        """Head plus the open sections, as wide as the widest plus the scroll bar (QScrollArea
        keeps the first size it saw)."""
        body = self.scroll.widget().sizeHint()
        head = self._head.sizeHint()
        bar = self.scroll.verticalScrollBar().sizeHint().width()
        spacing = self.layout().spacing()
        return QSize(max(head.width(), body.width() + bar), head.height() + spacing + body.height())

