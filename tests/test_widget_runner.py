"""The dock widget's worker without a GUI: typed messages in, typed outcomes out."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from napari_hdmil._gallery import gallery_rows
from napari_hdmil._messages import Job, PrescreenDone, Progress, ResultDone, RunCancelled, RunFailed
from napari_hdmil._runner import Runner
from test_cli_predict import _checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("runner") / "tiny.safetensors")


def _job(kind, slide, ckpt, **kw) -> Job:
    return Job(kind, str(slide), None, ckpt, use_lipn=True, batch_size=16, k=3, **kw)


def test_prescreen_then_classify_send_progress_and_return_outcomes(synthetic_slide, ckpt):
    runner, sent = Runner(), []
    ps = runner.work(_job("prescreen", synthetic_slide, ckpt), threading.Event(), sent.append)
    assert isinstance(ps, PrescreenDone) and ps.prescreen.n_patches > 0
    assert sent and all(isinstance(m, Progress) for m in sent)
    assert {m.stage for m in sent} >= {"tissue", "lipn"} and "features" not in {m.stage for m in sent}
    sent.clear()
    done = runner.work(_job("classify", synthetic_slide, ckpt, prescreened=ps.prescreen), threading.Event(),
                       sent.append)  # fmt: skip
    assert isinstance(done, ResultDone) and done.result.n_kept == ps.prescreen.n_kept
    features = [m for m in sent if m.stage == "features"]
    assert features and features[-1].done == features[-1].total == done.result.n_kept
    rows = gallery_rows(done.result, done.result.prediction_index, 3)
    assert sorted(done.thumbnails) == sorted(rows.tolist()) and len(rows) > 0
    assert all(t.shape == (72, 72, 3) and t.dtype == np.uint8 for t in done.thumbnails.values())
    assert runner.model_sha(ckpt) == done.result.model_sha256 and runner.model_sha(ckpt.with_suffix(".x")) == ""


def test_input_errors_and_cancel_are_outcomes(synthetic_slide, ckpt, tmp_path):
    runner = Runner()
    missing = runner.work(_job("all", tmp_path / "missing.svs", ckpt), threading.Event(), lambda m: None)
    assert isinstance(missing, RunFailed) and "missing.svs" in missing.message
    cancel = threading.Event()
    cancel.set()
    stopped = runner.work(_job("all", synthetic_slide, ckpt), cancel, lambda m: None)
    assert isinstance(stopped, RunCancelled) and "cancelled" in stopped.message
