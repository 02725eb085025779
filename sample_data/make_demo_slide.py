"""Write the demo slide (and its tumour GeoJSON) into sample_data/: ``python make_demo_slide.py``.

The same slide the napari sample makes in the user cache: both call
``hdmil.synth.demo_slide_path``. Pass ``--out DIR`` to write it elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory (default: sample_data/)")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from hdmil.synth import demo_slide_path

    path = demo_slide_path(create=False, directory=args.out)
    if path.exists():
        print(f"{path} exists")
        return 0
    with tqdm(unit="tile", desc="demo slide") as bar:

        def progress(stage: str, done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        path = demo_slide_path(create=True, directory=args.out, progress=progress)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
