"""Feature files: ours, CLAM's and TRIDENT's ``<slide>.h5``, and CLAM's ``pt_files/<slide>.pt``.

Layout (docs/architecture.md): datasets ``features`` float32 [N, D], ``coords`` int64 [N, 2]
(level-0 x, y of each patch's top-left corner), optional ``lr_patches`` uint8 [N, 16, 16, 3];
attributes ``encoder``, ``dim``, ``patch_size_level0``, ``patch_px``, ``magnification``, ``mpp``,
``slide``. Other datasets (SLPD's ``region_embeddings`` …) are left alone by the readers here and
carried over when the features of a file are rewritten unchanged in grid and encoder.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import FeatureFileError
from hdmil.files import atomic_write

H5_SUFFIXES = (".h5", ".hdf5")
PT_SUFFIXES = (".pt", ".pth")
OWN_DATASETS = ("features", "coords", "lr_patches")


@dataclass
class FeatureBag:
    """The patch features of one slide.

    features: float32 [N, D]; coords: int64 [N, 2] level-0 (x, y) or None (CLAM .pt files);
    lr_patches: uint8 [N, 16, 16, 3] or None; attrs: the file's attributes.
    """

    features: np.ndarray
    coords: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    lr_patches: np.ndarray | None = None
    slide_id: str = ""
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def grid_index(self) -> np.ndarray:
        """int64 [N, 2]: each patch's (row, col) on the slide's patch grid (LIPN's dilation)."""
        from hdmil.models.lipn import grid_index

        return grid_index(self.coords, self.attrs.get("patch_size_level0"), self.path or self.slide_id)


# --------------------------------------------------------------------------------------------------
# Writing


def write_features(
    path: str | os.PathLike,
    features: FeatureBag | np.ndarray,
    coords: np.ndarray | None = None,
    attrs: dict[str, Any] | None = None,
    lr_patches: np.ndarray | None = None,
) -> Path:
    """Write ``<slide>.h5`` atomically: built in memory, then written by ``hdmil.files.atomic_write``
    (a hidden temp file beside it, renamed into place).

    Pass a ``FeatureBag`` or the arrays. Attributes given here override the bag's; ``None`` values
    are left out. Returns the path written.
    """
    path = Path(path)
    if isinstance(features, FeatureBag):
        bag = features
        coords = bag.coords if coords is None else coords
        lr_patches = bag.lr_patches if lr_patches is None else lr_patches
        attrs = {"slide": bag.slide_id or None, **bag.attrs, **(attrs or {})}
        features = bag.features
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {feats.shape}")
    n = feats.shape[0]
    datasets: dict[str, np.ndarray] = {"features": feats}
    if coords is not None:
        coords = np.asarray(coords)
        if coords.shape != (n, 2):
            raise ValueError(f"coords must be [N={n}, 2], got shape {coords.shape}")
        datasets["coords"] = coords.astype(np.int64)
    if lr_patches is not None:
        lr_patches = np.asarray(lr_patches)
        if lr_patches.shape[0] != n or lr_patches.ndim != 4 or lr_patches.dtype != np.uint8:
            raise ValueError(
                f"lr_patches must be uint8 [N={n}, h, w, 3], got {lr_patches.dtype} {lr_patches.shape}"
            )
        datasets["lr_patches"] = lr_patches
    attrs = {k: v for k, v in (attrs or {}).items() if v is not None}
    attrs = {"slide": path.stem, **attrs, "dim": int(feats.shape[1])}  # dim always the real one
    peers = _peer_attributes(path, attrs, "coords" in datasets)
    carry = _carry_over(path, datasets.get("coords"), attrs.get("encoder"), attrs.get("encoder_recipe"))
    _write_atomic(path, datasets, attrs, carry, peers)
    return path


def coords_attributes(attrs: dict[str, Any], folder: str | os.PathLike = "") -> dict[str, Any]:
    """The attributes CLAM and TRIDENT write on ``coords``, from a feature file's own attributes.

    CLAM (``Whole_Slide_Bag_FP``, ``StitchCoords``) reads ``patch_size`` px at ``patch_level``:
    our patches are cut at level 0, so ``patch_level`` 0, ``patch_size`` = ``patch_size_level0``,
    ``downsample`` [1, 1], ``level_dim`` = ``downsampled_level_dim`` = the slide's size. TRIDENT
    (``read_coords``, ``visualize_coords``, slide encoders) reads ``patch_size_level0``,
    ``level0_magnification``, ``target_magnification``, ``overlap``, ``level0_width`` /
    ``level0_height``. Both read ``name`` (the slide) and where the file went (``save_path``,
    ``savetodir``). On a slide whose level 0 is at the target magnification (20x), ``patch_size``
    is also TRIDENT's size at that magnification; on others TRIDENT's patch readers should use
    ``patch_size_level0``. Empty without ``patch_size_level0``.
    """
    ps0 = attrs.get("patch_size_level0")
    if not ps0:
        return {}
    ps0 = int(ps0)
    out: dict[str, Any] = {
        "patch_size": ps0, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
        "patch_size_level0": ps0, "overlap": 0, "name": str(attrs.get("slide") or ""),
        "save_path": str(folder), "savetodir": str(folder),
    }
    w, h = attrs.get("slide_width"), attrs.get("slide_height")
    if w and h:
        dims = np.array([int(w), int(h)], dtype=np.int64)
        out.update(level_dim=dims, downsampled_level_dim=dims, level0_width=int(w), level0_height=int(h))
    if attrs.get("magnification"):
        out["target_magnification"] = float(attrs["magnification"])
    if attrs.get("level0_magnification"):
        out["level0_magnification"] = float(attrs["level0_magnification"])
    return out


def _peer_attributes(path: Path, attrs: dict[str, Any], has_coords: bool) -> dict[str, dict[str, Any]]:
    """Attributes on the datasets themselves, where CLAM's and TRIDENT's code looks for them:
    ``coords`` (``coords_attributes``; a CLAM / TRIDENT file's own ones kept first) and
    ``features`` (``encoder``, as TRIDENT writes it). ``coords_attrs`` leaves the root."""
    theirs = attrs.pop("coords_attrs", None)
    theirs = json.loads(theirs) if isinstance(theirs, str) else dict(theirs or {})
    out: dict[str, dict[str, Any]] = {}
    if has_coords:
        out["coords"] = {**coords_attributes(attrs, path.parent.resolve()), **theirs}
    if attrs.get("encoder"):
        out["features"] = {"encoder": str(attrs["encoder"])}
    return out


LAYOUTS = ("hdmil", "clam")


def feature_path(out: str | os.PathLike, slide: str, layout: str = "hdmil") -> Path:
    """Where ``hdmil features --layout`` puts a slide's h5: ``<out>/<slide>.h5``, or CLAM's
    ``<out>/h5_files/<slide>.h5``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    out = Path(out)
    return out / "h5_files" / f"{slide}.h5" if layout == "clam" else out / f"{slide}.h5"


def write_clam_features(out: str | os.PathLike, bag: FeatureBag) -> tuple[Path, Path]:
    """CLAM's layout under ``out``: ``h5_files/<slide>.h5`` (ours, with the attributes its code
    reads) and ``pt_files/<slide>.pt``: a plain float32 tensor [N, D], as CLAM's
    ``extract_features_fp.py`` saves it (``torch.save(features, ...)``) and ``Generic_MIL_Dataset``
    loads it. Returns (h5, pt)."""
    import torch

    h5 = feature_path(out, bag.slide_id, "clam")
    pt = Path(out) / "pt_files" / f"{bag.slide_id}.pt"
    h5.parent.mkdir(parents=True, exist_ok=True)
    pt.parent.mkdir(parents=True, exist_ok=True)
    write_features(h5, bag)
    with atomic_write(pt, "wb") as fh:
        torch.save(torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32)), fh)
    return h5, pt


def update_feature_file(
    path: str | os.PathLike,
    datasets: dict[str, np.ndarray],
    attrs: dict[str, Any] | None = None,
    dataset_attrs: dict[str, dict[str, Any]] | None = None,
    out: str | os.PathLike | None = None,
) -> Path:
    """Add or replace datasets / attributes of an existing feature file, atomically.

    For results computed from the features (SLPD's ``region_embeddings``, ``prototypes`` …, the
    ``lr_patches`` of ``hdmil add-lr-patches``). ``dataset_attrs``: the attributes of the
    datasets given here (the others keep theirs). ``out``: write the result there instead of
    over ``path``. Returns the path written.
    """
    path = Path(path)
    target = Path(out) if out is not None else path
    with _open_h5(path) as old:
        try:
            new_attrs = {**{k: _attr_value(v) for k, v in old.attrs.items()}, **(attrs or {})}
            keep = [name for name in old.keys() if name not in datasets]
        except (OSError, KeyError) as exc:
            raise FeatureFileError(f"{path}: corrupt feature file ({_first_line(exc)})") from exc
    _write_atomic(target, {k: np.asarray(v) for k, v in datasets.items()}, new_attrs, (str(path), keep),
                  dataset_attrs)
    return target


def _write_atomic(
    path: Path,
    datasets: dict[str, np.ndarray],
    attrs: dict[str, Any],
    carry: tuple[str, list[str]] | None = None,
    dataset_attrs: dict[str, dict[str, Any]] | None = None,
) -> None:
    import h5py

    # The file is built in memory and written with one plain write: HDF5 never meets a full disk
    # or a read-only folder itself (after a failed write its half-closed objects crash the
    # interpreter at exit), and the OSError becomes hdmil.files' one-line WriteError.
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for name, data in datasets.items():
            ds = f.create_dataset(name, data=data)
            for key, value in (dataset_attrs or {}).get(name, {}).items():
                ds.attrs[key] = _h5_attr(value)
        for key, value in attrs.items():
            f.attrs[key] = _h5_attr(value)
        if carry is not None:
            src_name, names = carry
            with h5py.File(src_name, "r") as src:
                for name in names:
                    src.copy(src[name], f, name=name)
    # atomic_write's temp name is hidden: directory scans (``*.h5``) never see a half-written file.
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getbuffer())


def _carry_over(path: Path, coords: np.ndarray | None, encoder: str | None,
                recipe: Any = None) -> tuple[str, list[str]] | None:
    """Other datasets of an existing file at ``path`` worth keeping: only when they still describe
    the same patches and encoder (else they would silently go stale)."""
    import h5py

    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as old:
            others = [name for name in old.keys() if name not in OWN_DATASETS]
            if not others or coords is None or "coords" not in old:
                return None
            same_grid = old["coords"].shape == coords.shape and np.array_equal(old["coords"][()], coords)
            same_encoder = _attr_value(old.attrs.get("encoder")) == encoder and _same_stain(
                _attr_value(old.attrs.get("encoder_recipe")), recipe)
            return (str(path), others) if same_grid and same_encoder else None
    except OSError:  # an unreadable old file is simply replaced
        return None


def _same_stain(old_recipe: Any, new_recipe: Any) -> bool:
    """Whether two recorded encoder recipes (JSON or dicts) name the same stain normalisation:
    features of normalised patches make other region embeddings than those of raw ones."""
    def stain(raw: Any) -> Any:
        try:
            d = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw or {})
        except (TypeError, ValueError):
            return None
        s = d.get("stain") or {}
        return (s.get("method"), json.dumps(s.get("params"), sort_keys=True)) if s else None

    return stain(old_recipe) == stain(new_recipe)


def _h5_attr(value: Any) -> Any:
    """An h5 attribute value: numbers, strings, arrays as they are; anything else as JSON."""
    if isinstance(value, (str, bytes, int, float, bool, np.generic, np.ndarray)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return np.asarray(value)
    return json.dumps(value)


def _attr_value(value: Any) -> Any:
    """h5 attribute → plain Python (numpy scalars to int/float, bytes to str)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO" and value.ndim == 0:
        return _attr_value(value.item())
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------------
# Reading


def read_features(path: str | os.PathLike, lr_patches: bool = True) -> FeatureBag:
    """A ``FeatureBag`` from our h5, CLAM's / TRIDENT's h5, or CLAM's ``.pt`` (no coords).

    Raises ``FeatureFileError`` naming the file when it is missing, corrupt, or not a feature file.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found")
    suffix = path.suffix.lower()
    if suffix in PT_SUFFIXES:
        return _read_pt(path)
    if suffix in H5_SUFFIXES:
        return _read_h5(path, lr_patches)
    raise FeatureFileError(f"{path}: not a feature file (expected {' / '.join(H5_SUFFIXES + PT_SUFFIXES)})")


def _open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({_first_line(exc)})") from exc


def _read_h5(path: Path, with_lr: bool) -> FeatureBag:
    with _open_h5(path) as f:
        try:
            if "features" not in f:
                found = ", ".join(f.keys()) or "nothing"
                raise FeatureFileError(f"{path}: no 'features' dataset (found: {found})")
            feats = _as_2d(path, "features", f["features"][()])
            coords = None
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
            if "coords" in f:
                coords = _as_2d(path, "coords", f["coords"][()])
                if coords.shape[1] != 2:
                    raise FeatureFileError(f"{path}: 'coords' must be [N, 2], got shape {coords.shape}")
                if coords.shape[0] != feats.shape[0]:
                    raise FeatureFileError(
                        f"{path}: {feats.shape[0]} feature rows but {coords.shape[0]} coords"
                    )
                coords = coords.astype(np.int64)
                if "patch_size_level0" not in attrs:  # a CLAM / TRIDENT file: geometry on coords
                    cattrs = {k: _attr_value(v) for k, v in f["coords"].attrs.items()}
                    attrs = _geometry_from_coords_attrs(attrs, cattrs)
            attrs = _encoder_from_features(attrs, f["features"])
            lr = None
            if with_lr and "lr_patches" in f:
                lr = np.asarray(f["lr_patches"][()], dtype=np.uint8)
                if lr.shape[0] != feats.shape[0]:
                    raise FeatureFileError(
                        f"{path}: {feats.shape[0]} feature rows but {lr.shape[0]} lr_patches"
                    )
        except FeatureFileError:
            raise
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise FeatureFileError(f"{path}: corrupt feature file ({_first_line(exc)})") from exc
    slide = str(attrs.get("slide") or path.stem)
    attrs.setdefault("dim", int(feats.shape[1]))
    if coords is not None:
        check_coords(path, coords, attrs)
    return FeatureBag(feats.astype(np.float32, copy=False), coords, attrs, lr, slide, path)


def check_coords(path: Any, coords: np.ndarray, attrs: dict[str, Any]) -> None:
    """Refuse patch coords that cannot be the file's own slide patches (``FeatureFileError``).

    Always: negative coords. When the file records the slide's level-0 size (``slide_width``,
    ``slide_height``, written by ``hdmil features``): a patch whose top-left corner lies outside.
    For our own files (no CLAM / TRIDENT attributes on ``coords``): a patch off the grid of
    ``patch_size_level0`` px steps from the first patch (CLAM steps each tissue contour from its
    own corner, so its files are left alone).
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if not len(coords):
        return
    _refuse_rows(path, coords, (coords < 0).any(axis=1), "negative (left of or above the slide)")
    w, h = attrs.get("slide_width"), attrs.get("slide_height")
    if w and h:
        outside = (coords[:, 0] >= int(w)) | (coords[:, 1] >= int(h))
        _refuse_rows(path, coords, outside, f"outside the {int(w)} x {int(h)} px slide")
    ps0 = attrs.get("patch_size_level0")
    if ps0 and int(ps0) > 0 and "coords_attrs" not in attrs:
        off = ((coords - coords[0]) % int(ps0) != 0).any(axis=1)
        _refuse_rows(path, coords, off, f"off the grid of {int(ps0)} px patches (patch_size_level0)")


def _refuse_rows(path: Any, coords: np.ndarray, bad: np.ndarray, what: str) -> None:
    if bad.any():
        i = int(np.argmax(bad))
        x, y = (int(v) for v in coords[i])
        raise FeatureFileError(
            f"{path}: {int(bad.sum())} of {len(coords)} patch coords are {what}, first row {i} "
            f"at ({x}, {y}); these features do not belong to this slide's patch grid"
        )


def _encoder_from_features(attrs: dict[str, Any], features: Any) -> dict[str, Any]:
    """TRIDENT names its encoder on the ``features`` dataset (``encoder="uni_v1"``): keep it."""
    name = _attr_value(features.attrs.get("encoder")) if "encoder" in features.attrs else None
    if name and not attrs.get("encoder"):
        attrs = {**attrs, "encoder": str(name)}
    return attrs


def _geometry_from_coords_attrs(attrs: dict[str, Any], cattrs: dict[str, Any]) -> dict[str, Any]:
    """Fill our geometry attributes from CLAM's / TRIDENT's attributes on the ``coords`` dataset."""
    if not cattrs:
        return attrs
    attrs = dict(attrs)
    attrs.setdefault("coords_attrs", cattrs)
    if "patch_size_level0" in cattrs:  # TRIDENT
        attrs.setdefault("patch_size_level0", int(cattrs["patch_size_level0"]))
    elif "patch_size" in cattrs and "downsample" in cattrs:  # CLAM: size at patch_level × its downsample
        ds = np.atleast_1d(np.asarray(cattrs["downsample"], dtype=float))
        attrs.setdefault("patch_size_level0", int(round(float(cattrs["patch_size"]) * ds[0])))
    elif "patch_size" in cattrs and int(cattrs.get("patch_level", 0)) == 0:
        attrs.setdefault("patch_size_level0", int(cattrs["patch_size"]))
    if "patch_size" in cattrs:
        attrs.setdefault("patch_px", int(cattrs["patch_size"]))
    if "target_magnification" in cattrs:
        attrs.setdefault("magnification", float(cattrs["target_magnification"]))
    return attrs


def _as_2d(path: Path, name: str, arr: np.ndarray) -> np.ndarray:
    """``[N, D]``, also from CLAM's batched ``[1, N, D]``."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise FeatureFileError(
            f"{path}: '{name}' must be a numeric [N, D] array, got {arr.dtype} {arr.shape}"
        )
    return arr


def _read_pt(path: Path) -> FeatureBag:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise FeatureFileError(f"{path}: not a readable torch feature file ({_first_line(exc)})") from exc
    coords = None
    if isinstance(obj, dict):
        if "features" not in obj:
            raise FeatureFileError(f"{path}: no 'features' tensor (found keys: {', '.join(map(str, obj))})")
        coords = obj.get("coords")
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise FeatureFileError(f"{path}: expected a features tensor [N, D], found {type(obj).__name__}")
    feats = _as_2d(path, "features", obj.float().numpy())
    if coords is not None:
        coords = _as_2d(path, "coords", np.asarray(coords)).astype(np.int64)
        if coords.shape != (feats.shape[0], 2):
            raise FeatureFileError(
                f"{path}: {feats.shape[0]} feature rows but coords of shape {coords.shape}"
            )
    attrs = {"dim": int(feats.shape[1]), "slide": path.stem}
    return FeatureBag(np.ascontiguousarray(feats, dtype=np.float32), coords, attrs, None, path.stem, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Directories


def find_feature_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Slide id → feature file, in our output folder or CLAM's / TRIDENT's.

    Looks at ``*.h5`` / ``*.pt`` in the folder itself, in ``h5_files/`` and ``pt_files/`` (CLAM;
    h5 wins since it has coords), and else in a single ``features_*`` folder up to two levels down
    (TRIDENT: ``<job>/20x_256px_0px_overlap/features_<encoder>/``).
    """
    root = Path(directory)
    if not root.is_dir():
        raise FeatureFileError(f"{root}: feature folder not found")
    found = _scan(root)
    if not found:
        dirs = {*root.glob("features_*"), *root.glob("*/features_*")}
        candidates = sorted(p for p in dirs if p.is_dir() and _scan(p))
        if len(candidates) > 1:
            names = ", ".join(str(p.relative_to(root)) for p in candidates)
            raise FeatureFileError(f"{root}: several feature folders ({names}); pass one of them")
        if candidates:
            found = _scan(candidates[0])
    if not found:
        raise FeatureFileError(f"{root}: no feature files (*.h5, *.pt, h5_files/, pt_files/) found")
    return dict(sorted(found.items()))


def _scan(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    # Lowest priority first; later entries overwrite: pt < h5, subfolders < the folder itself.
    order = (("pt_files", PT_SUFFIXES), (".", PT_SUFFIXES), ("h5_files", H5_SUFFIXES), (".", H5_SUFFIXES))
    for sub, suffixes in order:
        d = folder / sub
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."):
                found[p.stem] = p
    return found
