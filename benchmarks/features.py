"""Feature extraction benchmark: every way we can run an encoder on this CPU, side by side.

    python benchmarks/features.py                         # resnet50_trunc and the demo encoder
    python benchmarks/features.py --quick                 # four rows, one round
    python benchmarks/features.py --encoders demo --rounds 3 --batches 4

Each row runs in a fresh child process: build the encoder, set the row's configuration, warm up,
then ``Encoder.embed`` on ``--batches`` batches of 64 uint8 patches as the reader hands them
(to tensor, HWC→CHW, normalise, forward), timed, with the child's own ``resource.getrusage``
deltas over the timed part: system seconds and minor page faults per patch (a per-batch mmap of
the activations shows here, see hdmil.allocator), and its peak RSS. Rows run round robin
``--rounds`` times and the fastest run of each counts, so a shared machine's load hits all rows
alike (torch.compile, minutes to compile here, runs in the first round only). Each child also embeds 8 fixed patches; the table gives each row's distance from torch
fp32's features (relative L2, worst patch): a backend is a candidate default only within 1e-4.

Ceiling: the fastest row of the encoder in this run (the best configuration this machine
reaches). For reference, the matmul bound: FLOPs of one 256 px patch (``FlopCounterMode``, 2 per
multiply-add) over a 2048² fp32 ``torch.mm``'s rate (best in the run); convolutions may beat it
(oneDNN's Winograd and AMX do fewer or faster operations), so it is no ceiling. Rows:

  torch fp32, glibc default      what ran before hdmil.allocator: mmap per activation (HDMIL_MALLOC=default)
  torch fp32, 64 per pass        hdmil.allocator, the whole batch in one forward pass
  torch fp32 (library default)   16 patches per pass (hdmil.allocator.forward_batch)
  ... 4 / 32 per pass, 1 thread, NCHW, bf16 autocast, torch.compile, onnxruntime (when installed)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
cfg = json.loads(sys.argv[1])
if cfg["threads"]:
    torch.set_num_threads(cfg["threads"])
from hdmil.checkpoint import default_model_path
from hdmil.compute import Compute, apply_compute
from hdmil.features import create_encoder
name = cfg["encoder"]
src = default_model_path().parent / "hdmil-demo-encoder.safetensors" if name == "demo" else name
enc = create_encoder(src, device="cpu")
if not cfg["channels_last"]:
    enc.channels_last = False
    enc.model.to(memory_format=torch.contiguous_format)
if cfg["compile"]:
    enc.model = torch.compile(enc.model)
backend = cfg["backend"]
apply_compute(enc, Compute("cpu", cfg["dtype"], backend, cfg["per_pass"], torch.get_num_threads()))
x = np.random.default_rng(0).integers(0, 256, (64, 256, 256, 3), dtype=np.uint8)
enc.embed(x)  # warm up: kernel choice, thread pool, compilation; the heap reaches its size
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(cfg["batches"]):
    enc.embed(x)
dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
n = 64 * cfg["batches"]
probe = np.random.default_rng(1).integers(0, 256, (8, 256, 256, 3), dtype=np.uint8)
np.save(cfg["features_out"], enc.embed(probe).numpy())
print(json.dumps({"patches_s": n / dt, "sys_ms": 1000 * (r1.ru_stime - r0.ru_stime) / n,
                  "faults": (r1.ru_minflt - r0.ru_minflt) / n, "rss_mib": r1.ru_maxrss / 1024}))
"""


@dataclass
class Row:
    name: str
    per_pass: int | None = 16
    threads: int = 0  # 0: torch's default
    channels_last: bool = True
    dtype: str = "float32"
    backend: str = "torch"
    compile: bool = False
    malloc: str = ""  # "default": HDMIL_MALLOC=default
    once: bool = False  # costly to set up (torch.compile): the first round only


def rows(quick: bool) -> list[Row]:
    from hdmil.compute import onnxruntime_available

    out = [Row("torch fp32, glibc default (before)", per_pass=None, malloc="default"),
           Row("torch fp32, 64 per pass", per_pass=None),
           Row("torch fp32, 16 per pass (library default)")]
    if onnxruntime_available():
        out.append(Row("onnxruntime fp32, 16 per pass", backend="onnxruntime"))
    if quick:
        return out
    out += [Row("torch fp32, 4 per pass", per_pass=4), Row("torch fp32, 32 per pass", per_pass=32),
            Row("torch fp32, 16 per pass, 1 thread", threads=1),
            Row("torch fp32, 16 per pass, NCHW", channels_last=False),
            Row("torch bf16 autocast, 16 per pass", dtype="bfloat16"),
            Row("torch.compile fp32, 16 per pass", compile=True, once=True)]
    if onnxruntime_available():
        out.append(Row("onnxruntime fp32, 64 per pass", per_pass=None, backend="onnxruntime"))
    return out


def run_child(encoder: str, row: Row, batches: int, feats: Path) -> dict | None:
    cfg = {**asdict(row), "encoder": encoder, "batches": batches, "features_out": str(feats)}
    env = dict(os.environ, HDMIL_MALLOC=row.malloc)
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1][:120]
        print(f"  {encoder} {row.name}: failed ({last})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_patch(encoder: str, size: int = 256) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hdmil.checkpoint import default_model_path
    from hdmil.features import create_encoder

    src = default_model_path().parent / "hdmil-demo-encoder.safetensors" if encoder == "demo" else encoder
    enc = create_encoder(src, device="cpu")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        enc.model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def measure(encoders: list[str], table: list[Row], rounds: int, batches: int, tmp: Path):
    best: dict[tuple[str, str], dict] = {}
    gflops = matmul_gflops()
    for r in range(rounds):
        for enc in encoders:
            for i, row in enumerate(table):
                if row.once and r:
                    continue
                feats = tmp / f"{enc}-{i}.npy"
                got = run_child(enc, row, batches, feats)
                if got is None:
                    continue
                got["features"] = feats
                key = (enc, row.name)
                if key not in best or got["patches_s"] > best[key]["patches_s"]:
                    best[key] = got
                print(f"  round {r + 1} {enc:15s} {row.name:42s} {got['patches_s']:7.1f} patches/s",
                      file=sys.stderr, flush=True)
        gflops = max(gflops, matmul_gflops(reps=2))
    return best, gflops


def feature_distance(path: Path, ref: Path) -> float:
    a, b = np.load(path), np.load(ref)
    return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)).max())


def print_table(encoders: list[str], table: list[Row], best: dict, gflops: float) -> None:
    print(f"\nfp32 matmul (2048² torch.mm, best in the run): {gflops:.0f} GFLOP/s")
    print("| encoder | configuration | patches/s | % of ceiling | % of matmul bound | system ms / patch "
          "| minor faults / patch | peak RSS MiB | features vs torch fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for enc in encoders:
        got = {row.name: best[enc, row.name] for row in table if (enc, row.name) in best}
        if not got:
            continue
        ceiling = max(r["patches_s"] for r in got.values())
        bound = gflops * 1e9 / flops_per_patch(enc)
        ref = got.get("torch fp32, 16 per pass (library default)")
        for name, r in got.items():
            dist = feature_distance(r["features"], ref["features"]) if ref else float("nan")
            print(f"| {enc} | {name} | {r['patches_s']:.1f} | {100 * r['patches_s'] / ceiling:.0f}% | "
                  f"{100 * r['patches_s'] / bound:.0f}% | {r['sys_ms']:.1f} | {r['faults']:.0f} | "
                  f"{r['rss_mib']:.0f} | {dist:.1e} |")
        print(f"| {enc} | ceiling (fastest above) / matmul bound | {ceiling:.1f} / {bound:.1f} | | | | | | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", default=["resnet50_trunc", "demo"])
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per row, round robin")
    ap.add_argument("--batches", type=int, default=3, help="timed batches of 64 per process")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"{torch.backends.cpu.get_cpu_capability()}; before: {uptime()}")
    table = rows(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        best, gflops = measure(args.encoders, table, 1 if args.quick else args.rounds, args.batches, Path(tmp))
        print(f"after: {uptime()}")
        print_table(args.encoders, table, best, gflops)


if __name__ == "__main__":
    main()
