"""How an encoder runs on this machine: device, dtype, backend, patches per forward pass, threads.

``configure(encoder)`` picks, on the CPU, the fastest way to run the encoder among those that
keep its features where they should be, and says why (``Compute.why``); the CLI's ``features``
and ``predict`` call it, print the choice with ``--verbose`` and record it (report.json's
``compute`` block, the feature file's ``compute`` attribute). The library's ``create_encoder``
alone stays exact fp32 torch.

Candidates, measured in ``benchmarks/features.py`` on a 2-core Xeon with AMX (2026-12):

* torch fp32 (always; the exact reference).
* ONNX Runtime fp32 (``pip install napari-hdmil[cpu-fast]``): the encoder exported once per
  process (< 1 s); features within ``FEATURE_RTOL`` (1e-4) of torch's or it is not used. Measured
  1.5x torch for resnet50_trunc and 2.4x for the demo encoder, features 2e-7 apart.
* torch bf16 autocast, only where the CPU has native bf16 (``amx_bf16`` / ``avx512_bf16``) and
  the features move less than ``BF16_FEATURE_TOL`` on the probe. The stated tolerance is
  ``BF16_PROB_TOL`` (0.005) on HDMIL's probabilities; on the bundled demo model bf16 moved them
  by up to 0.015 (CMU slide, HDMIL; attention up to 1% of its maximum, top-8 unchanged) with
  features 1.4-3.4e-2 apart on tissue, 4-7e-3 on the noise probe. So the rule asks the probe's
  error to be under 1e-3, which neither encoder here meets: bf16 runs only when asked
  (``--dtype bfloat16``), where it was 2.5x for resnet50_trunc.

The choice is measured once per machine, encoder and library versions (a 16-patch probe, each
candidate timed three times for at least 0.25 s, interleaved, the fastest time counted; another
backend must beat torch fp32 by ``MIN_GAIN``) and kept in ``<cache>/compute.json``
(``$HDMIL_CACHE``, else ``~/.cache/napari-hdmil``) with the ONNX export beside it, so a later
start reads both back (0.1-0.6 s). ``HDMIL_COMPUTE=exact`` makes the automatic choice exact torch
fp32 without measuring (tests, comparisons). Patches per forward pass on the CPU: ``CPU_FORWARD_BATCH`` (16), see
``forward_batch``. GPU: torch, the encoder's own dtype, the reader's batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdmil.allocator import CPU_FORWARD_BATCH
from hdmil.errors import HDMILError

__all__ = [
    "BF16_FEATURE_TOL", "BF16_PROB_TOL", "CPU_FORWARD_BATCH", "FEATURE_RTOL", "Compute",
    "OrtRuntime", "apply_compute", "choose_compute", "compute_of", "configure", "cpu_bf16", "feature_error",
    "forward_batch", "onnxruntime_available",
]

FEATURE_RTOL = 1e-4  # another backend's features against torch fp32's (relative L2, worst patch)
BF16_PROB_TOL = 5e-3  # the stated tolerance on HDMIL's probabilities for bf16
BF16_FEATURE_TOL = 1e-3  # bf16 features against fp32 on the probe: derived above from BF16_PROB_TOL
MIN_GAIN = 1.1  # leave exact torch fp32 only for at least this much speed
PROBE_PATCHES = 16
PROBE_ROUNDS = 3  # each candidate timed this many times, interleaved; the fastest counts
MAX_CACHED = 32  # measurements and ONNX exports kept in the cache (the oldest go first)
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "torch", "onnxruntime")


@dataclass
class Compute:
    """How an encoder runs; ``why`` says why, ``measured`` the probe's patches/s per candidate."""

    device: str
    dtype: str = "float32"
    backend: str = "torch"
    batch_size: int | None = None  # patches per forward pass; None: each batch as read
    threads: int = 1
    why: str = ""
    measured: dict[str, float] = field(default_factory=dict)

    def to_report(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        per = f"{self.batch_size} patches per pass" if self.batch_size else "the reader's batches"
        return (f"compute: {self.backend} {self.dtype} on {self.device}, {per}, "
                f"{self.threads} threads ({self.why})")


def forward_batch(device: Any) -> int | None:
    """Patches per forward pass on ``device`` (``hdmil.allocator.forward_batch``)."""
    from hdmil import allocator

    return allocator.forward_batch(torch.device(device).type)


def cpu_bf16() -> str | None:
    """The CPU flag that gives native bf16 (``amx_bf16``, ``avx512_bf16``), or None."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def feature_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 distance of ``got`` [B, D] from ``ref``, worst patch."""
    num = (got.float() - ref.float()).norm(dim=1)
    return float((num / ref.float().norm(dim=1).clamp_min(1e-12)).max())


def onnx_model(model: torch.nn.Module, input_size: int) -> bytes:
    """``model`` exported to ONNX (dynamic batch), cached under ``<cache>/onnx/`` by a hash of its
    weights and the versions: an export takes 1-8 s for resnet50_trunc, reading it back 0.1 s."""
    import onnxruntime

    h = hashlib.sha256(f"{torch.__version__} {onnxruntime.__version__} {input_size} {type(model)}".encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    path = _cache_path().parent / "onnx" / f"{h.hexdigest()[:32]}.onnx"
    with contextlib.suppress(OSError):
        return path.read_bytes()
    buf = io.BytesIO()
    dummy = torch.zeros(2, 3, input_size, input_size)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17)
    data = buf.getvalue()
    with contextlib.suppress(Exception):  # no cache: export again next time
        from hdmil.files import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb", encoding=None) as f:
            f.write(data)
        for old in sorted(path.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime)[:-MAX_CACHED]:
            old.unlink()
    return data


class OrtRuntime:
    """The encoder's model exported to ONNX and run by ONNX Runtime on the CPU:
    normalised float ``[B, 3, S, S]`` → ``[B, D]`` (a drop-in for ``Encoder.model``)."""

    def __init__(self, model: torch.nn.Module, input_size: int, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # the reader's decoding threads share the cores: no busy waiting between ops
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_model(model, input_size), opts,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.session.run(None, {"x": x.detach().float().contiguous().cpu().numpy()})[0]
        return torch.from_numpy(y)


def _inner(encoder: Any) -> Any:
    """The ``Encoder`` inside a wrapper (``StainedEncoder``)."""
    while hasattr(encoder, "__dict__") and "encoder" in encoder.__dict__:
        encoder = encoder.__dict__["encoder"]
    return encoder


def apply_compute(encoder: Any, compute: Compute, runtime: Any = None) -> Any:
    """Make ``encoder`` run as ``compute`` says (``runtime``: the built ONNX runtime, if any)."""
    enc = _inner(encoder)
    if compute.backend == "onnxruntime" and runtime is None:
        runtime = OrtRuntime(enc.model, enc.input_size, compute.threads)
    enc.runtime = runtime if compute.backend == "onnxruntime" else None
    if enc.device.type == "cpu":
        enc.autocast_dtype = None if compute.dtype == "float32" else getattr(torch, compute.dtype)
    enc.max_batch = compute.batch_size
    enc.compute = compute
    return encoder


def compute_of(encoder: Any) -> Compute:
    """How ``encoder`` runs now: its ``configure`` choice, else what it was built with."""
    enc = _inner(encoder)
    if getattr(enc, "compute", None) is not None:
        return enc.compute
    dtype = str(enc.autocast_dtype).replace("torch.", "") if enc.autocast_dtype is not None else "float32"
    backend = "torch" if getattr(enc, "runtime", None) is None else "custom"
    return Compute(str(enc.device), dtype, backend, getattr(enc, "max_batch", None), torch.get_num_threads(),
                   "as built: the library's default (hdmil.compute.configure chooses per machine)")


def configure(encoder: Any, dtype: str = "auto", backend: str = "auto", use_cache: bool = True) -> Compute:
    """Choose how ``encoder`` runs here (``choose_compute``) and make it run so."""
    compute, runtime = choose_compute(encoder, dtype, backend, use_cache)
    apply_compute(encoder, compute, runtime)
    return compute


def _check(dtype: str, backend: str) -> None:
    if dtype not in DTYPES:
        raise HDMILError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if backend not in BACKENDS:
        raise HDMILError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "onnxruntime" and not onnxruntime_available():
        raise HDMILError("backend onnxruntime asked for, but onnxruntime / onnx are not installed "
                         "(pip install 'napari-hdmil[cpu-fast]')")


def choose_compute(encoder: Any, dtype: str = "auto", backend: str = "auto",
                   use_cache: bool = True) -> tuple[Compute, Any]:
    """The ``Compute`` for ``encoder`` here, and the ONNX runtime it needs (or None).

    dtype: ``auto`` | ``float32`` | ``bfloat16``; backend: ``auto`` | ``torch`` | ``onnxruntime``.
    ``auto`` measures the candidates (module docstring) once and caches the outcome;
    ``HDMIL_COMPUTE=exact`` in the environment makes auto/auto exact torch fp32 (no probe).
    """
    if os.environ.get("HDMIL_COMPUTE", "").lower() == "exact" and dtype == "auto" and backend == "auto":
        dtype, backend = "float32", "torch"  # tests and comparisons: exact torch fp32, no probe
    _check(dtype, backend)
    enc = _inner(encoder)
    threads = torch.get_num_threads()
    if enc.device.type != "cpu":
        own = enc.autocast_dtype if dtype == "auto" else getattr(torch, dtype)
        name = str(own).replace("torch.", "") if own is not None else "float32"
        return Compute(str(enc.device), name, "torch", None, threads,
                       "GPU: torch, the encoder's dtype, the reader's batches"), None
    base = Compute("cpu", "float32", "torch", forward_batch("cpu"), threads)
    cands, notes = _candidates(dtype, backend)
    if len(cands) == 1:
        base.dtype, base.backend = cands[0]
        base.why = "; ".join(notes + ["only candidate"])
        return base, None
    return _measured_choice(enc, base, cands, notes, use_cache)


def _candidates(dtype: str, backend: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(dtype, backend) pairs worth measuring, and why the others are not."""
    notes: list[str] = []
    cands = [("float32", "torch")]
    if backend == "onnxruntime":
        cands = []
    if backend in ("auto", "onnxruntime") and dtype in ("auto", "float32"):
        if onnxruntime_available():
            cands.append(("float32", "onnxruntime"))
        else:
            notes.append("onnxruntime not installed")
    if dtype == "bfloat16":
        flag = cpu_bf16()
        cands = [("bfloat16", "torch")]
        notes.append(f"bf16 asked for ({flag or 'this CPU has no native bf16: emulated, slow'})")
    elif dtype == "float16":
        cands = [("float16", "torch")]
        notes.append("fp16 asked for")
    elif dtype == "auto" and backend != "onnxruntime":
        if cpu_bf16():
            cands.append(("bfloat16", "torch"))
        else:
            notes.append("no native bf16 on this CPU")
    return cands, notes


def _cache_path() -> Path:
    from hdmil.synth.slide import cache_dir

    return cache_dir() / "compute.json"


def _cache_key(enc: Any, cands: list[tuple[str, str]], threads: int) -> str:
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    from hdmil.features.recipe import recipe_of

    parts = {"encoder": recipe_of(enc).to_dict(), "input": enc.input_size, "cpu": _cpu_name(),
             "torch": torch.__version__, "ort": ort_version, "threads": threads, "cands": cands,
             "rules": [2, FEATURE_RTOL, BF16_FEATURE_TOL, MIN_GAIN, PROBE_PATCHES, PROBE_ROUNDS, CPU_FORWARD_BATCH]}
    return json.dumps(parts, sort_keys=True, default=str)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    from hdmil.files import write_json_atomic

    data = _read_cache()
    data.pop(key, None)
    data[key] = entry  # newest last; the oldest beyond MAX_CACHED are dropped
    data = dict(list(data.items())[-MAX_CACHED:])
    with contextlib.suppress(Exception):  # a read-only cache only costs the next start a probe
        _cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(_cache_path(), data)


def _measured_choice(enc: Any, base: Compute, cands: list[tuple[str, str]], notes: list[str],
                     use_cache: bool) -> tuple[Compute, Any]:
    key = _cache_key(enc, cands, base.threads)
    entry = _read_cache().get(key) if use_cache else None
    runtime, cached = None, bool(entry)
    if not entry:
        entry, runtime = _probe(enc, cands, base.threads)
        if use_cache:
            _write_cache(key, entry)
    base.dtype, base.backend = entry["dtype"], entry["backend"]
    base.measured = dict(entry.get("measured", {}))
    base.why = "; ".join(notes + [entry["why"] + (" (measured earlier, cached)" if cached else "")])
    if base.backend == "onnxruntime" and runtime is None:
        try:
            runtime = OrtRuntime(enc.model, enc.input_size, base.threads)
        except Exception as exc:  # noqa: BLE001 - an exporter failure falls back to exact torch
            base.dtype, base.backend, base.why = "float32", "torch", f"ONNX export failed ({_first_line(exc)})"
    return base, runtime


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _probe_patches(size: int) -> np.ndarray:
    """Seeded uint8 patches, ``[PROBE_PATCHES, size, size, 3]``: coarse colour fields plus grain."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(60, 230, (PROBE_PATCHES, size // 16 + 1, size // 16 + 1, 3))
    big = coarse.repeat(16, axis=1).repeat(16, axis=2)[:, :size, :size]
    grain = rng.integers(-25, 26, big.shape)
    return np.clip(big + grain, 0, 255).astype(np.uint8)


def _probe(enc: Any, cands: list[tuple[str, str]], threads: int) -> tuple[dict[str, Any], Any]:
    """Time every candidate on the probe (twice, interleaved; the faster run counts), check its
    features against torch fp32, and pick the fastest that passes."""
    x = _probe_patches(enc.input_size)
    saved = (getattr(enc, "runtime", None), enc.autocast_dtype, getattr(enc, "max_batch", None))
    enc.max_batch = None
    runners, runtime, why_not = {}, None, []
    for dtype, backend in cands:
        try:
            if backend == "onnxruntime":
                runtime = OrtRuntime(enc.model, enc.input_size, threads)
            runners[dtype, backend] = _runner(enc, dtype, runtime if backend == "onnxruntime" else None)
        except Exception as exc:  # noqa: BLE001
            why_not.append(f"{backend} {dtype} failed ({_first_line(exc)})")
    try:
        outs = {k: run(x) for k, run in runners.items()}  # warm up
        ref = outs.get(("float32", "torch"))
        if ref is None:
            ref = _runner(enc, "float32", None)(x)
        best = {k: float("inf") for k in runners}
        for _ in range(PROBE_ROUNDS):
            for k, run in runners.items():
                best[k] = min(best[k], _seconds_per_run(run, x))
    finally:
        enc.runtime, enc.autocast_dtype, enc.max_batch = saved
    rates = {f"{b} {d}": round(len(x) / best[d, b], 2) for (d, b) in runners}
    errors = {k: feature_error(v, ref) for k, v in outs.items()}
    return _pick(rates, errors, why_not), runtime


def _seconds_per_run(run: Any, x: np.ndarray, at_least: float = 0.25) -> float:
    """Seconds of one ``run(x)``, averaged over as many runs as fill ``at_least`` seconds (a small
    encoder's 16 patches take milliseconds, too short to time once on a loaded machine)."""
    n, t0 = 0, time.perf_counter()
    while True:
        run(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= at_least:
            return dt / n


def _runner(enc: Any, dtype: str, runtime: Any):
    def run(x: np.ndarray) -> torch.Tensor:
        enc.runtime = runtime
        enc.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        return enc.embed(x)

    return run


def _pick(rates: dict[str, float], errors: dict[tuple[str, str], float], why_not: list[str]) -> dict[str, Any]:
    """The fastest candidate within its tolerance; torch fp32 unless another gains ``MIN_GAIN``."""
    ok, reasons = [], list(why_not)
    for (dtype, backend), err in errors.items():
        tol = BF16_FEATURE_TOL if dtype == "bfloat16" else FEATURE_RTOL
        if backend == "torch" and dtype == "float32":
            ok.append((dtype, backend))
        elif err <= tol:
            ok.append((dtype, backend))
        else:
            reasons.append(f"{backend} {dtype} features {err:.1e} from fp32 (over {tol:.0e})")
    exact = rates.get("torch float32")
    best = max(ok, key=lambda k: rates[f"{k[1]} {k[0]}"])
    if exact is not None and best != ("float32", "torch") and rates[f"{best[1]} {best[0]}"] < MIN_GAIN * exact:
        reasons.append(f"{best[1]} {best[0]} under {MIN_GAIN}x torch")
        best = ("float32", "torch")
    speed = ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
    err = errors.get(best, 0.0)
    why = f"fastest on the probe, patches/s: {speed}; features {err:.1e} from torch fp32"
    return {"dtype": best[0], "backend": best[1], "measured": rates,
            "why": "; ".join(reasons + [why])}
