"""hdmil.allocator: freed batch memory is reused, not faulted in again (glibc only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate (as torch does for activations: numpy asks for huge pages, which hide the faults),
# touch and free a 256 MiB block twelve times; count the minor page faults of the last
# four. Default glibc maps and unmaps such a block each time (65,536 faults each); tuned, the heap
# keeps it and the later rounds fault (almost) nothing.
_PROBE = """
import resource, sys
import torch
if sys.argv[1] == "tuned":
    from hdmil.allocator import keep_freed_memory
    assert keep_freed_memory()
def touch():
    a = torch.empty(256 << 20, dtype=torch.uint8); a[::4096] = 1; del a
for _ in range(8):  # glibc settles its bins over the first few rounds
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def _faults(mode: str, env: dict | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, env=env)
    return int(out.stdout.strip())


def test_tuned_process_reuses_freed_batches():
    default, tuned = _faults("default"), _faults("tuned")
    assert default > 4 * 60_000  # 256 MiB of 4 KiB pages, four times
    assert tuned < default / 50


def test_hdmil_malloc_default_leaves_glibc_alone():
    env = dict(os.environ, HDMIL_MALLOC="default")
    code = "from hdmil.allocator import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_building_an_encoder_tunes_the_process():
    code = ("import hdmil.allocator as a; from hdmil.features import create_encoder; "
            "create_encoder('resnet18_trunc', device='cpu'); print(a._done)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("malloc, want", [("", "16 None"), ("default", "None None")])
def test_forward_batch_bounds_cpu_passes_only_where_memory_is_kept(malloc, want):
    # the kept heap's high-water mark is one forward pass: 16 patches on the CPU; mmap'd blocks
    # (glibc's default) and GPUs keep the whole batch
    env = dict(os.environ, HDMIL_MALLOC=malloc)
    code = "from hdmil.allocator import forward_batch as f; print(f('cpu'), f('cuda'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == want
