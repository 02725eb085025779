"""The model stack can be imported after napari's OpenGL canvas exists, also from a worker thread.

This is the order of a real session (viewer first, then the widget builds an encoder); a CUDA build
of torch used to crash the process here by loading triton after Mesa's LLVM.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gui

SCRIPT = r"""
import threading
import napari
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer(show=True)
app = QApplication.instance()
for _ in range(10):
    app.processEvents()
import napari_hdmil._widget  # what napari imports when the dock widget is opened
errors = []
def build():
    try:
        from hdmil.features import create_encoder
        enc = create_encoder("resnet18_trunc", device="cpu")
        assert enc.dim == 256
    except BaseException as exc:
        errors.append(repr(exc))
t = threading.Thread(target=build)
t.start(); t.join()
viewer.close()
print("ERRORS" if errors else "OK", errors)
"""


def test_encoder_after_viewer_in_worker_thread(tmp_path):
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs an X server (pytest-xvfb provides one)")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout, proc.stdout + proc.stderr[-2000:]
