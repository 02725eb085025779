"""hdmil.compute: how an encoder runs on the CPU (backend, dtype, patches per pass) and why."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hdmil import compute as C
from hdmil.errors import HDMILError
from hdmil.features import create_encoder


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HDMIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HDMIL_COMPUTE", raising=False)  # conftest sets exact for the other tests


@pytest.fixture(scope="module")
def tiny():
    from helpers import TINY

    return create_encoder(TINY, device="cpu")


def _patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)


def test_forward_passes_are_cut_to_max_batch(tiny, monkeypatch):
    seen: list[int] = []
    forward = tiny.model.forward
    monkeypatch.setattr(tiny.model, "forward", lambda x: seen.append(len(x)) or forward(x))
    x = _patches(37)
    tiny.max_batch = None
    whole = tiny.embed(x)
    tiny.max_batch = 16
    cut = tiny.embed(x)
    assert seen == [37, 16, 16, 5]
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-6)


def test_cpu_encoders_run_at_most_the_forward_batch_at_once():
    from helpers import TINY

    from hdmil import allocator

    enc = create_encoder(TINY, device="cpu")
    want = allocator.CPU_FORWARD_BATCH if allocator.keep_freed_memory() else None
    assert enc.max_batch == want


def test_exact_torch_when_asked_changes_nothing(tiny):
    x = _patches(4)
    before = tiny.embed(x)
    comp = C.configure(tiny, dtype="float32", backend="torch")
    assert (comp.backend, comp.dtype, comp.device) == ("torch", "float32", "cpu")
    assert "only candidate" in comp.why and comp.measured == {}
    assert torch.equal(tiny.embed(x), before)
    report = C.compute_of(tiny).to_report()
    assert set(report) >= {"device", "dtype", "backend", "batch_size", "threads", "why"}
    json.dumps(report)  # report.json and the feature file's attribute take it as it is


def test_onnxruntime_absent_is_refused_in_one_line(tiny, monkeypatch):
    monkeypatch.setattr(C, "onnxruntime_available", lambda: False)
    with pytest.raises(HDMILError, match="cpu-fast"):
        C.choose_compute(tiny, backend="onnxruntime")
    cands, notes = C._candidates("auto", "auto")
    assert ("float32", "onnxruntime") not in cands and "onnxruntime not installed" in notes


def test_no_bf16_candidate_without_native_bf16(monkeypatch):
    monkeypatch.setattr(C, "cpu_bf16", lambda: None)
    cands, notes = C._candidates("auto", "torch")
    assert cands == [("float32", "torch")] and "no native bf16 on this CPU" in notes
    monkeypatch.setattr(C, "cpu_bf16", lambda: "amx_bf16")
    assert ("bfloat16", "torch") in C._candidates("auto", "torch")[0]


@pytest.mark.parametrize(
    "rates, errors, want",
    [
        # a backend within 1e-4 of torch and faster by more than MIN_GAIN wins
        ({"torch float32": 10.0, "onnxruntime float32": 15.0}, {("float32", "onnxruntime"): 1e-7}, "onnxruntime"),
        # features too far from torch's: refused however fast
        ({"torch float32": 10.0, "onnxruntime float32": 50.0}, {("float32", "onnxruntime"): 1e-3}, "torch"),
        # not faster enough to leave exact torch
        ({"torch float32": 10.0, "onnxruntime float32": 10.5}, {("float32", "onnxruntime"): 1e-7}, "torch"),
    ],
)
def test_pick_takes_the_fastest_within_tolerance(rates, errors, want):
    errors = {("float32", "torch"): 0.0, **errors}
    assert C._pick(rates, errors, [])["backend"] == want


def test_pick_refuses_bf16_that_moves_features_past_its_tolerance():
    rates = {"torch float32": 10.0, "torch bfloat16": 30.0}
    over = {("float32", "torch"): 0.0, ("bfloat16", "torch"): 10 * C.BF16_FEATURE_TOL}
    under = {("float32", "torch"): 0.0, ("bfloat16", "torch"): C.BF16_FEATURE_TOL / 2}
    assert C._pick(rates, over, [])["dtype"] == "float32"
    assert "over" in C._pick(rates, over, [])["why"]
    assert C._pick(rates, under, [])["dtype"] == "bfloat16"


def test_the_measurement_is_made_once_and_cached(tiny, monkeypatch):
    calls = []

    def probe(enc, cands, threads):
        calls.append(cands)
        return {"dtype": "float32", "backend": "torch", "measured": {"torch float32": 1.0}, "why": "probe"}, None

    monkeypatch.setattr(C, "_probe", probe)
    monkeypatch.setattr(C, "cpu_bf16", lambda: "amx_bf16")  # two torch candidates: a measurement
    first = C.configure(tiny, backend="torch")
    second = C.configure(tiny, backend="torch")
    assert len(calls) == 1 and "cached" in second.why and "cached" not in first.why
    assert (C._cache_path()).is_file()


onnx_needed = pytest.mark.skipif(not C.onnxruntime_available(), reason="onnxruntime / onnx not installed")


@onnx_needed
@pytest.mark.parametrize("which", ["resnet18_trunc", "demo"])
def test_onnxruntime_features_within_1e4_of_torch(which):
    from hdmil.checkpoint import default_model_path

    name = default_model_path().parent / "hdmil-demo-encoder.safetensors" if which == "demo" else which
    enc = create_encoder(name, device="cpu")
    x = _patches(5, seed=1)
    ref = enc.embed(x)
    comp = C.Compute("cpu", "float32", "onnxruntime", 2, torch.get_num_threads())
    C.apply_compute(enc, comp)
    assert enc.runtime is not None
    got = enc.embed(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert C.feature_error(got, ref) <= C.FEATURE_RTOL
    # the export is kept: a second runtime reads it back instead of exporting again
    assert list((C._cache_path().parent / "onnx").glob("*.onnx"))


@onnx_needed
def test_auto_measures_and_records_why():
    from helpers import TINY

    enc, ref = create_encoder(TINY, device="cpu"), create_encoder(TINY, device="cpu")
    comp = C.configure(enc, dtype="float32")  # torch fp32 against onnxruntime fp32
    assert set(comp.measured) == {"torch float32", "onnxruntime float32"}
    assert comp.backend in ("torch", "onnxruntime") and "patches/s" in comp.why
    assert C.compute_of(enc) is comp
    x = _patches(3)
    assert C.feature_error(enc.embed(x), ref.embed(x)) <= C.FEATURE_RTOL


def test_cli_says_and_records_how_the_encoder_ran(tmp_path, cmu_slide, capsys):
    from helpers import TINY

    from hdmil.cli import main
    from hdmil.features import read_features

    out = tmp_path / "feats"
    rc = main(["features", str(cmu_slide), "--encoder", TINY, "--out", str(out), "--device", "cpu",
               "--backend", "torch", "--dtype", "float32", "-v"])
    err = capsys.readouterr().err
    assert rc == 0 and "compute: torch float32 on cpu" in err
    recorded = read_features(out / "CMU-1-Small-Region.h5").attrs["compute"]
    recorded = json.loads(recorded) if isinstance(recorded, str) else recorded
    assert (recorded["backend"], recorded["dtype"], recorded["device"]) == ("torch", "float32", "cpu")

    rc = main(["predict", str(cmu_slide), "--out", str(tmp_path / "res"), "--device", "cpu",
               "--backend", "torch", "--dtype", "float32", "--verbose"])
    err = capsys.readouterr().err
    assert rc == 0 and "compute: torch float32 on cpu" in err
    report = json.loads((tmp_path / "res" / "CMU-1-Small-Region" / "report.json").read_text())
    assert report["compute"]["backend"] == "torch" and report["compute"]["why"]


def test_hdmil_compute_exact_skips_the_measurement(tiny, monkeypatch):
    monkeypatch.setenv("HDMIL_COMPUTE", "exact")
    monkeypatch.setattr(C, "_probe", lambda *a: pytest.fail("measured although HDMIL_COMPUTE=exact"))
    comp = C.configure(tiny)
    assert (comp.backend, comp.dtype) == ("torch", "float32") and tiny.runtime is None
