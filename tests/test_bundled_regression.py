"""The bundled model on the real CMU slide gives the probabilities pinned in
tests/data/legacy/bundled/probabilities.json (written with make_bundled_probabilities.py): a
restructuring must not move a single probability. The file was first written by the code before
the pipeline-as-stages refactor, with the model of that time; it was written again on purpose
when the grid began to include the partial last row and column (issue 17: patch counts) and when
the bundled model was retrained (issue 20: every number; its "made_by" names the commit)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hdmil.checkpoint import default_model_path, load_model
from hdmil.pipeline import run_slide

EXPECTED = json.loads((Path(__file__).parent / "data/legacy/bundled/probabilities.json").read_text())


@pytest.fixture(scope="module")
def bundled():
    return load_model(default_model_path())


@pytest.mark.parametrize("use_lipn", [True, False], ids=["HDMIL", "HDMIL-dagger"])
def test_cmu_slide_probabilities_unchanged(bundled, cmu_slide, use_lipn):
    want = EXPECTED[f"cmu_{'hdmil' if use_lipn else 'dagger'}"]
    r = run_slide(cmu_slide, bundled, use_lipn=use_lipn)
    np.testing.assert_allclose(r.probabilities, want["probabilities"], rtol=0, atol=1e-6)
    assert (int(r.kept.sum()), len(r.coords)) == (want["n_kept"], want["n_patches"])
    assert float(r.features.sum()) == pytest.approx(want["features_sum"], rel=1e-5)
