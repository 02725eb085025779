"""Bounds on what a file can make us do (issue 19, items 4 and 6): mpp within a plausible range,
overviews and decoded windows capped whatever the header claims, checkpoint shapes limited before
allocation, encoder weights only beside the checkpoint (or by hash), undecodable codecs refused.

Every fixture is a small TIFF or checkpoint made here; headers are patched in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hdmil.checkpoint import MAX_MODEL_BYTES, file_sha256, load_model, load_slpd, save_checkpoint, save_slpd
from hdmil.cli import main
from hdmil.errors import CheckpointError, SlideError
from hdmil.grid import build_grid, read_lr_image
from hdmil.models import DMIN, DMINConfig, SLPD, slpd_config
from hdmil.pipeline.setup import encoder_for, encoder_weights_path
from hdmil.slide import MPP_RANGE, check_decodable, open_slide

from helpers import TINY

HUGE = 10**6  # px: what the patched header claims per side


def _tiff(path: Path, size: int = 512, mpp: float = 0.5, compression: str = "zlib", **kw) -> Path:
    """A small RGB tiled TIFF of tissue-coloured pixels at ``mpp`` µm/px."""
    data = np.full((size, size, 3), (200, 120, 170), np.uint8)
    px_per_cm = 1e4 / mpp
    tifffile.imwrite(
        path, data, photometric="rgb", compression=compression, metadata=None,
        resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER", **{"tile": (256, 256), **kw},
    )
    return path


def _patch(path: Path, **tags: int) -> Path:
    """Overwrite header tags of the first page in place (the pixel data stays as it is)."""
    with tifffile.TiffFile(path, mode="r+b") as tf:
        for name, value in tags.items():
            tf.pages[0].tags[name].overwrite(value)
    return path


@pytest.fixture
def huge_header(tmp_path) -> Path:
    """A few KB of TIFF whose header claims 10^6 x 10^6 px (four real tiles, the rest absent)."""
    path = _patch(_tiff(tmp_path / "huge.tif"), ImageWidth=HUGE, ImageLength=HUGE)
    assert path.stat().st_size < 200_000
    return path


def _one_line(exc: BaseException, *must: str) -> str:
    msg = str(exc)
    assert "\n" not in msg and len(msg) < 400, msg
    assert not re.search(r"\d{20}", msg), msg  # no 300-digit patch sizes
    for part in must:
        assert part in msg, (part, msg)
    return msg


# ------------------------------------------------------------------------------ mpp range


@pytest.mark.parametrize("mpp", [100.0, 1e-300, 0.01, 25.0])
def test_mpp_outside_the_plausible_range_is_refused(tmp_path, mpp):
    path = _tiff(tmp_path / "s.tif")
    with pytest.raises(SlideError) as info:
        open_slide(path, mpp=mpp)
    _one_line(info.value, str(path), f"{MPP_RANGE[0]:g} to {MPP_RANGE[1]:g} µm/px")
    with open_slide(path) as slide, pytest.raises(SlideError) as info:
        build_grid(slide, mpp=mpp)
    _one_line(info.value, str(path), "0.05 to 20 µm/px")


def test_mpp_within_range_but_patches_too_small(tmp_path):
    path = _tiff(tmp_path / "s.tif")
    with open_slide(path) as slide, pytest.raises(SlideError) as info:
        build_grid(slide, mpp=8.5)  # 128 µm / 8.5 = 15 px patches at level 0
    _one_line(info.value, "15 level-0 px", "16 to 16384 px", "0.05 to 8 µm/px")
    with open_slide(path) as slide:
        assert build_grid(slide, mpp=8.0).patch_size_level0 == 16  # the edge still works


@pytest.mark.parametrize("argv", [["info", "--mpp", "100"], ["tissue", "--mpp", "1e-300"]])
def test_cli_mpp_out_of_range_one_line(tmp_path, capsys, argv):
    path = _tiff(tmp_path / "s.tif")
    extra = ["--out", str(tmp_path / "t.geojson")] if argv[0] == "tissue" else []
    code = main([argv[0], str(path), *argv[1:], *extra])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "0.05 to 20 µm/px" in err and not re.search(r"\d{20}", err)


# ------------------------------------------------------------------------------ headers that lie


def test_huge_header_lr_image_is_refused_without_allocating(huge_header):
    tracemalloc.start()
    try:
        with open_slide(huge_header) as slide:
            assert slide.dimensions == (HUGE, HUGE)
            check_decodable(slide)  # the tiles that exist decode: only the size is a lie
            with pytest.raises(SlideError) as info:
                build_grid(slide)
            with pytest.raises(SlideError, match="cap of 64 MP"):
                read_lr_image(slide, (HUGE // 16, HUGE // 16), 16.0)
            with pytest.raises(SlideError, match="65536 px a side"):  # thin, but too long
                read_lr_image(slide, (16, HUGE // 8), 8.0)
            with pytest.raises(SlideError, match="one row of the low-resolution image needs"):
                read_lr_image(slide, (1, 4096), HUGE / 4096)  # 244 rows of 10^6 px at once
            with pytest.raises(SlideError, match="no pyramid level small enough"):
                slide.thumbnail(1024)
            with pytest.raises(SlideError, match="window of 100000 x 100000 px"):
                slide.read_region((0, 0), 0, (100_000, 100_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    lr = -(-HUGE // 256) * 16  # the padded grid's ceil(10^6 / 256) = 3907 patches of 16 LR px: 62512
    _one_line(info.value, str(huge_header), f"{lr} x {lr} px", "cap of 64 MP", "1000000 x 1000000")
    assert peak < 64 * 2**20, peak  # an LR image of the claimed size would be 10.9 GiB


def test_a_single_huge_strip_is_never_decoded(tmp_path):
    # an untiled level whose one strip the header stretches to 10^5 x 10^5 px (30 GB decoded)
    path = _tiff(tmp_path / "strip.tif", tile=None, rowsperstrip=512)
    _patch(path, ImageWidth=100_000, ImageLength=100_000, RowsPerStrip=100_000)
    with open_slide(path) as slide:
        assert slide.tile_sizes[0][0] * slide.tile_sizes[0][1] > 2**30
        with pytest.raises(SlideError) as info:
            slide.read_region((0, 0), 0, (16, 16))
    _one_line(info.value, str(path), "level 0's tiles", "64 MP cap")


# Runs the command as its child and prints the child's peak RSS: measured from a small launcher,
# because a child forked straight from pytest starts with (and reports) pytest's own RSS.
_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def _peak_rss_mib(cmd: list[str]) -> tuple[int, float, str]:
    """Exit code, peak RSS (MiB; ru_maxrss is in KiB on Linux) and stderr of ``cmd``."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, int(proc.stdout.split()[-1]) / 1024, proc.stderr


def test_info_and_predict_peak_memory_on_a_huge_header(huge_header, tmp_path):
    """The 10^6 x 10^6 px header used to make ``hdmil`` allocate 10.9 GiB: now what it costs over
    importing torch (which ``hdmil`` loads; 600-750 MiB alone on a CUDA build) stays small."""
    exe = shutil.which("hdmil", path=str(Path(sys.executable).parent))
    hdmil = [exe] if exe else [sys.executable, "-m", "hdmil.cli"]
    _, torch_only, _ = _peak_rss_mib([sys.executable, "-c", "import torch"])
    code, info_rss, err = _peak_rss_mib([*hdmil, "info", str(huge_header)])
    assert code == 0, err  # it reports the slide; the tissue count says why there is none
    code, predict_rss, err = _peak_rss_mib(
        [*hdmil, "predict", str(huge_header), "--out", str(tmp_path / "out"), "--device", "cpu"]
    )
    assert code == 1 and "cap of 64 MP" in err, err
    print(f"peak RSS MiB: import torch {torch_only:.0f}, info {info_rss:.0f}, "
          f"predict {predict_rss:.0f}")
    assert info_rss < 1024 and info_rss - torch_only < 256
    assert predict_rss - torch_only < 512, (torch_only, predict_rss)


# ------------------------------------------------------------------------------ undecodable codecs


@pytest.mark.parametrize("code, name", [
    (50001, "codec WEBP, Compression tag 50001"), (60000, "codec unknown, Compression tag 60000"),
])
def test_undecodable_codec_is_named(tmp_path, capsys, code, name):
    path = _patch(_tiff(tmp_path / "codec.tif"), Compression=code)
    with open_slide(path) as slide, pytest.raises(SlideError) as info:
        check_decodable(slide)
    _one_line(info.value, str(path), "level 0", name, "cannot be decoded")
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and str(path) in err, err


def test_napari_reader_refuses_undecodable_and_pyramidless_huge(tmp_path, huge_header):
    from napari_hdmil._reader import cached_slide, close_cached, get_reader, read_slide

    codec = _patch(_tiff(tmp_path / "codec.tif"), Compression=50001)
    with pytest.warns(UserWarning, match="codec WEBP, Compression tag 50001"):
        assert get_reader(str(codec)) is None
    with pytest.raises(SlideError, match="cannot be decoded"):
        cached_slide(codec)
    with pytest.warns(UserWarning, match="smallest pyramid level is 1000000 x 1000000 px"):
        assert get_reader(str(huge_header)) is None
    good = _tiff(tmp_path / "good.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_reader(str(good)) is read_slide
    close_cached(good)


# ------------------------------------------------------------------------------ checkpoint shapes


def _rewrite_config(path: Path, edit) -> Path:
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["hdmil"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(config)
    save_file(tensors, str(path), metadata={"hdmil": json.dumps(config)})
    return path


def _small_dmin(tmp_path: Path, **config) -> Path:
    torch.manual_seed(0)
    dmin = DMIN(DMINConfig(in_dim=8, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3))
    return save_checkpoint(tmp_path / "m.safetensors", {"dmin": dmin},
                           {"classes": ["normal", "tumor"], "encoder": TINY, **config})


def test_checkpoint_config_asking_160_gb_is_refused(tmp_path):
    def huge(config):  # 200k x 200k hidden layer: 4e10 float32 parameters
        config["modules"]["dmin"].update(in_dim=200_000, hidden=200_000)
        config["feature_dim"] = 200_000

    path = _rewrite_config(_small_dmin(tmp_path), huge)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = _one_line(info.value, str(path), "dmin", "GB of parameters", "refused")
    assert float(re.search(r"asks for ([\d,.]+) GB", msg).group(1).replace(",", "")) > 100
    assert MAX_MODEL_BYTES < 160e9


def test_slpd_config_too_large_is_refused(tmp_path):
    small = slpd_config("small", in_dim=16)
    path = save_slpd(tmp_path / "slpd.safetensors", SLPD(small), {})
    path = _rewrite_config(path, lambda c: c["config"]["encoder"].update(embed_dim=6 * 8192, depth=64))
    with pytest.raises(CheckpointError) as info:
        load_slpd(path)
    _one_line(info.value, str(path), "slpd", "GB of parameters")


# ------------------------------------------------------------------------------ encoder weights


@pytest.mark.parametrize("name", ["/etc/passwd", "../enc.safetensors", "sub/enc.safetensors", ".."])
def test_encoder_weights_must_be_a_plain_name_beside_the_checkpoint(tmp_path, name):
    path = _small_dmin(tmp_path, encoder_weights=name)
    with pytest.raises(CheckpointError) as info:
        encoder_for(load_model(path), "cpu")
    _one_line(info.value, str(path), repr(name), "plain file name")


def test_encoder_weights_by_hash(tmp_path):
    weights = tmp_path / "elsewhere" / "enc.bin"
    weights.parent.mkdir()
    weights.write_bytes(b"encoder weights")
    digest = file_sha256(weights)

    def model(name, sha=None):
        config = {"encoder_weights_sha256": sha} if sha else {}
        return SimpleNamespace(path=tmp_path / "m.safetensors", encoder_weights=name, config=config)

    assert encoder_weights_path(model(str(weights), digest)) == weights
    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        encoder_weights_path(model(str(weights), "0" * 64))
    beside = tmp_path / "enc.bin"
    shutil.copy(weights, beside)
    assert encoder_weights_path(model("enc.bin")) == beside
    assert encoder_weights_path(model("enc.bin", digest)) == beside
    beside.write_bytes(b"other weights")
    with pytest.raises(CheckpointError, match="do not match"):
        encoder_weights_path(model("enc.bin", digest))
