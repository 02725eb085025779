"""Prediction: the predicted class, a bar per class probability, counts, stage seconds, warnings."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QGridLayout, QGroupBox, QLabel, QProgressBar, QVBoxLayout, QWidget

from hdmil.errors import HDMILError
from hdmil.model_card import DEMO_SHORT, ModelCard, read_model_card
from hdmil.pipeline import PreScreen
from napari_hdmil import _layers
from napari_hdmil._qt.column import Section

__all__ = ["PredictionPanel", "model_card_html", "mpp_text", "timings_html"]

TIMING_ROWS = (("tissue", "tissue"), ("lipn", "LIPN"), ("crop", "crop"), ("features", "features"),
               ("dmin", "DMIN"), ("total", "total"))  # fmt: skip


class PredictionPanel(QGroupBox):
    """What a pre-screen or a classification found, the card of the model that makes it (always
    shown: a demo model says it is not for diagnosis), and the LIPN decision layer's legend.

    ``inputs`` (an InputsPanel): the card follows its model field; without it, ``show_model``
    takes a checkpoint path.
    """

    def __init__(self, inputs: Any = None, parent: QWidget | None = None):
        super().__init__("prediction", parent)
        v = QVBoxLayout(self)
        self.prediction_label = _label("no result yet", rich=True, wrap=True)  # long slide names wrap
        v.addWidget(self.prediction_label)
        self._prob_grid = QGridLayout()
        v.addLayout(self._prob_grid)
        self.probability_bars: dict[str, QProgressBar] = {}
        self.model_label = _label("", rich=True, wrap=True)
        self.counts_label = _label("", wrap=True)
        self.timings_label = _label("", rich=True)
        self.warnings_label = _label("", wrap=True)
        self.warnings_label.setStyleSheet("color: #ffb000;")
        self.legend_label = _label(f"LIPN decision: {_legend_html()}", rich=True, wrap=True)
        details = QGroupBox("details: LIPN legend, stage seconds")  # closed: long, and seldom read
        box = QVBoxLayout(details)
        box.addWidget(self.legend_label)
        box.addWidget(self.timings_label)
        self.details_section = Section(details, expanded=False)
        for w in (self.model_label, self.warnings_label, self.counts_label, self.details_section):
            v.addWidget(w)
        self.card: ModelCard | None = None
        self._inputs = inputs
        if inputs is not None:
            inputs.model_edit.changed.connect(self.show_model)
            self.show_model()

    def show_model(self, path: Any = None) -> None:
        """The card of the checkpoint at ``path`` (default: the inputs' model); a checkpoint that
        cannot be read says why instead."""
        from hdmil.checkpoint import default_model_path

        try:
            if self._inputs is not None:
                path = self._inputs.model_path()
            self.card = read_model_card(default_model_path() if path is None else path)
        except (HDMILError, OSError) as exc:
            self.card = None
            self.model_label.setText(f"<b>model</b>: cannot be read: {escape(str(exc))}")
            self.model_label.setToolTip("")
            return
        self.model_label.setText(model_card_html(self.card))
        self.model_label.setToolTip("\n".join(self.card.lines()))

    def show_prescreen(self, ps: PreScreen) -> None:
        self.prediction_label.setText(f"pre-screened <b>{Path(str(ps.slide_path)).name}</b>: press Classify")
        self.set_probabilities([], [])
        self.counts_label.setText(
            f"tissue patches {ps.n_patches} · kept {ps.n_kept} ({ps.kept_ratio:.0%}) · per class "
            + ", ".join(f"{c} {int(n)}" for c, n in zip(ps.classes, ps.lipn_mask.sum(axis=0)))
            + (f" · {int(ps.neighbour.sum())} as neighbours" if ps.neighbour.any() else "")
            + mpp_text(ps.mpp, ps.mpp_source)
        )
        self.timings_label.setText(timings_html(ps.timings or {}))
        self.warnings_label.setText(
            "The pre-screen chose no patch to read at high magnification: Classify would look at "
            "no tissue closely, and every class's score would be uninformative"
            if ps.use_lipn and ps.n_kept == 0 else ""
        )

    def show_result(self, result: Any) -> None:
        self.prediction_label.setText(
            f"<b style='font-size: 14pt'>{result.prediction}</b> &nbsp;({result.method}, "
            f"{Path(str(result.slide_path)).name})"
        )
        self.set_probabilities(list(result.classes), [float(p) for p in result.probabilities])
        failed = f" · failed to decode {result.failed_share:.1%}" if result.failed_share > 0 else ""
        self.counts_label.setText(
            f"kept ratio {result.kept_ratio:.1%} · tissue patches {result.n_patches} · "
            f"kept {result.n_kept} · read {result.n_read}{failed}{mpp_text(result.mpp, result.mpp_source)}"
        )
        self.timings_label.setText(timings_html(result.timings))
        self.warnings_label.setText("\n".join(f"⚠ {w}" for w in _layers.result_warnings(result)))

    def show_nothing(self) -> None:
        """The chosen slide has no result yet."""
        self.prediction_label.setText("no result yet")
        self.set_probabilities([], [])
        for label in (self.counts_label, self.timings_label, self.warnings_label):
            label.setText("")

    def set_probabilities(self, classes: list[str], probs: list[float]) -> None:
        """One bar per class (0.1 % steps); the dict ``probability_bars`` is refilled in place."""
        while self._prob_grid.count():
            w = self._prob_grid.takeAt(0).widget()
            if w is not None:
                w.setParent(None)
        self.probability_bars.clear()
        for i, (c, p) in enumerate(zip(classes, probs)):
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setValue(int(round(p * 1000)))
            bar.setFormat(f"{p:.1%}")
            self._prob_grid.addWidget(QLabel(c), i, 0)
            self._prob_grid.addWidget(bar, i, 1)
            self.probability_bars[c] = bar


def model_card_html(card: ModelCard) -> str:
    """The card in a few short lines; a demo model's warning first, in red (the tooltip has
    ``card.lines()``: the whole warning)."""
    warn = f"<b style='color: #ff6060'>⚠ {escape(DEMO_SHORT)}</b><br>" if card.demo else ""
    rest = [card.encoder and f"encoder {card.encoder}", card.scale, card.trained_on and f"trained on {card.trained_on}"]
    return (f"{warn}<b>model</b> {escape(card.name)}"
            + (f" <small>(sha {card.sha256})</small>" if card.sha256 else "")
            + f"<br>classes: {escape(', '.join(card.classes))}<br>"
            + escape(" · ".join(r for r in rest if r)))


def mpp_text(mpp: float | None, source: str | None) -> str:
    """`` · mpp 0.5 µm/px (from the file)``: the scale the run used and who gave it."""
    if not mpp:
        return ""
    said = {"file": " (from the file)", "user": " (given by the user)"}.get(str(source), "")
    return f" · mpp {float(mpp):.4g} µm/px{said}"


def timings_html(t: dict[str, float]) -> str:
    """A small table of the stage seconds present in ``t``."""
    cells = "".join(
        f"<tr><td>{title}</td><td align='right'>{t[key]:.2f} s</td></tr>" for key, title in TIMING_ROWS if key in t
    )
    return f"<table cellspacing='2'><tr><th align='left'>stage</th><th>seconds</th></tr>{cells}</table>"


def _legend_html() -> str:
    def swatch(value: int) -> str:
        r, g, b, _ = _layers.LIPN_COLORS[value]
        return f'<span style="color: rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})">■</span> {_layers.LIPN_LEGEND[value]}'

    return " · ".join(swatch(v) for v in (_layers.KEPT, _layers.NEIGHBOUR, _layers.DISCARDED))


def _label(text: str, rich: bool = False, wrap: bool = False) -> QLabel:
    label = QLabel(text)
    if rich:
        label.setTextFormat(Qt.RichText)
    label.setWordWrap(wrap)
    return label
