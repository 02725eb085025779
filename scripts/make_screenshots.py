"""Make the README screenshot ``docs/images/widget.png`` from a real run: the dock widget with its
prediction panel, the attention heatmap over the slide.

    xvfb-run -a .venv/bin/python scripts/make_screenshots.py [--slide PATH] [--model CKPT]

Slide: the synthetic demo slide when it has been made, else the CMU test slide. Model: the bundled
demo model when it exists (``make model``); else an UNTRAINED checkpoint (seeded LIPN and DMIN over a
tiny random encoder) so that the picture still comes from a real run of the whole pipeline; its
heatmap then means nothing. Re-run this after ``make model``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = "screenshot_tiny_encoder"


def _untrained_checkpoint(slide: Path, out: Path) -> Path:
    import torch
    from torch import nn

    from hdmil.checkpoint import save_checkpoint
    from hdmil.features.encoders import Encoder, register_encoder
    from hdmil.grid import build_grid
    from hdmil.models import DMIN, LIPN, DMINConfig, LIPNConfig
    from hdmil.slide import open_slide

    @register_encoder(TINY)
    def _tiny(pretrained: bool = False, device=None) -> Encoder:
        torch.manual_seed(3)
        net = nn.Sequential(nn.Conv2d(3, 8, 16, stride=16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return Encoder(net, TINY, input_size=256, dim=8, device="cpu", channels_last=False)

    with open_slide(slide) as s:
        lr = build_grid(s).lr_patches()
    torch.manual_seed(0)
    lipn = LIPN(LIPNConfig(n_classes=2))
    for m in lipn.modules():  # BatchNorm statistics of this slide, else LIPN scores every patch alike
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        lipn.train()(LIPN.prepare(lr))
        logits = lipn.eval()(LIPN.prepare(lr))
        for c, keep in enumerate((0.5, 0.3)):  # keep about half the patches
            lipn.fc.bias[c] -= torch.quantile(logits[:, c], 1.0 - keep)
    torch.manual_seed(1)
    dmin = DMIN(DMINConfig(in_dim=8, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3)).eval()
    return save_checkpoint(out, {"dmin": dmin, "lipn": lipn},
                           {"classes": ["normal", "tumor"], "encoder": TINY,
                            "provenance": {"data": "untrained, for screenshots only"}})  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide")
    p.add_argument("--model")
    p.add_argument("--out", default=str(REPO / "docs" / "images" / "widget.png"))
    args = p.parse_args()

    from hdmil.checkpoint import default_model_path
    from hdmil.synth import demo_slide_path
    from napari_hdmil import demo

    slide = Path(args.slide) if args.slide else demo_slide_path(create=False)
    if not slide.exists():
        slide = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
    model = Path(args.model) if args.model else default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        if not model.is_file():
            print(f"{model} missing: using an UNTRAINED checkpoint (the heatmap means nothing)", file=sys.stderr)
            model = _untrained_checkpoint(slide, Path(tmp) / "untrained.safetensors")
        rc = demo.main(["--screenshot", args.out, "--slide", str(slide), "--model", str(model)])
    Path(args.out).with_name("report.json").unlink(missing_ok=True)  # the demo's; not a doc image
    return rc


if __name__ == "__main__":
    sys.exit(main())
