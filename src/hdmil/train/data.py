"""Labelled slides and their feature bags, as training and evaluation read them.

``read_labels`` turns a labels CSV (``slide_id,label[,case_id]``, CLAM's layout) into a
:class:`Cohort`; ``load_cohort`` also attaches a :class:`BagDataset` over a features directory
(``hdmil features`` h5 files, CLAM / TRIDENT h5 or CLAM pt files). Bags are read lazily, one slide
at a time, and kept in a byte-bounded in-memory cache so that an epoch after the first reads nothing
from disk when the cohort fits.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hdmil.errors import FeatureFileError, HDMILError

__all__ = [
    "Bag",
    "BagDataset",
    "Cohort",
    "LabelsError",
    "MissingFeaturesError",
    "load_cohort",
    "read_labels",
]

Instances = Literal["patch", "region"]
INSTANCES = ("patch", "region")


class LabelsError(HDMILError):
    """A labels CSV that cannot be used."""


class MissingFeaturesError(HDMILError):
    """Labelled slides without a feature file."""


@dataclass(frozen=True, eq=False)
class Cohort:
    """Labelled slides: ids, class indices, class names, case (patient) ids, and their bags.

    ``labels[i]`` indexes ``classes``; ``case_ids[i]`` is the slide's own id when the CSV has no
    case column. ``bags`` is ``None`` for a cohort read from labels only.
    """

    slide_ids: tuple[str, ...]
    labels: np.ndarray  # int64 [S]
    classes: tuple[str, ...]
    case_ids: tuple[str, ...]
    bags: BagDataset | None = None
    source: Path | None = None
    skipped: tuple[str, ...] = ()  # labelled slides left out for want of features

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def label_of(self, slide_id: str) -> int:
        return int(self.labels[self._index[slide_id]])

    def labels_of(self, slide_ids: Sequence[str]) -> np.ndarray:
        return np.array([self.label_of(s) for s in slide_ids], dtype=np.int64)

    def subset(self, slide_ids: Iterable[str]) -> Cohort:
        """The cohort restricted to ``slide_ids`` (same classes, same bags)."""
        idx = [self._index[s] for s in slide_ids]
        return replace(
            self,
            slide_ids=tuple(self.slide_ids[i] for i in idx),
            labels=self.labels[idx],
            case_ids=tuple(self.case_ids[i] for i in idx),
        )

    def require_bags(self) -> BagDataset:
        if self.bags is None:
            raise HDMILError("this cohort has no features: load it with load_cohort(labels, dir)")
        return self.bags

    @property
    def _index(self) -> dict[str, int]:
        # frozen dataclass: build the lookup once and stash it past __setattr__
        index = self.__dict__.get("_index_cache")
        if index is None:
            index = {s: i for i, s in enumerate(self.slide_ids)}
            object.__setattr__(self, "_index_cache", index)
        return index


def _class_order(labels: Sequence[str]) -> tuple[str, ...]:
    unique = set(labels)
    try:  # "0", "1", "10" sort as numbers
        return tuple(sorted(unique, key=lambda v: (float(v), v)))
    except ValueError:
        return tuple(sorted(unique))


def _read_csv_rows(path: Path) -> list[list[str]]:
    """The CSV's rows, read as UTF-8 and else as Latin-1 (spreadsheets on Windows save that),
    with a warning saying so: every byte decodes in Latin-1, so a wrong guess shows as odd letters
    in the warning's file, never as a crash."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LabelsError(f"{path}: cannot read labels file ({exc.strerror or exc})") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = data.decode("latin-1")
        warnings.warn(
            f"{path}: not UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start}); read as Latin-1",
            stacklevel=3,
        )
    return list(csv.reader(io.StringIO(text, newline="")))


def _refuse_case_variants(path: Path, labels: Sequence[str]) -> None:
    """Labels spelled two ways ("Normal", "normal") would silently become two classes: refuse."""
    spellings: dict[str, str] = {}
    for label in labels:
        first = spellings.setdefault(label.casefold(), label)
        if first != label:
            raise LabelsError(
                f"{path}: labels {first!r} and {label!r} differ only in case; spell each class one way"
            )


def read_labels(path: str | Path, classes: Sequence[str] | None = None) -> Cohort:
    """Read ``slide_id,label[,case_id]`` (header names case-insensitive, extra columns ignored).

    Class indices follow ``classes`` when given (a label outside it is an error), otherwise the
    sorted distinct labels (numerically when they are numbers).
    """
    path = Path(path)
    rows = [r for r in _read_csv_rows(path) if any(c.strip() for c in r)]
    if not rows:
        raise LabelsError(f"{path}: empty labels file")
    header = [h.strip().lower() for h in rows[0]]
    for need in ("slide_id", "label"):
        if need not in header:
            raise LabelsError(
                f"{path}: labels file needs a header with slide_id and label columns "
                f"(and optionally case_id); found {', '.join(rows[0]) or 'nothing'}"
            )
    i_slide, i_label = header.index("slide_id"), header.index("label")
    i_case = header.index("case_id") if "case_id" in header else None

    slide_ids: list[str] = []
    str_labels: list[str] = []
    case_ids: list[str] = []
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        cell = lambda i: row[i].strip() if i is not None and i < len(row) else ""  # noqa: E731
        sid, label = cell(i_slide), cell(i_label)
        if not sid or not label:
            raise LabelsError(f"{path}, line {line}: empty slide_id or label")
        if sid in seen:
            raise LabelsError(f"{path}, line {line}: slide {sid!r} is listed twice")
        seen.add(sid)
        slide_ids.append(sid)
        str_labels.append(label)
        case_ids.append(cell(i_case) or sid)
    if not slide_ids:
        raise LabelsError(f"{path}: no slides listed")

    _refuse_case_variants(path, str_labels)
    if classes is None:
        classes = _class_order(str_labels)
    classes = tuple(str(c) for c in classes)
    unknown = sorted(set(str_labels) - set(classes))
    if unknown:
        raise LabelsError(
            f"{path}: labels {', '.join(unknown)} are not among the classes {', '.join(classes)}"
        )
    if len(classes) < 2:
        raise LabelsError(f"{path}: needs at least two classes, found only {classes[0]!r}")
    lookup = {c: i for i, c in enumerate(classes)}
    return Cohort(
        slide_ids=tuple(slide_ids),
        labels=np.array([lookup[v] for v in str_labels], dtype=np.int64),
        classes=classes,
        case_ids=tuple(case_ids),
        source=path,
    )


@dataclass
class Bag:
    """One slide's instances: features [N, D] float32 and what came with them."""

    slide_id: str
    features: torch.Tensor  # float32 [N, D]
    coords: np.ndarray | None  # int64 [N, 2] level-0 (x, y)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


def _feature_files(features_dir: Path) -> dict[str, Path]:
    from hdmil.features.io import find_feature_files

    found = find_feature_files(features_dir)
    if isinstance(found, Mapping):
        return {str(k): Path(v) for k, v in found.items()}
    return {Path(p).stem: Path(p) for p in found}


class BagDataset:
    """Feature bags by slide id, read lazily from feature files and cached in memory.

    ``instances="patch"`` reads each file's ``features``; ``"region"`` its ``region_embeddings``
    (written by ``hdmil pretrain-slpd``). LR patches (LIPN's input) come from ``lr_patches``.
    The cache holds at most ``cache_bytes`` (LRU); 0 turns it off.
    """

    def __init__(
        self,
        files: Mapping[str, str | Path],
        instances: Instances = "patch",
        cache_bytes: int = 4 << 30,
    ) -> None:
        if instances not in INSTANCES:
            raise HDMILError(f"instances must be 'patch' or 'region', got {instances!r}")
        self.files = {str(k): Path(v) for k, v in files.items()}
        self.instances = instances
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._cached_bytes = 0
        self._width: tuple[int, Path] | None = None  # the first bag's width and file

    def _check_width(self, path: Path, dim: int) -> None:
        """Every bag as wide as the first one read: a folder mixing encoders is refused."""
        if self._width is None:
            self._width = (int(dim), path)
        elif self._width[0] != dim:
            width, first = self._width
            raise FeatureFileError(
                f"{path}: {dim}-d features, but {first} holds {width}-d ones; a feature folder "
                "must hold one encoder's features"
            )

    def check_widths(self) -> None:
        """Refuse a folder mixing feature widths before any training: reads only the h5 shapes
        (``.pt`` files and unreadable ones are checked when their bag is read)."""
        dataset = "region_embeddings" if self.instances == "region" else "features"
        for path in self.files.values():
            dim = _h5_width(path, dataset)
            if dim is not None:
                self._check_width(path, dim)

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self.files

    def path(self, slide_id: str) -> Path:
        try:
            return self.files[slide_id]
        except KeyError:
            raise MissingFeaturesError(f"no feature file for slide {slide_id!r}") from None

    # -- cache -------------------------------------------------------------------------------
    def _get(self, kind: str, slide_id: str, load):
        key = (kind, slide_id)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[0]
        value, nbytes = load()
        if nbytes <= self.cache_bytes:
            self._cache[key] = (value, nbytes)
            self._cached_bytes += nbytes
            while self._cached_bytes > self.cache_bytes:
                _, (_, old) = self._cache.popitem(last=False)
                self._cached_bytes -= old
        return value

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0

    # -- reading -----------------------------------------------------------------------------
    def _read(self, slide_id: str):
        from hdmil.features.io import read_features

        return read_features(self.path(slide_id))

    def _read_regions(self, slide_id: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
        path = self.path(slide_id)
        if path.suffix.lower() != ".h5":
            raise FeatureFileError(
                f"{path}: region instances need an h5 feature file with region_embeddings "
                "(run `hdmil pretrain-slpd` on h5 features)"
            )
        import h5py

        try:
            with h5py.File(path, "r") as h5:
                if "region_embeddings" not in h5:
                    raise FeatureFileError(
                        f"{path}: no region_embeddings dataset; run `hdmil pretrain-slpd` to "
                        "write region embeddings, or train on --instances patch"
                    )
                emb = np.asarray(h5["region_embeddings"][()], dtype=np.float32)
                coords = (
                    np.asarray(h5["region_coords"][()], dtype=np.int64)
                    if "region_coords" in h5
                    else None
                )
                attrs = {k: _plain(v) for k, v in h5.attrs.items()}
                if not attrs.get("encoder") and "features" in h5 and "encoder" in h5["features"].attrs:
                    attrs["encoder"] = _plain(h5["features"].attrs["encoder"])  # TRIDENT names it there
        except OSError as exc:
            raise FeatureFileError(f"{path}: cannot read feature file ({exc})") from exc
        return emb, coords, attrs

    def __getitem__(self, slide_id: str) -> Bag:
        def load():
            if self.instances == "region":
                feats, coords, attrs = self._read_regions(slide_id)
            else:
                fb = self._read(slide_id)
                feats = np.asarray(fb.features, dtype=np.float32)
                coords = None if fb.coords is None else np.asarray(fb.coords)
                attrs = dict(fb.attrs or {})
            if feats.ndim != 2 or feats.shape[0] == 0:
                raise FeatureFileError(
                    f"{self.path(slide_id)}: expected a non-empty [N, D] feature array, "
                    f"got shape {tuple(feats.shape)}"
                )
            _check_finite(self.path(slide_id), feats)
            self._check_width(self.path(slide_id), feats.shape[1])
            bag = Bag(slide_id, torch.from_numpy(np.ascontiguousarray(feats)), coords, attrs)
            return bag, feats.nbytes + (0 if coords is None else coords.nbytes)

        return self._get(self.instances, slide_id, load)

    def lr_patches(self, slide_id: str) -> np.ndarray:
        """uint8 [N, 16, 16, 3]: the slide's patches at 1.25x, row for row with its features."""

        def load():
            fb = self._read(slide_id)
            lr = getattr(fb, "lr_patches", None)
            if lr is None:
                raise FeatureFileError(
                    f"{self.path(slide_id)}: no lr_patches dataset (LIPN's input); re-run "
                    "`hdmil features` on the slides to write it next to the features"
                )
            lr = np.asarray(lr, dtype=np.uint8)
            n = np.asarray(fb.features).shape[0]
            if lr.ndim != 4 or lr.shape[0] != n or lr.shape[-1] != 3:
                raise FeatureFileError(
                    f"{self.path(slide_id)}: lr_patches has shape {lr.shape}, expected "
                    f"[{n}, 16, 16, 3] (one per feature row)"
                )
            return lr, lr.nbytes

        if self.instances != "patch":
            raise HDMILError("LR patches (LIPN) exist for patch instances only, not regions")
        return self._get("lr", slide_id, load)

    def grid_index(self, slide_id: str) -> np.ndarray:
        """int64 [N, 2]: each patch's (row, col) on its slide's patch grid (LIPN's dilation)."""
        from hdmil.models.lipn import grid_index

        bag = self[slide_id]
        return grid_index(bag.coords, bag.attrs.get("patch_size_level0"), self.path(slide_id))

    def first_attrs(self) -> dict[str, Any]:
        """The attributes of the first feature file (encoder, dim, patch geometry)."""
        if not self.files:
            return {}
        return dict(self[next(iter(self.files))].attrs)

    @property
    def dim(self) -> int:
        """Instance feature width, read from the first bag."""
        return int(self[next(iter(self.files))].features.shape[1])


def _check_finite(path: Path, feats: np.ndarray) -> None:
    """NaN or inf features would train and score as if they were data: refuse the file."""
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        raise FeatureFileError(
            f"{path}: {int(bad.sum())} of {len(feats)} feature rows hold NaN or inf values "
            f"(first at row {int(np.argmax(bad))}); re-extract this slide's features"
        )


def _h5_width(path: Path, dataset: str) -> int | None:
    """The width of ``dataset`` [N, D] (or CLAM's [1, N, D]) from the h5 header; None if unknown."""
    if path.suffix.lower() not in (".h5", ".hdf5"):
        return None
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            shape = h5[dataset].shape if dataset in h5 else None
    except (OSError, KeyError):
        return None  # reported with its own message when the bag is read
    return int(shape[-1]) if shape is not None and len(shape) in (2, 3) else None


def _plain(value: Any) -> Any:
    """h5 attribute → plain Python (bytes → str, numpy scalars → numbers)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def load_cohort(
    labels: str | Path,
    features_dir: str | Path,
    instances: Instances = "patch",
    classes: Sequence[str] | None = None,
    skip_missing: bool = False,
    cache_bytes: int = 4 << 30,
) -> Cohort:
    """Labels plus their feature bags. Labelled slides without a feature file are an error
    listing them, or with ``skip_missing`` a warning, and they are left out (``cohort.skipped``)."""
    cohort = read_labels(labels, classes)
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise MissingFeaturesError(f"{features_dir}: features directory not found")
    files = _feature_files(features_dir)
    # ids in a labels CSV sometimes carry the slide's extension ("a.svs"); features never do
    resolved = {}
    for sid in cohort.slide_ids:
        if sid in files:
            resolved[sid] = files[sid]
        elif Path(sid).stem in files:
            resolved[sid] = files[Path(sid).stem]
    missing = [s for s in cohort.slide_ids if s not in resolved]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        if not skip_missing:
            raise MissingFeaturesError(
                f"{features_dir}: no feature file for {len(missing)} of {len(cohort)} labelled "
                f"slides: {shown} (pass --skip-missing to train without them)"
            )
        warnings.warn(
            f"{features_dir}: skipping {len(missing)} labelled slides without features: {shown}",
            stacklevel=2,
        )
    kept = [s for s in cohort.slide_ids if s in resolved]
    if not kept:
        raise MissingFeaturesError(f"{features_dir}: none of the labelled slides has features")
    out = cohort.subset(kept)
    bags = BagDataset(resolved, instances=instances, cache_bytes=cache_bytes)
    bags.check_widths()
    return replace(out, bags=bags, skipped=tuple(missing))
