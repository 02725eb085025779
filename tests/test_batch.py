"""Cohort batches on a real Dask LocalCluster: good slides complete, bad ones are recorded, a killed
worker loses nothing, a re-run does no work."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from hdmil.batch import list_slides, run_batch
from hdmil.checkpoint import save_checkpoint
from hdmil.models import DMIN, LIPN, DMINConfig, LIPNConfig

pytestmark = pytest.mark.slow

# A registered encoder, so that worker processes can build it from the checkpoint's config.
ENCODER = "resnet18_trunc"
ENCODER_DIM = 256


@pytest.fixture(scope="module")
def batch_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    dmin = DMIN(DMINConfig(in_dim=ENCODER_DIM, hidden=32, attn_dim=16, n_classes=2, cheby_degree=3)).eval()
    lipn = LIPN(LIPNConfig(n_classes=2)).eval()
    with torch.no_grad():  # LIPN keeps every patch for class 0 and none for class 1: a known kept set
        lipn.fc.bias.copy_(torch.tensor([20.0, -20.0]))
    path = tmp_path_factory.mktemp("model") / "batch.safetensors"
    return save_checkpoint(path, {"dmin": dmin, "lipn": lipn},
                           {"classes": ["normal", "tumor"], "encoder": ENCODER})


@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory, broken_slide) -> tuple[Path, list[str], list[str]]:
    from hdmil.synth import synth_slide

    folder = tmp_path_factory.mktemp("slides")
    good = []
    for seed in range(4):
        path = folder / f"good{seed}.tiff"
        synth_slide(path, size=(1536, 1536), seed=seed, tumor_fraction=0.3 if seed % 2 else 0.0)
        good.append(path.stem)
    shutil.copy(broken_slide, folder / "broken.svs")
    data = (folder / "good0.tiff").read_bytes()
    (folder / "truncated.tiff").write_bytes(data[: len(data) // 3])
    return folder, good, ["broken", "truncated"]


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len({r["slide"] for r in rows}), "a slide appears twice in the summary"
    return {r["slide"]: r for r in rows}


def _assert_complete(out: Path, good: list[str]) -> None:
    for name in good:
        d = out / name
        assert sorted(p.name for p in d.iterdir()) == ["patches.h5", "report.json"], d
        report = json.loads((d / "report.json").read_text())
        assert report["slide"] == name and report["prediction"] in ("normal", "tumor")


def test_list_slides_folder_and_csv(slide_folder, tmp_path):
    folder, good, bad = slide_folder
    assert [p.stem for p in list_slides(folder)] == sorted(good + bad)
    table = tmp_path / "slides.csv"
    table.write_text("case,path\nA," + str(folder / "good1.tiff") + "\nB," + str(folder / "broken.svs") + "\n")
    assert [p.name for p in list_slides(table)] == ["good1.tiff", "broken.svs"]


def test_batch_good_and_bad_slides_then_resume(slide_folder, batch_model, tmp_path):
    folder, good, bad = slide_folder
    out = tmp_path / "out"
    summary = run_batch(list_slides(folder), out, model_path=batch_model, workers=2)
    rows = _summary(out)
    assert set(rows) == set(good + bad)
    for name in good:
        assert rows[name]["status"] == "ok", rows[name]
        assert float(rows[name]["seconds_total"]) > 0
    for name in bad:
        assert rows[name]["status"] == "failed"
        assert name in rows[name]["error"]  # the error names the file
        assert not (out / name / "report.json").exists()
    assert summary.n_ok == len(good) and summary.n_failed == len(bad)
    _assert_complete(out, good)
    table = summary.table()
    assert "failed 2" in table and "slides/hour" in table

    # The CLI's exit status says some failed; a re-run skips every complete slide.
    mtimes = {n: (out / n / "report.json").stat().st_mtime_ns for n in good}
    from hdmil.cli import main

    code = main(["batch", str(folder), "--model", str(batch_model), "--out", str(out), "--workers", "1"])
    assert code == 1
    rows = _summary(out)
    assert all(rows[n]["status"] == "skipped" for n in good)
    assert {n: (out / n / "report.json").stat().st_mtime_ns for n in good} == mtimes


def test_killed_worker_loses_nothing(slide_folder, batch_model, tmp_path):
    from distributed import Client, LocalCluster

    folder, good, _ = slide_folder
    slides = [folder / f"{n}.tiff" for n in good]
    out = tmp_path / "out"
    killed = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:

        def kill_one_worker(row, done, total):
            if not killed:  # after the first slide finishes, another is in flight: kill its worker
                pids = client.run(os.getpid)
                pid = sorted(pids.values())[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        summary = run_batch(slides, out, model_path=batch_model, client=client, on_result=kill_one_worker)
    assert killed
    # A task on the killed worker is run again; if that worker had already written the slide's
    # results, the rerun finds them complete and reports "skipped" instead of writing them twice.
    assert summary.n_failed == 0
    assert sorted(r["slide"] for r in summary.rows if r["status"] in ("ok", "skipped")) == sorted(good)
    _assert_complete(out, good)
    assert not list(out.rglob("*.tmp*")) and not list(out.rglob(".*tmp*"))

    # A re-run does no work: every slide is skipped before any task is submitted; it clears what a
    # worker killed mid-write left behind (the killing above leaves such a file only sometimes).
    stale = out / good[0] / ".report.json.abc123.tmp"
    stale.write_text("{")
    again = run_batch(slides, out, model_path=batch_model, workers=1)
    assert again.n_skipped == len(good) and again.n_ok == 0
    assert not stale.exists()
    _assert_complete(out, good)


def test_features_on_dask_workers(slide_folder, tmp_path, capsys):
    from hdmil.cli import main
    from hdmil.features import read_features

    folder, good, _ = slide_folder
    slides = [str(folder / f"{n}.tiff") for n in good[:2]] + [str(folder / "broken.svs")]
    out = tmp_path / "features"
    code = main(["features", *slides, "--encoder", ENCODER, "--out", str(out), "--workers", "2",
                 "--batch-size", "16"])
    err = capsys.readouterr().err
    assert code == 1 and "broken.svs" in err  # the bad slide is named, the others are written
    for name in good[:2]:
        bag = read_features(out / f"{name}.h5")
        assert bag.features.shape[1] == ENCODER_DIM and len(bag.coords) == len(bag.features) > 0
