"""Hierarchical inference benchmark: HDMIL (LIPN + DMIN) against HDMIL† (all patches), per stage.

    python benchmarks/hierarchical.py                           # CMU + three 20480² synthetic slides
    python benchmarks/hierarchical.py --model out/demo-model/hdmil.safetensors
    python benchmarks/hierarchical.py --sizes 8192 8192         # quicker: smaller synthetic slides

Both methods run on every slide in the same process, one after the other, through
``hdmil.pipeline.run_slide``. The table has the shape of the paper's Table 2: seconds per stage
(tissue, LIPN, crop, features, DMIN, total), plus the kept ratio and the peak resident memory
above the process's baseline while the slide ran. Targets (issue 4): total(HDMIL) / total(HDMIL†)
<= kept ratio + 0.05; LIPN <= 2% of HDMIL's total; peak memory that does not grow with slide size.

``crop`` is the reader thread's working time and overlaps ``features`` (see hdmil.pipeline), so
the stages add up to more than ``total``; ``total`` is wall-clock. Each method runs
``--repeats`` times per slide and the fastest run counts (peak memory: the largest); HDMIL runs
at the checkpoint's LIPN thresholds (per class where calibrated so) and at each of ``--lipn-thresholds`` (one threshold for every class; the paper's 0.5).

Model: ``--model``, else the bundled demo model when it exists, else a quick model trained here
(DMIN on two small synthetic slides' features, then LIPN on DMIN's masks; cached under
``benchmarks/results/``). The synthetic slides are made once and cached there too (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from _slides import CMU, RESULTS, synthetic_slide  # beside this script (benchmarks/)
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


def model_path(arg: str | None, encoder_name: str) -> Path:
    if arg:
        return Path(arg)
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


# ------------------------------------------------------------------------------------------ run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: demo model, else a quick one trained here)")
    ap.add_argument("--encoder", default="resnet18_trunc", help="encoder of the quick model")
    ap.add_argument("--sizes", nargs="*", type=int, default=[20480, 20480, 20480],
                    help="synthetic slide sides (one slide each, seeds 11, 12, ...)")
    ap.add_argument("--no-cmu", action="store_true", help="leave out the real CMU slide")
    ap.add_argument("--slides", nargs="*", type=Path, default=[], help="more slides to add")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", help="torch device for the encoder (default: cuda if available)")
    ap.add_argument("--threads", type=int, help="torch threads (1 is steadier on an oversubscribed machine)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs of each method per slide, the fastest counts (default 2): per-patch "
                    "encoder time varies by ~15%% between runs on a shared machine")
    ap.add_argument("--lipn-thresholds", type=float, nargs="*", default=[0.5],
                    help="also run HDMIL with these LIPN thresholds (default 0.5, the paper's) beside "
                    "the checkpoint's own")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from hdmil.checkpoint import load_model
    from hdmil.pipeline import encoder_for, run_slide, warm_up
    from hdmil.slide import open_slide

    ckpt = model_path(args.model, args.encoder)
    model = load_model(ckpt)
    encoder = encoder_for(model, args.device)
    warm_up(model, encoder, patch_px=model.patch_px)
    slides = ([] if args.no_cmu or not CMU.exists() else [CMU])
    slides += [synthetic_slide(size, 11 + i) for i, size in enumerate(args.sizes)] + list(args.slides)

    stages = ("tissue", "lipn", "crop", "features", "dmin", "total")
    print(f"\nmodel {ckpt.name} ({model.sha256}), encoder {encoder.name} ({encoder.dim}-d) on "
          f"{encoder.device}, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}\n")
    head = ("| slide | size | method | patches | read | kept ratio | " + " | ".join(stages)
            + " | crop wait | peak MB |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    summary = []
    for path in slides:
        with open_slide(path) as slide:
            w, h = slide.dimensions
        with open(path, "rb") as fh:  # both methods find the file in the page cache
            while fh.read(1 << 24):
                pass
        own, own_cls = float(model.lipn.cfg.threshold), model.lipn.cfg.class_thresholds
        own_label = ("/".join(f"{t:.2f}" for t in own_cls) if own_cls else f"{own:.2f}")
        runs = [(False, None), (True, own_label)] + [(True, t) for t in args.lipn_thresholds]
        res = {}
        for use_lipn, thr in runs:
            if isinstance(thr, float):  # one threshold for every class, as --lipn-threshold does
                model.lipn.cfg.threshold, model.lipn.cfg.class_thresholds = thr, None
                thr = f"{thr:.2f}"
            r, peak = None, 0.0
            try:
                for _ in range(max(1, args.repeats)):
                    with PeakRSS() as mem:
                        run = run_slide(path, model, use_lipn=use_lipn, encoder=encoder,
                                        batch_size=args.batch_size)
                    peak = max(peak, mem.mb)
                    if r is None or run.timings["total"] < r.timings["total"]:
                        r = run
            finally:
                model.lipn.cfg.threshold, model.lipn.cfg.class_thresholds = own, own_cls
            res[thr] = r
            t = r.timings
            method = r.method + (f" (LIPN > {thr})" if thr is not None else "")
            print(f"| {path.name} | {w}x{h} | {method} | {r.n_patches} | {r.n_read} | {r.kept_ratio:.2f} | "
                  + " | ".join(f"{t[s]:.2f}" for s in stages)
                  + f" | {t.get('crop_wait', 0.0):.2f} | {peak:.0f} |", flush=True)
        dag = res[None]
        for thr, hd in res.items():
            if thr is not None:
                summary.append((path.name, thr, hd.kept_ratio, hd.timings["total"] / dag.timings["total"],
                                hd.timings["lipn"] / hd.timings["total"], float(hd.probabilities[-1]),
                                float(dag.probabilities[-1])))

    print("\n| slide | LIPN threshold | kept ratio | total HDMIL / HDMIL† | target (kept + 0.05) "
          "| LIPN share of total | met | P(last class) HDMIL / HDMIL† |")
    print("|---|---|---|---|---|---|---|---|")
    for name, thr, kept, ratio, lipn_share, p_hd, p_dag in summary:
        met = ratio <= kept + 0.05 and lipn_share <= 0.02
        print(f"| {name} | {thr} | {kept:.2f} | {ratio:.2f} | {kept + 0.05:.2f} | {lipn_share:.1%} "
              f"| {'yes' if met else 'no'} | {p_hd:.3f} / {p_dag:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
