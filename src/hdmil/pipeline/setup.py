"""What a run needs besides the checkpoint: its encoder, the SLPD model of a region DMIN, and the
checks that they fit together. Done once per run of many slides, not per slide."""

from __future__ import annotations

import importlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from hdmil.errors import CheckpointError, HDMILError

__all__ = [
    "EncoderBuild", "check_model", "check_slpd_dims", "encoder_for", "encoder_key", "encoder_override",
    "encoder_weights_path", "fit_encoder", "import_slide_stack", "instances_of", "lipn_applies",
    "recorded_recipe", "slpd_for", "slpd_label", "start_encoder", "warm_up",
]

# What the first slide of a process imports besides torch (reading, tissue, writing): imported by
# ``warm_up`` so that start-up stays out of the first slide's stage seconds.
SLIDE_STACK = ("tiffslide", "scipy.ndimage", "skimage.filters.rank", "h5py", "hdmil.grid",
               "hdmil.reading", "hdmil.annotations")


def check_model(model: Any, use_lipn: bool, need_dmin: bool = True) -> None:
    """CheckpointError unless the model has the DMIN (and the LIPN) the run needs."""
    if need_dmin and model.dmin is None:
        raise CheckpointError(f"{model.path}: the checkpoint has no DMIN; it cannot classify slides")
    if use_lipn and model.lipn is None:
        raise CheckpointError(
            f"{model.path}: the checkpoint has no LIPN, so hierarchical inference is not possible; "
            "run HDMIL† over all patches instead (use_lipn=False, --no-lipn)"
        )


def instances_of(model: Any) -> str:
    """``"patch"`` or ``"region"``: what the checkpoint's DMIN was trained to pool."""
    return model.instances


def lipn_applies(model: Any, use_lipn: bool = True) -> bool:
    """Whether a run asked for ``use_lipn`` screens with LIPN: not for a DMIN of SLPD regions,
    which reads every patch (LIPN screens patches, not regions)."""
    return bool(use_lipn) and model.instances != "region"


def encoder_for(model: Any, device: Any, override: str | os.PathLike | None = None) -> Any:
    """The encoder the checkpoint's DMIN was trained on.

    ``override`` (``--encoder NAME|FILE``): that encoder instead, checked against the recorded
    name and width (``encoder_override``). Else, a config with an ``encoder_recipe`` (recorded
    by ``train-dmin`` from the feature files) gets exactly that encoder rebuilt, or a
    CheckpointError saying what is missing: never other weights. Older configs name the
    architecture (``encoder``) and maybe a weights file (``encoder_weights``, see
    ``encoder_weights_path``), built as before; a missing file is an error.
    """
    from hdmil.features import create_encoder

    if override is not None:
        return encoder_override(model, override, device)
    ckpt, name, weights = model.path, model.encoder, model.encoder_weights
    if model.config.get("encoder_recipe") and not weights:
        return _from_recipe(model, device)
    if not name:
        raise CheckpointError(
            f"{ckpt}: the checkpoint does not name the encoder its DMIN was trained on (CLAM's "
            "feature files record none); pass the encoder that made them (--encoder NAME|FILE)"
        )
    try:
        if weights:
            path = encoder_weights_path(model)
            return create_encoder(name, weights=path, device=device)
        return create_encoder(name, pretrained=model.encoder_pretrained, device=device)
    except CheckpointError:
        raise
    except HDMILError as exc:
        raise CheckpointError(f"{ckpt}: encoder {name!r}: {exc}") from exc


def encoder_key(model: Any) -> str:
    """What decides which encoder ``encoder_for`` builds for ``model``, as one string: models
    with equal keys share an encoder (a cache key), models with other weights never do."""
    from hdmil.files import dumps

    keys = ("encoder", "encoder_pretrained", "encoder_weights", "encoder_weights_sha256", "encoder_recipe")
    return dumps({k: model.config.get(k) for k in keys}, sort_keys=True)


def recorded_recipe(model: Any) -> Any:
    """The checkpoint's ``EncoderRecipe``, or None (older checkpoints, CLAM features)."""
    from hdmil.features.recipe import EncoderRecipe

    raw = model.config.get("encoder_recipe")
    if not raw:
        return None
    try:
        return EncoderRecipe.from_dict(raw)
    except HDMILError as exc:
        raise CheckpointError(f"{model.path}: {exc}") from exc


def _from_recipe(model: Any, device: Any) -> Any:
    """Exactly the recorded encoder; its weights file is looked for beside the checkpoint, then
    where it was when the features were made, and only with the recorded SHA-256."""
    from hdmil.features.recipe import build_from_recipe

    recipe = recorded_recipe(model)
    try:
        return build_from_recipe(recipe, device, search=[Path(str(model.path)).parent], where=str(model.path))
    except CheckpointError:
        raise
    except HDMILError as exc:
        msg = str(exc)
        if not msg.startswith(str(model.path)):
            msg = (f"{model.path}: cannot rebuild its encoder {recipe.describe()} ({msg}); "
                   "pass the encoder that made its features (--encoder NAME|FILE)")
        raise CheckpointError(msg) from exc


def _build_override(spec: str, recorded: str | None, device: Any) -> Any:
    """``--encoder``: a weights file (its metadata's architecture, else the recorded one), or a
    name built with its pretrained weights (never random)."""
    from hdmil.features.encoders import WEIGHT_SUFFIXES, EncoderError, create_encoder

    if Path(spec).is_file() or spec.lower().endswith(WEIGHT_SUFFIXES):
        try:
            return create_encoder(spec, device=device)
        except EncoderError as exc:
            if not recorded or "cannot tell which architecture" not in str(exc):
                raise
            return create_encoder(spec, arch=recorded, device=device)
    return create_encoder(spec, pretrained=True, device=device)


def encoder_override(model: Any, spec: str | os.PathLike, device: Any) -> Any:
    """The encoder ``--encoder NAME|FILE`` names, refused (CheckpointError) when its width is not
    the DMIN's or its architecture is not the one the checkpoint records (when it records one
    whose weights are known)."""
    recipe = recorded_recipe(model)
    recorded = recipe.name if recipe is not None else model.encoder
    try:
        encoder = _build_override(str(spec), recorded, device)
    except HDMILError as exc:
        raise CheckpointError(f"--encoder {spec}: {exc}") from exc
    known = recipe is not None and recipe.weights != "unknown"
    if known and encoder.name != recipe.name:
        raise CheckpointError(
            f"--encoder {spec}: it is encoder {encoder.name!r}, but the DMIN in {model.path} was "
            f"trained on features of {recipe.describe()}; refused"
        )
    want = recipe.dim if recipe is not None and recipe.dim else None
    if model.instances == "patch":
        want = model.feature_dim or want
    if want is not None and int(encoder.dim) != int(want):
        raise CheckpointError(
            f"--encoder {spec}: it gives {encoder.dim}-d features, but the DMIN in {model.path} "
            f"was trained on {want}-d ones ({recorded or 'encoder not recorded'}); refused"
        )
    from hdmil.features.stain import with_stain  # the recorded stain normalisation, as trained

    return with_stain(encoder, recipe.stain_normalizer() if recipe is not None else None)


def encoder_weights_path(model: Any) -> Path:
    """The encoder weights file a checkpoint names, checked before anything opens it.

    ``encoder_weights`` must be a plain file name, resolved beside the checkpoint: a config is
    data from the file, and must not make us read ``/etc/passwd`` or ``../../x``. A path (absolute,
    with a separator or ``..``) is accepted only when the config also records the file's SHA-256
    (``encoder_weights_sha256``) and the file matches it. A recorded hash is checked either way.
    """
    from hdmil.checkpoint import file_sha256

    ckpt, weights = model.path, str(model.encoder_weights)
    expected = str(model.config.get("encoder_weights_sha256") or "").lower()
    plain = weights not in ("", ".", "..") and Path(weights).name == weights and "\\" not in weights
    if not plain and not expected:
        raise CheckpointError(
            f"{ckpt}: the encoder weights it names ({weights!r}) must be a plain file name beside "
            "the checkpoint (no folder, no '..'), or come with encoder_weights_sha256; refused"
        )
    path = Path(weights) if Path(weights).is_absolute() else Path(str(ckpt)).parent / weights
    if not path.is_file():
        where = "beside it at" if plain else "at"
        raise CheckpointError(
            f"{ckpt}: the encoder weights it names ({weights}) are not {where} {path}"
        )
    if expected and file_sha256(path) != expected:
        raise CheckpointError(
            f"{ckpt}: the encoder weights at {path} do not match the SHA-256 the checkpoint "
            f"records ({expected[:12]}...); refused"
        )
    return path


def _named_slpd_path(model: Any) -> Path:
    """The SLPD checkpoint a region DMIN's config names, resolved beside the DMIN's file."""
    ckpt, name = model.path, model.slpd_checkpoint
    if not name:
        raise CheckpointError(
            f"{ckpt}: its DMIN pools SLPD region embeddings but the checkpoint names no SLPD "
            "model; pass it (slpd=..., --slpd CKPT)"
        )
    path = Path(str(name)) if Path(str(name)).is_absolute() else Path(str(ckpt)).parent / str(name)
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt}: its DMIN pools SLPD region embeddings of {name}, which is not beside it "
            f"at {path}; pass the SLPD checkpoint (slpd=..., --slpd CKPT)"
        )
    return path


def slpd_for(model: Any, slpd: Any = None) -> Any:
    """The SLPD model that embeds regions for a region DMIN: ``slpd`` itself when it is a loaded
    model, loaded from it when it is a path, else the checkpoint the config names, beside it.
    A model loaded here carries its file as ``.path``."""
    from hdmil.checkpoint import load_slpd

    if slpd is not None and not isinstance(slpd, (str, os.PathLike)):
        return slpd
    path = _named_slpd_path(model) if slpd is None else Path(slpd)
    loaded = load_slpd(path)
    loaded.path = str(path)
    return loaded


def slpd_label(slpd: Any) -> str:
    """Where an SLPD model came from (its ``.path`` when ``slpd_for`` loaded it), for messages."""
    # an SLPD module is not a checkpoint object: slpd_for tags the one it loads with its file
    path = getattr(slpd, "path", None)
    return str(path) if path else ""


def fit_encoder(model: Any, encoder: Any, slpd: Any = None, source: str | None = None) -> Any:
    """CheckpointError unless the encoder's features fit the model; returns the SLPD model a
    region DMIN needs (``slpd_for``), None for a patch DMIN. ``source`` names the encoder in the
    error (default ``encoder <name>``)."""
    from hdmil.features.stain import check_stain

    check_stain(recorded_recipe(model), encoder, str(model.path))
    if model.instances == "region":
        slpd = slpd_for(model, slpd)
        check_slpd_dims(model, slpd, encoder)
        return slpd
    model.check_feature_dim(encoder.dim, source=source or f"encoder {encoder.name}")
    return None


def check_slpd_dims(model: Any, slpd: Any, encoder: Any) -> None:
    """CheckpointError unless encoder → SLPD → DMIN widths chain up."""
    where = slpd_label(slpd) or "the SLPD model"
    enc = slpd.cfg.encoder
    if int(enc.in_dim) != int(encoder.dim):
        raise CheckpointError(
            f"{where}: the SLPD region encoder takes {enc.in_dim}-d patch features, the encoder "
            f"{encoder.name} gives {encoder.dim}-d ones"
        )
    if int(model.dmin.cfg.in_dim) != int(enc.embed_dim):
        raise CheckpointError(
            f"{model.path}: its DMIN takes {model.dmin.cfg.in_dim}-d region embeddings, {where} gives "
            f"{enc.embed_dim}-d ones"
        )


def warm_up(model: Any, encoder: Any, patch_px: int = 256) -> None:
    """Run LIPN, the encoder and DMIN once on dummy input.

    The first call of a torch model pays one-time setup (kernel selection, thread pools, CUDA
    context): a quarter of a second for LIPN on a CPU, more than LIPN's whole per-slide cost. Call
    this once per process before timing slides so stage seconds are per slide, not per process.
    It also imports the slide stack (``import_slide_stack``: the reader, tissue and writers).
    """
    lr = np.full((2, 16, 16, 3), 200, np.uint8)
    if model.lipn is not None:
        model.lipn.keep_mask(lr, index=np.array([[0, 0], [0, 1]]))
    _warm_after_lipn(model, encoder, patch_px)


def _warm_after_lipn(model: Any, encoder: Any, patch_px: int) -> None:
    """``warm_up`` without LIPN: what ``start_encoder``'s thread warms while the pre-screen runs
    LIPN in the caller's thread (one module is never run from two threads at once)."""
    import_slide_stack()
    encoder.embed(np.full((2, patch_px, patch_px, 3), 200, np.uint8))
    if model.dmin is not None:
        model.dmin.predict(np.zeros((2, int(model.dmin.cfg.in_dim)), np.float32), mask=None)


def import_slide_stack() -> None:
    """Import what reading, screening and writing a slide need (``SLIDE_STACK``), once per process."""
    for name in SLIDE_STACK:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional backend: the slide that needs it says so
            pass


class EncoderBuild:
    """An encoder (and the SLPD model a region DMIN needs) built and warmed up in a thread.

    ``start_encoder`` starts it; ``result()`` waits for it and returns ``(encoder, slpd)``, or
    raises what building raised (a CheckpointError naming the checkpoint). ``run_slide`` takes one
    as its ``encoder``: the pre-screen (tissue and LIPN need no encoder) runs while it is built.
    ``waited`` is the seconds ``result()`` has spent waiting.
    """

    def __init__(self, build: Any) -> None:
        self._value: tuple[Any, Any] | None = None
        self._error: BaseException | None = None
        self.waited = 0.0
        self._thread = threading.Thread(target=self._run, args=(build,), name="hdmil-encoder", daemon=True)
        self._thread.start()

    def _run(self, build: Any) -> None:
        try:
            self._value = build()
        except BaseException as exc:  # handed to the thread that asks for the result
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def failed(self) -> bool:
        return self.done() and self._error is not None

    def result(self) -> tuple[Any, Any]:
        t0 = time.perf_counter()
        self._thread.join()
        self.waited += time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def start_encoder(model: Any, device: Any = None, override: str | os.PathLike | None = None,
                  slpd: Any = None, source: str | None = None, warm: bool = True) -> EncoderBuild:
    """Build the model's encoder (``encoder_for``), check it fits (``fit_encoder``) and warm it and
    DMIN up (``warm_up`` but LIPN, which the pre-screen runs meanwhile) in a background thread;
    see ``EncoderBuild``."""

    def build() -> tuple[Any, Any]:
        encoder = encoder_for(model, device, override=override)
        fitted = fit_encoder(model, encoder, slpd, source=source)
        if warm:
            _warm_after_lipn(model, encoder, model.patch_px)
        return encoder, fitted

    return EncoderBuild(build)
