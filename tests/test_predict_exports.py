"""`hdmil predict --geojson PATH --csv PATH`: the files the widget's Export buttons write, from the
same ``hdmil.export`` layout; ``{slide}`` names one file per slide."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hdmil.cli import main
from hdmil.export import write_result_csv, write_result_geojson
from test_cli_predict import _checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("cli_exports") / "tiny.safetensors")


def test_predict_writes_the_results_geojson_and_csv(synthetic_slide, ckpt, tmp_path, capsys):
    from hdmil.checkpoint import load_model
    from hdmil.pipeline import encoder_for, run_slide

    out, gj, cs = tmp_path / "out", tmp_path / "x" / "s.geojson", tmp_path / "x" / "s.csv"
    rc = main(["predict", str(synthetic_slide), "--model", str(ckpt), "--out", str(out),
               "--geojson", str(gj), "--csv", str(cs)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    model = load_model(ckpt)
    result = run_slide(synthetic_slide, model, encoder=encoder_for(model, None))
    report = json.loads((out / synthetic_slide.stem / "report.json").read_text())
    np.testing.assert_allclose(report["probabilities"], result.probabilities, atol=1e-6)  # the same run
    assert gj.read_bytes() == write_result_geojson(tmp_path / "ref.geojson", result).read_bytes()
    assert cs.read_bytes() == write_result_csv(tmp_path / "ref.csv", result).read_bytes()
    tops = [f for f in json.loads(gj.read_text())["features"] if f["properties"].get("name", "").startswith("Top")]
    assert len(tops) == sum(min(8, np.isfinite(result.attention[:, c]).sum()) for c in range(2))


def test_several_slides_need_slide_in_the_path(synthetic_slide, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    twin = tmp_path / "b" / synthetic_slide.name  # another file with the same stem
    twin.parent.mkdir()
    twin.write_bytes(synthetic_slide.read_bytes())
    two = [str(synthetic_slide), str(twin)]
    rc = main(["predict", *two, "--model", str(ckpt), "--out", str(out), "--csv", str(tmp_path / "all.csv")])
    err = capsys.readouterr().err
    assert rc == 1 and "{slide}" in err and "2 slides" in err and not out.exists()
    rc = main(["predict", *two, "--model", str(ckpt), "--out", str(out), "--csv", str(tmp_path / "{slide}.csv")])
    assert rc == 0, capsys.readouterr().err
    stem = synthetic_slide.stem
    [twin_csv] = tmp_path.glob(f"{stem}-*.csv")  # its folder: the stem and a hash of its path
    assert (tmp_path / f"{stem}.csv").read_text() == twin_csv.read_text()  # one per report folder
    rc = main(["predict", str(synthetic_slide), "--model", str(ckpt), "--out", str(out), "--prescreen-only",
               "--geojson", str(tmp_path / "p.geojson")])  # fmt: skip
    assert rc == 1 and "--prescreen-only" in capsys.readouterr().err and not (tmp_path / "p.geojson").exists()
