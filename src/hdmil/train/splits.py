"""Train / validation / test splits by case, k-fold and stratified, as CLAM's split CSVs.

A fold's test set is one of k case folds, its validation set the next one, and training gets the
rest, so every case is tested exactly once over the k folds and never sits in two sets of a fold
(slides of one patient stay together). Cases are dealt to folds class by class, which keeps the
label mix of every fold close to the cohort's.

On disk a split is ``splits_{i}.csv`` with an unnamed index column and the columns
``train,val,test`` holding slide ids, ragged (empty cells where a column is shorter), the layout
CLAM's ``create_splits_seq.py`` writes and its training reads.
"""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hdmil.errors import HDMILError
from hdmil.files import atomic_write

if TYPE_CHECKING:
    from hdmil.train.data import Cohort

__all__ = [
    "Split",
    "SplitError",
    "make_splits",
    "read_split_csv",
    "read_splits",
    "write_splits",
]

SETS = ("train", "val", "test")
_SPLIT_NAME = re.compile(r"^splits_(\d+)\.csv$")


class SplitError(HDMILError):
    """A split file or split request that cannot be used."""


@dataclass(frozen=True)
class Split:
    """Slide ids of one fold's training, validation and test sets."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    fold: int = 0

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if name not in SETS:
            raise KeyError(name)
        return getattr(self, name)

    @property
    def all_ids(self) -> tuple[str, ...]:
        return self.train + self.val + self.test

    def restrict(self, keep: Iterable[str]) -> Split:
        """The same split with only the slide ids in ``keep`` (e.g. slides that have features)."""
        keep = set(keep)
        return Split(
            *(tuple(s for s in self[name] if s in keep) for name in SETS), fold=self.fold
        )

    def check_disjoint(self, source: str = "split") -> None:
        seen: dict[str, str] = {}
        for name in SETS:
            for sid in self[name]:
                if sid in seen:
                    raise SplitError(f"{source}: slide {sid!r} is in both {seen[sid]} and {name}")
                seen[sid] = name


def _case_labels(cohort: Cohort) -> dict[str, int]:
    """Each case's label: the most frequent label of its slides (ties: the lowest index)."""
    per_case: dict[str, Counter] = defaultdict(Counter)
    for case, label in zip(cohort.case_ids, cohort.labels):
        per_case[case][int(label)] += 1
    return {case: min(c, key=lambda lab: (-c[lab], lab)) for case, c in per_case.items()}


def make_splits(cohort: Cohort, k: int = 10, seed: int = 0) -> list[Split]:
    """``k`` folds by case, stratified by label: fold i tests case fold i, validates on fold i+1.

    The same cohort and seed give the same splits. Needs ``k >= 3`` (train, val and test each get
    at least one case fold) and at least ``k`` cases.
    """
    if k < 3:
        raise SplitError(f"--folds must be at least 3 (train, val and test need a fold each), got {k}")
    case_label = _case_labels(cohort)
    if len(case_label) < k:
        raise SplitError(
            f"{k} folds need at least {k} cases, the cohort has {len(case_label)}: use fewer folds"
        )
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0  # continue the deal across classes so that fold sizes stay within one case
    for label in sorted(set(case_label.values())):
        cases = sorted(c for c, lab in case_label.items() if lab == label)
        order = rng.permutation(len(cases))
        for j, idx in enumerate(order):
            fold_of[cases[idx]] = (offset + j) % k
        offset = (offset + len(cases)) % k

    slides_of_fold: list[list[str]] = [[] for _ in range(k)]
    for sid, case in zip(cohort.slide_ids, cohort.case_ids):
        slides_of_fold[fold_of[case]].append(sid)

    splits = []
    for i in range(k):
        val_fold = (i + 1) % k
        train = [s for f in range(k) if f not in (i, val_fold) for s in slides_of_fold[f]]
        splits.append(
            Split(tuple(train), tuple(slides_of_fold[val_fold]), tuple(slides_of_fold[i]), fold=i)
        )
    return splits


def write_splits(splits: Sequence[Split], out_dir: str | Path) -> list[Path]:
    """Write ``splits_{fold}.csv`` files (CLAM layout) into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in splits:
        path = out_dir / f"splits_{split.fold}.csv"
        n = max(len(split.train), len(split.val), len(split.test))
        with atomic_write(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["", *SETS])
            for row in range(n):
                writer.writerow(
                    [row, *(split[name][row] if row < len(split[name]) else "" for name in SETS)]
                )
        paths.append(path)
    return paths


def read_split_csv(path: str | Path, fold: int | None = None) -> Split:
    """Read one CLAM split CSV (with or without its index column)."""
    path = Path(path)
    if fold is None:
        m = _SPLIT_NAME.match(path.name)
        fold = int(m.group(1)) if m else 0
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise SplitError(f"{path}: cannot read split file ({exc.strerror or exc})") from exc
    if not rows:
        raise SplitError(f"{path}: empty split file")
    header = [h.strip() for h in rows[0]]
    missing = [name for name in SETS if name not in header]
    if missing:
        raise SplitError(
            f"{path}: split file needs the columns train, val, test; missing {', '.join(missing)}"
        )
    cols = {name: header.index(name) for name in SETS}
    sets: dict[str, list[str]] = {name: [] for name in SETS}
    for row in rows[1:]:
        for name, col in cols.items():
            value = row[col].strip() if col < len(row) else ""
            if value and value.lower() != "nan":  # pandas writes NaN for ragged cells
                sets[name].append(value)
    split = Split(*(tuple(sets[name]) for name in SETS), fold=fold)
    split.check_disjoint(str(path))
    return split


def read_splits(path: str | Path) -> list[Split]:
    """All ``splits_{i}.csv`` of a directory (CLAM's ``_bool`` / ``_descriptor`` files are
    ignored), sorted by fold; or the one file ``path`` names."""
    path = Path(path)
    if path.is_file():
        return [read_split_csv(path)]
    if not path.is_dir():
        raise SplitError(f"{path}: no such split file or directory")
    found = sorted(
        (int(m.group(1)), p) for p in path.iterdir() if (m := _SPLIT_NAME.match(p.name))
    )
    if not found:
        raise SplitError(f"{path}: no splits_<i>.csv files in this directory")
    return [read_split_csv(p, fold=i) for i, p in found]
