"""Stage 2, read and featurise: only the kept patches are read at 20x, tile-aligned and prefetched,
and the encoder turns them into features in the calling thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hdmil.errors import check_cancelled
from hdmil.inference import as_numpy
from hdmil.pipeline.prescreen import ProgressFn

__all__ = ["Featurised", "featurise"]

# Failed-patch messages kept verbatim in the report; the rest are counted.
MAX_FAILURE_MESSAGES = 10


@dataclass
class Featurised:
    """The read patches' features float32 [K, D], their rows ``read_rows`` int64 [K] of the
    slide's tissue patches, the kept rows that failed to decode (row, message), the reader's
    stage seconds (crop, crop_wait, features) and what it decoded (``reading``)."""

    features: np.ndarray
    read_rows: np.ndarray
    failed: list[tuple[int, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    reading: dict[str, Any] = field(default_factory=dict)

    def failure_messages(self, n_kept: int) -> list[str]:
        """The report's lines about undecodable patches: a count, the first few, how many more."""
        if not self.failed:
            return []
        lines = [f"{len(self.failed)} of {n_kept} kept patches could not be decoded and were skipped"]
        lines.extend(msg for _, msg in self.failed[:MAX_FAILURE_MESSAGES])
        if len(self.failed) > MAX_FAILURE_MESSAGES:
            lines.append(f"... and {len(self.failed) - MAX_FAILURE_MESSAGES} more")
        return lines


def _reading_stats(reader: Any) -> dict[str, Any]:
    return {
        "level": int(reader.level),
        "tiled": bool(reader.tiled),
        "n_tiles_decoded": int(reader.n_tiles_decoded),
        "bytes_decoded": int(reader.bytes_decoded),
    }


def featurise(
    slide: Any,
    grid: Any,
    kept: np.ndarray,
    encoder: Any,
    batch_size: int,
    workers: int | None,
    report: ProgressFn,
    cancel: threading.Event | None,
) -> Featurised:
    """Read the ``kept`` (bool [N]) patches of ``grid`` at 20x and embed them with ``encoder``."""
    from hdmil.reading import PatchReader

    coords = np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2)
    rows = np.flatnonzero(kept)
    feats = np.zeros((len(rows), int(encoder.dim)), np.float32)
    got = np.zeros(len(rows), dtype=bool)
    failed: list[tuple[int, str]] = []
    reader = PatchReader(slide, coords[rows], grid.patch_size_level0, out_px=int(grid.patch_px),
                         batch_size=batch_size, workers=workers)
    t_feat, fallbacks0 = 0.0, _fallbacks(encoder)
    report("features", 0, len(rows))
    batches = reader.batches(cancel=cancel)
    try:
        for batch in batches:
            local = np.asarray(batch.indices, dtype=np.int64)  # rows of coords[rows]
            failed.extend((int(rows[i]), msg) for i, msg in batch.failed)
            if len(local):
                t0 = time.perf_counter()
                feats[local] = as_numpy(encoder.embed(batch.pixels))
                t_feat += time.perf_counter() - t0
                got[local] = True
            report("features", int(got.sum()) + len(failed), len(rows))
    finally:
        batches.close()  # stops the reader thread at once if the encoder raised
    check_cancelled(cancel, f"{slide.path}: reading patches")
    return Featurised(
        features=feats[got], read_rows=rows[got], failed=failed,
        timings={"crop": reader.seconds, "crop_wait": reader.wait_seconds, "features": t_feat},
        reading={**_reading_stats(reader), **_stain_stats(encoder, fallbacks0)},
    )


def _fallbacks(encoder: Any) -> int | None:
    """Background patches a ``StainedEncoder`` has passed through unnormalised so far; None for
    an encoder without stain normalisation."""
    from hdmil.features.stain import stain_of

    return int(encoder.fallbacks) if stain_of(encoder) is not None else None


def _stain_stats(encoder: Any, fallbacks0: int | None) -> dict[str, Any]:
    """The stain normalisation the encoder applied and how many background patches it left as
    they were; nothing for an encoder without one."""
    if fallbacks0 is None:
        return {}
    return {"stain": encoder.stain.method, "stain_fallbacks": int(encoder.fallbacks) - fallbacks0}
