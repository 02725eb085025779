"""Allocator benchmark: encoder patches/s with glibc's default allocator against hdmil.allocator.

    python benchmarks/allocator.py                    # demo encoder and resnet50_trunc, batch 64
    python benchmarks/allocator.py --rounds 5 --batches 4 --encoders demo

Each row is a fresh process (``HDMIL_MALLOC=default`` for the baseline, the project's default for
the tuned one), A B A B ... ``--rounds`` times; the table reports the fastest run of each, with its
system time, minor page faults per patch and peak RSS, and the tuned/default ratio of patches/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_WORKER = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from hdmil.checkpoint import default_model_path
from hdmil.features import create_encoder
name, batches = sys.argv[1], int(sys.argv[2])
source = default_model_path().parent / "hdmil-demo-encoder.safetensors" if name == "demo" else name
enc = create_encoder(source, device="cpu")
x = np.random.default_rng(0).integers(0, 255, (64, 256, 256, 3), dtype=np.uint8)
enc.embed(x)  # warm-up: kernel choice, thread pool
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(batches):
    enc.embed(x)
dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
n = 64 * batches
print(json.dumps({"patches_s": n / dt, "sys_s": r1.ru_stime - r0.ru_stime,
                  "faults_per_patch": (r1.ru_minflt - r0.ru_minflt) / n, "rss_mib": r1.ru_maxrss / 1024}))
"""


def run(encoder: str, mode: str, batches: int, threads: int) -> dict:
    env = dict(os.environ, HDMIL_MALLOC="default" if mode == "default" else "")
    out = subprocess.run([sys.executable, "-c", _WORKER, encoder, str(batches), str(threads)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", nargs="+", default=["demo", "resnet50_trunc"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=3, help="timed batches of 64 per process")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for enc in args.encoders:
            for mode in ("default", "tuned"):
                r = run(enc, mode, args.batches, args.threads)
                if (enc, mode) not in best or r["patches_s"] > best[enc, mode]["patches_s"]:
                    best[enc, mode] = r
    print(f"batch 64, {args.threads} threads, fastest of {args.rounds} interleaved fresh processes")
    print("| encoder | allocator | patches/s | system s | minor faults / patch | peak RSS MiB | ratio |")
    print("|---|---|---|---|---|---|---|")
    for enc in args.encoders:
        base = best[enc, "default"]["patches_s"]
        for mode in ("default", "tuned"):
            r = best[enc, mode]
            print(f"| {enc} | {mode} | {r['patches_s']:.1f} | {r['sys_s']:.2f} | "
                  f"{r['faults_per_patch']:.0f} | {r['rss_mib']:.0f} | {r['patches_s'] / base:.2f}× |")


if __name__ == "__main__":
    main()
