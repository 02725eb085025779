"""The widget's worker: loads (and keeps) the model and encoder, runs the pipeline, no Qt.

``Runner.work(job, cancel, send)`` runs in napari's thread worker. It sends ``Progress`` messages
through ``send`` and returns one ``Outcome``; input errors come back as ``RunFailed`` (one line for
a notification), a set ``cancel`` event as ``RunCancelled``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hdmil.annotations import roi_key
from hdmil.budget import measure_rate, record_budget
from hdmil.errors import Cancelled, HDMILError
from hdmil.pipeline import prescreen
from napari_hdmil._gallery import gallery_rows, read_result_thumbnails
from napari_hdmil._messages import Job, Outcome, PrescreenDone, Progress, ResultDone, RunCancelled, RunFailed

__all__ = ["Runner"]


class Runner:
    """Work for the dock widget. Keeps one model and one encoder between runs (the last used),
    and warms each model/encoder pair once so torch's one-time setup stays out of stage seconds."""

    def __init__(self) -> None:
        self._models: dict[tuple, Any] = {}
        self._encoders: dict[tuple, Any] = {}
        self._warm: set[tuple] = set()
        self._screened: dict[int, tuple[Any, Any]] = {}  # id(pre-screen) -> (it, its ROI's key)

    def work(self, job: Job, cancel: threading.Event, send: Callable[[Progress], None]) -> Outcome:
        """Worker thread: the outcome of ``job``."""
        try:
            return self._compute(job, cancel, send)
        except Cancelled as exc:
            return RunCancelled(str(exc))
        except HDMILError as exc:
            return RunFailed(str(exc))

    def _compute(self, job: Job, cancel: threading.Event, send: Callable[[Progress], None]) -> Outcome:
        from hdmil.pipeline import lipn_applies, run_slide

        def progress(stage: str, done: int, total: int) -> None:
            send(Progress(stage, int(done), int(total)))

        model = self.load_model(job.model_path)
        use_lipn = lipn_applies(model, job.use_lipn)
        if job.kind == "prescreen":
            ps = prescreen(job.slide_path, model, use_lipn, job.mpp, progress, cancel, roi=job.roi,
                           exclude=job.exclude)
            self._remember(ps, roi_key(job.roi, job.exclude))
            if use_lipn:  # the slide's HR seconds per patch: the budget control's predicted time
                ps.timings["read_per_patch"] = measure_rate(ps, self.encoder(model, job.device))
            return PrescreenDone(ps)
        ps = self._same_roi(job.prescreened, roi_key(job.roi, job.exclude))
        result = run_slide(
            job.slide_path, model, use_lipn=use_lipn, mpp=job.mpp, encoder=self.encoder(model, job.device),
            batch_size=job.batch_size, progress=progress, cancel=cancel, roi=job.roi, exclude=job.exclude,
            prescreened=ps,
        )
        record_budget(result, ps)  # the budget control's thresholds, when Classify used them
        rows = gallery_rows(result, result.prediction_index, job.k)
        return ResultDone(result, read_result_thumbnails(result, rows))

    def _remember(self, ps: Any, key: Any) -> None:
        """Note the ROI and exclusion (``roi_key``) pre-screen ``ps`` was restricted to (the last
        few pre-screens)."""
        self._screened = {k: v for k, v in list(self._screened.items())[-15:]}
        self._screened[id(ps)] = (ps, key)

    def _same_roi(self, ps: Any, key: Any) -> Any:
        """``ps`` when it was restricted to the ROI and exclusion of ``key`` (Classify reuses it),
        else None: they changed since the pre-screen, so the run screens again. A pre-screen made
        elsewhere is reused only when neither it nor this run has a ROI or exclusion."""
        if ps is None:
            return None
        seen = self._screened.get(id(ps))
        if seen is None or seen[0] is not ps:
            return ps if key is None and ps.roi is None else None
        return ps if seen[1] == key else None

    def load_model(self, path: Path) -> Any:
        """The checkpoint at ``path``, loaded again only when the file changed."""
        from hdmil.checkpoint import load_model

        path = Path(path)
        try:
            st = path.stat()
            key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        except OSError:
            key = (str(path), 0, 0)  # load_model says what is wrong with it
        if key not in self._models:
            self._models = {key: load_model(path)}  # one model at a time
        return self._models[key]

    def model_sha(self, path: Path) -> str:
        """The checkpoint's hash; "" when it cannot be loaded (the run will say why)."""
        try:
            return str(self.load_model(path).sha256)
        except HDMILError:
            return ""

    def encoder(self, model: Any, device: Any = None) -> Any:
        """The encoder ``model`` was trained on, built once per (architecture, weights, device)."""
        from hdmil.pipeline import encoder_for, warm_up
        from hdmil.pipeline.setup import encoder_key

        key = (encoder_key(model), str(device))
        if key not in self._encoders:
            self._encoders = {key: encoder_for(model, device)}
        encoder = self._encoders[key]
        warm = (id(model), key)
        if warm not in self._warm:
            warm_up(model, encoder, patch_px=model.patch_px)
            self._warm.add(warm)
        return encoder
