"""``hdmil info | tissue | synth | model-card``: look at a slide, export its tissue, make a test
slide, say what a checkpoint is (the model card the napari widget shows)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hdmil.errors import HDMILError, SlideError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="levels, size, mpp, magnification and tissue patch count of a slide",
        description="Show what a slide holds: pyramid levels, size, mpp, magnification, vendor, "
        "tile size, associated images and how many 256 px @ 20x tissue patches it has.",
    )
    p.add_argument("slide", type=Path, help="slide file (.svs, .tif, .ndpi, .scn, .mrxs, ...)")
    p.add_argument("--mpp", type=float, default=None, help="µm per level-0 px (overrides file)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--no-tissue", action="store_true", help="skip the tissue patch count (faster)"
    )
    p.set_defaults(func=info)

    p = subparsers.add_parser(
        "tissue",
        help="tissue patches of a slide as QuPath GeoJSON",
        description="Detect tissue and write the 256 px @ 20x tissue patches as GeoJSON (QuPath).",
    )
    p.add_argument("slide", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output .geojson file")
    p.add_argument("--mpp", type=float, default=None, help="µm per level-0 px (overrides file)")
    p.add_argument(
        "--threshold", type=float, default=0.25,
        help="min tissue fraction of a patch's area to keep it (default 0.25)",
    )
    p.set_defaults(func=tissue)

    p = subparsers.add_parser(
        "synth",
        help="write a synthetic H&E slide (tiled pyramidal TIFF) with a known tumour area",
        description="Write a synthetic H&E whole-slide image, readable by tiffslide and OpenSlide.",
    )
    p.add_argument("--out", type=Path, required=True, help="output .tiff file")
    p.add_argument(
        "--size", type=int, nargs=2, metavar=("W", "H"), required=True, help="level-0 px"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tumor", type=float, default=0.2, help="tumour fraction of the tissue (0..1)")
    p.add_argument("--mpp", type=float, default=0.5, help="µm per pixel at level 0 (default 0.5)")
    p.set_defaults(func=synth)

    p = subparsers.add_parser(
        "model-card",
        help="what a checkpoint is: classes, encoder, scale, training data, intended use",
        description="Print a checkpoint's model card, as the napari widget shows it beside the "
        "prediction (the bundled demo model says it was trained on synthetic slides and is not "
        "for diagnosis). Reads the checkpoint's config only; no model is built.",
    )
    p.add_argument("model", nargs="?", type=Path, default=None,
                   help="checkpoint (.safetensors); default: the bundled demo model")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=model_card_cmd)


# -- info -----------------------------------------------------------------------------------------


def slide_info(path: Path, mpp: float | None = None, tissue: bool = True) -> dict[str, Any]:
    """Everything ``hdmil info`` shows, as a JSON-able dict."""
    from hdmil.slide import check_decodable, open_slide

    with open_slide(path, mpp=mpp) as slide:
        check_decodable(slide)  # one tile per level: an unreadable codec fails here, not later
        w, h = slide.dimensions
        info: dict[str, Any] = {
            "path": str(slide.path),
            "name": slide.name,
            "backend": slide.backend,
            "vendor": slide.vendor,
            "width": w,
            "height": h,
            "mpp": slide.mpp,
            "size_mm": [w * slide.mpp / 1000, h * slide.mpp / 1000] if slide.mpp else None,
            "objective_power": slide.objective_power,
            "levels": [
                {
                    "level": i,
                    "width": lw,
                    "height": lh,
                    "downsample": slide.level_downsamples[i],
                    "tile_width": slide.tile_sizes[i][0],
                    "tile_height": slide.tile_sizes[i][1],
                }
                for i, (lw, lh) in enumerate(slide.level_dimensions)
            ],
            "associated_images": {
                name: [int(img.shape[1]), int(img.shape[0])]
                for name, img in slide.associated_images.items()
            },
        }
        if tissue:
            info["tissue"] = _tissue_count(slide)
    return info


def _tissue_count(slide) -> dict[str, Any]:
    if slide.mpp is None:
        return {"patches": None, "message": "no mpp in the file: pass --mpp to count patches"}
    try:
        from hdmil.grid import build_grid
    except ImportError as exc:
        return {"patches": None, "message": f"tissue detection unavailable ({exc})"}
    try:
        grid = build_grid(slide, mpp=slide.mpp)
    except HDMILError as exc:
        return {"patches": None, "message": str(exc)}
    out: dict[str, Any] = {
        "patches": int(len(grid.coords)),
        "grid_shape": [int(v) for v in grid.shape],
        "patch_size_level0": int(grid.patch_size_level0),
    }
    if grid.message and len(grid.coords) == 0:  # says why there are none
        out["message"] = grid.message
    return out


def info(args: argparse.Namespace) -> int:
    data = slide_info(args.slide, mpp=args.mpp, tissue=not args.no_tissue)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(format_info(data))
    return 0


def format_info(d: dict[str, Any]) -> str:
    w, h = d["width"], d["height"]
    size = f"{w} × {h} px"
    if d["size_mm"]:
        size += f" ({d['size_mm'][0]:.2f} × {d['size_mm'][1]:.2f} mm)"
    mpp = f"{d['mpp']:.4g} µm/px" if d["mpp"] else "unknown (pass --mpp)"
    mag = f"{d['objective_power']:g}x" if d["objective_power"] else "unknown"
    lines = [
        f"slide          {d['name']}  ({d['path']})",
        f"vendor         {d['vendor'] or 'unknown'}  (read with {d['backend']})",
        f"size           {size}",
        f"mpp            {mpp}",
        f"magnification  {mag}",
        f"levels         {len(d['levels'])}",
    ]
    for lv in d["levels"]:
        lines.append(
            f"  level {lv['level']}: {lv['width']} × {lv['height']} px, downsample "
            f"{lv['downsample']:.4g}, tiles {lv['tile_width']} × {lv['tile_height']}"
        )
    assoc = ", ".join(f"{k} {v[0]} × {v[1]}" for k, v in d["associated_images"].items())
    lines.append(f"associated     {assoc or 'none'}")
    t = d.get("tissue")
    if t is not None:
        if t["patches"] is None:
            lines.append(f"tissue patches n/a: {t['message']}")
        else:
            rows, cols = t["grid_shape"]
            text = f"tissue patches {t['patches']}"
            if t.get("message"):
                text += f": {t['message']}"
            else:
                text += (
                    f" of {rows * cols} (256 px @ 20x = {t['patch_size_level0']} px at level 0)"
                )
            lines.append(text)
    return "\n".join(lines)


# -- tissue ---------------------------------------------------------------------------------------


def tissue(args: argparse.Namespace) -> int:
    from hdmil.slide import open_slide

    if not 0.0 <= args.threshold <= 1.0:
        raise HDMILError(f"--threshold must be between 0 and 1, not {args.threshold}")
    with open_slide(args.slide, mpp=args.mpp) as slide:
        slide.require_mpp()
        from hdmil.export import write_geojson
        from hdmil.grid import build_grid

        grid = build_grid(slide, mpp=slide.mpp, tissue_threshold=args.threshold)
        if len(grid.coords) == 0:
            why = grid.message or "no tissue found"
            raise SlideError(why if str(slide.path) in why else f"{slide.path}: {why}")
        write_geojson(args.out, grid)
    print(f"{len(grid.coords)} tissue patches of {slide.name} → {args.out}", file=sys.stdout)
    return 0


# -- synth ----------------------------------------------------------------------------------------


def synth(args: argparse.Namespace) -> int:
    w, h = args.size
    if w < 1 or h < 1:
        raise HDMILError(f"--size must be positive, not {w} {h}")
    if not 0.0 <= args.tumor <= 1.0:
        raise HDMILError(f"--tumor must be between 0 and 1, not {args.tumor}")
    if not args.mpp > 0:
        raise HDMILError(f"--mpp must be positive, not {args.mpp}")
    from hdmil.synth import synth_slide

    synth_slide(args.out, size=(w, h), seed=args.seed, tumor_fraction=args.tumor, mpp=args.mpp)
    print(f"wrote {args.out} ({w} × {h} px at {args.mpp:g} µm/px, seed {args.seed})")
    return 0


# -- model-card -----------------------------------------------------------------------------------


def model_card_cmd(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from hdmil.checkpoint import default_model_path
    from hdmil.model_card import read_model_card

    card = read_model_card(args.model if args.model is not None else default_model_path())
    print(json.dumps({**asdict(card), "lines": card.lines()}, indent=2) if args.json else "\n".join(card.lines()))
    return 0
