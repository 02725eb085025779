"""Synthetic H&E slides and cohorts with pixel ground truth.

``synth_slide`` writes one procedural slide (a tiled JPEG pyramid TIFF that tiffslide and
OpenSlide read with mpp); ``synth_cohort`` writes a labelled cohort of tumour and normal slides
with GeoJSON and patch-level truth; ``demo_slide_path`` is the demo slide the napari sample and
``make demo`` share.
"""

from hdmil.synth.cohort import CohortInfo, CohortSlide, synth_cohort
from hdmil.synth.slide import (
    ARTEFACTS,
    DEMO,
    Stain,
    SynthError,
    SynthSlide,
    cache_dir,
    demo_slide_path,
    mask_polygons,
    synth_slide,
)

__all__ = [
    "ARTEFACTS",
    "DEMO",
    "CohortInfo",
    "CohortSlide",
    "Stain",
    "SynthError",
    "SynthSlide",
    "cache_dir",
    "demo_slide_path",
    "mask_polygons",
    "synth_cohort",
    "synth_slide",
]
