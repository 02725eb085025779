"""Progress: one bar per pipeline stage and a status line."""

from __future__ import annotations

from qtpy.QtWidgets import QGridLayout, QGroupBox, QLabel, QProgressBar, QWidget

from napari_hdmil._messages import Progress

__all__ = ["PROGRESS_STAGES", "ProgressPanel"]

PROGRESS_STAGES = ("tissue", "lipn", "features", "dmin")
STAGE_TITLES = {"tissue": "tissue", "lipn": "LIPN", "features": "crop + features", "dmin": "DMIN"}


class ProgressPanel(QGroupBox):
    """Bars for tissue, LIPN, crop + features and DMIN (``done / total``), then a status line."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__("progress", parent)
        grid = QGridLayout(self)
        grid.setVerticalSpacing(2)  # compact: the dock is 914 px tall
        self.progress_bars: dict[str, QProgressBar] = {}
        for i, stage in enumerate(PROGRESS_STAGES):
            bar = QProgressBar()
            bar.setFormat("%v / %m")
            bar.setMaximumHeight(18)
            grid.addWidget(QLabel(STAGE_TITLES[stage]), i, 0)
            grid.addWidget(bar, i, 1)
            self.progress_bars[stage] = bar
        self.reset()
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        grid.addWidget(self.status_label, len(PROGRESS_STAGES), 0, 1, 2)

    def reset(self) -> None:
        for bar in self.progress_bars.values():
            bar.setRange(0, 1)
            bar.setValue(0)

    def show_progress(self, msg: Progress) -> None:
        bar = self.progress_bars.get(msg.stage)
        if bar is None:  # a stage without a bar (crop, region pooling, ...)
            return
        total = max(int(msg.total), 1)
        bar.setRange(0, total)
        bar.setValue(min(int(msg.done), total))

    def set_status(self, text: str) -> None:
        self.status_label.setText(text)
