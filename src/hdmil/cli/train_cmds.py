"""``hdmil train-dmin``, ``hdmil train-lipn`` and ``hdmil evaluate``: k-fold training and the table."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from hdmil.errors import HDMILError
from hdmil.train.config import DMINTrainConfig, LIPNTrainConfig
from hdmil.train.options import DMIN_OPTIONS, LIPN_OPTIONS, add_options, config_from_args

DEFAULT_FOLDS = 10


def _add_data_args(p: argparse.ArgumentParser, out: bool = True, device: bool = True) -> None:
    p.add_argument("--features", required=True, type=Path, metavar="DIR",
                   help="feature files (<slide>.h5 / .pt; CLAM h5_files/ pt_files/ work too)")
    p.add_argument("--labels", required=True, type=Path, metavar="CSV",
                   help="CSV with slide_id,label[,case_id]")
    if out:
        p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument("--splits", type=Path, metavar="DIR",
                   help="CLAM split CSVs (splits_<i>.csv); default: from the checkpoint or new folds")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out labelled slides without a feature file (default: error)")
    if device:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")


def _add_fold_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help=f"make K folds by case, stratified (default {DEFAULT_FOLDS}); ignored with --splits")
    p.add_argument("--fold", default="all", metavar="I|all", help="which fold(s) to train (default all)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train-dmin",
        help="train DMIN on slide features, k-fold by case",
        description="Train DMIN (teacher + student MIL) per fold with early stopping on validation "
        "loss. Writes <out>/splits/ and <out>/fold_<i>/{dmin.safetensors, log.csv, last.safetensors}.",
    )
    _add_data_args(p, device=False)
    _add_fold_args(p)
    add_options(p, DMIN_OPTIONS, DMINTrainConfig)
    p.add_argument("--resume", action="store_true", help="continue from <out>/fold_<i>/last.safetensors")
    p.set_defaults(func=cmd_train_dmin)

    p = subparsers.add_parser(
        "train-lipn",
        help="train LIPN to predict a trained DMIN's kept patches from LR patches",
        description="Train LIPN against a frozen DMIN (one checkpoint, or a train-dmin output "
        "directory of folds). Writes <out>/[fold_<i>/]hdmil.safetensors holding DMIN and LIPN.",
    )
    _add_data_args(p, device=False)
    p.add_argument("--dmin", required=True, type=Path, metavar="CKPT|DIR",
                   help="dmin.safetensors, or the train-dmin output directory")
    p.add_argument("--fold", default="all", metavar="I|all", help="which fold(s) (default all)")
    add_options(p, LIPN_OPTIONS, LIPNTrainConfig)
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/[fold_<i>/]lipn_last.safetensors")
    p.set_defaults(func=cmd_train_lipn)

    p = subparsers.add_parser(
        "evaluate",
        help="test-set AUC / ACC / F1 per fold and mean ± std, HDMIL† and HDMIL",
        description="Evaluate each fold's model on its test slides: HDMIL† (DMIN on all patches) "
        "and HDMIL (DMIN over LIPN's kept patches).",
    )
    _add_data_args(p, out=False)
    p.add_argument("--model", required=True, type=Path, metavar="CKPT|DIR",
                   help="a checkpoint, or a directory of fold_<i>/ checkpoints")
    p.add_argument("--no-lipn", action="store_true", help="HDMIL† only")
    p.add_argument("--csv", type=Path, metavar="FILE", help="also write the table as CSV")
    p.add_argument("--predictions", type=Path, metavar="DIR",
                   help="write per-slide predictions (fold_<i>_<method>.csv)")
    p.set_defaults(func=cmd_evaluate)


# -- helpers ------------------------------------------------------------------------------------


def _select_folds(splits: list, fold: str) -> list:
    if fold == "all":
        return splits
    try:
        wanted = {int(f) for f in fold.split(",")}
    except ValueError:
        raise HDMILError(f"--fold must be a fold number, a list like 0,3, or 'all'; got {fold!r}") from None
    chosen = [s for s in splits if s.fold in wanted]
    missing = sorted(wanted - {s.fold for s in chosen})
    if missing:
        raise HDMILError(f"--fold {fold}: no fold {', '.join(map(str, missing))} among {len(splits)} folds")
    return chosen


def _restrict(splits: list, cohort) -> list:
    """Drop slides skipped for want of features (--skip-missing) from read splits."""
    if not cohort.skipped:
        return splits
    return [s.restrict(cohort.slide_ids) for s in splits]


def _load_cohort(args: argparse.Namespace, instances: str = "patch", classes=None):
    from hdmil.train.data import load_cohort

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cohort = load_cohort(args.labels, args.features, instances=instances, classes=classes,
                             skip_missing=args.skip_missing)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return cohort


class _Bar:
    """tqdm over epochs (or slides) for one fold, fed by the trainers' progress callback."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.desc = desc
        self.bar = None

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.bar is None or self.bar.total != total:
            if self.bar is not None:
                self.bar.close()
            self.bar = self._tqdm(total=total, desc=f"{self.desc} {stage}", unit="it",
                                  leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def epoch(self, row: dict) -> None:
        if self.bar is not None:
            shown = {k: row[k] for k in ("val_loss", "val_auc", "val_recall") if k in row}
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


# -- commands -----------------------------------------------------------------------------------


def cmd_train_dmin(args: argparse.Namespace) -> int:
    from hdmil.train.dmin_trainer import train_dmin
    from hdmil.train.splits import make_splits, read_splits, write_splits

    cfg = config_from_args(DMINTrainConfig, DMIN_OPTIONS, args)
    cohort = _load_cohort(args, instances=cfg.instances)
    if args.splits:
        splits = _restrict(read_splits(args.splits), cohort)
    else:
        splits = make_splits(cohort, k=args.folds or DEFAULT_FOLDS, seed=cfg.seed)
        write_splits(splits, args.out / "splits")
    splits = _select_folds(splits, args.fold)
    print(f"{len(cohort)} slides, classes {', '.join(cohort.classes)}, {cohort.bags.dim}-d "
          f"{cfg.instances} features; training {len(splits)} fold(s) into {args.out}")
    for split in splits:
        bar = _Bar(f"fold {split.fold}")
        try:
            res = train_dmin(cohort, split, cfg, args.out / f"fold_{split.fold}",
                             progress=bar.progress, on_epoch=bar.epoch, resume=args.resume)
        finally:
            bar.close()
        m = res.best_metrics
        print(f"fold {split.fold}: best epoch {res.best_epoch} of {res.epochs_run}, val loss "
              f"{_fmt(m.get('val_loss'))}, AUC {_fmt(m.get('val_auc'))}, ACC {_fmt(m.get('val_acc'))}"
              f", branch AUC {_fmt(m.get('val_branch_auc'))} -> {res.checkpoint}")
        if m.get("val_branch_auc", 1.0) < 0.5:  # NaN compares False: no warning
            which = (f"the {cohort.classes[1]!r} attention branch's" if cohort.n_classes == 2
                     else "the attention branches'")
            print(f"fold {split.fold}: warning: {which} top patches do not mark their class's "
                  "slides (branch AUC < 0.5), so the heatmaps likely point at other tissue; train "
                  "again with another --seed")
    return 0


def _dmin_checkpoints(path: Path) -> list[Path]:
    from hdmil.train.evaluate import find_fold_checkpoints

    if path.is_dir():
        found = [p for p in find_fold_checkpoints(path)]
        dmin = [p.parent / "dmin.safetensors" for p in found if (p.parent / "dmin.safetensors").is_file()]
        return dmin or found
    return find_fold_checkpoints(path)


def cmd_train_lipn(args: argparse.Namespace) -> int:
    from hdmil.checkpoint import load_model
    from hdmil.train.evaluate import model_split
    from hdmil.train.lipn_trainer import train_lipn
    from hdmil.train.splits import read_splits

    checkpoints = _dmin_checkpoints(args.dmin)
    cfg = config_from_args(LIPNTrainConfig, LIPN_OPTIONS, args)
    given = None
    cohort = None
    for ckpt in checkpoints:
        model = load_model(ckpt)
        if cohort is None:
            cohort = _load_cohort(args, classes=model.classes)
            if args.splits:
                given = {s.fold: s for s in _restrict(read_splits(args.splits), cohort)}
        prov = model.config.get("provenance") or {}
        fold = int(prov.get("fold", 0) or 0)
        if args.fold != "all" and str(fold) not in args.fold.split(","):
            continue
        if given is not None:
            if fold not in given:
                raise HDMILError(f"{args.splits}: no split for fold {fold} (of {ckpt})")
            split = given[fold]
        else:
            split = model_split(model.config)
            if split is None:
                raise HDMILError(f"{ckpt}: the checkpoint records no split; pass --splits")
            split = split.restrict(cohort.slide_ids) if cohort.skipped else split
        out = args.out / f"fold_{fold}" if args.dmin.is_dir() else args.out
        bar = _Bar(f"fold {fold}")
        try:
            res = train_lipn(cohort, split, model, cfg, out, progress=bar.progress,
                             on_epoch=bar.epoch, resume=args.resume)
        finally:
            bar.close()
        m = res.best_metrics
        print(f"fold {fold}: best epoch {res.best_epoch} of {res.epochs_run}, val loss "
              f"{_fmt(m.get('val_loss'))}, mask agreement {_fmt(m.get('val_agreement'))}, recall of "
              f"DMIN's kept patches {_fmt(m.get('val_recall'))} -> {res.checkpoint}")
        line = _calibration_line(res.checkpoint)
        if line:
            print(f"fold {fold}: {line}")
    return 0


def _calibration_line(checkpoint) -> str | None:
    """What the threshold calibration chose, from the checkpoint's provenance (None: no
    calibration, the paper's 0.5)."""
    from hdmil.checkpoint import read_checkpoint_config

    config = read_checkpoint_config(checkpoint)
    cal = ((config.get("provenance") or {}).get("lipn") or {}).get("threshold_calibration")
    if not cal:
        return None
    if "class_thresholds" in cal:
        classes = config.get("classes") or [str(i) for i in range(len(cal["class_thresholds"]))]
        text = "thresholds " + ", ".join(f"{c} {t:.3f}" for c, t in zip(classes, cal["class_thresholds"]))
    else:
        text = f"threshold {cal['threshold']:.3f}"
    text += f"; validation kept ratio {_fmt(cal.get('kept_ratio'))}"
    if "kept_budget" in cal:
        text += f" (budget {cal['kept_budget']:g})"
    if cal.get("over_budget"):
        text += (": over the budget, LIPN's probabilities tie over too many patches to keep fewer; "
                 "check the LIPN run or raise --kept")
    return text


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hdmil.checkpoint import read_checkpoint_config
    from hdmil.train.evaluate import evaluate_folds, find_fold_checkpoints
    from hdmil.train.splits import read_splits

    checkpoints = find_fold_checkpoints(args.model)
    first = read_checkpoint_config(checkpoints[0])
    use_lipn = not args.no_lipn
    if use_lipn and "lipn" not in (first.get("modules") or {}):
        print(f"note: {checkpoints[0]} has no LIPN; showing HDMIL† only (train one with "
              "`hdmil train-lipn`)", file=sys.stderr)
        use_lipn = False
    instances = first.get("instances", "patch")
    if use_lipn and instances != "patch":
        print("note: LIPN screens patches, not regions; showing HDMIL† only", file=sys.stderr)
        use_lipn = False
    cohort = _load_cohort(args, instances=instances, classes=first.get("classes"))
    splits = _restrict(read_splits(args.splits), cohort) if args.splits else None
    bar = _Bar("evaluate")
    try:
        table = evaluate_folds(checkpoints, cohort, splits, use_lipn=use_lipn, progress=bar.progress)
    finally:
        bar.close()
    print(table.format())
    if args.csv:
        table.to_csv(args.csv)
        print(f"table written to {args.csv}")
    if args.predictions:
        args.predictions.mkdir(parents=True, exist_ok=True)
        for row, res in zip(table.rows, table.results):
            name = "hdmil" if res.method == "HDMIL" else "hdmil_dagger"
            res.to_csv(args.predictions / f"fold_{row['fold']}_{name}.csv")
        print(f"per-slide predictions written to {args.predictions}")
    return 0
