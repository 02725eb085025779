"""``hdmil add-lr-patches``: LIPN's LR patches for CLAM's and TRIDENT's feature files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hdmil.errors import HDMILError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "add-lr-patches",
        help="add LIPN's LR patches to feature files made by CLAM or TRIDENT, from their slides",
        description="For each feature file under FEATURES (ours, a CLAM root with h5_files/, a "
        "TRIDENT job folder), read the 16 px LR patch (1.25x) of every row at its own coordinates "
        "from the slide of the same name, as `hdmil features` makes them, and write the file again "
        "with an lr_patches dataset (and, where it lacks them, the patch geometry attributes on "
        "coords), so `hdmil train-lipn` runs on it. Files go to --out under the same relative "
        "paths, or are changed in place with --in-place. A file without its slide, or whose "
        "coordinates lie outside it, is reported in one line; the others go on.",
    )
    p.add_argument("features", type=Path, metavar="FEATURES", help="feature folder")
    p.add_argument("--slides", type=Path, nargs="+", required=True, metavar="DIR",
                   help="folders (searched recursively) or files of the slides")
    p.add_argument("--out", type=Path, default=None, help="output folder (same layout as FEATURES)")
    p.add_argument("--in-place", action="store_true", help="rewrite the feature files themselves")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm per level-0 pixel, for slides without it (needed only for files that do "
                   "not record their patch size)")
    p.add_argument("--overwrite", action="store_true", help="read LR patches again for files that have them")
    p.set_defaults(func=add_lr_patches_cmd)


def add_lr_patches_cmd(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hdmil.features.lr_patches import add_lr_patches

    if args.mpp is not None and not args.mpp > 0:
        raise HDMILError(f"--mpp must be a positive number of µm per pixel, not {args.mpp}")
    with tqdm(unit="file", desc="feature files", file=sys.stderr, leave=False) as bar:

        def progress(stage: str, done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        outcomes = add_lr_patches(args.features, args.slides, out=args.out, in_place=args.in_place,
                                  mpp=args.mpp, overwrite=args.overwrite, progress=progress)
    for o in outcomes:
        if o.status == "failed":
            print(f"hdmil add-lr-patches: error: {o.line()}", file=sys.stderr)
        else:
            print(o.line(), file=sys.stderr)
    counts = {k: sum(o.status == k for o in outcomes) for k in ("written", "kept", "skipped", "failed")}
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    print(f"{len(outcomes)} feature files: {summary} -> {args.out or args.features}", file=sys.stderr)
    return 1 if counts["failed"] else 0
