"""Hostile inputs and faults (issue 19, lists 5 and 6): each is one line naming the file and the
problem, never a traceback, a segfault or a silent success. Small fixtures made here, in tmp_path."""

from __future__ import annotations

import errno
import gc
import logging
import threading
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import TINY

from hdmil.errors import FeatureFileError, HDMILError
from hdmil.features.encoders import EncoderError, create_encoder, save_encoder
from hdmil.features.io import check_coords, read_features, write_features
from hdmil.files import WriteError
from hdmil.train.data import LabelsError, load_cohort, read_labels

DIM = 8
PS = 512


def _grid(n: int) -> np.ndarray:
    return np.stack([np.arange(n) % 4, np.arange(n) // 4], 1).astype(np.int64) * PS


def _cohort(root: Path, n_slides: int = 12, n: int = 16, dims: dict[int, int] | None = None) -> Path:
    """``root/feats/s<i>.h5`` (tumour every other slide) and ``root/labels.csv``; returns root."""
    rng = np.random.default_rng(0)
    feats = root / "feats"
    rows = ["slide_id,label"]
    for i in range(n_slides):
        d = (dims or {}).get(i, DIM)
        x = rng.normal(size=(n, d)).astype(np.float32) + (i % 2)
        lr = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
        write_features(feats / f"s{i}.h5", x, _grid(n), {"encoder": "toy", "patch_size_level0": PS},
                       lr_patches=lr)  # fmt: skip
        rows.append(f"s{i},{'tumor' if i % 2 else 'normal'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _poison(path: Path, rows: list[int], value: float) -> None:
    with h5py.File(path, "r+") as h5:
        x = h5["features"][()]
        x[rows, 1] = value
        h5["features"][...] = x


# -- 1. NaN / inf features ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused_naming_file_and_rows(tmp_path, value):
    root = _cohort(tmp_path)
    _poison(root / "feats" / "s3.h5", [2, 5], value)
    cohort = load_cohort(root / "labels.csv", root / "feats")
    cohort.bags["s2"]  # a clean file reads
    with pytest.raises(FeatureFileError) as info:
        cohort.bags["s3"]
    msg = str(info.value)
    assert "s3.h5" in msg and "2 of 16 feature rows hold NaN or inf" in msg and "first at row 2" in msg
    assert "\n" not in msg


def test_train_dmin_fails_on_nan_features(tmp_path, capsys):
    from hdmil.cli import main

    root = _cohort(tmp_path)
    _poison(root / "feats" / "s0.h5", [0], np.nan)
    rc = main(["train-dmin", "--features", str(root / "feats"), "--labels", str(root / "labels.csv"),
               "--out", str(tmp_path / "run"), "--folds", "3", "--fold", "0", "--epochs", "1",
               "--min-epochs", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "hdmil train-dmin: error:" in err and "s0.h5: 1 of 16 feature rows hold NaN or inf" in err
    assert "Traceback" not in err
    assert not list((tmp_path / "run").rglob("*.safetensors"))  # no model "trained" on NaN


# -- 2. a feature folder mixing widths ----------------------------------------------------------


def test_feature_folder_mixing_widths_is_refused_naming_two_files(tmp_path):
    root = _cohort(tmp_path, dims={5: 16})
    with pytest.raises(FeatureFileError) as info:
        load_cohort(root / "labels.csv", root / "feats")
    msg = str(info.value)
    assert "s5.h5: 16-d features" in msg and "s0.h5 holds 8-d ones" in msg


def test_mixed_widths_in_pt_files_are_refused_when_read(tmp_path):
    import torch

    from hdmil.train.data import BagDataset

    torch.save({"features": torch.zeros(3, 8)}, tmp_path / "a.pt")
    torch.save({"features": torch.zeros(3, 12)}, tmp_path / "b.pt")
    bags = BagDataset({"a": tmp_path / "a.pt", "b": tmp_path / "b.pt"})
    bags.check_widths()  # .pt widths are not in a header: checked on read
    bags["a"]
    with pytest.raises(FeatureFileError, match=r"b\.pt: 12-d features, but .*a\.pt holds 8-d ones"):
        bags["b"]


# -- 3. labels: encodings and spellings ---------------------------------------------------------


def test_latin1_labels_are_read_with_a_warning(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("slide_id,label\nsl\xe9de_a,tum\xf6r\nb,normal\n".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"labels\.csv: not UTF-8 .*read as Latin-1"):
        cohort = read_labels(path)
    assert cohort.classes == ("normal", "tumör") and cohort.slide_ids == ("sléde_a", "b")


def test_utf8_labels_give_no_warning(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,tumör\nb,normal\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_labels(path).classes == ("normal", "tumör")


def test_labels_differing_only_in_case_are_refused(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,Normal\nb,normal\nc,tumor\n")
    with pytest.raises(LabelsError, match=r"labels\.csv: labels 'Normal' and 'normal' differ only in case"):
        read_labels(path)


# -- 4. a corrupt encoder weights file ----------------------------------------------------------


@pytest.mark.parametrize("name", ["half.safetensors", "noise.safetensors", "half.pth", "noise.pth"])
def test_corrupt_encoder_weights_give_one_line(tmp_path, name):
    import torch

    good = tmp_path / ("w.safetensors" if name.endswith("safetensors") else "w.pth")
    encoder = create_encoder(TINY)
    if good.suffix == ".pth":
        torch.save(encoder.model.state_dict(), good)
    else:
        save_encoder(encoder, good)
    data = good.read_bytes()
    bad = tmp_path / name
    bad.write_bytes(data[: len(data) // 2] if name.startswith("half") else np.random.default_rng(0).bytes(600))
    with pytest.raises(EncoderError) as info:
        create_encoder(str(bad), arch=TINY)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: corrupt or not a weights file (") and "\n" not in msg
    assert "weights_only" not in msg  # not torch's advice to unpickle an untrusted file


# -- 5. read-only OUT, full disk ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory) -> list[Path]:
    from hdmil.synth import synth_slide

    root = tmp_path_factory.mktemp("slides")
    return [Path(synth_slide(root / f"{n}.tiff", size=(1024, 1024), seed=i, tumor_fraction=0.2).path)
            for i, n in enumerate(("a", "b"))]  # fmt: skip


def _features_cli(slides: list[Path], out: Path) -> int:
    from hdmil.cli import main

    return main(["features", *map(str, slides), "--encoder", TINY, "--out", str(out), "--device", "cpu"])


def _disk_full(*_args, **_kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_features_on_a_full_disk_fail_each_slide_and_go_on(small_slides, tmp_path, capsys, monkeypatch):
    import hdmil.files

    monkeypatch.setattr(hdmil.files, "_fsync_file", _disk_full)  # every write fails at its flush
    rc = _features_cli(small_slides, tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 1
    for name in ("a", "b"):  # both slides tried, each one line
        assert f"{tmp_path / 'out' / name}.h5: cannot write (No space left on device)" in err
    assert "2 slides: 2 failed" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []  # no temp file, no partial h5
    assert not [t for t in threading.enumerate() if t.name.startswith(("hdmil-patch-reader", "hdmil-decode"))]


def test_h5_write_errors_come_from_a_plain_write_not_hdf5(tmp_path, monkeypatch):
    """HDF5 never writes to disk itself: a failed write cannot leave its objects half-closed
    (the segfault at exit after ENOSPC)."""
    import hdmil.files

    monkeypatch.setattr(hdmil.files, "_fsync_file", _disk_full)
    with pytest.raises(WriteError, match=r"s\.h5: cannot write \(No space left on device\)$"):
        write_features(tmp_path / "s.h5", np.zeros((3, 4), np.float32), _grid(3))
    assert list(tmp_path.iterdir()) == []


def test_features_into_an_unwritable_out(small_slides, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert _features_cli(small_slides, blocker / "out") == 1
    assert f"{blocker / 'out'}: cannot create the output folder (" in capsys.readouterr().err

    import hdmil.cli.features_cmds as fc

    monkeypatch.setattr(fc.os, "access", lambda *a: False)  # root ignores chmod: say read-only
    assert _features_cli(small_slides, tmp_path / "ro") == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ro'}: output folder is not writable (read-only or no permission)" in err
    assert "a.tiff" not in err  # said once, before any slide is read


def test_train_dmin_on_a_full_disk_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from hdmil.cli import main

    def full(*_a, **_kw):  # what safetensors raises on ENOSPC (not an OSError)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    import hdmil.checkpoint

    monkeypatch.setattr(hdmil.checkpoint, "save_file", full)
    root = _cohort(tmp_path)
    rc = main(["train-dmin", "--features", str(root / "feats"), "--labels", str(root / "labels.csv"),
               "--out", str(tmp_path / "run"), "--folds", "3", "--fold", "0", "--epochs", "1",
               "--min-epochs", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "dmin.safetensors: cannot write (No space left on device)" in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp")]


# -- 6. an empty test split ---------------------------------------------------------------------


def test_empty_test_split_is_an_error_not_auc_nan(tmp_path):
    from hdmil.models import DMIN, DMINConfig
    from hdmil.train.evaluate import evaluate_folds
    from hdmil.train.splits import Split

    root = _cohort(tmp_path, n_slides=4)
    cohort = load_cohort(root / "labels.csv", root / "feats")
    dmin = DMIN(DMINConfig(in_dim=DIM, hidden=16, attn_dim=8, n_classes=2, cheby_degree=3)).eval()
    split = Split(train=("s0", "s1"), val=("s2", "s3"), test=(), fold=0)
    with pytest.raises(HDMILError, match=r"fold 0: the test split is empty .*nothing to evaluate"):
        evaluate_folds([dmin], cohort, [split], use_lipn=False)


# -- 7. coords outside the slide or off the grid ------------------------------------------------


def _h5(path: Path, coords: np.ndarray, **attrs) -> Path:
    write_features(path, np.zeros((len(coords), 4), np.float32), coords, {"patch_size_level0": PS, **attrs})
    return path


def test_negative_coords_are_refused(tmp_path):
    coords = _grid(4)
    coords[2] = (-512, 0)
    with pytest.raises(FeatureFileError, match=r"n\.h5: 1 of 4 patch coords are negative .*row 2 at \(-512, 0\)"):
        read_features(_h5(tmp_path / "n.h5", coords))


def test_coords_outside_the_recorded_slide_are_refused(tmp_path):
    path = _h5(tmp_path / "o.h5", _grid(8), slide_width=1024, slide_height=4096)  # x up to 1536
    with pytest.raises(FeatureFileError, match=r"o\.h5: 4 of 8 patch coords are outside the 1024 x 4096 px slide"):
        read_features(path)
    read_features(_h5(tmp_path / "in.h5", _grid(8), slide_width=2048, slide_height=1024))


def test_off_grid_coords_are_refused_in_our_files(tmp_path):
    coords = _grid(4)
    coords[3, 0] += 100
    with pytest.raises(FeatureFileError, match=r"g\.h5: 1 of 4 patch coords are off the grid of 512 px"):
        read_features(_h5(tmp_path / "g.h5", coords))
    read_features(_h5(tmp_path / "roi.h5", _grid(4) + [37, 11]))  # an ROI origin: one offset for all


def test_clam_files_keep_their_per_contour_offsets(tmp_path):
    coords = np.array([[0, 0], [512, 0], [700, 900], [1212, 900]], np.int64)  # two contours
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as h5:
        h5["features"] = np.zeros((4, 4), np.float32)
        h5["coords"] = coords
        h5["coords"].attrs.update({"patch_size": 256, "patch_level": 0, "downsample": [2.0, 2.0]})
    assert read_features(path).attrs["patch_size_level0"] == 512


def test_extracted_features_record_the_slide_size(monkeypatch):
    from types import SimpleNamespace

    from hdmil import reading
    from hdmil.features.extract import extract_slide_features

    monkeypatch.setattr(reading, "iter_patches", lambda *a, **kw: iter(()))

    slide = SimpleNamespace(name="s", path=None, dimensions=(3000, 2000))
    grid = SimpleNamespace(coords=np.zeros((0, 2), np.int64), patch_size_level0=PS, patch_px=8,
                           magnification=20.0, mpp=0.25, lr_patches=lambda: np.zeros((0, 16, 16, 3), np.uint8))  # fmt: skip
    bag = extract_slide_features(slide, grid, create_encoder(TINY))
    assert (bag.attrs["slide_width"], bag.attrs["slide_height"]) == (3000, 2000)
    check_coords("x.h5", np.array([[2999, 1999]]), bag.attrs)
    with pytest.raises(FeatureFileError, match="outside the 3000 x 2000 px slide"):
        check_coords("x.h5", np.array([[3000, 0]]), bag.attrs)


# -- 8. the decoder's threads and a truncated slide ---------------------------------------------


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("hdmil-patch-reader", "hdmil-decode"))]


def test_encoder_error_stops_the_reader_threads(small_slides):
    from hdmil.features.extract import extract_features
    from hdmil.reading import iter_patches
    from hdmil.slide import open_slide

    class Broken:
        dim = 4

        def embed(self, pixels):
            raise RuntimeError("CUDA out of memory")

    with open_slide(small_slides[0], mpp=0.5) as slide:
        coords = _grid(8) // 4  # 128 px patches, 16 batches of 1: the producer is still going
        batches = iter_patches(slide, coords, 128, out_px=32, batch_size=1, prefetch=1)
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            extract_features(Broken(), batches, len(coords))
        assert not _reader_threads()  # stopped before the error reached us, not at GC


@pytest.fixture
def truncated_tiff(small_slides, tmp_path) -> Path:
    data = small_slides[0].read_bytes()
    path = tmp_path / "truncated.tiff"
    path.write_bytes(data[: len(data) // 3])  # level 0's first tiles only
    return path


def test_truncated_slide_reads_as_failed_patches_with_no_thread_noise(truncated_tiff, capfd):
    from hdmil.reading import PatchReader
    from hdmil.slide import open_slide

    with open_slide(truncated_tiff, mpp=0.5) as slide:
        reader = PatchReader(slide, _grid(8), 256, out_px=32, batch_size=4)
        batches = list(reader.batches())
    failed = [why for b in batches for _, why in b.failed]
    assert failed and reader.n_read + reader.n_failed == 8
    assert all("truncated.tiff: patch" in why and "\n" not in why for why in failed)
    gc.collect()
    assert not _reader_threads()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err


def test_truncated_slide_window_gives_one_error_and_no_asyncio_flood(truncated_tiff, caplog):
    from hdmil.errors import SlideError
    from hdmil.slide import open_slide

    caplog.set_level(logging.DEBUG, logger="asyncio")
    with open_slide(truncated_tiff, mpp=0.5) as slide:
        with pytest.raises(SlideError, match=r"truncated\.tiff: cannot decode level 0"):
            slide.read_region((0, 0), 0, (1024, 1024))  # many tiles through zarr's async reads
    gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"]


def test_zarr_orphan_filter_drops_only_zarr_task_reports():
    from hdmil.reading import quiet_zarr_orphans

    quiet_zarr_orphans()
    quiet_zarr_orphans()  # idempotent
    log = logging.getLogger("asyncio")
    assert len([f for f in log.filters if type(f).__name__ == "_ZarrOrphans"]) == 1

    def shown(msg: str) -> bool:
        return log.filter(log.makeRecord("asyncio", logging.ERROR, __file__, 1, msg, (), None))

    assert not shown("Task exception was never retrieved\nfuture: <Task coro=<run() zarr/core/common.py:112>>")
    assert not shown("Task was destroyed but it is pending!\ntask: <Task pending coro=<zarr.run()>>")
    assert shown("Task exception was never retrieved\nfuture: <Task coro=<mine()>>")
    assert shown("Executing <Task zarr> took 1.2 seconds")


def test_truncated_slide_leaves_nothing_for_exit(truncated_tiff):
    """The flood came at interpreter exit (zarr's orphaned chunk tasks): run one in a process."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from hdmil.errors import SlideError\n"
        "from hdmil.slide import open_slide\n"
        "with open_slide(sys.argv[1], mpp=0.5) as s:\n"
        "    for _ in range(3):\n"
        "        try:\n"
        "            s.read_region((0, 0), 0, (1024, 1024))\n"
        "        except SlideError as exc:\n"
        "            print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(truncated_tiff)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0
    assert out.stdout.count("cannot decode level 0") == 3
    noise = [line for line in out.stderr.splitlines() if "tifffile" not in line]
    assert noise == [], out.stderr
