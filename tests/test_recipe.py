"""The demo recipe (``hdmil recipe demo``) and the bundled demo model it made."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hdmil.checkpoint import default_model_path, load_model
from hdmil.cli import main
from hdmil.recipe import HELDOUT_OFFSET, RecipeConfig, RecipeError, run_recipe, slide_truth

MAX_BUNDLE_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The recipe at its smallest: a few small slides and two epochs (through the CLI)."""
    out = tmp_path_factory.mktemp("recipe") / "demo"
    rc = main(["recipe", "demo", "--out", str(out), "--quick", "--seed", "3"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_quick_recipe_writes_a_model_the_pipeline_can_load(quick_run: Path) -> None:
    model = load_model(quick_run / "hdmil-demo.safetensors")
    assert model.dmin is not None and model.lipn is not None
    assert model.classes == ["normal", "tumor"]
    cfg = model.config
    assert cfg["encoder"] == RecipeConfig().encoder and cfg["encoder_pretrained"] is False
    assert model.feature_dim == cfg["feature_dim"]
    # the encoder the features were made with is the one beside the checkpoint
    _assert_features_come_from_pinned_encoder(model, quick_run / "cohort", quick_run / "features")
    prov = cfg["provenance"]
    assert prov["recipe"]["seed"] == 3 and prov["heldout_cohort"]["seed"] == 3 + HELDOUT_OFFSET


@pytest.mark.slow
def test_quick_recipe_report_and_held_out_slides(quick_run: Path) -> None:
    report = json.loads((quick_run / "hdmil-demo.json").read_text())
    assert report["model"] == "hdmil-demo.safetensors" and report["bytes"] > 0
    assert report["classes"] == ["normal", "tumor"]
    ho = report["heldout"]["all"]
    assert ho["n_slides"] == len(report["heldout"]["slides"]) > 0
    for key in ("hdmil_acc", "hdmil_dagger_acc", "lipn_kept_ratio", "dmin_kept_ratio"):
        assert 0.0 <= ho[key] <= 1.0, key
    assert set(report["timings_s"]) >= {"cohort", "features", "dmin", "lipn", "evaluate", "total"}
    # held-out slides come from seeds the training cohort never used
    seeds = {
        name: {s["seed"] for s in json.loads((quick_run / name / "cohort.json").read_text())["slides"]}
        for name in ("cohort", "heldout")
    }
    assert seeds["cohort"] and seeds["heldout"] and not seeds["cohort"] & seeds["heldout"]
    # every held-out slide with features was evaluated against its ground truth
    evaluated = {s["slide_id"] for s in report["heldout"]["slides"]}
    assert evaluated == {p.stem for p in (quick_run / "heldout_features").glob("*.h5")}


@pytest.mark.slow
def test_recipe_is_reproducible(quick_run: Path, tmp_path: Path) -> None:
    """Same seed, same model: the cohort, features and training are all seeded."""
    from safetensors.torch import load_file

    cfg = RecipeConfig.quick(seed=3)
    cfg.n_heldout = 0  # the training side is what must repeat; skip the report's slides
    again = run_recipe(tmp_path / "again", cfg)
    a = load_file(str(quick_run / "dmin" / "dmin.safetensors"))
    b = load_file(str(again.out_dir / "dmin" / "dmin.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


@pytest.mark.slow
def test_hard_negatives_are_the_tumour_free_patches_rated_most_tumour_like(quick_run: Path) -> None:
    from hdmil.features import create_encoder
    from hdmil.grid import build_grid
    from hdmil.reading import iter_patches
    from hdmil.recipe import hard_negatives
    from hdmil.slide import open_slide

    encoder = create_encoder(RecipeConfig().encoder, device="cpu")
    torch.manual_seed(0)
    head = torch.nn.Linear(encoder.dim, 1)
    manifest = json.loads((quick_run / "cohort" / "cohort.json").read_text())["slides"]
    s = next(s for s in manifest if s["label"] == "tumor")
    (got_pixels,), (got_targets,) = hard_negatives(encoder, head, quick_run / "cohort",
                                                   [s["slide_id"]], per_slide=3)
    assert got_pixels.shape[0] == got_targets.shape[0] == 3 and not got_targets.any()
    # against every tumour-free patch of the slide, scored here
    with open_slide(quick_run / "cohort" / s["path"]) as slide:
        grid = build_grid(slide)
        frac = slide_truth(quick_run / "cohort" / s["truth_npz"], grid.coords)
        free = np.flatnonzero(frac == 0)
        assert 3 < len(free) < len(frac)  # the slide has tumour, and enough tumour-free tissue
        pixels = np.concatenate([b.pixels for b in iter_patches(
            slide, grid.coords[free], grid.patch_size_level0, batch_size=64)])
    with torch.no_grad():
        scores = head(encoder.model(encoder.preprocess(pixels))).squeeze(1).numpy()
    top = np.argsort(-scores, kind="stable")[:3]
    np.testing.assert_array_equal(got_pixels, pixels[top])


def test_slide_truth_maps_coords_to_the_patch_grid(tmp_path: Path) -> None:
    frac = np.zeros((3, 4), np.float32)
    frac[1, 2] = 0.8
    frac[2, 0] = 0.3
    npz = tmp_path / "s.truth.npz"
    np.savez(npz, tumor_fraction=frac, patch_size_level0=np.int64(256))
    coords = np.array([[512, 256], [0, 512], [0, 0], [768, 512]])  # (x, y) of patches
    np.testing.assert_allclose(slide_truth(npz, coords), [0.8, 0.3, 0.0, 0.0])


def test_bad_recipe_settings_are_user_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(RecipeError, match="at least 4"):
        RecipeConfig(n_slides=2)
    rc = main(["recipe", "demo", "--out", str(tmp_path), "--slides", "1"])
    assert rc == 1 and "--slides" in capsys.readouterr().err


# -- the bundled model ------------------------------------------------------------------------


def _assert_features_come_from_pinned_encoder(model, cohort_dir: Path, features_dir: Path) -> None:
    from hdmil.features import read_features
    from hdmil.reading import iter_patches
    from hdmil.recipe import encoder_for_model
    from hdmil.slide import open_slide

    encoder = encoder_for_model(model, device="cpu")
    assert encoder.name == model.encoder and encoder.dim == model.feature_dim
    h5 = sorted(features_dir.glob("*.h5"))[0]
    bag = read_features(h5)
    with open_slide(cohort_dir / f"{h5.stem}.tiff") as slide:
        batch = next(iter(iter_patches(slide, bag.coords[:4], int(bag.attrs["patch_size_level0"]),
                                       batch_size=4)))
    again = encoder.embed(batch.pixels).numpy()
    np.testing.assert_allclose(again, bag.features[batch.indices], rtol=1e-4, atol=1e-5)


@pytest.fixture
def bundled(monkeypatch) -> Path:
    monkeypatch.delenv("HDMIL_MODEL", raising=False)
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"no bundled demo model at {path} (make it: hdmil recipe demo --install)")
    return path


def test_bundled_model_loads_and_says_what_it_is(bundled: Path) -> None:
    assert default_model_path().name == "hdmil-demo.safetensors"
    assert bundled.stat().st_size <= MAX_BUNDLE_BYTES
    model = load_model(default_model_path())
    assert model.dmin is not None and model.lipn is not None
    assert model.classes == ["normal", "tumor"]
    assert model.encoder and model.config["demo"] is True
    assert "not for diagnosis" in model.config["intended_use"]
    assert model.feature_dim == model.config["feature_dim"]
    report = json.loads(bundled.with_suffix(".json").read_text())
    assert report["sha256"] == model.sha256, "hdmil-demo.json describes another checkpoint"
    assert (bundled.parent / model.config["encoder_weights"]).stat().st_size > 0


def test_pipeline_builds_the_bundled_models_own_encoder(bundled: Path) -> None:
    """The DMIN was trained on features of the encoder weights beside it, not on random ones."""
    from safetensors.torch import load_file

    from hdmil.pipeline import encoder_for

    model = load_model(bundled)
    pinned = load_file(bundled.parent / model.config["encoder_weights"])
    got = encoder_for(model, "cpu").model.state_dict()
    assert pinned, "the encoder weights file is empty"
    for k, v in pinned.items():
        key = k if k in got else k.split(".", 1)[1]  # tolerate a module prefix in the file
        torch.testing.assert_close(got[key], v, msg=k)


@pytest.mark.slow
def test_predict_on_the_real_cmu_slide_with_the_bundled_model(
    bundled: Path, cmu_slide: Path, tmp_path: Path, capsys
) -> None:
    rc = main(["predict", str(cmu_slide), "--out", str(tmp_path), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / cmu_slide.stem / "report.json").read_text())
    assert report["model"]["name"] == "hdmil-demo.safetensors"
    assert report["prediction"] in ("normal", "tumor")
    assert sum(report["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert 0 < report["n_patches"] and 0 <= report["n_kept"] <= report["n_patches"]


def test_dmin_is_trained_again_while_its_tumour_branch_fails(tmp_path: Path, monkeypatch) -> None:
    """The recipe's branch check: next seed while the branch AUC is low, first pass kept, else
    the best of the tries; every try is listed."""
    import hdmil.train as train_pkg
    from hdmil.recipe import train_dmin_checked
    from hdmil.train import DMINTrainConfig, TrainResult

    def fake_runs(branch_aucs: dict[int, float]):
        calls: list[tuple[int, str]] = []

        def train_dmin(cohort, split, tcfg, folder, progress=None, cancel=None):
            calls.append((tcfg.seed, Path(folder).name))
            return TrainResult(Path(folder), Path(folder) / "dmin.safetensors", Path(folder) / "log.csv",
                               best_epoch=tcfg.seed, epochs_run=1, stopped_early=False,
                               best_metrics={"val_auc": 1.0, "val_branch_auc": branch_aucs[tcfg.seed]})
        return calls, train_dmin

    said: list[str] = []
    calls, fake = fake_runs({5: 0.2, 6: 0.95, 7: 1.0})
    monkeypatch.setattr(train_pkg, "train_dmin", fake)
    cfg = RecipeConfig(seed=5, dmin_tries=3, branch_auc_min=0.9)
    res, tries = train_dmin_checked(None, None, cfg, DMINTrainConfig(seed=5), tmp_path, None, None,
                                    said.append)
    assert calls == [(5, "dmin"), (6, "dmin-seed6")]  # stops at the first seed that passes
    assert res.best_epoch == 6 and [t["val_branch_auc"] for t in tries] == [0.2, 0.95]
    assert any("branch AUC 0.200" in line for line in said)

    calls, fake = fake_runs({5: 0.3, 6: 0.6, 7: 0.1})
    monkeypatch.setattr(train_pkg, "train_dmin", fake)
    res, tries = train_dmin_checked(None, None, cfg, DMINTrainConfig(seed=5), tmp_path, None, None,
                                    said.append)
    assert [c[0] for c in calls] == [5, 6, 7] and len(tries) == 3
    assert res.best_epoch == 6  # none passed: the highest branch AUC


# -- the recipe's small parts -------------------------------------------------------------------


def test_stage_clock_times_each_finished_stage_in_order(monkeypatch) -> None:
    from hdmil.recipe import StageClock
    from hdmil.recipe import timing

    ticks = iter([10.0, 12.5, 20.0, 21.0, 30.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    cpu = iter([1.0, 4.0, 5.0, 5.5, 6.0])
    monkeypatch.setattr(timing, "cpu_seconds", lambda: next(cpu))
    clock = StageClock()
    with clock.timed("cohort"):
        pass
    with clock.timed("encoder"):
        pass
    with pytest.raises(RuntimeError), clock.timed("dmin"):  # a failed stage records nothing
        raise RuntimeError("boom")
    assert clock.wall == {"cohort": 2.5, "encoder": 1.0}
    assert clock.cpu == {"cohort": 3.0, "encoder": 0.5}
    assert list(clock.wall) == ["cohort", "encoder"]


def test_report_values_are_plain_json_rounded_to_six_digits() -> None:
    from hdmil.recipe.run import _jsonable

    got = _jsonable({"auc": np.float32(0.123456789), "nan": float("nan"), "n": np.int64(3),
                     "burdens": (0.4, 0.2), "path": Path("a/b"), "ok": np.bool_(True)})
    assert got == {"auc": 0.123457, "nan": None, "n": 3, "burdens": [0.4, 0.2], "path": "a/b",
                   "ok": True}
    assert type(got["n"]) is int and type(got["ok"]) is bool
    json.dumps(got, allow_nan=False)


def test_install_demo_copies_the_three_files_readable_by_all(tmp_path: Path) -> None:
    from hdmil.recipe import install_demo
    from hdmil.recipe.install import DEMO_FILES

    src, dst = tmp_path / "run", tmp_path / "assets"
    src.mkdir()
    with pytest.raises(RecipeError, match="run the recipe first"):
        install_demo(src, dst)
    for i, name in enumerate(DEMO_FILES):
        (src / name).write_bytes(bytes([i]) * 10)
        (src / name).chmod(0o600)
    copied = install_demo(src, dst)
    assert [p.name for p in copied] == list(DEMO_FILES)
    for i, path in enumerate(copied):
        assert path.read_bytes() == bytes([i]) * 10
        assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in dst.iterdir()) == sorted(DEMO_FILES)  # no temporary file left


def test_patch_encoder_trains_on_the_one_loop_and_stops_on_cancel(tmp_path: Path) -> None:
    import csv
    import threading

    from hdmil.errors import Cancelled
    from hdmil.features import create_encoder
    from hdmil.recipe import patch_head, train_patch_encoder

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    targets = rng.random(6).astype(np.float32)
    encoder = create_encoder(RecipeConfig().encoder, device="cpu")
    head = patch_head(encoder, 1)
    before = head.weight.detach().clone()
    seen: list[tuple[str, int, int]] = []
    fit = train_patch_encoder(encoder, pixels, targets, epochs=2, batch_size=4, seed=1, head=head,
                              progress=lambda *a: seen.append(a), run_dir=tmp_path / "enc")
    assert fit["epochs"] == 2 and fit["patches"] == 6
    assert not torch.equal(head.weight, before)  # the head given is the head trained
    assert seen == [("encoder", i, 4) for i in range(1, 5)]  # per step, 2 steps x 2 epochs
    with open(tmp_path / "enc" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[-1]["train_loss"]) == pytest.approx(fit["loss"], rel=1e-5)
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled, match="recipe cancelled"):
        train_patch_encoder(encoder, pixels, targets, epochs=1, cancel=cancel)
    assert not encoder.model.training  # left ready for features even when stopped


def test_recipe_configs_come_through_the_options_table() -> None:
    from hdmil.errors import HDMILError
    from hdmil.train import (AttentionShare, DMINTrainConfig, KeptBudget, LIPNTrainConfig,
                             RecallShare)

    cfg = RecipeConfig(seed=7)
    dmin = cfg.dmin_config()
    assert isinstance(dmin, DMINTrainConfig)
    assert (dmin.keep_rate, dmin.k_sample, dmin.inst_out_of_class, dmin.seed, dmin.device) == (
        0.6, 8, False, 7, "cpu")
    assert (dmin.max_epochs, dmin.min_epochs, dmin.patience) == (200, 50, 20)
    assert dmin.lr == DMINTrainConfig().lr  # not the recipe's encoder_lr
    lipn = cfg.lipn_config(device="cuda")
    assert isinstance(lipn, LIPNTrainConfig)
    assert lipn.calibration == KeptBudget(0.5) and lipn.target_temperature == 3.0
    assert (lipn.lr, lipn.batch_patches, lipn.max_epochs, lipn.patience) == (1e-3, 256, 100, 5)
    assert (lipn.targets, lipn.match, lipn.views, lipn.dilation) == ("soft", "bce", 4, (0, 1))
    assert (lipn.stain_jitter, lipn.seed, lipn.device) == (1.0, 7, "cuda")
    recall = RecipeConfig(lipn_kept=None, lipn_recall=0.97).lipn_config()
    assert recall.calibration == RecallShare(0.97)
    shares = RecipeConfig(lipn_kept=None, lipn_attention=(0.85, 0.98)).lipn_config()
    assert shares.calibration == AttentionShare((0.85, 0.98))
    assert RecipeConfig(lipn_kept=None).lipn_config().calibration is None
    with pytest.raises(HDMILError, match="lipn_recall and lipn_kept both set"):
        RecipeConfig(lipn_recall=0.97).lipn_config()  # two calibrations: say which
