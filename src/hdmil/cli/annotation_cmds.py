"""`hdmil evaluate-annotations`: a run's LIPN recall and DMIN attention against annotations."""

from __future__ import annotations

import argparse
import math
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate-annotations",
        help="check LIPN's recall and DMIN's attention against annotation files",
        description="For each result folder under RESULTS (hdmil predict / batch --out): the patches "
        "inside the slide's annotations of --class (ANNOTATIONS/<slide stem>.geojson, .json or .xml: "
        "QuPath GeoJSON or ASAP XML; ASAP group _2 is cut out), LIPN's recall of them (kept / "
        "annotated), the patch AUC of DMIN's attention logits for that class's branch, and the "
        "precision of its top-k patches; then the cohort. A slide without an annotation file has "
        "none (Camelyon16's normal slides).",
    )
    p.add_argument("--results", required=True, help="a predict/batch output folder (or one slide's)")
    p.add_argument("--annotations", required=True, metavar="DIR",
                   help="one annotation file per slide, by stem")
    p.add_argument("--class", dest="cls", default="tumor",
                   help="the class whose annotations and DMIN branch are checked (default tumor; "
                   "unclassified annotations count, Camelyon16's groups _0 and _1 are tumour)")
    p.add_argument("--min-overlap", type=float, default=0.5, metavar="F",
                   help="a patch is annotated when this share of it lies inside (default 0.5)")
    p.add_argument("--top-k", type=int, default=8, metavar="K",
                   help="patches of highest attention (default 8)")
    p.add_argument("--out", metavar="FILE.csv", help="also write one row per slide (and none for the cohort)")
    p.set_defaults(func=_evaluate)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cells = [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _evaluate(args: argparse.Namespace) -> int:
    from hdmil.annotation_metrics import CSV_COLUMNS, evaluate_annotations
    from hdmil.errors import HDMILError
    from hdmil.export import atomic_write

    if args.top_k < 1:
        raise HDMILError(f"--top-k must be at least 1, not {args.top_k}")
    rows, cohort = evaluate_annotations(args.results, args.annotations, args.cls, args.min_overlap,
                                        args.top_k)
    print(_table([*rows, cohort], CSV_COLUMNS))
    if args.out:
        import csv

        with atomic_write(args.out, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
            writer.writeheader()
            writer.writerows({c: ("" if isinstance(r[c], float) and math.isnan(r[c]) else r[c])
                              for c in CSV_COLUMNS} for r in rows)
        print(f"per slide: {args.out}")
    return 0
