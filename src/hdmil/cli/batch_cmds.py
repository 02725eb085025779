"""`hdmil batch`: many slides as Dask tasks, resumable, with a summary."""

from __future__ import annotations

import argparse

from hdmil.cli._shared import add_max_failed_share, check_max_failed_share


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="run HDMIL over a folder or CSV of slides on Dask distributed",
        description="One Dask task per slide. Without --scheduler a LocalCluster of worker processes "
        "is started; with it, the run joins that scheduler. A slide whose complete results were made "
        "with the same settings (model hash, LIPN and its thresholds, encoder, mpp) is skipped; results "
        "made with other settings are recomputed into the same folder, replacing them. A slide named "
        "twice runs once; a slide another run is working on (its lock OUT/.<slide>.lock) is left to it.",
    )
    p.add_argument("input", help="a folder of slides, or a CSV with a 'path' column")
    p.add_argument("--model", help="checkpoint (.safetensors); default: the bundled demo model")
    p.add_argument("--out", required=True, help="output folder: <slide>/report.json, patches.h5, summary.csv")
    p.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--workers", type=int, help="worker processes for the local cluster")
    p.add_argument("--no-lipn", action="store_true", help="HDMIL†: DMIN over all tissue patches")
    p.add_argument("--mpp", type=float, help="µm per pixel for slides without that metadata")
    p.add_argument("--retries", type=int, default=2, help="retries of a task that crashed")
    add_max_failed_share(p)
    p.add_argument("--roi-dir", metavar="DIR",
                   help="analyse each slide only inside its annotation file DIR/<slide stem>.geojson "
                   "(or .json, .xml: QuPath GeoJSON or ASAP XML); a slide without one fails")
    p.add_argument("--force", action="store_true",
                   help="recompute every slide, even those with results of the same settings")
    p.set_defaults(func=_batch)


def _batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hdmil.batch import list_slides, run_batch
    from hdmil.pipeline.folders import printable

    check_max_failed_share(args)
    slides = list_slides(args.input)
    if not slides:
        print(f"hdmil batch: no slides found in {printable(args.input)}")
        return 1
    bar = tqdm(total=len(slides), unit="slide", desc="slides")

    def on_result(row: dict, done: int, total: int) -> None:
        bar.total = total  # a slide named twice runs once
        bar.update(1)
        if row["status"] in ("failed", "missing", "busy"):
            bar.write(f"{row['status']}: {row['slide']}: {row['error']}")
        elif row.get("note"):
            bar.write(f"note: {row['slide']}: {row['note']}")

    summary = run_batch(
        slides, args.out, model_path=args.model, use_lipn=not args.no_lipn, mpp=args.mpp,
        scheduler=args.scheduler, workers=args.workers, retries=args.retries, on_result=on_result,
        max_failed_share=args.max_failed_share, force=args.force, roi_dir=args.roi_dir,
    )
    bar.close()
    print(summary.table())
    print(f"summary: {printable(args.out)}/summary.csv")
    if summary.cancelled:
        return 130
    return 1 if summary.n_not_done else 0
