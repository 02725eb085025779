"""Stain augmentation for training: random H&E stain changes in optical-density space.

Slides from different labs (or days) differ mostly in stain: how much haematoxylin and eosin the
tissue took up and the exact hue of each dye. A network trained on a few dozen slides learns those
slides' stains; jittering the stain while training makes it read tissue structure instead.

    jitter = StainJitter(strength=1.0)
    rgb2 = jitter(rgb, rng)        # uint8 [..., 3] -> uint8 [..., 3], one random stain per call

How: Beer–Lambert optical density ``OD = -ln(I / 255)`` is split into haematoxylin, eosin and a
residual with the reference H&E vectors (Macenko's), each dye's amount is scaled by
``exp(N(0, scale_sigma))`` and its OD vector tilted by ``N(0, tilt_sigma)`` per RGB component (then
renormalised), and the image is rebuilt. This is HED-space jitter (Tellez et al., 2018) plus a hue
change of each dye. ``strength`` multiplies both sigmas; 0 returns the input unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["REFERENCE_STAINS", "StainJitter"]

# Macenko's reference H&E OD vectors (R G B), and the residual direction orthogonal to both
_H = np.array([0.5626, 0.7201, 0.4062])
_E = np.array([0.2159, 0.8012, 0.5581])
_R = np.cross(_H, _E) / np.linalg.norm(np.cross(_H, _E))
REFERENCE_STAINS = np.stack([_H, _E, _R]).astype(np.float64)  # [3 dyes, 3 RGB]


@dataclass(frozen=True)
class StainJitter:
    """Random stain change of RGB pixels (see the module docstring).

    Defaults cover the spread of H&E stains between slides of one lab and a bit more: dye amounts
    vary by about ±20% (one sigma) and each dye's OD vector by about 0.06 per RGB component.
    """

    strength: float = 1.0
    scale_sigma: float = 0.2
    tilt_sigma: float = 0.06

    def __post_init__(self) -> None:
        if not self.strength >= 0:
            raise ValueError(f"StainJitter.strength must be >= 0, got {self.strength}")

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One random stain change: float64 [3, 3], new OD = OD @ returned matrix."""
        s = float(self.strength)
        scales = np.exp(rng.normal(0.0, self.scale_sigma * s, 2))
        dyes = REFERENCE_STAINS[:2] + rng.normal(0.0, self.tilt_sigma * s, (2, 3))
        dyes = np.clip(dyes, 0.02, None)
        dyes /= np.linalg.norm(dyes, axis=1, keepdims=True)
        new = np.concatenate([dyes * scales[:, None], REFERENCE_STAINS[2:]])  # residual unchanged
        # amounts C = OD @ inv(REF); new OD = C @ new
        return np.linalg.solve(REFERENCE_STAINS, new)

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 [..., 3] -> uint8 [..., 3] with one random stain change for the whole array."""
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
            raise ValueError(f"StainJitter expects uint8 [..., 3] RGB, got {rgb.dtype} {rgb.shape}")
        if self.strength == 0:
            return rgb
        return apply_stain_matrix(rgb, self.sample(rng))

    def per_item(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 [N, ..., 3] -> uint8 [N, ..., 3], an independent stain change for each item."""
        rgb = np.asarray(rgb)
        if self.strength == 0 or len(rgb) == 0:
            return rgb
        return np.stack([self(item, rng) for item in rgb])


def apply_stain_matrix(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> uint8 [..., 3]: OD = -ln((I + 1) / 256), OD' = OD @ matrix, back to RGB."""
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    od = np.clip(od @ matrix.astype(np.float32), 0.0, None)  # no negative absorbance
    out = 256.0 * np.exp(-od) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
