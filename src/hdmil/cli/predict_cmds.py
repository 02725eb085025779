"""`hdmil predict`: hierarchical inference on slides, one report folder per slide."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hdmil.errors import CheckpointError, HDMILError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify slides with HDMIL (LIPN pre-screening + DMIN)",
        description="For each slide: tissue grid, LIPN on the 1.25x patches, only the kept patches "
        "read at 20x and featurised, DMIN's per-class pooling. Writes DIR/<slide>/report.json "
        "(prediction, kept ratio, seconds per stage) and DIR/<slide>/patches.h5 (coords, LIPN mask, "
        "attention, features of the kept patches). A slide that fails is reported in one line; "
        "the others still run.",
    )
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files (SVS, TIFF, NDPI, ...)")
    p.add_argument("--model", help="checkpoint (.safetensors); default: the bundled demo model")
    p.add_argument("--out", required=True, help="output folder: <slide>/report.json and patches.h5")
    p.add_argument("--no-lipn", action="store_true", help="HDMIL†: read and pool all tissue patches")
    p.add_argument("--mpp", type=float, help="µm per level-0 pixel, for slides without that metadata")
    p.add_argument("--batch-size", type=int, default=64, help="HR patches per batch (default 64)")
    p.add_argument("--device", help="torch device for the encoder and DMIN (default: cuda if available)")
    p.add_argument("--workers", type=int, help="tile-decoding threads (default: all cores)")
    p.add_argument("--lipn-threshold", type=float, metavar="T",
                   help="keep a patch when LIPN's probability for any class exceeds T (default: the "
                   "checkpoint's; the paper's is 0.5, the demo model's are calibrated per class)")
    p.add_argument("--slpd", metavar="CKPT",
                   help="SLPD checkpoint for a DMIN trained on region embeddings (train-dmin "
                   "--instances region); default: the one its config names, beside it")
    p.add_argument("--prescreen-only", action="store_true",
                   help="tissue + LIPN only (nothing read at 20x): writes DIR/<slide>/prescreen.json "
                   "with the kept ratio overall and per class")
    p.set_defaults(func=predict)


def _model_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    try:
        from hdmil.checkpoint import default_model_path
    except ImportError:
        raise CheckpointError(
            "this install has no bundled demo model yet: pass a checkpoint with --model CKPT"
        ) from None
    path = Path(default_model_path())
    if not path.is_file():
        raise CheckpointError(
            f"{path}: the bundled demo model is missing; pass --model CKPT (or build it: make model)"
        )
    return path


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise HDMILError(f"--device {name}: not a torch device ({_one_line(exc)})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HDMILError(f"--device {name}: no CUDA device is available on this machine")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hdmil.checkpoint import load_model
    from hdmil.export import write_json_atomic
    from hdmil.pipeline import (
        encoder_for, fit_encoder, instances_of, lipn_applies, prescreen, run_slide, warm_up,
    )

    if args.batch_size < 1:
        raise HDMILError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.mpp is not None and not args.mpp > 0:
        raise HDMILError(f"--mpp must be a positive number of µm per pixel, not {args.mpp}")
    if args.device:
        _check_device(args.device)
    model = load_model(_model_path(args.model), map_location=args.device or "cpu")
    regions = instances_of(model) == "region"
    use_lipn = lipn_applies(model, not args.no_lipn)
    if regions and not args.no_lipn:
        print(f"note: {Path(str(model.path)).name}: its DMIN pools "
              "SLPD regions and LIPN screens patches; running HDMIL† over all patches", file=sys.stderr)
    if args.lipn_threshold is not None:
        if not 0.0 <= args.lipn_threshold < 1.0:
            raise HDMILError(f"--lipn-threshold must be in [0, 1), not {args.lipn_threshold}")
        if model.lipn is not None:
            model.lipn.cfg.threshold = float(args.lipn_threshold)
            model.lipn.cfg.class_thresholds = None  # one threshold for every class, as asked
    if use_lipn and model.lipn is None:
        raise CheckpointError(
            f"{model.path}: the checkpoint has no LIPN; use --no-lipn to run HDMIL† over all patches"
        )
    encoder = None
    if not args.prescreen_only:
        # One encoder for all slides; a checkpoint whose DMIN does not fit it stops here, once.
        encoder = encoder_for(model, args.device)
        slpd = fit_encoder(model, encoder, args.slpd,
                           source=f"encoder {encoder.name} named in {model.path}")
        warm_up(model, encoder, patch_px=model.patch_px)  # one-time torch setup out of slide timings

    out = Path(args.out)
    used: set[str] = set()
    n_failed = 0
    for path in (Path(s) for s in args.slides):
        name = path.stem
        k = 2
        while name in used:  # two slides with the same stem from different folders
            name, k = f"{path.stem}-{k}", k + 1
        used.add(name)
        bar = tqdm(total=1, desc=f"{path.name}: open", unit="patch", leave=False, file=sys.stderr)
        stage_seen = [""]

        def progress(stage: str, done: int, total: int, bar=bar, stage_seen=stage_seen) -> None:
            if stage != stage_seen[0]:
                stage_seen[0] = stage
                bar.reset(total=max(total, 1))
                bar.set_description(f"{path.name}: {stage}")
            bar.n = min(done, max(total, 1))
            bar.refresh()

        try:
            if args.prescreen_only:
                ps = prescreen(path, model, use_lipn=use_lipn, mpp=args.mpp, progress=progress)
                (out / name).mkdir(parents=True, exist_ok=True)
                target = write_json_atomic(out / name / "prescreen.json", ps.to_report())
                bar.close()
                print(f"{path.name}: LIPN keeps {ps.n_kept}/{ps.n_patches} patches "
                      f"({ps.kept_ratio:.0%}) -> {target}")
                continue
            result = run_slide(
                path, model, use_lipn=use_lipn, mpp=args.mpp, encoder=encoder,
                batch_size=args.batch_size, progress=progress, workers=args.workers, slpd=slpd,
            )
            target = result.save(out / name)
        except HDMILError as exc:
            bar.close()
            n_failed += 1
            print(f"hdmil predict: error: {_one_line(exc)}", file=sys.stderr)
            continue
        bar.close()
        probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(result.classes, result.probabilities))
        print(
            f"{path.name}: {result.prediction} ({probs}); kept {result.n_kept}/{result.n_patches} "
            f"patches ({result.kept_ratio:.0%}) in {result.timings['total']:.1f} s -> {target}"
        )
        for err in result.errors:
            print(f"  {path.name}: {_one_line(Exception(err))}", file=sys.stderr)
    if n_failed:
        print(f"hdmil predict: {n_failed} of {len(args.slides)} slides failed", file=sys.stderr)
        return 1
    return 0
