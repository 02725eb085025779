"""``hdmil features``: tissue patches of slides → one ``<slide>.h5`` feature file each."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hdmil.cli._compute import add_compute_options, configure_encoder
from hdmil.errors import HDMILError
from hdmil.files import WriteError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "features",
        help="extract patch features of slides into <out>/<slide>.h5",
        description="Find the 256 px @ 20x tissue patches of each slide, embed them with an encoder "
        "and write <out>/<slide>.h5 (datasets features, coords, lr_patches; the layout CLAM and "
        "TRIDENT use). A slide that fails is reported and the others go on.",
    )
    p.add_argument("slides", type=Path, nargs="+", metavar="SLIDE", help="slide files")
    p.add_argument(
        "--encoder", default="resnet50_trunc",
        help="named encoder (resnet50_trunc, uni, uni2-h, virchow2, ...: see `hdmil encoders`), any "
        "timm model name, or a weights file (.safetensors / .pth) (default resnet50_trunc)",
    )
    p.add_argument("--weights", type=Path, default=None, help="local weights file for --encoder")
    p.add_argument("--arch", default=None, help="architecture of a weights file without metadata")
    p.add_argument(
        "--pretrained", action="store_true",
        help="the encoder's published weights from the Hugging Face hub (downloaded once into the hub "
        "cache; gated models need their terms accepted and `hf auth login`); otherwise weights are random",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="autocast dtype (default: each named encoder's documented one on CUDA, "
                   "float32 on the CPU)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--layout", choices=("hdmil", "clam"), default="hdmil",
        help="hdmil: <out>/<slide>.h5 (default); clam: CLAM's <out>/h5_files/<slide>.h5 and "
        "<out>/pt_files/<slide>.pt (a plain tensor), which CLAM's training reads as they are",
    )
    p.add_argument("--batch-size", type=int, default=64, help="patches per forward pass (default 64)")
    p.add_argument("--mpp", type=float, default=None, help="µm per level-0 pixel (overrides the files)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument(
        "--overwrite", action="store_true",
        help="recompute slides whose <out>/<slide>.h5 exists (default: skip them when the encoder matches)",
    )
    p.add_argument("--stain", choices=("macenko", "reinhard"), default=None,
                   help="stain-normalise each 20x patch before the encoder (torchstain); the fitted "
                   "target's parameters are recorded, and predict applies the same (needs --stain-target)")
    p.add_argument("--stain-target", type=Path, default=None, metavar="IMG|JSON",
                   help="the image (a region of well-stained tissue) --stain is fitted to, or a JSON "
                   "normaliser recorded earlier")
    add_compute_options(p, dtype=False)
    p.add_argument("--workers", type=int, default=None,
                   help="run the slides as Dask tasks on a local cluster of this many worker processes")
    p.add_argument("--scheduler", default=None,
                   help="run the slides as Dask tasks on a running scheduler (tcp://host:8786)")
    p.set_defaults(func=features)
    e = subparsers.add_parser(
        "encoders", help="list the named patch encoders (width, input, parameters, licence, hub id)",
        description="The named pathology encoders hdmil builds as their model cards do. Pass a name "
        "to --encoder; --pretrained loads its weights from the hub, --weights FILE from a local file.",
    )
    e.set_defaults(func=list_named_encoders)


def features(args: argparse.Namespace) -> int:
    from hdmil.features import create_encoder

    if args.batch_size < 1:
        raise HDMILError(f"--batch-size must be at least 1, got {args.batch_size}")
    stain = _stain(args)
    _check_writable(args.out)
    if args.workers or args.scheduler:
        if args.layout != "hdmil" or stain is not None:
            raise HDMILError("--layout clam and --stain run in this process: not with --workers / --scheduler")
        return _features_on_dask(args)
    encoder = create_encoder(
        str(args.encoder), pretrained=args.pretrained, weights=args.weights, device=args.device,
        arch=args.arch, dtype=args.dtype,
    )
    configure_encoder(encoder, args)
    encoder = _with_stain(encoder, stain)
    print(
        f"encoder {encoder.name}: {encoder.dim}-d on {encoder.device}, weights: {encoder.weights}",
        file=sys.stderr,
    )
    if encoder.weights.startswith("random"):
        print("note: random weights give features only for tests and demos; "
              "pass --pretrained or --weights FILE for real ones", file=sys.stderr)
    counts = {"written": 0, "skipped": 0, "empty": 0, "failed": 0}
    for path in args.slides:
        try:
            outcome = _one_slide(path, encoder, args)
        except KeyboardInterrupt:
            raise
        except HDMILError as exc:
            outcome = "failed"
            named = path.name in str(exc)  # our errors name the file already
            print(f"hdmil features: error: {'' if named else f'{path}: '}{exc}", file=sys.stderr)
        except Exception as exc:  # a decoder crash on one slide must not stop the rest
            if args.debug:
                raise
            outcome = "failed"
            first = (str(exc).strip().splitlines() or [""])[0]  # one line per slide, always
            print(f"hdmil features: error: {path}: {type(exc).__name__}: {first}", file=sys.stderr)
        counts[outcome] += 1
    summary = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    print(f"{len(args.slides)} slides: {summary} → {args.out}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _stain(args: argparse.Namespace):
    """The fitted stain normaliser --stain / --stain-target ask for, or None."""
    from hdmil.features.stain import load_stain_target

    if args.stain_target is not None and args.stain is None:
        raise HDMILError("--stain-target needs --stain macenko|reinhard")
    if args.stain is None:
        return None
    if args.stain_target is None:
        raise HDMILError(f"--stain {args.stain} needs --stain-target IMG (the stain to normalise to)")
    return load_stain_target(args.stain, args.stain_target)


def _with_stain(encoder, stain):
    from hdmil.features.stain import with_stain

    if stain is not None:
        print(f"stain normalisation: {stain.describe()}, recorded with the features", file=sys.stderr)
    return with_stain(encoder, stain)


def _check_writable(out: Path) -> None:
    """A read-only or unmakeable OUT is said before any slide is read, not once per slide."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"{out}: cannot create the output folder ({exc.strerror or exc})") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise WriteError(f"{out}: output folder is not writable (read-only or no permission)")


def _one_slide(path: Path, encoder, args: argparse.Namespace) -> str:
    from tqdm import tqdm

    from hdmil.features import extract_slide_features
    from hdmil.features.io import feature_path
    from hdmil.grid import build_grid
    from hdmil.slide import open_slide

    with open_slide(path, mpp=args.mpp) as slide:
        out = feature_path(args.out, slide.name, args.layout)
        if out.exists() and not args.overwrite and _same_encoder(out, encoder):
            print(f"{slide.name}: {out} exists (encoder {encoder.name}), skipped", file=sys.stderr)
            return "skipped"
        grid = build_grid(slide, mpp=args.mpp)
        if len(grid.coords) == 0:
            why = grid.message or "no tissue found"
            print(f"{slide.name}: no tissue patches ({why}); nothing written", file=sys.stderr)
            return "empty"
        with tqdm(total=len(grid.coords), desc=slide.name, unit="patch", file=sys.stderr) as bar:

            def progress(stage: str, done: int, total: int) -> None:
                bar.update(done - bar.n)

            bag = extract_slide_features(slide, grid, encoder, batch_size=args.batch_size, progress=progress)
        _write(args.out, out, bag, args.layout)
        failed = bag.attrs.get("n_failed", 0)
        note = f" ({failed} patches could not be read)" if failed else ""
        if bag.attrs.get("stain_fallbacks"):
            note += f" ({bag.attrs['stain_fallbacks']} background patches left unnormalised)"
        print(f"{slide.name}: {len(bag)} patches → {out}{note}", file=sys.stderr)
        return "written"


def _write(root: Path, out: Path, bag, layout: str) -> None:
    from hdmil.features.io import write_clam_features, write_features

    if layout == "clam":
        write_clam_features(root, bag)
    else:
        write_features(out, bag)


def _same_encoder(path: Path, encoder) -> bool:
    """Whether ``path`` holds features of this very encoder: same recipe (architecture and
    weights), or for files written before recipes, the same name."""
    import h5py

    from hdmil.features.recipe import EncoderRecipe, recipe_of

    def plain(v):
        return v.decode() if isinstance(v, bytes) else v

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                return False
            recipe, name = plain(f.attrs.get("encoder_recipe")), plain(f.attrs.get("encoder"))
    except OSError:
        return False  # unreadable: recompute
    if recipe:
        return EncoderRecipe.from_dict(recipe).same_encoder(recipe_of(encoder))
    from hdmil.features.stain import stain_of

    return name == encoder.name and stain_of(encoder) is None  # files before recipes: no stain


def _features_on_dask(args: argparse.Namespace) -> int:
    """One Dask task per slide (``hdmil.batch.extract_slide_task``); the encoder is built per worker."""
    from tqdm import tqdm

    from hdmil.batch import extract_slide_task, run_tasks

    args.out.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": str(args.encoder), "pretrained": bool(args.pretrained), "device": args.device,
        "weights": str(args.weights) if args.weights else None, "arch": args.arch,
        **({"dtype": args.dtype} if args.dtype else {}),
    }
    bar = tqdm(total=len(args.slides), unit="slide", desc="slides", file=sys.stderr)

    def on_result(row: dict) -> None:
        bar.update(1)
        if row["status"] == "failed":
            bar.write(f"hdmil features: error: {row['error']}", file=sys.stderr)

    rows, cancelled = run_tasks(
        [Path(s) for s in args.slides], extract_slide_task,
        (str(args.out), spec, args.mpp, args.batch_size, args.overwrite),
        scheduler=args.scheduler, workers=args.workers, on_result=on_result,
    )
    bar.close()
    counts = {k: sum(r["status"] == k for r in rows) for k in ("written", "skipped", "empty", "failed")}
    print(f"{len(args.slides)} slides: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)
          + f" → {args.out}", file=sys.stderr)
    if cancelled:
        return 130
    return 1 if counts["failed"] else 0


def list_named_encoders(args: argparse.Namespace) -> int:
    """``hdmil encoders``: one row per named encoder (parameters counted on the meta device)."""
    from hdmil.features.zoo import zoo_rows

    rows = zoo_rows()
    head = ("name", "dim", "input px", "params", "CUDA dtype", "hub id", "licence")
    table = [head] + [(r["name"], str(r["dim"]), r["input"], _millions(r["params"]), r["cuda_dtype"],
                       r["hub"], r["licence"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _millions(n: int | None) -> str:
    if n is None:
        return "(needs transformers)"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
