"""Keep the memory of one batch for the next: glibc's allocator tuned for encoder inference.

By default glibc serves every block over a (dynamic) threshold with its own ``mmap`` and unmaps it
when it is freed. An encoder's activations are such blocks: each batch maps them afresh, and the
kernel zero-fills every page on first touch. On CPU that costs more than the convolutions: about
2,500 minor faults per patch for the demo encoder and 27,000 for ResNet-50 truncated at batch 64,
with most of a core in system time (``benchmarks/allocator.py`` measures it).

``keep_freed_memory()`` turns that off for the process: large blocks come from the heap and freed
memory stays with the process (up to ``TRIM_THRESHOLD`` of free space at the heap's top) to be
reused by the next batch. Peak memory becomes the high-water mark of the heap, and it stays the
process's own until it exits.

That mark is more than one forward pass's live memory: the heap fragments (activations are freed
in another order than they were allocated, and a later, larger block does not fit the holes),
where mmap gave every block its own mapping. Measured on resnet50_trunc, 64 patches per pass:
2.8 GB peak against 1.8 GB with glibc's default (``hdmil features`` on a 16k² slide: 3.1 against
1.9 GB); per-thread arenas are not the cause (``M_ARENA_MAX=1``: 2.6 GB), nor the reader's
prefetch queue (two batches of 64 patches, 25 MB). So a CPU encoder runs at most
``CPU_FORWARD_BATCH`` (16) patches per forward pass (``forward_batch``; ``Encoder.max_batch``),
which bounds the heap to that working set: 1.3 GB, below glibc's default at 64, and as fast.
``hdmil.features.create_encoder`` calls it, so every entry point that runs an encoder (the CLI,
the napari worker, Dask workers, the recipe) gets it. It does nothing off glibc, and nothing when
``HDMIL_MALLOC=default`` (for comparison, or where memory must go back to the system).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["CPU_FORWARD_BATCH", "TRIM_THRESHOLD", "forward_batch", "keep_freed_memory"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the heap's top kept for reuse (2 GiB, mallopt's int maximum); beyond it glibc
# gives memory back.
TRIM_THRESHOLD = (1 << 31) - 1
# Patches per encoder forward pass on a tuned CPU process (``forward_batch``)
CPU_FORWARD_BATCH = 16

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc once per process; True when it is tuned (now or before), False where it can't be."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("HDMIL_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return _done
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


def forward_batch(device_type: str) -> int | None:
    """Patches per encoder forward pass: ``CPU_FORWARD_BATCH`` on a CPU process that keeps freed
    memory, else None (each batch as read).

    Kept memory is the heap's high-water mark, and the heap fragments where mmap did not: one
    resnet50_trunc forward pass of 64 patches left a 2.8 GB process (1.8 GB with glibc's default
    allocator), of 16 patches 1.3 GB; the per-thread arenas add little (``M_ARENA_MAX=1``: 2.6 GB
    at 64). On the CPU 16 at a time is as fast as 64 once no page is faulted in again, and the
    features of 16 and of 64 at a time are bitwise equal for resnet50_trunc and the demo encoder.
    """
    if device_type != "cpu" or not keep_freed_memory():
        return None
    return CPU_FORWARD_BATCH
