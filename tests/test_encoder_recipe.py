"""Checkpoints carry their encoder (issue 18 §2): features made with a local weights file train a
DMIN whose checkpoint records that file (name + SHA-256); ``hdmil predict`` rebuilds exactly it,
giving ``evaluate``'s probabilities, or refuses in one line; never other (random) weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hdmil.checkpoint import load_model, read_checkpoint_config, save_checkpoint
from hdmil.cli import main
from hdmil.features import create_encoder, read_features, save_encoder
from hdmil.features.encoders import Encoder, register_encoder
from hdmil.features.recipe import EncoderRecipe
from hdmil.train import DMINTrainConfig, train_dmin
from hdmil.train.data import load_cohort
from hdmil.train.evaluate import evaluate_model
from hdmil.slide import open_slide
from hdmil.train.splits import Split
from helpers import TINY

TINY4 = "tiny4_test_encoder"


@register_encoder(TINY4)
def _tiny4(pretrained: bool = False, device=None) -> Encoder:
    model = nn.Sequential(nn.Conv2d(3, 4, 32, stride=32), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Encoder(model, TINY4, input_size=256, dim=4, device=device, channels_last=False)


def _file_encoder(path: Path, name: str = TINY, shift: float = 0.3) -> Path:
    """Weights of ``name``'s architecture that are not its seeded random ones."""
    enc = create_encoder(name, device="cpu")
    with torch.no_grad():
        for p in enc.model.parameters():
            p.add_(shift)
    return save_encoder(enc, path)


@pytest.fixture(scope="module")
def run(synthetic_slide, tmp_path_factory):
    """Four slides (two copies each of a normal-ish and a tumour-ish slide), their features from a
    local weights file, and a DMIN trained on them."""
    from hdmil.synth import synth_slide

    root = tmp_path_factory.mktemp("recipe")
    other = root / "other.tiff"
    synth_slide(other, size=(2048, 1536), seed=3, tumor_fraction=0.4)
    slides = root / "slides"
    slides.mkdir()
    for sid, src in (("s0", synthetic_slide), ("s1", synthetic_slide), ("s2", other), ("s3", other)):
        os.symlink(src, slides / f"{sid}.tiff")
    weights = _file_encoder(root / "enc" / "w.safetensors")
    feats = root / "feats"
    assert main(["features", *map(str, sorted(slides.iterdir())), "--encoder", str(weights),
                 "--out", str(feats), "--batch-size", "32"]) == 0
    labels = root / "labels.csv"
    labels.write_text("slide_id,label\ns0,normal\ns1,normal\ns2,tumor\ns3,tumor\n")
    cohort = load_cohort(labels, feats)
    split = Split(train=("s0", "s2"), val=("s1", "s3"), test=("s0", "s2"))
    cfg = DMINTrainConfig(max_epochs=2, min_epochs=1, patience=1, hidden=16, device="cpu")
    res = train_dmin(cohort, split, cfg, root / "dmin")
    return {"root": root, "slides": slides, "weights": weights, "feats": feats, "cohort": cohort,
            "ckpt": Path(res.checkpoint)}


def _predict(ckpt: Path, slides: list[Path], out: Path, *extra: str) -> list[list[float]]:
    rc = main(["predict", *map(str, slides), "--model", str(ckpt), "--out", str(out), "--no-lipn",
               "--batch-size", "32", *extra])
    assert rc == 0
    return [json.loads((out / s.stem / "report.json").read_text())["probabilities"] for s in slides]


def _refused(capsys, ckpt: Path, slide: Path, out: Path, *extra: str) -> str:
    capsys.readouterr()
    rc = main(["predict", str(slide), "--model", str(ckpt), "--out", str(out), "--no-lipn", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and not (out / slide.stem / "report.json").exists()
    assert len(err.splitlines()) == 1 and err.startswith("hdmil predict: error: "), err
    return err


def _with_recipe(src: Path, dst: Path, recipe: dict | None) -> Path:
    """The checkpoint at ``src`` with another encoder recipe (None: no encoder at all, as after
    training on CLAM's files, which name none)."""
    model = load_model(src)
    config = {k: v for k, v in model.config.items() if k not in ("modules", "model_type", "format_version")}
    config.pop("encoder_recipe", None)
    if recipe is None:
        config.pop("encoder", None)
    if recipe is not None:
        config["encoder_recipe"] = recipe
    dst.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(dst, {"dmin": model.dmin}, config)


def test_training_records_the_weights_file(run):
    config = read_checkpoint_config(run["ckpt"])
    recipe = EncoderRecipe.from_dict(config["encoder_recipe"])
    assert (recipe.name, recipe.weights, recipe.file, recipe.dim) == (TINY, "file", "w.safetensors", 8)
    assert recipe.path == str(run["weights"].resolve()) and len(recipe.sha256) == 64
    assert config["encoder"] == TINY and "encoder_weights" not in config


def test_evaluate_and_predict_give_the_same_probabilities(run, tmp_path):
    ids = ["s0", "s2"]
    ev = evaluate_model(load_model(run["ckpt"]), run["cohort"], ids, use_lipn=False)
    slides = [run["slides"] / f"{s}.tiff" for s in ids]
    got = np.array(_predict(run["ckpt"], slides, tmp_path / "out"))
    np.testing.assert_allclose(got, ev.probabilities, rtol=0, atol=1e-5)
    # the features predict computed are the file encoder's, not the seeded random TINY's
    stored = read_features(run["feats"] / "s0.h5").features
    random = create_encoder(TINY, device="cpu")
    with open_slide(slides[0]) as s:
        c = read_features(run["feats"] / "s0.h5").coords[0]
        patch = s.read_region(tuple(int(v) for v in c), 0, (256, 256))[None]
    assert not np.allclose(random.embed(patch).numpy()[0], stored[0], atol=1e-3)
    # with the weights moved beside the checkpoint (the recorded place gone) it still works
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(run["ckpt"], moved / "dmin.safetensors")
    shutil.copy(run["weights"], moved / "w.safetensors")
    recipe = read_checkpoint_config(run["ckpt"])["encoder_recipe"]
    again = _with_recipe(run["ckpt"], moved / "dmin.safetensors",
                         {**recipe, "path": str(tmp_path / "gone.safetensors")})
    got = _predict(again, slides, tmp_path / "out2")
    np.testing.assert_allclose(got, ev.probabilities, rtol=0, atol=1e-5)


def test_predict_refuses_an_encoder_it_cannot_rebuild(run, tmp_path, capsys):
    recipe = read_checkpoint_config(run["ckpt"])["encoder_recipe"]
    slide = run["slides"] / "s0.tiff"
    # the weights file is nowhere
    missing = _with_recipe(run["ckpt"], tmp_path / "a" / "m.safetensors",
                           {**recipe, "path": str(tmp_path / "nowhere" / "w.safetensors")})
    err = _refused(capsys, missing, slide, tmp_path / "o1")
    assert str(missing) in err and "weights file not found" in err and "--encoder FILE" in err
    # a file of that name beside it, but other weights (another SHA-256)
    other = _file_encoder(tmp_path / "a" / "w.safetensors", shift=-0.2)
    err = _refused(capsys, missing, slide, tmp_path / "o2")
    assert f"{other} has another SHA-256" in err
    # features that named the encoder but not its weights (written before recipes)
    unknown = _with_recipe(run["ckpt"], tmp_path / "b" / "u.safetensors",
                           {"name": TINY, "weights": "unknown", "dim": 8})
    err = _refused(capsys, unknown, slide, tmp_path / "o3")
    assert "name encoder 'tiny_test_encoder' but not its weights" in err and "--encoder NAME|FILE" in err
    # an architecture this install cannot build
    alien = _with_recipe(run["ckpt"], tmp_path / "c" / "x.safetensors",
                         {"name": "no_such_encoder", "weights": "pretrained", "dim": 8, "source": "trident"})
    err = _refused(capsys, alien, slide, tmp_path / "o4")
    assert "cannot rebuild its encoder no_such_encoder (pretrained)" in err
    # a DMIN trained on CLAM features (no encoder recorded at all)
    clam = _with_recipe(run["ckpt"], tmp_path / "d" / "c.safetensors", None)
    err = _refused(capsys, clam, slide, tmp_path / "o5")
    assert "does not name the encoder" in err and "--encoder NAME|FILE" in err


def test_clam_trained_dmin_predicts_with_encoder_override(run, tmp_path):
    clam = _with_recipe(run["ckpt"], tmp_path / "c.safetensors", None)
    ev = evaluate_model(load_model(run["ckpt"]), run["cohort"], ["s2"], use_lipn=False)
    got = _predict(clam, [run["slides"] / "s2.tiff"], tmp_path / "o", "--encoder", str(run["weights"]))
    np.testing.assert_allclose(got, ev.probabilities, rtol=0, atol=1e-5)


def test_legacy_checkpoints_keep_the_old_encoder_rules(tmp_path):
    from hdmil.checkpoint import default_model_path
    from hdmil.pipeline import encoder_for

    bundled = load_model(default_model_path())  # names its file: encoder_weights, beside it
    assert "encoder_recipe" not in bundled.config
    enc = encoder_for(bundled, "cpu")
    assert enc.weights.endswith("hdmil-demo-encoder.safetensors")
    legacy = load_model(Path(__file__).parent / "data/legacy/train/dmin.safetensors")
    assert legacy.encoder == "synthetic" and "encoder_recipe" not in legacy.config


def test_encoder_override_is_checked(run, tmp_path, capsys):
    ids = ["s0"]
    slide = run["slides"] / "s0.tiff"
    ev = evaluate_model(load_model(run["ckpt"]), run["cohort"], ids, use_lipn=False)
    unknown = _with_recipe(run["ckpt"], tmp_path / "u" / "u.safetensors",
                           {"name": TINY, "weights": "unknown", "dim": 8})
    got = _predict(unknown, [slide], tmp_path / "ok", "--encoder", str(run["weights"]))
    np.testing.assert_allclose(got, ev.probabilities, rtol=0, atol=1e-5)
    # another architecture than the recorded one
    four = _file_encoder(tmp_path / "four.safetensors", name=TINY4)
    err = _refused(capsys, run["ckpt"], slide, tmp_path / "o1", "--encoder", str(four))
    assert f"it is encoder '{TINY4}'" in err and "w.safetensors" in err
    # the name is not recorded as known, but the width is not the DMIN's
    err = _refused(capsys, unknown, slide, tmp_path / "o2", "--encoder", str(four))
    assert "it gives 4-d features" in err and "8-d" in err


def test_a_named_encoders_hub_repository_is_recorded():
    """A named encoder (hdmil.features.zoo) built with --pretrained records its hub repository,
    so predict rebuilds the same weights (a bare timm name records none)."""
    from hdmil.features.recipe import recipe_of
    from hdmil.features.zoo import ZOO

    spec = ZOO["uni"]
    enc = Encoder(nn.Flatten(), spec.name, dim=spec.dim)
    enc.weights, enc.hub_id = "pretrained", spec.hub_id
    assert recipe_of(enc).hub_id == "hf-hub:MahmoodLab/uni"
    plain = Encoder(nn.Flatten(), "resnet18", dim=512)
    plain.weights = "pretrained"
    assert recipe_of(plain).hub_id is None
