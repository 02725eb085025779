"""Feature extraction benchmark: patches/s of our encoders on this CPU against its compute bound.

    python benchmarks/features.py                      # resnet50_trunc and the small encoders
    python benchmarks/features.py --quick              # two configs, no torch.compile
    python benchmarks/features.py --encoders resnet50_trunc --rounds 5

Compute bound, measured in the same run: FLOPs of one 256 px patch (counted with
``torch.utils.flop_counter.FlopCounterMode``, 2 per multiply-add) divided by this machine's fp32
matmul rate (a 2048² ``torch.mm``, the best seen in the run). Each config runs ``Encoder.embed``
on uint8 patches end to end (to tensor, HWC→CHW, normalise, forward). Configs are built and
warmed up (compiled) first, then timed one batch each, round robin, ``--rounds`` times; the best
batch counts, so load from others on a shared machine shows less and hits all configs alike.
Target: resnet50_trunc at >= 60% of the bound with the Encoder's default config.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from hdmil.features import Encoder, create_encoder


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_patch(encoder: Encoder, size: int = 256) -> float:
    x = torch.zeros(1, 3, size, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encoder.model(x)
    return float(counter.get_total_flops())


@dataclass
class Config:
    name: str
    batch: int = 16
    threads: int | None = None
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False


class Runner:
    """One config of one encoder, built and warmed up (compiled) once, timed one batch at a time."""

    def __init__(self, encoder_name: str, cfg: Config, size: int = 256):
        self.cfg = cfg
        with self.threads():
            enc = create_encoder(encoder_name, device="cpu")
            enc.channels_last = cfg.channels_last
            fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
            enc.model.to(memory_format=fmt)
            enc.autocast_dtype = torch.bfloat16 if cfg.bf16 else None
            if cfg.compile:
                enc.model = torch.compile(enc.model)
            self.x = np.random.default_rng(0).integers(0, 256, (cfg.batch, size, size, 3), dtype=np.uint8)
            self.enc = enc
            enc.embed(self.x)  # warm up (and compile)
        self.best = float("inf")

    def threads(self):
        return _Threads(self.cfg.threads)

    def time_batch(self) -> None:
        with self.threads():
            t = time.perf_counter()
            self.enc.embed(self.x)
            self.best = min(self.best, time.perf_counter() - t)

    @property
    def rate(self) -> float:
        return self.cfg.batch / self.best


class _Threads:
    def __init__(self, n: int | None):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def configs(quick: bool) -> list[Config]:
    n = torch.get_num_threads()
    out = [
        Config("fp32 NCHW b16 (baseline)"),
        Config("fp32 channels_last b16 (Encoder default)", channels_last=True),
    ]
    if quick:
        return out
    out += [
        Config("fp32 channels_last b4", batch=4, channels_last=True),
        Config("fp32 channels_last b32", batch=32, channels_last=True),
        Config(f"fp32 channels_last b16, 1 thread (of {n})", threads=1, channels_last=True),
        Config("bf16 autocast channels_last b16", channels_last=True, bf16=True),
        Config("torch.compile channels_last b16", channels_last=True, compile=True),
    ]
    if os.cpu_count() and os.cpu_count() != n:
        n_cpu = os.cpu_count()
        out.append(Config(f"fp32 channels_last b16, {n_cpu} threads", threads=n_cpu, channels_last=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--encoders", nargs="+", default=["resnet50_trunc", "resnet18_trunc", "mobilenetv3_small_100"]
    )
    ap.add_argument("--rounds", type=int, default=3, help="timed batches per config, round robin")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; {load}")
    gflops_before = matmul_gflops()
    print(f"fp32 matmul (2048² torch.mm, best of 5): {gflops_before:.1f} GFLOP/s")

    rows, gflops = [], gflops_before
    for name in args.encoders:
        enc = create_encoder(name, device="cpu")
        flops = flops_per_patch(enc)
        del enc
        runners = []
        for cfg in configs(args.quick):
            try:
                runners.append(Runner(name, cfg))
            except Exception as exc:  # noqa: BLE001 - e.g. torch.compile without a compiler
                print(f"  {name} {cfg.name}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        # Round robin over the configs, best batch of each: load that comes and goes on a shared
        # machine then hits every config alike instead of whichever ran during it.
        for _ in range(args.rounds):
            for runner in runners:
                runner.time_batch()
            gflops = max(gflops, matmul_gflops(reps=2))
        base = runners[0].rate
        for runner in runners:
            rows.append((name, flops, runner.cfg.name, runner.rate, runner.rate / base))
            print(f"  {name:22s} {runner.cfg.name:40s} {runner.rate:7.2f} patches/s", flush=True)

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\nfp32 matmul rate used for the bound (best in the run): {gflops:.1f} GFLOP/s; after: {load}\n")
    print("| encoder | GFLOP/patch | config | patches/s | bound patches/s | % of bound | vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for name, flops, cfg_name, rate, ratio in rows:
        bound = gflops * 1e9 / flops
        print(
            f"| {name} | {flops / 1e9:.2f} | {cfg_name} | {rate:.2f} | {bound:.2f} "
            f"| {100 * rate / bound:.0f}% | {ratio:.2f}x |"
        )


if __name__ == "__main__":
    main()
