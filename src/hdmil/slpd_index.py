"""Slides like this one: a cohort index of SLPD prototypes, and the prototype map of a slide.

A cohort index is a folder of feature files (``<slide>.h5``) that ``pretrain-slpd`` has given
``prototypes`` [K, 256]. ``build_index(dir)`` reads them all and caches them in
``<dir>/slpd_index.npz``; ``similar_slides`` uses the cache while it is fresh (same files, same
modification times) and otherwise re-reads the folder.

Slide similarity is ``prototype_similarity``: the mean cosine similarity of the best one-to-one
matching of two slides' prototypes (an assignment problem, docs/method.md §6).

For the viewer: ``prototype_map(h5)`` gives a napari-ready label raster, one pixel per region
(0 = no region / no prototype, k + 1 = prototype k), and the region side in level-0 pixels; scale
it by ``region_size_level0 * mpp`` µm to lay it over the slide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hdmil.errors import FeatureFileError
from hdmil.files import WriteError, atomic_write
from hdmil.models.slpd import prototype_matching, prototype_similarity

__all__ = [
    "feature_file_for",
    "index_folder",
    "INDEX_NAME",
    "SlideIndex",
    "PrototypeMap",
    "read_prototypes",
    "build_index",
    "load_index",
    "similar_slides",
    "prototype_similarity",
    "prototype_matching",
    "prototype_map",
]

INDEX_NAME = "slpd_index.npz"
H5_SUFFIXES = (".h5", ".hdf5")


@dataclass
class SlideIndex:
    """Prototypes of a cohort: one entry per slide that has them."""

    slide_ids: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    prototypes: list[np.ndarray] = field(default_factory=list)  # each float32 [K, Z]
    without_prototypes: list[Path] = field(default_factory=list)  # feature files left out

    def __len__(self) -> int:
        return len(self.slide_ids)


class PrototypeMap(NamedTuple):
    """labels int32 (rows, cols): 0 = no region or no prototype, k + 1 = prototype k; pixel
    (r, c) covers level-0 x in [c·S, (c+1)·S), y in [r·S, (r+1)·S) with S = region_size_level0."""

    labels: np.ndarray
    region_size_level0: int


def _open(path: Path):
    import h5py

    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({exc})") from exc


def _slide_id(f, path: Path) -> str:
    sid = f.attrs.get("slide", "")
    if isinstance(sid, bytes):
        sid = sid.decode("utf-8", "replace")
    return str(sid) or path.stem


def read_prototypes(path: str | os.PathLike) -> tuple[str, np.ndarray | None]:
    """(slide id, prototypes float32 [K, Z] or None when the file has none / K = 0)."""
    path = Path(path)
    with _open(path) as f:
        sid = _slide_id(f, path)
        if "prototypes" not in f:
            return sid, None
        p = np.asarray(f["prototypes"][()], dtype=np.float32)
    if p.ndim != 2:
        raise FeatureFileError(f"{path}: 'prototypes' must be [K, Z], got shape {p.shape}")
    return sid, (p if len(p) else None)


def index_folder(directory: str | os.PathLike) -> Path:
    """The folder that holds a cohort's h5 feature files, found as every command finds feature
    files (``hdmil.features.io.find_feature_files``): the folder itself, CLAM's ``h5_files/``, or
    a TRIDENT job's ``features_<encoder>/``. The index cache lives beside the files."""
    from hdmil.features.io import find_feature_files

    directory = Path(directory)
    if not directory.is_dir():
        raise FeatureFileError(f"{directory}: index folder not found")
    if _h5_files(directory):
        return directory
    try:
        found = find_feature_files(directory)
    except FeatureFileError:
        return directory  # nothing there: an empty index, as before
    h5 = [p for p in found.values() if p.suffix.lower() in H5_SUFFIXES]
    return h5[0].parent if h5 else directory


def _h5_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise FeatureFileError(f"{directory}: index folder not found")
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and p.suffix.lower() in H5_SUFFIXES and not p.name.startswith(".")
    )  # fmt: skip


def _mtimes(files: list[Path]) -> np.ndarray:
    return np.array([p.stat().st_mtime_ns for p in files], dtype=np.int64)


def build_index(directory: str | os.PathLike, write: bool = True) -> SlideIndex:
    """Read the prototypes of every ``*.h5`` in a folder; cache them in ``slpd_index.npz``."""
    directory = index_folder(directory)
    files = _h5_files(directory)
    index = SlideIndex()
    for p in files:
        sid, protos = read_prototypes(p)
        if protos is None:
            index.without_prototypes.append(p)
            continue
        index.slide_ids.append(sid)
        index.paths.append(p)
        index.prototypes.append(protos)
    if write:
        _write_cache(directory, files, index)
    return index


def _write_cache(directory: Path, files: list[Path], index: SlideIndex) -> None:
    zdim = index.prototypes[0].shape[1] if index.prototypes else 0
    stacked = np.concatenate(index.prototypes) if index.prototypes else np.zeros((0, zdim))
    arrays = dict(
        files=np.array([p.name for p in files], dtype=str),
        mtimes=_mtimes(files),
        slide_ids=np.array(index.slide_ids, dtype=str),
        paths=np.array([p.name for p in index.paths], dtype=str),
        counts=np.array([len(p) for p in index.prototypes], dtype=np.int64),
        prototypes=stacked.astype(np.float32),
    )
    try:
        with atomic_write(directory / INDEX_NAME, "wb") as fh:
            np.savez(fh, **arrays)  # a file object: numpy adds no ".npz" to the name
    except (OSError, WriteError):
        pass  # a read-only cohort folder still works, just without the cache


def load_index(directory: str | os.PathLike) -> SlideIndex:
    """The cohort index of a folder: the cache when fresh, else the files (cache not rewritten)."""
    directory = index_folder(directory)
    files = _h5_files(directory)
    cache = directory / INDEX_NAME
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                fresh = list(z["files"]) == [p.name for p in files] and np.array_equal(
                    z["mtimes"], _mtimes(files)
                )
                if fresh:
                    splits = np.cumsum(z["counts"])[:-1]
                    protos = np.split(z["prototypes"], splits) if len(z["counts"]) else []
                    paths = [directory / str(n) for n in z["paths"]]
                    have = {p.name for p in paths}
                    return SlideIndex(
                        [str(s) for s in z["slide_ids"]], paths, list(protos),
                        [p for p in files if p.name not in have],
                    )  # fmt: skip
        except (OSError, KeyError, ValueError):
            pass  # a broken cache is ignored
    return build_index(directory, write=False)


def feature_file_for(slide: str | os.PathLike, directory: str | os.PathLike) -> Path | None:
    """A slide's feature file in ``directory``: ``<stem>.h5``, else the file whose ``slide``
    attribute is the stem (files named otherwise, e.g. by case). None when there is none."""
    directory, stem = index_folder(directory), Path(slide).stem
    for suffix in H5_SUFFIXES:
        direct = directory / f"{stem}{suffix}"
        if direct.is_file():
            return direct
    for path in _h5_files(directory):
        try:
            with _open(path) as f:
                if _slide_id(f, path) == stem:
                    return path
        except FeatureFileError:
            continue  # an unreadable file is not this slide's
    return None


def _resolve_query(
    query: str | os.PathLike | np.ndarray, index: SlideIndex, where: str
) -> tuple[np.ndarray, str | None, Path | None]:
    if isinstance(query, np.ndarray):
        return query, None, None
    path = Path(query)
    if path.suffix.lower() not in H5_SUFFIXES:  # a slide: find its feature file in the index
        hits = [p for p, s in zip(index.paths, index.slide_ids, strict=True)
                if p.stem == path.stem or s == path.stem]  # fmt: skip
        if not hits:
            raise FeatureFileError(
                f"{path}: no feature file with SLPD prototypes for slide '{path.stem}' in {where} "
                "(run `hdmil features` and `hdmil pretrain-slpd` on it, or pass its .h5)"
            )
        path = hits[0]
    sid, protos = read_prototypes(path)
    if protos is None:
        raise FeatureFileError(
            f"{path}: no SLPD prototypes (run `hdmil pretrain-slpd`; a slide with too few "
            "regions gets none)"
        )
    return protos, sid, path


def similar_slides(
    query: str | os.PathLike | np.ndarray,
    index: str | os.PathLike | SlideIndex,
    top: int = 5,
    exclude_self: bool = True,
) -> list[tuple[str, float, Path]]:
    """The ``top`` slides most similar to the query: ``[(slide_id, score, path)]``, best first.

    query: a feature file (.h5) with prototypes, a slide path (its ``<stem>.h5`` is looked up in
    the index), or a prototype array [K, Z]. With ``exclude_self`` (default) a query that is a file
    of the index (same file or same slide id) is left out of its own results; with
    ``exclude_self=False`` it comes first with score 1.0. An array query excludes nothing.
    Score: ``prototype_similarity`` in [-1, 1].
    """
    where = str(index) if not isinstance(index, SlideIndex) else "the index"
    idx = index if isinstance(index, SlideIndex) else load_index(index)
    protos, sid, qpath = _resolve_query(query, idx, where)
    qres = qpath.resolve() if qpath is not None else None
    scored = []
    for s, p, pr in zip(idx.slide_ids, idx.paths, idx.prototypes, strict=True):
        is_self = qres is not None and (p.resolve() == qres or s == sid)
        if is_self and exclude_self:
            continue
        scored.append((s, float(prototype_similarity(protos, pr)), p))
    scored.sort(key=lambda t: -t[1])
    return scored[: max(int(top), 0)]


def prototype_map(h5_path: str | os.PathLike) -> PrototypeMap:
    """The slide's regions as a label raster (see ``PrototypeMap``) for a napari Labels layer."""
    path = Path(h5_path)
    with _open(path) as f:
        if "region_coords" not in f or "region_prototype" not in f:
            raise FeatureFileError(
                f"{path}: no SLPD regions (run `hdmil pretrain-slpd` on its folder first)"
            )
        coords = np.asarray(f["region_coords"][()], dtype=np.int64).reshape(-1, 2)
        labels = np.asarray(f["region_prototype"][()], dtype=np.int64).reshape(-1)
        size = f.attrs.get("slpd_region_size_level0")
        if size is None:
            size = int(f.attrs.get("patch_size_level0", 0)) * int(
                f.attrs.get("slpd_region_patches", 16)
            )
    size = int(size)
    if size <= 0:
        raise FeatureFileError(f"{path}: unknown region size (no 'slpd_region_size_level0')")
    if len(coords) != len(labels):
        raise FeatureFileError(
            f"{path}: {len(coords)} region_coords but {len(labels)} region_prototype"
        )
    if len(coords) == 0:
        return PrototypeMap(np.zeros((0, 0), np.int32), size)
    cell = coords // size  # (col, row)
    raster = np.zeros((int(cell[:, 1].max()) + 1, int(cell[:, 0].max()) + 1), np.int32)
    raster[cell[:, 1], cell[:, 0]] = labels + 1
    return PrototypeMap(raster, size)
