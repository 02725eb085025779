"""Integrity of a run under bad input and faults (issue 19): no prediction from undecodable
patches, results folders that stay inside OUT and never collide, resume keyed by what produced a
result, per-slide locks, and a full disk that fails one slide while the rest carry on."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import tifffile
import torch

from hdmil.batch import _precheck, _remove_partial_writes, process_slide, run_batch
from hdmil.checkpoint import load_model, save_checkpoint
from hdmil.cli import main
from hdmil.errors import SlideError
from hdmil.features.encoders import create_encoder
from hdmil.grid import build_grid
from hdmil.models import DMIN, DMINConfig
from hdmil.pipeline import RunOptions, UnreadablePatchesError, run_slide
from hdmil.pipeline.folders import (
    SlideBusyError,
    plan_slides,
    printable,
    remove_dead_temps,
    result_state,
    safe_name,
    slide_lock,
)
from hdmil.slide import open_slide
from helpers import TINY, calibrated_lipn


def _save(path: Path, lipn, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    dmin = DMIN(DMINConfig(in_dim=8, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3)).eval()
    return save_checkpoint(path, {"dmin": dmin, "lipn": lipn},
                           {"classes": ["normal", "tumor"], "encoder": TINY})


@pytest.fixture(scope="module")
def ckpt(synthetic_slide, tmp_path_factory) -> Path:
    with open_slide(synthetic_slide) as slide:
        lr = build_grid(slide).lr_patches()
    return _save(tmp_path_factory.mktemp("integrity") / "m.safetensors", calibrated_lipn(lr, (0.35, 0.2)))


@pytest.fixture(scope="module")
def other_ckpt(synthetic_slide, tmp_path_factory) -> Path:
    """Another model (other DMIN weights, so another hash) with the same LIPN."""
    with open_slide(synthetic_slide) as slide:
        lr = build_grid(slide).lr_patches()
    return _save(tmp_path_factory.mktemp("integrity2") / "m2.safetensors",
                 calibrated_lipn(lr, (0.35, 0.2)), seed=2)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)


@pytest.fixture(scope="module")
def encoder():
    return create_encoder(TINY, device="cpu")


def _corrupt_level0(src: Path, dst: Path, which) -> Path:
    """A copy of ``src`` whose level-0 tiles ``which(k)`` (tile index k) are zeroed."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        page = tif.pages[0]
        spans = [(o, n) for k, (o, n) in enumerate(zip(page.dataoffsets, page.databytecounts)) if which(k)]
    with open(dst, "r+b") as fh:
        for off, n in spans:
            fh.seek(off)
            fh.write(b"\x00" * n)
    return dst


@pytest.fixture(scope="module")
def all_corrupt(synthetic_slide, tmp_path_factory) -> Path:
    return _corrupt_level0(synthetic_slide, tmp_path_factory.mktemp("bad") / "tumour.tiff", lambda k: True)


@pytest.fixture(scope="module")
def fifth_corrupt(synthetic_slide, tmp_path_factory) -> Path:
    return _corrupt_level0(synthetic_slide, tmp_path_factory.mktemp("bad") / "fifth.tiff", lambda k: k % 5 == 0)


# --------------------------------------------------------------------------- 1. no call from nothing


def test_no_decodable_patch_is_an_error_not_a_prediction(all_corrupt, model, encoder):
    # tissue and LIPN still work (they read the pyramid's lower levels); every HR read fails
    with pytest.raises(UnreadablePatchesError, match="none of the .* kept patches could be decoded") as info:
        run_slide(all_corrupt, model, encoder=encoder)
    assert str(all_corrupt) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, SlideError)
    with pytest.raises(UnreadablePatchesError):  # also when the share allowed is everything
        run_slide(all_corrupt, model, encoder=encoder, use_lipn=False, max_failed_share=1.0)


def test_failed_share_above_the_limit_fails_below_it_is_reported(fifth_corrupt, model, encoder, tmp_path):
    result = run_slide(fifth_corrupt, model, encoder=encoder, use_lipn=False)
    assert 0.1 < result.failed_share < 0.5
    assert result.failed_share == pytest.approx(len(result.failed) / result.n_kept)
    report = json.loads((result.save(tmp_path / "r") / "report.json").read_text())
    assert report["failed_share"] == pytest.approx(result.failed_share, abs=1e-6)
    with pytest.raises(UnreadablePatchesError, match=r"more than the 10% allowed"):
        run_slide(fifth_corrupt, model, RunOptions(use_lipn=False, max_failed_share=0.1), encoder=encoder)
    with pytest.raises(Exception, match="max_failed_share"):
        RunOptions(max_failed_share=1.5)


def test_a_clean_run_reports_no_failed_share(synthetic_slide, model, encoder):
    result = run_slide(synthetic_slide, model, encoder=encoder)
    assert result.failed_share == 0.0 and result.to_report()["failed_share"] == 0.0


def test_cli_and_batch_fail_the_unreadable_slide(all_corrupt, synthetic_slide, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["predict", str(all_corrupt), str(synthetic_slide), "--model", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert any("tumour.tiff" in e and "could be decoded" in e for e in err.splitlines()
               if e.startswith("hdmil predict: error:")), err
    assert not (out / "tumour").exists() and (out / "synthetic" / "report.json").is_file()
    assert main(["predict", str(synthetic_slide), "--model", str(ckpt), "--out", str(out),
                 "--max-failed-share", "2"]) == 1
    assert "--max-failed-share must be in [0, 1]" in capsys.readouterr().err

    row = process_slide(str(all_corrupt), str(tmp_path / "batch"), str(ckpt))
    assert row["status"] == "failed" and "could be decoded" in row["error"]


# --------------------------------------------------------------------------- 2. names


def test_safe_names():
    assert safe_name("...svs") == "slide" and safe_name("..svs") == "slide"
    assert safe_name("/x/.hidden.svs") == "hidden"
    assert safe_name("a/b/con.svs") == "_con"
    assert safe_name(os.fsdecode(b"/x/bad\xff name.tiff")) == "bad_ name"
    assert safe_name(b"/x/bad\xff.tiff") == "bad_"
    assert safe_name('we:ird*"na<me>|.svs') == "we_ird__na_me__"
    long = safe_name("é" * 300 + ".svs")
    assert len(long.encode()) <= 120 and long
    assert printable(os.fsdecode(b"bad\xff")) == "bad\\xff"


def test_plan_gives_unique_folders_and_runs_a_slide_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "x.tiff", tmp_path / "b" / "x.tiff"
    a.write_bytes(b"")
    b.write_bytes(b"")
    (tmp_path / "link.tiff").symlink_to(a)
    entries, repeats = plan_slides([a, b, tmp_path / "a" / ".." / "a" / "x.tiff", tmp_path / "link.tiff"])
    assert [e.path for e in entries] == [a, b]
    assert entries[0].name == "x" and entries[1].name.startswith("x-") and len(entries[1].name) == 10
    assert repeats == {str(a): 3}
    # a folder holding another slide's results is not reused
    out = tmp_path / "out"
    (out / "x").mkdir(parents=True)
    (out / "x" / "report.json").write_text(json.dumps({"run_key": {"slide": str(a.resolve())}}))
    [only_b], _ = plan_slides([b], out)
    assert only_b.name == entries[1].name
    [only_a], _ = plan_slides([a], out)
    assert only_a.name == "x"


def test_a_folder_never_resolves_outside_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    [entry], _ = plan_slides([tmp_path / "x.svs"], out)
    assert entry.folder(out).parent == out
    (out / "x").symlink_to(tmp_path)
    with pytest.raises(Exception, match="outside"):
        entry.folder(out)


def test_predict_with_hostile_names(synthetic_slide, ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    dots = src / "...svs"
    shutil.copy(synthetic_slide, dots)
    shutil.copy(synthetic_slide, src / "a" / "x.tiff")
    shutil.copy(synthetic_slide, src / "b" / "x.tiff")
    bad = Path(os.fsdecode(bytes(src) + b"/bad\xff.tiff"))
    shutil.copy(synthetic_slide, bad)
    out = tmp_path / "out"
    slides = [str(dots), str(bad), str(src / "a" / "x.tiff"), str(src / "b" / "x.tiff"), str(src / "a" / "x.tiff")]
    rc = main(["predict", *slides, "--model", str(ckpt), "--out", str(out), "--prescreen-only"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    captured.out.encode("utf-8")  # printable: no lone surrogates
    assert "is named 2 times; it runs once" in captured.err
    names = sorted(p.name for p in out.iterdir())
    assert names[:3] == ["bad_", "slide", "x"] and names[3].startswith("x-") and len(names) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # nothing beside OUT
    report = json.loads((out / "bad_" / "prescreen.json").read_text())
    assert report["n_patches"] > 0


def test_non_utf8_name_in_batch_summary(synthetic_slide, ckpt, tmp_path):
    bad = Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff.tiff"))
    shutil.copy(synthetic_slide, bad)
    out = tmp_path / "out"
    row = process_slide(str(bad), str(out), str(ckpt))
    assert row["status"] == "ok" and row["slide"] == "bad_", row
    # the second run skips it; the summary is written with the name made printable
    summary = run_batch([bad], out, model_path=ckpt)
    assert summary.n_skipped == 1
    text = (out / "summary.csv").read_text(encoding="utf-8")
    assert "bad\\xff.tiff" in text
    with h5py.File(out / "bad_" / "patches.h5") as f:
        assert f.attrs["slide"] == "bad\\xff"


def test_missing_slide_is_missing_not_skipped_and_repeats_run_once(synthetic_slide, ckpt, tmp_path):
    out = tmp_path / "out"
    assert process_slide(str(synthetic_slide), str(out), str(ckpt))["status"] == "ok"
    gone = tmp_path / "elsewhere" / "synthetic.tiff"  # its folder name exists in OUT
    summary = run_batch([gone, synthetic_slide, synthetic_slide], out, model_path=ckpt)  # no task runs
    rows = {r["path"]: r for r in summary.rows}
    assert rows[str(gone)]["status"] == "missing" and "no such file" in rows[str(gone)]["error"]
    assert rows[str(synthetic_slide)]["status"] == "skipped" and len(summary.rows) == 2
    assert summary.n_missing == 1 and summary.n_not_done == 1
    assert summary.repeats == {str(synthetic_slide): 2}
    table = summary.table()
    assert "missing 1" in table and "named 2 times, run once" in table
    with open(out / "summary.csv", newline="") as fh:
        statuses = sorted(r["status"] for r in csv.DictReader(fh))
    assert statuses == ["missing", "skipped"]


# --------------------------------------------------------------------------- 3. resume and locks


def test_resume_is_keyed_by_what_produced_the_result(synthetic_slide, ckpt, other_ckpt, tmp_path):
    out = tmp_path / "out"
    assert process_slide(str(synthetic_slide), str(out), str(ckpt))["status"] == "ok"
    report = json.loads((out / "synthetic" / "report.json").read_text())
    key = report["run_key"]
    assert key["model_sha256"] == report["model"]["sha256"] and key["use_lipn"] is True
    assert key["lipn"]["threshold"] == 0.5 and key["encoder"] == TINY and key["mpp"] is None
    assert key["slide"] == str(synthetic_slide.resolve()) and key["roi"] is None

    assert process_slide(str(synthetic_slide), str(out), str(ckpt))["status"] == "skipped"
    row = process_slide(str(synthetic_slide), str(out), str(ckpt), use_lipn=False)
    assert row["status"] == "ok" and "made with another use_lipn" in row["note"]
    assert json.loads((out / "synthetic" / "report.json").read_text())["use_lipn"] is False
    row = process_slide(str(synthetic_slide), str(out), str(other_ckpt), use_lipn=False)
    assert row["status"] == "ok" and "model_sha256" in row["note"]
    row = process_slide(str(synthetic_slide), str(out), str(other_ckpt), use_lipn=False, mpp=0.5)
    assert row["status"] == "ok" and "mpp" in row["note"]
    assert process_slide(str(synthetic_slide), str(out), str(other_ckpt), use_lipn=False,
                         mpp=0.5)["status"] == "skipped"
    row = process_slide(str(synthetic_slide), str(out), str(other_ckpt), use_lipn=False, mpp=0.5, force=True)
    assert row["status"] == "ok" and "--force" in row["note"]


def test_batch_precheck_recomputes_other_settings(synthetic_slide, ckpt, other_ckpt, tmp_path):
    from hdmil.batch import SlideTask, expected_key

    out = tmp_path / "out"
    assert process_slide(str(synthetic_slide), str(out), str(ckpt))["status"] == "ok"
    [entry], _ = plan_slides([synthetic_slide], out)
    task = SlideTask(str(out))
    same, other = load_model(ckpt), load_model(other_ckpt)
    assert _precheck(entry, task, lambda p: expected_key(same, True, None, p))["status"] == "skipped"
    assert _precheck(entry, task, lambda p: expected_key(other, True, None, p)) is None
    assert _precheck(entry, task, lambda p: expected_key(same, False, None, p)) is None
    stale = result_state(out / "synthetic", expected_key(other, True, None, synthetic_slide))
    assert stale == ("stale", "made with another model_sha256")
    # a report from before run keys existed is not trusted
    report = json.loads((out / "synthetic" / "report.json").read_text())
    del report["run_key"]
    (out / "synthetic" / "report.json").write_text(json.dumps(report))
    assert result_state(out / "synthetic", expected_key(same, True, None, synthetic_slide))[0] == "stale"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_slide_lock(tmp_path):
    import socket

    with slide_lock(tmp_path, "x", "x.svs") as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(SlideBusyError, match=rf"x.svs: another run \(pid {os.getpid()} .*is working on it"):
            with slide_lock(tmp_path, "x", "x.svs"):
                pass
    assert not lock.exists()
    # a dead process's lock on this host is taken over; another host's is respected
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with slide_lock(tmp_path, "x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": "another-host"}))
    with pytest.raises(SlideBusyError, match="another-host"):
        with slide_lock(tmp_path, "x"):
            pass
    # an empty lock is one being written, unless it is old
    lock.write_text("")
    with pytest.raises(SlideBusyError):
        with slide_lock(tmp_path, "x"):
            pass
    os.utime(lock, (0, 0))
    with slide_lock(tmp_path, "x"):
        pass
    assert not lock.exists()


def test_a_slide_locked_by_a_live_run_is_busy_and_its_temps_are_kept(synthetic_slide, ckpt, tmp_path):
    out = tmp_path / "out"
    folder = out / "synthetic"
    folder.mkdir(parents=True)
    live = folder / f".patches.h5.{os.getppid()}.0a1b2c3d.tmp"  # a live writer (our parent)
    dead = folder / f".patches.h5.{_dead_pid()}.0a1b2c3d.tmp"
    for p in (live, dead):
        p.write_bytes(b"partial")
    (out / ".synthetic.lock").write_text(json.dumps({"pid": os.getppid(), "host": __import__("socket").gethostname()}))
    row = process_slide(str(synthetic_slide), str(out), str(ckpt))
    assert row["status"] == "busy" and "is working on it" in row["error"]
    [entry], _ = plan_slides([synthetic_slide])
    _remove_partial_writes(out, [entry])  # the lock is held: nothing removed
    assert live.exists() and dead.exists()
    (out / ".synthetic.lock").unlink()
    assert remove_dead_temps(folder) == [dead] and live.exists()
    live.unlink()
    assert process_slide(str(synthetic_slide), str(out), str(ckpt))["status"] == "ok"
    assert sorted(p.name for p in out.iterdir()) == ["synthetic"]  # the lock is gone


# --------------------------------------------------------------------------- 4. a full disk


def _full_disk_for(folder_name: str, monkeypatch) -> None:
    """Writing any HDF5 dataset into ``folder_name`` fails as on a full disk."""
    create = h5py.Group.create_dataset

    def full(group, *a, **k):
        if f"/{folder_name}/" in group.file.filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        return create(group, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", full)


def test_full_disk_fails_that_slide_and_predict_carries_on(synthetic_slide, ckpt, tmp_path, capsys, monkeypatch):
    first = tmp_path / "first.tiff"
    shutil.copy(synthetic_slide, first)
    out = tmp_path / "out"
    (out / "first").mkdir(parents=True)
    (out / "first" / "report.json").write_text("{}")  # an older result: not left beside new patches
    _full_disk_for("first", monkeypatch)
    rc = main(["predict", str(first), str(synthetic_slide), "--model", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    line = next(e for e in err.splitlines() if e.startswith("hdmil predict: error:"))
    assert "first/patches.h5" in line and "No space left on device" in line
    assert list((out / "first").iterdir()) == []  # no partial file under any name
    assert (out / "synthetic" / "report.json").is_file()
    assert "1 of 2 slides failed" in err


def test_raw_disk_error_in_predict_fails_one_slide(synthetic_slide, ckpt, tmp_path, capsys, monkeypatch):
    from hdmil.pipeline import Result

    first = tmp_path / "first.tiff"
    shutil.copy(synthetic_slide, first)
    save = Result.save

    def full(self, out_dir):
        if Path(out_dir).name == "first":
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, out_dir)

    monkeypatch.setattr(Result, "save", full)
    out = tmp_path / "out"
    rc = main(["predict", str(first), str(synthetic_slide), "--model", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and f"hdmil predict: error: {first}: No space left on device" in err
    assert (out / "synthetic" / "report.json").is_file()


def test_full_disk_fails_that_slide_in_a_batch_task(synthetic_slide, ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _full_disk_for("synthetic", monkeypatch)
    row = process_slide(str(synthetic_slide), str(out), str(ckpt))
    assert row["status"] == "failed" and "No space left on device" in row["error"]
    assert list((out / "synthetic").iterdir()) == [] and not list(out.glob(".*.lock"))
    monkeypatch.undo()
    assert process_slide(str(synthetic_slide), str(out), str(ckpt))["status"] == "ok"


def test_raw_disk_error_outside_the_writers_fails_the_slide(synthetic_slide, ckpt, tmp_path, monkeypatch):
    from hdmil.pipeline import Result

    def full(self, out_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Result, "save", full)
    row = process_slide(str(synthetic_slide), str(tmp_path / "out"), str(ckpt))
    assert row["status"] == "failed" and "No space left on device" in row["error"]
    assert str(synthetic_slide) in row["error"]


# --------------------------------------------------------------------------- through Dask


def test_batch_of_colliding_names_and_changed_settings_on_dask(synthetic_slide, ckpt, other_ckpt, tmp_path):
    """One thread-worker cluster (fast): two slides sharing a stem get two folders, one named twice
    runs once; a rerun with another model recomputes and says so; the CLI says which."""
    from distributed import Client, LocalCluster

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(synthetic_slide, tmp_path / d / "x.tiff")
    table = tmp_path / "slides.csv"
    table.write_text("path\na/x.tiff\nb/x.tiff\na/x.tiff\n")
    from hdmil.batch import list_slides

    out = tmp_path / "out"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        first = run_batch(list_slides(table), out, model_path=ckpt, client=client)
        assert first.n_ok == 2 and len(first.rows) == 2 and first.repeats == {str(tmp_path / "a" / "x.tiff"): 2}
        names = sorted(r["slide"] for r in first.rows)
        assert names[0] == "x" and names[1].startswith("x-")
        for n in names:
            key = json.loads((out / n / "report.json").read_text())["run_key"]
            assert Path(key["slide"]).parent.name == ("a" if n == "x" else "b")
        again = run_batch(list_slides(table), out, model_path=ckpt, client=client)
        assert again.n_skipped == 2
        other = run_batch(list_slides(table), out, model_path=other_ckpt, client=client)
        assert other.n_ok == 2 and all("model_sha256" in r["note"] for r in other.rows)
        assert "recomputed, replacing the results" in other.table()
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["summary.csv"])
