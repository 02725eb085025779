"""Patch encoders: a registry of named feature extractors over timm, plus local weight files.

``create_encoder("resnet50_trunc")`` is CLAM's encoder (ResNet-50 up to ``layer3``, global average
pooled, 1024-d); the pathology foundation encoders (``"uni"``, ``"virchow2"`` ...) are named in
``hdmil.features.zoo``; any timm model name gives its pooled features (``num_classes=0``); a
``.safetensors`` / ``.pth`` / ``.bin`` file gives a registered or timm architecture with those
weights. Loading a file never executes code (safetensors, or ``torch.load(weights_only=True)``).

Without weights and without ``pretrained`` the weights are random but seeded, so the same install
gives the same features run after run (what a demo model trained on them needs).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hdmil.allocator import forward_batch, keep_freed_memory
from hdmil.errors import HDMILError
from hdmil.files import atomic_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# safetensors metadata keys that may name the architecture of a weights file
_ARCH_KEYS = ("arch", "encoder", "architecture", "model_name")


class EncoderError(HDMILError):
    """An encoder name that is not known, or a weights file that does not fit it."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder(nn.Module):
    """A patch encoder: uint8 RGB patches in, one float32 feature vector per patch out.

    ``model`` maps a normalised float batch ``[B, 3, S, S]`` to ``[B, D]``. ``embed`` does the rest:
    HWC→CHW, /255, resize to ``input_size`` when the patches differ, mean/std, no grad.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        input_size: int = 256,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        dim: int | None = None,
        device: str | torch.device | None = None,
        channels_last: bool = True,
        autocast_dtype: torch.dtype | None = None,
        resize: int | None = None,
        interpolation: str = "bilinear",
    ):
        super().__init__()
        self.model = model.eval()
        self.name = name
        self.input_size = int(input_size)
        # resize: patches resized to this, then centre-cropped to input_size (GigaPath: 256 → 224)
        self.resize, self.interpolation = (int(resize) if resize else None), interpolation
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Normalisation folded into one sub/div on 0..255 values: (x/255 - m)/s = (x - 255m)/(255s).
        self.register_buffer("_shift", torch.tensor(self.mean).mul(255).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_scale", torch.tensor(self.std).mul(255).view(1, 3, 1, 1), persistent=False)
        self.channels_last = channels_last
        self.dim = int(dim) if dim is not None else self._probe_dim()
        self.to(torch.device(device) if device is not None else default_device())
        # bf16/fp16 only pays off on GPUs (this CPU has no bf16 units: measured in benchmarks/features.py)
        if autocast_dtype is None and self.device.type == "cuda":
            autocast_dtype = torch.bfloat16
        self.autocast_dtype = autocast_dtype
        self.weights = "given"  # create_encoder says where they came from: a file, pretrained, random
        # hdmil.compute: patches per forward pass (None: all), another runtime for ``model``, the choice
        self.max_batch: int | None = None
        self.runtime: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.compute: Any = None

    @property
    def device(self) -> torch.device:
        return self._shift.device

    def to(self, *args, **kwargs) -> Encoder:
        super().to(*args, **kwargs)
        if self.channels_last:
            # NHWC patches permuted to NCHW are already channels_last in memory, so no copy on input.
            self.model.to(memory_format=torch.channels_last)
        return self

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, input_size={self.input_size}, device={self.device}"

    @torch.inference_mode()
    def _probe_dim(self) -> int:
        """Feature width read from the model by one small forward pass (on the CPU, before moving).

        Fully convolutional models are probed at 64 px (cheap); if that is too small for the
        model, or it embeds a fixed grid of patches, at ``input_size``.
        """
        sizes = [self.input_size]
        if not _needs_fixed_size(self.model):
            sizes.insert(0, min(self.input_size, 64))
        for i, size in enumerate(sizes):
            try:
                out = self.model(torch.zeros(1, 3, size, size, device=self._shift.device))
                break
            except Exception as exc:  # noqa: BLE001 - any failure of a third-party model
                if i == len(sizes) - 1:
                    raise EncoderError(f"encoder {self.name!r} fails on a {size} px input: {exc}") from exc
        if out.ndim != 2:
            raise EncoderError(f"encoder {self.name!r} gives output of shape {tuple(out.shape)}, not [B, D]")
        return int(out.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float ``[B, 3, S, S]`` → ``[B, D]``."""
        return self.model(x)

    def preprocess(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` (numpy or torch) → normalised float32 ``[B, 3, S, S]`` on the device."""
        x = torch.from_numpy(np.ascontiguousarray(patches)) if isinstance(patches, np.ndarray) else patches
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"patches must be [B, H, W, 3] RGB, got shape {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # channels_last view
        if not self.channels_last:
            x = x.contiguous()
        x = self._resize(x)
        return (x - self._shift) / self._scale  # not in place: a float input may be the caller's

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` 0..255 → ``input_size`` square: resized (antialiased), then centre
        crop when ``resize`` is set. Bicubic overshoot is clipped to 0..255, as on uint8 images."""
        side = self.resize or self.input_size
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode=self.interpolation, antialias=True, align_corners=False)
            if self.interpolation == "bicubic":
                x = x.clamp(0, 255)
        if side != self.input_size:
            top = (side - self.input_size) // 2
            x = x[..., top : top + self.input_size, top : top + self.input_size]
        return x

    @torch.inference_mode()
    def embed(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB patches ``[B, H, W, 3]`` → float32 features ``[B, D]`` on ``self.device``."""
        if len(patches) == 0:
            return torch.zeros(0, self.dim, device=self.device)
        step = self.max_batch
        if step and len(patches) > step:  # bounded working set; 16 at a time = 64 at once, bitwise
            return torch.cat([self.embed(patches[i : i + step]) for i in range(0, len(patches), step)])
        x = self.preprocess(patches)
        if self.runtime is not None:
            out = self.runtime(x)
        elif self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        return out.float()


class TruncatedResNet(nn.Module):
    """A ResNet's stem and ``layer1..layer{last}``, global average pooled: ``[B, 3, H, W] → [B, C]``.

    CLAM's ``resnet50_trunc`` is ``last=3`` on ResNet-50 (C = 1024). Parameter names are those of
    timm / torchvision ResNets (``conv1``, ``bn1``, ``layer1`` …), so their checkpoints load as is.
    """

    def __init__(self, resnet: nn.Module, last: int = 3):
        super().__init__()
        self.conv1, self.bn1, self.act1, self.maxpool = resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool
        self.layers = [f"layer{i}" for i in range(1, last + 1)]
        for name in self.layers:
            setattr(self, name, getattr(resnet, name))
        self.num_features = resnet.feature_info[last]["num_chs"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for name in self.layers:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))  # global average pool: [B, C, h, w] -> [B, C]


# --------------------------------------------------------------------------------------------------
# Registry

EncoderFactory = Callable[..., Encoder]
_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator: ``factory(pretrained: bool = False, device=None) -> Encoder`` under ``name``."""

    def deco(fn: EncoderFactory) -> EncoderFactory:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_encoders() -> list[str]:
    """Registered encoder names (any timm model name works too)."""
    return sorted(_REGISTRY)


def _timm():
    import timm  # imported late: it takes a second and only extraction needs it

    return timm


def _truncated_resnet(arch: str, tag: str, last: int, pretrained: bool) -> nn.Module:
    timm = _timm()
    # zero_init_last=False: with random weights every residual branch should contribute
    name = f"{arch}.{tag}" if pretrained else arch
    resnet = timm.create_model(name, pretrained=pretrained, num_classes=0, zero_init_last=False)
    return TruncatedResNet(resnet, last=last)


@register_encoder("resnet50_trunc")
def resnet50_trunc(pretrained: bool = False, device=None) -> Encoder:
    """CLAM's encoder: ResNet-50 (torchvision ImageNet weights) up to layer3, avg pooled, 1024-d."""
    model = _truncated_resnet("resnet50", "tv_in1k", 3, pretrained)
    return Encoder(model, "resnet50_trunc", input_size=256, dim=model.num_features, device=device)


@register_encoder("resnet18_trunc")
def resnet18_trunc(pretrained: bool = False, device=None) -> Encoder:
    """A small CPU encoder for demos: ResNet-18 up to layer3, avg pooled, 256-d (~7x fewer FLOPs)."""
    model = _truncated_resnet("resnet18", "tv_in1k", 3, pretrained)
    return Encoder(model, "resnet18_trunc", input_size=256, dim=model.num_features, device=device)


def _needs_fixed_size(model: nn.Module) -> bool:
    """ViT-like models embed a fixed grid of patches; CNNs take any size (keep 256, no resize)."""
    pe = getattr(model, "patch_embed", None)
    return pe is not None and not getattr(pe, "dynamic_img_size", False)


def _timm_encoder(name: str, pretrained: bool, device=None) -> Encoder:
    timm = _timm()
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except (RuntimeError, OSError, ValueError) as exc:  # no network, no such tag, ...
        raise EncoderError(f"cannot create timm model {name!r}: {exc}") from exc
    cfg = timm.data.resolve_model_data_config(model)
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    native = int(cfg["input_size"][-1])
    # CNNs see the 256 px patch as is (no resize); models with a fixed input get their own size.
    sizes = [native] if _needs_fixed_size(model) else [256, native]
    for i, size in enumerate(sizes):
        try:
            return Encoder(model, name, input_size=size, mean=mean, std=std, device=device)
        except EncoderError:
            if i == len(sizes) - 1:
                raise
    raise AssertionError("unreachable")


def _is_timm_name(name: str) -> bool:
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return True
    return bool(_timm().is_model(name))


def _build(name: str, pretrained: bool) -> Encoder:
    """An encoder on the CPU (moved later), with seeded random weights unless pretrained."""
    rng = contextlib.nullcontext() if pretrained else _seeded(0)
    try:
        with rng:
            if name in _REGISTRY:
                return _REGISTRY[name](pretrained=pretrained, device="cpu")
            if _is_timm_name(name):
                return _timm_encoder(name, pretrained, device="cpu")
    except EncoderError:
        raise
    except Exception as exc:
        if not pretrained:
            raise
        # Download failures come as many types (OSError, HTTP errors, hub "offline" errors).
        raise EncoderError(
            f"cannot get pretrained weights for encoder {name!r} ({type(exc).__name__}: {exc}); "
            f"without internet pass a local weights file (--weights FILE)"
        ) from exc
    known = ", ".join(list_encoders())
    raise EncoderError(
        f"unknown encoder {name!r}: not one of ({known}), not a timm model name, "
        f"and not a weights file ({' / '.join(WEIGHT_SUFFIXES)})"
    )


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def create_encoder(
    name: str | os.PathLike,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    arch: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> Encoder:
    """An ``Encoder`` by registered name, timm name, or weights file.

    name: ``"resnet50_trunc"``, ``"resnet18_trunc"``, any timm model (``"efficientnet_b0"``), or a
        path to a ``.safetensors`` / ``.pth`` / ``.bin`` file; the file's architecture comes from
        its safetensors metadata (``arch``), from ``arch``, or from the registered encoder it fits.
    pretrained: the published weights (downloaded once: a zoo encoder's from its hub repository,
        a timm model's from timm; never needed with ``weights``).
    weights: a local weights file for ``name``'s architecture.
    device: ``None`` → CUDA when available, else CPU.
    dtype: autocast dtype (``"bfloat16"``, ``"float16"``, ``"float32"``); ``None``: a named zoo
        encoder (``hdmil.features.zoo``) runs in its documented dtype on CUDA, float32 on the CPU.

    Building an encoder also tunes the process's allocator (``hdmil.allocator``): without it a
    CPU encoder spends more time in page faults than in convolutions.
    """
    keep_freed_memory()
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError("device 'cuda' asked for, but torch sees no CUDA GPU here; use the CPU")
    is_file = isinstance(name, os.PathLike) or str(name).lower().endswith(WEIGHT_SUFFIXES)
    path = Path(name) if is_file else None
    if path is not None:
        if weights is not None:
            raise EncoderError(f"give either a weights file as the encoder or weights=, not both ({path})")
        weights, name = path, arch
    if weights is not None:
        state, meta = load_state_dict(weights)
        name = name or _arch_from_meta(meta)
        if name is None:
            encoder = _guess_arch(weights, state)
        else:
            encoder = _from_state(str(name), state, weights)
    else:
        encoder = _build(str(name), pretrained=pretrained)
    encoder.weights = "pretrained" if pretrained and weights is None else str(weights or "random (seeded)")
    encoder = encoder.to(device)
    encoder.autocast_dtype = _zoo().preferred_dtype(encoder.name, device, dtype, encoder.autocast_dtype)
    encoder.max_batch = forward_batch(device.type)  # the kept heap: one 16-patch pass, not 64
    return encoder


def _zoo():
    from hdmil.features import zoo

    return zoo


def _from_state(name: str, state: dict[str, torch.Tensor], path: str | os.PathLike) -> Encoder:
    """Encoder ``name`` holding exactly the tensors of a weights file."""
    spec = _zoo().get_spec(name)
    if spec is not None and spec.family != "registered":
        return _zoo().encoder_from_state(spec, state, path)
    encoder = _build(name, pretrained=False)
    _load_into(encoder, state, path)
    return encoder


# --------------------------------------------------------------------------------------------------
# Weight files


def save_encoder(encoder: Encoder, path: str | os.PathLike) -> Path:
    """Write an encoder's weights as safetensors with its architecture in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    module = _weights_module(encoder.model)  # a zoo encoder's file has the hub's key names
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"arch": encoder.name, "dim": str(encoder.dim)})
    return path


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a weights file; never runs code from it. EncoderError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"{path}: weights file not found")
    meta: dict[str, str] = {}
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            state = _find_state_dict(obj)
            if state is None:
                raise EncoderError(f"{path}: no state dict of tensors found in this file")
    except EncoderError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, torch and pickle each raise their own
        raise EncoderError(f"{path}: corrupt or not a weights file ({_why_unreadable(exc)})") from exc
    return _strip_prefixes(state), meta


def _why_unreadable(exc: BaseException) -> str:
    """One short line on why a weights file did not load (torch's pickle advice left out)."""
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return "not a safetensors or plain-tensor torch file"
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensor dict inside a checkpoint: itself, or under 'state_dict' / 'model' / ..."""
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
        for key in ("state_dict", "model", "model_state_dict", "teacher", "student", "module"):
            if key in obj:
                found = _find_state_dict(obj[key])
                if found:
                    return found
    return None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrappers' prefixes (DataParallel ``module.``, our ``model.``, ...) shared by every key."""
    for prefix in ("module.", "model.", "backbone.", "encoder.", "trunk."):
        if state and all(k.startswith(prefix) for k in state):
            return _strip_prefixes({k[len(prefix) :]: v for k, v in state.items()})
    return state


def _arch_from_meta(meta: dict[str, str]) -> str | None:
    for key in _ARCH_KEYS:
        if meta.get(key):
            return meta[key]
    return None


def _droppable(key: str, model: nn.Module) -> bool:
    """Keys a full checkpoint has and a feature extractor has not: classifier heads, layer4."""
    if isinstance(model, TruncatedResNet):
        kept = ("conv1.", "bn1.", *(f"{n}." for n in model.layers))
        return not key.startswith(kept)
    head = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = (head,) if isinstance(head, str) else tuple(head)
    return any(key == h or key.startswith(h + ".") for h in heads)


def _weights_module(model: nn.Module) -> nn.Module:
    """The part of an encoder's network a weights file holds: a zoo network's hub module (its
    keys are the hub's), else the whole network."""
    return model.hub_module() if hasattr(model, "hub_module") else model


def _mismatch(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Problems fitting ``state`` into ``module``, in words; empty when it fits."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own and not _droppable(k, module)]
    shapes = [
        f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    for what, keys in (("missing", missing), ("with the wrong shape", shapes), ("unexpected", extra)):
        if keys:
            more = f", … {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:3])}{more}")
    return problems


def _load_into(encoder: Encoder, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    problems = _mismatch(encoder.model, state)
    if problems:
        raise EncoderError(
            f"{path}: weights do not fit encoder {encoder.name!r} ({'; '.join(problems)})"
        )
    own = encoder.model.state_dict()
    encoder.model.load_state_dict({k: state[k] for k in own}, strict=True)


def _guess_arch(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> Encoder:
    """The registered encoder whose parameters match the file exactly (for bare .pth files)."""
    zoo = _zoo()
    for name in list_encoders():
        if zoo.get_spec(name) is not None and zoo.get_spec(name).family != "registered":
            continue  # the zoo's networks are large: compared below on the meta device
        encoder = _build(name, pretrained=False)
        if not _mismatch(encoder.model, state):
            _load_into(encoder, state, path)
            return encoder
    vit = any(k.endswith(("pos_embed", "position_embeddings")) for k in state)
    fits = [s for s in (zoo.ZOO.values() if vit else ()) if s.family != "registered"
            and _fits_meta(zoo.meta_reference(s), state)]
    if len(fits) == 1:
        return zoo.encoder_from_state(fits[0], state, path)
    if fits:  # H-optimus-0 and -1 share one architecture: the name must come from the user
        raise EncoderError(
            f"{path}: cannot tell which architecture these weights are for: they fit "
            f"{', '.join(s.name for s in fits)}; pass the architecture (--arch NAME)"
        )
    raise EncoderError(
        f"{path}: cannot tell which architecture these weights are for (no 'arch' in the file's "
        f"metadata and no registered encoder fits); pass the architecture (--arch NAME)"
    )


def _fits_meta(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    if hasattr(model, "adapt_state_dict"):
        state = model.adapt_state_dict(state)
    return not _mismatch(_weights_module(model), state)


from hdmil.features import zoo as _named  # noqa: E402,F401 - registers the named encoders
