"""Options more than one command takes, defined and checked once."""

from __future__ import annotations

import argparse

from hdmil.errors import HDMILError


def add_max_failed_share(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-failed-share", type=float, default=0.5, metavar="S",
                   help="a slide fails when more than this share of its kept patches cannot be "
                   "decoded (default 0.5); one with none decoded always fails")


def check_max_failed_share(args: argparse.Namespace) -> None:
    if not 0.0 <= args.max_failed_share <= 1.0:
        raise HDMILError(f"--max-failed-share must be in [0, 1], not {args.max_failed_share}")
