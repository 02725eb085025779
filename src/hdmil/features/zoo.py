"""Named pathology foundation encoders, each built as its model card and TRIDENT build it.

One ``EncoderSpec`` per encoder says everything that makes its features: the timm (or
``transformers``) architecture and its kwargs, the feature width, the input size and how a patch
is resized to it, the normalisation, how the tokens are pooled, where the weights live on the
Hugging Face hub, the licence, and the dtype its authors run it in on a GPU.

Weights come from one of three places, all loaded without executing code and with every key
matched (``encoders.create_encoder``):

- none: seeded random weights (tests, demos);
- ``pretrained=True``: the hub repository's own weights file, downloaded once into the hub cache
  (a gated model needs its terms accepted on the model page and a token: ``hf auth login``);
  a missing token or network is said within seconds (short metadata requests, no retries),
  naming the model page;
- a local weights file in the hub's format and key names (``--weights FILE``).

``build_model(spec, **overrides)`` gives the bare network; the overrides (``depth=1,
embed_dim=32`` ...) make the small configurations the tests run through the same pooling code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hdmil.features.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderError,
    load_state_dict,
    register_encoder,
)

__all__ = [
    "ZOO",
    "EncoderSpec",
    "PooledTrunk",
    "build_model",
    "get_spec",
    "meta_model",
    "meta_reference",
    "parameter_count",
    "preferred_dtype",
    "zoo_rows",
]

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HUB_PAGE = "https://huggingface.co/"
# Weights files timm looks for in a hub repository, safest first.
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# Seconds for the one metadata request that tells a reachable hub from an unreachable one.
HUB_TIMEOUT_S = float(os.environ.get("HDMIL_HUB_TIMEOUT", "5"))


@dataclass(frozen=True)
class EncoderSpec:
    """How one named encoder turns a patch into features.

    family: ``"timm"`` (a timm ViT), ``"transformers"`` (a Hugging Face model), ``"conch"`` (a timm
        ViT trunk plus CONCH's attentional pooler) or ``"registered"`` (built in ``encoders.py``).
    kwargs: the architecture's keyword arguments, JSON-able: layer classes by name (``"SiLU"``).
    pool: ``"model"`` (the trunk's own pooled output: its class token), ``"cls+mean"`` (class
        token ⊕ mean of the patch tokens, register tokens left out), ``"cls"`` (class token of a
        ``transformers`` model's last hidden state), ``"attention"`` (CONCH's pooler).
    resize: when set, patches are resized to ``resize`` then centre-cropped to ``input_size``.
    cuda_dtype: the dtype its authors (and TRIDENT) run it in on a GPU.
    """

    name: str
    family: str
    arch: str
    dim: int
    input_size: int
    pool: str
    repo: str
    licence: str
    cuda_dtype: str = "float32"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    resize: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hub_files: tuple[str, ...] = TIMM_FILES
    gated: bool = True

    @property
    def hub_id(self) -> str:
        return f"hf-hub:{self.repo}"

    @property
    def page(self) -> str:
        return HUB_PAGE + self.repo


_VIT = {"num_classes": 0, "dynamic_img_size": True, "init_values": 1e-5}
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
_VIRCHOW = {**_VIT, **_SWIGLU, "img_size": 224, "mlp_ratio": 5.3375, "global_pool": ""}
_HOPTIMUS = {**_VIT, "img_size": 224, "global_pool": "token"}
_NC = "CC-BY-NC-ND-4.0, gated"
_PAIGE = "non-commercial (Paige terms), gated"

_SPECS = (
    EncoderSpec("resnet50_trunc", "registered", "resnet50", 1024, 256, "avg of layer3",
                "timm/resnet50.tv_in1k", "BSD-3-Clause (torchvision ImageNet weights)", "float32",
                gated=False),
    EncoderSpec("uni", "timm", "vit_large_patch16_224", 1024, 224, "model", "MahmoodLab/uni",
                _NC, "float16", {**_VIT, "img_size": 224, "patch_size": 16}),
    EncoderSpec("uni2-h", "timm", "vit_giant_patch14_224", 1536, 224, "model", "MahmoodLab/UNI2-h",
                _NC, "bfloat16",
                {**_VIT, **_SWIGLU, "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                 "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8}),
    EncoderSpec("virchow", "timm", "vit_huge_patch14_224", 2560, 224, "cls+mean", "paige-ai/Virchow",
                _PAIGE, "float16", _VIRCHOW, interpolation="bicubic"),
    EncoderSpec("virchow2", "timm", "vit_huge_patch14_224", 2560, 224, "cls+mean", "paige-ai/Virchow2",
                _PAIGE, "float16", {**_VIRCHOW, "reg_tokens": 4}, interpolation="bicubic"),
    EncoderSpec("h-optimus-0", "timm", "vit_giant_patch14_reg4_dinov2", 1536, 224, "model",
                "bioptimus/H-optimus-0", "Apache-2.0, gated", "float16", _HOPTIMUS,
                mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
    EncoderSpec("h-optimus-1", "timm", "vit_giant_patch14_reg4_dinov2", 1536, 224, "model",
                "bioptimus/H-optimus-1", "academic research only, gated", "float16", _HOPTIMUS,
                mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
    EncoderSpec("gigapath", "timm", "vit_giant_patch14_dinov2", 1536, 224, "model",
                "prov-gigapath/prov-gigapath", "Apache-2.0 (research use), gated", "float16",
                {"num_classes": 0, "dynamic_img_size": True, "img_size": 224, "in_chans": 3,
                 "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24, "mlp_ratio": 5.33334},
                resize=256, interpolation="bicubic"),
    EncoderSpec("phikon-v2", "transformers", "dinov2", 1024, 224, "cls", "owkin/phikon-v2",
                "Owkin non-commercial, not gated", "float32",
                {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "patch_size": 16, "image_size": 224},
                hub_files=("config.json", "model.safetensors"), gated=False),
    EncoderSpec("conch-v1.5", "conch", "vit_large_patch16_224", 768, 448, "attention",
                "MahmoodLab/conchv1_5", _NC, "float16",
                {"img_size": 224, "patch_size": 16, "init_values": 1.0, "num_classes": 0,
                 "global_pool": "", "pool_dim": 768, "pool_heads": 8},
                hub_files=("pytorch_model_vision.bin",)),
)
ZOO: dict[str, EncoderSpec] = {s.name: s for s in _SPECS}


def get_spec(name: str) -> EncoderSpec | None:
    """The zoo's spec of ``name`` (``None`` for other encoders)."""
    return ZOO.get(str(name))


# --------------------------------------------------------------------------------------------------
# The networks


class PooledTrunk(nn.Module):
    """A hub network (``trunk``, its weights in the hub's key names) and how its tokens are pooled.

    ``[B, 3, S, S] → [B, dim]``. pool ``"model"``: the trunk's own output (timm's class token
    after the final norm); ``"cls+mean"``: class token ⊕ mean of the patch tokens, skipping the
    trunk's ``num_prefix_tokens`` (class and register tokens); ``"cls"``: class token of a
    ``transformers`` model's ``last_hidden_state``.
    """

    def __init__(self, trunk: nn.Module, pool: str):
        super().__init__()
        if pool not in ("model", "cls+mean", "cls"):
            raise ValueError(f"unknown pooling {pool!r}")
        self.trunk, self.pool = trunk, pool

    def hub_module(self) -> nn.Module:
        return self.trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":
            return self.trunk(pixel_values=x).last_hidden_state[:, 0]
        if self.pool == "model":
            return self.trunk(x)
        tokens = self.trunk.forward_features(x)  # [B, prefix + patches, C], after the final norm
        patches = tokens[:, self.trunk.num_prefix_tokens:]
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)  # [B, 2C]

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A ``transformers`` file in the older key layout (``attention.attention.query`` ...) renamed
        to this install's, when this install uses the newer one; other files as they are."""
        own = self.trunk.state_dict().keys()
        if self.pool != "cls" or all(k in own for k in state):
            return state
        return {_rename(k): v for k, v in state.items()}


# transformers 5 renamed Dinov2's attention weights; files on the hub keep the older names.
_HF_RENAMES = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
               ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"))


def _rename(key: str) -> str:
    for old, new in _HF_RENAMES:
        key = key.replace(old, new)
    return key


class AttentionalPooler(nn.Module):
    """Learned queries attending over a ViT's tokens (CoCa's pooler, as CONCH v1.5 uses it).

    ``[B, N, C] → [B, Q, D]``: queries and tokens are layer-normed, projected (no biases), split
    into ``heads``, attended with the usual ``1/sqrt(D/heads)`` scale, and projected back.
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 8, queries: int = 1):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.ln_q, self.ln_k = nn.LayerNorm(dim), nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)  # [B, Q, D]
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # [B, N, D] each

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, h, T, D/h]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).flatten(2))  # [B, Q, D]


class ConchVision(nn.Module):
    """CONCH v1.5's image tower: an iBOT ViT-L/16 trunk, one attentional query, a layer norm.

    The trunk's position embedding is for a 224 px grid; other inputs (448 px) get it resized by
    bicubic interpolation as DINO/iBOT do at run time (scale factor ``(grid + 0.1) / 14``), so
    the trunk's weights keep the hub file's shapes. Key names are those of
    ``pytorch_model_vision.bin``: ``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``.
    """

    def __init__(self, trunk: nn.Module, dim: int = 768, heads: int = 8):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(dim, trunk.embed_dim, heads=heads, queries=1)
        self.ln_contrast = nn.LayerNorm(dim)

    def hub_module(self) -> nn.Module:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        patches = t.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, C]
        grid = (x.shape[-2] // t.patch_embed.patch_size[0], x.shape[-1] // t.patch_embed.patch_size[1])
        tokens = torch.cat([t.cls_token.expand(len(x), -1, -1), patches], dim=1)
        tokens = t.norm(t.blocks(t.norm_pre(tokens + self.position_embedding(grid))))
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])  # [B, dim]

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[1, 1 + h*w, C]``: the class position and the patch positions resized to ``grid``."""
        pos = self.trunk.pos_embed
        side = int(round((pos.shape[1] - 1) ** 0.5))
        if grid == (side, side):
            return pos
        patch = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)  # iBOT's +0.1 against float error
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic")
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file whose position embedding has another grid is resampled to the trunk's (bilinear,
        as CONCH's loader does); the rest stays as it is."""
        key, own = "trunk.pos_embed", self.trunk.pos_embed
        if key in state and state[key].shape != own.shape and state[key].ndim == 3:
            from timm.layers import resample_abs_pos_embed

            grid = list(self.trunk.patch_embed.grid_size)
            state = {**state, key: resample_abs_pos_embed(state[key].float(), grid, num_prefix_tokens=1,
                                                          interpolation="bilinear", antialias=False)}
        return state


def _layers(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's kwargs with layer names (``"SiLU"``, ``"SwiGLUPacked"``) made classes."""
    from timm.layers import SwiGLUPacked

    classes = {"SiLU": nn.SiLU, "GELU": nn.GELU, "SwiGLUPacked": SwiGLUPacked}
    return {k: classes.get(v, v) if isinstance(v, str) and k.endswith("_layer") else v
            for k, v in kwargs.items()}


def build_model(spec: EncoderSpec, **overrides: Any) -> nn.Module:
    """The spec's network with random weights: ``[B, 3, S, S] → [B, spec.dim]`` (normalised input).

    Built on the current default device: ``with torch.device("meta"):`` costs no memory.
    ``overrides`` replace architecture kwargs (a small configuration for tests).
    """
    kwargs = {**spec.kwargs, **overrides}
    if spec.family == "timm":
        import timm

        return PooledTrunk(timm.create_model(spec.arch, pretrained=False, **_layers(kwargs)), spec.pool)
    if spec.family == "conch":
        import timm

        dim, heads = kwargs.pop("pool_dim"), kwargs.pop("pool_heads")
        return ConchVision(timm.create_model(spec.arch, pretrained=False, **_layers(kwargs)), dim, heads)
    if spec.family == "transformers":
        return PooledTrunk(_hf_model(spec, kwargs), spec.pool)
    raise EncoderError(f"encoder {spec.name!r} is built in hdmil.features.encoders, not by the zoo")


def _hf_model(spec: EncoderSpec, kwargs: dict[str, Any]) -> nn.Module:
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:
        raise EncoderError(f"encoder {spec.name!r} needs the transformers package: "
                           "pip install 'napari-hdmil[encoders]'") from exc
    return AutoModel.from_config(AutoConfig.for_model(spec.arch, **kwargs))


def meta_model(spec: EncoderSpec, **overrides: Any) -> nn.Module:
    """The network on the meta device: shapes and key names only, no memory, no download."""
    if spec.family == "registered":
        from hdmil.features.encoders import _truncated_resnet

        with torch.device("meta"):
            return _truncated_resnet(spec.arch, "tv_in1k", 3, pretrained=False)
    with torch.device("meta"):
        return build_model(spec, **overrides)


_META: dict[str, nn.Module] = {}


def meta_reference(spec: EncoderSpec) -> nn.Module:
    """A shared meta-device network of ``spec``, built once: for reading shapes and keys only
    (``hdmil encoders``, matching a weights file to an architecture); never load into it."""
    key = f"{spec.name}:{spec.arch}:{sorted(spec.kwargs.items())!r}"
    if key not in _META:
        _META[key] = meta_model(spec)
    return _META[key]


def parameter_count(spec: EncoderSpec) -> int:
    return sum(p.numel() for p in meta_reference(spec).parameters())


# --------------------------------------------------------------------------------------------------
# Encoders: random, from the hub, from a file


def _encoder(spec: EncoderSpec, model: nn.Module, device=None) -> Encoder:
    enc = Encoder(model, spec.name, input_size=spec.input_size, mean=spec.mean, std=spec.std,
                  dim=spec.dim, device=device, resize=spec.resize, interpolation=spec.interpolation)
    enc.hub_id = spec.hub_id
    return enc


def build_encoder(spec: EncoderSpec, pretrained: bool = False, device=None) -> Encoder:
    """The spec's encoder: seeded random weights, or the hub's (``pretrained``)."""
    if not pretrained:
        return _encoder(spec, build_model(spec), device)
    found = _hub_preflight(spec)  # None: off or unreachable, files in the cache
    if spec.family == "transformers":
        return _encoder(spec, PooledTrunk(_hf_pretrained(spec, found is not None), spec.pool), device)
    path = _hub_download(spec, found)
    state, _ = load_state_dict(path)
    return encoder_from_state(spec, state, path, device)


def encoder_from_state(spec: EncoderSpec, state: dict[str, torch.Tensor], path: str | os.PathLike,
                       device=None) -> Encoder:
    """The spec's network holding exactly ``state`` (every key, every shape), or EncoderError
    naming the file. Built on the meta device first, so the weights are in memory once."""
    from hdmil.features.encoders import _mismatch

    model = meta_model(spec)
    target = model.hub_module()
    state = model.adapt_state_dict(state)  # the hub's key space: renames, resampled grids
    problems = _mismatch(target, state)
    if problems:
        raise EncoderError(f"{path}: weights do not fit encoder {spec.name!r} ({'; '.join(problems)})")
    own = target.state_dict()
    target.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor no file holds (none of the zoo's networks has one): refuse, never guess
        raise EncoderError(f"{path}: encoder {spec.name!r} has tensors no weights file sets ({left[:3]})")
    return _encoder(spec, model.eval(), device)


def _hf_pretrained(spec: EncoderSpec, online: bool) -> nn.Module:
    """A ``transformers`` model from the hub: safetensors only, no code from the repository."""
    from transformers import AutoModel

    with _hub_errors(spec):
        model = AutoModel.from_pretrained(spec.repo, use_safetensors=True, trust_remote_code=False,
                                          local_files_only=not online)
    if getattr(model.config, "model_type", None) != spec.arch:
        raise EncoderError(f"{spec.page}: a {model.config.model_type!r} model, not the {spec.arch!r} "
                           f"that encoder {spec.name!r} is")
    return model


# --------------------------------------------------------------------------------------------------
# The hub: fail fast, name the model page


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(constants.is_offline_mode())


def _cached(spec: EncoderSpec) -> dict[str, str]:
    """The spec's hub files already in the hub cache, by name."""
    from huggingface_hub import try_to_load_from_cache

    found = {f: try_to_load_from_cache(spec.repo, f) for f in spec.hub_files}
    return {f: p for f, p in found.items() if isinstance(p, str)}


def _have_cached(spec: EncoderSpec) -> bool:
    cached = _cached(spec)
    if spec.family == "transformers":
        return len(cached) == len(spec.hub_files)  # config and weights
    return bool(cached)  # any of the weights files


def _hub_preflight(spec: EncoderSpec) -> str | None:
    """The hub file to download when the hub answers for this model; ``None`` when it is off or
    unreachable but the files are cached; else a clear EncoderError within ``HUB_TIMEOUT_S``
    seconds (metadata requests only, no retries)."""
    if _offline():
        if _have_cached(spec):
            return None
        raise EncoderError(_no_hub(spec, "the hub is switched off here (HF_HUB_OFFLINE)"))
    import huggingface_hub as hub

    # a transformers repo needs its config and weights (from_pretrained checks); timm ones hold one
    # of the weights files: the first that exists is the one to download
    names = spec.hub_files[:1] if spec.family == "transformers" else spec.hub_files
    with _hub_errors(spec):
        for i, name in enumerate(names):
            try:
                hub.get_hf_file_metadata(hub.hf_hub_url(spec.repo, name), timeout=HUB_TIMEOUT_S)
                return name
            except hub.errors.HfHubHTTPError as exc:  # the hub answered: gated, missing, ...
                if not isinstance(exc, hub.errors.EntryNotFoundError) or i == len(names) - 1:
                    raise
            except Exception as exc:  # noqa: BLE001 - DNS, refused, timeout, proxy: unreachable
                if _have_cached(spec):
                    return None
                why = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                raise EncoderError(_no_hub(spec, f"the hub cannot be reached ({why})")) from exc
    raise AssertionError("unreachable")


def _hub_download(spec: EncoderSpec, name: str | None) -> str:
    """The path of the spec's weights file in the hub cache (downloaded once when online)."""
    if name is None:
        return next(iter(_cached(spec).values()))
    import huggingface_hub as hub

    with _hub_errors(spec):
        return hub.hf_hub_download(spec.repo, name, etag_timeout=HUB_TIMEOUT_S)


def _no_hub(spec: EncoderSpec, why: str) -> str:
    return (f"encoder {spec.name!r}: {why}, and its weights are not in the hub cache. Download them "
            f"once with network (hdmil features --encoder {spec.name} --pretrained), or get the weights "
            f"file from {spec.page} and pass it (--weights FILE)")


class _hub_errors:
    """Hub failures as one EncoderError line that names the model page and what to do."""

    def __init__(self, spec: EncoderSpec):
        self.spec = spec

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, EncoderError):
            return False
        from huggingface_hub import errors, get_token

        spec, token = self.spec, get_token()
        login = ("your hub token has no access to it" if token
                 else "no hub token is set (hf auth login, or HF_TOKEN)")
        if isinstance(exc, (errors.GatedRepoError, errors.RepositoryNotFoundError)):
            raise EncoderError(f"encoder {spec.name!r} is gated: accept its terms at {spec.page} and log "
                               f"in; {login}. Or pass a local weights file (--weights FILE)") from exc
        if isinstance(exc, errors.HfHubHTTPError):  # it answered: a missing file, a server error
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise EncoderError(f"encoder {spec.name!r}: the hub refused {spec.page} ({first}); or pass "
                               "a local weights file (--weights FILE)") from exc
        if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError)):
            raise EncoderError(_no_hub(spec, f"the hub did not give its files ({type(exc).__name__})")) from exc
        return False


# --------------------------------------------------------------------------------------------------
# dtype and listing


def preferred_dtype(name: str, device: str | torch.device, dtype: str | torch.dtype | None = None,
                    fallback: torch.dtype | None = None) -> torch.dtype | None:
    """The autocast dtype an encoder runs in (``None``: plain float32).

    Told (``dtype``): that, on any device. A zoo encoder on CUDA: its documented dtype
    (``spec.cuda_dtype``); on the CPU: float32. Other encoders keep ``fallback``.
    """
    if dtype is not None:
        chosen = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(str(dtype).lower())
        if chosen is None:
            raise EncoderError(f"unknown dtype {dtype!r}: one of {', '.join(sorted(set(_DTYPES)))}")
        return None if chosen == torch.float32 else chosen
    spec = get_spec(name)
    if spec is None:
        return fallback
    if torch.device(device).type != "cuda":
        return None
    chosen = _DTYPES[spec.cuda_dtype]
    return None if chosen == torch.float32 else chosen


def zoo_rows(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per named encoder: name, width, input px, parameters (counted on the meta device),
    dtype on CUDA, licence note, hub id."""
    rows = []
    for spec in (ZOO[n] for n in (names or ZOO)):
        size = f"{spec.input_size}" if spec.resize is None else f"{spec.resize}→{spec.input_size}"
        try:
            params: int | None = parameter_count(spec)
        except EncoderError:  # phikon-v2 without transformers: listed all the same
            params = None
        rows.append({"name": spec.name, "dim": spec.dim, "input": size, "params": params,
                     "cuda_dtype": spec.cuda_dtype, "licence": spec.licence, "hub": spec.repo})
    return rows


def _register_all() -> None:
    for spec in _SPECS:
        if spec.family == "registered":
            continue  # built in encoders.py, as it always was

        def factory(pretrained: bool = False, device=None, _spec: EncoderSpec = spec) -> Encoder:
            return build_encoder(_spec, pretrained=pretrained, device=device)

        factory.__doc__ = f"{spec.name}: {spec.dim}-d, {spec.input_size} px, {spec.repo}"
        register_encoder(spec.name)(factory)


_register_all()
