"""The README's batch review screenshot (docs/images/review.png): four slides through hdmil.batch.process_slide,
three verdicts, the panel docked with one slide open. Run under a display: xvfb-run -a python scripts/review_screenshot.py OUT.png
"""
import shutil, sys
from pathlib import Path
from hdmil.batch import process_slide, write_summary
from hdmil.review import save_verdict
from hdmil.synth import synth_slide
root = Path("/tmp/review_shot"); shutil.rmtree(root, ignore_errors=True)
slides = root / "slides"; slides.mkdir(parents=True)
shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"
shutil.copy(shared / "CMU-1-Small-Region.svs", slides)
shutil.copy(shared / "small-16px.svs", slides)
synth_slide(slides / "synthetic-tumour.tiff", size=(4096, 3072), seed=7, tumor_fraction=0.2)
synth_slide(slides / "synthetic-normal.tiff", size=(4096, 3072), seed=3, tumor_fraction=0.0)
out = root / "out"
rows = [process_slide(str(p), str(out), batch_size=16) for p in sorted(slides.iterdir())]
write_summary(out, rows)
save_verdict(out, "CMU-1-Small-Region", "agree", "benign, as predicted", "normal")
save_verdict(out, "synthetic-tumour", "agree", "tumour where the top-k are", "tumor")
save_verdict(out, "synthetic-normal", "unsure", "check the lower edge again", "normal")
import warnings; warnings.filterwarnings("ignore")
import napari
from napari_hdmil._qt.review import ReviewPanel
viewer = napari.Viewer(show=True)
viewer.window.resize(1600, 900)
panel = ReviewPanel(viewer)
viewer.window.add_dock_widget(panel, name="HDMIL batch review", area="right")
panel.open_folder(out)
panel.setMinimumWidth(620)
panel.select(panel.shown.index(next(r for r in panel.shown if r.slide == "synthetic-tumour")))
panel.open_current()
from qtpy.QtWidgets import QApplication
for _ in range(20): QApplication.processEvents()
viewer.reset_view()
import time
t = time.time()
while time.time() - t < 8: QApplication.processEvents(); time.sleep(0.05)
from napari._qt.dialogs.qt_notification import NapariQtNotification
for w in viewer.window._qt_window.findChildren(NapariQtNotification): w.hide()
for _ in range(10): QApplication.processEvents()
viewer.screenshot(str(sys.argv[1]), canvas_only=False)
viewer.close()
