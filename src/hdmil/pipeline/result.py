"""What a run found on one slide (``Result``), its region details, and its two files.

``Result.save`` writes ``patches.h5`` then ``report.json``; the report is written last, so a folder
with a report holds complete results. Both are written through ``hdmil.files`` (temp file, fsync,
rename).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import HDMILError, SlideError
from hdmil.pipeline.folders import printable

__all__ = [
    "STAGES", "NoTissueError", "RegionDetails", "Result", "UnreadablePatchesError", "neighbour_flags",
    "SavedResultError", "SlideChangedError", "SlideNotFoundError", "find_slide", "load_result",
    "read_report", "result_folder", "slide_candidates", "slide_fingerprint",
]

STAGES = ("tissue", "lipn", "crop", "features", "dmin", "total")
# The slide file's fingerprint hashes this many leading bytes (plus its size): cheap on a 5 GB
# slide, and the header and first tiles change when the file is rewritten or replaced.
FINGERPRINT_BYTES = 1 << 20
# Optional report.json blocks another module fills (hdmil.audit, hdmil.budget, hdmil.compute): Result.blocks.
REPORT_BLOCKS = ("budget", "audit", "compute")


class NoTissueError(HDMILError):
    """The slide has no patch with enough tissue: nothing to classify."""


class UnreadablePatchesError(SlideError):
    """Too many of the patches a run had to read could not be decoded (all of them, or more than
    ``RunOptions.max_failed_share``): a prediction from what is left would not be the slide's."""


@dataclass
class RegionDetails:
    """What a DMIN over SLPD regions pooled (R regions, C classes, N tissue patches).

    coords int64 [R, 2] level-0 (x, y) top-left of each region; attention / scores float32 [R, C]
    DMIN's per-class attention and raw logits over the regions; prototype int64 [R] the region's
    SLPD prototype (-1 none); patch_region int64 [N] each tissue patch's region row (-1 none);
    size_level0 the side of a region in level-0 px; slpd_name the SLPD checkpoint's file name.
    """

    coords: np.ndarray
    attention: np.ndarray
    scores: np.ndarray
    prototype: np.ndarray
    patch_region: np.ndarray
    size_level0: int
    slpd_name: str = ""

    @property
    def n_regions(self) -> int:
        return int(len(self.coords))

    def to_report(self) -> dict[str, Any]:
        """The region keys of ``report.json``."""
        return {"n_regions": self.n_regions, "region_size_level0": int(self.size_level0),
                "slpd": self.slpd_name}

    def write_h5(self, f: Any) -> None:
        """The region datasets and attributes of ``patches.h5`` (an open h5py file)."""
        f.create_dataset("region_coords", data=self.coords.astype(np.int64))
        f.create_dataset("region_attention", data=self.attention.astype(np.float32))
        f.create_dataset("region_scores", data=self.scores.astype(np.float32))
        f.create_dataset("region_prototype", data=self.prototype.astype(np.int64))
        f.create_dataset("patch_region", data=self.patch_region.astype(np.int64))
        f.attrs["region_size_level0"] = int(self.size_level0)
        f.attrs["slpd"] = self.slpd_name


@dataclass
class Result:
    """What hierarchical inference found on one slide. Arrays are over the N tissue patches.

    coords int64 [N, 2] level-0 (x, y) top-left; grid_index int64 [N, 2] (row, col);
    lipn_mask bool [N, C] which patches each class keeps (all True for HDMIL†);
    kept bool [N] patches read at 20x (the union of lipn_mask; all for HDMIL†);
    neighbour bool [N] kept only as a neighbour of a kept patch (LIPN's dilation; else all False);
    attention float32 [N, C] DMIN's per-class attention within the pooled set, NaN elsewhere;
    scores float32 [N, C] DMIN's raw attention logits s, NaN where not read;
    features float32 [K, D] of the patches read, rows ``feature_index`` int64 [K] of coords;
    failed int64 [F] rows that were kept but could not be decoded (``failed_share`` of the kept).
    ``run_key`` is what produced the result (``hdmil.pipeline.folders.run_key``): a later run
    reuses the result only when its own key is the same.
    ``regions`` holds what a DMIN over SLPD regions pooled (None for a patch DMIN); then a
    patch's attention and scores are its region's.
    """

    slide_name: str
    slide_path: str | None
    classes: list[str]
    probabilities: np.ndarray
    prediction_index: int
    coords: np.ndarray
    grid_index: np.ndarray
    lipn_mask: np.ndarray
    kept: np.ndarray
    attention: np.ndarray
    scores: np.ndarray
    features: np.ndarray
    feature_index: np.ndarray
    failed: np.ndarray
    use_lipn: bool
    timings: dict[str, float]
    errors: list[str] = field(default_factory=list)
    grid: Any = None
    mpp: float | None = None
    mpp_source: str | None = None  # "file" (the slide's metadata) or "user" (--mpp, the widget's box)
    patch_size_level0: int = 0
    model_name: str = ""
    model_sha256: str = ""
    encoder: str = ""
    reading: dict[str, Any] = field(default_factory=dict)
    regions: RegionDetails | None = None  # None: DMIN pooled patches
    neighbour: np.ndarray | None = None  # None: no patch was kept only as a neighbour
    run_key: dict[str, Any] = field(default_factory=dict)
    roi: dict[str, Any] | None = None  # the ROI / exclusions the run was restricted to (file, mm², patches)
    # the slide file when the result was made (``slide_fingerprint``); {} when not known
    slide_file: dict[str, Any] = field(default_factory=dict)
    # more report.json blocks, written and read back as they are (REPORT_BLOCKS: "audit", "budget")
    blocks: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.neighbour = neighbour_flags(self.neighbour, self.kept)

    @property
    def failed_share(self) -> float:
        """The share of the kept patches that could not be decoded (0 when none was kept)."""
        return len(self.failed) / self.n_kept if self.n_kept else 0.0

    @property
    def instances(self) -> str:
        """What DMIN pooled: ``"region"`` (SLPD regions, see ``regions``) or ``"patch"``."""
        return "region" if self.regions is not None else "patch"

    @property
    def prediction(self) -> str:
        return self.classes[self.prediction_index]

    @property
    def n_patches(self) -> int:
        return int(len(self.coords))

    @property
    def n_padded(self) -> int:
        """Tissue patches that run past the slide's right or bottom edge (read padded with
        background, as CLAM and TRIDENT pad them); 0 without a grid that knows the slide's size."""
        from hdmil.grid import padded_mask

        dims = getattr(self.grid, "dimensions", (0, 0))
        return int(padded_mask(self.coords, self.patch_size_level0, dims).sum())

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def n_read(self) -> int:
        return int(len(self.feature_index))

    @property
    def kept_ratio(self) -> float:
        return self.n_kept / self.n_patches if self.n_patches else 0.0

    @property
    def method(self) -> str:
        return "HDMIL" if self.use_lipn else "HDMIL†"

    def to_report(self) -> dict[str, Any]:
        """A JSON-ready summary (``report.json``)."""
        from hdmil import __version__
        return {
            "slide": printable(self.slide_name),
            "path": printable(self.slide_path) if self.slide_path else None,
            "classes": list(self.classes),
            "probabilities": [float(p) for p in self.probabilities],
            "prediction": self.prediction,
            "prediction_index": int(self.prediction_index),
            "use_lipn": bool(self.use_lipn),
            "method": self.method,
            "n_patches": self.n_patches,
            "n_padded_patches": self.n_padded,
            "n_kept": self.n_kept,
            "n_kept_as_neighbour": int(self.neighbour.sum()),
            "n_read": self.n_read,
            "n_failed": int(len(self.failed)),
            "failed_share": round(float(self.failed_share), 6),
            "kept_ratio": round(float(self.kept_ratio), 6),
            "kept_per_class": {c: int(n) for c, n in zip(self.classes, self.lipn_mask.sum(axis=0))},
            "timings": {k: round(float(v), 4) for k, v in self.timings.items()},
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "encoder": self.encoder,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "patch_size_level0": int(self.patch_size_level0),
            "reading": self.reading,
            "instances": self.instances,
            **(self.regions.to_report() if self.regions is not None else {}),
            "errors": [printable(e) for e in self.errors],
            "run_key": dict(self.run_key),
            "roi": self.roi,
            "slide_file": dict(self.slide_file),
            "grid": _grid_report(self.grid),
            **{k: self.blocks[k] for k in REPORT_BLOCKS if k in self.blocks},
            "hdmil_version": __version__,
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``patches.h5`` then ``report.json`` into ``out_dir``, each atomically.

        The report is written last, so a folder with a report holds complete results; an older
        report there is removed first, so new patches never sit beside an old report.
        WriteError (naming the file) when the folder cannot be made or written to.
        """
        from hdmil.files import WriteError, write_json_atomic

        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").unlink(missing_ok=True)
        except OSError as exc:
            raise WriteError(f"{out}: cannot write the results folder ({exc.strerror or exc})") from exc
        if not self.slide_file and self.slide_path:
            self.slide_file = slide_fingerprint(self.slide_path)
        write_patches_h5(out / "patches.h5", self)
        write_json_atomic(out / "report.json", self.to_report())
        return out


def slide_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a slide file cheaply: its resolved path, size and the SHA-256 of its first
    ``FINGERPRINT_BYTES`` bytes ({} when it cannot be read: the result then cannot check it)."""
    import hashlib

    p = Path(path).expanduser()
    try:
        with open(p, "rb") as fh:
            head = fh.read(FINGERPRINT_BYTES)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return {}
    return {"path": printable(p.resolve()), "size": int(size),
            "sha256_head": hashlib.sha256(head).hexdigest(), "head_bytes": FINGERPRINT_BYTES}


def _grid_report(grid: Any) -> dict[str, Any]:
    """The grid's geometry, so a saved result is drawn again without its slide ({} without one)."""
    if grid is None:
        return {}
    return {"shape": [int(v) for v in grid.shape], "origin": [int(v) for v in grid.origin],
            "dimensions": [int(v) for v in grid.dimensions], "lr_patch_px": int(grid.lr_patch_px),
            "patch_px": int(grid.patch_px), "magnification": float(grid.magnification),
            "bounds_offset": [int(v) for v in getattr(grid, "bounds_offset", (0, 0))]}


def neighbour_flags(neighbour: np.ndarray | None, kept: np.ndarray) -> np.ndarray:
    """bool [N] like ``kept``: the patches kept only as a neighbour (all False when None)."""
    if neighbour is None:
        return np.zeros(np.shape(kept), bool)
    neighbour = np.asarray(neighbour, bool)
    if neighbour.shape != np.shape(kept):
        raise ValueError(f"neighbour must be bool {np.shape(kept)} like kept, got {neighbour.shape}")
    return neighbour


def write_patches_h5(path: Path, r: Result) -> None:
    """coords, grid index, LIPN mask, kept, attention and scores per patch; features of the read
    patches with their rows; the region details of a region DMIN. Written atomically."""
    import h5py

    from hdmil.files import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=r.coords.astype(np.int64))
        f.create_dataset("grid_index", data=r.grid_index.astype(np.int64))
        f.create_dataset("lipn_mask", data=r.lipn_mask.astype(bool))
        f.create_dataset("kept", data=r.kept.astype(bool))
        f.create_dataset("kept_as_neighbour", data=r.neighbour)
        f.create_dataset("attention", data=r.attention.astype(np.float32))
        f.create_dataset("scores", data=r.scores.astype(np.float32))
        f.create_dataset("features", data=r.features.astype(np.float32))
        f.create_dataset("feature_index", data=r.feature_index.astype(np.int64))
        f.create_dataset("failed", data=r.failed.astype(np.int64))
        if r.grid is not None and len(r.grid.tissue_fraction) == len(r.coords):
            f.create_dataset("tissue_fraction", data=np.asarray(r.grid.tissue_fraction, np.float32))
        if r.regions is not None:
            r.regions.write_h5(f)
        f.attrs["instances"] = r.instances
        f.attrs["slide"] = printable(r.slide_name)
        f.attrs["classes"] = json.dumps(r.classes)
        f.attrs["use_lipn"] = bool(r.use_lipn)
        f.attrs["patch_size_level0"] = int(r.patch_size_level0)
        f.attrs["mpp"] = float(r.mpp) if r.mpp is not None else math.nan
        f.attrs["encoder"] = r.encoder
        f.attrs["model"] = r.model_name
        f.attrs["model_sha256"] = r.model_sha256


# ---------------------------------------------------------------------------------------------
# reading a saved result back (no model, no encoder: the files hold everything)


class SavedResultError(HDMILError):
    """A results folder, ``report.json`` or ``patches.h5`` that cannot be read back."""


class SlideNotFoundError(SlideError):
    """The slide of a saved result is neither where the report says nor beside the results."""


class SlideChangedError(SlideError):
    """The slide file found for a saved result is not the file the result was made from."""


def result_folder(path: str | os.PathLike) -> Path:
    """The results folder of ``path`` (the folder itself, its ``report.json`` or ``patches.h5``);
    SavedResultError when it holds no complete result (no report, or no patches beside it)."""
    p = Path(path).expanduser()
    folder = p if p.is_dir() else p.parent
    if not p.is_dir() and p.name not in ("report.json", "patches.h5"):
        raise SavedResultError(f"{printable(p)}: not a results file (report.json or patches.h5)")
    for name in ("report.json", "patches.h5"):
        if not (folder / name).is_file():
            raise SavedResultError(f"{printable(folder)}: no {name}, so no complete result to open "
                                   "(hdmil predict or hdmil batch writes report.json and patches.h5)")
    return folder


def read_report(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/report.json`` as a dict; SavedResultError naming the file when it does not parse."""
    path = Path(folder) / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SavedResultError(f"{printable(path)}: cannot be read as a report ({exc})") from exc
    if not isinstance(report, dict) or "classes" not in report or "probabilities" not in report:
        raise SavedResultError(f"{printable(path)}: not an HDMIL report (no classes or probabilities)")
    return report


def slide_candidates(report: dict[str, Any], folder: Path, slide_dirs: tuple = ()) -> list[Path]:
    """Where the slide of a saved result may be, in order: the recorded paths (resolved first),
    then a file of the recorded name beside the results (the folder, its parent and the parent's
    parent: a batch's OUT beside its slides) and in each of ``slide_dirs``."""
    recorded = [(report.get("slide_file") or {}).get("path"), (report.get("run_key") or {}).get("slide"),
                report.get("path")]
    paths = [Path(p).expanduser() for p in recorded if p]
    names = list(dict.fromkeys(p.name for p in paths)) or [f"{report.get('slide', 'slide')}.svs"]
    folder = folder.resolve()
    beside = [*map(Path, slide_dirs), folder, folder.parent, folder.parent.parent]
    out = paths + [d / n for d in beside for n in names]
    return list(dict.fromkeys(out))


def find_slide(report: dict[str, Any], folder: Path, slide_dirs: tuple = ()) -> Path:
    """The first existing candidate (``slide_candidates``) whose file matches the recorded
    fingerprint. SlideNotFoundError listing every place looked at; SlideChangedError when only
    files that differ from the recorded one were found."""
    changed: list[str] = []
    candidates = slide_candidates(report, folder, slide_dirs)
    for path in candidates:
        if not path.is_file():
            continue
        why = fingerprint_mismatch(report.get("slide_file") or {}, path)
        if why is None:
            return path
        changed.append(why)
    if changed:
        raise SlideChangedError(f"{printable(folder)}: the slide file no longer matches the results: "
                                + "; ".join(changed) + " (run hdmil predict on it again)")
    looked = ", ".join(printable(p) for p in candidates)
    raise SlideNotFoundError(f"{printable(folder)}: slide {report.get('slide')!r} not found; looked at "
                             f"{looked} (name the folder that holds it)")


def fingerprint_mismatch(recorded: dict[str, Any], path: Path) -> str | None:
    """Why ``path`` is not the recorded slide file (None: it is, or nothing was recorded)."""
    if not recorded.get("size"):
        return None  # an older report: nothing to check against
    now = slide_fingerprint(path)
    if not now:
        return f"{printable(path)} cannot be read"
    if now["size"] != recorded["size"]:
        return f"{printable(path)} is {now['size']} bytes, the results were made from {recorded['size']}"
    if now["sha256_head"] != recorded.get("sha256_head"):
        return f"{printable(path)} has the recorded size but other content (SHA-256 of its first MiB)"
    return None


def load_result(path: str | os.PathLike, slide_dirs: tuple = (), find: bool = True) -> Result:
    """A saved result (folder, ``report.json`` or ``patches.h5``) as a ``Result``, without any
    model. ``find``: locate the slide (``find_slide``: refused when it changed) and put its path
    in ``slide_path``; else the recorded path is kept as it is."""
    folder = result_folder(path)
    report = read_report(folder)
    slide_path = find_slide(report, folder, tuple(slide_dirs)) if find else report.get("path")
    arrays, attrs = _read_h5(folder / "patches.h5")
    return _result_from(report, arrays, attrs, str(slide_path) if slide_path else None)


_H5_ARRAYS = ("coords", "grid_index", "lipn_mask", "kept", "kept_as_neighbour", "attention", "scores",
              "features", "feature_index", "failed", "tissue_fraction", "region_coords",
              "region_attention", "region_scores", "region_prototype", "patch_region")


def _read_h5(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            arrays = {k: f[k][()] for k in _H5_ARRAYS if k in f}
            attrs = dict(f.attrs)
    except (OSError, KeyError, ValueError) as exc:
        raise SavedResultError(f"{printable(path)}: cannot be read ({' '.join(str(exc).split())})") from exc
    missing = [k for k in _H5_ARRAYS[:4] + ("attention", "scores") if k not in arrays]
    if missing:
        raise SavedResultError(f"{printable(path)}: not an HDMIL patches file (no {', '.join(missing)})")
    return arrays, attrs


def _result_from(report: dict[str, Any], a: dict[str, np.ndarray], attrs: dict[str, Any],
                 slide_path: str | None) -> Result:
    classes = list(report["classes"])
    n = len(a["coords"])
    res = Result(
        slide_name=str(report.get("slide") or ""), slide_path=slide_path, classes=classes,
        probabilities=np.asarray(report["probabilities"], np.float32),
        prediction_index=int(report.get("prediction_index", int(np.argmax(report["probabilities"])))),
        coords=a["coords"].astype(np.int64).reshape(-1, 2), grid_index=a["grid_index"].astype(np.int64).reshape(-1, 2),
        lipn_mask=a["lipn_mask"].astype(bool).reshape(n, -1), kept=a["kept"].astype(bool),
        neighbour=a.get("kept_as_neighbour"), attention=a["attention"].astype(np.float32),
        scores=a["scores"].astype(np.float32),
        features=a.get("features", np.zeros((0, 0), np.float32)).astype(np.float32),
        feature_index=a.get("feature_index", np.zeros(0, np.int64)).astype(np.int64),
        failed=a.get("failed", np.zeros(0, np.int64)).astype(np.int64),
        use_lipn=bool(report.get("use_lipn", True)), timings=dict(report.get("timings") or {}),
        errors=list(report.get("errors") or []), mpp=report.get("mpp"), mpp_source=report.get("mpp_source"),
        patch_size_level0=int(report.get("patch_size_level0") or attrs.get("patch_size_level0", 0)),
        model_name=str((report.get("model") or {}).get("name", "")),
        model_sha256=str((report.get("model") or {}).get("sha256", "")),
        encoder=str(report.get("encoder", "")), reading=dict(report.get("reading") or {}),
        regions=_regions_from(a, attrs), run_key=dict(report.get("run_key") or {}),
        slide_file=dict(report.get("slide_file") or {}), roi=report.get("roi"),
        blocks={k: report[k] for k in REPORT_BLOCKS if report.get(k) is not None},
    )
    res.grid = saved_grid(res, report.get("grid") or {}, a.get("tissue_fraction"))
    return res


def _regions_from(a: dict[str, np.ndarray], attrs: dict[str, Any]) -> RegionDetails | None:
    if "region_coords" not in a:
        return None
    return RegionDetails(
        coords=a["region_coords"].astype(np.int64), attention=a["region_attention"].astype(np.float32),
        scores=a["region_scores"].astype(np.float32), prototype=a["region_prototype"].astype(np.int64),
        patch_region=a["patch_region"].astype(np.int64), size_level0=int(attrs.get("region_size_level0", 0)),
        slpd_name=str(attrs.get("slpd", "")))


def saved_grid(res: Result, info: dict[str, Any], tissue_fraction: np.ndarray | None) -> Any:
    """The PatchGrid of a saved result: its geometry from the report (older reports: the smallest
    grid holding every patch), no LR image or tissue mask (zeros: nothing is read to draw it)."""
    from hdmil.grid import PatchGrid

    index = res.grid_index
    fit = tuple(int(v) + 1 for v in index.max(axis=0)) if len(index) else (0, 0)
    rows, cols = (int(v) for v in info.get("shape", fit))
    lr = int(info.get("lr_patch_px", 16))
    ps0 = int(res.patch_size_level0)
    return PatchGrid(
        coords=res.coords, index=index, shape=(rows, cols), patch_size_level0=ps0,
        mpp=float(res.mpp) if res.mpp else float("nan"),
        tissue_fraction=(np.asarray(tissue_fraction, np.float32) if tissue_fraction is not None
                         else np.full(res.n_patches, np.nan, np.float32)),
        mask=np.zeros((rows * lr, cols * lr), bool), lr_image=np.zeros((rows * lr, cols * lr, 3), np.uint8),
        message=f"{res.n_patches} patches of a saved result", lr_patch_px=lr,
        patch_px=int(info.get("patch_px", 256)), magnification=float(info.get("magnification", 20.0)),
        origin=tuple(info.get("origin", (0, 0))), dimensions=tuple(info.get("dimensions", (cols * ps0, rows * ps0))),
        slide_name=res.slide_name, bounds_offset=tuple(int(v) for v in info.get("bounds_offset", (0, 0))),
    )
