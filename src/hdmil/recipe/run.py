"""The recipe end to end: cohorts → encoder → features → DMIN → LIPN → held-out report → files."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdmil.files import to_jsonable, write_json_atomic
from hdmil.recipe.cohorts import (check_disjoint, load_training_cohort, make_cohort, manifest,
                                  stratified_split)
from hdmil.recipe.config import DEMO_NAME, Progress, RecipeConfig, RecipeError
from hdmil.recipe.encoder import train_demo_encoder
from hdmil.recipe.features import cohort_features
from hdmil.recipe.heldout import heldout_metrics
from hdmil.recipe.timing import StageClock
from hdmil.recipe.training import train_dmin_checked

__all__ = ["RecipeResult", "run_recipe"]

REPORT_DIGITS = 6  # floats in the report and the checkpoint's provenance


@dataclass
class RecipeResult:
    out_dir: Path
    checkpoint: Path
    encoder_weights: Path
    report_path: Path
    report: dict[str, Any] = field(default_factory=dict)


def run_recipe(
    out_dir: str | os.PathLike,
    cfg: RecipeConfig | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    log: Callable[[str], None] | None = None,
) -> RecipeResult:
    """Make the demo model in ``out_dir``: ``hdmil-demo.safetensors`` (DMIN + LIPN),
    ``hdmil-demo-encoder.safetensors`` (the trained encoder) and ``hdmil-demo.json`` (the report).

    Work folders ``cohort/``, ``heldout/``, ``encoder/`` (and ``encoder_hard_negatives/``: the
    encoder's epoch logs), ``features/``, ``heldout_features/``, ``dmin/`` and ``lipn/`` stay in
    ``out_dir``; cohorts made before with the same settings are re-used.
    ``progress(stage, done, total)`` for stages cohort, heldout, encoder, features,
    heldout_features, dmin, lipn; ``log(line)`` gets one line per finished step. ``cancel`` (a
    ``threading.Event``) stops between slides / steps with ``Cancelled``.
    """
    import torch

    cfg = cfg or RecipeConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.threads)))
    try:
        return _Run(cfg, out, progress, cancel, log or (lambda line: None)).run()
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Run:
    """One recipe run: its settings, where it writes, how it reports; a method per stage."""

    cfg: RecipeConfig
    out: Path
    progress: Progress | None
    cancel: threading.Event | None
    say: Callable[[str], None]
    clock: StageClock = field(default_factory=StageClock)
    facts: dict[str, Any] = field(default_factory=dict)  # the report's entries, stage by stage

    def stage(self, name: str) -> Progress | None:
        """The progress callback of one named stage."""
        progress = self.progress
        return None if progress is None else (lambda _s, d, n: progress(name, d, n))

    def run(self) -> RecipeResult:
        from hdmil.checkpoint import load_model
        from hdmil.features import save_encoder

        with self.clock.timed("total"):
            split = self.cohorts()
            encoder = self.encoder(split)
            skipped = self.features(encoder)
            cohort, split = self.training_cohort(split, skipped)
            lipn_checkpoint = self.models(cohort, split)
            model = load_model(lipn_checkpoint)
            heldout = self.evaluate(model)
            enc_path = save_encoder(encoder, self.out / f"{DEMO_NAME}-encoder.safetensors")
        return self.bundle(model, encoder, enc_path, heldout)

    def cohorts(self):
        """Training and held-out cohorts, from different seeds; the training cohort's split."""
        cfg, out = self.cfg, self.out

        def make(name: str, n: int, seed: int, burdens: tuple[float, ...]) -> str:
            with self.clock.timed(name):
                return make_cohort(out / name, n, seed, cfg.slide_size, burdens, cfg.workers,
                                   self.stage(name), self.cancel)

        how = make("cohort", cfg.n_slides, cfg.seed, cfg.tumor_burdens)
        self.say(f"cohort: {cfg.n_slides} slides of {cfg.slide_size} px {how} in "
                 f"{self.clock.wall['cohort']:.0f} s")
        if cfg.n_heldout:
            how = make("heldout", cfg.n_heldout, cfg.heldout_seed, cfg.heldout_burdens)
            check_disjoint(out / "cohort", out / "heldout")
            self.say(f"held-out cohort: {cfg.n_heldout} slides {how} in "
                     f"{self.clock.wall['heldout']:.0f} s")
        slides = manifest(out / "cohort")
        return stratified_split([s["slide_id"] for s in slides], [s["label"] for s in slides],
                                cfg.val_fraction, cfg.seed)

    def encoder(self, split: Any) -> Any:
        """The encoder trained on the training slides' patch truth."""
        with self.clock.timed("encoder"):
            encoder, fit = train_demo_encoder(self.cfg, self.out, split.train, self.stage,
                                              self.cancel)
        self.facts["encoder_fit"] = fit
        hard = (f", then + {fit['hard_negatives']} hard negatives x "
                f"{fit['hard_negative_epochs']} epochs" if "hard_negatives" in fit else "")
        self.say(f"encoder {encoder.name}: {fit['patches']} patches x {fit['epochs']} epochs"
                 f"{hard}, loss {fit['loss']:.3f}, {self.clock.wall['encoder']:.0f} s")
        return encoder

    def features(self, encoder: Any) -> dict[str, str]:
        """Features of both cohorts; the training slides left out (no tissue) and why."""
        cfg, out = self.cfg, self.out
        with self.clock.timed("features"):
            skipped = cohort_features(out / "cohort", out / "features", encoder, cfg.batch_size,
                                      self.stage("features"), self.cancel)
        self.say(f"features ({encoder.name}, {encoder.dim}-d): {self.clock.wall['features']:.0f} s"
                 + (f"; {len(skipped)} slides without tissue left out" if skipped else ""))
        self.facts["heldout_skipped"] = {}
        if cfg.n_heldout:
            with self.clock.timed("heldout_features"):
                self.facts["heldout_skipped"] = cohort_features(
                    out / "heldout", out / "heldout_features", encoder, cfg.batch_size,
                    self.stage("heldout_features"), self.cancel)
        self.facts["skipped"] = skipped
        return skipped

    def training_cohort(self, split: Any, skipped: dict[str, str]):
        """The training slides with features, and the split restricted to them."""
        out = self.out
        cohort = load_training_cohort(out / "cohort" / "labels.csv", out / "features", skipped)
        if len(set(cohort.labels.tolist())) < 2:
            raise RecipeError(f"{out}: the training cohort has slides of one class only")
        split = split.restrict(cohort.slide_ids)
        if not split.train or not split.val:
            raise RecipeError(f"{out}: too few slides with tissue to train and validate")
        self.facts["training_counts"] = {"n_with_features": len(cohort),
                                         "n_train": len(split.train), "n_val": len(split.val)}
        return cohort, split

    def models(self, cohort: Any, split: Any) -> Path:
        """DMIN (with the branch check) then LIPN, from slide labels only; LIPN's checkpoint."""
        from hdmil.train import train_lipn

        with self.clock.timed("dmin"):
            dmin, tries = train_dmin_checked(cohort, split, self.cfg, self.cfg.dmin_config(),
                                             self.out, self.stage("dmin"), self.cancel, self.say)
        best = dmin.best_metrics
        self.say(f"DMIN: best epoch {dmin.best_epoch} of {dmin.epochs_run}, "
                 f"val AUC {best.get('val_auc', math.nan):.3f}, kept "
                 f"{best.get('val_kept_ratio', math.nan):.2f}, branch AUC "
                 f"{best.get('val_branch_auc', math.nan):.3f}, "
                 f"{len(tries)} {'try' if len(tries) == 1 else 'tries'}, "
                 f"{self.clock.wall['dmin']:.0f} s")
        with self.clock.timed("lipn"):
            lipn = train_lipn(cohort, split, dmin.checkpoint, self.cfg.lipn_config(),
                              self.out / "lipn", progress=self.stage("lipn"), cancel=self.cancel)
        self.say(f"LIPN: best epoch {lipn.best_epoch} of {lipn.epochs_run}, "
                 f"{self.clock.wall['lipn']:.0f} s")
        self.facts["dmin"] = {"best_epoch": dmin.best_epoch, "epochs_run": dmin.epochs_run,
                              "best_val": dmin.best_metrics, "tries": tries}
        self.facts["lipn"] = {"best_epoch": lipn.best_epoch, "epochs_run": lipn.epochs_run,
                              "best_val": lipn.best_metrics}
        return lipn.checkpoint

    def evaluate(self, model: Any) -> dict[str, Any]:
        """The held-out report against the cohort's ground truth (empty without held-out slides)."""
        if not self.cfg.n_heldout:
            return {}
        with self.clock.timed("evaluate"):
            heldout = heldout_metrics(model, self.out / "heldout", self.out / "heldout_features",
                                      self.cfg.heldout_burdens, self.cancel)
        a = heldout["all"]
        self.say(f"held-out: HDMIL AUC {a['hdmil_auc']:.3f} ACC {a['hdmil_acc']:.3f}, HDMIL† AUC "
                 f"{a['hdmil_dagger_auc']:.3f}, LIPN recall {a['lipn_recall']:.3f} kept "
                 f"{a['lipn_kept_ratio']:.2f}, attention AUC {a['attention_auc']:.3f}")
        return heldout

    def bundle(self, model: Any, encoder: Any, enc_path: Path, heldout: dict[str, Any]):
        """The bundled checkpoint (DMIN + LIPN, the demo's config) and the report beside it."""
        from hdmil.checkpoint import _sha256, save_checkpoint

        config = _jsonable(_checkpoint_config(model, encoder, enc_path, self.cfg,
                                              self.facts["skipped"], heldout))
        ckpt = save_checkpoint(self.out / f"{DEMO_NAME}.safetensors",
                               {"dmin": model.dmin, "lipn": model.lipn}, config)
        report = _jsonable({
            "model": ckpt.name, "sha256": _sha256(ckpt), "bytes": ckpt.stat().st_size,
            **self.report_body(model, encoder, enc_path, heldout),
        })
        report_path = write_json_atomic(self.out / f"{DEMO_NAME}.json", report, indent=1)
        self.say(f"wrote {ckpt} ({ckpt.stat().st_size / 1e6:.1f} MB) and {report_path} "
                 f"in {self.clock.wall['total'] / 60:.1f} min")
        return RecipeResult(self.out, ckpt, enc_path, report_path, report)

    def report_body(self, model: Any, encoder: Any, enc_path: Path,
                    heldout: dict[str, Any]) -> dict[str, Any]:
        """The report after the checkpoint's name, hash and size."""
        import torch

        from hdmil import __version__

        cfg, facts = self.cfg, self.facts
        return {
            "encoder": {"name": encoder.name, "dim": encoder.dim, "file": enc_path.name,
                        "weights": "trained by the recipe on the training slides' patch truth",
                        **facts["encoder_fit"]},
            "classes": list(model.classes),
            "recipe": cfg.to_dict(),
            "training_cohort": {"seed": cfg.seed, "n_slides": cfg.n_slides,
                                "n_with_features": facts["training_counts"]["n_with_features"],
                                "skipped": facts["skipped"],
                                "n_train": facts["training_counts"]["n_train"],
                                "n_val": facts["training_counts"]["n_val"]},
            "heldout_cohort": {"seed": cfg.heldout_seed, "n_slides": cfg.n_heldout,
                               "skipped": facts["heldout_skipped"]},
            "dmin": facts["dmin"],
            "lipn": facts["lipn"],
            "heldout": heldout,
            "timings_s": self.clock.wall,
            "cpu_s": self.clock.cpu,
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": int(cfg.threads),
                        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
            "versions": {"hdmil": __version__, "torch": torch.__version__},
        }


def _checkpoint_config(model: Any, encoder: Any, enc_path: Path, cfg: RecipeConfig,
                       skipped: dict[str, str], heldout: dict[str, Any]) -> dict[str, Any]:
    """LIPN's checkpoint config, plus the demo's: its encoder file, its use, how it was made."""
    # the features' recipe says "trained by the recipe": the encoder file below replaces it
    config = {k: v for k, v in model.config.items() if k not in ("modules", "model_type", "encoder_recipe")}
    config.update({
        "encoder": encoder.name,  # the architecture; its weights are the file below
        "encoder_pretrained": False,
        "encoder_weights": enc_path.name,  # beside the checkpoint (trained by this recipe)
        "demo": True,
        "intended_use": "demonstration on synthetic slides; not for diagnosis",
    })
    prov = dict(config.get("provenance") or {})
    prov.update({
        "stage": "recipe",
        "recipe": cfg.to_dict(),
        "training_cohort": {"seed": cfg.seed, "n_slides": cfg.n_slides,
                            "slide_size": cfg.slide_size, "skipped": skipped},
        "heldout_cohort": {"seed": cfg.heldout_seed, "n_slides": cfg.n_heldout},
        "heldout_metrics": {k: v for k, v in heldout.items() if k != "slides"},
    })
    for key in ("features_dir", "labels", "dmin_checkpoint"):  # machine-local paths
        prov.pop(key, None)
    config["provenance"] = prov
    return config


def _jsonable(obj: Any) -> Any:
    """``hdmil.files.to_jsonable``, with floats rounded to ``REPORT_DIGITS`` (a readable report)."""
    return _rounded(to_jsonable(obj))


def _rounded(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return round(obj, REPORT_DIGITS) if isinstance(obj, float) else obj
