"""Cohort-scale runs on Dask distributed: one task per slide, resumable, fault-tolerant.

Without a scheduler address a ``distributed.LocalCluster`` of worker processes is started, sized to
the machine; with one, the run joins an existing cluster (for example one started by dask-jobqueue
on SLURM). Each task writes its slide's results atomically, so a killed worker or a Ctrl-C leaves
only complete results, and a re-run skips the slides that are done.
"""

from __future__ import annotations

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
from hdmil.pipeline.result import STAGES  # the stage seconds of every report

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".vms", ".vmu", ".bif", ".svslide")


# --------------------------------------------------------------------------- inputs


def list_slides(source: str | os.PathLike) -> list[Path]:
    """Slides named by ``source``: a folder (its slide files, sorted) or a CSV of paths.

    A CSV uses its ``path`` (or ``slide``) column, else its first column; relative paths are taken
    relative to the CSV's folder.
    """
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    if not source.exists():
        raise HDMILError(f"{source}: no such folder or CSV file")
    if source.suffix.lower() != ".csv":
        raise HDMILError(f"{source}: give a folder of slides or a CSV with a 'path' column")
    with open(source, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise HDMILError(f"{source}: the CSV is empty")
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
    return Path(out_dir) / Path(slide_path).stem


def is_complete(out_dir: Path, slide_path: Path) -> bool:
    """A slide is done when its report exists (written last, atomically) next to its patches."""
    d = slide_out_dir(out_dir, slide_path)
    return (d / "report.json").is_file() and (d / "patches.h5").is_file()


# --------------------------------------------------------------------------- the task


_MODEL_CACHE: dict[tuple[str, float], Any] = {}


def _load_model_cached(model_path: str | None):
    """One model and encoder load per worker process (tasks on a worker share them)."""
    from hdmil.checkpoint import default_model_path, load_model
    from hdmil.pipeline import encoder_for

    path = str(model_path or default_model_path())
    key = (path, os.path.getmtime(path) if os.path.exists(path) else 0.0)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        model = load_model(path)
        _MODEL_CACHE[key] = (model, encoder_for(model, None))
    return _MODEL_CACHE[key]


def process_slide(
    slide_path: str,
    out_dir: str,
    model_path: str | None = None,
    use_lipn: bool = True,
    mpp: float | None = None,
    batch_size: int = 64,
) -> dict:
    """Run one slide and write its results; return its summary row.

    Input problems (corrupt file, no tissue, no mpp, a model that does not fit) are recorded in the
    row as ``failed``; other exceptions propagate so that Dask can retry the task.
    """
    from hdmil.pipeline import lipn_applies, run_slide

    slide_path = Path(slide_path)
    row: dict[str, Any] = {"slide": slide_path.stem, "path": str(slide_path)}
    if is_complete(Path(out_dir), slide_path):
        return _row_from_report(row, slide_out_dir(Path(out_dir), slide_path) / "report.json", "skipped")
    try:
        model, encoder = _load_model_cached(model_path)
        use_lipn = lipn_applies(model, use_lipn)
        result = run_slide(
            slide_path, model, use_lipn=use_lipn, mpp=mpp, encoder=encoder, batch_size=batch_size
        )
        result.save(slide_out_dir(Path(out_dir), slide_path))
    except HDMILError as exc:
        row.update(status="failed", error=str(exc))
        return row
    return _row_from_report(row, slide_out_dir(Path(out_dir), slide_path) / "report.json", "ok")


def _row_from_report(row: dict, report_path: Path, status: str) -> dict:
    report = json.loads(report_path.read_text())
    row.update(status=status, error="; ".join(str(e) for e in report.get("errors", []) or []))
    row["prediction"] = report.get("prediction")
    for name, p in zip(report.get("classes", []), report.get("probabilities", [])):
        row[f"p_{name}"] = p
    row["kept_ratio"] = report.get("kept_ratio")
    row["n_patches"] = report.get("n_patches")
    row["n_kept"] = report.get("n_kept")
    for stage in STAGES:
        row[f"seconds_{stage}"] = (report.get("timings") or {}).get(stage)
    return row


# --------------------------------------------------------------------------- the run


@dataclass
class BatchSummary:
    rows: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    cancelled: bool = False

    @property
    def n_ok(self) -> int:
        return sum(r["status"] == "ok" for r in self.rows)

    @property
    def n_skipped(self) -> int:
        return sum(r["status"] == "skipped" for r in self.rows)

    @property
    def n_failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.rows)

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
        lines = [
            f"slides ok {self.n_ok}, skipped (already done) {self.n_skipped}, failed {self.n_failed}"
            + (" — cancelled" if self.cancelled else ""),
            "mean seconds per slide: " + "  ".join(f"{s} {means[s]:.2f}" for s in STAGES),
            f"wall {self.wall_seconds:.1f} s, {self.slides_per_hour:.1f} slides/hour",
        ]
        for r in self.rows:
            if r["status"] == "failed":
                lines.append(f"  failed: {r['slide']}: {r['error']}")
        return "\n".join(lines)


def write_summary(out_dir: Path, rows: list[dict]) -> Path:
    from hdmil.files import atomic_write

    fixed = ["slide", "status", "prediction"]
    probs = sorted({k for r in rows for k in r if k.startswith("p_")})
    rest = ["kept_ratio", "n_patches", "n_kept"] + [f"seconds_{s}" for s in STAGES] + ["error", "path"]
    columns = fixed + probs + rest
    path = Path(out_dir) / "summary.csv"
    with atomic_write(path, "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: r["slide"]):
            writer.writerow(r)
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


def run_tasks(
    items: list[Path],
    task: Callable[..., dict],
    task_args: tuple = (),
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 2,
    client=None,
    on_result: Callable[[dict], None] | None = None,
) -> tuple[list[dict], bool]:
    """``task(str(item), *task_args) -> row`` for every item, one Dask task each, rows as they finish.

    A task that raises after its retries (a bug, a worker lost too often) becomes a ``failed`` row;
    Ctrl-C cancels what is left. Returns (rows, cancelled).
    """
    from distributed import as_completed

    rows: list[dict] = []
    if not items:
        return rows, False
    own_client = cluster = None
    futures = []
    try:
        if client is None:
            own_client, cluster = start_client(scheduler, min(workers or default_workers(), len(items)))
            client = own_client
        futures = [
            client.submit(task, str(s), *task_args, key=f"hdmil-{task.__name__}-{i}-{s.stem}",
                          retries=retries, pure=False)
            for i, s in enumerate(items)
        ]
        index = {f.key: s for f, s in zip(futures, items)}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as exc:
                s = index[fut.key]
                msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                row = {"slide": s.stem, "path": str(s), "status": "failed", "error": msg}
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
) -> BatchSummary:
    """Process every slide as one Dask task and write ``summary.csv``.

    Slides whose complete results exist are skipped without submitting work. ``on_result(row, done,
    total)`` is called as each slide finishes (the CLI draws its progress bar with it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides = [Path(s) for s in slides]
    t0 = time.perf_counter()
    summary = BatchSummary()
    todo = []
    for s in slides:
        if is_complete(out_dir, s):
            summary.rows.append(
                _row_from_report({"slide": s.stem, "path": str(s)}, slide_out_dir(out_dir, s) / "report.json", "skipped")
            )
        else:
            todo.append(s)
    total = len(slides)

    def record(row: dict) -> None:
        if row not in summary.rows:
            summary.rows.append(row)
        if on_result:
            on_result(row, len(summary.rows), total)

    for row in list(summary.rows):
        record(row)
    try:
        _, summary.cancelled = run_tasks(
            todo, process_slide, (str(out_dir), str(model_path) if model_path else None, use_lipn, mpp),
            scheduler=scheduler, workers=workers, retries=retries, client=client, on_result=record,
        )
        if not summary.cancelled:  # every task has ended: no writer is left to race
            _remove_partial_writes(out_dir, slides)
    finally:
        summary.wall_seconds = time.perf_counter() - t0
        write_summary(out_dir, summary.rows)
    return summary


def _remove_partial_writes(out_dir: Path, slides: list[Path]) -> None:
    """Delete the temporary files (``.<name>.*.tmp``) that a worker killed mid-write left in a
    slide's results folder; the task's retry wrote the complete files beside them."""
    for s in slides:
        d = slide_out_dir(out_dir, s)
        if d.is_dir():
            for tmp in d.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


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

    row: dict[str, Any] = {"slide": Path(slide_path).stem, "path": slide_path, "error": ""}
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
        row.update(status="failed", error=str(exc))
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
