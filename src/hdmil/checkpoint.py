"""Checkpoints: one ``.safetensors`` file with the weights and a JSON config; loading runs no code.

Layout: tensors are the modules' state dicts prefixed by module name (``dmin.proj.0.weight``,
``lipn.stem.0.0.weight``); the safetensors metadata holds ``{"hdmil": <json>}``:

    {
      "format_version": 1,
      "model_type": "hdmil" | "dmin" | "lipn",        # DMIN + LIPN, DMIN alone, LIPN alone
      "modules": {"dmin": DMINConfig dict, "lipn": LIPNConfig dict},   # registry name -> config
      "classes": ["normal", "tumor"],
      "encoder": "resnet50_trunc", "feature_dim": 1024,
      "patch_px": 256, "magnification": 20.0, "lr_magnification": 1.25,
      "target_keep_rate": 0.6,
      "provenance": {"created": ..., "hdmil_version": ..., "seed": ..., "data": ..., "metrics": ...}
    }

``torch.load`` is only used for ``.pt`` / ``.pth`` files, with ``weights_only=True``; such a file must
hold ``{"hdmil": config dict or JSON, "state_dict": {name: tensor}}``.

SLPD checkpoints (``save_slpd`` / ``load_slpd``) keep the layout ``hdmil pretrain-slpd`` has always
written: the tensors are the ``SLPD`` module's own state dict (``student.*``, ``teacher.*``,
``center``) plus ``optim.<param>.<name>`` while a run is unfinished; the metadata ``{"hdmil": json}``
holds ``model_type: "slpd"``, ``format_version``, ``config`` (the ``SLPDConfig`` dict), ``epoch``,
``complete``, the per-epoch loss ``history`` and the cohort it was trained on. The model is rebuilt
through the registry (``create_model("slpd", **config)``), like DMIN and LIPN.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from hdmil.errors import CheckpointError, HDMILError
from hdmil.files import atomic_path
from hdmil.models import DMIN, LIPN, SLPD, SLPDConfig, create_model, list_models
from hdmil.models.lipn import LEGACY_UIB_FORM

__all__ = [
    "FORMAT_VERSION",
    "HDMILModel",
    "SLPD_FORMAT_VERSION",
    "default_model_path",
    "load_model",
    "load_slpd",
    "read_checkpoint_config",
    "read_slpd_metadata",
    "save_checkpoint",
    "save_slpd",
]

FORMAT_VERSION = 1
METADATA_KEY = "hdmil"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# The most parameter bytes a checkpoint's config may ask us to allocate: 2 GiB, a thousand times
# the bundled model. Shapes come from the file's JSON, so without a limit a few edited numbers
# (a 10^6-wide hidden layer) make torch allocate 160 GB before any weight is checked.
MAX_MODEL_BYTES = 2 * 2**30


DEMO_MODEL_NAME = "hdmil-demo-v1.safetensors"


def default_model_path() -> Path:
    """Where the demo model is looked for: ``$HDMIL_MODEL``, else the bundled
    ``hdmil/assets/hdmil-demo.safetensors`` (made by ``hdmil recipe demo``; docs/demo_model.md).
    The file may not exist; callers say so with a CheckpointError."""
    env = os.environ.get("HDMIL_MODEL")
    if env:
        return Path(env).expanduser()
    from importlib.resources import files

    return Path(str(files("hdmil.assets").joinpath("hdmil-demo.safetensors")))


# --------------------------------------------------------------------------- saving
def _module_config(name: str, module: nn.Module) -> dict[str, Any]:
    cfg = getattr(module, "cfg", None) or getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise ValueError(f"module {name!r} has no config with to_dict() at .cfg; cannot checkpoint it")
    return cfg.to_dict()


def _model_type(names: set[str]) -> str:
    if {"dmin", "lipn"} <= names:
        return "hdmil"
    if "dmin" in names:
        return "dmin"
    if "lipn" in names:
        return "lipn"
    return "+".join(sorted(names))


def _full_config(modules: dict[str, nn.Module], config: dict[str, Any]) -> dict[str, Any]:
    from hdmil import __version__

    full = dict(config)
    full["format_version"] = FORMAT_VERSION
    full["model_type"] = _model_type(set(modules))
    full["modules"] = {name: _module_config(name, m) for name, m in modules.items()}
    dmin = modules.get("dmin")
    n_classes = None
    if isinstance(dmin, DMIN):
        n_classes = dmin.cfg.n_classes
        full.setdefault("feature_dim", dmin.cfg.in_dim)
        full.setdefault("target_keep_rate", dmin.cfg.target_keep_rate)
        if full["feature_dim"] != dmin.cfg.in_dim:
            raise ValueError(f"config feature_dim {full['feature_dim']} != DMIN in_dim {dmin.cfg.in_dim}")
    elif isinstance(modules.get("lipn"), LIPN):
        n_classes = modules["lipn"].cfg.n_classes
    if n_classes is not None:
        full.setdefault("classes", [f"class_{i}" for i in range(n_classes)])
        if len(full["classes"]) != n_classes:
            raise ValueError(f"{len(full['classes'])} class names for a {n_classes}-class model")
    full.setdefault("patch_px", 256)
    full.setdefault("magnification", 20.0)
    full.setdefault("lr_magnification", 1.25)
    prov = dict(full.get("provenance") or {})
    prov.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    prov.setdefault("hdmil_version", __version__)
    prov.setdefault("torch_version", torch.__version__)
    full["provenance"] = prov
    return full


def save_checkpoint(path: str | os.PathLike, modules: dict[str, nn.Module], config: dict[str, Any]) -> Path:
    """Write ``modules`` (name -> module, names from the model registry) and ``config`` to one
    ``.safetensors`` file, atomically (``hdmil.files.atomic_path``). Returns the path.

    ``config`` holds what the modules don't know: ``classes``, ``encoder``, ``feature_dim``, patch
    geometry, ``provenance`` (seed, data, dates, metrics...). Format version, model type and every
    module's hyper-parameters are added here. Must be JSON-serialisable.
    """
    path = Path(path)
    if not modules:
        raise ValueError("save_checkpoint needs at least one module")
    unknown = sorted(set(modules) - set(list_models()))
    if unknown:
        raise ValueError(f"modules {unknown} are not registered models ({', '.join(list_models())})")
    if "slpd" in modules:
        raise ValueError("SLPD has a checkpoint of its own: write it with save_slpd")
    full = _full_config(modules, config)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, t in module.state_dict().items():
            # clone: safetensors refuses tensors that share storage
            tensors[f"{name}.{key}"] = t.detach().to("cpu").contiguous().clone()
    metadata = {METADATA_KEY: json.dumps(full, sort_keys=True), "format": "pt"}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


# --------------------------------------------------------------------------- loading
@dataclass
class HDMILModel:
    """A loaded checkpoint: rebuilt modules in eval mode, their config and where they came from."""

    dmin: DMIN | None
    lipn: LIPN | None
    config: dict[str, Any]
    classes: list[str]
    path: Path
    sha256: str  # first 12 hex digits of the file's SHA-256
    modules: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def feature_dim(self) -> int | None:
        if self.dmin is not None:
            return self.dmin.cfg.in_dim
        return self.config.get("feature_dim")

    @property
    def encoder(self) -> str | None:
        return self.config.get("encoder")

    @property
    def patch_px(self) -> int:
        return int(self.config.get("patch_px", 256))

    @property
    def magnification(self) -> float:
        return float(self.config.get("magnification", 20.0))

    @property
    def lr_magnification(self) -> float:
        return float(self.config.get("lr_magnification", 1.25))

    @property
    def target_keep_rate(self) -> float | None:
        return self.config.get("target_keep_rate")

    @property
    def name(self) -> str:
        """The checkpoint's file name (what reports show)."""
        return Path(str(self.path)).name

    @property
    def instances(self) -> str:
        """What the DMIN was trained to pool: ``"patch"`` or ``"region"`` (SLPD region embeddings)."""
        return str(self.config.get("instances") or "patch")

    @property
    def slpd_checkpoint(self) -> str | None:
        """For a region DMIN: the SLPD checkpoint that embeds its regions (relative to this file)."""
        return self.config.get("slpd_checkpoint") or None

    @property
    def encoder_weights(self) -> str | None:
        """The encoder's weights file (relative to this file), when the config names one."""
        return self.config.get("encoder_weights") or None

    @property
    def encoder_pretrained(self) -> bool:
        return bool(self.config.get("encoder_pretrained", False))

    def check_feature_dim(self, dim: int, source: str | os.PathLike = "features") -> None:
        """Raise CheckpointError when features of width ``dim`` (from ``source``) don't fit the DMIN."""
        expected = self.feature_dim
        if expected is not None and int(dim) != int(expected):
            enc = f" (encoder {self.encoder})" if self.encoder else ""
            raise CheckpointError(
                f"{source}: features are {int(dim)}-d but the DMIN in {self.path} was trained on "
                f"{expected}-d features{enc}"
            )

    def to(self, device: str | torch.device) -> HDMILModel:
        for m in self.modules.values():
            m.to(device)
        return self


def file_sha256(path: str | os.PathLike) -> str:
    """The full SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return file_sha256(path)[:12]  # short: what reports and the widget show


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")


def _parse_config(path: Path, raw: Any) -> dict[str, Any]:
    if raw is None:
        raise CheckpointError(
            f"{path}: no HDMIL metadata in this file (a checkpoint of another model, or saved without hdmil?)"
        )
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: HDMIL metadata is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: HDMIL metadata is not a JSON object")
    version = raw.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: HDMIL metadata has no format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this hdmil reads ({FORMAT_VERSION}); update hdmil"
        )
    if not isinstance(raw.get("modules"), dict) or not raw["modules"]:
        raise CheckpointError(f"{path}: HDMIL metadata lists no modules")
    lipn = raw["modules"].get("lipn")
    if isinstance(lipn, dict) and "uib_form" not in lipn:
        # saved before the field existed: trained with BatchNorm + ReLU after every UIB conv
        raw["modules"]["lipn"] = {**lipn, "uib_form": LEGACY_UIB_FORM}
    return raw


def _read_safetensors(path: Path, *, tensors: bool, device: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            config = _parse_config(path, meta.get(METADATA_KEY))
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error type for headers and truncation
        raise CheckpointError(f"{path}: not a readable safetensors file or corrupt ({e})") from None
    return config, state


def _read_pickle_free(path: Path, *, device: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects, not only weights "
            f"(loading it would run code). {first}"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch file or corrupt ({e})") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise CheckpointError(f"{path}: no HDMIL metadata in this file (expected keys 'hdmil' and 'state_dict')")
    config = _parse_config(path, obj.get(METADATA_KEY))
    state = obj["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of names to tensors")
    return config, state


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a checkpoint, without building any module."""
    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return _read_pickle_free(path, device="cpu")[0]
    return _read_safetensors(path, tensors=False, device="cpu")[0]


def _few(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _load_module(path: Path, name: str, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    prefix = f"{name}."
    given = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    _load_strict(path, name, module, given, prefix)


def _load_strict(
    path: Path, name: str, module: nn.Module, given: dict[str, torch.Tensor], prefix: str = ""
) -> None:
    """Load ``given`` into ``module``; CheckpointError naming the file for any missing, unexpected
    or misshapen tensor (``prefix``: how the file spells the names)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: {name} weights missing: {_few([prefix + k for k in missing])}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected {name} weights: {_few([prefix + k for k in unexpected])}")
    wrong = [
        f"{prefix}{k} {tuple(given[k].shape)} (model wants {tuple(v.shape)})"
        for k, v in expected.items()
        if tuple(given[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"{path}: weights with the wrong shape: {_few(wrong, 3)}")
    module.load_state_dict(given, strict=True)


def load_model(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", require_dmin: bool = True
) -> HDMILModel:
    """Rebuild the modules of a checkpoint from its config and load their weights (strict).

    ``.safetensors`` files are read with safetensors, ``.pt`` / ``.pth`` with
    ``torch.load(weights_only=True)``: no code from the file runs. Raises CheckpointError naming the
    file when it is missing, corrupt, not an HDMIL checkpoint, LIPN without its DMIN (unless
    ``require_dmin=False``), or when its weights don't match the config.
    """
    path = Path(path)
    _check_exists(path)
    device = torch.device(map_location)
    # read on the CPU (checks need no device), then move the built modules
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        config, state = _read_pickle_free(path, device="cpu")
    else:
        config, state = _read_safetensors(path, tensors=True, device="cpu")

    names = list(config["modules"])
    if require_dmin and "dmin" not in names:
        if "lipn" in names:
            raise CheckpointError(
                f"{path}: LIPN without its DMIN: this checkpoint holds {', '.join(names)} only; "
                "hierarchical inference needs the DMIN that LIPN was trained against"
            )
        raise CheckpointError(f"{path}: no DMIN in this checkpoint (it holds {', '.join(names)})")
    modules: dict[str, nn.Module] = {}
    for name in names:
        module = build_module(path, name, config["modules"][name])
        _load_module(path, name, module, state)
        modules[name] = module.to(device).eval()
    stray = sorted(k for k in state if k.split(".", 1)[0] not in modules)
    if stray:
        raise CheckpointError(f"{path}: unexpected weights for no listed module: {_few(stray)}")

    dmin, lipn = modules.get("dmin"), modules.get("lipn")
    n_classes = (dmin or lipn).cfg.n_classes if (dmin or lipn) is not None else None
    classes = [str(c) for c in config.get("classes") or [f"class_{i}" for i in range(n_classes or 0)]]
    if n_classes is not None and len(classes) != n_classes:
        raise CheckpointError(f"{path}: {len(classes)} class names for a {n_classes}-class model")
    if dmin is not None and lipn is not None and lipn.cfg.n_classes != dmin.cfg.n_classes:
        raise CheckpointError(
            f"{path}: LIPN has {lipn.cfg.n_classes} classes but DMIN has {dmin.cfg.n_classes}"
        )
    if dmin is not None and config.get("feature_dim") not in (None, dmin.cfg.in_dim):
        raise CheckpointError(
            f"{path}: config says {config['feature_dim']}-d features but the DMIN takes {dmin.cfg.in_dim}-d"
        )
    return HDMILModel(
        dmin=dmin,  # type: ignore[arg-type]
        lipn=lipn,  # type: ignore[arg-type]
        config=config,
        classes=classes,
        path=path,
        sha256=_sha256(path),
        modules=modules,
    )


def build_module(
    path: str | os.PathLike, name: str, config: Any, bad: str | None = None
) -> nn.Module:
    """``create_model(name, **config)``, once its shapes are known to fit ``MAX_MODEL_BYTES``.

    The module is first built on torch's meta device (shapes, no storage, no random draws) to
    count its parameter bytes; CheckpointError naming ``path`` for a bad (``bad`` says how) or
    too large config.
    """
    bad = bad or f"cannot build {name} from its config"
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {bad} (not a JSON object)")
    try:
        size = _param_bytes(name, config)
    except Exception as e:  # noqa: BLE001 - any failure to build from the file's JSON
        raise CheckpointError(f"{path}: {bad} ({_first_line(e)})") from None
    if size > MAX_MODEL_BYTES:
        raise CheckpointError(
            f"{path}: the {name} config asks for {size / 1e9:,.1f} GB of parameters, over the "
            f"{MAX_MODEL_BYTES / 1e9:.1f} GB limit; refused before allocating it"
        )
    try:
        return create_model(name, **config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {bad} ({_first_line(e)})") from None


class _CPUSchedules(TorchFunctionMode):
    """Inside ``torch.device("meta")``: ``torch.linspace`` of up to ``_MAX_STEPS`` still runs on
    the CPU, because init code reads such schedules as numbers (per-block drop-path rates)."""

    _MAX_STEPS = 1 << 16

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            steps = args[2] if len(args) > 2 else kwargs.get("steps", 0)
            if isinstance(steps, int) and steps <= self._MAX_STEPS:
                kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _param_bytes(name: str, config: dict[str, Any]) -> int:
    """Bytes of the state dict ``create_model(name, **config)`` would hold, built on "meta"."""
    if name == "slpd":
        # SLPD's teacher is a deep copy of its student, which meta tensors refuse: count the
        # student twice (plus the small center buffer).
        from hdmil.models.slpd import SLPDNet

        cfg = SLPDConfig.from_dict(config)
        cfg.validate()
        with torch.device("meta"), _CPUSchedules():
            parts = [SLPDNet(cfg)] * 2
        extra = 4 * int(cfg.out_dim)
    else:
        with torch.device("meta"), _CPUSchedules():
            parts = [create_model(name, **config)]
        extra = 0
    return extra + sum(
        t.numel() * t.element_size() for m in parts for t in m.state_dict().values()
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- SLPD
SLPD_FORMAT_VERSION = 1
_OPTIM = "optim."


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """``optim.<param id>.<name>`` for every tensor of the optimizer's per-parameter state."""
    out: dict[str, torch.Tensor] = {}
    for pid, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                out[f"{_OPTIM}{pid}.{k}"] = v.detach().cpu().reshape(v.shape).contiguous()
    return out


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restore the per-parameter state ``_optimizer_tensors`` wrote (the groups stay as built)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith(_OPTIM):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    if not state:
        return
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)


def save_slpd(
    path: str | os.PathLike,
    model: SLPD,
    meta: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write an SLPD checkpoint atomically: student, teacher and center (+ the optimizer's state,
    for resuming an unfinished run) and JSON metadata (``meta``: epoch, complete, history ...)."""
    from safetensors.torch import save_file

    from hdmil import __version__

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if optimizer is not None:
        tensors.update(_optimizer_tensors(optimizer))
    full = {
        "model_type": "slpd",
        "format_version": SLPD_FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "hdmil_version": __version__,
        **(meta or {}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(full)})
    return Path(path)


def read_slpd_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of an SLPD checkpoint; CheckpointError when it is not one."""
    return _read_slpd(Path(path), tensors=False)[0]


def _read_slpd(path: Path, *, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except HDMILError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("model_type") != "slpd":
        kind = meta.get("model_type") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not an SLPD checkpoint (model_type {kind!r})")
    version = meta.get("format_version", SLPD_FORMAT_VERSION)
    if not isinstance(version, int) or version > SLPD_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: SLPD checkpoint format {version!r} is newer than this hdmil reads "
            f"({SLPD_FORMAT_VERSION}); update hdmil"
        )
    return meta, state


def restore_slpd(
    path: str | os.PathLike, model: SLPD, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load an SLPD checkpoint's weights (and optimizer state, when given and saved) into
    ``model``; returns its metadata. CheckpointError when the weights do not fit the config."""
    path = Path(path)
    meta, state = _read_slpd(path, tensors=True)
    weights = {k: v for k, v in state.items() if not k.startswith(_OPTIM)}
    _load_strict(path, "SLPD", model, weights)
    if optimizer is not None:
        _load_optimizer(optimizer, state)
    return meta


def load_slpd(path: str | os.PathLike, device: str | torch.device | None = None) -> SLPD:
    """An SLPD model (student + teacher, eval mode) from a checkpoint; executes no code."""
    path = Path(path)
    meta = read_slpd_metadata(path)
    model = build_module(path, "slpd", meta.get("config"), bad="bad SLPD config in checkpoint")
    restore_slpd(path, model)
    return model.to(device or "cpu").eval()
