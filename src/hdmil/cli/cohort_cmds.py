"""``hdmil synth-cohort``: a labelled synthetic cohort with ground truth (and ``recipe``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hdmil.errors import HDMILError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth-cohort",
        help="write a synthetic cohort of tumour and normal slides with ground truth",
        description="Write N synthetic H&E slides (classes normal / tumor) with tumour polygons "
        "(GeoJSON), patch-level truth (.truth.npz), labels.csv and cohort.json. Tumour burden "
        "ranges from large areas to small foci; stain and artefacts vary between slides.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--slides", type=int, required=True, help="number of slides")
    p.add_argument("--seed", type=int, default=0, help="the cohort follows from it (default 0)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="level-0 px of each slide (default 6144 6144)")
    p.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 px (default 0.5)")
    p.add_argument("--positive-fraction", type=float, default=0.5,
                   help="share of tumour slides (default 0.5)")
    p.add_argument("--workers", type=int, default=None,
                   help="slides made in parallel (default: up to 2 processes)")
    p.set_defaults(func=synth_cohort_cmd)
    register_recipe(subparsers)


def synth_cohort_cmd(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hdmil.synth.cohort import DEFAULT_SIZE, synth_cohort

    size = tuple(args.size) if args.size else DEFAULT_SIZE
    if min(size) < 16:
        raise HDMILError(f"--size must be at least 16 px, not {size[0]} {size[1]}")
    if args.workers is not None and args.workers < 1:
        raise HDMILError(f"--workers must be at least 1, not {args.workers}")
    with tqdm(total=args.slides, unit="slide", desc="synth-cohort") as bar:

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(done - bar.n)

        info = synth_cohort(args.out, args.slides, seed=args.seed, size=size, mpp=args.mpp,
                            positive_fraction=args.positive_fraction, workers=args.workers,
                            progress=progress)
    n_pos = sum(s.label == "tumor" for s in info.slides)
    print(f"wrote {len(info.slides)} slides ({n_pos} tumor, {len(info.slides) - n_pos} normal) "
          f"to {info.out_dir}; labels in {info.labels_csv}")
    return 0


# -- hdmil recipe demo -------------------------------------------------------------------------


def register_recipe(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recipe",
        help="make the demo model: synthetic cohort, features, DMIN, LIPN, held-out report",
        description="Run a training recipe end to end, seeded and reproducible. 'demo' writes "
        "hdmil-demo.safetensors (DMIN + LIPN), hdmil-demo-encoder.safetensors and the accuracy "
        "report hdmil-demo.json into --out (work folders stay there too). The demo model is "
        "trained on synthetic slides and is not for diagnosis.",
    )
    p.add_argument("name", choices=("demo",), help="which recipe (only 'demo' for now)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="everything follows from it (default 0)")
    p.add_argument("--slides", type=int, default=None,
                   help="training slides (default 96; 4 with --quick)")
    p.add_argument("--heldout", type=int, default=None,
                   help="held-out slides for the report (default 40; 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a few small slides and two epochs: checks the recipe, trains nothing useful")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 2; 1 is much faster on a machine others are loading)")
    p.add_argument("--install", action="store_true",
                   help="copy the three files into the installed package's assets (the bundled model)")
    p.set_defaults(func=recipe_cmd)


def recipe_cmd(args: argparse.Namespace) -> int:
    import dataclasses

    from tqdm import tqdm

    from hdmil.recipe import RecipeConfig, install_demo, run_recipe

    if args.slides is not None and args.slides < 4:
        raise HDMILError(f"--slides must be at least 4, not {args.slides}")
    if args.heldout is not None and args.heldout < 0:
        raise HDMILError(f"--heldout must be at least 0, not {args.heldout}")
    cfg = RecipeConfig.quick(args.seed) if args.quick else RecipeConfig(seed=args.seed)
    if args.threads is not None and args.threads < 1:
        raise HDMILError(f"--threads must be at least 1, not {args.threads}")
    changes = {k: v for k, v in (("n_slides", args.slides), ("n_heldout", args.heldout),
                                 ("threads", args.threads)) if v is not None}
    cfg = dataclasses.replace(cfg, **changes)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, leave=False)
        bar.update(done - bar.n)

    def log(line: str) -> None:
        tqdm.write(line)

    try:
        result = run_recipe(args.out, cfg, progress=progress, log=log)
    finally:
        for bar in bars.values():
            bar.close()
    if args.install:
        for path in install_demo(args.out):
            print(f"installed {path}")
    print(f"model: {result.checkpoint}\nreport: {result.report_path}")
    return 0
