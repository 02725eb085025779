"""Reviewing a batch's results: one row per slide, a reviewer's verdict and note per slide.

A batch folder (``hdmil batch --out OUT`` or ``hdmil predict --out OUT``) holds ``OUT/<slide>/``
results and, after a batch, ``OUT/summary.csv``. ``batch_rows(OUT)`` lists every slide (the
summary's rows, and any result folder it does not name) with its verdict; verdicts live in
``OUT/review.csv``, rewritten whole and atomically on every change (``save_verdict``), so a crash
never leaves half a file. The napari review panel and ``hdmil review-summary`` both call this.

>>> rows = batch_rows(out)
>>> save_verdict(out, rows[0].slide, "agree", "clear tumour at the margin")
>>> print(review_summary(out).table())
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdmil.errors import HDMILError
from hdmil.pipeline.folders import printable

__all__ = [
    "REVIEW_FILE", "VERDICTS", "ReviewSummary", "SlideRow", "Verdict", "batch_rows", "filter_rows",
    "load_verdicts", "review_summary", "save_verdict",
]

REVIEW_FILE = "review.csv"
VERDICTS = ("agree", "disagree", "unsure")
_COLUMNS = ("slide", "verdict", "note", "prediction", "reviewed_at")


@dataclass
class Verdict:
    """A reviewer's verdict on one slide's prediction (``VERDICTS``) and a free note."""

    slide: str
    verdict: str
    note: str = ""
    prediction: str = ""  # what the reviewer saw: a later rerun may predict otherwise
    reviewed_at: str = ""  # UTC, ISO 8601


@dataclass
class SlideRow:
    """One slide of a batch folder: what the run said, and the review so far."""

    slide: str  # the results folder's name (the summary's ``slide``)
    folder: Path
    status: str = "ok"
    prediction: str = ""
    probability: float | None = None  # of the predicted class
    kept_ratio: float | None = None
    error: str = ""
    verdict: Verdict | None = None

    @property
    def reviewed(self) -> bool:
        return self.verdict is not None

    @property
    def has_result(self) -> bool:
        return (self.folder / "report.json").is_file()

    def cells(self) -> list[Any]:
        """The review table's cells: slide, prediction, probability, kept ratio, status, error,
        verdict ("" when not reviewed), note."""
        v = self.verdict
        return [self.slide, self.prediction, self.probability, self.kept_ratio, self.status, self.error,
                v.verdict if v else "", v.note if v else ""]


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _from_summary(out: Path) -> list[SlideRow]:
    path = out / "summary.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    found = []
    for r in rows:
        pred = r.get("prediction") or ""
        found.append(SlideRow(slide=r["slide"], folder=out / r["slide"], status=r.get("status") or "",
                              prediction=pred, probability=_float(r.get(f"p_{pred}")),
                              kept_ratio=_float(r.get("kept_ratio")), error=r.get("error") or ""))
    return found


def _from_report(folder: Path) -> SlideRow:
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        probs = dict(zip(report["classes"], report["probabilities"]))
        pred = str(report["prediction"])
        return SlideRow(slide=folder.name, folder=folder, prediction=pred, probability=_float(probs.get(pred)),
                        kept_ratio=_float(report.get("kept_ratio")), error="; ".join(report.get("errors") or []))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return SlideRow(slide=folder.name, folder=folder, status="failed", error=f"report.json unreadable: {exc}")


def batch_rows(out: str | os.PathLike) -> list[SlideRow]:
    """Every slide of the batch folder ``out``, sorted by name, with its verdict (if any).

    The rows of ``summary.csv`` first (failed slides too); a result folder the summary does not
    name (``hdmil predict --out``, a batch still running) is read from its ``report.json``.
    HDMILError when ``out`` is not a folder or holds no result and no summary.
    """
    out = Path(out).expanduser()
    if not out.is_dir():
        raise HDMILError(f"{printable(out)}: not a folder (give the --out folder of hdmil batch or predict)")
    rows = {r.slide: r for r in _from_summary(out)}
    for folder in sorted(p.parent for p in out.glob("*/report.json")):
        rows.setdefault(folder.name, _from_report(folder))
    if not rows:
        raise HDMILError(f"{printable(out)}: no summary.csv and no <slide>/report.json: not a batch folder")
    verdicts = load_verdicts(out)
    for r in rows.values():
        r.verdict = verdicts.get(r.slide)
    return [rows[k] for k in sorted(rows)]


def load_verdicts(out: str | os.PathLike) -> dict[str, Verdict]:
    """slide -> Verdict from ``out/review.csv`` ({} when there is none yet). HDMILError naming the
    file when it is not a review file."""
    path = Path(out) / REVIEW_FILE
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise HDMILError(f"{printable(path)}: cannot be read ({exc})") from exc
    if rows and not {"slide", "verdict"} <= set(rows[0]):
        raise HDMILError(f"{printable(path)}: not a review file (no slide and verdict columns)")
    return {r["slide"]: Verdict(**{k: r.get(k) or "" for k in _COLUMNS}) for r in rows
            if r.get("verdict") in VERDICTS}  # fmt: skip


def save_verdict(out: str | os.PathLike, slide: str, verdict: str | None, note: str = "",
                 prediction: str = "") -> dict[str, Verdict]:
    """Record (``verdict`` None: remove) the verdict on ``slide`` and rewrite ``out/review.csv``
    atomically; returns every verdict. ValueError for a verdict not in ``VERDICTS``."""
    from hdmil.files import atomic_write

    if verdict is not None and verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, not {verdict!r}")
    verdicts = load_verdicts(out)
    if verdict is None:
        verdicts.pop(slide, None)
    else:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        verdicts[slide] = Verdict(slide, verdict, " ".join(note.split()), prediction, stamp)
    with atomic_write(Path(out) / REVIEW_FILE, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for v in sorted(verdicts.values(), key=lambda v: v.slide):
            writer.writerow({k: printable(getattr(v, k)) for k in _COLUMNS})
    return verdicts


def filter_rows(rows: list[SlideRow], text: str = "", show: str = "all") -> list[SlideRow]:
    """The rows whose slide, prediction, status, error or note contain ``text`` (any case), and
    ``show``: "all", "not reviewed", "reviewed", "failed" or a verdict."""
    text = text.casefold().strip()

    def keep(r: SlideRow) -> bool:
        if text and not any(text in str(c).casefold() for c in r.cells() if c is not None):
            return False
        return {"all": True, "not reviewed": not r.reviewed, "reviewed": r.reviewed,
                "failed": r.status in ("failed", "missing", "busy")}.get(  # fmt: skip
            show, r.verdict is not None and r.verdict.verdict == show)

    return [r for r in rows if keep(r)]


@dataclass
class ReviewSummary:
    """Counts of a batch's review: per verdict, not yet reviewed, per predicted class."""

    n_slides: int
    counts: dict[str, int]
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def n_reviewed(self) -> int:
        return sum(self.counts[v] for v in VERDICTS)

    @property
    def agreement(self) -> float | None:
        """agree / (agree + disagree); None before any of them (unsure is not counted)."""
        decided = self.counts["agree"] + self.counts["disagree"]
        return self.counts["agree"] / decided if decided else None

    def table(self) -> str:
        agree = "n/a" if self.agreement is None else f"{self.agreement:.1%}"
        lines = [f"slides {self.n_slides}, reviewed {self.n_reviewed}, not reviewed {self.n_slides - self.n_reviewed}",
                 "  ".join(f"{v} {self.counts[v]}" for v in VERDICTS) + f"  agreement {agree} (agree / (agree + disagree))"]
        for cls, c in sorted(self.per_class.items()):
            lines.append(f"  predicted {cls}: " + "  ".join(f"{v} {c.get(v, 0)}" for v in VERDICTS))
        return "\n".join(lines)


def review_summary(out: str | os.PathLike) -> ReviewSummary:
    """The agreement counts of ``out``'s review (``review.csv`` against ``batch_rows``)."""
    rows = batch_rows(out)
    counts = dict.fromkeys(VERDICTS, 0)
    per_class: dict[str, dict[str, int]] = {}
    for r in rows:
        if r.verdict is None:
            continue
        counts[r.verdict.verdict] += 1
        cls = per_class.setdefault(r.prediction or "(none)", dict.fromkeys(VERDICTS, 0))
        cls[r.verdict.verdict] += 1
    return ReviewSummary(len(rows), counts, per_class)
