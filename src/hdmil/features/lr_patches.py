"""LR patches for feature files made elsewhere (CLAM, TRIDENT): what LIPN trains on.

``hdmil features`` cuts each patch's 16 x 16 px LR patch (1.25x) out of the slide's LR image
(``hdmil.grid``); CLAM and TRIDENT write none. ``add_lr_patches`` reads them from the slides,
one per feature row at that row's own level-0 coordinates, with the same pyramid level, area
averaging and white padding past the slide's edges as the grid's LR image: on our grid (from
(0, 0)) they are exactly the LR patches ``hdmil features`` writes, and CLAM's grids, which start
at each tissue contour's own corner, get the LR patch of each patch as it lies. Files that lack
their patch geometry (CLAM's feature extraction writes no attributes) get it on ``coords``,
under CLAM's and TRIDENT's attribute names, so the grid index (``coords // patch_size_level0``,
LIPN's dilation) and ``hdmil train-lipn`` work on them.

>>> outcomes = add_lr_patches("clam_root", ["slides/"], out="clam_root_lr")
>>> [o.line() for o in outcomes if o.status == "failed"]
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import Cancelled, FeatureFileError, HDMILError, check_cancelled
from hdmil.grid import padded_mask, read_lr_patch
from hdmil.slide import slide_label

__all__ = ["LROutcome", "add_lr_patches", "find_slides", "read_lr_patches"]

Progress = Callable[[str, int, int], Any]
LR_PATCH_PX = 16  # 256 px at 20x seen at 1.25x, as hdmil.grid makes them


@dataclass
class LROutcome:
    """What happened to one feature file: ``status`` written | kept (it had LR patches: copied
    to --out as it was) | skipped (in place, it had them) | failed; ``message`` says why."""

    source: Path
    target: Path | None
    status: str
    message: str = ""

    def line(self) -> str:
        return self.message if self.status == "failed" else f"{self.source}: {self.message}"


# -- reading LR patches --------------------------------------------------------------------------


def read_lr_patches(slide: Any, coords: np.ndarray, patch_size_level0: int, lr_px: int = LR_PATCH_PX,
                    progress: Progress | None = None,
                    cancel: threading.Event | None = None) -> np.ndarray:
    """uint8 [N, lr_px, lr_px, 3]: the LR patch of each level-0 (x, y) in ``coords`` [N, 2].

    Each is the area average of its ``patch_size_level0`` square read from the pyramid level
    ``build_grid`` uses for the LR image; what lies past the slide's edges is white.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    scale = int(patch_size_level0) / lr_px  # level-0 px per LR px
    level = int(slide.best_level_for_downsample(scale))
    ds = float(slide.level_downsamples[level])
    out = np.empty((len(coords), lr_px, lr_px, 3), np.uint8)
    for i, (x, y) in enumerate(coords):
        if i % 256 == 0:
            check_cancelled(cancel, f"{slide_label(slide)}: reading LR patches")
            if progress is not None:
                progress("lr_patches", i, len(coords))
        out[i] = read_lr_patch(slide, level, ds, scale / ds, (int(x), int(y)), lr_px)
    if progress is not None:
        progress("lr_patches", len(coords), len(coords))
    return out


# -- feature files ------------------------------------------------------------------------------


def find_slides(sources: Iterable[str | os.PathLike]) -> dict[str, list[Path]]:
    """Slide stem -> slide files, from folders (searched recursively) and files."""
    from hdmil.batch import SLIDE_SUFFIXES

    found: dict[str, list[Path]] = {}
    for src in map(Path, sources):
        if not src.exists():
            raise HDMILError(f"{src}: slide folder not found")
        paths = [src] if src.is_file() else sorted(
            p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
        for p in paths:
            if p not in found.setdefault(p.stem, []):
                found[p.stem].append(p)
    return found


def add_lr_patches(
    features: str | os.PathLike,
    slides: Iterable[str | os.PathLike],
    out: str | os.PathLike | None = None,
    in_place: bool = False,
    mpp: float | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> list[LROutcome]:
    """Add ``lr_patches`` (and missing patch geometry) to every feature file under ``features``
    (ours, a CLAM root, a TRIDENT job folder), from the slides of the same name in ``slides``.

    Written to ``out`` under the same relative paths (so it is a feature folder of the same
    layout), or over the files themselves with ``in_place``; never anywhere else. A file that
    fails (no slide, coordinates outside it, no coords) is one ``failed`` outcome; the others go
    on. ``overwrite``: read LR patches again for files that have them.
    """
    from hdmil.features.io import find_feature_files

    root = Path(features)
    target_root = _target_root(root, out, in_place)
    files = find_feature_files(root)
    slide_files = find_slides(slides)
    outcomes = []
    for k, path in enumerate(files.values()):
        check_cancelled(cancel, "adding LR patches")
        if progress is not None:
            progress("files", k, len(files))
        try:
            target = path if target_root is None else _target(root, target_root, path)
            outcomes.append(_one_file(path, target, slide_files, mpp, overwrite, in_place, cancel))
        except Cancelled:
            raise
        except HDMILError as exc:
            msg = str(exc)
            outcomes.append(LROutcome(path, None, "failed", msg if str(path) in msg else f"{path}: {msg}"))
        except (OSError, ValueError, RuntimeError, KeyError) as exc:  # a decoder's crash: this file only
            first = (str(exc).strip().splitlines() or [""])[0]
            outcomes.append(LROutcome(path, None, "failed", f"{path}: {type(exc).__name__}: {first}"))
    if progress is not None:
        progress("files", len(files), len(files))
    return outcomes


def _target_root(root: Path, out: str | os.PathLike | None, in_place: bool) -> Path | None:
    """Where the files go: None for in place; HDMILError for no choice, both, or --out being
    the feature folder itself."""
    if in_place and out is not None:
        raise HDMILError("give --out DIR or --in-place, not both")
    if in_place:
        return None
    if out is None:
        raise HDMILError("pass --out DIR for the files with LR patches, or --in-place to add them "
                         "to the feature files themselves")
    out = Path(out)
    if root.is_dir() and out.exists() and out.resolve() == root.resolve():
        raise HDMILError(f"{out}: --out is the feature folder itself; pass --in-place to add LR "
                         "patches to its files")
    return out


def _target(root: Path, out: Path, path: Path) -> Path:
    """``path``'s place under ``out``: its path relative to the feature folder, checked to stay
    inside ``out`` (no symlinked folder leads elsewhere)."""
    target = out / path.relative_to(root)
    out.mkdir(parents=True, exist_ok=True)
    existing = target.parent
    while not existing.exists():  # checked before any folder is made: none is made elsewhere
        existing = existing.parent
    if not existing.resolve().is_relative_to(out.resolve()):
        raise HDMILError(f"{target}: lies outside {out} (a symbolic link?); refused")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.resolve() == path.resolve():
        raise HDMILError(f"{target}: is the feature file itself; pass --in-place to change it")
    return target


def _one_file(path: Path, target: Path, slide_files: dict[str, list[Path]], mpp: float | None,
              overwrite: bool, in_place: bool, cancel: threading.Event | None) -> LROutcome:
    from hdmil.features.io import read_features, update_feature_file
    from hdmil.slide import open_slide

    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise FeatureFileError(f"{path}: a .pt file holds no patch coordinates (CLAM writes them in "
                               "h5_files/<slide>.h5); nothing to match LR patches to")
    bag = read_features(path, lr_patches=False)
    if bag.coords is None:
        raise FeatureFileError(f"{path}: no 'coords' dataset; nothing to match LR patches to")
    if _has_lr(path) and not overwrite:
        if in_place:
            return LROutcome(path, path, "skipped", "has lr_patches already (--overwrite reads them again)")
        update_feature_file(path, {}, out=target)
        return LROutcome(path, target, "kept", f"has lr_patches already; copied to {target}")
    slide_path = _slide_for(path, bag.slide_id, slide_files)
    with open_slide(slide_path, mpp=mpp) as slide:
        geometry = _geometry(path, bag, slide, mpp)
        lr = read_lr_patches(slide, bag.coords, geometry["patch_size_level0"], cancel=cancel)
        datasets, dataset_attrs = {"lr_patches": lr}, {}
        if geometry["derived"]:  # patch geometry, where CLAM's and TRIDENT's code and ours read it
            datasets["coords"], dataset_attrs["coords"] = _coords_with_geometry(path, bag, slide, geometry)
        attrs = _root_attrs(bag.attrs, slide, geometry)
    written = update_feature_file(path, datasets, attrs, dataset_attrs, out=target)
    n_pad = int(padded_mask(bag.coords, geometry["patch_size_level0"], geometry["dims"]).sum())
    pad = f", {n_pad} padded past the slide's edge" if n_pad else ""
    return LROutcome(path, written, "written", f"{len(lr)} LR patches from {slide_path.name}{pad} -> {written}")


def _has_lr(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return "lr_patches" in f


def _slide_for(path: Path, slide_id: str, slide_files: dict[str, list[Path]]) -> Path:
    for name in dict.fromkeys((slide_id, path.stem)):
        matches = slide_files.get(name, [])
        if len(matches) > 1:
            raise FeatureFileError(f"{path}: several slides are named {name} "
                                   f"({', '.join(map(str, matches))}); pass the one folder that holds it")
        if matches:
            return matches[0]
    raise FeatureFileError(f"{path}: no slide named {slide_id} among the slides given (--slides)")


def _geometry(path: Path, bag: Any, slide: Any, mpp: float | None) -> dict[str, Any]:
    """The file's patch size in level-0 px (from its attributes, else 256 px at 20x on the
    slide) and the slide's size, checked against the file's record and its coordinates."""
    from hdmil.grid import patch_size_level0

    dims = tuple(int(v) for v in slide.dimensions)
    ps0, derived = bag.attrs.get("patch_size_level0"), False
    if not ps0:
        ps0, derived = patch_size_level0(mpp or slide.require_mpp()), True
    recorded = _recorded_dims(bag.attrs)
    if recorded and tuple(recorded) != dims:
        raise FeatureFileError(
            f"{path}: made on a {recorded[0]} x {recorded[1]} px slide, but {slide.path} is "
            f"{dims[0]} x {dims[1]} px; not its slide")
    coords = bag.coords
    outside = (coords < 0).any(axis=1) | (coords[:, 0] >= dims[0]) | (coords[:, 1] >= dims[1])
    if outside.any():
        i = int(np.argmax(outside))
        raise FeatureFileError(
            f"{path}: {int(outside.sum())} of {len(coords)} patch coords lie outside the "
            f"{dims[0]} x {dims[1]} px slide {slide.path}, first row {i} at "
            f"({int(coords[i, 0])}, {int(coords[i, 1])}); not its slide")
    return {"patch_size_level0": int(ps0), "derived": derived, "dims": dims}


def _recorded_dims(attrs: dict[str, Any]) -> tuple[int, int] | None:
    """The slide's level-0 size a feature file records: ours, TRIDENT's or CLAM's (level 0)."""
    c = attrs.get("coords_attrs") or {}
    if isinstance(c, str):
        import json

        c = json.loads(c)
    for w, h in ((attrs.get("slide_width"), attrs.get("slide_height")),
                 (c.get("level0_width"), c.get("level0_height"))):
        if w and h:
            return int(w), int(h)
    if c.get("level_dim") is not None and int(c.get("patch_level", 0)) == 0:
        dim = np.asarray(c["level_dim"]).ravel()
        return (int(dim[0]), int(dim[1])) if dim.size == 2 else None
    return None


def _coords_with_geometry(path: Path, bag: Any, slide: Any, geometry: dict[str, Any]) -> tuple:
    """``coords`` as they are, with the attributes CLAM and TRIDENT write on it added (theirs kept)."""
    import h5py

    from hdmil.features.io import _attr_value, coords_attributes

    with h5py.File(path, "r") as f:
        raw = f["coords"][()]
        theirs = {k: _attr_value(v) for k, v in f["coords"].attrs.items()}
    w, h = geometry["dims"]
    ours = coords_attributes({"patch_size_level0": geometry["patch_size_level0"], "slide": bag.slide_id,
                              "slide_width": w, "slide_height": h}, path.parent.resolve())
    return raw, {**ours, **theirs}


def _root_attrs(attrs: dict[str, Any], slide: Any, geometry: dict[str, Any]) -> dict[str, Any]:
    """The slide the LR patches came from (the viewer opens it from the file, too) and its size
    and mpp where the file does not record them. ``patch_size_level0`` stays off the root of
    CLAM's and TRIDENT's files: there it would subject their offset grids to our grid check."""
    w, h = geometry["dims"]
    out: dict[str, Any] = {"slide_path": str(Path(slide.path).resolve()), "lr_patches_from": "hdmil add-lr-patches"}
    if not attrs.get("slide_width"):
        out.update(slide_width=w, slide_height=h)
    if not attrs.get("mpp") and slide.mpp:
        out["mpp"] = float(slide.mpp)
    return out

