"""The kept-ratio budget control: before Classify, LIPN's thresholds (the checkpoint's, one factor
on them, or one per class) set live the LIPN decision layer, the kept count and ratio, and the
predicted reading time (the pre-screen's measured seconds per HR patch × the kept count).

The numbers come from ``hdmil.budget.budget_for`` (as ``hdmil predict --lipn-threshold``'s);
the chosen budget goes into the pre-screen Classify reuses, so the run reads what is shown here
and its report.json records the setting (its ``budget`` block). ``BudgetDock`` is the control as
its own dock widget, following the docked HDMIL widget's pre-screen of the chosen slide.
"""

from __future__ import annotations

from typing import Any

from magicgui.widgets import ComboBox, Container, FloatSpinBox
from qtpy.QtWidgets import QGroupBox, QLabel, QVBoxLayout, QWidget

from hdmil.budget import apply_budget, budget_for, checkpoint_thresholds, lipn_probabilities
from hdmil.errors import HDMILError

__all__ = ["MODES", "BudgetDock", "BudgetPanel", "budget_text"]

MODES = ("checkpoint", "factor", "per class")


def budget_text(b: Any) -> str:
    """``kept 40 of 75 patches (53%) · reading ≈ 2.1 s``."""
    t = b.predicted_seconds
    when = f" · reading ≈ {t:.1f} s" if t is not None else " · reading time: not measured"
    return f"kept {b.n_kept} of {b.n_patches} patches ({b.kept_ratio:.0%}){when}"


class BudgetPanel(QGroupBox):
    """``set_prescreen(ps, runner, inputs)`` after a pre-screen; the controls then re-budget it in place
    (``budget``: the last ``hdmil.budget.Budget``) and redraw its LIPN decision layer (``store``)
    and counts (``prediction``)."""

    def __init__(self, store: Any, prediction: Any, parent: QWidget | None = None) -> None:
        super().__init__("LIPN budget", parent)
        self._store, self._prediction = store, prediction
        self.ps: Any = None
        self.model: Any = None
        self.budget: Any = None
        self._probs: Any = None
        self._base: Any = None
        self.mode_box = ComboBox(label="thresholds", choices=MODES, value="checkpoint")
        self.factor_box = FloatSpinBox(label="× factor", min=0.0, max=5.0, step=0.05, value=1.0)
        self.factor_box.tooltip = "multiplies the checkpoint's thresholds: below 1 keeps more patches"
        self.class_boxes: list[FloatSpinBox] = []
        self.form = Container(widgets=[self.mode_box, self.factor_box])
        self.summary_label = QLabel("pre-screen a slide to set LIPN's budget")
        self.summary_label.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.form.native)
        layout.addWidget(self.summary_label)
        for w in (self.mode_box, self.factor_box):
            w.changed.connect(self.rebudget)
        self.setEnabled(False)

    def set_prescreen(self, ps: Any, runner: Any = None, inputs: Any = None) -> None:
        """A new pre-screen, made with the inputs' model (``runner`` keeps it loaded): LIPN's
        probabilities are computed once here. HDMIL† or another model: the control is off."""
        model = _model_of(ps, runner, inputs) if runner is not None and ps is not None else None
        self.ps, self.model, self.budget = ps, model, None
        usable = ps is not None and ps.use_lipn and model is not None and model.lipn is not None
        self.setEnabled(usable)
        if not usable:
            self.summary_label.setText("pre-screen a slide with LIPN (HDMIL) to set its budget" if ps is None
                                       or ps.use_lipn else "HDMIL† reads every patch: no LIPN budget")
            return
        self._probs = lipn_probabilities(model.lipn, ps)
        self._base = checkpoint_thresholds(model.lipn)
        self._class_boxes(list(ps.classes))
        with self.mode_box.changed.blocked():
            self.mode_box.value = "checkpoint"
        self.rebudget(apply=False)

    def _class_boxes(self, classes: list[str]) -> None:
        for box in self.class_boxes:
            self.form.remove(box)
        self.class_boxes = [FloatSpinBox(label=f"{c} >", min=0.0, max=0.999, step=0.01, value=float(t))
                            for c, t in zip(classes, self._base)]  # fmt: skip
        for box in self.class_boxes:
            self.form.append(box)
            box.changed.connect(self.rebudget)

    def choice(self) -> dict[str, Any]:
        """The setting as ``budget_for``'s keywords."""
        mode = self.mode_box.value
        if mode == "factor":
            return {"factor": float(self.factor_box.value)}
        if mode == "per class":
            return {"per_class": [float(b.value) for b in self.class_boxes]}
        return {}

    def rebudget(self, *_: Any, apply: bool = True) -> Any:
        """Budget the pre-screen at the controls' setting, put it in the pre-screen and redraw."""
        if self.ps is None or self._probs is None:
            return None
        mode = self.mode_box.value
        self.factor_box.visible = mode == "factor"
        for box in self.class_boxes:
            box.visible = mode == "per class"
        rate = (self.ps.timings or {}).get("read_per_patch")
        try:
            self.budget = budget_for(self.model, self.ps, rate, base=self._base, probs=self._probs,
                                     **self.choice())
        except HDMILError as exc:
            self.summary_label.setText(str(exc))
            return None
        self.summary_label.setText(budget_text(self.budget))
        if apply:
            from napari_hdmil._layers import lipn_layer

            apply_budget(self.ps, self.budget)
            if self._store is not None:
                self._store.put(*lipn_layer(self.ps))
            if self._prediction is not None:
                self._prediction.show_prescreen(self.ps)
        return self.budget


def _model_of(ps: Any, runner: Any, inputs: Any) -> Any:
    """The model that made ``ps`` (the inputs' checkpoint, if its hash is the pre-screen's)."""
    try:
        model = runner.load_model(inputs.model_path())
    except HDMILError:
        return None
    return model if str(model.sha256 or "") == str(ps.model_sha256 or "") else None


class BudgetDock(QWidget):
    """The budget control in its own dock: it follows the HDMIL widget (``widget``, default the
    one docked in the viewer) and shows the pre-screen of its chosen slide, with that widget's
    LIPN layer and counts redrawn as the thresholds move."""

    def __init__(self, napari_viewer: Any, widget: Any = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._widget = widget
        self.panel = BudgetPanel(None, None)
        layout = QVBoxLayout(self)
        layout.addWidget(self.panel)
        layout.addStretch(1)
        napari_viewer.layers.events.inserted.connect(self.refresh)  # a pre-screen adds its LIPN layer
        napari_viewer.layers.selection.events.active.connect(self.refresh)  # another slide chosen
        self.refresh()

    def hdmil_widget(self) -> Any:
        if self._widget is None:
            from napari_hdmil._qt.review import docked_widget

            self._widget = docked_widget(self.viewer)
        return self._widget

    def refresh(self, *_: Any) -> None:
        """Show the HDMIL widget's pre-screen of its chosen slide (again only when it changed)."""
        w = self.hdmil_widget()
        ps = w.prescreened if w is not None else None
        if ps is self.panel.ps:
            return
        if w is not None:
            self.panel._store, self.panel._prediction = w._store, w.prediction
        self.panel.set_prescreen(ps, w._run.runner if w is not None else None, w.inputs if w is not None else None)
