"""``python -m napari_hdmil.demo --screenshot --dock-shot``: the README's two pictures come from a
real run (issue 15 §10): the window with the heatmap, and the widget's dock at 420 px."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.gui
def test_the_demo_saves_the_window_and_the_dock(qtbot, cmu_slide, tmp_path, capsys):
    from qtpy.QtGui import QImage

    from napari_hdmil import demo

    shot, dock = tmp_path / "heatmap.png", tmp_path / "widget.png"
    rc = demo.main(["--slide", str(cmu_slide), "--size", "1600x1000", "--screenshot", str(shot),
                    "--dock-shot", str(dock)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "CMU-1-Small-Region: " in out and (shot.parent / "report.json").is_file()
    window, panel = QImage(str(shot)), QImage(str(dock))
    assert (window.width(), window.height()) == (1600, 1000)
    assert panel.width() == demo.DOCK_WIDTH and 700 < panel.height() < 1000
    assert f"{dock} ({demo.DOCK_WIDTH} x {panel.height()} px)" in out
    ptr = panel.convertToFormat(QImage.Format_RGB888).constBits()
    ptr.setsize(panel.height() * panel.bytesPerLine())
    px = np.frombuffer(ptr, np.uint8).reshape(panel.height(), panel.bytesPerLine())
    assert px.std() > 20  # the widget drawn (text, bars), not a blank grab
