"""The compare and audit panel in a real viewer: two runs of a slide, the difference layers in µm,
the patches read by one run only, and the audited patches marked on the heatmap."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hdmil._qt.compare import ComparePanel

pytestmark = pytest.mark.gui


def test_compare_then_audit(make_napari_viewer, synthetic_slide):
    viewer = make_napari_viewer()
    viewer.open(str(synthetic_slide), plugin="napari-hdmil")
    panel = ComparePanel(viewer)
    viewer.window.add_dock_widget(panel, name="HDMIL compare", area="right")
    assert panel.slide_box.value is not None
    cmp = panel.compare(sync=True)
    assert cmp.a.method == "HDMIL" and cmp.b.method == "HDMIL†"
    assert "A: HDMIL" in panel.a_label.text() and "B: HDMIL†" in panel.b_label.text()
    for c in cmp.classes:
        layer = panel.layers[f"attention B − A: {c}"]
        assert tuple(str(u) for u in layer.units) == ("micrometer", "micrometer")
        assert layer.contrast_limits[0] == pytest.approx(-layer.contrast_limits[1])
        np.testing.assert_array_equal(np.asarray(layer.data), cmp.rasters()["difference"][cmp.classes.index(c)])
    only = panel.layers["read by one run only"]
    assert len(only.data) == int(cmp.only_b.sum()) == cmp.b.n_read - cmp.a.n_read
    assert set(only.features["read_by"]) == {"B only"}

    panel.n_box.value = 0  # all discarded patches
    audit = panel.audit(sync=True)
    assert len(audit.rows) == audit.n_discarded == int((~cmp.a.kept).sum())
    marks = panel.layers["audited (LIPN discarded)"]
    assert len(marks.data) == len(audit.rows) and marks.symbol[0].value == "cross"
    assert "audited" in panel.audit_label.text() and audit.prediction in panel.audit_label.text()
