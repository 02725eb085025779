"""``hdmil pretrain-slpd | similar``: SLPD region embeddings and prototypes, similar-slide search."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hdmil.errors import HDMILError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain-slpd",
        help="self-supervised SLPD pre-training on a folder of feature files",
        description="Regions = 16×16 blocks of each slide's patch features. Trains the SLPD region "
        "encoder (DINO + intra- and inter-slide prototype losses), saves the .safetensors checkpoint "
        "after every epoch (with <stem>.log.csv beside it, and while unfinished the run's state for "
        "--resume: <stem>.state.json, <stem>.last.safetensors), then writes region_embeddings, "
        "region_coords, region_prototype and prototypes into each slide's .h5. Slides with too few "
        "regions get no prototypes (reported, not an error).",
    )
    p.add_argument("--features", type=Path, required=True,
                   help="folder of <slide>.h5 feature files (a CLAM root or TRIDENT job folder too)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument(
        "--preset", default="small", choices=("small", "reference"),
        help="small: CPU-friendly (default); reference: docs/method.md §6 values",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, help="training epochs (small 30, reference 100)")
    p.add_argument("--warmup", type=int, help="epochs of plain DINO before the prototype losses")
    p.add_argument("--prototypes", type=int, help="prototypes K per slide (default 4)")
    p.add_argument("--min-regions", type=int, help="fewest regions for a slide to get prototypes")
    p.add_argument("--batch-size", type=int, help="regions per step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out exists")
    p.set_defaults(func=pretrain)

    s = subparsers.add_parser(
        "similar",
        help="slides most similar to one slide, by SLPD prototypes",
        description="Ranks the slides of a cohort folder (feature files with SLPD prototypes) by the "
        "best one-to-one matching of prototypes (mean cosine similarity). The query itself is left "
        "out unless --include-self.",
    )
    s.add_argument("slide", metavar="SLIDE_OR_H5", help="a feature file, or a slide whose .h5 is in --index")
    s.add_argument("--index", type=Path, required=True,
                   help="folder of feature files with prototypes (a CLAM root or TRIDENT job folder too)")
    s.add_argument("--top", type=int, default=5, help="how many to list (default 5)")
    s.add_argument("--include-self", action="store_true", help="keep the query in its own results")
    s.set_defaults(func=similar)


def pretrain(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hdmil.models.slpd import slpd_config
    from hdmil.train.slpd_trainer import pretrain_slpd

    overrides = {
        "epochs": args.epochs, "proto_warmup_epochs": args.warmup, "n_prototypes": args.prototypes,
        "min_regions": args.min_regions, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed,
    }  # fmt: skip
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for k in ("epochs", "n_prototypes", "batch_size"):
        if k in overrides and overrides[k] < 1:
            raise HDMILError(f"--{k.replace('_', '-')} must be at least 1, got {overrides[k]}")
    try:
        cfg = slpd_config(args.preset, **overrides)
    except ValueError as exc:
        raise HDMILError(f"bad SLPD settings: {exc}") from exc
    if args.out.exists() and not (args.resume or args.overwrite):
        raise HDMILError(f"{args.out}: exists; pass --resume to continue it or --overwrite")

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step" if stage == "train"
                                     else "slide", leave=stage == "train")  # fmt: skip
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total and stage != "train":
            bar.close()
            bars.pop(stage)

    try:
        result = pretrain_slpd(
            args.features, cfg, args.out, progress=progress, resume=args.resume,
            device=args.device,
        )  # fmt: skip
    finally:
        for bar in bars.values():
            bar.close()
    for h in result.history[-min(len(result.history), 5):]:
        print(
            f"epoch {h['epoch']:>3}: loss {h['total']:.4f} (dino {h['dino']:.4f}, intra "
            f"{h['intra']:.4f}, inter {h['inter']:.4f}), {h['slides_with_prototypes']} slides "
            "with prototypes"
        )
    print(f"{len(result.slides)} slides, {result.n_regions} regions; checkpoint {result.checkpoint}")
    if result.slides_without_prototypes:
        names = ", ".join(result.slides_without_prototypes)
        print(f"too few regions for prototypes: {names}")
    for f, why in result.skipped:
        print(f"skipped {f}: {why}", file=sys.stderr)
    return 0


def similar(args: argparse.Namespace) -> int:
    from hdmil.slpd_index import similar_slides

    if args.top < 1:
        raise HDMILError(f"--top must be at least 1, got {args.top}")
    rows = similar_slides(args.slide, args.index, top=args.top, exclude_self=not args.include_self)
    if not rows:
        print(f"no other slide with prototypes in {args.index}")
        return 1
    width = max(len(r[0]) for r in rows)
    print(f"{'rank':>4}  {'slide':<{width}}  score   file")
    for i, (sid, score, path) in enumerate(rows, 1):
        print(f"{i:>4}  {sid:<{width}}  {score:6.3f}  {path}")
    return 0
