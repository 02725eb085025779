"""`hdmil batch`: many slides as Dask tasks, resumable, with a summary."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="run HDMIL over a folder or CSV of slides on Dask distributed",
        description="One Dask task per slide. Without --scheduler a LocalCluster of worker processes "
        "is started; with it, the run joins that scheduler. Slides with complete results are skipped.",
    )
    p.add_argument("input", help="a folder of slides, or a CSV with a 'path' column")
    p.add_argument("--model", help="checkpoint (.safetensors); default: the bundled demo model")
    p.add_argument("--out", required=True, help="output folder: <slide>/report.json, patches.h5, summary.csv")
    p.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--workers", type=int, help="worker processes for the local cluster")
    p.add_argument("--no-lipn", action="store_true", help="HDMIL†: DMIN over all tissue patches")
    p.add_argument("--mpp", type=float, help="µm per pixel for slides without that metadata")
    p.add_argument("--retries", type=int, default=2, help="retries of a task that crashed")
    p.set_defaults(func=_batch)


def _batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hdmil.batch import list_slides, run_batch

    slides = list_slides(args.input)
    if not slides:
        print(f"hdmil batch: no slides found in {args.input}")
        return 1
    bar = tqdm(total=len(slides), unit="slide", desc="slides")

    def on_result(row: dict, done: int, total: int) -> None:
        bar.update(1)
        if row["status"] == "failed":
            bar.write(f"failed: {row['slide']}: {row['error']}")

    summary = run_batch(
        slides, args.out, model_path=args.model, use_lipn=not args.no_lipn, mpp=args.mpp,
        scheduler=args.scheduler, workers=args.workers, retries=args.retries, on_result=on_result,
    )
    bar.close()
    print(summary.table())
    print(f"summary: {args.out}/summary.csv")
    if summary.cancelled:
        return 130
    return 1 if summary.n_failed else 0
