"""Hierarchical inference on one slide: LIPN pre-screens at 1.25x, only kept patches are read at 20x.

    slide ─► prescreen: tissue grid ─► LR patches ─► LIPN keep mask [N, C]      (prescreen.py)
                                                          │ union of kept rows
                                                          ▼
             featurise: PatchReader (tile-aligned, prefetched) ─► encoder       (featurise.py)
                                                          │ features [K, D]
                                                          ▼
             pool: PatchPooler (DMIN over LIPN's mask) or RegionPooler          (pool.py)
                   (SLPD regions, then DMIN) ─► Pooled
                                                          │
                                                          ▼
             Result (probabilities, attention, stage seconds; RegionDetails)    (result.py)

``run_slide`` (run.py) chains the stages; a slide whose kept patches cannot be decoded (all, or
more than ``RunOptions.max_failed_share``) fails with ``UnreadablePatchesError`` rather than being
classified from what is left. ``folders.py`` names each slide's results folder safely, records
what produced a result (``run_key``) and locks a slide while a run works on it; ``setup.py`` builds and checks what a run needs besides
the checkpoint (encoder, SLPD model). The CLI (``hdmil predict``), the Dask batch runner and the
napari widget all call ``run_slide``. ``use_lipn=False`` is HDMIL†: every tissue patch is read and
DMIN pools over its own mask. A DMIN trained on SLPD region embeddings (``train-dmin --instances
region``) is run without LIPN: every tissue patch is read, the SLPD teacher embeds each 16 × 16
block of patch features as one region, DMIN pools the regions, and each patch shows its region's
attention. The bag-level pieces (LIPN screen, DMIN pool) live in ``hdmil.inference``, shared with
evaluation on feature files.

Stage seconds (``Result.timings``):

* ``tissue``: open the slide, tissue mask and patch grid (with the 1.25x image LIPN reads);
* ``open``: the part of ``tissue`` spent opening the slide (0 for a slide opened by the caller);
* ``lipn``: cutting LR patches and running LIPN on them;
* ``crop``: read + decode + resize of the HR patches, measured in the reader's own thread (its
  working time, not time it waited for the encoder to take a batch);
* ``features``: the encoder, measured in the calling thread;
* ``dmin``: DMIN's masked pooling and classification (with SLPD's region embedding);
* ``total``: wall-clock of the whole run. Reading overlaps feature extraction, so
  ``crop + features`` can exceed the time they took together; ``crop_wait`` is the part of the
  total the encoder sat waiting for patches (the crop time not hidden behind features).
* ``encoder_wait``: seconds the run waited, after the pre-screen, for an encoder still being
  built (``start_encoder``; ``run_slide`` without an encoder builds one in a thread while
  tissue and LIPN run): set-up, not counted in ``total``.
"""

from __future__ import annotations

from hdmil.pipeline.featurise import Featurised, featurise
from hdmil.pipeline.setup import (
    EncoderBuild,
    check_model,
    check_slpd_dims,
    encoder_for,
    fit_encoder,
    instances_of,
    lipn_applies,
    slpd_for,
    start_encoder,
    warm_up,
)
from hdmil.pipeline.pool import PatchPooler, Pooled, Pooler, RegionPooler, pooler_for
from hdmil.pipeline.prescreen import PreScreen, ProgressFn, prescreen
from hdmil.pipeline.result import STAGES, NoTissueError, RegionDetails, Result, UnreadablePatchesError
from hdmil.pipeline.run import RunOptions, run_slide

__all__ = [
    "STAGES", "EncoderBuild", "Featurised", "NoTissueError", "PatchPooler", "Pooled", "Pooler", "PreScreen",
    "ProgressFn", "RegionDetails", "RegionPooler", "Result", "RunOptions", "UnreadablePatchesError",
    "check_model",
    "check_slpd_dims", "encoder_for", "featurise", "fit_encoder", "instances_of", "lipn_applies",
    "pooler_for", "prescreen", "run_slide", "slpd_for", "start_encoder", "warm_up",
]
