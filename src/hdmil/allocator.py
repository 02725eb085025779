"""Keep the memory of one batch for the next: glibc's allocator tuned for encoder inference.

By default glibc serves every block over a (dynamic) threshold with its own ``mmap`` and unmaps it
when it is freed. An encoder's activations are such blocks: each batch maps them afresh, and the
kernel zero-fills every page on first touch. On CPU that costs more than the convolutions: about
2,500 minor faults per patch for the demo encoder and 27,000 for ResNet-50 truncated at batch 64,
with most of a core in system time (``benchmarks/allocator.py`` measures it).

``keep_freed_memory()`` turns that off for the process: large blocks come from the heap and freed
memory stays with the process (up to ``TRIM_THRESHOLD`` of free space at the heap's top) to be
reused by the next batch. Peak memory becomes the high-water mark of the heap, the working set of
one batch plus the reader's prefetch queue, not more; it stays the process's own until it exits.
``hdmil.features.create_encoder`` calls it, so every entry point that runs an encoder (the CLI,
the napari worker, Dask workers, the recipe) gets it. It does nothing off glibc, and nothing when
``HDMIL_MALLOC=default`` (for comparison, or where memory must go back to the system).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["TRIM_THRESHOLD", "keep_freed_memory"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the heap's top kept for reuse (2 GiB, mallopt's int maximum); beyond it glibc
# gives memory back.
TRIM_THRESHOLD = (1 << 31) - 1

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
