"""An encoder's recipe: what rebuilds exactly the encoder that made a set of features.

Features are only as meaningful as the weights that made them: a DMIN trained on the features of
a local weights file and run with random weights of the same architecture predicts noise. So
``hdmil features`` writes the recipe into each feature file (``encoder_recipe``), training copies
it into the checkpoint, and ``hdmil predict`` rebuilds exactly that encoder or refuses.

A recipe is plain JSON::

    {"name": "resnet18_trunc",      # registered / timm architecture
     "weights": "file",             # "random" (seeded) | "pretrained" (hub) | "file" | "unknown"
     "hub_id": null,                # the hub model for "pretrained", when known
     "file": "enc.safetensors",     # "file": its name, SHA-256 and where it was when used
     "sha256": "…", "path": "/data/enc.safetensors",
     "kwargs": {}, "dim": 256, "source": "hdmil",   # source: who wrote the features
     "stain": {"method": "macenko", "params": {…}}} # stain normalisation before the encoder

``stain`` is the fitted normaliser (``hdmil.features.stain``: its parameters, not an image path);
recipes without it (older files, peers' files) mean patches went to the encoder as read.

TRIDENT writes its encoder's name on the ``features`` dataset (``encoder="uni_v1"``);
``recipe_from_attrs`` maps its names onto ours and the hub models TRIDENT loads.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hdmil.features.encoders import EncoderError

__all__ = ["TRIDENT_ENCODERS", "EncoderRecipe", "build_from_recipe", "recipe_from_attrs", "recipe_of"]

WEIGHTS = ("random", "pretrained", "file", "unknown")

# TRIDENT's patch encoder names (trident/patch_encoder_models/load.py) -> (our name, hub id)
TRIDENT_ENCODERS: dict[str, tuple[str, str]] = {
    "resnet50": ("resnet50_trunc", "timm/resnet50.tv_in1k"),
    "uni_v1": ("uni", "hf-hub:MahmoodLab/uni"),
    "uni_v2": ("uni2-h", "hf-hub:MahmoodLab/UNI2-h"),
    "virchow": ("virchow", "hf-hub:paige-ai/Virchow"),
    "virchow2": ("virchow2", "hf-hub:paige-ai/Virchow2"),
    "hoptimus0": ("h-optimus-0", "hf-hub:bioptimus/H-optimus-0"),
    "hoptimus1": ("h-optimus-1", "hf-hub:bioptimus/H-optimus-1"),
    "gigapath": ("gigapath", "hf_hub:prov-gigapath/prov-gigapath"),
    "phikon_v2": ("phikon-v2", "owkin/phikon-v2"),
    "conch_v15": ("conch-v1.5", "hf_hub:MahmoodLab/conchv1_5"),
}


@dataclass(frozen=True)
class EncoderRecipe:
    """How to rebuild one encoder: architecture, its kwargs and where its weights come from."""

    name: str
    weights: str = "unknown"
    hub_id: str | None = None
    file: str | None = None
    sha256: str | None = None
    path: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    dim: int | None = None
    source: str = "hdmil"
    stain: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.name or self.weights not in WEIGHTS:
            raise EncoderError(
                f"encoder recipe {self.name!r}: weights must be one of {WEIGHTS}, not {self.weights!r}"
            )
        if self.weights == "file" and not (self.file and self.sha256):
            raise EncoderError(f"encoder recipe {self.name!r}: a weights file needs its name and SHA-256")
        if self.stain is not None:  # refused when read, not when a slide is normalised
            object.__setattr__(self, "stain", self.stain_normalizer().to_dict())

    def stain_normalizer(self) -> Any:
        """The recorded ``StainNormalizer``, or None (patches went to the encoder as read)."""
        from hdmil.features.stain import StainNormalizer

        return None if self.stain is None else StainNormalizer.from_dict(self.stain)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> EncoderRecipe:
        """From ``to_dict``'s output (or its JSON); EncoderError when it is not a recipe."""
        try:
            d = json.loads(d) if isinstance(d, (str, bytes)) else dict(d)
            known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            recipe = cls(**known)
        except (TypeError, ValueError) as exc:
            raise EncoderError(f"not an encoder recipe ({exc})") from exc
        if recipe.dim is not None:
            object.__setattr__(recipe, "dim", int(recipe.dim))
        return recipe

    def describe(self) -> str:
        """One phrase: ``resnet18_trunc (weights enc.safetensors, sha256 1a2b3c4d5e6f)``, with
        ``, macenko stain normalisation`` when it has one."""
        stain = f", {self.stain['method']} stain normalisation" if self.stain else ""
        if self.weights == "file":
            return f"{self.name} (weights {self.file}, sha256 {str(self.sha256)[:12]}{stain})"
        if self.weights == "pretrained":
            return f"{self.name} (pretrained{f', {self.hub_id}' if self.hub_id else ''}{stain})"
        return f"{self.name} ({self.weights} weights{stain})"

    def same_encoder(self, other: EncoderRecipe | None) -> bool:
        """Whether two recipes give the same features (where the file lies does not matter)."""
        if other is None:
            return False
        return _identity(self) == _identity(other)


def _identity(r: EncoderRecipe) -> tuple:
    stain = r.stain_normalizer()  # method and parameters; what it was fitted on does not count
    stain_key = None if stain is None else json.dumps([stain.method, stain.params], sort_keys=True)
    return (r.name, r.weights, r.sha256, r.hub_id, json.dumps(r.kwargs, sort_keys=True), stain_key)


def _sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256, hashed once per (path, size, mtime): a 4 GB encoder is not re-read
    for every slide whose features it makes."""
    st = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    from hdmil.checkpoint import file_sha256

    return file_sha256(path)


def recipe_of(encoder: Any) -> EncoderRecipe:
    """The recipe of an encoder ``create_encoder`` built (its ``name``, ``weights``, ``dim``),
    with the stain normaliser of a ``StainedEncoder``.

    ``encoder.weights`` says where the weights came from: ``"pretrained"``, ``"random (seeded)"``,
    a file path, or ``"given"`` (a module built by hand: unknown).
    """
    from hdmil.features.stain import StainedEncoder

    if isinstance(encoder, StainedEncoder):
        return dataclasses.replace(recipe_of(encoder.encoder), stain=encoder.stain.to_dict())
    weights, name = str(encoder.weights), str(encoder.name)
    if weights == "pretrained":
        # a named encoder (hdmil.features.zoo) knows its hub repository; a timm name may be one
        hub = getattr(encoder, "hub_id", None) or (
            name if name.startswith(("hf-hub:", "hf_hub:")) else None)
        return EncoderRecipe(name, "pretrained", hub_id=hub, dim=int(encoder.dim))
    if weights.startswith("random"):
        return EncoderRecipe(name, "random", dim=int(encoder.dim))
    path = Path(weights)
    if path.is_file():
        return EncoderRecipe(name, "file", file=path.name, sha256=_sha256(path),
                             path=str(path.resolve()), dim=int(encoder.dim))
    return EncoderRecipe(name, "unknown", dim=int(encoder.dim))


def recipe_from_attrs(attrs: dict[str, Any]) -> EncoderRecipe | None:
    """The encoder recipe a feature file's attributes record; None when they name no encoder.

    Ours: ``encoder_recipe`` (JSON). TRIDENT's: ``encoder`` on ``features`` (a TRIDENT name,
    mapped by ``TRIDENT_ENCODERS``). Anything else naming only an ``encoder``: weights unknown.
    """
    raw = attrs.get("encoder_recipe")
    if raw:
        return EncoderRecipe.from_dict(raw)
    name = attrs.get("encoder")
    if not name:
        return None
    name, dim = str(name), attrs.get("dim")
    dim = int(dim) if dim is not None else None
    if name in TRIDENT_ENCODERS:
        ours, hub = TRIDENT_ENCODERS[name]
        return EncoderRecipe(ours, "pretrained", hub_id=hub, dim=dim, source="trident")
    return EncoderRecipe(name, "unknown", dim=dim, source=str(attrs.get("features_from") or "unknown"))


def _locate(recipe: EncoderRecipe, search: list[Path], where: str) -> Path:
    """The recipe's weights file: by name in ``search`` folders, then where it was when used;
    only a file whose SHA-256 is the recorded one counts."""
    candidates = [d / str(recipe.file) for d in search]
    if recipe.path:
        candidates.append(Path(recipe.path))
    wrong = []
    for path in candidates:
        if path.is_file():
            if _sha256(path) == str(recipe.sha256).lower():
                return path
            wrong.append(str(path))
    looked = ", ".join(str(p) for p in candidates)
    verb = "has" if len(wrong) == 1 else "have"
    why = f"{', '.join(wrong)} {verb} another SHA-256" if wrong else "not found"
    raise EncoderError(
        f"{where}: encoder {recipe.describe()}: weights file {why} (looked at {looked}); "
        "put the file beside the checkpoint or pass --encoder FILE"
    )


def build_from_recipe(recipe: EncoderRecipe, device: Any = None, search: list[Path] | None = None,
                      where: str = "checkpoint") -> Any:
    """Exactly the encoder the recipe describes, or EncoderError (never other weights); with the
    recorded stain normalisation applied before it (a ``StainedEncoder``) when there is one."""
    from hdmil.features.stain import with_stain

    return with_stain(_build_encoder(recipe, device, search, where), recipe.stain_normalizer())


def _build_encoder(recipe: EncoderRecipe, device: Any, search: list[Path] | None, where: str) -> Any:
    from hdmil.features.encoders import create_encoder

    extra = _kwargs_arg(recipe, where)
    if recipe.weights == "unknown":
        raise EncoderError(
            f"{where}: the features it was trained on name encoder {recipe.name!r} but not its "
            "weights; pass the encoder that made them (--encoder NAME|FILE)"
        )
    if recipe.weights == "file":
        path = _locate(recipe, list(search or []), where)
        encoder = create_encoder(recipe.name, weights=path, device=device, **extra)
    else:
        encoder = create_encoder(recipe.name, pretrained=recipe.weights == "pretrained",
                                 device=device, **extra)
    if recipe.dim is not None and int(encoder.dim) != int(recipe.dim):
        raise EncoderError(
            f"{where}: encoder {recipe.describe()} now gives {encoder.dim}-d features, "
            f"the recorded ones are {recipe.dim}-d"
        )
    return encoder


def _kwargs_arg(recipe: EncoderRecipe, where: str) -> dict[str, Any]:
    """``{"kwargs": ...}`` for create_encoder when the recipe has any (and it takes them)."""
    from hdmil.features.encoders import create_encoder

    if not recipe.kwargs:
        return {}
    if "kwargs" not in inspect.signature(create_encoder).parameters:
        raise EncoderError(f"{where}: encoder {recipe.name!r} was built with {recipe.kwargs}, "
                           "which this hdmil cannot pass on")
    return {"kwargs": dict(recipe.kwargs)}
