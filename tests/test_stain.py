"""Stain normalisation (issue 18 §5): Macenko and Reinhard via torchstain before the encoder, the
fitted target recorded in the encoder recipe and the checkpoint, applied again by ``predict``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from hdmil.checkpoint import load_model, read_checkpoint_config, save_checkpoint
from hdmil.cli import main
from hdmil.errors import CheckpointError
from hdmil.features import create_encoder, read_features
from hdmil.features.recipe import EncoderRecipe, build_from_recipe
from hdmil.features.stain import StainNormalizer, load_stain_target, stain_of, with_stain
from hdmil.grid import build_grid
from hdmil.reading import iter_patches
from hdmil.slide import open_slide
from helpers import TINY


def _patches(path: Path) -> np.ndarray:
    with open_slide(path) as s:
        g = build_grid(s)
        return np.concatenate([b.pixels for b in iter_patches(s, g.coords, g.patch_size_level0, out_px=256)])


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict:
    """A slide in the synthetic reference stain, one in a strongly shifted stain (two copies of
    each), and a target PNG of reference-stained tissue."""
    from PIL import Image

    from hdmil.synth import synth_slide
    from hdmil.synth.slide import Stain

    root = tmp_path_factory.mktemp("stain")
    ref, odd = root / "ref.tiff", root / "odd.tiff"
    synth_slide(ref, size=(2048, 1536), seed=1, tumor_fraction=0.0)
    synth_slide(odd, size=(2048, 1536), seed=2, tumor_fraction=0.4, stain=Stain.random(5, 2.0))
    folder = root / "slides"
    folder.mkdir()
    for sid, src in (("s0", ref), ("s1", odd), ("s2", ref), ("s3", odd)):
        os.symlink(src, folder / f"{sid}.tiff")
    target = root / "target.png"
    Image.fromarray(np.concatenate(list(_patches(ref)[:4]), axis=1)).save(target)
    return {"root": root, "ref": ref, "odd": odd, "folder": folder, "target": target}


@pytest.fixture(scope="module")
def run(slides) -> dict:
    """Macenko-normalised features of the four slides and a DMIN trained on them."""
    from hdmil.train import DMINTrainConfig, train_dmin
    from hdmil.train.data import load_cohort
    from hdmil.train.splits import Split

    root = slides["root"]
    feats = root / "feats"
    assert main(["features", *map(str, sorted(slides["folder"].iterdir())), "--encoder", TINY,
                 "--out", str(feats), "--stain", "macenko", "--stain-target", str(slides["target"])]) == 0
    labels = root / "labels.csv"
    labels.write_text("slide_id,label\ns0,normal\ns1,tumor\ns2,normal\ns3,tumor\n")
    cohort = load_cohort(labels, feats)
    cfg = DMINTrainConfig(max_epochs=1, min_epochs=1, patience=1, hidden=16, device="cpu")
    res = train_dmin(cohort, Split(("s0", "s1"), ("s2", "s3"), ("s2", "s3")), cfg, root / "dmin")
    return {"feats": feats, "ckpt": Path(res.checkpoint), "cohort": cohort}


def _stain_params(method: str, patches: np.ndarray) -> np.ndarray:
    key = "stain_matrix" if method == "macenko" else "means"
    return np.array([StainNormalizer.fit(method, p).params[key] for p in patches])


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalised_patches_move_toward_the_target(slides, method):
    target = load_stain_target(method, slides["target"])
    key = "stain_matrix" if method == "macenko" else "means"
    want = np.array(target.params[key])
    odd = _patches(slides["odd"])[:8]
    out, fallbacks = target.normalize(odd)
    assert fallbacks == 0 and out.shape == odd.shape and out.dtype == np.uint8
    before = np.abs(_stain_params(method, odd) - want).mean()
    after = np.abs(_stain_params(method, out) - want).mean()
    assert after < 0.5 * before  # the odd stain's own statistics, estimated again, are the target's


def test_background_patches_pass_through_counted(slides):
    rng = np.random.default_rng(0)
    tissue = _patches(slides["odd"])[:1]
    glass = np.clip(rng.normal(243, 2, (1, 256, 256, 3)), 0, 255).astype(np.uint8)
    white = np.full((1, 256, 256, 3), 255, np.uint8)
    batch = np.concatenate([glass, tissue, white])
    for method in ("macenko", "reinhard"):
        out, fallbacks = load_stain_target(method, slides["target"]).normalize(batch)
        assert fallbacks == 2
        assert np.array_equal(out[0], glass[0]) and np.array_equal(out[2], white[0])
        assert not np.array_equal(out[1], tissue[0])


def test_the_fitted_target_round_trips_through_a_checkpoint(slides, run, tmp_path):
    fitted = load_stain_target("macenko", slides["target"])
    bag = read_features(run["feats"] / "s1.h5")
    recipe = EncoderRecipe.from_dict(bag.attrs["encoder_recipe"])
    assert recipe.stain_normalizer() == fitted and bag.attrs["stain"] == "macenko"
    assert recipe.stain["fitted_on"] == "target.png"  # a name for people; the numbers are the target
    config = read_checkpoint_config(run["ckpt"])
    assert EncoderRecipe.from_dict(config["encoder_recipe"]).stain_normalizer() == fitted
    # the recorded normaliser reused as a target file gives the same one
    recorded = tmp_path / "stain.json"
    recorded.write_text(json.dumps(config["encoder_recipe"]))
    assert load_stain_target("macenko", recorded) == fitted
    with pytest.raises(Exception, match="records macenko stain normalisation, not reinhard"):
        load_stain_target("reinhard", recorded)


def test_predict_applies_the_recorded_stain_normalisation(slides, run, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["predict", str(slides["folder"] / "s1.tiff"), "--model", str(run["ckpt"]), "--out", str(out),
                 "--no-lipn"]) == 0
    assert "stain normalisation: macenko (fitted on target.png)" in capsys.readouterr().err
    with h5py.File(out / "s1" / "patches.h5") as f:
        coords, feats, rows = f["coords"][()], f["features"][()], f["feature_index"][()]
    report = json.loads((out / "s1" / "report.json").read_text())
    assert report["reading"]["stain"] == "macenko" and report["reading"]["stain_fallbacks"] == 0
    bag = read_features(run["feats"] / "s1.h5")
    row_of = {tuple(c): i for i, c in enumerate(bag.coords)}
    extracted = bag.features[[row_of[tuple(c)] for c in coords[rows]]]
    np.testing.assert_allclose(feats, extracted, rtol=0, atol=1e-5)
    # the same patches without normalisation give other features: the test can tell
    plain = create_encoder(TINY, device="cpu").embed(_patches(slides["odd"])[: len(feats)]).numpy()
    assert not np.allclose(plain, extracted[: len(plain)], atol=1e-3)


def _resaved(src: Path, dst: Path, stain: dict | None) -> Path:
    """The checkpoint at ``src`` with its recipe's stain replaced (None: as read, no stain)."""
    model = load_model(src)
    config = {k: v for k, v in model.config.items() if k not in ("modules", "model_type", "format_version")}
    recipe = dict(config["encoder_recipe"])
    recipe.pop("stain", None)
    if stain is not None:
        recipe["stain"] = stain
    config["encoder_recipe"] = recipe
    dst.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(dst, {"dmin": model.dmin}, config)


def test_a_model_never_runs_on_features_of_another_stain_handling(slides, run, tmp_path):
    from hdmil.pipeline import encoder_for, run_slide

    model = load_model(run["ckpt"])
    plain = create_encoder(TINY, device="cpu")
    with pytest.raises(CheckpointError, match="macenko .* stain-normalised patches, but the encoder "
                       "given applies no stain normalisation; refused"):
        run_slide(slides["folder"] / "s0.tiff", model, encoder=plain, use_lipn=False)
    unstained = load_model(_resaved(run["ckpt"], tmp_path / "plain.safetensors", None))
    with pytest.raises(CheckpointError, match="patches as read .* applies macenko"):
        run_slide(slides["folder"] / "s0.tiff", unstained, encoder=encoder_for(model, "cpu"), use_lipn=False)
    reinhard = load_stain_target("reinhard", slides["target"])
    with pytest.raises(CheckpointError, match="applies reinhard"):
        run_slide(slides["folder"] / "s0.tiff", model, encoder=with_stain(plain, reinhard), use_lipn=False)
    # --encoder NAME|FILE gets the recorded normalisation too
    assert stain_of(encoder_for(model, "cpu", override=TINY)) == stain_of(encoder_for(model, "cpu"))
    assert stain_of(encoder_for(unstained, "cpu")) is None


def test_old_checkpoints_and_recipes_have_no_stain(tmp_path):
    from hdmil.pipeline import encoder_for, fit_encoder

    old = {"name": TINY, "weights": "random", "kwargs": {}, "dim": 8, "source": "hdmil"}
    recipe = EncoderRecipe.from_dict(old)
    assert recipe.stain is None and recipe.to_dict() == old and recipe.same_encoder(EncoderRecipe.from_dict(old))
    encoder = build_from_recipe(recipe, device="cpu")
    assert stain_of(encoder) is None and type(encoder).__name__ == "Encoder"
    legacy = load_model(Path(__file__).parent / "data/legacy/train/dmin.safetensors")
    assert "encoder_recipe" not in legacy.config
    enc = create_encoder(TINY, device="cpu")
    with pytest.raises(CheckpointError, match="features"):  # only its width differs, not its stain
        fit_encoder(legacy, enc)
    assert stain_of(encoder_for(load_model(_bundled()), "cpu")) is None


def _bundled() -> Path:
    from hdmil.checkpoint import default_model_path

    return Path(default_model_path())


def test_features_cli_stain_options(slides, run, tmp_path, capsys):
    s0 = str(slides["folder"] / "s0.tiff")
    out = tmp_path / "f"

    def refused(*extra: str) -> str:
        capsys.readouterr()
        assert main(["features", s0, "--encoder", TINY, "--out", str(out), *extra]) == 1
        return capsys.readouterr().err.strip()

    assert "--stain macenko needs --stain-target" in refused("--stain", "macenko")
    assert "--stain-target needs --stain" in refused("--stain-target", str(slides["target"]))
    assert "--stain run in this process: not with --workers" in refused(
        "--stain", "macenko", "--stain-target", str(slides["target"]), "--workers", "2")
    white = tmp_path / "white.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(white)
    err = refused("--stain", "reinhard", "--stain-target", str(white))
    assert err.count("\n") == 0 and f"{white}: the image is background" in err
    # a file made without normalisation is recomputed, not skipped as "same encoder"
    assert main(["features", s0, "--encoder", TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["features", s0, "--encoder", TINY, "--out", str(out), "--stain", "macenko",
                 "--stain-target", str(slides["target"])]) == 0
    assert "skipped" not in capsys.readouterr().err
    np.testing.assert_array_equal(read_features(out / "s0.h5").features, read_features(run["feats"] / "s0.h5").features)


def test_evaluate_refuses_features_of_another_stain_handling(slides, run, tmp_path):
    from hdmil.train.data import load_cohort
    from hdmil.train.evaluate import evaluate_model

    model = load_model(run["ckpt"])
    assert len(evaluate_model(model, run["cohort"], ["s2", "s3"], use_lipn=False).probabilities) == 2
    plain = tmp_path / "plain"
    assert main(["features", *map(str, sorted(slides["folder"].iterdir())), "--encoder", TINY,
                 "--out", str(plain)]) == 0
    cohort = load_cohort(run["cohort"].source, plain)
    with pytest.raises(CheckpointError, match=r"s0.h5: the model was trained on features of macenko .*"
                       r"these features are of patches as read \(no stain normalisation\); refused"):
        evaluate_model(model, cohort, ["s2", "s3"], use_lipn=False)
    # training on a mix of both is refused: the checkpoint could record only one of them
    from hdmil.errors import FeatureFileError
    from hdmil.train import DMINTrainConfig, train_dmin
    from hdmil.train.splits import Split

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for sid, src in (("s0", run["feats"]), ("s1", run["feats"]), ("s2", run["feats"]), ("s3", plain)):
        os.symlink(src / f"{sid}.h5", mixed / f"{sid}.h5")
    cfg = DMINTrainConfig(max_epochs=1, min_epochs=1, patience=1, hidden=16, device="cpu")
    with pytest.raises(FeatureFileError, match=r"s3.h5: made with no stain normalisation, but .*s0.h5 with "
                       r"macenko \(fitted on target.png\) stain normalisation"):
        train_dmin(load_cohort(run["cohort"].source, mixed), Split(("s0", "s1"), ("s2", "s3"), ()), cfg,
                   tmp_path / "run")


def test_results_of_raw_features_are_not_carried_into_normalised_ones(slides, tmp_path):
    from hdmil.features.io import write_features

    coords = np.array([[0, 0], [256, 0]])
    plain = {"encoder": TINY, "encoder_recipe": {"name": TINY, "weights": "random", "dim": 8}}
    path = write_features(tmp_path / "s.h5", np.ones((2, 8), np.float32), coords, plain)
    with h5py.File(path, "a") as f:
        f["region_embeddings"] = np.zeros((1, 4), np.float32)  # computed from these features
    write_features(path, np.ones((2, 8), np.float32), coords, plain)
    with h5py.File(path) as f:
        assert "region_embeddings" in f  # same patches, same encoder: still true
    stained = {**plain, "encoder_recipe": {**plain["encoder_recipe"],
                                           "stain": load_stain_target("reinhard", slides["target"]).to_dict()}}
    write_features(path, np.ones((2, 8), np.float32), coords, stained)
    with h5py.File(path) as f:
        assert "region_embeddings" not in f
