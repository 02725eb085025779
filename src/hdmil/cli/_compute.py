"""The encoder's compute options of ``hdmil features`` and ``hdmil predict`` (``hdmil.compute``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_compute_options(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    """``--backend``, ``--verbose`` and (unless the command has its own) ``--dtype``."""
    if dtype:
        p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="encoder dtype (default: chosen on the CPU, see --verbose; the encoder's own on CUDA)")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="what runs the encoder on the CPU: auto (default) measures torch and, when "
                   "installed (napari-hdmil[cpu-fast]), ONNX Runtime once per machine and takes the "
                   "fastest whose features are within 1e-4 of torch's; torch: exact fp32 torch")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say how the encoder runs (device, dtype, backend, batch, threads) and why")


def configure_encoder(encoder: Any, args: argparse.Namespace) -> Any:
    """Choose how ``encoder`` runs (``hdmil.compute.configure``); with --verbose say it."""
    from hdmil.compute import configure

    compute = configure(encoder, dtype=getattr(args, "dtype", None) or "auto", backend=args.backend)
    if args.verbose:
        print(compute.describe(), file=sys.stderr)
    return compute
