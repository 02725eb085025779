"""The panels top to bottom in a scroll area: the dock can be shorter than the widget."""

from __future__ import annotations

from qtpy.QtCore import QSize
from qtpy.QtWidgets import QScrollArea, QVBoxLayout, QWidget


class ScrollColumn(QScrollArea):
    """``panels`` stacked in a vertically scrolling column that is as wide as its widest panel."""

    def __init__(self, *panels: QWidget) -> None:
        super().__init__()
        self.setWidgetResizable(True)
        body = QWidget()
        self.setWidget(body)
        column = QVBoxLayout(body)
        for panel in panels:
            column.addWidget(panel)
        column.addStretch(1)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        """The body's width plus the scroll bar (QScrollArea keeps the first width it saw)."""
        body = self.widget().sizeHint()
        width = body.width() + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
        return QSize(width, super().sizeHint().height())
