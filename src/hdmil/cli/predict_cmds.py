"""`hdmil predict`: hierarchical inference on slides, one report folder per slide."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdmil.cli._compute import add_compute_options, configure_encoder
from hdmil.cli._shared import add_max_failed_share, check_max_failed_share
from hdmil.errors import CheckpointError, HDMILError
from hdmil.pipeline.folders import DISK_ERRNOS, SlideEntry, disk_error, printable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify slides with HDMIL (LIPN pre-screening + DMIN)",
        description="For each slide: tissue grid, LIPN on the 1.25x patches, only the kept patches "
        "read at 20x and featurised, DMIN's per-class pooling. Writes DIR/<slide>/report.json "
        "(prediction, kept ratio, seconds per stage) and DIR/<slide>/patches.h5 (coords, LIPN mask, "
        "attention, features of the kept patches). A slide that fails (unreadable, no tissue, too "
        "many undecodable patches, a full disk) is reported in one line; the others still run. "
        "Results folders are the slide's stem made safe, with a short hash of its path when two "
        "slides share a stem; a slide named twice runs once; results there are replaced.",
    )
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files (SVS, TIFF, NDPI, ...)")
    p.add_argument("--model", help="checkpoint (.safetensors); default: the bundled demo model")
    p.add_argument("--out", required=True, help="output folder: <slide>/report.json and patches.h5")
    p.add_argument("--no-lipn", action="store_true", help="HDMIL†: read and pool all tissue patches")
    p.add_argument("--mpp", type=float, help="µm per level-0 pixel, for slides without that metadata")
    p.add_argument("--batch-size", type=int, default=64, help="HR patches per batch (default 64)")
    p.add_argument("--device", help="torch device for the encoder and DMIN (default: cuda if available)")
    p.add_argument("--workers", type=int, help="tile-decoding threads (default: all cores)")
    add_compute_options(p)
    add_max_failed_share(p)
    p.add_argument("--lipn-threshold", type=float, metavar="T",
                   help="keep a patch when LIPN's probability for any class exceeds T (default: the "
                   "checkpoint's; the paper's is 0.5, the demo model's are calibrated per class)")
    p.add_argument("--slpd", metavar="CKPT",
                   help="SLPD checkpoint for a DMIN trained on region embeddings (train-dmin "
                   "--instances region); default: the one its config names, beside it")
    p.add_argument("--encoder", metavar="NAME|FILE",
                   help="patch encoder to use instead of the one the checkpoint records: a weights "
                   "file, or a name (built with its pretrained weights); refused unless its name and "
                   "feature width are the recorded ones (needed for DMINs trained on CLAM features)")
    p.add_argument("--geojson", metavar="PATH",
                   help="also write each slide's QuPath GeoJSON (tissue, patches with kept and attention, "
                   "top-8 per class), the file the widget's Export GeoJSON writes; {slide} in PATH "
                   "becomes the slide's name (needed with several slides)")
    p.add_argument("--csv", metavar="PATH",
                   help="also write each slide's per-patch CSV, the file the widget's Export CSV writes; "
                   "{slide} in PATH becomes the slide's name (needed with several slides)")
    p.add_argument("--roi", metavar="FILE",
                   help="analyse only the tissue patches with at least the tissue threshold (25%%) of "
                   "their area inside these annotations (QuPath GeoJSON or ASAP XML; ASAP group _2 is "
                   "cut out); {slide} in FILE becomes the slide's file stem")
    p.add_argument("--exclude", metavar="FILE",
                   help="leave out the patches inside these annotations (artefacts: folds, pen, "
                   "bubbles), same formats and {slide} as --roi")
    p.add_argument("--audit", default="0", metavar="N",
                   help="after classifying, also read LIPN-discarded patches at 20x (N drawn by tissue "
                   "share, seeded; -1 or 'all': every one) and record in report.json's audit block the "
                   "share of the slide's attention that fell in them and whether the prediction changes "
                   "(default 0: off)")
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


def _check_args(args: argparse.Namespace) -> None:
    from hdmil.export import check_result_paths

    if args.batch_size < 1:
        raise HDMILError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.mpp is not None and not args.mpp > 0:
        raise HDMILError(f"--mpp must be a positive number of µm per pixel, not {args.mpp}")
    check_max_failed_share(args)
    if args.device:
        _check_device(args.device)
    check_result_paths(len(args.slides), geojson=args.geojson, csv=args.csv)
    if args.prescreen_only and (args.geojson or args.csv):
        raise HDMILError("--geojson and --csv write a classification's files: not with --prescreen-only")
    from hdmil.audit import parse_audit

    args.audit_n = parse_audit(args.audit)  # 0 off, None all, else a sample
    if args.audit_n != 0 and (args.no_lipn or args.prescreen_only):
        raise HDMILError("--audit reads what LIPN discarded from a classification: not with --no-lipn "
                         "or --prescreen-only")


def _load(args: argparse.Namespace) -> tuple[Any, bool]:
    """The model, with --lipn-threshold applied, and whether LIPN screens (not for region DMINs)."""
    from hdmil.checkpoint import load_model
    from hdmil.pipeline import lipn_applies

    model = load_model(_model_path(args.model), map_location=args.device or "cpu")
    use_lipn = lipn_applies(model, not args.no_lipn)
    if model.instances == "region" and not args.no_lipn:
        print(f"note: {model.name}: its DMIN pools "
              "SLPD regions and LIPN screens patches; running HDMIL† over all patches", file=sys.stderr)
    if args.lipn_threshold is not None:
        if not 0.0 <= args.lipn_threshold < 1.0:
            raise HDMILError(f"--lipn-threshold must be in [0, 1), not {args.lipn_threshold}")
        if model.lipn is not None:
            from hdmil.budget import checkpoint_thresholds

            args.checkpoint_thresholds = checkpoint_thresholds(model.lipn)  # the budget block records them
            model.lipn.cfg.threshold = float(args.lipn_threshold)
            model.lipn.cfg.class_thresholds = None  # one threshold for every class, as asked
    if use_lipn and model.lipn is None:
        raise CheckpointError(
            f"{model.path}: the checkpoint has no LIPN; use --no-lipn to run HDMIL† over all patches"
        )
    return model, use_lipn


def _encoder(args: argparse.Namespace, model: Any) -> tuple[Any, Any]:
    """One encoder (and SLPD model) for all slides; a checkpoint they don't fit stops here, once."""
    from hdmil.pipeline import encoder_for, fit_encoder, warm_up

    if args.prescreen_only:
        return None, None
    encoder = encoder_for(model, args.device, override=args.encoder)
    configure_encoder(encoder, args)
    if getattr(encoder, "stain", None) is not None:  # recorded in the checkpoint's encoder recipe
        print(f"stain normalisation: {encoder.stain.describe()}, as the model was trained", file=sys.stderr)
    slpd = fit_encoder(model, encoder, args.slpd, source=f"encoder {encoder.name} named in {model.path}")
    warm_up(model, encoder, patch_px=model.patch_px)  # one-time torch setup out of slide timings
    return encoder, slpd


def _plan(slides: list[str], out: str) -> list[SlideEntry]:
    """Each slide once, with its results folder's name; a note for each slide named twice."""
    from hdmil.pipeline.folders import plan_slides

    entries, repeats = plan_slides(slides, out)
    for shown, n in repeats.items():
        print(f"note: {shown} is named {n} times; it runs once", file=sys.stderr)
    return entries


def _progress_bar(path: Path) -> tuple[Any, Callable[[str, int, int], None]]:
    """A tqdm bar for one slide, and the ``progress(stage, done, total)`` that draws it."""
    from tqdm import tqdm

    shown = printable(path.name)
    bar = tqdm(total=1, desc=f"{shown}: open", unit="patch", leave=False, file=sys.stderr)
    stage_seen = [""]

    def progress(stage: str, done: int, total: int) -> None:
        if stage != stage_seen[0]:
            stage_seen[0] = stage
            bar.reset(total=max(total, 1))
            bar.set_description(f"{shown}: {stage}")
        bar.n = min(done, max(total, 1))
        bar.refresh()

    return bar, progress


@dataclass
class _Predictor:
    """What every slide of one ``hdmil predict`` shares."""

    args: argparse.Namespace
    model: Any
    use_lipn: bool
    encoder: Any
    slpd: Any

    def annotations(self, path: Path) -> dict[str, Any]:
        """The slide's --roi and --exclude annotations (read here: {slide} is its stem)."""
        from hdmil.annotations import read_annotations
        from hdmil.export import slide_path_template

        return {key: read_annotations(slide_path_template(arg, path.stem)) if arg else None
                for key, arg in (("roi", self.args.roi), ("exclude", self.args.exclude))}

    def prescreen(self, path: Path, folder: Path, progress: Callable) -> str:
        from hdmil.files import write_json_atomic
        from hdmil.pipeline import prescreen

        ps = prescreen(path, self.model, use_lipn=self.use_lipn, mpp=self.args.mpp, progress=progress,
                       **self.annotations(path))
        self.budget(ps)
        target = write_json_atomic(folder / "prescreen.json", ps.to_report())
        return (f"{printable(path.name)}: LIPN keeps {ps.n_kept}/{ps.n_patches} patches "
                f"({ps.kept_ratio:.0%}) -> {printable(target)}")

    def classify(self, path: Path, name: str, folder: Path, progress: Callable) -> tuple[str, list[str]]:
        from hdmil.export import write_result_files
        from hdmil.pipeline import RunOptions, run_slide

        a = self.args
        options = RunOptions(use_lipn=self.use_lipn, mpp=a.mpp, batch_size=a.batch_size,
                             workers=a.workers, max_failed_share=a.max_failed_share,
                             **self.annotations(path))
        ps = None
        if a.lipn_threshold is not None and self.use_lipn:  # the widget's budget numbers (hdmil.budget)
            from hdmil.pipeline import prescreen

            ps = self.budget(prescreen(path, self.model, True, a.mpp, progress, roi=options.roi,
                                       exclude=options.exclude))
        result = run_slide(path, self.model, options, encoder=self.encoder, slpd=self.slpd, progress=progress,
                           prescreened=ps)
        self.audit(result, ps, progress)
        target = result.save(folder)
        write_result_files(result, name, a.geojson, a.csv)
        probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(result.classes, result.probabilities))
        line = (f"{printable(path.name)}: {result.prediction} ({probs}); kept {result.n_kept}/"
                f"{result.n_patches} patches ({result.kept_ratio:.0%}) in {result.timings['total']:.1f} s "
                f"-> {printable(target)}")
        return line, [f"  {printable(path.name)}: {_one_line(Exception(printable(err)))}"
                      for err in result.errors]

    def budget(self, ps: Any) -> Any:
        """With --lipn-threshold: the pre-screen's budget (``hdmil.budget``, as the widget's
        control computes it), with the slide's measured seconds per HR patch when classifying."""
        if self.args.lipn_threshold is None or not ps.use_lipn:
            return ps
        from hdmil.budget import apply_budget, budget_for, measure_rate

        rate = measure_rate(ps, self.encoder) if self.encoder is not None else None
        return apply_budget(ps, budget_for(self.model, ps, rate, base=getattr(self.args, "checkpoint_thresholds", None),
                                           threshold=self.args.lipn_threshold))

    def audit(self, result: Any, ps: Any, progress: Callable) -> None:
        """The report's budget block (--lipn-threshold) and audit block (--audit N)."""
        from hdmil.budget import record_budget

        record_budget(result, ps)
        if self.args.audit_n != 0:
            from hdmil.audit import audit_result

            audit = audit_result(result, self.model, self.encoder, self.args.audit_n, seed=0,
                                 batch_size=self.args.batch_size, progress=progress)
            result.blocks["audit"] = audit.to_report()

    def _run(self, entry: SlideEntry, progress: Callable) -> tuple[str, list[str]]:
        """The slide's line and notes, under its lock, in its folder (inside --out)."""
        from hdmil.pipeline.folders import remove_dead_temps, slide_lock

        folder = entry.folder(self.args.out)
        with slide_lock(self.args.out, entry.name, entry.shown):
            remove_dead_temps(folder)
            if self.args.prescreen_only:
                return self.prescreen(entry.path, folder, progress), []
            return self.classify(entry.path, entry.name, folder, progress)

    def one(self, entry: SlideEntry) -> bool:
        """Run one slide and print its line; False (and one error line) when it failed."""
        bar, progress = _progress_bar(entry.path)
        try:
            line, notes = self._run(entry, progress)
        except HDMILError as exc:
            return _failed(bar, _one_line(exc))
        except OSError as exc:  # not through hdmil.files: a full or read-only disk fails this slide
            if exc.errno not in DISK_ERRNOS:
                bar.close()
                raise
            return _failed(bar, disk_error(entry.shown, exc))
        bar.close()
        print(line)
        for note in notes:
            print(note, file=sys.stderr)
        return True


def _failed(bar: Any, why: str) -> bool:
    bar.close()
    print(f"hdmil predict: error: {printable(why)}", file=sys.stderr)
    return False


def _make_out(out: str) -> None:
    from hdmil.files import WriteError

    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(
            f"{printable(out)}: cannot create the output folder ({exc.strerror or exc})") from exc


def predict(args: argparse.Namespace) -> int:
    _check_args(args)
    model, use_lipn = _load(args)
    run = _Predictor(args, model, use_lipn, *_encoder(args, model))
    _make_out(args.out)
    entries = _plan(args.slides, args.out)
    n_failed = sum(not run.one(entry) for entry in entries)
    if n_failed:
        print(f"hdmil predict: {n_failed} of {len(entries)} slides failed", file=sys.stderr)
        return 1
    return 0
