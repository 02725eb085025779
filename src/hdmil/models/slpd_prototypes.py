"""SLPD's slide prototypes: k-means inside a slide, one-to-one matching across slides.

A slide's prototypes are the L2-normalised k-means centroids of its regions' bottleneck
embeddings (docs/method.md §6). Two slides are as similar as their best one-to-one matching of
prototypes (an assignment problem). Everything here is NumPy: deterministic for a given seed.

Shapes: R regions of a slide, Z bottleneck width, K prototypes per slide, S slides.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "derived_seed",
    "slide_kmeans_seed",
    "kmeans",
    "slide_prototypes",
    "prototype_matching",
    "prototype_similarity",
    "similarity_matrix",
    "slide_neighbours",
    "cross_slide_targets",
]


def derived_seed(*parts: int) -> int:
    """One 32-bit seed from several integers (run seed, epoch, slide ...), well mixed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def slide_kmeans_seed(seed: int, slide_id: str) -> int:
    """The k-means seed of a slide's final prototypes: from the run's seed and the slide's id, so
    the same slide gets the same prototypes in training outputs and at inference."""
    return derived_seed(seed, zlib.crc32(slide_id.encode()))


def kmeans(
    x: np.ndarray, k: int, seed: int = 0, iters: int = 50, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ init from ``np.random.default_rng(seed)``: deterministic.

    x [n, d] (n >= k) -> (centroids [k, d] float64, labels [n] int64). An empty cluster is
    re-seeded with the point farthest from its centroid.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n, got k={k}, n={n}")
    rng = np.random.default_rng(seed)
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(n)]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for c in range(1, k):
        total = d2.sum()
        i = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centers[c] = x[i]
        d2 = np.minimum(d2, ((x - centers[c]) ** 2).sum(1))
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        dist = ((x[:, None, :] - centers[None]) ** 2).sum(-1)  # [n, k]
        labels = dist.argmin(1)
        new = centers.copy()
        for c in range(k):
            members = labels == c
            if members.any():
                new[c] = x[members].mean(0)
            else:  # re-seed with the worst-fitting point
                far = int(dist[np.arange(n), labels].argmax())
                new[c] = x[far]
                labels[far] = c
        shift = ((new - centers) ** 2).sum()
        centers = new
        if shift <= tol:
            break
    labels = ((x[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
    return centers, labels.astype(np.int64)


def slide_prototypes(
    z: np.ndarray, k: int, min_regions: int, seed: int = 0, iters: int = 50
) -> tuple[np.ndarray | None, np.ndarray]:
    """Prototypes of one slide from its regions' L2-normalised embeddings z [R, Z].

    Returns (prototypes [k, Z] L2-normalised, labels [R]) or (None, all -1) when R < min_regions.
    """
    r = len(z)
    if r < max(min_regions, k):
        return None, np.full(r, -1, dtype=np.int64)
    centers, labels = kmeans(z, k, seed=seed, iters=iters)
    norms = np.linalg.norm(centers, axis=1, keepdims=True)
    return (centers / np.maximum(norms, 1e-12)).astype(np.float32), labels


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def prototype_matching(pa: np.ndarray, pb: np.ndarray) -> tuple[float, np.ndarray]:
    """Best one-to-one matching of two prototype sets by cosine similarity.

    pa [Ka, Z], pb [Kb, Z] -> (sum of matched cosines, pairs [min(Ka, Kb), 2] of (i, j)).
    Solved as a linear assignment (Hungarian), not by enumerating K! permutations.
    """
    cos = _unit(pa) @ _unit(pb).T
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return float(cos[rows, cols].sum()), np.stack([rows, cols], 1).astype(np.int64)


def prototype_similarity(pa: np.ndarray, pb: np.ndarray) -> float:
    """Slide similarity in [-1, 1]: the mean cosine over the best one-to-one prototype matching.

    (docs/method.md §6 uses the sum; dividing by the number of pairs ranks the same and stays
    comparable when slides have different K.)
    """
    total, pairs = prototype_matching(pa, pb)
    return total / max(len(pairs), 1)


def similarity_matrix(protos: list[np.ndarray | None]) -> np.ndarray:
    """Pairwise slide similarity [S, S]; NaN where a slide has no prototypes."""
    s = len(protos)
    out = np.full((s, s), np.nan)
    for i in range(s):
        if protos[i] is None:
            continue
        for j in range(i, s):
            if protos[j] is not None:
                out[i, j] = out[j, i] = prototype_similarity(protos[i], protos[j])
    return out


def slide_neighbours(protos: list[np.ndarray | None]) -> np.ndarray:
    """Each slide's most similar other slide (index), -1 for slides without prototypes or peers."""
    sim = similarity_matrix(protos)
    np.fill_diagonal(sim, np.nan)
    out = np.full(len(protos), -1, dtype=np.int64)
    for i in range(len(protos)):
        row = sim[i]
        if protos[i] is not None and np.isfinite(row).any():
            out[i] = int(np.nanargmax(row))
    return out


def cross_slide_targets(own: np.ndarray, neighbour: np.ndarray) -> np.ndarray:
    """For each own prototype [K, Z], the neighbour's most similar prototype -> [K, Z]."""
    cos = _unit(own) @ _unit(neighbour).T
    return np.asarray(neighbour)[cos.argmax(1)]

