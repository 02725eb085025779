"""LIPN: the low-resolution instance pre-screening network (docs/method.md §4).

A tiny MobileNetV4-style CNN over each 16×16 LR patch (the patch's 128 µm square at 1.25x) that
predicts, per class, whether DMIN would keep the instance; only kept instances are read at 20x.

Spatial size per stage on a 16×16 input (every conv pads k // 2, so each stride-2 stage gives
ceil(size / 2) and the 1×1 maps of the last stages still work):

    stage                               channels   size
    input                                     3    16×16
    conv3×3 s2                               16     8×8
    conv3×3 s2                               16     4×4
    conv1×1                                  16     4×4
    conv3×3 s2                               48     2×2
    conv1×1                                  24     2×2
    UIB s2 (expansion 2, depthwise 5/5)      48     1×1
    UIB s2 (expansion 2, depthwise 3/3)      64     1×1
    global average pool                      64     1×1
    conv1×1                                  64     1×1
    Linear                                    C     -

Every plain conv is followed by BatchNorm + ReLU. Inside a UIB block (MobileNetV4's universal
inverted bottleneck, the reference) the starting depthwise and the projection convs get BatchNorm
only, the expansion and middle depthwise convs BatchNorm + ReLU (``uib_form="mnv4"``, the
default). Models saved before that fix had BatchNorm + ReLU after all four (``uib_form="all_relu"``):
a checkpoint whose LIPN config has no ``uib_form`` is one of those and is rebuilt that way
(``LEGACY_UIB_FORM``), so it runs as it was trained. Both forms hold the same weights.

Initialisation as the reference's MobileNetV4: conv weights He-normal over fan-out
(std sqrt(2 / (k·k·out))), BatchNorm 1 / 0, the Linear classifier N(0, 0.01) with zero bias.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hdmil.errors import FeatureFileError
from hdmil.models._eval import evaluating
from hdmil.models.losses import binarize_st

__all__ = [
    "LEGACY_UIB_FORM",
    "LIPN",
    "LIPNConfig",
    "UIB_FORMS",
    "ConvBN",
    "ConvBNReLU",
    "UIBlock",
    "dilate_mask",
    "grid_index",
]

# which convs of a UIB block are followed by a ReLU: (start dw, expand, middle dw, project)
UIB_FORMS: dict[str, tuple[bool, bool, bool, bool]] = {
    "mnv4": (False, True, True, False),  # MobileNetV4, the reference
    "all_relu": (True, True, True, True),  # every model saved before issue 20
}
LEGACY_UIB_FORM = "all_relu"  # what a saved LIPN config without ``uib_form`` was trained with


@dataclass
class LIPNConfig:
    """Hyper-parameters of LIPN (reference widths, docs/method.md §4)."""

    n_classes: int = 2
    tau: float = 0.7  # P = sigmoid(logit / τ)
    threshold: float = 0.5  # M_LR = 1[P > threshold]
    # ours: one threshold per class (set by attention calibration); None: ``threshold`` for all
    class_thresholds: tuple[float, ...] | None = None
    # ours: P is the mean over this many orientations of each LR patch (H&E has none): 1 (the
    # paper), 4 quarter turns, or 8 (quarter turns of the patch and of its mirror image). A steadier
    # ranking of the patches LIPN is unsure about, at views x LIPN's (small) cost
    views: int = 1
    # ours: per class, how many rings of neighbouring patches join each patch that class keeps
    # (0: none; None: 0 for all, the paper). Tumour is contiguous, and at 16 px its boundary
    # patches (half tumour) look half normal: growing the tumour set by one ring reads them
    dilation: tuple[int, ...] | None = None
    in_chans: int = 3
    input_px: int = 16  # LR patch side
    conv_widths: tuple[int, ...] = (16, 16, 16, 48, 24)  # conv3×3 s2, 3×3 s2, 1×1, 3×3 s2, 1×1
    uib_widths: tuple[int, ...] = (48, 64)  # both stride 2
    uib_kernels: tuple[tuple[int, int], ...] = ((5, 5), (3, 3))  # (start dw, middle dw); 0 = none
    uib_expansion: float = 2.0
    head_width: int = 64  # conv1×1 after pooling
    # which convs of a UIB block a ReLU follows (UIB_FORMS): "mnv4" the reference; "all_relu"
    # models saved before issue 20 (their configs lack this key; checkpoint.py fills it in)
    uib_form: str = "mnv4"

    def __post_init__(self) -> None:
        self.conv_widths = tuple(int(v) for v in self.conv_widths)
        self.uib_widths = tuple(int(v) for v in self.uib_widths)
        self.uib_kernels = tuple((int(a), int(b)) for a, b in self.uib_kernels)
        if self.class_thresholds is not None:
            self.class_thresholds = tuple(float(t) for t in self.class_thresholds)
            if len(self.class_thresholds) != self.n_classes:
                raise ValueError(
                    f"LIPNConfig.class_thresholds needs {self.n_classes} values, got "
                    f"{len(self.class_thresholds)}"
                )
        if self.dilation is not None:
            self.dilation = tuple(int(r) for r in self.dilation)
            if len(self.dilation) != self.n_classes or min(self.dilation) < 0:
                raise ValueError(
                    f"LIPNConfig.dilation needs {self.n_classes} ring counts >= 0, got {self.dilation}"
                )
        if self.uib_form not in UIB_FORMS:
            raise ValueError(f"LIPNConfig.uib_form must be one of {', '.join(UIB_FORMS)}, got {self.uib_form!r}")
        if self.views not in (1, 4, 8):
            raise ValueError(f"LIPNConfig.views must be 1, 4 or 8, got {self.views}")
        if self.n_classes < 1:
            raise ValueError(f"LIPNConfig.n_classes must be >= 1, got {self.n_classes}")
        if self.tau <= 0:
            raise ValueError(f"LIPNConfig.tau must be > 0, got {self.tau}")
        if len(self.conv_widths) != 5:
            raise ValueError(f"LIPNConfig.conv_widths needs 5 widths, got {self.conv_widths}")
        if len(self.uib_widths) != len(self.uib_kernels):
            raise ValueError("LIPNConfig.uib_widths and uib_kernels need the same length")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["conv_widths"] = list(self.conv_widths)
        d["uib_widths"] = list(self.uib_widths)
        d["uib_kernels"] = [list(k) for k in self.uib_kernels]
        if self.class_thresholds is not None:
            d["class_thresholds"] = list(self.class_thresholds)
        if self.dilation is not None:
            d["dilation"] = list(self.dilation)
        return d

    def thresholds(self) -> torch.Tensor:
        """float32 [C]: the evaluation threshold of each class."""
        t = self.class_thresholds if self.class_thresholds is not None else (self.threshold,) * self.n_classes
        return torch.tensor(t, dtype=torch.float32)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LIPNConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown LIPN config keys: {', '.join(unknown)}")
        return cls(**d)


class ConvBN(nn.Sequential):
    """Conv2d (padding k // 2, no bias) + BatchNorm, then ReLU when ``act`` (state-dict keys
    ``0.weight``, ``1.*`` either way, so both forms load the same weights)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = False
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ConvBNReLU(ConvBN):
    """Conv2d (padding k // 2, no bias) + BatchNorm + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, groups, act=True)


class UIBlock(nn.Module):
    """Universal inverted bottleneck (MobileNetV4).

    [depthwise k_a] → 1×1 expand (cin·expansion) → [depthwise k_b, carries the stride] → 1×1 project,
    each conv + BatchNorm; ``form`` (``UIB_FORMS``) says which of the four a ReLU follows:
    "mnv4" (MobileNetV4) the expansion and the middle depthwise only.
    A kernel of 0 leaves that depthwise conv out (then the start conv carries the stride, or none).
    Identity shortcut when stride = 1 and cin = cout.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        start_kernel: int,
        mid_kernel: int,
        stride: int = 1,
        expansion: float = 2.0,
        form: str = "mnv4",
    ) -> None:
        super().__init__()
        act_start, act_expand, act_mid, act_project = UIB_FORMS[form]
        hidden = max(1, int(round(cin * expansion)))
        start_stride = stride if mid_kernel == 0 else 1
        self.start_dw = (
            ConvBN(cin, cin, start_kernel, start_stride, groups=cin, act=act_start) if start_kernel else nn.Identity()
        )
        self.expand = ConvBN(cin, hidden, 1, act=act_expand)
        self.mid_dw = (
            ConvBN(hidden, hidden, mid_kernel, stride, groups=hidden, act=act_mid) if mid_kernel else nn.Identity()
        )
        self.project = ConvBN(hidden, cout, 1, act=act_project)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.mid_dw(self.expand(self.start_dw(x))))
        return x + y if self.residual else y


class LIPN(nn.Module):
    """Low-resolution instance pre-screening network: LR patch [N, 3, 16, 16] -> logits [N, C]."""

    def __init__(self, cfg: LIPNConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if cfg is None:
            cfg = LIPNConfig(**kwargs)
        elif kwargs:
            cfg = dataclasses.replace(cfg, **kwargs)
        self.cfg = cfg
        w = cfg.conv_widths
        self.stem = nn.Sequential(
            ConvBNReLU(cfg.in_chans, w[0], 3, 2),
            ConvBNReLU(w[0], w[1], 3, 2),
            ConvBNReLU(w[1], w[2], 1),
            ConvBNReLU(w[2], w[3], 3, 2),
            ConvBNReLU(w[3], w[4], 1),
        )
        blocks = []
        cin = w[4]
        for cout, (ka, kb) in zip(cfg.uib_widths, cfg.uib_kernels):
            blocks.append(UIBlock(cin, cout, ka, kb, stride=2, expansion=cfg.uib_expansion, form=cfg.uib_form))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = ConvBNReLU(cin, cfg.head_width, 1)
        self.fc = nn.Linear(cfg.head_width, cfg.n_classes)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The reference's initialisation (its MobileNetV4's own): conv weights N(0, 2 / (k·k·out)),
        i.e. He-normal over fan-out; BatchNorm weight 1, bias 0; the Linear classifier N(0, 0.01)
        with zero bias. Draws from ``generator`` or torch's global one (the trainers seed it)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01, generator=generator)
                nn.init.zeros_(m.bias)

    @property
    def n_classes(self) -> int:
        return self.cfg.n_classes

    @staticmethod
    def prepare(lr_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
        """LR patches uint8 [N, 16, 16, 3] -> float32 [N, 3, 16, 16] scaled x / 255 − 0.5."""
        x = torch.as_tensor(np.asarray(lr_uint8) if not isinstance(lr_uint8, torch.Tensor) else lr_uint8)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LIPN.prepare expects uint8 [N, H, W, 3], got {tuple(x.shape)}")
        return (x.permute(0, 3, 1, 2).float() / 255.0 - 0.5).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float [N, 3, 16, 16] (from ``prepare``) -> logits [N, C]."""
        x = self.head(self.pool(self.blocks(self.stem(x))))  # [N, 64, 1, 1]
        return self.fc(x.flatten(1))

    def soft_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [N, C] -> M_LR [N, C]: P = sigmoid(logit / τ), 1[P > 0.5] with straight-through."""
        return binarize_st(torch.sigmoid(logits / self.cfg.tau), self.cfg.threshold)

    def _evaluating(self) -> contextlib.AbstractContextManager[None]:
        return evaluating(self)

    @property
    def dilates(self) -> bool:
        """Whether a kept set grows into neighbouring patches (then ``keep_mask`` needs ``index``)."""
        return self.cfg.dilation is not None and max(self.cfg.dilation) > 0

    def keep_mask(
        self,
        lr_uint8: torch.Tensor | np.ndarray,
        batch_size: int = 4096,
        index: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Eval: LR patches uint8 [N, 16, 16, 3] -> bool [N, C] on the CPU (which instances each
        class keeps): P > the class's threshold, grown by ``cfg.dilation`` rings on the patch grid.

        index: int [N, 2] each patch's (row, col) on the slide's patch grid (``PatchGrid.index``,
        ``grid_index``); needed when the config dilates.
        """
        return self.keep_masks(lr_uint8, batch_size, index)[1]

    def keep_masks(
        self,
        lr_uint8: torch.Tensor | np.ndarray,
        batch_size: int = 4096,
        index: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``keep_mask``, also before the dilation: (bool [N, C] P > threshold, bool [N, C]
        grown); the two are the same tensor when the config does not dilate."""
        return self.keep_from(self.probabilities(lr_uint8, batch_size), index)

    def keep_from(
        self, probs: torch.Tensor, index: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keep_masks`` from probabilities already computed (float [N, C], ``probabilities``)."""
        keep = probs > self.cfg.thresholds()
        if not self.dilates:
            return keep, keep
        if index is None:
            raise ValueError(
                f"this LIPN grows its kept sets by {list(self.cfg.dilation)} rings of patches: "
                "keep_mask needs each patch's grid index"
            )
        return keep, torch.from_numpy(dilate_mask(keep.numpy(), index, self.cfg.dilation))

    def probabilities(self, lr_uint8: torch.Tensor | np.ndarray, batch_size: int = 4096) -> torch.Tensor:
        """Eval: LR patches uint8 [N, 16, 16, 3] -> P = sigmoid(logit / τ), float [N, C] on the CPU
        (the mean over ``cfg.views`` orientations of each patch)."""
        n = int(lr_uint8.shape[0])
        if n == 0:
            return torch.zeros(0, self.cfg.n_classes)
        device = next(self.parameters()).device
        out = []
        views = self.cfg.views
        step = max(1, batch_size // views)  # patches per forward pass: ~batch_size inputs in all
        with self._evaluating(), torch.inference_mode(), _few_cpu_threads(device, n):
            for start in range(0, n, step):
                x = self.prepare(lr_uint8[start : start + step]).to(device)
                if views > 1:  # [views * b, 3, 16, 16]: every orientation in one pass
                    sides = (x, x.flip(3)) if views == 8 else (x,)
                    x = torch.cat([torch.rot90(v, k, dims=(2, 3)) for v in sides for k in range(4)])
                # channels-last halves the time of these tiny convolutions on the CPU (measured)
                p = torch.sigmoid(self.forward(x.contiguous(memory_format=torch.channels_last)) / self.cfg.tau)
                out.append(p.reshape(views, -1, p.shape[1]).mean(0).cpu())
        return torch.cat(out)


def grid_index(coords: np.ndarray | None, patch_size_level0: int | None, where: Any = "") -> np.ndarray:
    """Level-0 (x, y) int [N, 2] of patches on a grid of ``patch_size_level0`` px -> (row, col)
    int64 [N, 2]. ``where`` (a feature file) names the source in the error when either is missing."""
    if coords is None or not patch_size_level0:
        raise FeatureFileError(
            f"{where or 'features'}: no patch coords or patch_size_level0, so no patch grid for "
            "LIPN's dilation; re-run `hdmil features` on the slide"
        )
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    return coords[:, ::-1] // int(patch_size_level0)


def dilate_mask(mask: np.ndarray, index: np.ndarray, rings: tuple[int, ...]) -> np.ndarray:
    """Grow each class's kept set into its neighbours on the patch grid.

    mask: bool [N, C]; index: int [N, 2] (row, col) of each patch; rings: [C] ring counts (a ring
    = the 8 neighbours: a square of side 2r + 1). Returns bool [N, C]; only listed (tissue) patches
    can join, and a set never shrinks.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    index = np.asarray(index, dtype=np.int64).reshape(-1, 2)
    if index.shape[0] != mask.shape[0]:
        raise ValueError(f"index must be [N={mask.shape[0]}, 2], got {index.shape}")
    out = mask.copy()
    if not len(index):
        return out
    rc = index - index.min(axis=0)  # the patches' bounding box, not the whole slide
    shape = tuple(int(v) + 1 for v in rc.max(axis=0))
    for c, r in enumerate(rings):
        if r <= 0 or not mask[:, c].any():
            continue
        raster = np.zeros(shape, bool)
        raster[rc[:, 0], rc[:, 1]] = mask[:, c]
        grown = ndimage.binary_dilation(raster, structure=np.ones((2 * r + 1,) * 2, bool))
        out[:, c] = grown[rc[:, 0], rc[:, 1]]
    return out


@contextlib.contextmanager
def _few_cpu_threads(device: torch.device, n: int, per_thread: int = 16384):
    """One CPU thread per ``per_thread`` LR patches while LIPN runs, then torch's setting again.

    LIPN's convolutions on 16 x 16 inputs are so small that with several threads their time goes
    into synchronisation: 36 patches took 0.54 s on 2 threads of a busy 2-core machine, 4 ms on one.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, n // per_thread)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
