"""Probabilities of the bundled model on the demo slide and the CMU slide, HDMIL and HDMIL†.

Usage (from a checkout of the code whose numbers are to be kept):
    python make_bundled_probabilities.py OUT.json SLIDE_DIR
SLIDE_DIR receives the generated demo slide; the CMU slide is read from ../shared/data.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import hdmil
from hdmil.checkpoint import load_model, default_model_path
from hdmil.pipeline import run_slide
from hdmil.synth import demo_slide_path
def main():
    out = {"hdmil_file": hdmil.__file__}
    model = load_model(default_model_path())
    slides = {"demo": str(demo_slide_path(directory=sys.argv[2])),
              "cmu": str(Path(__file__).resolve().parents[4].parent / "shared/data/slides/CMU-1-Small-Region.svs")}
    out["demo_slide_sha256"] = hashlib.sha256(open(slides["demo"], "rb").read()).hexdigest()
    for name, path in slides.items():
        for use_lipn in (True, False):
            r = run_slide(path, model, use_lipn=use_lipn)
            out[f"{name}_{'hdmil' if use_lipn else 'dagger'}"] = {
                "probabilities": [float(p) for p in r.probabilities],
                "n_kept": int(r.kept.sum()), "n_patches": int(len(r.coords)),
                "attention_sum": float(np.nansum(r.attention)),
                "features_sum": float(r.features.sum()),
            }
    json.dump(out, open(sys.argv[1], "w"), indent=1)
    print(json.dumps(out, indent=1))

if __name__ == '__main__':
    main()
