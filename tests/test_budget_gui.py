"""The budget control in a real viewer: after Pre-screen, LIPN's thresholds move the LIPN layer,
the kept count and the predicted time live; its numbers are `hdmil predict --lipn-threshold`'s;
Classify reads what it kept and the report records the setting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hdmil.budget import budget_for
from hdmil.checkpoint import default_model_path, load_model
from hdmil.cli import main
from hdmil.pipeline import prescreen
from napari_hdmil._layers import KEPT, NEIGHBOUR
from napari_hdmil._qt.budget import BudgetDock
from napari_hdmil._widget import HDMILWidget

pytestmark = pytest.mark.gui


def _run(qtbot, widget, kind):
    assert widget.run(kind) is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    qtbot.wait(20)


def _lipn_layer(viewer):
    return next(layer for layer in viewer.layers if (layer.metadata or {}).get("hdmil_layer") == "lipn")


def test_budget_control_moves_the_lipn_layer_and_agrees_with_the_cli(make_napari_viewer, qtbot,
                                                                    synthetic_slide, tmp_path, errors):
    viewer = make_napari_viewer()
    viewer.open(str(synthetic_slide), plugin="napari-hdmil")
    w = HDMILWidget(viewer)
    viewer.window.add_dock_widget(w, name="HDMIL", area="right")
    dock = BudgetDock(viewer, widget=w)
    _run(qtbot, w, "prescreen")
    panel, ps = dock.panel, w.prescreened
    assert panel.ps is ps and panel.isEnabled()
    rate = ps.timings["read_per_patch"]
    assert rate > 0 and f"kept {ps.n_kept} of {ps.n_patches}" in panel.summary_label.text()

    panel.mode_box.value = "factor"
    panel.factor_box.value = 0.5
    b = panel.budget
    model = load_model(default_model_path())
    fresh = prescreen(synthetic_slide, model)
    ours = budget_for(model, fresh, rate, factor=0.5)
    assert b.n_kept == ours.n_kept and b.kept_ratio == ours.kept_ratio and b.predicted_seconds == ours.predicted_seconds
    assert w.prescreened.n_kept == b.n_kept  # the pre-screen Classify reuses
    decision = np.asarray(_lipn_layer(viewer).data)
    assert int(np.isin(decision, (KEPT, NEIGHBOUR)).sum()) == b.n_kept
    assert f"kept {b.n_kept} of" in panel.summary_label.text() and "reading ≈" in panel.summary_label.text()

    panel.mode_box.value = "per class"  # 0.3 for every class = --lipn-threshold 0.3
    for box in panel.class_boxes:
        box.value = 0.3
    assert main(["predict", str(synthetic_slide), "--lipn-threshold", "0.3", "--out", str(tmp_path)]) == 0
    cli = json.loads((tmp_path / synthetic_slide.stem / "report.json").read_text())["budget"]
    gui = panel.budget.to_report()
    for key in ("thresholds", "n_patches", "n_kept", "n_kept_as_neighbour", "kept_ratio", "kept_per_class"):
        assert gui[key] == cli[key], key

    chosen = panel.budget
    _run(qtbot, w, "classify")
    res = w.result
    assert errors() == [] and res is not None
    assert panel.ps is None and not panel.isEnabled()  # the pre-screen is used: nothing to budget
    assert res.n_read == chosen.n_kept and res.blocks["budget"]["setting"]["kind"] == "per_class"
    assert res.blocks["budget"]["n_kept"] == gui["n_kept"]
