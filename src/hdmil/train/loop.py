"""The one training loop: epochs, seeding, early stopping, the CSV log, progress, cancel, resume.

A model comes to ``fit`` as a ``TrainTask``: a training epoch, a validation function, and what it
saves when an epoch is its best. ``fit`` owns everything around them:

- every epoch is seeded from ``epoch_seed(seed, epoch)`` (Python, NumPy and torch), so a resumed
  run draws the same batches, dropout and noise as an uninterrupted one;
- after every epoch the log row goes to the CSV log, the model and optimizer to
  ``RunFiles.last`` (safetensors: tensors only) and the rest to ``RunFiles.state`` (JSON), so
  resuming executes no pickled code;
- ``resume=True`` continues after the last finished epoch saved there, with the same early-stopping
  state; a run that stopped early stays stopped.

>>> task = MyTask(model, optimizer)                       # a TrainTask
>>> res = fit(task, LoopConfig(max_epochs=50, patience=5), RunFiles.in_dir("run"), resume=True)
>>> res.best_epoch, res.best_metrics["val_loss"]
"""

from __future__ import annotations

import csv
import json
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hdmil.errors import CheckpointError, HDMILError, check_cancelled
from hdmil.files import atomic_path, atomic_write, write_json_atomic

__all__ = [
    "CSVLog",
    "EarlyStopping",
    "LoopConfig",
    "LoopResult",
    "Progress",
    "RunFiles",
    "TrainResult",
    "TrainTask",
    "epoch_seed",
    "fit",
    "load_train_state",
    "resolve_device",
    "write_run_state",
    "save_train_state",
    "seed_everything",
]

Progress = Callable[[str, int, int], None]
STATE_KEYS = ("epoch", "optimizer", "early_stopping", "best_metrics", "stopped_early")


# -- seeding and devices ------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """ "auto": CUDA when there is one, else CPU; otherwise the named torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise HDMILError(f"unknown device {name!r}") from exc


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: a function of (run seed, epoch) only, so resuming changes nothing."""
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


# -- early stopping and the log ------------------------------------------------------------------


class EarlyStopping:
    """Stop when the monitored value has not improved for ``patience`` epochs, but never before
    ``min_epochs`` epochs have run (``patience=None``: never). ``step`` returns True on a new best.
    Lower is better, unless ``higher_is_better``."""

    def __init__(self, patience: int | None, min_epochs: int = 0,
                 higher_is_better: bool = False) -> None:
        self.patience = patience
        self.min_epochs = min_epochs
        self.sign = -1.0 if higher_is_better else 1.0
        self.best = math.inf  # sign * value of the best epoch
        self.best_epoch = -1
        self.since_best = 0

    def step(self, epoch: int, value: float | None) -> bool:
        """``value`` None (nothing monitored): every epoch is a new best."""
        if value is None:
            self.best_epoch, self.since_best = epoch, 0
            return True
        if self.sign * value < self.best:
            self.best, self.best_epoch, self.since_best = self.sign * float(value), epoch, 0
            return True
        self.since_best += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        if self.patience is None:
            return False
        return epoch + 1 >= self.min_epochs and self.since_best >= self.patience

    def state(self) -> dict[str, Any]:
        best = self.best if math.isfinite(self.best) else None  # JSON has no inf
        return {"best": best, "best_epoch": self.best_epoch, "since_best": self.since_best}

    def load(self, state: dict[str, Any]) -> None:
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.since_best = int(state["since_best"])


class CSVLog:
    """An epoch log that survives a resume: rows after the resumed epoch are dropped."""

    def __init__(self, path: Path, resume_after: int | None = None) -> None:
        self.path = path
        self.columns: list[str] | None = None
        self.rows: list[dict[str, Any]] = []
        if resume_after is not None and path.exists():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if int(r["epoch"]) <= resume_after]
            self._rewrite()
        elif path.exists():
            path.unlink()

    def append(self, row: dict[str, Any]) -> None:
        if self.columns is None:
            self.columns = list(row)
        self.rows.append({k: row.get(k, "") for k in self.columns})
        self._rewrite()

    def _rewrite(self) -> None:
        # rewriting a few hundred rows per epoch costs nothing and keeps the file whole
        if self.columns is None:
            return
        with atomic_write(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: _fmt(r.get(k, "")) for k in self.columns})


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


# -- the resumable state: tensors in safetensors, the rest in JSON --------------------------------


def save_train_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model + optimizer tensors into ``path`` (safetensors: ``model.<name>``,
    ``optim.<param index>.<name>``); returns the optimizer's non-tensor state for the JSON side."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
    }
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return {"param_groups": opt["param_groups"], "scalars": scalars}


def load_train_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, opt_json: dict[str, Any]
) -> None:
    """Undo ``save_train_state``: the model's and the optimizer's state, in place."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read the training state ({exc})") from exc
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_sd)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: the saved model does not fit this configuration; start without --resume "
            f"or use the same settings ({str(exc).splitlines()[0]})"
        ) from exc
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, sc in opt_json.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": opt_json["param_groups"]})


# -- the task and the loop -----------------------------------------------------------------------


class TrainTask:
    """One model's part of training; ``fit`` does the rest. Subclass and set ``model`` (one
    module: wrap several in an ``nn.ModuleDict``) and ``optimizer``; both are saved every epoch
    and restored on resume."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def train_epoch(self, epoch: int, seed: int | None,
                    cancel: threading.Event | None) -> dict[str, float]:
        """One pass over the training data; returns the epoch's training columns of the log.
        ``seed``: this epoch's seed (the global RNGs are already seeded with it), or None when
        the loop does not seed."""
        raise NotImplementedError

    def validate(self, epoch: int, cancel: threading.Event | None) -> dict[str, float]:
        """The validation columns of the log (keys start with ``val_``); none by default."""
        return {}

    def save_best(self, epoch: int, row: dict[str, Any], best: dict[str, Any]) -> None:
        """Called after an epoch that is the best so far (every epoch without a monitor):
        write the best checkpoint. ``best``: the ``val_*`` columns of ``row`` and ``epoch``."""

    def state(self) -> dict[str, Any]:
        """JSON-able state saved with every epoch (stored at the top level of the state file)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """On resume, before the tensors load: the whole saved state file. Raise ``HDMILError``
        when this run cannot continue the saved one (another split, another config)."""


@dataclass
class LoopConfig:
    """How ``fit`` runs the epochs."""

    max_epochs: int
    seed: int | None = 0  # None: the loop leaves the global RNGs alone
    monitor: str | None = "val_loss"  # None: every epoch is the best (saved every epoch)
    higher_is_better: bool = False
    patience: int | None = None  # None: no early stopping
    min_epochs: int = 0  # early stopping may stop from this epoch on
    stage: str = "train"  # progress(stage, epochs done, max_epochs)
    what: str = "training"  # cancel raises Cancelled(f"{what} cancelled")


@dataclass
class RunFiles:
    """Where a run writes its log and its resumable state."""

    log: Path
    last: Path  # model + optimizer tensors after the last finished epoch
    state: Path  # the rest of the state (JSON)

    @classmethod
    def in_dir(cls, out_dir: str | Path, prefix: str = "") -> RunFiles:
        """``<prefix>log.csv``, ``<prefix>last.safetensors`` and ``<prefix>state.json``."""
        out_dir = Path(out_dir)
        return cls(out_dir / f"{prefix}log.csv", out_dir / f"{prefix}last.safetensors",
                   out_dir / f"{prefix}state.json")


@dataclass
class LoopResult:
    """What ``fit`` did: the best epoch, its metrics, and the log."""

    log_path: Path
    best_epoch: int
    best_metrics: dict[str, Any]
    epochs_run: int  # epochs finished in total (including those before a resume)
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    """What a training run produced: where, which epoch was best and its validation metrics."""

    out_dir: Path
    checkpoint: Path  # best-validation checkpoint
    log_path: Path
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int  # epochs finished in total (including those before a resume)
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def of(cls, loop: LoopResult, out_dir: Path, checkpoint: Path) -> TrainResult:
        return cls(out_dir, checkpoint, loop.log_path, loop.best_epoch, loop.best_metrics,
                   loop.epochs_run, loop.stopped_early, loop.history)


@dataclass
class _Run:
    """The loop's own state between epochs."""

    stopper: EarlyStopping
    start: int = 0  # the first epoch to run
    done: int = 0  # epochs finished
    best_metrics: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False


def fit(
    task: TrainTask,
    cfg: LoopConfig,
    files: RunFiles,
    resume: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> LoopResult:
    """Run ``task`` from epoch 0 (or after the saved epoch with ``resume``) to ``cfg.max_epochs``
    or an early stop. ``progress(cfg.stage, epoch + 1, max_epochs)`` and ``on_epoch(row)`` after
    every epoch; ``cancel`` raises ``Cancelled`` between epochs (tasks check it between batches),
    leaving the last finished epoch on disk."""
    run = _Run(EarlyStopping(cfg.patience, cfg.min_epochs, cfg.higher_is_better))
    resumed = resume and files.state.exists() and files.last.exists()
    if resumed:
        _resume(task, cfg, files, run)
    log = CSVLog(files.log, resume_after=run.start - 1 if resumed else None)
    for epoch in range(run.start, cfg.max_epochs):
        row = _epoch(task, cfg, epoch, run, cancel)
        run.done = epoch + 1
        log.append(row)
        run.stopped = run.stopper.should_stop(epoch)
        _save_state(task, files, epoch, run)
        if on_epoch is not None:
            on_epoch(row)
        if progress is not None:
            progress(cfg.stage, epoch + 1, cfg.max_epochs)
        if run.stopped:
            break
    return LoopResult(files.log, run.stopper.best_epoch, run.best_metrics, run.done, run.stopped,
                      [dict(r) for r in log.rows])


def _epoch(task: TrainTask, cfg: LoopConfig, epoch: int, run: _Run,
           cancel: threading.Event | None) -> dict[str, Any]:
    """Train and validate one epoch; save the best checkpoint when it is the best so far."""
    check_cancelled(cancel, cfg.what)
    t0 = time.perf_counter()
    seed = None if cfg.seed is None else epoch_seed(cfg.seed, epoch)
    if seed is not None:
        seed_everything(seed)
    row: dict[str, Any] = {"epoch": epoch, **task.train_epoch(epoch, seed, cancel)}
    row.update(task.validate(epoch, cancel))
    row["seconds"] = time.perf_counter() - t0
    if run.stopper.step(epoch, None if cfg.monitor is None else row[cfg.monitor]):
        run.best_metrics = {k: v for k, v in row.items() if k.startswith("val_")}
        run.best_metrics["epoch"] = epoch
        task.save_best(epoch, row, run.best_metrics)
    return row


def _save_state(task: TrainTask, files: RunFiles, epoch: int, run: _Run) -> None:
    write_run_state(task, files, epoch, run.stopper, run.best_metrics, run.stopped)


def write_run_state(task: TrainTask, files: RunFiles, epoch: int, stopper: EarlyStopping,
                    best_metrics: dict[str, Any], stopped: bool = False) -> None:
    """The resumable state after ``epoch``: weights and optimizer tensors into ``files.last``,
    the rest (and ``task.state()``) into ``files.state``. ``fit`` calls it every epoch; a task
    that resumes from a checkpoint of its own (no run files yet) calls it once to make them."""
    opt_json = save_train_state(files.last, task.model, task.optimizer)
    extra = task.state()
    clash = set(extra) & set(STATE_KEYS)
    if clash:
        raise ValueError(f"task state may not use the loop's keys {sorted(clash)}")
    write_json_atomic(files.state, {
        "epoch": epoch,
        "optimizer": opt_json,
        "early_stopping": stopper.state(),
        "best_metrics": best_metrics,
        "stopped_early": stopped,
        **extra,
    }, indent=1)


def _resume(task: TrainTask, cfg: LoopConfig, files: RunFiles, run: _Run) -> None:
    state = json.loads(files.state.read_text())
    task.load_state(state)
    load_train_state(files.last, task.model, task.optimizer, state["optimizer"])
    run.stopper.load(state["early_stopping"])
    # JSON has no NaN: a metric written as null was NaN
    run.best_metrics = {k: math.nan if v is None else v
                        for k, v in (state.get("best_metrics") or {}).items()}
    run.start = run.done = int(state["epoch"]) + 1
    run.stopped = bool(state.get("stopped_early"))
    if run.stopped:
        run.start = max(run.start, cfg.max_epochs)  # a finished run stays finished
