"""SLPD: prototype matching, k-means, losses, regions, training outputs, similar-slide search."""

from __future__ import annotations

import itertools
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hdmil.errors import Cancelled, CheckpointError, FeatureFileError
from hdmil.features.io import write_features
from hdmil.checkpoint import load_slpd, read_slpd_metadata
from hdmil.models.slpd import (
    SLPD,
    build_regions,
    embed_slide,
    kmeans,
    prototype_loss,
    prototype_matching,
    prototype_similarity,
    slide_neighbours,
    slide_prototypes,
    slpd_config,
)
from hdmil.slpd_index import (
    INDEX_NAME,
    build_index,
    load_index,
    prototype_map,
    similar_slides,
)
from hdmil.train.slpd_trainer import make_views, pretrain_slpd

PS = 64  # level-0 px per patch in the toy cohort
DIM = 8


def _toy_slide(rng: np.random.Generator, rows: int, cols: int, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """A rows × cols patch grid; left half patch type A, right half type B (+ noise)."""
    rr, cc = np.mgrid[:rows, :cols]
    coords = np.stack([cc.ravel(), rr.ravel()], 1) * PS
    centers = np.eye(DIM, dtype=np.float32) * 3
    types = np.where(cc.ravel() < cols // 2, kind % DIM, (kind + 3) % DIM)
    feats = centers[types] + rng.normal(scale=0.3, size=(len(coords), DIM)).astype(np.float32)
    return feats, coords


def _write_cohort(folder: Path, seed: int = 0) -> Path:
    """4 slides of 12 × 12 patches (9 regions of 4 × 4 each), one of 4 × 4 (1 region: too few)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        feats, coords = _toy_slide(rng, 12, 12, kind=i % 2)
        write_features(folder / f"slide{i}.h5", feats, coords, {"patch_size_level0": PS})
    feats, coords = _toy_slide(rng, 4, 4, kind=0)
    write_features(folder / "small.h5", feats, coords, {"patch_size_level0": PS})
    return folder


def _tiny(**kw):
    # tiny preset: grid 4 × 4, K = 2, 4 regions needed for prototypes, 1 warm-up epoch
    return slpd_config("tiny", **kw)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than two fighting on a shared CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(_one_thread, tmp_path_factory):
    """A tiny SLPD run over the toy cohort (outputs written into the files)."""
    folder = _write_cohort(tmp_path_factory.mktemp("slpd") / "feats")
    ckpt = folder.parent / "slpd.safetensors"
    result = pretrain_slpd(folder, _tiny(epochs=3), ckpt, resume=False)
    return folder, ckpt, result


# ------------------------------------------------------------------------- matching, k-means


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_assignment_matching_equals_brute_force(k):
    rng = np.random.default_rng(k)
    for _ in range(25):
        pa, pb = rng.normal(size=(k, 6)), rng.normal(size=(k, 6))
        cos = (pa / np.linalg.norm(pa, axis=1, keepdims=True)) @ (
            pb / np.linalg.norm(pb, axis=1, keepdims=True)
        ).T
        brute = max(sum(cos[i, p[i]] for i in range(k)) for p in itertools.permutations(range(k)))
        total, pairs = prototype_matching(pa, pb)
        assert total == pytest.approx(brute, abs=1e-9)
        assert sorted(pairs[:, 0]) == list(range(k)) and sorted(pairs[:, 1]) == list(range(k))
        assert prototype_similarity(pa, pb) == pytest.approx(brute / k, abs=1e-9)


def test_assignment_matching_unequal_sizes():
    rng = np.random.default_rng(7)
    pa, pb = rng.normal(size=(2, 5)), rng.normal(size=(3, 5))
    cos = (pa / np.linalg.norm(pa, axis=1, keepdims=True)) @ (pb / np.linalg.norm(pb, axis=1, keepdims=True)).T
    brute = max(cos[0, a] + cos[1, b] for a, b in itertools.permutations(range(3), 2))
    assert prototype_matching(pa, pb)[0] == pytest.approx(brute)


def test_kmeans_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(loc=c, scale=0.2, size=(30, 4)) for c in (-2, 0, 2, 4)])
    c1, l1 = kmeans(x, 4, seed=11)
    c2, l2 = kmeans(x, 4, seed=11)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(l1, l2)
    # well separated blobs are recovered: each blob is one cluster
    for b in range(4):
        assert len(set(l1[b * 30 : (b + 1) * 30])) == 1
    assert len(set(l1)) == 4
    p, lab = slide_prototypes(x, 4, min_regions=8, seed=3)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, rtol=1e-5)
    p2, lab2 = slide_prototypes(x, 4, min_regions=8, seed=3)
    np.testing.assert_array_equal(p, p2)
    np.testing.assert_array_equal(lab, lab2)


def test_training_prototypes_deterministic(tmp_path, trained):
    """Two runs with the same seed write the same prototypes."""
    folder, _, _ = trained
    again = tmp_path / "feats"
    shutil.copytree(folder, again)
    pretrain_slpd(again, _tiny(epochs=3), tmp_path / "again.safetensors", resume=False)
    for name in ("slide0.h5", "slide3.h5"):
        with h5py.File(folder / name) as a, h5py.File(again / name) as b:
            np.testing.assert_allclose(a["prototypes"][()], b["prototypes"][()], atol=1e-5)
            np.testing.assert_array_equal(a["region_prototype"][()], b["region_prototype"][()])


# ------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("term", ["dino", "intra", "inter"])
def test_each_loss_term_decreases(term):
    """Training the student on one term lowers it (teacher and center held fixed: a fixed target)."""
    cfg = _tiny()
    gen = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(200, DIM, generator=gen), torch.zeros(1, DIM)])
    idx = torch.randint(0, 200, (16, 4, 4), generator=gen)
    idx[0, :2] = 200  # some missing patches
    z_intra = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    z_inter = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    valid = torch.ones(16, dtype=torch.bool)
    valid[:3] = False  # regions of slides without prototypes
    views = make_views(idx, feats, cfg, gen)
    torch.manual_seed(0)
    model = SLPD(cfg)
    opt = torch.optim.Adam(model.student.parameters(), lr=1e-4)
    values = []
    for _ in range(20):
        terms = model.losses(views, (z_intra, valid), (z_inter, valid), update_center=False)
        loss = getattr(terms, term)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(float(loss.detach()))
    assert values[-1] < 0.95 * values[0], values


def test_teacher_ema_and_center_update():
    cfg = _tiny()
    model = SLPD(cfg)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for b, t, s in zip(before, model.teacher.parameters(), model.student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    logits = [torch.ones(4, cfg.out_dim)]
    model.update_center(logits)
    torch.testing.assert_close(model.center, torch.full((1, cfg.out_dim), 0.1))


def test_missing_patches_do_not_change_embedding():
    cfg = _tiny()
    enc = SLPD(cfg).teacher.encoder
    x = torch.randn(3, 4, 4, DIM)
    mask = torch.rand(3, 4, 4) > 0.4
    a = enc(x * mask[..., None], mask)
    b = enc(torch.where(mask[..., None], x, torch.full_like(x, 7.0)), mask)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------- small slides


def test_slides_too_small_get_no_prototypes_and_no_loss():
    protos, labels = slide_prototypes(np.random.default_rng(0).normal(size=(3, 8)), 2, min_regions=4)
    assert protos is None and (labels == -1).all()
    assert slide_neighbours([None, np.eye(2, 8), np.eye(2, 8)[::-1]]).tolist() == [-1, 2, 1]
    student = [torch.randn(5, 16, requires_grad=True)]
    loss = prototype_loss(student, torch.randn(5, 16), torch.zeros(5, dtype=torch.bool), torch.zeros(1, 16))
    assert float(loss.detach()) == 0.0
    loss.backward()  # still a graph node: no error in the training step
    assert student[0].grad is not None and float(student[0].grad.abs().sum()) == 0.0


def test_training_skips_small_slides_cleanly(trained):
    folder, _, result = trained
    assert result.slides_without_prototypes == ["small"]
    assert result.history[0]["intra"] == 0.0  # warm-up: plain DINO
    assert result.history[-1]["slides_with_prototypes"] == 4
    assert result.history[-1]["intra"] > 0 and result.history[-1]["inter"] > 0
    with h5py.File(folder / "small.h5") as f:
        assert f["prototypes"].shape == (0, 8)
        assert (f["region_prototype"][()] == -1).all()
        assert f["region_embeddings"].shape == (1, 16)


def test_slide_without_any_region(tmp_path, trained):
    """A slide smaller than one region's tissue threshold: empty outputs, other slides train."""
    folder, _, _ = trained
    cohort = tmp_path / "feats"
    shutil.copytree(folder, cohort)
    write_features(cohort / "speck.h5", np.ones((1, DIM), np.float32), np.array([[0, 0]]),
                   {"patch_size_level0": PS})  # fmt: skip
    result = pretrain_slpd(cohort, _tiny(epochs=1, region_min_tissue=0.5), tmp_path / "c.safetensors", resume=False)
    assert "speck" in result.slides_without_prototypes
    with h5py.File(cohort / "speck.h5") as f:
        assert f["region_embeddings"].shape == (0, 16)
        assert f["region_coords"].shape == (0, 2)


# ---------------------------------------------------------------------------------- regions


def test_build_regions_places_patches():
    rng = np.random.default_rng(1)
    rr, cc = np.mgrid[:10, :9]
    all_coords = np.stack([cc.ravel(), rr.ravel()], 1) * 100 + np.array([30, 50])  # grid phase
    keep = rng.random(len(all_coords)) < 0.7
    coords = all_coords[keep]
    rng.shuffle(coords)
    regions = build_regions(coords, 100, region_size=4, min_tissue=0.25)
    # every kept block contains its patches at the right cells, and only those
    seen = set()
    for r in range(len(regions)):
        x0, y0 = regions.coords[r]
        assert (x0 - 30) % 400 == 0 and (y0 - 50) % 400 == 0
        for i in range(4):
            for j in range(4):
                p = regions.patch_index[r, i, j]
                if p >= 0:
                    np.testing.assert_array_equal(coords[p], [x0 + j * 100, y0 + i * 100])
                    seen.add(int(p))
    # patches in dropped blocks are exactly those of blocks with < 4 present cells
    block = (coords - [30, 50]) // 400
    _, inv, counts = np.unique(block, axis=0, return_inverse=True, return_counts=True)
    expected = {int(i) for i in np.nonzero(counts[inv.reshape(-1)] >= 4)[0]}
    assert seen == expected
    assert regions.region_size_level0 == 400
    x, mask = regions.tokens(rng.normal(size=(len(coords), 3)))
    assert x.shape == (len(regions), 4, 4, 3)
    assert (x[~mask] == 0).all() and (mask == (regions.patch_index >= 0)).all()


def test_build_regions_empty():
    regions = build_regions(np.zeros((0, 2)), 256)
    assert len(regions) == 0 and regions.patch_index.shape == (0, 16, 16)


# --------------------------------------------------------------------------- outputs, ckpt


def test_outputs_written(trained):
    folder, ckpt, result = trained
    assert len(result.outputs) == 5
    with h5py.File(folder / "slide1.h5") as f:
        assert f["features"].shape == (144, DIM)  # features kept
        emb, rc, rp, pr = (f[k][()] for k in ("region_embeddings", "region_coords", "region_prototype", "prototypes"))
        assert emb.shape == (9, 16) and emb.dtype == np.float32 and np.isfinite(emb).all()
        expected = build_regions(f["coords"][()], PS, 4, 0.25).coords
        np.testing.assert_array_equal(rc, expected)
        assert pr.shape == (2, 8)
        np.testing.assert_allclose(np.linalg.norm(pr, axis=1), 1.0, rtol=1e-4)
        assert rp.shape == (9,) and set(rp.tolist()) <= {0, 1}
        assert f.attrs["slpd_region_size_level0"] == 4 * PS
    meta = read_slpd_metadata(ckpt)
    assert meta["model_type"] == "slpd" and meta["complete"] and meta["epoch"] == 3


def test_checkpoint_roundtrip_matches_written_embeddings(trained):
    folder, ckpt, _ = trained
    model = load_slpd(ckpt)
    with h5py.File(folder / "slide2.h5") as f:
        feats, coords, emb = f["features"][()], f["coords"][()], f["region_embeddings"][()]
        protos = f["prototypes"][()]
    out = embed_slide(model, feats, coords, PS, slide_id="slide2")
    np.testing.assert_allclose(out.region_embeddings, emb, atol=1e-5)
    np.testing.assert_allclose(out.prototypes, protos, atol=1e-5)


def test_not_an_slpd_checkpoint(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="x.safetensors"):
        load_slpd(bad)


def test_resume_and_cancel(tmp_path, trained):
    folder, _, _ = trained
    cohort = tmp_path / "feats"
    shutil.copytree(folder, cohort)
    ckpt = tmp_path / "r.safetensors"
    stop = threading.Event()

    def progress(stage, done, total):
        if stage == "train" and done == total // 3 * 2 + 1:  # first step of the last epoch
            stop.set()

    with pytest.raises(Cancelled):
        pretrain_slpd(cohort, _tiny(epochs=3), ckpt, progress=progress, cancel=stop, resume=False)
    meta = read_slpd_metadata(ckpt)
    assert meta["epoch"] == 2 and not meta["complete"]
    resumed = pretrain_slpd(cohort, _tiny(epochs=3), ckpt, resume=True)
    assert resumed.epochs_run == 1 and len(resumed.history) == 3
    assert read_slpd_metadata(ckpt)["complete"]
    with pytest.raises(CheckpointError, match="n_prototypes"):
        pretrain_slpd(cohort, _tiny(epochs=3, n_prototypes=3), ckpt, resume=True)


# --------------------------------------------------------------------------- index, similar


def test_similar_slides_self_and_others(trained):
    folder, _, _ = trained
    index = build_index(folder)
    assert (folder / INDEX_NAME).is_file()
    assert sorted(index.slide_ids) == ["slide0", "slide1", "slide2", "slide3"]
    assert [p.name for p in index.without_prototypes] == ["small.h5"]
    # default: the query file is left out of its own results
    rows = similar_slides(folder / "slide0.h5", folder, top=10)
    assert [r[0] for r in rows if r[0] == "slide0"] == [] and len(rows) == 3
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    # include it: it comes first, with score 1
    rows = similar_slides(folder / "slide0.h5", folder, top=2, exclude_self=False)
    assert rows[0][0] == "slide0" and rows[0][1] == pytest.approx(1.0, abs=1e-5) and len(rows) == 2
    # an array query excludes nothing; its own slide is top
    with h5py.File(folder / "slide3.h5") as f:
        protos = f["prototypes"][()]
    assert similar_slides(protos, folder, top=1)[0][0] == "slide3"
    # a slide path is looked up by its stem
    assert similar_slides("/somewhere/slide1.svs", folder, top=3)[0][0] != "slide1"
    with pytest.raises(FeatureFileError, match="small.h5"):
        similar_slides(folder / "small.h5", folder)
    with pytest.raises(FeatureFileError, match="nothere"):
        similar_slides("nothere.svs", folder)


def test_index_cache_is_fresh_or_rebuilt(tmp_path, trained):
    folder, _, _ = trained
    cohort = tmp_path / "feats"
    shutil.copytree(folder, cohort)
    build_index(cohort)
    assert sorted(load_index(cohort).slide_ids) == ["slide0", "slide1", "slide2", "slide3"]
    (cohort / "slide2.h5").unlink()  # the cache no longer matches the folder
    assert sorted(load_index(cohort).slide_ids) == ["slide0", "slide1", "slide3"]


def test_prototype_map(trained):
    folder, _, _ = trained
    pmap = prototype_map(folder / "slide0.h5")
    labels, size = pmap
    assert size == 4 * PS and labels.shape == (3, 3)
    with h5py.File(folder / "slide0.h5") as f:
        rc, rp = f["region_coords"][()], f["region_prototype"][()]
    for (x, y), p in zip(rc, rp, strict=True):
        assert labels[y // size, x // size] == p + 1
    small, _ = prototype_map(folder / "small.h5")
    assert (small == 0).all()


def test_cli_pretrain_and_similar(tmp_path, trained, capsys):
    from hdmil.cli import main

    folder, _, _ = trained
    cohort = tmp_path / "feats"
    shutil.copytree(folder, cohort)
    out = tmp_path / "cli.safetensors"
    # small preset has 16 × 16 regions: each 12 × 12 slide is one region, so K = 1 and 1 region
    args = ["pretrain-slpd", "--features", str(cohort), "--out", str(out), "--epochs", "1",
            "--warmup", "0", "--prototypes", "1", "--min-regions", "1", "--batch-size", "8"]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 1  # exists, neither --resume nor --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["similar", str(cohort / "slide0.h5"), "--index", str(cohort), "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "slide" in text and "slide0.h5" not in text


def test_region_dmin_checkpoint_names_its_slpd(trained, tmp_path):
    """train-dmin on region instances: the checkpoint's width is the region embedding's, and it names
    the SLPD model that `hdmil predict` needs to embed regions."""
    from hdmil.checkpoint import load_model
    from hdmil.pipeline import slpd_for
    from hdmil.train.data import load_cohort
    from hdmil.train.config import DMINTrainConfig
    from hdmil.train.dmin_trainer import train_dmin
    from hdmil.train.splits import Split

    folder, ckpt, _ = trained
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"slide{i},{'ab'[i % 2]}\n" for i in range(4)))
    cohort = load_cohort(labels, folder, instances="region")
    cfg = DMINTrainConfig(hidden=16, attn_dim=8, k_sample=2, max_epochs=1, min_epochs=0, device="cpu")
    res = train_dmin(cohort, Split(("slide0", "slide1"), ("slide2", "slide3"), (), fold=0), cfg, tmp_path)
    model = load_model(res.checkpoint)
    assert model.config["instances"] == "region"
    assert model.config["feature_dim"] == model.dmin.cfg.in_dim == 16  # tiny preset's embed_dim
    assert model.config["patch_dim"] == DIM
    assert model.config["slpd_checkpoint"] == ckpt.name
    import shutil as _sh

    _sh.copy(ckpt, res.checkpoint.parent / ckpt.name)  # beside the DMIN, where predict looks
    assert slpd_for(model).cfg.encoder.embed_dim == 16


def test_feature_file_for_a_slide(trained, tmp_path):
    """By file stem first, else by the file's ``slide`` attribute; None when the index lacks it."""
    from hdmil.slpd_index import feature_file_for

    folder, _, _ = trained
    assert feature_file_for("/slides/slide1.svs", folder) == folder / "slide1.h5"
    renamed = tmp_path / "idx"
    renamed.mkdir()
    shutil.copy(folder / "slide2.h5", renamed / "case-17.h5")
    with h5py.File(renamed / "case-17.h5", "a") as f:
        f.attrs["slide"] = "slide2"
    (renamed / "broken.h5").write_bytes(b"not hdf5")  # skipped, not an error
    assert feature_file_for("slide2.tiff", renamed) == renamed / "case-17.h5"
    assert feature_file_for("slide9.tiff", renamed) is None


# ------------------------------------------------------------------- files of the old code
# tests/data/legacy/slpd: written by the code before SLPD moved into models/ and checkpoint.py
# (make_slpd_legacy.py, run against that checkout): a 2-epoch tiny run on a 4-slide cohort.

LEGACY = Path(__file__).parent / "data" / "legacy" / "slpd"


def _legacy_cohort(tmp_path: Path) -> Path:
    cohort = tmp_path / "cohort"
    shutil.copytree(LEGACY / "cohort", cohort)
    return cohort


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_legacy_checkpoint_gives_the_old_embeddings():
    model = load_slpd(LEGACY / "slpd_v1.safetensors")
    expected = np.load(LEGACY / "expected.npz")
    with h5py.File(LEGACY / "cohort" / "slide0.h5") as f:
        feats, coords = f["features"][()], f["coords"][()]
        written = {k: f[k][()] for k in ("region_embeddings", "prototypes", "region_prototype")}
    out = embed_slide(model, feats, coords, PS, slide_id="slide0")
    for name in ("region_embeddings", "region_coords", "region_prototype", "prototypes", "patch_region"):
        np.testing.assert_allclose(getattr(out, name), expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert out.region_size_level0 == int(expected["region_size_level0"])
    # and what the old training wrote into the feature file
    np.testing.assert_allclose(out.region_embeddings, written["region_embeddings"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.prototypes, written["prototypes"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out.region_prototype, written["region_prototype"])


def test_legacy_feature_files_are_read():
    """Feature files with the old code's SLPD outputs: prototype map and similar-slide search."""
    cohort = LEGACY / "cohort"
    labels, size = prototype_map(cohort / "slide1.h5")
    assert size == 4 * PS and labels.shape == (2, 2)
    with h5py.File(cohort / "slide1.h5") as f:
        expected = f["region_prototype"][()] + 1
    assert sorted(labels.ravel().tolist()) == sorted(expected.tolist())
    rows = similar_slides(cohort / "slide0.h5", cohort, top=5)
    assert sorted(r[0] for r in rows) == ["slide1", "slide2"]  # small.h5 has no prototypes


def test_legacy_partial_checkpoint_loads_and_resumes(tmp_path):
    """A run of the old code cancelled after epoch 1 resumes to the old code's finished weights."""
    partial = tmp_path / "slpd.safetensors"
    shutil.copy(LEGACY / "slpd_v1_partial.safetensors", partial)
    meta = read_slpd_metadata(partial)
    assert meta["epoch"] == 1 and not meta["complete"]
    assert load_slpd(partial).cfg.encoder.in_dim == DIM
    result = pretrain_slpd(_legacy_cohort(tmp_path), _tiny(epochs=2), partial, resume=True)
    assert result.epochs_run == 1 and len(result.history) == 2
    want, got = _tensors(LEGACY / "slpd_v1.safetensors"), _tensors(partial)
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_training_gives_the_old_codes_weights(tmp_path):
    """Same seed, same cohort: the weights and history of the old code's 2-epoch run."""
    ckpt = tmp_path / "new.safetensors"
    result = pretrain_slpd(_legacy_cohort(tmp_path), _tiny(epochs=2), ckpt, resume=False)
    want, got = _tensors(LEGACY / "slpd_v1.safetensors"), _tensors(ckpt)
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    old = read_slpd_metadata(LEGACY / "slpd_v1.safetensors")
    assert [h["epoch"] for h in result.history] == [h["epoch"] for h in old["history"]]
    for new_h, old_h in zip(result.history, old["history"], strict=True):
        assert new_h == pytest.approx(old_h, rel=1e-5, abs=1e-6)
    new_meta = read_slpd_metadata(ckpt)
    for key in ("config", "slides", "n_regions", "feature_dim", "epoch", "complete"):
        assert new_meta[key] == old[key], key


def test_cancelled_run_resumes_through_the_loop_to_the_same_weights(tmp_path):
    """Cancelled in epoch 2: the loop's run files are left; resuming gives the uninterrupted run's
    weights (the old code's), and a finished run leaves only its checkpoint and its log."""
    from hdmil.train.slpd_trainer import run_files

    cohort, ckpt = _legacy_cohort(tmp_path), tmp_path / "slpd.safetensors"
    files = run_files(ckpt)
    stop = threading.Event()

    def progress(stage, done, total):
        if stage == "train" and done == total // 2 + 1:  # first step of the last epoch
            stop.set()

    with pytest.raises(Cancelled, match="SLPD pre-training cancelled"):
        pretrain_slpd(cohort, _tiny(epochs=2), ckpt, progress=progress, cancel=stop, resume=False)
    assert files.state.is_file() and files.last.is_file()
    assert read_slpd_metadata(ckpt)["epoch"] == 1
    result = pretrain_slpd(cohort, _tiny(epochs=2), ckpt, resume=True)
    assert result.epochs_run == 1 and [h["epoch"] for h in result.history] == [1, 2]
    want, got = _tensors(LEGACY / "slpd_v1.safetensors"), _tensors(ckpt)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not files.state.exists() and not files.last.exists()
    assert result.log == files.log and len(files.log.read_text().splitlines()) == 3  # header + 2
