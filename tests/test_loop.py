"""The one training loop (hdmil.train.loop), the training configs and the options table.

A toy task (a linear regression) stands in for a model: the tests are about what the loop does
around it (seeding, early stopping, best checkpoints, the log, resume, cancel).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import threading

import pytest
import torch

from hdmil.errors import Cancelled, HDMILError
from hdmil.train.config import AttentionShare, DMINTrainConfig, LIPNTrainConfig, RecallShare
from hdmil.train.loop import LoopConfig, RunFiles, TrainTask, epoch_seed, fit
from hdmil.train.options import (
    DMIN_OPTIONS,
    LIPN_OPTIONS,
    add_options,
    config_from_args,
    config_from_settings,
    lipn_config_from_settings,
)


class Toy(TrainTask):
    """y = x @ w on noise drawn from the global RNG (so the loop's seeding matters)."""

    def __init__(self, val: list[float] | None = None) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.05)
        self.val = val  # scripted validation values, by epoch
        self.saved: list[int] = []
        self.seeds: list[int | None] = []
        self.loaded: dict | None = None

    def train_epoch(self, epoch, seed, cancel):
        self.seeds.append(seed)
        x = torch.randn(16, 4)
        loss = ((self.model(x).squeeze(1) - x.sum(1)) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"train_loss": float(loss.detach())}

    def validate(self, epoch, cancel):
        return {} if self.val is None else {"val_metric": self.val[epoch]}

    def save_best(self, epoch, row, best):
        self.saved.append(epoch)

    def state(self):
        return {"toy": "yes"}

    def load_state(self, state):
        self.loaded = state


def test_early_stopping_saves_each_new_best_and_stops(tmp_path):
    task = Toy(val=[3.0, 2.0, 2.5, 1.0, 1.5, 1.2, 1.1, 0.5])
    cfg = LoopConfig(max_epochs=8, monitor="val_metric", patience=2, min_epochs=0)
    res = fit(task, cfg, RunFiles.in_dir(tmp_path))
    assert task.saved == [0, 1, 3]
    assert res.best_epoch == 3 and res.best_metrics == {"val_metric": 1.0, "epoch": 3}
    assert res.stopped_early and res.epochs_run == 6  # epochs 4 and 5 did not improve
    assert task.seeds == [epoch_seed(0, e) for e in range(6)]
    with open(tmp_path / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == [str(e) for e in range(6)]
    assert list(rows[0]) == ["epoch", "train_loss", "val_metric", "seconds"]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epoch"] == 5 and state["stopped_early"] and state["toy"] == "yes"
    # a finished run stays finished
    again = Toy(val=task.val)
    res2 = fit(again, cfg, RunFiles.in_dir(tmp_path), resume=True)
    assert again.seeds == [] and res2.stopped_early and res2.epochs_run == 6
    assert again.loaded["toy"] == "yes"


def test_higher_is_better_and_min_epochs(tmp_path):
    task = Toy(val=[0.5, 0.4, 0.3, 0.2, 0.9, 0.1])
    cfg = LoopConfig(max_epochs=6, monitor="val_metric", higher_is_better=True, patience=1,
                     min_epochs=5)
    res = fit(task, cfg, RunFiles.in_dir(tmp_path, prefix="enc_"))
    assert task.saved == [0, 4] and res.best_epoch == 4
    # without min_epochs it would have stopped after epoch 1; epoch 5 does not improve: stop
    assert res.epochs_run == 6 and res.stopped_early
    assert (tmp_path / "enc_log.csv").is_file() and (tmp_path / "enc_last.safetensors").is_file()


def test_without_validation_every_epoch_is_saved_and_seeding_can_be_left_alone(tmp_path):
    task = Toy()
    torch.manual_seed(123)
    expected = torch.randn(16, 4)  # what the task draws first when the loop does not reseed
    torch.manual_seed(123)
    res = fit(task, LoopConfig(max_epochs=3, seed=None, monitor=None), RunFiles.in_dir(tmp_path))
    assert task.saved == [0, 1, 2] and res.best_epoch == 2 and task.seeds == [None] * 3
    assert res.best_metrics == {"epoch": 2}
    assert not torch.equal(torch.randn(16, 4), expected)  # the stream went on, not reseeded
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["early_stopping"]["best"] is None  # JSON has no inf


def test_resume_after_cancel_equals_an_uninterrupted_run(tmp_path):
    cfg = LoopConfig(max_epochs=5, monitor=None)
    cancel = threading.Event()
    task = Toy()
    with pytest.raises(Cancelled, match="training cancelled"):
        fit(task, cfg, RunFiles.in_dir(tmp_path / "a"), cancel=cancel,
            on_epoch=lambda row: cancel.set() if row["epoch"] == 2 else None)
    resumed = Toy()
    res = fit(resumed, cfg, RunFiles.in_dir(tmp_path / "a"), resume=True)
    straight = Toy()
    fit(straight, cfg, RunFiles.in_dir(tmp_path / "b"))
    assert resumed.seeds == [epoch_seed(0, e) for e in (3, 4)] and res.epochs_run == 5
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    # the optimizer's moments came back too, not only the weights
    sa, sb = resumed.optimizer.state_dict()["state"], straight.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert len(res.history) == 5


def test_task_state_may_not_shadow_the_loops(tmp_path):
    task = Toy()
    task.state = lambda: {"epoch": 3}
    with pytest.raises(ValueError, match="loop's keys"):
        fit(task, LoopConfig(max_epochs=1, monitor=None), RunFiles.in_dir(tmp_path))


# -- configs --------------------------------------------------------------------------------------

OLD_FLAT = {  # TrainConfig.to_dict() of the previous code, as stored in checkpoints
    "hidden": 64, "attn_dim": 32, "dropout": 0.25, "cheby_degree": 12, "tau": 0.7, "gamma": 0.5,
    "k_sample": 8, "inst_out_of_class": False, "keep_rate": 0.6, "w_ce": 0.7, "w_clu": 0.3,
    "w_emb": 0.5, "w_kl": 0.5, "w_rate": 2.0, "lr": 0.001, "weight_decay": 1e-05,
    "max_epochs": 25, "min_epochs": 10, "patience": 5, "lipn_tau": 0.7, "lipn_lr": 0.002,
    "lipn_weight_decay": 1e-05, "lipn_max_epochs": 20, "lipn_min_epochs": 0, "lipn_patience": 5,
    "lipn_batch_patches": 512, "lipn_recall": None, "lipn_targets": "soft",
    "lipn_attention": [0.85, 0.98], "lipn_dilation": [0, 1], "lipn_stain_jitter": 1.0,
    "lipn_match": "bce", "lipn_views": 4, "seed": 3, "instances": "patch", "device": "cpu",
}


def test_configs_read_the_old_flat_dict():
    dmin = DMINTrainConfig.from_dict(OLD_FLAT)
    assert dmin.lr == 0.001 and dmin.max_epochs == 25 and dmin.seed == 3 and dmin.k_sample == 8
    lipn = LIPNTrainConfig.from_dict(OLD_FLAT)
    assert lipn == LIPNTrainConfig(
        tau=0.7, lr=0.002, weight_decay=1e-5, max_epochs=20, min_epochs=0, patience=5,
        batch_patches=512, calibration=AttentionShare((0.85, 0.98)), targets="soft", match="bce",
        dilation=(0, 1), stain_jitter=1.0, views=4, seed=3, device="cpu")
    recall = LIPNTrainConfig.from_dict({**OLD_FLAT, "lipn_attention": None, "lipn_recall": 0.97})
    assert recall.calibration == RecallShare(0.97)
    plain = LIPNTrainConfig.from_dict({**OLD_FLAT, "lipn_attention": None})
    assert plain.calibration is None


@pytest.mark.parametrize("calibration", [None, RecallShare(0.9), AttentionShare(0.95),
                                         AttentionShare((0.8, 0.99))])
def test_lipn_config_round_trips_through_json(calibration):
    cfg = LIPNTrainConfig(calibration=calibration, dilation=(0, 2), targets="soft")
    back = LIPNTrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    dmin = DMINTrainConfig(keep_rate=0.7, seed=4)
    assert DMINTrainConfig.from_dict(json.loads(json.dumps(dmin.to_dict()))) == dmin


def test_lipn_config_refuses_what_cannot_train():
    with pytest.raises(HDMILError, match="targets='soft'"):
        LIPNTrainConfig(match="bce")
    with pytest.raises(HDMILError, match="match must be"):
        LIPNTrainConfig(match="l2")


def test_dmin_config_is_the_models():
    model_cfg = DMINTrainConfig(keep_rate=0.7, hidden=32).dmin_config(in_dim=10, n_classes=3)
    assert (model_cfg.in_dim, model_cfg.n_classes, model_cfg.hidden) == (10, 3, 32)
    assert model_cfg.target_keep_rate == 0.7


# -- the options table ------------------------------------------------------------------------------


@pytest.mark.parametrize("options,cls", [(DMIN_OPTIONS, DMINTrainConfig),
                                         (LIPN_OPTIONS, LIPNTrainConfig)])
def test_every_option_names_a_config_field(options, cls):
    fields = {f.name for f in dataclasses.fields(cls)}
    assert {o.field for o in options} <= fields
    assert len({o.flag for o in options}) == len(options)


def _parse(options, cls, argv):
    parser = argparse.ArgumentParser()
    add_options(parser, options, cls)
    return config_from_args(cls, options, parser.parse_args(argv))


def test_flags_become_configs():
    assert _parse(DMIN_OPTIONS, DMINTrainConfig, []) == DMINTrainConfig()
    dmin = _parse(DMIN_OPTIONS, DMINTrainConfig, ["--epochs", "7", "--keep-rate", "0.7",
                                                  "--instances", "region", "--inst-out-of-class"])
    assert (dmin.max_epochs, dmin.keep_rate, dmin.instances, dmin.inst_out_of_class) == (
        7, 0.7, "region", True)
    lipn = _parse(LIPN_OPTIONS, LIPNTrainConfig, [
        "--epochs", "3", "--attention", "0.8,0.95", "--dilation", "0,1", "--soft-targets",
        "--match", "bce", "--views", "8", "--seed", "2"])
    assert lipn == LIPNTrainConfig(max_epochs=3, calibration=AttentionShare((0.8, 0.95)),
                                   dilation=(0, 1), targets="soft", match="bce", views=8, seed=2)
    assert _parse(LIPN_OPTIONS, LIPNTrainConfig, ["--recall", "0.97"]).calibration == RecallShare(0.97)
    assert _parse(LIPN_OPTIONS, LIPNTrainConfig, ["--attention", "0.9"]).calibration == AttentionShare(0.9)


def test_one_calibration_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        _parse(LIPN_OPTIONS, LIPNTrainConfig, ["--recall", "0.9", "--attention", "0.9"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_shows_the_configs_defaults():
    parser = argparse.ArgumentParser()
    add_options(parser, LIPN_OPTIONS, LIPNTrainConfig)
    text = " ".join(parser.format_help().split())
    assert "maximum epochs (default 100)" in text and "(default 0.0001)" in text


def test_flat_settings_become_configs():
    """How the recipe builds its configs: its flat settings through the same table."""
    settings = {"keep_rate": 0.6, "k_sample": 8, "max_epochs": 2, "seed": 5,
                "lipn_max_epochs": 3, "lipn_lr": 1e-3, "lipn_attention": (0.85, 0.98),
                "lipn_recall": None, "lipn_targets": "soft", "lipn_match": "bce",
                "lipn_dilation": (0, 1), "lipn_views": 4, "other": "ignored"}
    dmin = config_from_settings(DMINTrainConfig, DMIN_OPTIONS, settings, device="cpu")
    assert (dmin.k_sample, dmin.max_epochs, dmin.seed, dmin.device) == (8, 2, 5, "cpu")
    lipn = lipn_config_from_settings(settings, device="cpu")
    assert lipn == LIPNTrainConfig(max_epochs=3, lr=1e-3, calibration=AttentionShare((0.85, 0.98)),
                                   targets="soft", match="bce", dilation=(0, 1), views=4, seed=5,
                                   device="cpu")
    assert lipn == LIPNTrainConfig.from_dict({**OLD_FLAT, **settings, "lipn_stain_jitter": 0.0,
                                              "lipn_batch_patches": 2048, "device": "cpu"})
    with pytest.raises(HDMILError, match="give one"):
        lipn_config_from_settings({**settings, "lipn_recall": 0.9})
    assert math.isclose(lipn_config_from_settings({}).lr, 1e-4)
