"""Hierarchical inference benchmark: HDMIL (LIPN + DMIN) against HDMIL† (all patches), per stage.

    python benchmarks/hierarchical.py                    # CMU + 4096², 8192², 16384² synthetic slides
    python benchmarks/hierarchical.py --sizes 4096 8192 16384 24576 --repeats 3
    python benchmarks/hierarchical.py --device cuda      # on a GPU (the paper's seconds beside ours)
    python benchmarks/hierarchical.py --quick --encoder resnet50_trunc   # a heavier encoder
    python benchmarks/hierarchical.py --no-startup       # leave out the whole-process table

Both methods run on every slide in the same process through ``hdmil.pipeline.run_slide``, with
the encoder built and warmed up once before any clock starts (start-up is not a slide's cost).
Repeats are interleaved (HDMIL†, HDMIL, HDMIL†, HDMIL, ...) and the fastest run of each counts, so
load from other processes on a shared machine shows less; the load average is printed with each
table. On a machine shared with other busy processes, torch's OpenMP threads spin-waiting for
each other make the encoder several times slower and its seconds erratic; ``OMP_WAIT_POLICY=PASSIVE
python benchmarks/hierarchical.py`` (or ``--threads 1``) gives steadier numbers (the header says
which policy ran).

Per-stage profile (seconds): ``open`` the slide file; ``tissue`` the LR read at 1.25x, tissue
mask and grid (without opening); ``lipn``; ``crop`` the reader thread's working time (it overlaps
``features``); ``wait`` the time the encoder sat waiting for patches; ``features``; ``pool`` DMIN;
``other`` what the total holds besides those (building the result, thread start); ``total`` the
slide's wall-clock; ``write`` writing report.json and patches.h5 (``Result.save``, after the
total); ``tiles`` file tiles decoded. Target (issue 21): total(HDMIL) / total(HDMIL†) <= kept
ratio + 0.05 on every synthetic slide of at least 4096². The summary also gives the ratio of
CPU seconds (all threads, the least of the repeats), which other processes' load moves less than
wall-clock seconds.

The whole-process table (``--no-startup`` leaves it out) runs ``hdmil --help``, ``hdmil info`` and
``hdmil predict`` on the first slide as separate processes (fastest of ``--startup-repeats``), with
``python -X importtime`` for the import share, and a child process that times each phase of a
``predict`` run: set-up in sequence (load model, build the encoder, warm up, then the slide), and
with the encoder built in a thread while the slide's pre-screen runs (``start_encoder``).

Model: ``--model``, else the bundled demo model, else (or with ``--quick``) a quick model trained
here on ``--encoder`` features (DMIN on two small synthetic slides, then LIPN on DMIN's masks;
cached under ``benchmarks/results/``). The synthetic slides are made once and cached there too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from _slides import CMU, RESULTS, load_line, paper_line, synthetic_slide, warm_file  # benchmarks/

CLASSES = ["normal", "tumor"]


# ------------------------------------------------------------------------------------------ model


def quick_model(encoder_name: str, seed: int = 0) -> Path:
    """Train a small HDMIL checkpoint here: DMIN on two 4096² synthetic slides (tumour, normal),
    then LIPN to reproduce DMIN's evaluation masks from the LR patches. Cached by encoder name."""
    from hdmil.checkpoint import save_checkpoint
    from hdmil.features import create_encoder
    from hdmil.features.extract import extract_slide_features
    from hdmil.grid import build_grid
    from hdmil.models import DMIN, LIPN, DMINConfig, LIPNConfig, dmin_loss, lipn_loss
    from hdmil.slide import open_slide

    path = RESULTS / f"quick-model-{encoder_name}.safetensors"
    if path.exists():
        return path
    print(f"training a quick model on {encoder_name} features (once) ...", file=sys.stderr, flush=True)
    encoder = create_encoder(encoder_name)
    bags = []
    for label, (s, tf) in enumerate([(21, 0.0), (22, 0.35)]):
        with open_slide(synthetic_slide(4096, s, tf)) as slide:
            bag = extract_slide_features(slide, build_grid(slide), encoder)
        bags.append((torch.from_numpy(bag.features), bag.lr_patches, label))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dmin = DMIN(DMINConfig(in_dim=encoder.dim, n_classes=2)).train()
    opt = torch.optim.Adam(dmin.parameters(), lr=3e-4, weight_decay=1e-5)
    for step in range(200):
        x, _, y = bags[step % 2]
        sub = torch.from_numpy(rng.permutation(len(x))[: max(8, int(0.8 * len(x)))])
        loss, _ = dmin_loss(dmin(x[sub], label=y), y, dmin.cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dmin.eval()
    lipn = LIPN(LIPNConfig(n_classes=2)).train()
    opt = torch.optim.Adam(lipn.parameters(), lr=1e-3, weight_decay=1e-5)
    targets = [(LIPN.prepare(lr), dmin.predict(x).mask.float()) for x, lr, _ in bags]
    for step in range(300):
        lr, m_hr = targets[step % 2]
        loss, _ = lipn_loss(lipn.soft_mask(lipn(lr)), m_hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lipn.eval()
    save_checkpoint(
        path, {"dmin": dmin, "lipn": lipn},
        {"classes": CLASSES, "encoder": encoder_name,
         "provenance": {"data": "benchmarks/hierarchical.py quick model (2 synthetic slides)", "seed": seed}},
    )
    return path


def model_path(arg: str | None, encoder_name: str, quick: bool = False) -> Path:
    if arg:
        return Path(arg)
    if quick:
        return quick_model(encoder_name)
    try:
        from hdmil.checkpoint import default_model_path

        p = Path(default_model_path())
        if p.is_file():
            return p
    except ImportError:
        pass
    return quick_model(encoder_name)


# ------------------------------------------------------------------------------------------ memory


class PeakRSS:
    """Samples this process's resident memory every few ms; ``peak - start`` in MB."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self.start = self.peak = _rss()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 1e6


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------ slides

PROFILE = ("open", "tissue", "lipn", "crop", "wait", "features", "pool", "other", "total", "write")


def profile(r) -> dict[str, float]:
    """A result's stage seconds in the profile's columns (see the module docstring)."""
    t = r.timings
    p = {"open": t.get("open", 0.0), "tissue": t["tissue"] - t.get("open", 0.0), "lipn": t["lipn"],
         "crop": t["crop"], "wait": t.get("crop_wait", 0.0), "features": t["features"],
         "pool": t["dmin"], "total": t["total"], "write": t.get("write", 0.0)}
    p["other"] = max(0.0, p["total"] - t["tissue"] - p["lipn"] - p["wait"] - p["features"] - p["pool"])
    return p


class Method:
    """One way of running a slide: HDMIL† or HDMIL at the checkpoint's or a given LIPN threshold."""

    def __init__(self, model, use_lipn: bool, threshold: float | None = None) -> None:
        self.model, self.use_lipn, self.threshold = model, use_lipn, threshold
        own = model.lipn.cfg.class_thresholds if model.lipn is not None else None
        thr = model.lipn.cfg.threshold if model.lipn is not None else 0.0
        if not use_lipn:
            self.name = "HDMIL†"
        elif threshold is None:
            self.name = "HDMIL (LIPN > " + ("/".join(f"{t:.2f}" for t in own) if own else f"{thr:.2f}") + ")"
        else:
            self.name = f"HDMIL (LIPN > {threshold:.2f})"
        self.best = None
        self.peak = 0.0
        self.cpu = float("inf")  # the least CPU seconds (all threads) of a run: steadier under load

    def run(self, path: Path, encoder, batch_size: int, out: Path) -> None:
        from hdmil.pipeline import run_slide

        cfg = self.model.lipn.cfg if self.model.lipn is not None else None
        saved = (cfg.threshold, cfg.class_thresholds) if cfg is not None else None
        if self.threshold is not None:
            cfg.threshold, cfg.class_thresholds = self.threshold, None
        try:
            c0 = time.process_time()
            with PeakRSS() as mem:
                r = run_slide(path, self.model, use_lipn=self.use_lipn, encoder=encoder,
                              batch_size=batch_size)
            self.cpu = min(self.cpu, time.process_time() - c0)
            t0 = time.perf_counter()
            r.save(out)
            r.timings["write"] = time.perf_counter() - t0
        finally:
            if saved is not None:
                cfg.threshold, cfg.class_thresholds = saved
        self.peak = max(self.peak, mem.mb)
        if self.best is None or r.timings["total"] < self.best.timings["total"]:
            self.best = r


def bench_slide(path: Path, model, encoder, args, tmp: Path) -> list[Method]:
    """Every method on one slide, repeats interleaved; each method keeps its fastest run."""
    warm_file(path)
    methods = [Method(model, False), Method(model, True)]
    methods += [Method(model, True, t) for t in args.lipn_thresholds]
    for rep in range(max(1, args.repeats)):
        order = methods if rep % 2 == 0 else methods[::-1]  # neither method always goes first
        for m in order:
            m.run(path, encoder, args.batch_size, tmp / "out")
    return methods


def print_profile_head() -> None:
    head = ("| slide | size | method | patches | read | kept ratio | tiles | "
            + " | ".join(PROFILE) + " | peak MB |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))


def print_profile(path: Path, size: str, m: Method) -> None:
    r, p = m.best, profile(m.best)
    tiles = r.reading.get("n_tiles_decoded", "")
    print(f"| {path.name} | {size} | {m.name} | {r.n_patches} | {r.n_read} | {r.kept_ratio:.2f} | {tiles} | "
          + " | ".join(f"{p[k]:.3f}" for k in PROFILE) + f" | {m.peak:.0f} |", flush=True)


def summary_rows(path: Path, methods: list[Method], synthetic: bool) -> list[str]:
    dag = methods[0].best
    rows = []
    for m in methods[1:]:
        hd = m.best
        ratio = hd.timings["total"] / dag.timings["total"]
        cpu = m.cpu / methods[0].cpu
        target = hd.kept_ratio + 0.05
        met = ("yes" if ratio <= target else "no") + (" (CPU: yes)" if cpu <= target else " (CPU: no)")
        met = met if synthetic else "(reported)"
        fixed = hd.timings["tissue"] + hd.timings["lipn"] + hd.timings.get("crop_wait", 0.0)
        rows.append(f"| {path.name} | {m.name} | {hd.kept_ratio:.2f} | {hd.timings['total']:.3f} | "
                    f"{dag.timings['total']:.3f} | {ratio:.2f} | {cpu:.2f} | {target:.2f} | {met} | "
                    f"{fixed / hd.timings['total']:.0%} | {hd.probabilities[-1]:.4f} / {dag.probabilities[-1]:.4f} |")
    return rows


# ------------------------------------------------------------------------------------------ start-up

# Runs in a child process: each phase of ``hdmil predict`` on one slide, timed from the child's
# first line. argv: mode ("sequential" | "overlap"), slide, checkpoint, device ("" = default), out.
PHASES = r"""
import json, sys, time
t0 = time.perf_counter(); marks = {}; last = [t0]
def mark(k):
    now = time.perf_counter(); marks[k] = now - last[0]; last[0] = now
mode, slide, ckpt, device, out = sys.argv[1:6]
device = device or None
import hdmil.cli; hdmil.cli.build_parser(); mark("cli + parser")
import torch, timm; mark("import torch + timm")
from hdmil.checkpoint import load_model
from hdmil.pipeline import encoder_for, fit_encoder, run_slide, start_encoder, warm_up
mark("import hdmil model stack")
model = load_model(ckpt, map_location=device or "cpu"); mark("load model")
if mode == "sequential":
    encoder = encoder_for(model, device); fit_encoder(model, encoder); warm_up(model, encoder)
    mark("encoder + warm-up")
    r = run_slide(slide, model, encoder=encoder); mark("first slide")
else:
    build = start_encoder(model, device)
    r = run_slide(slide, model, encoder=build); mark("encoder || first slide")
    encoder = build.result()[0]
r.save(out); mark("write")
wall = time.perf_counter() - t0
again = run_slide(slide, model, encoder=encoder)
print(json.dumps({"marks": marks, "wall": wall, "first_total": r.timings["total"],
                  "encoder_wait": r.timings.get("encoder_wait", 0.0), "warm_total": again.timings["total"],
                  "probabilities": [float(p) for p in r.probabilities]}))
"""


def _hdmil_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("hdmil")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "hdmil.cli"]


def _timed(cmd: list[str], repeats: int) -> tuple[float, subprocess.CompletedProcess]:
    best, proc = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        best = min(best, time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return best, proc


def _imports(cmd: list[str]) -> dict[str, float]:
    """``python -X importtime``: seconds of all imports, and of the heavy top-level packages."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *cmd], capture_output=True, text=True)
    total, heavy = 0.0, {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cum, name = (part for part in line.split("|"))
        if not cum.strip().isdigit():
            continue
        depth = len(name) - len(name.lstrip())
        us = int(cum.strip()) / 1e6
        if depth <= 1:
            total += us
        if name.strip() in ("torch", "timm", "torchvision", "tiffslide", "zarr", "scipy", "h5py", "skimage"):
            heavy[name.strip()] = max(heavy.get(name.strip(), 0.0), us)
    return {"total": total, **heavy}


def _torch_free(argv: list[str]) -> bool:
    code = ("import sys\nfrom hdmil.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('torch' not in sys.modules)") % (argv,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    return out.strip().endswith("True")


def startup_table(slide: Path, ckpt: Path, device: str | None, repeats: int, tmp: Path) -> None:
    """Whole-process seconds of ``hdmil`` commands and the phases of a ``predict`` run."""
    hd = _hdmil_cmd()
    print(f"\n### Whole process ({slide.name}, fastest of {repeats})\n")
    print("| command | seconds | imports (importtime) | torch imported |")
    print("|---|---|---|---|")
    dev = ["--device", device] if device else []
    for argv in (["--help"], ["info", str(slide)],
                 ["predict", str(slide), "--model", str(ckpt), "--out", str(tmp / "p"), *dev]):
        secs, _ = _timed(hd + argv, repeats)
        imp = _imports(["-m", "hdmil.cli", *argv[:1], *argv[1:]]) if argv[0] != "predict" else _imports(
            ["-m", "hdmil.cli", "predict", str(slide), "--model", str(ckpt), "--out", str(tmp / "q"), *dev])
        heavy = ", ".join(f"{k} {v:.2f}" for k, v in imp.items() if k != "total")
        print(f"| hdmil {argv[0]} | {secs:.2f} | {imp['total']:.2f} ({heavy or 'none heavy'}) | "
              f"{'no' if _torch_free(argv) else 'yes'} |", flush=True)
    runs = {}
    for _ in range(max(1, repeats)):
        for mode in ("sequential", "overlap"):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", PHASES, mode, str(slide), str(ckpt), device or "",
                                   str(tmp / f"ph-{mode}")], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-800:])
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            got["process"] = time.perf_counter() - t0
            if mode not in runs or got["process"] < runs[mode]["process"]:
                runs[mode] = got
    print(f"\n### Phases of one predict run, in a child process (fastest of {repeats})\n")
    print("| set-up | phase seconds | to first result written | process | first slide total | warm slide total |")
    print("|---|---|---|---|---|---|")
    for mode, got in runs.items():
        phases = "; ".join(f"{k} {v:.2f}" for k, v in got["marks"].items())
        print(f"| {mode} | {phases} | {got['wall']:.2f} | {got['process']:.2f} | {got['first_total']:.3f} "
              f"(encoder wait {got['encoder_wait']:.2f}) | {got['warm_total']:.3f} |")
    same = np.allclose(runs["sequential"]["probabilities"], runs["overlap"]["probabilities"], rtol=0, atol=1e-6)
    print(f"\nprobabilities sequential vs overlap equal to 1e-6: {same}; {load_line()}")


# ------------------------------------------------------------------------------------------ main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: demo model, else a quick one trained here)")
    ap.add_argument("--quick", action="store_true", help="use the quick model on --encoder features")
    ap.add_argument("--encoder", default="resnet18_trunc", help="encoder of the quick model")
    ap.add_argument("--sizes", nargs="*", type=int, default=[4096, 8192, 16384],
                    help="synthetic slide sides (one slide each, seeds 11, 12, ...)")
    ap.add_argument("--no-cmu", action="store_true", help="leave out the real CMU slide")
    ap.add_argument("--slides", nargs="*", type=Path, default=[], help="more slides to add")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", help="torch device for the encoder, e.g. cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, help="torch threads (1 is steadier on an oversubscribed machine)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved runs of each method per slide, the fastest counts (default 3)")
    ap.add_argument("--lipn-thresholds", type=float, nargs="*", default=[],
                    help="also run HDMIL with these LIPN thresholds (one for every class; the paper's 0.5)")
    ap.add_argument("--no-startup", action="store_true", help="leave out the whole-process table")
    ap.add_argument("--startup-repeats", type=int, default=2)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from hdmil.checkpoint import load_model
    from hdmil.pipeline import encoder_for, warm_up

    ckpt = model_path(args.model, args.encoder, args.quick)
    model = load_model(ckpt, map_location=args.device or "cpu")
    encoder = encoder_for(model, args.device)
    warm_up(model, encoder, patch_px=model.patch_px)
    slides = [] if args.no_cmu or not CMU.exists() else [CMU]
    synthetic = [synthetic_slide(size, 11 + i) for i, size in enumerate(args.sizes)]
    slides += synthetic + list(args.slides)

    print(f"\nmodel {ckpt.name} ({model.sha256}), encoder {encoder.name} ({encoder.dim}-d) on "
          f"{encoder.device}, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"repeats {args.repeats} interleaved, fastest counted, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset: active spin)')}")
    print(paper_line() + "\n")
    print(f"start: {load_line()}\n")
    print_profile_head()
    summary = []
    tmp = Path(tempfile.mkdtemp(prefix="hdmil-bench-"))
    try:
        for path in slides:
            from hdmil.slide import open_slide

            with open_slide(path) as slide:
                size = "x".join(str(v) for v in slide.dimensions)
            methods = bench_slide(path, model, encoder, args, tmp)
            for m in methods:
                print_profile(path, size, m)
            summary += summary_rows(path, methods, path in synthetic)
        print(f"\n{load_line()}\n")
        print("| slide | method | kept ratio | HDMIL s | HDMIL† s | HDMIL / HDMIL† | CPU s ratio | target "
              "(kept + 0.05) | met | fixed share (tissue+LIPN+wait) | P(last class) HDMIL / HDMIL† |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(summary))
        t = [v for v in (16.75, 23.46)]
        print(f"| paper, Camelyon16 (GPU) | HDMIL | | {t[0]:.2f} | {t[1]:.2f} | {t[0] / t[1]:.2f} | | | | | |")
        if not args.no_startup:
            startup_table(slides[0], ckpt, args.device, args.startup_repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
