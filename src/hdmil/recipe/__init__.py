"""The demo model's recipe: synthetic cohort → encoder → features → DMIN → LIPN → held-out report.

    result = run_recipe("out/demo-model", RecipeConfig(seed=0))
    result.checkpoint      # out/demo-model/hdmil-demo.safetensors (DMIN + LIPN, loadable with load_model)
    result.report          # the JSON report (also out/demo-model/hdmil-demo.json)

Everything follows from ``RecipeConfig.seed``: the training cohort is ``synth_cohort(seed)``, the
held-out cohort ``synth_cohort(seed + HELDOUT_OFFSET)`` (its slide seeds are checked to be disjoint
from the training ones), a tiny timm encoder is trained on the training slides' patch truth (its
weights go beside the checkpoint, named by ``encoder_weights``), DMIN then learns from slide labels
only and LIPN from DMIN's masks, all seeded. Two runs with one seed give the same weights. The demo
is trained on synthetic slides and is not for diagnosis (docs/demo_model.md).

The modules, in the order a run uses them:

    config          RecipeConfig (defaults = the bundled model), RecipeError, constants
    cohorts         make / re-use the synthetic cohorts, split them, read their ground truth
    encoder         the patch encoder fine-tuned on patch truth (hard_negatives: its 2nd round)
    features        cohort_features: one feature file per slide
    training        DMIN with the branch check (then LIPN, in run)
    heldout         heldout_metrics: slide and patch accuracy against the ground truth
    run             run_recipe: the stages, each timed (timing.StageClock), and the report
    install         install_demo: the three files into the package's assets

The held-out metrics (``heldout_metrics``) use the cohort's ground truth: slide AUC / ACC of HDMIL
(LIPN + DMIN) and HDMIL† (DMIN on all patches), LIPN's recall of ground-truth tumour patches in its
kept set and its kept ratio, and the patch-level AUC of DMIN's tumour attention. The accuracy
benchmark (``benchmarks/accuracy.py``) calls the same functions on more held-out slides.
"""

from hdmil.recipe.cohorts import slide_truth
from hdmil.recipe.config import DEMO_NAME, HELDOUT_OFFSET, TUMOR_AT, RecipeConfig, RecipeError
from hdmil.recipe.encoder import patch_head, train_patch_encoder
from hdmil.recipe.features import cohort_features, encoder_for_model
from hdmil.recipe.hard_negatives import hard_negatives
from hdmil.recipe.heldout import heldout_metrics
from hdmil.recipe.install import install_demo
from hdmil.recipe.run import RecipeResult, run_recipe
from hdmil.recipe.timing import StageClock
from hdmil.recipe.training import train_dmin_checked

__all__ = [
    "DEMO_NAME",
    "HELDOUT_OFFSET",
    "TUMOR_AT",
    "RecipeConfig",
    "RecipeError",
    "RecipeResult",
    "StageClock",
    "cohort_features",
    "encoder_for_model",
    "hard_negatives",
    "heldout_metrics",
    "install_demo",
    "patch_head",
    "run_recipe",
    "slide_truth",
    "train_dmin_checked",
    "train_patch_encoder",
]
