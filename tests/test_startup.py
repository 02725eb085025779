"""Start-up and the fixed costs of a slide: the encoder built in a thread while the pre-screen
runs gives the same numbers; HDMIL decodes only the tiles its kept patches overlap; the CLI's
cheap commands never import torch; the tissue mask's faster median gives the same numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from hdmil.checkpoint import default_model_path, load_model, save_checkpoint
from hdmil.errors import CheckpointError
from hdmil.grid import build_grid
from hdmil.models import DMIN, LIPN, DMINConfig, LIPNConfig
from hdmil.pipeline import EncoderBuild, encoder_for, run_slide, start_encoder
from hdmil.reading import PatchReader
from hdmil.slide import open_slide
from hdmil.tissue import _median_sample
from helpers import TINY


@pytest.fixture(scope="module")
def bundled():
    path = default_model_path()
    if not Path(path).is_file():
        pytest.skip("no bundled demo model")
    return load_model(path)


def test_encoder_built_in_a_thread_gives_the_same_result(bundled, cmu_slide):
    """Built up front, built in a thread while tissue + LIPN run (given, or run_slide's own)."""
    before = run_slide(cmu_slide, bundled, encoder=encoder_for(bundled, "cpu"), device="cpu")
    build = start_encoder(bundled, "cpu")
    threaded = run_slide(cmu_slide, bundled, encoder=build, device="cpu")
    own = run_slide(cmu_slide, bundled, device="cpu")  # no encoder: built in a thread here
    for r in (threaded, own):
        np.testing.assert_array_equal(r.probabilities, before.probabilities)
        np.testing.assert_array_equal(r.features, before.features)
        np.testing.assert_array_equal(r.kept, before.kept)
        # the wait for the encoder is set-up: reported apart, not in the slide's total
        assert r.timings["encoder_wait"] >= 0.0
        assert r.timings["total"] >= r.timings["tissue"] >= r.timings["open"] > 0.0
    assert build.done() and not build.failed()
    assert before.timings["encoder_wait"] == 0.0


def _wide_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    dmin = DMIN(DMINConfig(in_dim=12, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3))
    return save_checkpoint(path, {"dmin": dmin, "lipn": LIPN(LIPNConfig(n_classes=2))},
                           {"classes": ["normal", "tumor"], "encoder": TINY})


def test_encoder_that_does_not_fit_fails_from_the_thread(synthetic_slide, tmp_path):
    model = load_model(_wide_checkpoint(tmp_path / "wide.safetensors"))
    build = start_encoder(model, "cpu")
    with pytest.raises(CheckpointError, match="12-d"):
        build.result()
    assert isinstance(build, EncoderBuild) and build.failed()
    with pytest.raises(CheckpointError, match="wide.safetensors"):
        run_slide(synthetic_slide, model, device="cpu")  # run_slide's own thread: the same error
    with pytest.raises(CheckpointError, match="12-d"):
        run_slide(synthetic_slide, model, encoder=build)


def _tiles_overlapped(coords: np.ndarray, side: int, tile: tuple[int, int], size: tuple[int, int]) -> set:
    """The (tx, ty) file tiles that patches of ``side`` px at ``coords`` overlap inside the level."""
    (tw, th), (w, h) = tile, size
    out = set()
    for x, y in coords:
        x1, y1 = min(x + side, w) - 1, min(y + side, h) - 1
        for ty in range(max(y, 0) // th, y1 // th + 1):
            for tx in range(max(x, 0) // tw, x1 // tw + 1):
                out.add((tx, ty))
    return out


def test_only_the_tiles_of_kept_patches_are_decoded(cmu_slide):
    """CMU's 240-px tiles straddle the 256-px patches: a kept patch needs up to four tiles, and
    the reader decodes those and no other; its pixels are those of a read of every patch."""
    with open_slide(cmu_slide) as slide:
        grid = build_grid(slide)
        coords = np.asarray(grid.coords)
        kept = np.zeros(len(coords), bool)
        kept[::3] = True  # scattered: many tiles shared with patches not kept
        side, tile, size = grid.patch_size_level0, slide.tile_sizes[0], slide.dimensions

        def read(rows: np.ndarray) -> tuple[PatchReader, dict[int, np.ndarray]]:
            reader = PatchReader(slide, coords[rows], side, out_px=grid.patch_px, batch_size=8)
            got = {}
            for batch in reader.batches():
                assert not batch.failed
                for i, px in zip(batch.indices, batch.pixels):
                    got[int(rows[i])] = px
            return reader, got

        all_reader, every = read(np.arange(len(coords)))
        kept_reader, some = read(np.flatnonzero(kept))
    want = _tiles_overlapped(coords[kept], side, tile, size)
    assert kept_reader.n_tiles_decoded == len(want)
    assert all_reader.n_tiles_decoded == len(_tiles_overlapped(coords, side, tile, size))
    assert kept_reader.n_tiles_decoded < all_reader.n_tiles_decoded
    assert sorted(some) == list(np.flatnonzero(kept))
    for row, px in some.items():
        np.testing.assert_array_equal(px, every[row])


@pytest.mark.parametrize("argv", [["--help"], ["info", "{cmu}"]], ids=["help", "info"])
def test_cheap_commands_do_not_import_torch(argv, cmu_slide):
    args = [a.format(cmu=cmu_slide) for a in argv]
    code = ("import sys\nfrom hdmil.cli import main\ntry:\n    rc = main(%r)\nexcept SystemExit as e:\n"
            "    rc = e.code\nprint('RC', rc, 'torch' in sys.modules, 'timm' in sys.modules)") % (args,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    last = out.stdout.strip().splitlines()[-1]
    assert last == "RC 0 False False", (last, out.stderr[-500:])


def test_faster_median_gives_the_same_numbers(cmu_slide):
    """tissue._median_sample (skimage's histogram median, symmetric pad) = scipy's reflect median."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, hi, size, dtype=np.uint8)
              for hi, size in ((256, (61, 83)), (3, (40, 40)), (256, (2, 5)), (256, (1, 1)))]
    with open_slide(cmu_slide) as slide:
        images.append(build_grid(slide).lr_image[..., 1].copy())
    for sat in images:
        for k in (3, 7, 9):
            np.testing.assert_array_equal(_median_sample(sat, k), ndi.median_filter(sat, size=k, mode="reflect"))
    big = rng.integers(0, 256, (700, 500), dtype=np.uint8)  # strided first (over 250k pixels)
    np.testing.assert_array_equal(_median_sample(big, 7), ndi.median_filter(big[::2, ::2], size=7, mode="reflect"))
    floats = rng.random((20, 20)).astype(np.float32)  # not uint8: scipy's path
    np.testing.assert_array_equal(_median_sample(floats, 5), ndi.median_filter(floats, size=5, mode="reflect"))


def test_a_command_imports_only_the_modules_up_to_its_own(cmu_slide):
    """``hdmil info`` stops at the module that registers it; top-level help lists every command."""
    code = ("import sys\nfrom hdmil.cli import main\nmain(['info', %r])\n"
            "print('LOADED', 'hdmil.cli.predict_cmds' in sys.modules, 'hdmil.pipeline' in sys.modules)") % (
        str(cmu_slide),)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "LOADED False False", out.stderr[-500:]
    from hdmil.cli import _command, build_parser

    assert _command(["--debug", "predict", "x"]) == "predict"
    assert _command(["-h", "predict"]) is None and _command([]) is None
    every = build_parser()._subparsers._group_actions[0].choices
    assert {"info", "predict", "features", "batch"} <= set(every)
    assert set(build_parser("info")._subparsers._group_actions[0].choices) < set(every)
