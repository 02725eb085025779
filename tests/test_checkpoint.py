"""Checkpoints: one safetensors file, round trips, and every way a file can be wrong."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hdmil.checkpoint import FORMAT_VERSION, load_model, read_checkpoint_config, save_checkpoint
from hdmil.errors import CheckpointError, HDMILError
from hdmil.models import DMIN, LIPN, DMINConfig, LIPNConfig

SMALL = dict(in_dim=24, hidden=16, attn_dim=8, cheby_degree=4)
CONFIG = {
    "classes": ["normal", "tumor"],
    "encoder": "resnet50_trunc",
    "patch_px": 256,
    "magnification": 20.0,
    "lr_magnification": 1.25,
    "provenance": {"seed": 7, "data": "synthetic cohort", "metrics": {"val_auc": 0.9}},
}


def _models(seed: int = 0) -> tuple[DMIN, LIPN]:
    torch.manual_seed(seed)
    dmin = DMIN(DMINConfig(**SMALL, target_keep_rate=0.7))
    lipn = LIPN(LIPNConfig())
    lipn.train()
    with torch.no_grad():
        lipn(torch.randn(32, 3, 16, 16))  # non-default BatchNorm running statistics
    return dmin.eval(), lipn.eval()


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, DMIN, LIPN]:
    dmin, lipn = _models()
    path = save_checkpoint(tmp_path / "model.safetensors", {"dmin": dmin, "lipn": lipn}, CONFIG)
    return path, dmin, lipn


def _raw(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["hdmil"]), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata={"hdmil": json.dumps(config)})
    return path


def _raises_naming(path: Path, match: str, **kw) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path, **kw)
    assert str(path) in str(info.value)
    assert isinstance(info.value, HDMILError)
    return info.value


# ----------------------------------------------------------------------- round trip
def test_round_trip_gives_equal_outputs(saved) -> None:
    path, dmin, lipn = saved
    model = load_model(path)
    x = torch.randn(30, 24)
    lr = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    a, b = dmin.predict(x), model.dmin.predict(x)
    torch.testing.assert_close(b.probabilities, a.probabilities, rtol=0, atol=0)
    torch.testing.assert_close(b.attention, a.attention, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(model.lipn.keep_mask(lr), lipn.keep_mask(lr))
    for name, t in lipn.state_dict().items():
        assert torch.equal(model.lipn.state_dict()[name], t), name
    assert not model.dmin.training and not model.lipn.training
    assert model.classes == ["normal", "tumor"]
    assert model.path == path
    assert model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_config_holds_everything_needed(saved) -> None:
    path, dmin, lipn = saved
    cfg = read_checkpoint_config(path)
    assert cfg["format_version"] == FORMAT_VERSION and cfg["model_type"] == "hdmil"
    assert DMINConfig.from_dict(cfg["modules"]["dmin"]) == dmin.cfg
    assert LIPNConfig.from_dict(cfg["modules"]["lipn"]) == lipn.cfg
    assert cfg["feature_dim"] == 24 and cfg["encoder"] == "resnet50_trunc"
    assert cfg["target_keep_rate"] == 0.7
    assert (cfg["patch_px"], cfg["magnification"], cfg["lr_magnification"]) == (256, 20.0, 1.25)
    assert cfg["provenance"]["seed"] == 7 and cfg["provenance"]["metrics"] == {"val_auc": 0.9}
    assert "created" in cfg["provenance"] and "hdmil_version" in cfg["provenance"]
    _, tensors = _raw(path)
    assert all(k.startswith(("dmin.", "lipn.")) for k in tensors)
    assert "dmin.classifiers.0.omega" in tensors and "lipn.fc.weight" in tensors


def test_save_is_atomic_and_overwrites(tmp_path: Path, saved) -> None:
    path, dmin, _ = saved
    save_checkpoint(path, {"dmin": dmin}, CONFIG)  # overwrite with a DMIN-only checkpoint
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]  # no temp files left
    model = load_model(path)
    assert model.lipn is None and model.config["model_type"] == "dmin"


def test_save_refuses_inconsistent_config(tmp_path: Path) -> None:
    dmin, _ = _models()
    with pytest.raises(ValueError, match="class names"):
        save_checkpoint(tmp_path / "a.safetensors", {"dmin": dmin}, {"classes": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="feature_dim"):
        save_checkpoint(tmp_path / "a.safetensors", {"dmin": dmin}, {"feature_dim": 1024})
    assert not (tmp_path / "a.safetensors").exists()


def test_check_feature_dim(saved, tmp_path: Path) -> None:
    path, _, _ = saved
    model = load_model(path)
    model.check_feature_dim(24, "slide.h5")
    with pytest.raises(CheckpointError, match="1024-d") as info:
        model.check_feature_dim(1024, tmp_path / "slide.h5")
    assert str(tmp_path / "slide.h5") in str(info.value) and str(path) in str(info.value)


# ----------------------------------------------------------------------- bad files
def test_missing_file(tmp_path: Path) -> None:
    _raises_naming(tmp_path / "nope.safetensors", "not found")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint_config(tmp_path / "nope.safetensors")


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    _raises_naming(path, "not a readable safetensors file or corrupt")


def test_truncated_file(saved) -> None:
    path, _, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises_naming(path, "corrupt")


def test_plain_safetensors_of_another_model(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(path))
    _raises_naming(path, "no HDMIL metadata")
    with pytest.raises(CheckpointError, match="no HDMIL metadata"):
        read_checkpoint_config(path)


def test_lipn_without_its_dmin(tmp_path: Path) -> None:
    _, lipn = _models()
    path = save_checkpoint(tmp_path / "lipn.safetensors", {"lipn": lipn}, {"classes": ["a", "b"]})
    _raises_naming(path, "LIPN without its DMIN")
    model = load_model(path, require_dmin=False)
    assert model.dmin is None and isinstance(model.lipn, LIPN)


def test_missing_tensor(saved) -> None:
    path, _, _ = saved
    config, tensors = _raw(path)
    del tensors["dmin.attention.attn_c.weight"]
    _raises_naming(_rewrite(path, config, tensors), "dmin weights missing: dmin.attention.attn_c.weight")


def test_unexpected_tensor(saved) -> None:
    path, _, _ = saved
    config, tensors = _raw(path)
    _raises_naming(_rewrite(path, config, {**tensors, "dmin.extra.weight": torch.zeros(2)}), "unexpected dmin weights")
    _raises_naming(_rewrite(path, config, {**tensors, "slpd.head.weight": torch.zeros(2)}), "no listed module")


def test_mis_shaped_tensor(saved) -> None:
    path, _, _ = saved
    config, tensors = _raw(path)
    config["modules"]["dmin"]["hidden"] = 32  # config no longer matches the weights
    _raises_naming(_rewrite(path, config, tensors), "wrong shape")


def test_bad_metadata(saved) -> None:
    path, _, _ = saved
    config, tensors = _raw(path)
    _raises_naming(_rewrite(path, {**config, "format_version": FORMAT_VERSION + 1}, tensors), "newer")
    bogus = {"dmin": {**config["modules"]["dmin"], "bogus": 1}}
    _raises_naming(_rewrite(path, {**config, "modules": bogus}, tensors), "cannot build dmin")
    extra = {**config["modules"], "transmil": {}}
    _raises_naming(_rewrite(path, {**config, "modules": extra}, tensors), "cannot build transmil")
    _raises_naming(_rewrite(path, {**config, "modules": {"transmil": {}}}, tensors), "no DMIN in this checkpoint")
    save_file(tensors, str(path), metadata={"hdmil": "{not json"})
    _raises_naming(path, "not valid JSON")


# ----------------------------------------------------------------------- no code runs
def test_safetensors_loading_never_unpickles(saved, monkeypatch) -> None:
    path, dmin, _ = saved

    def forbidden(*a, **k):
        raise AssertionError("pickle used while loading a safetensors checkpoint")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    model = load_model(path)
    x = torch.ones(3, 24)
    torch.testing.assert_close(model.dmin.predict(x).probabilities, dmin.predict(x).probabilities)


def test_pt_checkpoint_loads_with_weights_only(saved, tmp_path: Path, monkeypatch) -> None:
    path, dmin, _ = saved
    config, tensors = _raw(path)
    pt = tmp_path / "model.pt"
    torch.save({"hdmil": config, "state_dict": tensors}, pt)
    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    model = load_model(pt)
    assert calls == [True]
    x = torch.randn(5, 24)
    torch.testing.assert_close(model.dmin.predict(x).probabilities, dmin.predict(x).probabilities)
    assert read_checkpoint_config(pt)["model_type"] == "hdmil"


class _Payload:
    """Unpickling this creates a directory: the stand-in for arbitrary code in a pickle."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pt = tmp_path / "evil.pt"
    torch.save({"hdmil": {}, "state_dict": {}, "x": _Payload(str(marker))}, pt)
    err = _raises_naming(pt, "refused to load")
    assert "run code" in str(err)
    assert not marker.exists()
    # the file really is dangerous: a plain (non-weights-only) load runs the payload
    torch.load(pt, weights_only=False)
    assert marker.exists()


def test_pt_without_hdmil_metadata(tmp_path: Path) -> None:
    pt = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, pt)
    _raises_naming(pt, "no HDMIL metadata")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x80\x04garbage")
    _raises_naming(broken, "corrupt|refused")


def test_default_model_path_honours_env(monkeypatch, tmp_path: Path) -> None:
    from hdmil.checkpoint import default_model_path

    monkeypatch.setenv("HDMIL_MODEL", str(tmp_path / "m.safetensors"))
    assert default_model_path() == tmp_path / "m.safetensors"
    monkeypatch.delenv("HDMIL_MODEL")
    # without the variable: the demo model shipped inside the installed package
    bundled = default_model_path()
    assert bundled.name == "hdmil-demo.safetensors" and bundled.parent.name == "assets"
    assert bundled.parent.parent == Path(__import__("hdmil").__file__).parent


# ----------------------------------------------------------------------- SLPD
def _slpd(seed: int = 0):
    from hdmil.models import create_model, slpd_config

    torch.manual_seed(seed)
    model = create_model("slpd", **slpd_config("tiny").to_dict())
    with torch.no_grad():
        model.center.normal_()  # a center that is not the zeros of a fresh model
        for p in model.teacher.parameters():
            p.add_(0.01)  # teacher != student, as after training
    return model


def test_slpd_round_trip_through_checkpoint(tmp_path: Path) -> None:
    from hdmil.checkpoint import load_slpd, read_slpd_metadata, save_slpd
    from hdmil.models import SLPD

    model = _slpd()
    path = save_slpd(tmp_path / "slpd.safetensors", model, {"epoch": 3, "complete": True})
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # a normal file, not 0600
    meta = read_slpd_metadata(path)
    assert meta["model_type"] == "slpd" and meta["epoch"] == 3 and meta["complete"] is True
    assert meta["config"] == model.cfg.to_dict()
    loaded = load_slpd(path)
    assert isinstance(loaded, SLPD) and not loaded.training and loaded.cfg == model.cfg
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    x, mask = torch.randn(5, 4, 4, 8), torch.rand(5, 4, 4) > 0.3
    model.eval()
    for a, b in zip(model.teacher(x, mask), loaded.teacher(x, mask), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp"))


def test_slpd_optimizer_state_round_trip(tmp_path: Path) -> None:
    from hdmil.checkpoint import restore_slpd, save_slpd

    model = _slpd()
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    model.losses([(torch.randn(4, 3, 3, 8), torch.ones(4, 3, 3, dtype=torch.bool))] * 2).total.backward()
    opt.step()
    path = save_slpd(tmp_path / "s.safetensors", model, {"epoch": 1}, optimizer=opt)
    other = _slpd(seed=1)
    other_opt = torch.optim.AdamW(other.student.parameters(), lr=1e-3)
    assert restore_slpd(path, other, other_opt)["epoch"] == 1
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for pid in sa:
        for k in sa[pid]:
            assert torch.equal(torch.as_tensor(sa[pid][k]), torch.as_tensor(sb[pid][k])), (pid, k)


def test_slpd_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    from hdmil.checkpoint import load_slpd, read_slpd_metadata, save_slpd

    with pytest.raises(CheckpointError, match="not found"):
        load_slpd(tmp_path / "missing.safetensors")
    dmin, lipn = _models()
    hdmil = save_checkpoint(tmp_path / "hdmil.safetensors", {"dmin": dmin, "lipn": lipn}, CONFIG)
    with pytest.raises(CheckpointError, match="not an SLPD checkpoint") as info:
        read_slpd_metadata(hdmil)
    assert str(hdmil) in str(info.value)
    path = save_slpd(tmp_path / "slpd.safetensors", _slpd(), {})
    config, tensors = _raw(path)
    bad = dict(tensors)
    bad["student.encoder.pos_embed"] = torch.zeros(1, 16, 5, 5)
    with pytest.raises(CheckpointError, match="wrong shape.*student.encoder.pos_embed"):
        load_slpd(_rewrite(tmp_path / "shape.safetensors", config, bad))
    bad = {k: v for k, v in tensors.items() if not k.startswith("teacher.head")}
    with pytest.raises(CheckpointError, match="missing: teacher.head"):
        load_slpd(_rewrite(tmp_path / "missing.safetensors", config, bad))
    with pytest.raises(CheckpointError, match="newer than this hdmil"):
        load_slpd(_rewrite(tmp_path / "new.safetensors", {**config, "format_version": 99}, tensors))
    with pytest.raises(CheckpointError, match="bad SLPD config"):
        load_slpd(_rewrite(tmp_path / "cfg.safetensors", {**config, "config": {"encoder": {"depth": "x"}}}, tensors))


def test_slpd_is_a_registered_model_with_its_own_checkpoint(tmp_path: Path) -> None:
    from hdmil.models import SLPD, create_model, list_models, slpd_config

    assert "slpd" in list_models()
    cfg = slpd_config("tiny", depth=2)
    model = create_model("slpd", **cfg.to_dict())
    assert isinstance(model, SLPD) and model.cfg == cfg and len(model.student.encoder.blocks) == 2
    with pytest.raises(ValueError, match="save_slpd"):
        save_checkpoint(tmp_path / "x.safetensors", {"slpd": model}, {})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
