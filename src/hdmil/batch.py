"""Cohort-scale runs on Dask distributed: one task per slide, resumable, fault-tolerant.

Without a scheduler address a ``distributed.LocalCluster`` of worker processes is started, sized to
the machine; with one, the run joins an existing cluster (for example one started by dask-jobqueue
on SLURM). Each task writes its slide's results atomically, so a killed worker or a Ctrl-C leaves
only complete results, and a re-run skips the slides that are done.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdmil.errors import HDMILError
from hdmil.files import WriteError
from hdmil.pipeline.folders import (
    DISK_ERRNOS,
    SlideBusyError,
    SlideEntry,
    disk_error,
    plan_slides,
    printable,
    remove_dead_temps,
    result_state,
    run_key,
    safe_name,
    slide_lock,
)
from hdmil.pipeline.result import STAGES  # the stage seconds of every report

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".vms", ".vmu", ".bif", ".svslide")


# --------------------------------------------------------------------------- inputs


def list_slides(source: str | os.PathLike) -> list[Path]:
    """Slides named by ``source``: a folder (its slide files, sorted) or a CSV of paths.

    A CSV uses its ``path`` (or ``slide``) column, else its first column; relative paths are taken
    relative to the CSV's folder. Bytes that are not UTF-8 are kept as they are (``surrogateescape``),
    so such a path still names its file.
    """
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    if not source.exists():
        raise HDMILError(f"{printable(source)}: no such folder or CSV file")
    if source.suffix.lower() != ".csv":
        raise HDMILError(f"{printable(source)}: give a folder of slides or a CSV with a 'path' column")
    with open(source, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise HDMILError(f"{printable(source)}: the CSV is empty")
    header = [h.strip().lower() for h in rows[0]]
    col = next((header.index(n) for n in ("path", "slide", "slide_path") if n in header), None)
    body = rows[1:] if col is not None else rows
    col = col or 0
    paths = []
    for row in body:
        if len(row) > col and row[col].strip():
            p = Path(row[col].strip())
            paths.append(p if p.is_absolute() else source.parent / p)
    return paths


def slide_out_dir(out_dir: Path, slide_path: Path) -> Path:
    """The results folder of a slide run on its own (its safe stem; ``plan_slides`` adds a hash
    when two slides of one run share it)."""
    return Path(out_dir) / safe_name(slide_path)


def is_complete(out_dir: Path, slide_path: Path) -> bool:
    """Whether the slide's folder holds a report (written last, atomically) next to its patches
    (whatever made them: ``result_state`` also checks the settings)."""
    d = slide_out_dir(out_dir, slide_path)
    return (d / "report.json").is_file() and (d / "patches.h5").is_file()


# --------------------------------------------------------------------------- the task


_MODEL_CACHE: dict[tuple[str, float], Any] = {}


def _model_file(model_path: str | os.PathLike | None) -> str:
    from hdmil.checkpoint import default_model_path

    return str(model_path or default_model_path())


def _load_model_cached(model_path: str | None):
    """One model and encoder load per worker process (tasks on a worker share them)."""
    from hdmil.checkpoint import load_model
    from hdmil.pipeline import encoder_for

    path = _model_file(model_path)
    key = (path, os.path.getmtime(path) if os.path.exists(path) else 0.0)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        model = load_model(path)
        _MODEL_CACHE[key] = (model, encoder_for(model, None))
    return _MODEL_CACHE[key]


def expected_key(model: Any, use_lipn: bool, mpp: float | None, slide_path: str | os.PathLike,
                 roi: Any = None) -> dict:
    """The ``run_key`` a batch run of this slide gives (the encoder the checkpoint names);
    ``roi``: its ``hdmil.annotations.Annotations`` (``--roi-dir``)."""
    from hdmil.annotations import roi_key
    from hdmil.pipeline import lipn_applies

    key = run_key(model, lipn_applies(model, use_lipn), mpp, model.encoder, slide_path)
    key["roi"] = roi_key(roi, None)
    return key


def slide_roi(roi_dir: str | os.PathLike | None, slide_path: str | os.PathLike) -> Any:
    """The slide's ROI from ``roi_dir`` (``<stem>.geojson``, ``.json`` or ``.xml``); None without
    a folder; AnnotationError when the folder has none for this slide."""
    if roi_dir is None:
        return None
    from hdmil.annotations import find_annotation_file, read_annotations

    return read_annotations(find_annotation_file(roi_dir, Path(slide_path).stem))


@dataclass
class SlideTask:
    """How ``process_slide`` runs one slide (the same for every slide of a batch)."""

    out_dir: str
    model_path: str | None = None
    use_lipn: bool = True
    mpp: float | None = None
    batch_size: int = 64
    max_failed_share: float = 0.5
    force: bool = False
    roi_dir: str | None = None


def process_slide(
    slide_path: str,
    out_dir: str,
    model_path: str | None = None,
    use_lipn: bool = True,
    mpp: float | None = None,
    batch_size: int = 64,
    name: str | None = None,
    max_failed_share: float = 0.5,
    force: bool = False,
    roi_dir: str | None = None,
) -> dict:
    """Run one slide and write its results into ``out_dir/<name>``; return its summary row.
    With ``roi_dir``, only the patches inside the slide's annotation file there are analysed.

    The slide's lock is held while it runs; results made with the same settings (``run_key``)
    are reused (``skipped``), others are recomputed and replaced (said in the row's ``note``).
    Input problems (corrupt file, no tissue, no mpp, undecodable patches, a model that does not
    fit, a full disk) are recorded in the row as ``failed``, a slide another run holds as
    ``busy``; other exceptions propagate so that Dask can retry the task.
    """
    task = SlideTask(out_dir, model_path, use_lipn, mpp, batch_size, max_failed_share, force, roi_dir)
    path = Path(slide_path)
    entry = SlideEntry(path, os.path.realpath(path), name or safe_name(path))
    row: dict[str, Any] = {"slide": entry.name, "path": entry.shown}
    try:
        _make_out(Path(out_dir))
        with slide_lock(out_dir, entry.name, entry.shown):
            return _process_locked(entry, task, row)
    except SlideBusyError as exc:
        row.update(status="busy", error=printable(exc))
    except HDMILError as exc:
        row.update(status="failed", error=printable(exc))
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        row.update(status="failed", error=disk_error(entry.shown, exc))
    return row


def _process_locked(entry: SlideEntry, task: SlideTask, row: dict) -> dict:
    from hdmil.pipeline import RunOptions, lipn_applies, run_slide

    folder = entry.folder(task.out_dir)
    remove_dead_temps(folder)
    model, encoder = _load_model_cached(task.model_path)
    roi = slide_roi(task.roi_dir, entry.path)
    state, why = result_state(folder, expected_key(model, task.use_lipn, task.mpp, entry.path, roi))
    if state == "done" and not task.force:
        return _row_from_report(row, folder / "report.json", "skipped")
    options = RunOptions(use_lipn=lipn_applies(model, task.use_lipn), mpp=task.mpp,
                         batch_size=task.batch_size, max_failed_share=task.max_failed_share, roi=roi)
    result = run_slide(entry.path, model, options, encoder=encoder)
    result.save(folder)
    row = _row_from_report(row, folder / "report.json", "ok")
    if state == "stale":
        row["note"] = f"recomputed, replacing the results in {printable(folder)} ({why})"
    elif state == "done":
        row["note"] = "recomputed (--force)"
    return row


def _row_from_report(row: dict, report_path: Path, status: str) -> dict:
    report = json.loads(report_path.read_text(encoding="utf-8"))
    row.update(status=status, error="; ".join(str(e) for e in report.get("errors", []) or []))
    row["prediction"] = report.get("prediction")
    for name, p in zip(report.get("classes", []), report.get("probabilities", [])):
        row[f"p_{name}"] = p
    row["kept_ratio"] = report.get("kept_ratio")
    row["n_patches"] = report.get("n_patches")
    row["n_kept"] = report.get("n_kept")
    row["failed_share"] = report.get("failed_share")
    for stage in STAGES:
        row[f"seconds_{stage}"] = (report.get("timings") or {}).get(stage)
    return row


# --------------------------------------------------------------------------- the run


@dataclass
class BatchSummary:
    rows: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    cancelled: bool = False
    repeats: dict[str, int] = field(default_factory=dict)  # slides named more than once: times

    def _count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def n_ok(self) -> int:
        return self._count("ok")

    @property
    def n_skipped(self) -> int:
        return self._count("skipped")

    @property
    def n_failed(self) -> int:
        return self._count("failed")

    @property
    def n_missing(self) -> int:
        return self._count("missing")

    @property
    def n_busy(self) -> int:
        return self._count("busy")

    @property
    def n_not_done(self) -> int:
        """Slides this run could not give a result: failed, missing or busy in another run."""
        return self.n_failed + self.n_missing + self.n_busy

    def mean_seconds(self) -> dict[str, float]:
        done = [r for r in self.rows if r["status"] == "ok"]
        out = {}
        for stage in STAGES:
            vals = [r[f"seconds_{stage}"] for r in done if r.get(f"seconds_{stage}") is not None]
            out[stage] = sum(vals) / len(vals) if vals else float("nan")
        return out

    @property
    def slides_per_hour(self) -> float:
        return 3600.0 * self.n_ok / self.wall_seconds if self.wall_seconds > 0 and self.n_ok else 0.0

    def table(self) -> str:
        means = self.mean_seconds()
        counts = f"slides ok {self.n_ok}, skipped (already done) {self.n_skipped}, failed {self.n_failed}"
        counts += "".join(f", {what} {n}" for what, n in
                          (("missing", self.n_missing), ("busy in another run", self.n_busy)) if n)
        lines = [
            counts + (" — cancelled" if self.cancelled else ""),
            "mean seconds per slide: " + "  ".join(f"{s} {means[s]:.2f}" for s in STAGES),
            f"wall {self.wall_seconds:.1f} s, {self.slides_per_hour:.1f} slides/hour",
        ]
        lines += [f"  named {n} times, run once: {p}" for p, n in self.repeats.items()]
        for r in self.rows:
            if r["status"] in ("failed", "missing", "busy"):
                lines.append(f"  {r['status']}: {r['slide']}: {r['error']}")
            elif r.get("note"):
                lines.append(f"  {r['slide']}: {r['note']}")
        return "\n".join(lines)


def write_summary(out_dir: Path, rows: list[dict]) -> Path:
    from hdmil.files import atomic_write

    fixed = ["slide", "status", "prediction"]
    probs = sorted({k for r in rows for k in r if k.startswith("p_")})
    rest = (["kept_ratio", "n_patches", "n_kept", "failed_share"] + [f"seconds_{s}" for s in STAGES]
            + ["error", "note", "path"])
    columns = fixed + probs + rest
    path = Path(out_dir) / "summary.csv"
    with atomic_write(path, "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: r["slide"]):
            writer.writerow({k: printable(v) if isinstance(v, str) else v for k, v in r.items()})
    return path


def default_workers() -> int:
    """Worker processes for this machine: one per core, and at least ~3 GiB of memory each."""
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    return max(1, min(cores, int(mem_gib // 3)))


def start_client(scheduler: str | None = None, workers: int | None = None):
    """A Dask client: on an existing scheduler, or on a new LocalCluster of worker processes."""
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    n = workers or default_workers()
    # Threads inside a worker would fight over the same cores as torch: one thread per process.
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
    )
    return Client(cluster), cluster


def _crashed_row(item: Path, exc: BaseException) -> dict:
    msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return {"slide": safe_name(item), "path": printable(item), "status": "failed", "error": printable(msg)}


def run_tasks(
    items: list[Path],
    task: Callable[..., dict],
    task_args: tuple = (),
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 2,
    client=None,
    on_result: Callable[[dict], None] | None = None,
    item_kwargs: list[dict] | None = None,
) -> tuple[list[dict], bool]:
    """``task(str(item), *task_args, **item_kwargs[i]) -> row`` for every item, one Dask task each,
    rows as they finish.

    A task that raises after its retries (a bug, a worker lost too often) becomes a ``failed`` row;
    Ctrl-C cancels what is left. Returns (rows, cancelled).
    """
    from distributed import as_completed

    rows: list[dict] = []
    if not items:
        return rows, False
    own_client = cluster = None
    futures = []
    kwargs = item_kwargs or [{} for _ in items]
    try:
        if client is None:
            own_client, cluster = start_client(scheduler, min(workers or default_workers(), len(items)))
            client = own_client
        futures = [
            client.submit(task, str(s), *task_args, **kw, key=f"hdmil-{task.__name__}-{i}-{safe_name(s)}",
                          retries=retries, pure=False)
            for i, (s, kw) in enumerate(zip(items, kwargs))
        ]
        index = {f.key: s for f, s in zip(futures, items)}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as exc:
                row = _crashed_row(index[fut.key], exc)
            rows.append(row)
            if on_result:
                on_result(row)
    except KeyboardInterrupt:
        for f in futures:
            f.cancel()
        return rows, True
    finally:
        if own_client is not None:
            own_client.close()
        if cluster is not None:
            cluster.close()
    return rows, False


def _make_out(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(
            f"{printable(out_dir)}: cannot create the output folder ({exc.strerror or exc})") from exc


def _precheck(entry: SlideEntry, task: SlideTask, key_for: Callable[[Path], dict]) -> dict | None:
    """The row of a slide that needs no task (missing file, results of the same settings there);
    None when it must run."""
    row: dict[str, Any] = {"slide": entry.name, "path": entry.shown}
    if not os.path.exists(entry.path):
        row.update(status="missing", error=f"{entry.shown}: no such file")
        return row
    if task.force:
        return None
    folder = Path(task.out_dir) / entry.name
    try:
        key = key_for(entry.path)
    except HDMILError as exc:  # its --roi-dir file is missing or unreadable: no task
        row.update(status="failed", error=printable(exc))
        return row
    if result_state(folder, key)[0] == "done":
        return _row_from_report(row, folder / "report.json", "skipped")
    return None


def run_batch(
    slides: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    model_path: str | os.PathLike | None = None,
    use_lipn: bool = True,
    mpp: float | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 2,
    client=None,
    on_result: Callable[[dict, int, int], None] | None = None,
    max_failed_share: float = 0.5,
    force: bool = False,
    roi_dir: str | os.PathLike | None = None,
) -> BatchSummary:
    """Process every slide as one Dask task and write ``summary.csv``.

    A slide named twice runs once (``BatchSummary.repeats``); a missing file is ``missing``.
    Slides whose complete results were made with the same settings (model hash, LIPN and its
    thresholds, encoder, mpp: ``run_key``) are skipped without submitting work; results made
    with other settings are recomputed into the same folder, replacing them; ``force``
    recomputes every slide. ``on_result(row, done, total)`` is called as each slide finishes
    (the CLI draws its progress bar with it). ``roi_dir``: one annotation file per slide, by
    stem (``slide_roi``), restricts each slide's run to it; a slide without one fails.
    """
    from hdmil.checkpoint import load_model

    out_dir = Path(out_dir)
    _make_out(out_dir)
    t0 = time.perf_counter()
    entries, repeats = plan_slides(slides, out_dir)
    summary = BatchSummary(repeats=repeats)
    roi_dir = os.fspath(roi_dir) if roi_dir is not None else None
    task = SlideTask(str(out_dir), str(model_path) if model_path else None, use_lipn, mpp,
                     max_failed_share=max_failed_share, force=force, roi_dir=roi_dir)
    model = load_model(_model_file(model_path))  # for the settings key; workers load their own
    pre = [(e, _precheck(e, task, lambda p: expected_key(model, use_lipn, mpp, p, slide_roi(roi_dir, p))))
           for e in entries]
    todo = [e for e, row in pre if row is None]
    total = len(entries)

    def record(row: dict) -> None:
        if row not in summary.rows:
            summary.rows.append(row)
        if on_result:
            on_result(row, len(summary.rows), total)

    for _, row in pre:
        if row is not None:
            record(row)
    try:
        _, summary.cancelled = run_tasks(
            [e.path for e in todo], process_slide,
            (task.out_dir, task.model_path, use_lipn, mpp, task.batch_size),
            scheduler=scheduler, workers=workers, retries=retries, client=client, on_result=record,
            item_kwargs=[{"name": e.name, "max_failed_share": max_failed_share, "force": force,
                          "roi_dir": roi_dir} for e in todo],
        )
        if not summary.cancelled:  # every task has ended: no writer of this run is left
            _remove_partial_writes(out_dir, entries)
    finally:
        summary.wall_seconds = time.perf_counter() - t0
        write_summary(out_dir, summary.rows)
    return summary


def _remove_partial_writes(out_dir: Path, entries: list[SlideEntry]) -> None:
    """Delete the temporary files (``.<name>.<pid>.<hex>.tmp``) that a worker killed mid-write left
    in a slide's results folder; the task's retry wrote the complete files beside them. Only
    under the slide's lock (another batch into this folder may be writing it) and only those of
    dead processes."""
    for e in entries:
        with contextlib.suppress(SlideBusyError, WriteError):
            with slide_lock(out_dir, e.name, e.shown):
                remove_dead_temps(Path(out_dir) / e.name)


# --------------------------------------------------------------------------- features over many slides


_ENCODER_CACHE: dict[tuple, Any] = {}


def extract_slide_task(
    slide_path: str,
    out_dir: str,
    encoder_spec: dict,
    mpp: float | None = None,
    batch_size: int = 64,
    overwrite: bool = False,
) -> dict:
    """``hdmil features`` for one slide on a Dask worker: writes ``<out>/<slide>.h5`` atomically.

    ``encoder_spec`` holds ``create_encoder``'s arguments (name, pretrained, weights, device, arch);
    the encoder is built once per worker process. Returns a row with status written / skipped /
    empty / failed.
    """
    from hdmil.features import create_encoder, extract_slide_features, write_features
    from hdmil.grid import build_grid
    from hdmil.slide import open_slide

    row: dict[str, Any] = {"slide": safe_name(slide_path), "path": printable(slide_path), "error": ""}
    key = tuple(sorted((k, str(v)) for k, v in encoder_spec.items()))
    try:
        if key not in _ENCODER_CACHE:
            _ENCODER_CACHE.clear()
            _ENCODER_CACHE[key] = create_encoder(**encoder_spec)
        encoder = _ENCODER_CACHE[key]
        with open_slide(slide_path, mpp=mpp) as slide:
            out = Path(out_dir) / f"{slide.name}.h5"
            if out.exists() and not overwrite and _h5_encoder(out) == encoder.name:
                row.update(status="skipped", n_patches=None)
                return row
            grid = build_grid(slide, mpp=mpp)
            if len(grid.coords) == 0:
                row.update(status="empty", error=str(grid.message or "no tissue found"), n_patches=0)
                return row
            bag = extract_slide_features(slide, grid, encoder, batch_size=batch_size)
            write_features(out, bag)
            row.update(status="written", n_patches=len(bag))
    except HDMILError as exc:
        row.update(status="failed", error=printable(exc))
    return row


def _h5_encoder(path: Path) -> str | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            found = f.attrs.get("encoder")
            if "features" not in f:
                return None
            return found.decode() if isinstance(found, bytes) else found
    except OSError:
        return None
