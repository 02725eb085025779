"""`hdmil review-summary`: the agreement counts of a batch folder's review (review.csv);
`hdmil compare`: two runs of one slide side by side (``hdmil.compare``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "review-summary",
        help="agreement counts of a reviewed batch folder (OUT/review.csv)",
        description="Counts the verdicts (agree, disagree, unsure) the napari review panel recorded "
        "in OUT/review.csv against the slides of OUT (summary.csv and OUT/<slide>/report.json): "
        "slides reviewed and not, agreement = agree / (agree + disagree), and the same per "
        "predicted class. --list also prints each reviewed slide's verdict and note.",
    )
    p.add_argument("out", metavar="OUT", help="the --out folder of hdmil batch (or hdmil predict)")
    p.add_argument("--list", action="store_true", help="also print each slide's verdict and note")
    p.set_defaults(func=_review_summary)
    _register_compare(sub)


def _register_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two runs of one slide: HDMIL vs HDMIL† of a model, or two checkpoints",
        description="Runs the slide twice, A = HDMIL of the first --model and B = HDMIL† of it "
        "(--no-lipn) or HDMIL of a second --model, and writes into DIR: A/ and B/ (each run's "
        "report.json and patches.h5), compare.csv and compare.json (both runs' probabilities, "
        "patches read, kept ratio, seconds per stage; B - A) and compare.npz (per class the "
        "attention difference B - A on the common patch grid, one pixel per patch, and the level-0 "
        "corners of the patches read by one run only). Prints the table.",
    )
    p.add_argument("slide", metavar="SLIDE", help="slide file")
    p.add_argument("--model", action="append", metavar="CKPT",
                   help="checkpoint A (default: the bundled demo model); a second --model is B")
    p.add_argument("--no-lipn", action="store_true", help="B is HDMIL† of model A (every tissue patch)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the table and both runs")
    p.add_argument("--mpp", type=float, help="µm per level-0 pixel, for slides without that metadata")
    p.add_argument("--batch-size", type=int, default=64, help="HR patches per batch (default 64)")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from hdmil.checkpoint import load_model
    from hdmil.cli.predict_cmds import _model_path
    from hdmil.compare import compare_slide
    from hdmil.errors import HDMILError

    models = list(args.model or [None])
    if len(models) > 2 or (len(models) == 2) == bool(args.no_lipn):
        raise HDMILError("give --no-lipn (HDMIL vs HDMIL† of one --model) or a second --model (two "
                         "checkpoints), not both or neither")
    if args.batch_size < 1:
        raise HDMILError(f"--batch-size must be at least 1, not {args.batch_size}")
    loaded = [load_model(_model_path(m), map_location=args.device or "cpu") for m in models]
    cmp = compare_slide(args.slide, loaded[0], loaded[1] if len(loaded) == 2 else None, mpp=args.mpp,
                        batch_size=args.batch_size, device=args.device)
    from pathlib import Path

    out = Path(args.out)
    cmp.a.save(out / "A")
    cmp.b.save(out / "B")
    paths = cmp.save(out)
    print(_table_text(cmp.table()))
    print(f"-> {', '.join(str(p) for p in paths)}; runs in {out / 'A'} and {out / 'B'}")
    return 0


def _table_text(rows: list[dict]) -> str:
    """The comparison table in aligned columns."""
    shown = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [["", "A", "B", "B - A"]] + [[r["field"], shown(r["A"]), shown(r["B"]), shown(r["B_minus_A"])]
                                        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) if i == 0 else c[i].rjust(widths[i]) for i in range(4))
                     for c in cells)


def _review_summary(args: argparse.Namespace) -> int:
    from hdmil.review import batch_rows, review_summary

    print(review_summary(args.out).table())
    if args.list:
        for r in batch_rows(args.out):
            v = r.verdict
            print(f"  {r.slide}: predicted {r.prediction or '-'}: "
                  + (f"{v.verdict}" + (f" ({v.note})" if v.note else "") if v else "not reviewed"))
    return 0
