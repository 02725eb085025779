"""SLPD region embeddings vs patch features: DMIN slide AUC and slide retrieval precision@1.

    python benchmarks/slpd.py                       # feature-level synthetic cohorts (default)
    python benchmarks/slpd.py --features DIR --labels labels.csv   # any featurised cohort
    python benchmarks/slpd.py --synth-cohort 24     # image-level synthetic cohort (see below)

Default cohorts are *feature-level* synthetic: each slide is a grid of patch features (no pixels)
built from patch-type mixtures, 48 × 48 patches in an elliptic tissue area, so ~6-9 regions of
16 × 16 patches per slide. Patch type t has a random centre in R^D; a patch is its type's centre
plus Gaussian noise. Every 16 × 16 block is one of these region kinds:

- stroma: types 0 / 1 mixed at random (70 / 30);
- glands: types 2 / 3 in an ordered pattern (4 × 4 blocks in a checkerboard);
- scenario ``composition``, tumour region: the glands pattern with a quarter of its cells of a
  tumour patch type 4 that normal slides never have. Patch-level models can see it.
- scenario ``arrangement``, tumour region: types 2 / 3 in the same proportions as glands but
  shuffled. Every patch is of a type normal slides have too, in the same proportions: only the
  spatial arrangement inside regions differs, which patch-level MIL and mean features cannot see.

Every slide has stroma and glands regions (3 of its central blocks are glands); in a tumour slide
1-3 of those glands regions are tumour regions instead, so the proportions of region kinds (and, in
``arrangement``, of patch types) are the same in both classes.

Image-level synthetic cohort (``--synth-cohort N [--slide-size PX] [--seed S]``): N pixel slides
(half tumour) made by the demo model's generator ``hdmil.synth.cohort.synth_cohort`` (tumour burdens
0.4 / 0.2 / 0.1 / 0.05 / 0.03 of the tissue, cycled over the tumour slides; stain variation and
artefacts as in the demo cohort), featurised like the demo recipe (``hdmil.recipe.cohort_features``:
tissue grid of 256-px patches at 0.5 µm/px, the bundled demo model's encoder, by default
``test_byobnet``, 256-d, trained by the recipe on 4096-px slides). A region is 16 × 16 patches =
4096 px square, so the default 12288-px slides hold up to 9 regions (those with ≥ 25 % tissue
patches count; the generator's tissue covers ~40 % of a slide: 4-7 regions, ~900 patches per
slide); the region size is *not* changed (``--slide-size 16384``: 6-12 regions, ~1600 patches per
slide, about twice the time).
Slides and features are cached under ``benchmarks/results/slpd-synth/`` (git-ignored; features per
model file hash) and re-used by later runs with the same N / size / seed. Defaults (24 slides of
12288 px) took 888 s on 2 shared CPU cores on a first run (making slides 290 s, featurising 212 s,
SLPD 113 s, DMIN 268 s); a run re-using the cache skips the first two. Unlike the feature-level
cohorts, a slide is tumour here because some of its patches show tumour (down to 3 % of the
tissue), not because of how its patches are arranged: patch-level models are favoured.

Per cohort: SLPD pre-training (``pretrain_slpd``, small preset with 2 blocks, 2 local crops and
20 epochs by default, to fit a shared 2-core CPU; see --depth / --local-crops / --epochs), then

- DMIN (``hdmil.models.DMIN`` + ``dmin_loss``, a minimal loop here: Adam, lr 3e-4, 50 epochs,
  class-balanced order; hidden 128 / attention 64 for small D; with fewer epochs the student's
  evaluation mask 1[s > 0] often keeps nothing yet and the student AUC is 0.5) on patch features, on SLPD region embeddings, and on region embeddings of
  an *untrained* SLPD encoder (a control: what the architecture gives without learning);
  slide AUC on held-out slides (student path as docs/method.md §3 tests; teacher path shown too), mean ±
  sd over repeated stratified 60 / 40 splits;
- retrieval precision@1 over all slides: is the most similar other slide of the same class?
  SLPD prototypes (``prototype_similarity``) vs. cosine of mean patch features (and of mean
  region embeddings).

The baseline of every ratio is the patch-feature row measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PS = 256  # level-0 px per patch
RESULTS = Path(__file__).resolve().parent / "results"  # git-ignored
SYNTH_SLIDE_PX = 12288  # 3 × 3 regions of 16 × 16 patches of 256 px


@dataclass
class Slide:
    slide_id: str
    label: int
    path: Path


# ------------------------------------------------------------------------------- synthetic


def _region_cells(kind: str, rng: np.random.Generator, g: int) -> np.ndarray:
    """Patch types [g, g] of one region of a kind."""
    if kind == "stroma":
        return np.where(rng.random((g, g)) < 0.7, 0, 1)
    rr, cc = np.mgrid[:g, :g]
    dy, dx = rng.integers(0, 4, 2)
    glands = np.where((((rr + dy) // 4) + ((cc + dx) // 4)) % 2 == 0, 2, 3)
    if kind == "glands":
        return glands
    if kind == "tumour-composition":
        out = glands.copy()
        out[(glands == 2) & (rng.random((g, g)) < 0.5)] = 4  # a quarter of all cells
        return out
    if kind == "tumour-arrangement":
        flat = glands.ravel().copy()
        rng.shuffle(flat)
        return flat.reshape(g, g)
    raise ValueError(kind)


def synth_feature_cohort(
    out: Path, n_slides: int, scenario: str, seed: int, dim: int = 32, grid: int = 48
) -> list[Slide]:
    """Write ``n_slides`` feature files (half tumour) into ``out``; see the module docstring."""
    from hdmil.features.io import write_features

    rng = np.random.default_rng([seed, {"composition": 1, "arrangement": 2}[scenario]])
    centres = rng.normal(size=(5, dim))
    centres *= 2.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.array([0, 1] * (n_slides // 2) + [0] * (n_slides % 2))
    rng.shuffle(labels)
    g = 16
    slides = []
    for i, y in enumerate(labels):
        rr, cc = np.mgrid[:grid, :grid]
        ay, ax = rng.uniform(0.7, 1.05, 2) * grid / 2
        tissue = ((rr - grid / 2) / ay) ** 2 + ((cc - grid / 2) / ax) ** 2 <= 1
        nb = grid // g
        kinds = rng.choice(np.array(["stroma", "glands"], dtype=object), size=(nb, nb))
        # every slide has glands in 3 of the 5 central blocks (all tissue); a tumour slide turns
        # 1-3 of those into tumour regions, so region-kind proportions match between classes
        central = [(nb // 2, nb // 2), (nb // 2 - 1, nb // 2), (nb // 2 + 1, nb // 2),
                   (nb // 2, nb // 2 - 1), (nb // 2, nb // 2 + 1)]  # fmt: skip
        chosen = [central[j] for j in rng.permutation(len(central))[:3]]
        for b in chosen:
            kinds[b] = "glands"
        if y == 1:
            for b in chosen[: rng.integers(1, 4)]:
                kinds[b] = f"tumour-{scenario}"
        types = np.zeros((grid, grid), np.int64)
        for by in range(nb):
            for bx in range(nb):
                types[by * g : (by + 1) * g, bx * g : (bx + 1) * g] = _region_cells(
                    str(kinds[by, bx]), rng, g
                )
        sel = tissue.ravel()
        coords = np.stack([cc.ravel(), rr.ravel()], 1)[sel] * PS
        t = types.ravel()[sel]
        feats = centres[t] + rng.normal(scale=1.0, size=(len(t), dim))
        sid = f"{scenario[:4]}{i:03d}"
        path = out / f"{sid}.h5"
        write_features(path, feats.astype(np.float32), coords, {"patch_size_level0": PS})
        slides.append(Slide(sid, int(y), path))
    return slides


def read_cohort(features: Path, labels_csv: Path) -> list[Slide]:
    from hdmil.features.io import find_feature_files

    files = find_feature_files(features)
    with open(labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["label"] for r in rows})
    if len(classes) != 2:
        raise SystemExit(f"{labels_csv}: need exactly two classes, found {classes}")
    return [
        Slide(r["slide_id"], classes.index(r["label"]), files[r["slide_id"]])
        for r in rows
        if r["slide_id"] in files
    ]


def copy_cohort(slides: list[Slide], dst: Path) -> list[Slide]:
    """SLPD writes its outputs into the feature files: work on copies (and leave caches clean)."""
    dst.mkdir(parents=True, exist_ok=True)
    for s in slides:
        shutil.copy2(s.path, dst / s.path.name)
        s.path = dst / s.path.name
    return slides


# ------------------------------------------------------------------- image-level synthetic


def _marker_ok(folder: Path, want: dict) -> bool:
    """Was ``folder`` completed with the settings ``want``? (its marker is written last)"""
    m = folder / "bench-cache.json"
    if not m.is_file():
        return False
    have = json.loads(m.read_text())
    have.pop("skipped", None)  # what featurising found, not a setting
    return have == want


def _set_marker(folder: Path, want: dict) -> None:
    (folder / "bench-cache.json").write_text(json.dumps(want, indent=1))


def synth_image_cohort(args) -> tuple[Path, Path, dict]:
    """Make (or re-use) an image-level synthetic cohort and its demo-encoder features.

    Returns (features dir, labels.csv, what was used); both folders live under
    ``benchmarks/results/slpd-synth/`` and are re-used when their settings match.
    """
    from hdmil.checkpoint import default_model_path, file_sha256, load_model
    from hdmil.recipe import cohort_features, encoder_for_model
    from hdmil.synth.cohort import DEFAULT_BURDENS, synth_cohort

    root = RESULTS / "slpd-synth" / f"n{args.synth_cohort}-px{args.slide_size}-seed{args.seed}"
    cohort_dir = root / "cohort"
    want = {"n_slides": args.synth_cohort, "size": args.slide_size, "seed": args.seed,
            "burdens": list(DEFAULT_BURDENS)}  # fmt: skip
    t0 = time.perf_counter()
    if _marker_ok(cohort_dir, want) and (cohort_dir / "cohort.json").is_file():
        how = "re-used"
    else:
        (cohort_dir / "bench-cache.json").unlink(missing_ok=True)
        synth_cohort(cohort_dir, args.synth_cohort, seed=args.seed,
                     size=(args.slide_size, args.slide_size), workers=args.workers)  # fmt: skip
        _set_marker(cohort_dir, want)
        for old in root.glob("features-*/bench-cache.json"):  # features of the former slides
            old.unlink()
        how = "made"
    t_cohort = time.perf_counter() - t0
    print(f"[synth] cohort {cohort_dir}: {args.synth_cohort} slides of {args.slide_size}² px "
          f"(seed {args.seed}) {how} in {t_cohort:.0f} s", flush=True)  # fmt: skip

    # the encoder of the bundled demo model (or --model), as the recipe / pipeline pick it
    model_path = Path(args.model) if args.model else default_model_path()
    model = load_model(model_path)
    encoder = encoder_for_model(model)
    digest = hashlib.sha256(file_sha256(model_path).encode())
    weights = (getattr(model, "config", {}) or {}).get("encoder_weights")
    if weights:  # the encoder's own weights file, beside the checkpoint
        digest.update(file_sha256(model_path.parent / str(weights)).encode())
    key = digest.hexdigest()[:12]
    feat_dir = root / f"features-{key}"
    fwant = {**want, "model": str(model_path), "key": key, "encoder": encoder.name}
    t0 = time.perf_counter()
    if _marker_ok(feat_dir, fwant):
        skipped = json.loads((feat_dir / "bench-cache.json").read_text()).get("skipped", {})
        how = "re-used"
    else:
        (feat_dir / "bench-cache.json").unlink(missing_ok=True)
        skipped = cohort_features(cohort_dir, feat_dir, encoder, batch_size=64)
        _set_marker(feat_dir, {**fwant, "skipped": skipped})
        how = "made"
    t_feat = time.perf_counter() - t0
    print(f"[synth] features {feat_dir}: encoder {encoder.name} ({encoder.dim}-d) of {model_path} "
          f"{how} in {t_feat:.0f} s"
          + (f"; {len(skipped)} slides without tissue left out" if skipped else ""), flush=True)
    info = {"cohort": str(cohort_dir), "encoder": f"{encoder.name} ({encoder.dim}-d)",
            "model": str(model_path), "cohort_s": t_cohort, "features_s": t_feat,
            "skipped": skipped}  # fmt: skip
    return feat_dir, cohort_dir / "labels.csv", info


def describe_slides(name: str, slides: list[Slide], region_size: int = 16) -> None:
    """Print tissue patches and regions per slide (the sizes SLPD and DMIN see)."""
    from hdmil.features.io import read_features
    from hdmil.train.slpd_trainer import build_regions, patch_size_of

    n_patch, n_reg = [], []
    for s in slides:
        bag = read_features(s.path, lr_patches=False)
        n_patch.append(len(bag))
        ps = patch_size_of(bag.coords, bag.attrs, str(s.path))
        n_reg.append(len(build_regions(bag.coords, ps, region_size).patch_index))
    y = np.array([s.label for s in slides])
    p, r = np.array(n_patch), np.array(n_reg)
    print(f"[{name}] {len(slides)} slides ({int(y.sum())} tumour); tissue patches / slide "
          f"{p.mean():.0f} (min {p.min()}, max {p.max()}); regions of {region_size}×{region_size} "
          f"patches / slide {r.mean():.1f} (min {r.min()}, max {r.max()})", flush=True)  # fmt: skip


# ------------------------------------------------------------------------------ evaluation


def train_eval_dmin(
    bags: list[np.ndarray], y: np.ndarray, train: np.ndarray, test: np.ndarray, epochs: int, seed: int
) -> tuple[float, float]:
    """Minimal DMIN loop; returns test AUC of the student (masked) path and of the teacher path
    (every instance pooled, HDMIL†)."""
    from sklearn.metrics import roc_auc_score

    from hdmil.models import DMIN, DMINConfig, dmin_loss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = DMINConfig(in_dim=bags[0].shape[1], n_classes=2, hidden=128, attn_dim=64, k_sample=8)
    model = DMIN(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=1e-5)
    tensors = [torch.from_numpy(b.astype(np.float32)) for b in bags]
    pos, neg = train[y[train] == 1], train[y[train] == 0]
    for _ in range(epochs):
        model.train()
        # class-balanced: as many of each class per epoch, with replacement
        half = len(train) // 2
        order = np.concatenate([rng.choice(pos, half), rng.choice(neg, half)])
        rng.shuffle(order)
        for i in order:
            out = model(tensors[i], int(y[i]))
            loss, _ = dmin_loss(out, int(y[i]), cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    student = [float(model.predict(tensors[i]).probabilities[1]) for i in test]
    teacher = [float(model.predict_teacher(tensors[i]).probabilities[1]) for i in test]
    return float(roc_auc_score(y[test], student)), float(roc_auc_score(y[test], teacher))


def splits(y: np.ndarray, reps: int, seed: int, test_frac: float = 0.4):
    from sklearn.model_selection import StratifiedShuffleSplit

    sss = StratifiedShuffleSplit(n_splits=reps, test_size=test_frac, random_state=seed)
    return list(sss.split(np.zeros(len(y)), y))


def precision_at_1(sim: np.ndarray, y: np.ndarray) -> float:
    """sim [n, n]; NaN when fewer than two slides (no other slide to find)."""
    if len(y) < 2:
        return float("nan")
    sim = sim.copy()
    np.fill_diagonal(sim, -np.inf)
    ok = [y[int(np.nanargmax(np.nan_to_num(row, nan=-np.inf)))] == y[i] for i, row in enumerate(sim)]
    return float(np.mean(ok))


def cosine_matrix(v: np.ndarray) -> np.ndarray:
    u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return u @ u.T


def _terms(h: dict) -> str:
    return f"{h['dino']:.2f} / {h['intra']:.2f} / {h['inter']:.2f}"


def run_cohort(name: str, slides: list[Slide], args, work: Path) -> list[dict]:
    import h5py

    from hdmil.features.io import read_features
    from hdmil.models.slpd import SLPD, prototype_similarity, slpd_config
    from hdmil.train.slpd_trainer import embed_slide, pretrain_slpd

    y = np.array([s.label for s in slides])
    cfg = slpd_config(
        "small", epochs=args.epochs, proto_warmup_epochs=max(1, args.epochs // 3),
        n_prototypes=args.prototypes, min_regions=2 * args.prototypes, seed=args.seed,
        depth=args.depth, local_crops=args.local_crops,
    )  # fmt: skip
    t0 = time.perf_counter()
    result = pretrain_slpd([s.path for s in slides], cfg, work / f"{name}.safetensors", resume=False)
    t_slpd = time.perf_counter() - t0
    print(
        f"[{name}] SLPD: {len(slides)} slides, {result.n_regions} regions, {args.epochs} epochs in "
        f"{t_slpd:.0f} s; loss (dino / intra / inter) epoch 1 {_terms(result.history[0])}, last "
        f"{_terms(result.history[-1])}; "
        f"{len(result.slides_without_prototypes)} slides without prototypes",
        flush=True,
    )
    patch_bags, region_bags, protos = [], [], []
    for s in slides:
        with h5py.File(s.path) as f:
            patch_bags.append(f["features"][()])
            region_bags.append(f["region_embeddings"][()])
            p = f["prototypes"][()]
            protos.append(p if len(p) else None)
    # control: region embeddings of an untrained encoder with the same config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        untrained = SLPD(result.config).eval()
    random_bags = []
    for s in slides:
        bag = read_features(s.path, lr_patches=False)
        random_bags.append(
            embed_slide(untrained, bag.features, bag.coords, PS, s.slide_id).region_embeddings
        )
    keep = np.array([len(b) > 0 for b in region_bags])
    if not keep.all():
        print(f"[{name}] {int((~keep).sum())} slides without regions are left out of every row")
    idx = np.nonzero(keep)[0]
    y_k = y[idx]

    rows = []
    reps = splits(y_k, args.reps, args.seed)
    for label, bags in (
        ("patch features (baseline)", patch_bags),
        ("SLPD region embeddings", region_bags),
        ("untrained SLPD encoder (control)", random_bags),
    ):
        t0 = time.perf_counter()
        aucs = np.array([
            train_eval_dmin([bags[i] for i in idx], y_k, tr, te, args.dmin_epochs, args.seed + r)
            for r, (tr, te) in enumerate(reps)
        ])  # fmt: skip
        n_inst = float(np.mean([len(bags[i]) for i in idx]))
        rows.append({"cohort": name, "what": f"DMIN on {label}", "instances": n_inst,
                     "auc": float(aucs[:, 0].mean()), "auc_sd": float(aucs[:, 0].std()),
                     "auc_tea": float(aucs[:, 1].mean()),
                     "seconds": time.perf_counter() - t0})  # fmt: skip
        print(f"[{name}] DMIN on {label}: AUC student {aucs[:, 0].mean():.3f} ± "
              f"{aucs[:, 0].std():.3f}, teacher {aucs[:, 1].mean():.3f}", flush=True)  # fmt: skip

    # retrieval precision@1
    mean_patch = cosine_matrix(np.stack([patch_bags[i].mean(0) for i in idx]))
    mean_region = cosine_matrix(np.stack([region_bags[i].mean(0) for i in idx]))
    n = len(idx)
    proto_sim = np.full((n, n), np.nan)
    for a in range(n):
        for b in range(n):
            pa, pb = protos[idx[a]], protos[idx[b]]
            if pa is not None and pb is not None:
                proto_sim[a, b] = prototype_similarity(pa, pb)
    have = np.array([protos[i] is not None for i in idx])
    sub = np.nonzero(have)[0]
    rows.append({"cohort": name, "what": "retrieval: mean patch features (baseline)",
                 "p_at_1": precision_at_1(mean_patch, y_k)})  # fmt: skip
    rows.append({"cohort": name, "what": "retrieval: SLPD prototypes",
                 "p_at_1": precision_at_1(proto_sim[np.ix_(sub, sub)], y_k[sub]),
                 "note": f"{len(sub)}/{n} slides with prototypes"})  # fmt: skip
    rows.append({"cohort": name, "what": "retrieval: mean SLPD region embeddings",
                 "p_at_1": precision_at_1(mean_region, y_k)})  # fmt: skip
    rows.append({"cohort": name, "what": "(SLPD pre-training seconds)", "seconds": t_slpd})
    return rows


def print_table(rows: list[dict]) -> None:
    print()
    print("| cohort | what | inst/slide | slide AUC student (mean ± sd) | × baseline | AUC teacher | "
          "P@1 | × baseline | s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    base_auc, base_p = {}, {}
    for r in rows:
        if "baseline" in r["what"] and "auc" in r:
            base_auc[r["cohort"]] = r["auc"]
        if "baseline" in r["what"] and "p_at_1" in r:
            base_p[r["cohort"]] = r["p_at_1"]
    for r in rows:
        c = r["cohort"]
        auc = f"{r['auc']:.3f} ± {r['auc_sd']:.3f}" if "auc" in r else ""
        auc_x = f"{r['auc'] / base_auc[c]:.2f}" if "auc" in r and base_auc.get(c) else ""
        p1 = f"{r['p_at_1']:.3f}" if "p_at_1" in r else ""
        p1_x = f"{r['p_at_1'] / base_p[c]:.2f}" if "p_at_1" in r and base_p.get(c) else ""
        inst = f"{r['instances']:.0f}" if "instances" in r else ""
        sec = f"{r['seconds']:.0f}" if "seconds" in r else ""
        what = r["what"] + (f" ({r['note']})" if r.get("note") else "")
        tea = f"{r['auc_tea']:.3f}" if "auc_tea" in r else ""
        print(f"| {c} | {what} | {inst} | {auc} | {auc_x} | {tea} | {p1} | {p1_x} | {sec} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="composition,arrangement")
    ap.add_argument("--slides", type=int, default=24, help="slides per synthetic cohort")
    ap.add_argument("--dim", type=int, default=32, help="patch-feature width of synthetic cohorts")
    ap.add_argument("--features", type=Path, help="a featurised cohort instead of synthetic ones")
    ap.add_argument("--labels", type=Path, help="labels.csv (slide_id,label) for --features")
    ap.add_argument("--synth-cohort", type=int, metavar="N",
                    help="image-level synthetic cohort of N slides (synth_cohort + demo encoder)")
    ap.add_argument("--slide-size", type=int, default=SYNTH_SLIDE_PX, metavar="PX",
                    help=f"level-0 side of --synth-cohort slides (default {SYNTH_SLIDE_PX})")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes making --synth-cohort slides (default up to 2)")
    ap.add_argument("--model", type=Path, default=None,
                    help="checkpoint whose encoder featurises --synth-cohort (default: the demo)")
    ap.add_argument("--epochs", type=int, default=20, help="SLPD epochs")
    ap.add_argument("--prototypes", type=int, default=2, help="SLPD prototypes per slide")
    ap.add_argument("--depth", type=int, default=2, help="SLPD blocks (small preset: 4)")
    ap.add_argument("--local-crops", type=int, default=2, help="SLPD local crops (small: 4)")
    ap.add_argument("--dmin-epochs", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3, help="repeated stratified splits (60/40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.features and args.synth_cohort:
        ap.error("--features and --synth-cohort exclude each other")
    if args.synth_cohort is not None and args.synth_cohort < 4:
        ap.error("--synth-cohort needs at least 4 slides")
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slpd-bench-") as tmp:
        work = Path(tmp)
        if args.features:
            if not args.labels:
                ap.error("--features needs --labels")
            cohorts = {"features": copy_cohort(read_cohort(args.features, args.labels),
                                               work / "features")}  # fmt: skip
        elif args.synth_cohort:
            feat_dir, labels_csv, info = synth_image_cohort(args)
            name = f"synth-image {args.synth_cohort}×{args.slide_size}px"
            cohorts = {name: copy_cohort(read_cohort(feat_dir, labels_csv), work / "synth")}
            describe_slides(name, cohorts[name])
            print(f"[{name}] encoder {info['encoder']} of {info['model']}; SLPD small preset, "
                  f"region 16×16 patches, depth {args.depth}, {args.local_crops} local crops, "
                  f"{args.epochs} epochs, K = {args.prototypes} prototypes; DMIN "
                  f"{args.dmin_epochs} epochs × {args.reps} splits", flush=True)  # fmt: skip
        else:
            cohorts = {
                sc: synth_feature_cohort(work / sc, args.slides, sc, args.seed, dim=args.dim)
                for sc in args.scenarios.split(",")
            }
        for name, slides in cohorts.items():
            rows.extend(run_cohort(name, slides, args, work))
    print_table(rows)
    print(f"\nwall time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
