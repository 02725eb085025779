"""Procedural synthetic H&E whole-slide images with pixel ground truth.

A slide is laid out once at a coarse scale (one pixel per ``mask_downsample`` level-0 px: tissue
blobs, tumour regions, fat, glands, lymphoid aggregates, stain fields, artefacts), then rendered
tile by tile at full resolution. Every fine detail (fibres, fat cells, glands, nuclei) is a pure
function of global pixel coordinates and the seed -- hashed lattices and per-cell point processes
-- so tiles are independent, deterministic, and continuous across their edges.

Colours are mixed in optical density (Beer-Lambert): ``OD = c_H * h + c_E * e``, RGB =
``I0 * exp(-OD)``; stain variation between slides perturbs the stain vectors and concentrations.
The output is a tiled JPEG pyramid TIFF (tifffile, one top-level page per level, no SubIFDs, no
OME) that tiffslide and OpenSlide read as multi-level with mpp. Tiles are streamed: level 0 is
rendered (in worker processes when it pays) and encoded tile by tile; each reduced level is built
from the one above through a band of rows on disk, never a whole level in memory.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hdmil.errors import HDMILError, check_cancelled
from hdmil.files import WriteError, atomic_path, atomic_write, dumps

Progress = Callable[[str, int, int], None]

ARTEFACTS = ("pen", "fold", "blur", "debris")
# Macenko's reference H&E stain vectors (unit OD vectors, R G B).
REFERENCE_H = (0.5626, 0.7201, 0.4062)
REFERENCE_E = (0.2159, 0.8012, 0.5581)
_INKS = {  # pen ink OD directions (R G B): green, blue and black markers
    "green": (0.85, 0.25, 0.60),
    "blue": (0.80, 0.55, 0.10),
    "black": (0.60, 0.60, 0.55),
}
_CHANNELS = ("tissue", "tumor", "fat", "gland", "lymph", "orient", "stain_h", "stain_e",
             "fold", "pen", "blur")
_JPEG_QUALITY = 90
_MAX_TOP_LEVEL = 1024  # reduced levels are added until the smallest fits in this


class SynthError(HDMILError):
    """Bad arguments for a synthetic slide or cohort."""


# ---------------------------------------------------------------------------------------------
# stain


@dataclass(frozen=True)
class Stain:
    """Per-slide stain: unit OD vectors of haematoxylin and eosin, concentration scales, light."""

    h: tuple[float, float, float] = REFERENCE_H
    e: tuple[float, float, float] = REFERENCE_E
    h_scale: float = 1.0
    e_scale: float = 1.0
    background: float = 243.0  # RGB of the glass (I0): empty patches of real scans read about 242

    @classmethod
    def random(cls, seed: int, strength: float = 1.0) -> Stain:
        """A perturbation of the reference stain; ``strength=0`` is the reference itself."""
        s = float(strength)
        if s == 0:
            return cls()
        rng = np.random.default_rng([int(seed), 0x57A1])

        def tilt(v: tuple[float, float, float]) -> tuple[float, float, float]:
            w = np.asarray(v) + rng.normal(0.0, 0.06 * s, 3)
            w = np.clip(w, 0.05, None)
            return tuple(float(x) for x in w / np.linalg.norm(w))  # type: ignore[return-value]

        return cls(
            h=tilt(REFERENCE_H),
            e=tilt(REFERENCE_E),
            h_scale=float(np.exp(rng.normal(0.0, 0.15 * s))),
            e_scale=float(np.exp(rng.normal(0.0, 0.15 * s))),
            background=float(np.clip(243.0 + rng.normal(0.0, 2.5 * s), 232.0, 250.0)),
        )


# ---------------------------------------------------------------------------------------------
# hashing and noise: pure functions of integer lattice coordinates and a key


_C0 = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_C3 = np.uint64(0xD6E8FEB86659FD93)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _C1
    z = (z ^ (z >> np.uint64(27))) * _C2
    return z ^ (z >> np.uint64(31))


def _uniform(key: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float32 for each integer lattice point (iy, ix), stream ``key``."""
    with np.errstate(over="ignore"):
        a = np.asarray(iy, np.int64).view(np.uint64)
        b = np.asarray(ix, np.int64).view(np.uint64)
        k = np.full(np.broadcast_shapes(a.shape, b.shape), key & 0xFFFFFFFFFFFFFFFF, np.uint64)
        z = _mix(k * _C0 ^ _mix(a * _C3 + _C0) ^ _mix(b * _C1 + _C2))
    return ((z >> np.uint64(40)).astype(np.float32)) * np.float32(2.0**-24)


def _uniforms(key: int, iy: np.ndarray, ix: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` <= 4 independent uniforms [0, 1) at 16-bit resolution from one hash per point."""
    with np.errstate(over="ignore"):
        a = np.asarray(iy, np.int64).view(np.uint64)
        b = np.asarray(ix, np.int64).view(np.uint64)
        k = np.full(np.broadcast_shapes(a.shape, b.shape), key & 0xFFFFFFFFFFFFFFFF, np.uint64)
        z = _mix(k * _C0 ^ _mix(a * _C3 + _C0) ^ _mix(b * _C1 + _C2))
    mask = np.uint64(0xFFFF)
    return [((z >> np.uint64(16 * i)) & mask).astype(np.float32) * np.float32(1 / 65536)
            for i in range(n)]


def _interp_rows(u: np.ndarray, smooth: bool) -> tuple[np.ndarray, int]:
    """Weights (len(u), n) of the lattice nodes around positions ``u`` (lattice units), and the
    index of the first node: a separable linear (or smoothstep) interpolation matrix."""
    i0 = np.floor(u).astype(np.int64)
    f = (u - i0).astype(np.float32)
    if smooth:
        f = f * f * (3 - 2 * f)
    lo = int(i0.min())
    n = int(i0.max()) - lo + 2
    m = np.zeros((len(u), n), np.float32)
    r = np.arange(len(u))
    m[r, i0 - lo] = 1 - f
    m[r, i0 - lo + 1] = f
    return m, lo


class _Grid:
    """Pixel centres of a rectangle of level-0 pixels: X (1, W), Y (H, 1)."""

    def __init__(self, x0: int, y0: int, w: int, h: int, step: int = 1):
        self.x0, self.y0, self.step = x0, y0, step
        self.xs = x0 + step * np.arange(w, dtype=np.float64) + step / 2
        self.ys = y0 + step * np.arange(h, dtype=np.float64) + step / 2
        self.X = self.xs[None, :].astype(np.float32)
        self.Y = self.ys[:, None].astype(np.float32)
        self.shape = (h, w)

    def coarser(self) -> _Grid:
        """Every other sample, one more beyond each side: for smooth-but-costly fields."""
        h, w = self.shape
        s = self.step
        return _Grid(self.x0 - 2 * s, self.y0 - 2 * s, w // 2 + 3, h // 2 + 3, 2 * s)

    def upsample(self, a: np.ndarray, src: _Grid) -> np.ndarray:
        """Bilinear resampling of (..., h, w) values on the grid ``src`` onto this grid."""
        my, ly = _interp_rows((self.ys - src.ys[0]) / src.step, smooth=False)
        mx, lx = _interp_rows((self.xs - src.xs[0]) / src.step, smooth=False)
        return my @ a[..., ly: ly + my.shape[1], lx: lx + mx.shape[1]] @ mx.T

    def coarse(self, stack: np.ndarray, ds: int) -> np.ndarray:
        """Bilinear samples of coarse fields (C, Hc, Wc) at the pixel centres -> (C, H, W)."""
        _, hc, wc = stack.shape
        my, ly = _interp_rows(self.ys / ds - 0.5, smooth=False)
        mx, lx = _interp_rows(self.xs / ds - 0.5, smooth=False)
        iy = np.clip(np.arange(ly, ly + my.shape[1]), 0, hc - 1)
        ix = np.clip(np.arange(lx, lx + mx.shape[1]), 0, wc - 1)
        sub = stack[:, iy[:, None], ix[None, :]].astype(np.float32)
        return my @ sub @ mx.T

    def noise(self, scale: float, key: int) -> np.ndarray:
        """Smooth value noise in [0, 1) with feature size ``scale`` px -> (H, W)."""
        my, ly = _interp_rows(self.ys / scale, smooth=True)
        mx, lx = _interp_rows(self.xs / scale, smooth=True)
        iy = np.arange(ly, ly + my.shape[1])[:, None]
        ix = np.arange(lx, lx + mx.shape[1])[None, :]
        return my @ _uniform(key, iy, ix) @ mx.T


class _Points:
    """Scattered level-0 points (N,): nucleus centres."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.X = np.asarray(x, np.float32)
        self.Y = np.asarray(y, np.float32)
        self.shape = self.X.shape

    def coarse(self, stack: np.ndarray, ds: int) -> np.ndarray:
        _, hc, wc = stack.shape
        u = self.X / ds - 0.5
        v = self.Y / ds - 0.5
        i0 = np.floor(u).astype(np.int64)
        j0 = np.floor(v).astype(np.int64)
        fu = (u - i0)[None]
        fv = (v - j0)[None]
        i1 = np.clip(i0 + 1, 0, wc - 1)
        j1 = np.clip(j0 + 1, 0, hc - 1)
        i0 = np.clip(i0, 0, wc - 1)
        j0 = np.clip(j0, 0, hc - 1)
        s = stack

        def at(j: np.ndarray, i: np.ndarray) -> np.ndarray:
            return s[:, j, i].astype(np.float32)

        top = at(j0, i0) * (1 - fu) + at(j0, i1) * fu
        bot = at(j1, i0) * (1 - fu) + at(j1, i1) * fu
        return top * (1 - fv) + bot * fv

    def noise(self, scale: float, key: int) -> np.ndarray:
        u = self.X / scale
        v = self.Y / scale
        i0 = np.floor(u).astype(np.int64)
        j0 = np.floor(v).astype(np.int64)
        fu = u - i0
        fv = v - j0
        fu = fu * fu * (3 - 2 * fu)
        fv = fv * fv * (3 - 2 * fv)
        # the lattice over the points' bounding box, then four gathers
        if i0.size == 0:
            return np.zeros(self.shape, np.float32)
        lox, loy = int(i0.min()), int(j0.min())
        nx = int(i0.max()) - lox + 2
        ny = int(j0.max()) - loy + 2
        gy, gx = np.mgrid[loy: loy + ny, lox: lox + nx]
        lat = _uniform(key, gy, gx).ravel()
        idx = (j0 - loy) * nx + (i0 - lox)
        top = lat.take(idx) * (1 - fu) + lat.take(idx + 1) * fu
        bot = lat.take(idx + nx) * (1 - fu) + lat.take(idx + nx + 1) * fu
        return top * (1 - fv) + bot * fv


def _ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below ``lo``, 1 above ``hi``, linear between."""
    y = (x - lo) * (1.0 / (hi - lo))
    np.maximum(y, 0.0, out=y)
    return np.minimum(y, 1.0, out=y)


# ---------------------------------------------------------------------------------------------
# coarse layout


def _coarse_noise(rng: np.random.Generator, shape: tuple[int, int], feature: float) -> np.ndarray:
    """Zero-mean unit-std smooth noise on a coarse grid, with features of ``feature`` coarse px."""
    from scipy import ndimage

    feature = max(feature, 2.0)
    lat = (int(math.ceil(shape[0] / feature)) + 4, int(math.ceil(shape[1] / feature)) + 4)
    up = ndimage.zoom(rng.standard_normal(lat), feature, order=3, mode="mirror")
    off = (int(feature * 2), int(feature * 2))
    out = up[off[0]: off[0] + shape[0], off[1]: off[1] + shape[1]]
    return ((out - out.mean()) / (out.std() + 1e-9)).astype(np.float32)


def _soften(mask: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(mask.astype(np.float32), sigma)


def _stroke(rng: np.random.Generator, shape: tuple[int, int], n_points: int,
            reach: float) -> np.ndarray:
    """Distance (coarse px) to a smooth random curve: pen strokes and fold lines."""
    from scipy import ndimage

    h, w = shape
    start = np.array([rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w])
    angle = rng.uniform(0, 2 * np.pi)
    pts = [start]
    step = reach / max(n_points - 1, 1)
    for _ in range(n_points - 1):
        angle += rng.normal(0, 0.5)
        pts.append(pts[-1] + step * np.array([np.sin(angle), np.cos(angle)]))
    pts = np.array(pts)
    # dense sampling of the polyline, then a distance transform
    seg = []
    for a, b in zip(pts[:-1], pts[1:], strict=False):
        n = int(np.linalg.norm(b - a)) + 2
        seg.append(a + (b - a) * np.linspace(0, 1, n)[:, None])
    dense = np.round(np.concatenate(seg)).astype(np.int64)
    keep = (dense[:, 0] >= 0) & (dense[:, 0] < h) & (dense[:, 1] >= 0) & (dense[:, 1] < w)
    line = np.ones(shape, bool)
    line[dense[keep, 0], dense[keep, 1]] = False
    if line.all():
        return np.full(shape, np.inf, np.float32)
    return ndimage.distance_transform_edt(line).astype(np.float32)


def _grow_regions(rng: np.random.Generator, tissue: np.ndarray, target: int, n_regions: int,
                  scale: float) -> np.ndarray:
    """Pick ``target`` tissue pixels as ``n_regions`` compact blobs with irregular borders:
    each blob takes the tissue pixels of highest score (closeness to a centre plus noise)."""
    out = np.zeros(tissue.shape, bool)
    free = tissue.copy()
    yy, xx = np.indices(tissue.shape, dtype=np.float32)
    shares = rng.dirichlet(np.full(n_regions, 3.0)) * target
    for share in shares:
        k = int(round(share))
        cand = np.flatnonzero(free)
        if k <= 0 or len(cand) == 0:
            continue
        # prefer centres deep in the tissue so small foci stay whole
        c = cand[rng.integers(len(cand))]
        cy, cx = divmod(int(c), tissue.shape[1])
        radius = max(math.sqrt(k / math.pi), 1.0)
        d = np.hypot(yy - cy, xx - cx) / radius
        score = -d + 0.6 * _coarse_noise(rng, tissue.shape, max(radius * 0.6, 3.0)) * min(
            1.0, radius / scale
        )
        score[~free] = -np.inf
        k = min(k, int(free.sum()))
        idx = np.argpartition(score.ravel(), -k)[-k:]
        out.flat[idx] = True
        free.flat[idx] = False
    return out


@dataclass
class _Layout:
    """Everything a tile needs: coarse fields, sprite banks, per-slide constants. Picklable."""

    size: tuple[int, int]
    mpp: float
    seed: int
    ds: int
    stack: np.ndarray  # float16 (C, Hc, Wc), channels _CHANNELS
    stain: Stain
    artefacts: tuple[str, ...]
    banks: dict[str, np.ndarray]  # kind -> float32 (K, S, S) haematoxylin (or debris) density
    fibre_angles: tuple[float, float]
    ink: tuple[float, float, float]
    blur_sigma: float
    tile: int


def _ch(name: str) -> int:
    return _CHANNELS.index(name)


def _nucleus(rng: np.random.Generator, size: int, rx: float, ry: float, angle: float,
             irregular: float, density: float, chromatin: str) -> np.ndarray:
    """One nucleus sprite: haematoxylin density (size, size), anti-aliased, with chromatin."""
    from scipy import ndimage

    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - c
    ca, sa = math.cos(angle), math.sin(angle)
    u = xx * ca + yy * sa
    v = -xx * sa + yy * ca
    theta = np.arctan2(v / ry, u / rx)
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    edge = np.ones_like(rho)
    for k in range(2, 6):
        edge += irregular * rng.normal() / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    depth = (edge - rho) * min(rx, ry)  # ~ px inside the border
    alpha = np.clip(depth + 0.5, 0, 1)
    if chromatin == "coarse":  # tumour: clumped chromatin, dark membrane, nucleoli
        tex = ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.4)
        tex = 0.45 * tex / (tex.std() + 1e-6)
        rim = 0.45 * np.clip(1 - depth / 2.0, 0, 1)
        val = density * (1 + tex) * 0.85 + rim
        for _ in range(rng.integers(0, 3)):
            ny, nx = rng.normal(0, 0.3 * ry), rng.normal(0, 0.3 * rx)
            val += 0.7 * np.exp(-((yy - ny) ** 2 + (xx - nx) ** 2) / (2 * 1.3**2))
    elif chromatin == "debris":
        tex = ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.0)
        val = density * (1 + 0.3 * tex / (tex.std() + 1e-6))
    else:  # fine, even chromatin
        tex = ndimage.gaussian_filter(rng.standard_normal((size, size)), 0.8)
        val = density * (1 + 0.12 * tex / (tex.std() + 1e-6))
    return (alpha * np.clip(val, 0, None)).astype(np.float32)


# kind -> (cell µm, acceptance, sprite half size µm)
_KINDS = {
    "lymph": (8.0, 0.95, 5.0),
    "stroma": (22.0, 0.9, 8.0),
    "epith": (8.5, 0.95, 6.5),
    "tumor": (12.5, 0.95, 13.0),
    "debris": (160.0, 0.12, 16.0),
}
_N_ANGLES = 12  # stromal nuclei follow the fibres: their sprites come in angle bins


def _make_banks(seed: int, mpp: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0xBA4C])
    px = 1.0 / mpp  # px per µm
    banks: dict[str, np.ndarray] = {}

    def bank(kind: str, n: int, make: Callable[[int], tuple]) -> None:
        half = int(math.ceil(_KINDS[kind][2] * px))
        size = 2 * half + 1
        sprites = [_nucleus(rng, size, *make(i)) for i in range(n)]
        banks[kind] = np.stack(sprites)

    def u(a: float, b: float) -> float:
        return float(rng.uniform(a, b))

    bank("lymph", 24, lambda i: ((r := u(3.1, 3.8) * px), r * u(0.85, 1.0), u(0, np.pi), 0.04,
                                 u(2.5, 3.0), "fine"))
    bank("stroma", _N_ANGLES * 4, lambda i: (u(4.5, 6.5) * px, u(1.1, 1.7) * px,
                                             (i // 4) * np.pi / _N_ANGLES + u(-0.12, 0.12),
                                             0.05, u(1.8, 2.3), "fine"))
    bank("epith", 24, lambda i: (u(4.0, 5.0) * px, u(3.2, 4.2) * px, u(0, np.pi), 0.05,
                                 u(1.5, 1.9), "fine"))
    bank("tumor", 48, lambda i: ((r := u(5.0, 10.0) * px), r * u(0.65, 0.95), u(0, np.pi),
                                 0.16, u(1.9, 2.7), "coarse"))
    bank("debris", 24, lambda i: ((r := u(1.5, 12.0) * px), r * u(0.3, 1.0), u(0, np.pi), 0.3,
                                  u(0.5, 1.8), "debris"))
    return banks


def _make_layout(size: tuple[int, int], seed: int, tumor_fraction: float, mpp: float,
                 stain: Stain, artefacts: tuple[str, ...], tile: int,
                 n_regions: int | None = None) -> _Layout:
    w, h = size
    ds = 16 if max(w, h) <= 16384 else 32
    shape = (h // ds + 1, w // ds + 1)
    rng = np.random.default_rng([seed, 0x1A70])
    um = 1.0 / (mpp * ds)  # coarse px per µm
    # One generator, drawn from in this fixed order: the same seed gives the same slide.
    tissue, tissue_b = _tissue_field(rng, shape)
    fat, gland, lymph = _normal_compartments(rng, tissue_b, um, ds * mpp)
    tumor = _tumour_field(rng, tissue_b, tumor_fraction, n_regions, um)
    orient = np.clip(0.5 + 0.6 * _coarse_noise(rng, shape, 300 * um), 0, 1)
    stain_h = 1 + 0.07 * _coarse_noise(rng, shape, 1500 * um)
    stain_e = 1 + 0.07 * _coarse_noise(rng, shape, 1500 * um)

    # drawn before the artefacts so that adding artefacts leaves the tissue as it was
    a1 = float(rng.uniform(0, np.pi))
    fibre_angles = (a1, a1 + float(rng.uniform(0.6, 1.4)))
    blur_sigma = float(rng.uniform(2.0, 3.5)) * 0.5 / mpp
    fold, pen, blur, ink = _artefact_fields(rng, tissue_b, artefacts, um)

    stack = np.stack([tissue, tumor, fat, gland, lymph, orient, stain_h, stain_e, fold, pen,
                      blur]).astype(np.float16)
    return _Layout(
        size=(w, h), mpp=mpp, seed=seed, ds=ds, stack=stack, stain=stain,
        artefacts=artefacts, banks=_make_banks(seed, mpp), fibre_angles=fibre_angles, ink=ink,
        blur_sigma=blur_sigma, tile=tile,
    )


def _tissue_field(rng: np.random.Generator,
                  shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Tissue as a few smooth blobs covering a drawn share of the slide, away from its border:
    the soft field (float32) and its mask."""
    hc, wc = shape
    yy, xx = np.indices(shape, dtype=np.float32)
    n_blobs = int(rng.integers(1, 4))
    field_ = np.full(shape, -np.inf, np.float32)
    for _ in range(n_blobs):
        field_ = np.maximum(field_, _blob(rng, yy, xx))
    field_ += 0.12 * _coarse_noise(rng, shape, max(hc, wc) / 12)
    border = np.minimum(np.minimum(yy, hc - 1 - yy) / hc, np.minimum(xx, wc - 1 - xx) / wc)
    field_ -= 4.0 * np.clip(0.04 - border, 0, None) / 0.04
    cover = rng.uniform(0.35, 0.55)
    tissue_b = field_ > np.quantile(field_, 1 - cover)
    tissue = _soften(tissue_b, 1.0)
    return tissue, tissue > 0.5


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Signed inside-ness of one rotated ellipse with a wavy border (> 0 inside)."""
    hc, wc = yy.shape
    cy, cx = rng.uniform(0.3, 0.7) * hc, rng.uniform(0.3, 0.7) * wc
    ry = rng.uniform(0.2, 0.4) * hc
    rx = rng.uniform(0.2, 0.4) * wc
    a = rng.uniform(0, np.pi)
    u = ((xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)) / rx
    v = (-(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)) / ry
    theta = np.arctan2(v, u)
    edge = np.ones_like(theta)
    for k in range(2, 7):
        edge += rng.normal(0, 0.12) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return edge - np.hypot(u, v)


def _normal_compartments(rng: np.random.Generator, tissue_b: np.ndarray, um: float,
                         coarse_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fat lobules, glands and lymphoid aggregates (soft fields) inside the tissue mask;
    ``um`` coarse px per µm, ``coarse_um`` µm per coarse px."""
    shape = tissue_b.shape
    wc = shape[1]
    fat_n = _coarse_noise(rng, shape, 500 * um)
    fat = _soften(fat_n > np.quantile(fat_n[tissue_b], 1 - rng.uniform(0.05, 0.3)), 1.0)
    gl_n = _coarse_noise(rng, shape, 400 * um)
    gland = _soften((gl_n > np.quantile(gl_n[tissue_b], 1 - rng.uniform(0.15, 0.35)))
                    & (fat < 0.5), 1.0)
    yy, xx = np.indices(shape, dtype=np.float32)
    lymph = np.zeros(shape, np.float32)
    area_mm2 = tissue_b.sum() * (coarse_um / 1000) ** 2
    cand = np.flatnonzero(tissue_b & (fat < 0.5))
    for _ in range(int(rng.poisson(0.5 * area_mm2)) + 1 if len(cand) else 0):
        cy, cx = divmod(int(cand[rng.integers(len(cand))]), wc)
        r = rng.uniform(50, 130) * um
        lymph += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return fat, gland, np.clip(lymph * 1.2, 0, 1)


def _tumour_field(rng: np.random.Generator, tissue_b: np.ndarray, tumor_fraction: float,
                  n_regions: int | None, um: float) -> np.ndarray:
    """Tumour regions: exactly ``tumor_fraction`` of the tissue, as one or several blobs."""
    shape = tissue_b.shape
    tumor_b = np.zeros(shape, bool)
    if tumor_fraction > 0:
        n_tissue = int(tissue_b.sum())
        if n_regions is None:
            n_regions = 1 if tumor_fraction < 0.06 else int(rng.integers(1, 4))
        target = int(math.ceil(tumor_fraction * n_tissue))
        for _ in range(6):  # softening shaves a little off the borders: top it up
            tumor_b = _grow_regions(rng, tissue_b, target, n_regions, 60 * um)
            got = int(((_soften(tumor_b, 0.7) > 0.5) & tissue_b).sum())
            if got >= tumor_fraction * n_tissue:
                break
            target += int(math.ceil(tumor_fraction * n_tissue)) - got + 1
    return _soften(tumor_b, 0.7) if tumor_b.any() else np.zeros(shape, np.float32)


def _artefact_fields(rng: np.random.Generator, tissue_b: np.ndarray, artefacts: tuple[str, ...],
                     um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                         tuple[float, float, float]]:
    """Fold, pen and blur fields (zero unless asked for) and the pen's ink."""
    shape = tissue_b.shape
    hc, wc = shape
    fold = np.zeros(shape, np.float32)
    pen = np.zeros(shape, np.float32)
    blur = np.zeros(shape, np.float32)
    ink = _INKS["green"]
    if "fold" in artefacts:
        d = _stroke(rng, shape, 6, 0.6 * max(hc, wc))
        fold = np.clip((rng.uniform(40, 120) * um - d) / 1.5 + 0.5, 0, 1)
    if "pen" in artefacts:
        for _ in range(int(rng.integers(1, 3))):
            d = _stroke(rng, shape, 8, rng.uniform(0.3, 0.8) * max(hc, wc))
            pen = np.maximum(pen, np.clip((rng.uniform(50, 150) * um - d) / 1.5 + 0.5, 0, 1))
        ink = _INKS[str(rng.choice(list(_INKS)))]
    if "blur" in artefacts:
        yy, xx = np.indices(shape, dtype=np.float32)
        cand = np.flatnonzero(tissue_b)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = divmod(int(cand[rng.integers(len(cand))]), wc)
            r = rng.uniform(250, 700) * um
            blur = np.maximum(blur, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
        blur = np.clip((blur - 0.3) * 2, 0, 1)
    return fold, pen, blur, ink


# ---------------------------------------------------------------------------------------------
# tile rendering


def _voronoi(c: _Grid | _Points, cell: float, key: int) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """Nearest and second-nearest distance to jittered-grid sites, and the nearest site's own
    random number in [0, 1): fat cells and glands. Each point looks at the 3 x 3 cells around."""
    cx = np.floor(c.X / cell).astype(np.int64)
    cy = np.floor(c.Y / cell).astype(np.int64)
    lox, loy = int(cx.min()) - 1, int(cy.min()) - 1
    nx, ny = int(cx.max()) - lox + 2, int(cy.max()) - loy + 2
    gy, gx = np.mgrid[loy: loy + ny, lox: lox + nx]
    ux, uy, sr = _uniforms(key, gy, gx, 3)
    sx = ((gx + 0.1 + 0.8 * ux) * cell).astype(np.float32).ravel()
    sy = ((gy + 0.1 + 0.8 * uy) * cell).astype(np.float32).ravel()
    sr = sr.ravel()
    base = (cy - loy) * nx + (cx - lox)
    d1 = np.full(base.shape, np.inf, np.float32)
    d2 = d1.copy()
    r1 = np.zeros(base.shape, np.float32)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            idx = base + (oy * nx + ox)
            dx = c.X - sx.take(idx)
            dy = c.Y - sy.take(idx)
            d = dx * dx + dy * dy
            np.minimum(d2, np.maximum(d1, d), out=d2)
            np.copyto(r1, sr.take(idx), where=d < d1)
            np.minimum(d1, d, out=d1)
    return np.sqrt(d1), np.sqrt(d2), r1


@dataclass(frozen=True)
class _TilePlan:
    """What one tile needs, from the peaks of the coarse fields around it."""

    peak: np.ndarray  # float32 [C]: max of each channel of _CHANNELS over the window
    on: dict[str, bool]  # compartment / nucleus kind -> present
    has_tissue: bool
    blur_on: bool
    margin: int  # px rendered beyond the tile on each side when blurring


class _Renderer:
    """Renders level-0 tiles of one layout."""

    def __init__(self, lay: _Layout):
        self.lay = lay
        self.px = 1.0 / lay.mpp
        self.key = (lay.seed * 1_000_003) & 0xFFFFFFFF
        self.h_vec = np.asarray(lay.stain.h, np.float32)
        self.e_vec = np.asarray(lay.stain.e, np.float32)
        self.ink = np.asarray(lay.ink, np.float32)
        self.debris_vec = np.asarray((0.55, 0.62, 0.66), np.float32)
        self.has = {a: a in lay.artefacts for a in ARTEFACTS}
        gy, gx = np.mgrid[0:_GRAIN, 0:_GRAIN]
        self.grain = (_uniform(self.k(12), gy, gx) - 0.5) * 7.0  # sensor noise, periodic
        self.pad = 2 * max(b.shape[1] // 2 for b in lay.banks.values()) + 2

    def k(self, stream: int) -> int:
        return self.key * 64 + stream

    # -- compartments, for pixel grids and for nucleus centres alike
    def compartments(self, c: _Grid | _Points, f: np.ndarray, on: dict[str, bool],
                     full: bool) -> dict[str, np.ndarray]:
        """Soft weights in [0, 1]: t tissue, tu tumour region, tn tumour cell nests, fa fat,
        ly lymphoid, ring / lumen of glands; with ``full`` also fat cell borders."""
        px = self.px
        t = f[_ch("tissue")] + 0.16 * (c.noise(10 * px, self.k(1)) - 0.5) \
            + 0.10 * (c.noise(40 * px, self.k(2)) - 0.5)
        t = _ramp(t, 0.45, 0.55)
        zero = np.zeros_like(t)
        out = {"t": t, "tu": zero, "tn": zero, "fa": zero, "ly": zero, "ring": zero,
               "lumen": zero}
        notu = t
        if on["tumor"]:
            out["tu"] = tu = _ramp(f[_ch("tumor")], 0.44, 0.56) * t
            nest = 0.65 * c.noise(55 * px, self.k(3)) + 0.35 * c.noise(18 * px, self.k(4))
            out["tn"] = tu * _ramp(nest, 0.36, 0.46)
            notu = t * (1 - tu)
        fa = zero
        if on["fat"]:
            out["fa"] = fa = _ramp(f[_ch("fat")], 0.42, 0.58) * notu
        if on["lymph"]:
            out["ly"] = _ramp(f[_ch("lymph")], 0.4, 0.6) * notu * (1 - fa)
        if on["gland"]:  # rings of epithelium around a lumen, on a jittered grid of sites
            gl = _ramp(f[_ch("gland")], 0.42, 0.58) * notu * (1 - fa)
            if isinstance(c, _Grid):  # d1 is continuous: half resolution is enough
                lo = c.coarser()
                d1, _, r1 = _voronoi(lo, 130 * px, self.k(10))
                d1, r1 = c.upsample(np.stack([d1, r1]), lo)
            else:
                d1, _, r1 = _voronoi(c, 130 * px, self.k(10))
            radius = (35 + 25 * r1) * px
            lumen_r = radius * 0.5
            present = gl * (r1 > 0.12)
            out["ring"] = _ramp(radius - d1, -0.75, 0.75) * _ramp(d1 - lumen_r, -0.75, 0.75) \
                * present
            out["lumen"] = _ramp(lumen_r - d1, -0.75, 0.75) * present
        if full and on["fat"]:  # d2 - d1 is continuous too
            lo = c.coarser()
            d1, d2, _ = _voronoi(lo, 60 * px, self.k(20))
            gap = c.upsample(d2 - d1, lo)
            out["fat_border"] = _ramp(1.6 * px - gap, -0.7, 0.7)
        return out

    def nuclei_weights(self, cm: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Probability weight of a nucleus of each kind at each point."""
        t, tn, fa, ly = cm["t"], cm["tn"], cm["fa"], cm["ly"]
        stroma = t * (1 - tn) * (1 - fa) * (1 - cm["ring"] - cm["lumen"]).clip(0, 1)
        return {
            "tumor": tn,
            "lymph": stroma * (ly + 0.025 * (1 - ly)),
            "stroma": stroma * (1 - ly),
            "epith": cm["ring"],
            "debris": 1 - t,
        }

    def nuclei(self, x0: int, y0: int, w: int, h: int,
               on: dict[str, bool]) -> tuple[np.ndarray, np.ndarray | None]:
        """Haematoxylin and debris density (h, w) of every nucleus overlapping the rectangle.

        Nuclei come from one point process per kind over a global grid of cells (a jittered
        site per cell, kept with a probability that follows the local compartments), so a
        nucleus on a tile edge is the same nucleus for both tiles."""
        lay = self.lay
        kinds = [k for k in _KINDS if on[k]]
        cands = []
        for kind in kinds:
            cell_um, p, _ = _KINDS[kind]
            cell = cell_um * self.px
            half = lay.banks[kind].shape[1] // 2
            gx = np.arange(math.floor((x0 - half) / cell), math.floor((x0 + w + half) / cell) + 1)
            gy = np.arange(math.floor((y0 - half) / cell), math.floor((y0 + h + half) / cell) + 1)
            gy, gx = np.meshgrid(gy, gx, indexing="ij")
            gy, gx = gy.ravel(), gx.ravel()
            base = self.k(30 + 4 * list(_KINDS).index(kind))
            ux, uy, acc, pick = _uniforms(base, gy, gx, 4)
            x = (gx + ux) * cell
            y = (gy + uy) * cell
            inside = (x > x0 - half - 1) & (x < x0 + w + half + 1) & \
                     (y > y0 - half - 1) & (y < y0 + h + half + 1)
            cands.append((kind, x[inside], y[inside], acc[inside] / p, pick[inside]))
        hem = _Splat(h, w, self.pad)
        deb = _Splat(h, w, self.pad) if on["debris"] else None
        if cands:
            pts = _Points(np.concatenate([c[1] for c in cands]),
                          np.concatenate([c[2] for c in cands]))
            f = pts.coarse(lay.stack, lay.ds)
            weights = self.nuclei_weights(self.compartments(pts, f, on, full=False))
            start = 0
            for kind, x, y, acc, pick in cands:
                sl = slice(start, start + len(x))
                start += len(x)
                keep = acc < weights[kind][sl]
                if not keep.any():
                    continue
                bank = lay.banks[kind]
                if kind == "stroma":  # follow the local fibre direction
                    a1, a2 = lay.fibre_angles
                    ang = np.where(f[_ch("orient")][sl] < 0.5, a1, a2) % np.pi
                    abin = np.round(ang / np.pi * _N_ANGLES).astype(np.int64) % _N_ANGLES
                    idx = abin * 4 + (pick * 4).astype(np.int64).clip(0, 3)
                else:
                    idx = (pick * len(bank)).astype(np.int64).clip(0, len(bank) - 1)
                target = deb if kind == "debris" else hem
                target.add(bank, idx[keep], np.round(x[keep]).astype(np.int64) - x0,
                           np.round(y[keep]).astype(np.int64) - y0)
        return hem.canvas(), deb.canvas() if deb is not None else None

    def render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of level-0 pixels [y0, y0+h) x [x0, x0+w)."""
        lay = self.lay
        plan = self.plan(x0, y0, w, h)
        m = plan.margin if plan.blur_on else 0
        g = _Grid(x0 - m, y0 - m, w + 2 * m, h + 2 * m)
        hh, ww = g.shape
        f = g.coarse(lay.stack, lay.ds)
        if plan.has_tissue:
            od, deb = self.tissue_od(g, f, plan)
        else:
            od = np.zeros((hh, ww, 3), np.float32)
            deb = self.nuclei(g.x0, g.y0, ww, hh, plan.on)[1] if plan.on["debris"] else None
        od += 0.004  # the glass
        if deb is not None:
            od += np.minimum(deb, 3)[..., None] * self.debris_vec
        if self.has["pen"] and plan.peak[_ch("pen")] > 0.01:
            ink = f[_ch("pen")] * (0.75 + 0.3 * g.noise(90 * self.px, self.k(11)))
            od += ink[..., None] * self.ink
        rgb = np.exp(-od)
        rgb *= lay.stain.background
        if plan.blur_on:
            from scipy import ndimage

            soft = ndimage.gaussian_filter(rgb, (lay.blur_sigma, lay.blur_sigma, 0))
            b = f[_ch("blur")][..., None]
            rgb = (rgb + (soft - rgb) * b)[m: m + h, m: m + w]
        # sensor noise: a periodic function of position, so overlapping renders agree
        rgb += self.grain[np.ix_(np.arange(y0, y0 + h) % _GRAIN,
                                 np.arange(x0, x0 + w) % _GRAIN)][..., None]
        rgb += 0.5
        np.clip(rgb, 0, 255, out=rgb)
        return rgb.astype(np.uint8)

    def plan(self, x0: int, y0: int, w: int, h: int) -> _TilePlan:
        """A cheap look at the coarse window: which parts of the machinery this tile needs."""
        lay = self.lay
        ds = lay.ds
        margin = int(math.ceil(3 * lay.blur_sigma)) + 2
        reach = margin + self.pad  # blur margin plus the largest sprite
        j0, j1 = max((y0 - reach) // ds - 1, 0), (y0 + h + reach) // ds + 3
        i0, i1 = max((x0 - reach) // ds - 1, 0), (x0 + w + reach) // ds + 3
        win = lay.stack[:, j0:j1, i0:i1]
        if win.size == 0:
            win = lay.stack[:, -1:, -1:]
        peak = win.reshape(len(_CHANNELS), -1).max(axis=1).astype(np.float32)
        has_tissue = bool(peak[_ch("tissue")] > 0.25)
        on = {
            "tumor": has_tissue and bool(peak[_ch("tumor")] > 0.3),
            "fat": has_tissue and bool(peak[_ch("fat")] > 0.3),
            "gland": has_tissue and bool(peak[_ch("gland")] > 0.3),
            "lymph": has_tissue,
            "stroma": has_tissue,
            "debris": self.has["debris"],
        }
        on["epith"] = on["gland"]
        blur_on = bool(self.has["blur"] and peak[_ch("blur")] > 0.01)
        return _TilePlan(peak=peak, on=on, has_tissue=has_tissue, blur_on=blur_on, margin=margin)

    def tissue_od(self, g: _Grid, f: np.ndarray,
                  plan: _TilePlan) -> tuple[np.ndarray, np.ndarray | None]:
        """Optical density (H, W, 3) of the stained tissue on grid ``g``; debris density."""
        lay = self.lay
        hh, ww = g.shape
        cm = self.compartments(g, f, plan.on, full=True)
        t = cm["t"]
        E, H = self.stroma(g, f)
        self.paint_compartments(E, H, g, cm, plan.on)
        nuc, deb = self.nuclei(g.x0, g.y0, ww, hh, plan.on)
        np.clip(nuc, 0, 4.0, out=nuc)
        E *= 1 - 0.75 * np.minimum(nuc, 1)
        H += nuc
        H *= t * f[_ch("stain_h")] * lay.stain.h_scale
        E *= t * f[_ch("stain_e")] * lay.stain.e_scale
        if self.has["fold"] and plan.peak[_ch("fold")] > 0.01:  # a double layer: twice the stain
            fold = 1 + 0.9 * f[_ch("fold")] * t
            H *= fold
            E *= fold
        return H[..., None] * self.h_vec + E[..., None] * self.e_vec, deb

    def stroma(self, g: _Grid, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Eosin and haematoxylin of the stroma: wavy collagen fibres in two families of
        directions, in bundles."""
        px = self.px
        a1, a2 = self.lay.fibre_angles
        warp = 8.0 * g.noise(45 * px, self.k(5)) + 3.0 * g.noise(11 * px, self.k(13))
        lam = 2 * np.pi / (7.0 * px)
        s1 = np.sin((g.Y * math.cos(a1) - g.X * math.sin(a1)) * lam + warp)
        s2 = np.sin((g.Y * math.cos(a2) - g.X * math.sin(a2)) * lam + warp)
        fib = 0.5 + 0.5 * (s1 + (s2 - s1) * f[_ch("orient")])
        bundle = _ramp(g.noise(16 * px, self.k(6)), 0.15, 0.85)
        fib = fib * fib * (0.15 + 0.85 * bundle) + 0.3 * g.noise(4 * px, self.k(7))
        E = 0.6 + 1.2 * fib
        H = 0.16 + 0.06 * g.noise(8 * px, self.k(8))
        return E, H

    def paint_compartments(self, E: np.ndarray, H: np.ndarray, g: _Grid,
                           cm: dict[str, np.ndarray], on: dict[str, bool]) -> None:
        """Blend glands, lymphoid tissue, fat and tumour nests into ``E`` and ``H`` (in place)."""
        if on["gland"]:
            ring, lumen = cm["ring"], cm["lumen"]
            E += (0.85 - E) * ring + (0.12 - E) * lumen
            H += (0.35 - H) * ring + (0.03 - H) * lumen
        ly = cm["ly"]
        E += (0.55 - E) * ly
        H += (0.45 - H) * ly
        if on["fat"]:
            fa = cm["fa"]
            E += (0.03 + 1.1 * cm["fat_border"] - E) * fa
            H += (0.04 - H) * fa
        if on["tumor"]:
            tn = cm["tn"]
            mott = 0.8 + 0.4 * g.noise(6 * self.px, self.k(9))
            E += (1.05 * mott - E) * tn
            H += (0.62 * mott - H) * tn


_GRAIN = 509  # period of the sensor noise (a prime, so it never lines up with tiles)


class _Splat:
    """Accumulates sprites into a canvas with one ``bincount``: vectorised, clipped at edges."""

    def __init__(self, h: int, w: int, pad: int):
        self.h, self.w, self.pad = h, w, pad
        self.flat: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []

    def add(self, bank: np.ndarray, idx: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Sprites ``bank[idx]`` (n, s, s) centred at local (x, y)."""
        s = bank.shape[1]
        half = s // 2
        wp = self.w + 2 * self.pad
        top = y - half + self.pad
        left = x - half + self.pad
        ok = (top >= 0) & (top + s <= self.h + 2 * self.pad) & (left >= 0) & (left + s <= wp)
        oy, ox = np.mgrid[0:s, 0:s]
        self.flat.append(((top[ok, None] + oy.ravel()) * wp + left[ok, None] + ox.ravel()).ravel())
        self.vals.append(bank[idx[ok]].ravel())

    def canvas(self) -> np.ndarray:
        hp, wp = self.h + 2 * self.pad, self.w + 2 * self.pad
        if not self.flat:
            return np.zeros((self.h, self.w), np.float32)
        acc = np.bincount(np.concatenate(self.flat), np.concatenate(self.vals), minlength=hp * wp)
        acc = acc.reshape(hp, wp)[self.pad: self.pad + self.h, self.pad: self.pad + self.w]
        return acc.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# workers: level-0 tiles rendered and JPEG-encoded in parallel

_WORKER: _Renderer | None = None


def _one_blas_thread():
    """Tiles are small matrix products: a threaded BLAS only spins (badly so on a busy machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _worker_init(lay: _Layout) -> None:
    global _WORKER
    _WORKER = _Renderer(lay)
    _one_blas_thread()


def _encode(tile: np.ndarray) -> bytes:
    import imagecodecs

    # the same call tifffile makes for compression='jpeg', photometric='rgb' (YCbCr 2x2)
    return imagecodecs.jpeg_encode(tile, level=_JPEG_QUALITY, colorspace="RGB",
                                   outcolorspace="YCBCR", subsampling=(2, 2))


def _reduce4(a: np.ndarray) -> np.ndarray:
    """4x4 box average of (H, W, 3) uint8 with H, W multiples of 4."""
    b = a.astype(np.uint16)
    b = b[0::4] + b[1::4] + b[2::4] + b[3::4]  # strided adds: far faster than sum(axis=...)
    b = b[:, 0::4] + b[:, 1::4] + b[:, 2::4] + b[:, 3::4]
    b += 8
    b >>= 4
    return b.astype(np.uint8)


def _tile_job(r: _Renderer, ty: int, tx: int) -> tuple[bytes, np.ndarray]:
    t = r.lay.tile
    tile = r.render(tx * t, ty * t, t, t)
    return _encode(tile), _reduce4(tile)


def _worker_tile(args: tuple[int, int]) -> tuple[bytes, np.ndarray]:
    assert _WORKER is not None
    return _tile_job(_WORKER, *args)


# ---------------------------------------------------------------------------------------------
# the public API


@dataclass
class SynthSlide:
    """A synthetic slide on disk and its ground truth.

    Masks are at one pixel per ``mask_downsample`` level-0 px; ``tumor_mask`` is inside
    ``tissue_mask``. ``tumor_fraction`` is the tumour share of the tissue area.
    """

    path: Path
    size: tuple[int, int]
    mpp: float
    tumor_mask: np.ndarray
    tissue_mask: np.ndarray
    mask_downsample: int
    seed: int = 0
    stain: Stain = field(default_factory=Stain)
    artefacts: tuple[str, ...] = ()
    artefact_masks: dict[str, np.ndarray] = field(default_factory=dict)
    level_dimensions: tuple[tuple[int, int], ...] = ()

    @property
    def tumor_fraction(self) -> float:
        n = int(self.tissue_mask.sum())
        return float(self.tumor_mask.sum() / n) if n else 0.0

    def tumor_polygons(self) -> list[list[np.ndarray]]:
        """Tumour regions as polygons: each a list of rings (exterior first, then holes), each
        ring float64 [K, 2] of level-0 (x, y), closed."""
        return mask_polygons(self.tumor_mask, self.mask_downsample)

    def truth_geojson(self) -> dict:
        """The tumour polygons as a GeoJSON FeatureCollection (QuPath-style annotations)."""
        features = []
        for rings in self.tumor_polygons():
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon",
                             "coordinates": [np.round(r, 1).tolist() for r in rings]},
                "properties": {"objectType": "annotation",
                               "classification": {"name": "Tumor", "color": [200, 0, 0]}},
            })
        return {"type": "FeatureCollection", "features": features}

    def patch_truth(self, patch_size_level0: int | None = None) -> dict[str, np.ndarray]:
        """Tumour and tissue fraction per patch on the 20x grid: patch ``(row, col)`` has its
        top-left corner at level-0 ``(col * p, row * p)``, ``p = round(256 * 0.5 / mpp)``; the
        partial last row and column count, as on ``hdmil.grid``'s padded grid (their fractions
        are of the part on the slide)."""
        p = patch_size_level0 or int(round(256 * 0.5 / self.mpp))
        w, h = self.size
        rows, cols = -(-h // p), -(-w // p)
        ds = self.mask_downsample
        # coarse pixel (i, j) covers level-0 [j*ds, (j+1)*ds): assign it to the patch of its centre
        centres_r = ((np.arange(self.tumor_mask.shape[0]) + 0.5) * ds // p).astype(np.int64)
        centres_c = ((np.arange(self.tumor_mask.shape[1]) + 0.5) * ds // p).astype(np.int64)

        def frac(mask: np.ndarray) -> np.ndarray:
            sums = np.zeros((rows + 1, cols + 1))
            counts = np.zeros((rows + 1, cols + 1))
            rr = np.clip(centres_r, 0, rows)[:, None]
            cc = np.clip(centres_c, 0, cols)[None, :]
            rr, cc = np.broadcast_arrays(rr, cc)
            np.add.at(sums, (rr.ravel(), cc.ravel()), mask.ravel().astype(np.float64))
            np.add.at(counts, (rr.ravel(), cc.ravel()), 1.0)
            return (sums[:rows, :cols] / np.maximum(counts[:rows, :cols], 1)).astype(np.float32)

        r, c = np.mgrid[0:rows, 0:cols]
        index = np.stack([r.ravel(), c.ravel()], axis=1).astype(np.int64)
        return {
            "tumor_fraction": frac(self.tumor_mask),
            "tissue_fraction": frac(self.tissue_mask),
            "index": index,
            "coords": (index[:, ::-1] * p).astype(np.int64),
            "patch_size_level0": np.int64(p),
            "mpp": np.float64(self.mpp),
        }


def mask_polygons(mask: np.ndarray, downsample: int) -> list[list[np.ndarray]]:
    """Polygons (exterior + holes, level-0 (x, y), closed rings) of a coarse boolean mask."""
    from skimage import measure

    labels = measure.label(mask, connectivity=1)
    out = []
    for region in measure.regionprops(labels):
        r0, c0 = region.bbox[:2]
        sub = np.pad(region.image, 1).astype(np.float32)
        rings = []
        for ring in measure.find_contours(sub, 0.5):
            ring = measure.approximate_polygon(ring, tolerance=0.5)
            if len(ring) < 4:
                continue
            xy = np.stack([(ring[:, 1] + c0 - 1 + 0.5) * downsample,
                           (ring[:, 0] + r0 - 1 + 0.5) * downsample], axis=1)
            if not np.array_equal(xy[0], xy[-1]):
                xy = np.vstack([xy, xy[:1]])
            rings.append(xy)
        if rings:
            areas = [abs(_ring_area(r)) for r in rings]
            ext = int(np.argmax(areas))
            out.append([rings[ext]] + [r for i, r in enumerate(rings) if i != ext])
    return out


def _ring_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _level_dims(size: tuple[int, int], factor: int = 4) -> list[tuple[int, int]]:
    dims = [size]
    while max(dims[-1]) > _MAX_TOP_LEVEL and min(dims[-1]) >= factor:
        w, h = dims[-1]
        dims.append((w // factor, h // factor))
    return dims


def _check_args(out_path: Path, size: tuple[int, int], tumor_fraction: float, mpp: float,
                tile: int, artefacts: Iterable[str] | None) -> tuple[str, ...]:
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise SynthError(f"{out_path}: size must be (width, height), got {size!r}") from None
    if w < 16 or h < 16:
        raise SynthError(f"{out_path}: slide size {w} x {h} px is too small (16 px at least)")
    if not 0.0 <= tumor_fraction <= 1.0:
        raise SynthError(f"{out_path}: tumor_fraction must be in [0, 1], got {tumor_fraction}")
    if not mpp > 0:
        raise SynthError(f"{out_path}: mpp must be > 0, got {mpp}")
    if tile < 16 or tile % 16:
        raise SynthError(f"{out_path}: tile must be a multiple of 16, got {tile}")
    if artefacts is None:
        return ()
    if isinstance(artefacts, str):
        artefacts = ARTEFACTS if artefacts == "all" else (artefacts,)
    names = tuple(dict.fromkeys(str(a) for a in artefacts))
    bad = [a for a in names if a not in ARTEFACTS]
    if bad:
        raise SynthError(f"{out_path}: unknown artefact(s) {bad}; choose from {list(ARTEFACTS)}")
    return names


def synth_slide(
    out_path: str | os.PathLike,
    size: tuple[int, int] = (4096, 4096),
    seed: int = 0,
    tumor_fraction: float = 0.0,
    mpp: float = 0.5,
    tile: int = 256,
    stain: Stain | float | None = None,
    artefacts: Iterable[str] | str | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    workers: int | None = None,
    n_regions: int | None = None,
) -> SynthSlide:
    """Write a synthetic H&E slide (tiled JPEG pyramid TIFF) and return it with its ground truth.

    Args:
        out_path: the .tiff to write (parents are created; written atomically).
        size: level-0 (width, height) in px.
        seed: everything follows from it: same seed, same pixels.
        tumor_fraction: tumour share of the tissue area (0 = a normal slide).
        mpp: µm per level-0 px; cell sizes are physical, so they scale with it.
        tile: TIFF tile side.
        stain: a ``Stain``, or the strength of a per-seed random perturbation of the reference
            stain (``None`` = 1.0, ``0`` = the reference).
        artefacts: any of ``ARTEFACTS`` ("pen", "fold", "blur", "debris"), or "all".
        progress: ``progress(stage, done, total)`` over tiles of all levels.
        cancel: a ``threading.Event``; when set, ``Cancelled`` is raised and nothing is left.
        workers: processes rendering level-0 tiles (default: up to 2 for slides of 1024 tiles
            and more, else 1 = in this process). Workers are spawned, so a script calling this
            needs the usual ``if __name__ == "__main__":`` guard.
        n_regions: number of tumour regions (default: 1 for small foci, else 1 to 3).
    """
    out_path = Path(out_path)
    names = _check_args(out_path, size, tumor_fraction, mpp, tile, artefacts)
    size = (int(size[0]), int(size[1]))
    if not isinstance(stain, Stain):
        stain = Stain.random(seed, 1.0 if stain is None else float(stain))
    lay = _make_layout(size, int(seed), float(tumor_fraction), float(mpp), stain, names, tile,
                       n_regions)
    dims = _level_dims(size)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _write_pyramid(out_path, lay, dims, workers, progress, cancel)
    except (OSError, WriteError) as exc:  # unwritable folder, full disk: the user's to fix
        raise SynthError(f"{out_path}: cannot write the slide: {_os_reason(exc)}") from exc

    st = lay.stack.astype(np.float32)
    tissue = st[_ch("tissue")] > 0.5
    tumor = (st[_ch("tumor")] > 0.5) & tissue
    amasks = {}
    if "pen" in names:
        amasks["pen"] = st[_ch("pen")] > 0.5
    if "fold" in names:
        amasks["fold"] = (st[_ch("fold")] > 0.5) & tissue
    if "blur" in names:
        amasks["blur"] = st[_ch("blur")] > 0.5
    return SynthSlide(path=out_path, size=size, mpp=float(mpp), tumor_mask=tumor,
                      tissue_mask=tissue, mask_downsample=lay.ds, seed=int(seed), stain=stain,
                      artefacts=names, artefact_masks=amasks, level_dimensions=tuple(dims))


def _os_reason(exc: BaseException) -> str:
    """The system's words for a failed write (a ``WriteError`` carries its ``OSError``)."""
    if isinstance(exc, WriteError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return str(exc)


def _default_workers(n_tiles: int) -> int:
    if n_tiles < 1024:  # starting processes costs more than it saves
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def _write_pyramid(path: Path, lay: _Layout, dims: list[tuple[int, int]], workers: int | None,
                   progress: Progress | None, cancel: threading.Event | None) -> None:
    """Render, encode and write every level into ``path`` (atomically: all of it or nothing)."""
    import tifffile

    t = lay.tile
    w, h = dims[0]
    ntx, nty = -(-w // t), -(-h // t)
    total = sum((-(-lw // t)) * (-(-lh // t)) for lw, lh in dims)
    workers = _default_workers(ntx * nty) if workers is None else max(1, int(workers))
    tick = _Ticker(f"{path}: synthetic slide", total, progress, cancel)
    resolution = (1e4 / lay.mpp, 1e4 / lay.mpp)
    common = dict(
        dtype=np.uint8, tile=(t, t), compression="jpeg",
        compressionargs={"level": _JPEG_QUALITY}, photometric="rgb",
        resolution=resolution, resolutionunit="CENTIMETER", metadata=None,
        buffersize=8 << 20, maxworkers=1,
    )
    big = w * h * 3 > 2**31  # JPEG is small, but stay safe for huge slides
    with tempfile.TemporaryDirectory(prefix="hdmil-synth-", dir=path.parent) as scratch, \
            atomic_path(path) as tmp:
        # each level's 4x reduction, on disk band by band, is the source of the next level
        bands = [Path(scratch) / f"level{k}.raw" for k in range(len(dims))] + [None]
        with _one_blas_thread(), tifffile.TiffWriter(tmp, bigtiff=big) as tw:
            with _level0_results(lay, ntx, nty, workers) as results:
                tw.write(_level0_tiles(results, ntx, t // 4, bands[1], tick),
                         shape=(h, w, 3), subfiletype=0,
                         description=f"hdmil synthetic H&E slide seed={lay.seed} mpp={lay.mpp}",
                         software="hdmil.synth", **common)
            for k in range(1, len(dims)):
                lw, lh = dims[k]
                tw.write(_reduced_tiles(dims, k, t, bands[k], bands[k + 1], tick),
                         shape=(lh, lw, 3), subfiletype=1, **common)


class _Ticker:
    """Counts the tiles written over all levels: cancellation is checked at each, progress
    reported every 16."""

    def __init__(self, what: str, total: int, progress: Progress | None,
                 cancel: threading.Event | None):
        self.what, self.total, self.progress, self.cancel = what, total, progress, cancel
        self.done = 0

    def __call__(self) -> None:
        self.done += 1
        check_cancelled(self.cancel, self.what)
        if self.progress is not None and (self.done % 16 == 0 or self.done == self.total):
            self.progress("synth", self.done, self.total)


@contextlib.contextmanager
def _level0_results(lay: _Layout, ntx: int, nty: int,
                    workers: int) -> Iterator[Iterator[tuple[bytes, np.ndarray]]]:
    """(JPEG bytes, 4x reduction) of every level-0 tile in row-major order, rendered in
    ``workers`` spawned processes (or in this one for 1); the pool ends with the block."""
    jobs = ((ty, tx) for ty in range(nty) for tx in range(ntx))
    if workers <= 1:
        r = _Renderer(lay)
        yield (_tile_job(r, ty, tx) for ty, tx in jobs)
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(workers, initializer=_worker_init, initargs=(lay,))
    try:
        yield pool.imap(_worker_tile, jobs, chunksize=4)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _level0_tiles(results: Iterator[tuple[bytes, np.ndarray]], ntx: int, q: int,
                  band_file: Path | None, tick: _Ticker) -> Iterator[bytes]:
    """The encoded level-0 tiles for tifffile; each row of their reductions goes to
    ``band_file`` (the source of level 1)."""
    sink = open(band_file, "wb") if band_file is not None else None
    try:
        band = np.zeros((q, ntx * q, 3), np.uint8)
        for i, (data, small) in enumerate(results):
            tx = i % ntx
            band[:, tx * q: (tx + 1) * q] = small
            if sink is not None and tx == ntx - 1:
                sink.write(band.tobytes())
            tick()
            yield data
    finally:
        if sink is not None:
            sink.close()


def _reduced_tiles(dims: list[tuple[int, int]], k: int, t: int, src_file: Path,
                   band_file: Path | None, tick: _Ticker) -> Iterator[np.ndarray]:
    """Tiles of level k read band by band from level k-1's reduction in ``src_file``; each band
    is reduced again into ``band_file`` for level k+1."""
    q = t // 4
    lw, lh = dims[k]
    src_w = (-(-dims[k - 1][0] // t)) * q  # width of the reduction written by level k-1
    src_h = (-(-dims[k - 1][1] // t)) * q
    kx, ky = -(-lw // t), -(-lh // t)
    sink = open(band_file, "wb") if band_file is not None else None
    try:
        with open(src_file, "rb") as src:
            for ty in range(ky):
                rows = min(t, src_h - ty * t)
                band = np.zeros((t, kx * t, 3), np.uint8)
                if rows > 0:
                    src.seek(ty * t * src_w * 3)
                    raw = np.frombuffer(src.read(rows * src_w * 3), np.uint8)
                    raw = raw.reshape(rows, src_w, 3)
                    cw = min(src_w, kx * t)
                    band[:rows, :cw] = raw[:, :cw]
                if sink is not None:
                    sink.write(_reduce4(band).tobytes())
                for tx in range(kx):
                    tick()
                    yield band[:, tx * t: (tx + 1) * t]
    finally:
        if sink is not None:
            sink.close()


# ---------------------------------------------------------------------------------------------
# the demo slide shared by the napari sample and `make demo`

DEMO = {"size": (8192, 8192), "seed": 20240, "tumor_fraction": 0.12, "artefacts": ("pen",)}
_DEMO_VERSION = 1  # bump when the generator's output changes: caches regenerate


def cache_dir() -> Path:
    """Where generated data lives: $HDMIL_CACHE, else $XDG_CACHE_HOME/napari-hdmil, else
    ~/.cache/napari-hdmil."""
    env = os.environ.get("HDMIL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "napari-hdmil"


def demo_slide_path(create: bool = True, directory: str | os.PathLike | None = None,
                    progress: Progress | None = None,
                    cancel: threading.Event | None = None) -> Path:
    """Path of the demo slide (8192 x 8192 px at 0.5 µm/px with a tumour area), generated on
    first use into ``directory`` (default: ``cache_dir()``). Its truth sits beside it as
    ``<stem>.truth.geojson``."""
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / f"hdmil-demo-slide-v{_DEMO_VERSION}.tiff"
    if path.exists() or not create:
        return path
    s = synth_slide(path, progress=progress, cancel=cancel, **DEMO)
    with atomic_write(path.with_name(path.stem + ".truth.geojson")) as fh:
        fh.write(dumps(s.truth_geojson()))
    return path
