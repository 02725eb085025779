"""`hdmil review-summary`: the agreement counts of a batch folder's review (review.csv)."""

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


def _review_summary(args: argparse.Namespace) -> int:
    from hdmil.review import batch_rows, review_summary

    print(review_summary(args.out).table())
    if args.list:
        for r in batch_rows(args.out):
            v = r.verdict
            print(f"  {r.slide}: predicted {r.prediction or '-'}: "
                  + (f"{v.verdict}" + (f" ({v.note})" if v.note else "") if v else "not reviewed"))
    return 0
