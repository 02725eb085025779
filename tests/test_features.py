"""Encoders, feature extraction and feature files (ours, CLAM's, TRIDENT's)."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from hdmil.errors import Cancelled, FeatureFileError, HDMILError
from hdmil.features import (
    Encoder,
    FeatureBag,
    create_encoder,
    extract_features,
    find_feature_files,
    list_encoders,
    read_features,
    register_encoder,
    save_encoder,
    update_feature_file,
    write_features,
)

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class _MeanRGB(nn.Module):
    """A stand-in model: [B, 3, H, W] -> [B, 6], per-channel mean and max."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module")
def small_encoder() -> Encoder:
    return create_encoder("resnet18_trunc", device="cpu")


# -- encoders -------------------------------------------------------------------------------------


def test_registry_lists_the_clam_and_the_small_encoder():
    names = list_encoders()
    assert "resnet50_trunc" in names
    assert "resnet18_trunc" in names


def test_resnet50_trunc_is_layer3_of_resnet50_avg_pooled():
    import timm

    enc = create_encoder("resnet50_trunc", pretrained=False, device="cpu")
    assert enc.dim == 1024 and enc.input_size == 256 and enc.device.type == "cpu"
    assert not hasattr(enc.model, "layer4")
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        ours = enc(x)
    assert ours.shape == (2, 1024)
    # The same weights in timm's full ResNet-50: its layer3 output, averaged, is our feature.
    full = timm.create_model("resnet50", num_classes=0).eval()
    missing, unexpected = full.load_state_dict(enc.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("layer4.") for k in missing)
    with torch.inference_mode():
        (layer3,) = full.forward_intermediates(x, indices=[3], intermediates_only=True)
    torch.testing.assert_close(ours, layer3.mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)


def test_random_weights_are_seeded_so_features_repeat(small_encoder):
    again = create_encoder("resnet18_trunc", device="cpu")
    x = _patches(2, 64)
    out = small_encoder.embed(x)
    torch.testing.assert_close(out, again.embed(x), rtol=0, atol=0)
    assert small_encoder.dim == 256 and out.shape == (2, 256) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out[0] - out[1]).abs().max() > 0  # patches differ


def test_any_timm_model_by_name():
    cnn = create_encoder("test_efficientnet", device="cpu")
    out = cnn.embed(_patches(3, 32))
    assert out.shape == (3, cnn.dim) and cnn.dim == 256
    assert cnn.input_size == 256  # CNNs take the patch as it is
    vit = create_encoder("test_vit", device="cpu")  # a fixed-size model: patches resized to 160
    assert vit.input_size == 160
    assert vit.embed(_patches(2, 256)).shape == (2, vit.dim)


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(HDMILError, match="no_such_encoder"):
        create_encoder("no_such_encoder", device="cpu")


def test_embed_equals_manual_normalisation():
    enc = Encoder(_MeanRGB(), "mean_rgb", input_size=32, device="cpu")
    x = _patches(4, 32)
    manual = (x.astype(np.float32) / 255 - MEAN) / STD  # [B, H, W, 3]
    expected = np.concatenate([manual.mean(axis=(1, 2)), manual.max(axis=(1, 2))], axis=1)
    got = enc.embed(x)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.embed(torch.from_numpy(x)), got)  # torch uint8 in, same out
    assert enc.embed(x[:0]).shape == (0, 6)
    # Patches of another size are resized to input_size (bilinear, antialiased) before the model.
    flat = Encoder(nn.Flatten(), "pixels", input_size=16, device="cpu")
    assert flat.dim == 3 * 16 * 16
    big = _patches(2, 40)
    manual = torch.from_numpy((big.astype(np.float32) / 255 - MEAN) / STD).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(manual, size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(flat.embed(big), resized.flatten(1), rtol=1e-4, atol=1e-4)


def _perturbed(encoder: Encoder) -> Encoder:
    """Weights unlike the seeded default, so a load that did nothing cannot pass."""
    with torch.no_grad():
        for p in encoder.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return encoder


def _out(enc: Encoder, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return enc(x)


def test_weights_file_round_trips(tmp_path, small_encoder):
    enc = _perturbed(copy.deepcopy(small_encoder))
    x = torch.randn(1, 3, 64, 64)
    expected = _out(enc, x)
    assert not torch.allclose(expected, _out(small_encoder, x))
    path = save_encoder(enc, tmp_path / "mine.safetensors")
    by_file = create_encoder(path, device="cpu")  # architecture from the file's metadata
    assert by_file.name == "resnet18_trunc"
    torch.testing.assert_close(_out(by_file, x), expected)
    by_name = create_encoder("resnet18_trunc", weights=path, device="cpu")
    torch.testing.assert_close(_out(by_name, x), expected)
    # A torch checkpoint as people save them: DataParallel prefix, a classifier head, no metadata.
    state = {f"module.{k}": v for k, v in enc.model.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(10, 512)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    guessed = create_encoder(tmp_path / "ckpt.pth", device="cpu")  # fits resnet18_trunc only
    torch.testing.assert_close(_out(guessed, x), expected)


def test_weights_that_do_not_fit_name_the_file(tmp_path, small_encoder):
    path = save_encoder(small_encoder, tmp_path / "r18.safetensors")
    with pytest.raises(HDMILError, match=r"r18\.safetensors.*resnet50_trunc.*wrong shape"):
        create_encoder("resnet50_trunc", weights=path, device="cpu")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(HDMILError, match="junk.pth"):
        create_encoder("resnet18_trunc", weights=junk, device="cpu")
    with pytest.raises(HDMILError, match="missing.safetensors"):
        create_encoder(tmp_path / "missing.safetensors", device="cpu")
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(HDMILError, match=r"other\.pth.*--arch"):
        create_encoder(tmp_path / "other.pth", device="cpu")


def test_register_encoder_adds_a_name():
    @register_encoder("mean_rgb_test")
    def _factory(pretrained: bool = False, device=None) -> Encoder:
        return Encoder(_MeanRGB(), "mean_rgb_test", input_size=16, device=device)

    assert "mean_rgb_test" in list_encoders()
    enc = create_encoder("mean_rgb_test", device="cpu")
    assert enc.dim == 6 and enc.embed(_patches(1, 16)).shape == (1, 6)


# -- feature files --------------------------------------------------------------------------------


def _bag(n: int = 7, d: int = 5, seed: int = 0) -> FeatureBag:
    rng = np.random.default_rng(seed)
    return FeatureBag(
        features=rng.normal(size=(n, d)).astype(np.float32),
        coords=rng.integers(0, 20, (n, 2)).astype(np.int64) * 512,  # on the 512 px grid
        attrs={"encoder": "resnet50_trunc", "patch_size_level0": 512, "patch_px": 256,
               "magnification": 20.0, "mpp": 0.2527},
        lr_patches=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
        slide_id="slide-A",
    )


def test_h5_round_trip_with_attrs(tmp_path):
    bag = _bag()
    path = write_features(tmp_path / "out" / "slide-A.h5", bag)
    assert [p.name for p in path.parent.iterdir()] == ["slide-A.h5"]  # no temp file left behind
    back = read_features(path)
    np.testing.assert_array_equal(back.features, bag.features)
    np.testing.assert_array_equal(back.coords, bag.coords)
    np.testing.assert_array_equal(back.lr_patches, bag.lr_patches)
    assert back.features.dtype == np.float32 and back.coords.dtype == np.int64
    assert back.slide_id == "slide-A" and back.path == path and len(back) == 7 and back.dim == 5
    for key, value in bag.attrs.items():
        assert back.attrs[key] == value
    assert back.attrs["dim"] == 5 and back.attrs["slide"] == "slide-A"
    # Arrays instead of a bag; features only.
    write_features(tmp_path / "b.h5", bag.features, bag.coords, {"encoder": "x"})
    assert read_features(tmp_path / "b.h5").lr_patches is None
    assert read_features(tmp_path / "b.h5", lr_patches=False).attrs["encoder"] == "x"


def test_feature_file_has_normal_permissions_and_a_full_folder_leaves_the_old_one(
    tmp_path, monkeypatch
):
    import os

    from hdmil.files import WriteError

    umask = os.umask(0)
    os.umask(umask)
    path = write_features(tmp_path / "s.h5", _bag(3))
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not a temp file's 0600
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(WriteError, match=r"s\.h5.*No space left"):
        write_features(path, _bag(5))
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]  # and no temp file is left


def test_write_rejects_misaligned_arrays(tmp_path):
    bag = _bag()
    with pytest.raises(ValueError, match="coords"):
        write_features(tmp_path / "x.h5", bag.features, bag.coords[:3])
    assert not (tmp_path / "x.h5").exists()


def test_reads_clam_h5_with_int32_coords_and_batched_features(tmp_path):
    path = tmp_path / "h5_files" / "TCGA-01.h5"
    path.parent.mkdir()
    feats = np.random.default_rng(1).normal(size=(1, 4, 1024)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["features"] = feats
        coords = f.create_dataset("coords", data=np.array([[0, 0], [512, 0], [0, 512], [512, 512]], np.int32))
        coords.attrs.update({"patch_size": 256, "patch_level": 1, "downsample": np.array([2.0, 2.0])})
    bag = read_features(path)
    assert bag.features.shape == (4, 1024)
    np.testing.assert_array_equal(bag.features, feats[0])
    assert bag.coords.dtype == np.int64 and bag.coords[3].tolist() == [512, 512]
    assert bag.slide_id == "TCGA-01" and bag.attrs["patch_size_level0"] == 512
    assert bag.lr_patches is None


def test_reads_trident_h5_with_coords_attrs(tmp_path):
    path = tmp_path / "slide.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.ones((3, 1536), np.float16)
        coords = f.create_dataset("coords", data=np.arange(6, dtype=np.int64).reshape(3, 2))
        coords.attrs.update({"patch_size": 256, "patch_size_level0": 1024, "target_magnification": 20,
                             "level0_magnification": 80, "name": "slide"})
    bag = read_features(path)
    assert bag.features.dtype == np.float32 and bag.features.shape == (3, 1536)
    assert bag.attrs["patch_size_level0"] == 1024 and bag.attrs["magnification"] == 20.0
    assert bag.attrs["patch_px"] == 256 and bag.attrs["coords_attrs"]["level0_magnification"] == 80


def test_reads_clam_pt_without_coords(tmp_path):
    path = tmp_path / "pt_files" / "s1.pt"
    path.parent.mkdir()
    feats = torch.randn(6, 1024)
    torch.save(feats, path)
    bag = read_features(path)
    assert bag.coords is None and bag.slide_id == "s1"
    np.testing.assert_array_equal(bag.features, feats.numpy())


def test_bad_feature_files_are_errors_naming_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(FeatureFileError, match="corrupt.h5"):
        read_features(corrupt)
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f["embeddings"] = np.zeros((2, 3), np.float32)
    with pytest.raises(FeatureFileError, match=r"wrong\.h5.*no 'features'.*embeddings"):
        read_features(wrong)
    mismatch = tmp_path / "mismatch.h5"
    with h5py.File(mismatch, "w") as f:
        f["features"] = np.zeros((5, 3), np.float32)
        f["coords"] = np.zeros((4, 2), np.int64)
    with pytest.raises(FeatureFileError, match=r"mismatch\.h5.*5 feature rows but 4 coords"):
        read_features(mismatch)
    pickled = tmp_path / "code.pt"
    torch.save({"features": torch.zeros(2, 3), "obj": _Unpicklable()}, pickled)
    with pytest.raises(FeatureFileError, match="code.pt"):
        read_features(pickled)  # weights_only refuses arbitrary objects
    with pytest.raises(FeatureFileError, match="nope.h5"):
        read_features(tmp_path / "nope.h5")


@dataclass
class _Unpicklable:
    x: int = 1


def test_find_feature_files_in_clam_trident_and_flat_folders(tmp_path):
    clam = tmp_path / "clam"
    write_features(clam / "h5_files" / "a.h5", _bag(3))
    (clam / "pt_files").mkdir()
    torch.save(torch.zeros(3, 5), clam / "pt_files" / "a.pt")
    torch.save(torch.zeros(2, 5), clam / "pt_files" / "b.pt")
    found = find_feature_files(clam)
    assert found == {"a": clam / "h5_files" / "a.h5", "b": clam / "pt_files" / "b.pt"}  # h5 wins

    flat = tmp_path / "flat"
    write_features(flat / "x.h5", _bag(2))
    (flat / ".y.h5.123.tmp").write_bytes(b"")  # a half-written file of ours
    assert find_feature_files(flat) == {"x": flat / "x.h5"}

    trident = tmp_path / "job"
    write_features(trident / "20x_256px_0px_overlap" / "features_uni_v1" / "s.h5", _bag(2))
    assert list(find_feature_files(trident)) == ["s"]
    write_features(trident / "20x_256px_0px_overlap" / "features_conch_v15" / "s.h5", _bag(2))
    with pytest.raises(FeatureFileError, match="several feature folders"):
        find_feature_files(trident)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureFileError, match="no feature files"):
        find_feature_files(tmp_path / "empty")
    with pytest.raises(FeatureFileError, match="not found"):
        find_feature_files(tmp_path / "nowhere")


def test_other_datasets_survive_a_rewrite_of_the_same_patches(tmp_path):
    bag = _bag()
    path = write_features(tmp_path / "s.h5", bag)
    regions = np.ones((2, 192), np.float32)
    update_feature_file(path, {"region_embeddings": regions}, {"slpd": "v1"})
    back = read_features(path)
    np.testing.assert_array_equal(back.features, bag.features)  # untouched by the update
    assert back.attrs["slpd"] == "v1"
    write_features(path, bag)  # same coords and encoder: region embeddings stay valid
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["region_embeddings"][()], regions)
    bag.coords = bag.coords + 1
    write_features(path, bag)  # other patches: the old region embeddings would be stale
    with h5py.File(path) as f:
        assert "region_embeddings" not in f


# -- extraction -----------------------------------------------------------------------------------


@dataclass
class _Batch:
    indices: np.ndarray
    pixels: np.ndarray
    failed: list = field(default_factory=list)


def test_extract_features_puts_rows_by_index_and_marks_failures():
    enc = Encoder(_MeanRGB(), "mean_rgb", input_size=8, device="cpu")
    patches = _patches(10, 8, seed=3)
    # Out of order (as tile-aligned reading gives them), patch 4 failed to decode.
    order = [[7, 2, 9], [0, 5], [1, 3, 8, 6]]
    batches = [_Batch(np.array(ix), patches[ix]) for ix in order]
    batches[1].failed = [(4, "bad tile")]
    seen = []
    feats, ok = extract_features(enc, batches, 10, progress=lambda s, d, t: seen.append((s, d, t)))
    assert feats.shape == (10, 6) and feats.dtype == np.float32
    assert ok.tolist() == [i != 4 for i in range(10)]
    np.testing.assert_allclose(feats[ok], enc.embed(patches[ok]).numpy(), rtol=1e-6, atol=1e-6)
    assert not feats[4].any()
    assert seen[-1] == ("features", 10, 10) and [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)


def test_extract_features_stops_when_cancelled():
    enc = Encoder(_MeanRGB(), "mean_rgb", input_size=8, device="cpu")
    cancel = threading.Event()
    patches = _patches(4, 8)

    def batches():
        yield _Batch(np.array([0, 1]), patches[:2])
        cancel.set()
        yield _Batch(np.array([2, 3]), patches[2:])

    with pytest.raises(Cancelled, match="feature extraction cancelled"):
        extract_features(enc, batches(), 4, cancel=cancel)


def test_slide_features_leave_out_failed_patches_in_every_array(monkeypatch):
    reading = pytest.importorskip("hdmil.reading")
    from types import SimpleNamespace

    from hdmil.features import extract_slide_features

    patches = _patches(5, 8, seed=4)
    lr = _patches(5, 16, seed=5)
    coords = np.arange(10, dtype=np.int64).reshape(5, 2) * 256
    grid = SimpleNamespace(coords=coords, patch_size_level0=512, patch_px=8, magnification=20.0,
                           mpp=0.25, lr_patches=lambda: lr)
    slide = SimpleNamespace(name="fake")
    calls = {}

    def fake_iter(slide_, coords_, ps0, out_px=256, batch_size=64, **kw):
        calls.update(ps0=ps0, out_px=out_px, batch_size=batch_size)
        yield _Batch(np.array([3, 0]), patches[[3, 0]])
        yield _Batch(np.array([4, 1]), patches[[4, 1]], failed=[(2, "bad tile")])

    monkeypatch.setattr(reading, "iter_patches", fake_iter)
    enc = Encoder(_MeanRGB(), "mean_rgb", input_size=8, device="cpu")
    bag = extract_slide_features(slide, grid, enc, batch_size=2)
    assert calls == {"ps0": 512, "out_px": 8, "batch_size": 2}
    keep = [0, 1, 3, 4]
    np.testing.assert_array_equal(bag.coords, coords[keep])
    np.testing.assert_array_equal(bag.lr_patches, lr[keep])
    np.testing.assert_allclose(bag.features, enc.embed(patches[keep]).numpy(), rtol=1e-6, atol=1e-6)
    assert bag.attrs["n_failed"] == 1 and bag.attrs["encoder"] == "mean_rgb" and bag.slide_id == "fake"
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["mpp"] == 0.25


# -- the CLI on a real slide ----------------------------------------------------------------------


def _need_grid_and_reading():
    pytest.importorskip("hdmil.grid")
    pytest.importorskip("hdmil.reading")


@pytest.mark.slow
def test_cli_features_on_the_cmu_slide(tmp_path, cmu_slide, broken_slide, tiny_slide, capsys):
    _need_grid_and_reading()
    from hdmil.cli import main
    from hdmil.grid import build_grid
    from hdmil.slide import open_slide

    out = tmp_path / "feats"
    rc = main(["features", str(broken_slide), str(cmu_slide), str(tiny_slide),
               "--encoder", "resnet18_trunc", "--out", str(out), "--device", "cpu", "--batch-size", "16"])
    err = capsys.readouterr().err
    assert rc == 1  # broken.svs failed ...
    assert sum("error" in line and "broken.svs" in line for line in err.splitlines()) == 1
    assert "small-16px: no tissue patches" in err  # ... the tiny one has nothing to write
    assert sorted(p.name for p in out.iterdir()) == ["CMU-1-Small-Region.h5"]  # ... the CMU one went on

    with open_slide(cmu_slide) as slide:
        grid = build_grid(slide)
        bag = read_features(out / "CMU-1-Small-Region.h5")
        np.testing.assert_array_equal(bag.coords, grid.coords)
        np.testing.assert_array_equal(bag.lr_patches, grid.lr_patches())
        assert bag.features.shape == (len(grid.coords), 256) and len(grid.coords) > 0
        assert np.isfinite(bag.features).all() and bag.features.std(axis=0).max() > 0
        assert bag.attrs["encoder"] == "resnet18_trunc"
        assert bag.attrs["patch_size_level0"] == grid.patch_size_level0
        assert bag.attrs["mpp"] == pytest.approx(grid.mpp)
        assert bag.attrs["slide"] == "CMU-1-Small-Region"

    # Run again: the file is there with the same encoder, so the slide is skipped.
    rc = main(["features", str(cmu_slide), "--encoder", "resnet18_trunc", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0 and "skipped" in capsys.readouterr().err
