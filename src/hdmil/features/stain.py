"""Stain normalisation of HR patches before the encoder: Macenko or Reinhard, via torchstain.

A normaliser is its fitted target, as numbers: Macenko's H&E stain matrix [3, 2] and its 99th
percentile stain concentrations [2], or Reinhard's LAB channel means and standard deviations [3].
Those numbers (never the target image's path) go into the feature file's encoder recipe and so
into the checkpoint (``hdmil.features.recipe``), and ``hdmil predict`` normalises its patches with
exactly them: a model never sees patches prepared otherwise than the ones it was trained on.

>>> stain = StainNormalizer.fit("macenko", target_rgb)    # uint8 (H, W, 3)
>>> encoder = with_stain(create_encoder("uni"), stain)    # embed() normalises first
>>> out, n_background = stain.normalize(patches)           # uint8 [B, H, W, 3]

Background patches (glass, a few stained pixels) carry no stain to estimate: Macenko's eigen
decomposition fails on them and Reinhard would stretch the noise of white glass into colour. Such
patches go to the encoder unchanged; ``normalize`` counts them and feature files record the count
(``stain_fallbacks``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import CheckpointError
from hdmil.features.encoders import EncoderError

__all__ = [
    "METHODS", "StainError", "StainNormalizer", "StainedEncoder", "check_feature_stain", "check_same_stain",
    "check_stain", "load_stain_target", "stain_of", "with_stain",
]

METHODS = ("macenko", "reinhard")
# Macenko's constants (torchstain's defaults, as in Macenko et al. 2009): transmitted light,
# the percentile of the stain angles, the optical density below which a pixel is glass.
IO, ALPHA, BETA = 240, 1, 0.15
# A patch with fewer stained pixels than this share is background: normalised, it is noise.
MIN_STAINED_SHARE = 0.01
# A target image is a region of a slide, not a whole slide (fitting reads it into memory).
MAX_TARGET_PIXELS = 64 * 2**20
_SHAPES = {"macenko": {"stain_matrix": (3, 2), "max_concentration": (2,)},
           "reinhard": {"means": (3,), "stds": (3,)}}


class StainError(EncoderError):
    """A stain target or recorded normaliser that cannot be used."""


@dataclass(frozen=True)
class StainNormalizer:
    """A fitted stain normaliser: ``method`` and its target ``params`` (plain lists of floats);
    ``fitted_on`` names what it was fitted on (for people: not part of its identity)."""

    method: str
    params: dict[str, Any]
    fitted_on: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise StainError(f"stain normalisation must be one of {', '.join(METHODS)}, not {self.method!r}")
        clean = {}
        for key, shape in _SHAPES[self.method].items():
            try:
                value = np.asarray(self.params[key], dtype=np.float64)
            except (KeyError, TypeError, ValueError) as exc:
                raise StainError(f"{self.method} stain target: no usable {key!r} ({exc})") from None
            if value.shape != shape or not np.isfinite(value).all():
                raise StainError(f"{self.method} stain target: {key!r} must be {shape} finite numbers, "
                                 f"got {value.shape}")
            clean[key] = value.tolist()
        object.__setattr__(self, "params", clean)

    @classmethod
    def fit(cls, method: str, image: np.ndarray, fitted_on: str | None = None,
            where: str | None = None) -> StainNormalizer:
        """Fit ``method`` to a target image, uint8 (H, W, 3) RGB; StainError (naming ``where``)
        when it shows no stain."""
        rgb = _rgb(image)
        if method not in METHODS:
            cls(method, {})  # the one error message for an unknown method
        where = where or fitted_on or "the stain target"
        if _stained_share(rgb) < MIN_STAINED_SHARE:
            raise StainError(f"{where}: the image is background (under {MIN_STAINED_SHARE:.0%} of it "
                             "is stained); pick a region of well-stained tissue")
        norm = _torchstain(method)
        try:
            with _quiet():
                if method == "macenko":
                    norm.fit(rgb, Io=IO, alpha=ALPHA, beta=BETA)
                else:
                    norm.fit(rgb)
        except (np.linalg.LinAlgError, ValueError, IndexError, FloatingPointError) as exc:
            raise StainError(f"{where}: cannot fit {method} stain normalisation ({exc})") from None
        if method == "macenko":
            params = {"stain_matrix": norm.HERef, "max_concentration": norm.maxCRef}
        else:
            params = {"means": norm.target_means, "stds": norm.target_stds}
        return cls(method, params, fitted_on)

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "params": self.params}
        return {**out, "fitted_on": self.fitted_on} if self.fitted_on else out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainNormalizer:
        if not isinstance(d, dict) or "method" not in d:
            raise StainError(f"not a recorded stain normaliser: {str(d)[:80]!r}")
        return cls(str(d["method"]), dict(d.get("params") or {}), d.get("fitted_on"))

    def describe(self) -> str:
        """``macenko (fitted on target.png)``."""
        return f"{self.method}{f' (fitted on {self.fitted_on})' if self.fitted_on else ''}"

    def normalize(self, patches: np.ndarray) -> tuple[np.ndarray, int]:
        """uint8 [B, H, W, 3] -> (normalised uint8 [B, H, W, 3], how many were background and
        passed through unchanged)."""
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
            raise ValueError(f"patches must be uint8 [B, H, W, 3], got {patches.dtype} {patches.shape}")
        norm = self._normaliser()
        out = patches.copy()
        fallbacks = 0
        for i, patch in enumerate(patches):
            done = self._one(norm, patch)
            if done is None:
                fallbacks += 1
            else:
                out[i] = done
        return out, fallbacks

    def _normaliser(self) -> Any:
        norm = _torchstain(self.method)
        p = self.params
        if self.method == "macenko":
            norm.HERef, norm.maxCRef = np.asarray(p["stain_matrix"]), np.asarray(p["max_concentration"])
        else:
            norm.target_means, norm.target_stds = np.asarray(p["means"]), np.asarray(p["stds"])
        return norm

    def _one(self, norm: Any, patch: np.ndarray) -> np.ndarray | None:
        """One patch normalised, or None where it is background or the method fails on it."""
        if _stained_share(patch) < MIN_STAINED_SHARE:
            return None
        try:
            with _quiet():
                if self.method == "macenko":
                    return norm.normalize(patch, Io=IO, alpha=ALPHA, beta=BETA, stains=False)[0]
                if min(float(np.std(c)) for c in _lab_channels(patch)) < 1e-3:
                    return None  # one flat LAB channel: Reinhard divides by its zero spread
                return norm.normalize(patch)
        except (np.linalg.LinAlgError, ValueError, IndexError, FloatingPointError):
            return None


class StainedEncoder:
    """An encoder whose ``embed`` stain-normalises its patches first; every other attribute
    (``dim``, ``name``, ``weights``, ``device`` …) is the wrapped encoder's. ``fallbacks``
    counts the background patches it passed through unchanged."""

    def __init__(self, encoder: Any, stain: StainNormalizer) -> None:
        self.__dict__.update(encoder=encoder, stain=stain, fallbacks=0)

    def embed(self, patches: Any) -> Any:
        """uint8 [B, H, W, 3] -> the wrapped encoder's features of the normalised patches."""
        if hasattr(patches, "detach"):  # a tensor
            patches = patches.detach().cpu().numpy()
        normed, n = self.stain.normalize(np.asarray(patches, dtype=np.uint8))
        self.__dict__["fallbacks"] += n
        return self.encoder.embed(normed)

    def __getattr__(self, name: str) -> Any:
        encoder = self.__dict__.get("encoder")
        if encoder is None:
            raise AttributeError(name)
        return getattr(encoder, name)

    def __repr__(self) -> str:
        return f"StainedEncoder({self.encoder!r}, {self.stain.describe()})"


def with_stain(encoder: Any, stain: StainNormalizer | None) -> Any:
    """``encoder`` normalising with ``stain`` first (``stain`` None: the encoder as it is)."""
    if stain is None:
        return encoder
    if isinstance(encoder, StainedEncoder):
        encoder = encoder.encoder
    return StainedEncoder(encoder, stain)


def stain_of(encoder: Any) -> StainNormalizer | None:
    """The normaliser an encoder applies, or None."""
    return encoder.stain if isinstance(encoder, StainedEncoder) else None


def check_stain(recipe: Any, encoder: Any, where: str) -> None:
    """CheckpointError unless ``encoder`` normalises stain exactly as the model's recorded
    ``recipe`` (an ``EncoderRecipe`` or None) says its training features were made."""
    want = recipe.stain_normalizer() if recipe is not None else None
    have = stain_of(encoder)
    if want == have:  # method and parameters; what they were fitted on does not count
        return
    trained = f"{want.describe()} stain-normalised patches" if want else "patches as read (no stain normalisation)"
    given = f"applies {have.describe()}" if have else "applies no stain normalisation"
    if want and have and want.method == have.method:
        given = f"applies {have.method} fitted to another target"
    raise CheckpointError(
        f"{where}: its DMIN was trained on features of {trained}, but the encoder given {given}; "
        "refused (let the checkpoint's recipe build its encoder)"
    )


def check_feature_stain(model_recipe: dict[str, Any] | None, attrs: dict[str, Any], where: str) -> None:
    """CheckpointError unless a feature file (its ``attrs``) was made with the stain handling the
    model's recorded encoder recipe (``config["encoder_recipe"]``, None: none recorded) names."""
    from hdmil.features.recipe import EncoderRecipe, recipe_from_attrs

    want = EncoderRecipe.from_dict(model_recipe).stain_normalizer() if model_recipe else None
    made = recipe_from_attrs(attrs)
    have = made.stain_normalizer() if made is not None else None
    if want == have:
        return

    def words(s: StainNormalizer | None) -> str:
        return f"{s.describe()} stain-normalised patches" if s else "patches as read (no stain normalisation)"

    raise CheckpointError(f"{where}: the model was trained on features of {words(want)}, these "
                          f"features are of {words(have)}; refused")


def check_same_stain(files: dict[str, Path]) -> None:
    """FeatureFileError unless every feature file (slide id -> path) was made with the same stain
    handling: a model trained on a mix would record only the first file's. Reads attributes only."""
    from hdmil.errors import FeatureFileError

    first: tuple[Path, StainNormalizer | None] | None = None
    for path in files.values():
        stain = _file_stain(Path(path))
        if first is None:
            first = (Path(path), stain)
        elif stain != first[1]:
            def words(s: StainNormalizer | None) -> str:
                return f"{s.describe()} stain normalisation" if s else "no stain normalisation"

            raise FeatureFileError(
                f"{path}: made with {words(stain)}, but {first[0]} with {words(first[1])}; "
                "make every slide's features the same way (hdmil features --stain ...)")


def _file_stain(path: Path) -> StainNormalizer | None:
    """The stain normaliser a feature file's recorded encoder recipe names (None: none)."""
    import json

    if path.suffix.lower() not in (".h5", ".hdf5"):
        return None
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("encoder_recipe")
    except OSError:
        return None  # unreadable: reading its features says so
    raw = raw.decode() if isinstance(raw, bytes) else raw
    try:
        stain = json.loads(raw).get("stain") if raw else None
    except (ValueError, AttributeError):
        return None  # not a recipe: reading the file's encoder says so
    return StainNormalizer.from_dict(stain) if stain else None


def load_stain_target(method: str, path: str | Path) -> StainNormalizer:
    """``--stain METHOD --stain-target PATH``: fit to an image (PNG, JPEG, TIFF), or reuse a
    normaliser recorded as JSON (``StainNormalizer.to_dict``, or a recipe holding one)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise StainError(f"{path}: stain target not found")
    if path.suffix.lower() == ".json":
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StainError(f"{path}: not a readable JSON stain target ({exc})") from None
        stain = StainNormalizer.from_dict(d.get("stain", d) if isinstance(d, dict) else d)
        if stain.method != method:
            raise StainError(f"{path}: records {stain.method} stain normalisation, not {method}")
        return stain
    return StainNormalizer.fit(method, _read_image(path), fitted_on=path.name, where=str(path))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_TARGET_PIXELS:
                raise StainError(f"{path}: the stain target is {im.width} x {im.height} px; use a "
                                 f"region of at most {MAX_TARGET_PIXELS // 2**20} MP")
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise StainError(f"{path}: not a readable image ({exc})") from None


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3 or image.dtype != np.uint8 or image.size == 0:
        raise StainError(f"a stain target must be a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image[..., :3])


def _stained_share(rgb: np.ndarray) -> float:
    """The share of pixels Macenko counts as stained: optical density >= BETA in every channel."""
    od = -np.log((rgb.reshape(-1, 3).astype(np.float32) + 1.0) / IO)
    return float((od >= BETA).all(axis=1).mean()) if od.size else 0.0


def _lab_channels(patch: np.ndarray) -> list[np.ndarray]:
    from torchstain.numpy.utils import lab_split, rgb2lab

    return list(lab_split(rgb2lab(patch.astype(np.float32) / 255)))


def _torchstain(method: str) -> Any:
    try:
        import torchstain
    except ImportError:
        raise StainError("stain normalisation needs torchstain: pip install 'napari-hdmil[stain]'") from None
    if method == "macenko":
        return torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    return torchstain.normalizers.ReinhardNormalizer(backend="numpy")


class _quiet(warnings.catch_warnings):
    """Degenerate patches (one flat colour: no stain plane to find) raise instead of giving NaN
    cast to garbage colours, so the fallback takes them; numpy's other warnings are not shown."""

    def __enter__(self) -> Any:
        out = super().__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)
        self._err = np.seterr(divide="raise", invalid="raise", over="ignore", under="ignore")
        return out

    def __exit__(self, *exc: Any) -> Any:
        np.seterr(**self._err)
        return super().__exit__(*exc)
