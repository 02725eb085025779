"""hdmil.model_card: what a checkpoint is, from its config alone; the bundled demo model says it
was trained on synthetic slides and is not for diagnosis."""

from __future__ import annotations

import subprocess
import sys

from hdmil.checkpoint import default_model_path
from hdmil.model_card import DEMO_WARNING, model_card, read_model_card


def test_the_bundled_model_card_says_synthetic_and_not_for_diagnosis():
    card = read_model_card(default_model_path())
    assert card.demo and card.classes == ("normal", "tumor")
    assert card.name == "hdmil-demo.safetensors" and len(card.sha256) == 12
    assert card.encoder == "test_byobnet (256-d features)" and card.scale == "0.5 µm/px at 20x"
    assert card.trained_on == "96 synthetic slides (76 training, 20 validation)"
    lines = card.lines()
    assert lines[0] == DEMO_WARNING
    assert "synthetic slides" in DEMO_WARNING and "Not for diagnosis" in DEMO_WARNING
    assert "classes: normal, tumor" in lines and "intended use: demonstration on synthetic slides; not for diagnosis" in lines


def test_a_trained_model_card_has_no_demo_warning_and_counts_its_slides():
    config = {"classes": ["a", "b", "c"], "encoder": "resnet50_trunc", "feature_dim": 1024, "mpp": 0.25,
              "magnification": 40.0, "instances": "region",
              "provenance": {"stage": "hdmil", "created": "2026-01-02T03:04:05+00:00",
                             "split": {"train": ["s1", "s2", "s3"], "val": ["s4"], "test": ["s5"]}}}  # fmt: skip
    card = model_card(config, "mine.safetensors", "0123456789ab")
    assert not card.demo and DEMO_WARNING not in card.lines()
    assert card.encoder == "resnet50_trunc, pooled over SLPD regions (1024-d features)"
    assert card.scale == "0.25 µm/px at 40x" and card.created == "2026-01-02"
    assert card.trained_on == "4 slides (3 training, 1 validation)"
    assert card.lines()[0] == "model mine.safetensors (sha 0123456789ab)"


def test_a_config_that_says_little_gives_a_short_card():
    card = model_card({"classes": ["x", "y"]}, "bare.pt")
    assert card.lines() == ["model bare.pt", "classes: x, y"]


def test_the_card_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "hdmil.model_card", str(default_model_path())],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert out.splitlines()[0] == DEMO_WARNING and "trained on: 96 synthetic slides" in out
