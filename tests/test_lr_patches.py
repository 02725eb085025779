"""LIPN from peers' feature files (issue 18 §4): ``hdmil add-lr-patches`` reads each row's LR
patch from its slide, for CLAM's offset grids and TRIDENT's job folders, so ``train-lipn`` runs.

The peers' files are written here as CLAM's and TRIDENT's code writes them
(../shared/docs/ECOSYSTEM.md): CLAM ``h5_files/<slide>.h5`` with its patching attributes on
``coords`` (or, as its feature extraction leaves them, none), TRIDENT
``<job>/20x_256px_0px_overlap/features_<encoder>/<slide>.h5`` with its attributes on ``coords``
and ``encoder`` on ``features``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from hdmil.cli import main
from hdmil.features import read_features
from hdmil.features.lr_patches import add_lr_patches, read_lr_patches
from hdmil.grid import build_grid
from hdmil.slide import open_slide
from helpers import TINY

OFFSET = (37, 91)  # a CLAM contour's own corner: not on a grid from (0, 0)
SIZE = (2048, 1536)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Four small synthetic slides (two with tumour), our own feature files of each (the LR
    patches `hdmil features` writes), and labels."""
    from hdmil.synth import synth_slide

    root = tmp_path_factory.mktemp("lr")
    slides = root / "slides"
    slides.mkdir()
    for i in range(4):
        synth_slide(slides / f"s{i}.tiff", size=SIZE, seed=10 + i, tumor_fraction=0.25 if i % 2 else 0.0)
    ours = root / "ours"
    assert main(["features", *map(str, sorted(slides.glob("*.tiff"))), "--encoder", TINY,
                 "--out", str(ours), "--batch-size", "64"]) == 0
    labels = root / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"s{i},{'tumor' if i % 2 else 'normal'}\n" for i in range(4)))
    splits = root / "splits"
    splits.mkdir()
    (splits / "splits_0.csv").write_text("train,val,test\ns0,s2,\ns1,s3,\n")
    return {"root": root, "slides": slides, "ours": ours, "labels": labels, "splits": splits}


def _trident(path: Path, feats: np.ndarray, coords: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats).attrs["encoder"] = "uni_v1"
        f.create_dataset("coords", data=coords).attrs.update({
            "patch_size": 256, "patch_size_level0": 256, "level0_magnification": 20.0,
            "target_magnification": 20.0, "overlap": 0, "name": path.stem, "savetodir": str(path.parent),
            "level0_width": SIZE[0], "level0_height": SIZE[1]})
    return path


def _clam(path: Path, feats: np.ndarray, coords: np.ndarray, patching_attrs: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["features"] = feats
        c = f.create_dataset("coords", data=coords.astype(np.int32))
        if patching_attrs:
            c.attrs.update({"patch_size": 256, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
                            "downsampled_level_dim": np.array(SIZE), "level_dim": np.array(SIZE),
                            "name": path.stem, "save_path": str(path.parent)})
    return path


def _offset_coords(grid_coords: np.ndarray) -> np.ndarray:
    c = grid_coords + np.array(OFFSET)
    return c[(c[:, 0] < SIZE[0]) & (c[:, 1] < SIZE[1])]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_on_our_grid_they_are_the_lr_patches_hdmil_features_writes(cohort, tmp_path):
    job = tmp_path / "job"
    for i in range(4):
        bag = read_features(cohort["ours"] / f"s{i}.h5")
        _trident(job / "20x_256px_0px_overlap" / "features_uni_v1" / f"s{i}.h5", bag.features, bag.coords)
    before = _digest(job)
    out = tmp_path / "out"
    rc = main(["add-lr-patches", str(job), "--slides", str(cohort["slides"]), "--out", str(out)])
    assert rc == 0
    assert _digest(job) == before  # the peers' files are left as they were
    for i in range(4):
        mine = read_features(out / "20x_256px_0px_overlap" / "features_uni_v1" / f"s{i}.h5")
        theirs = read_features(cohort["ours"] / f"s{i}.h5")
        assert np.array_equal(mine.lr_patches, theirs.lr_patches)
        assert np.array_equal(mine.features, theirs.features)
        assert mine.attrs["encoder"] == "uni_v1"  # TRIDENT's attribute on features kept
        with h5py.File(mine.path) as f:
            assert f["coords"].attrs["patch_size_level0"] == 256 and f["coords"].attrs["level0_width"] == SIZE[0]


def test_offset_grid_reads_each_patch_where_it_lies(cohort):
    """At an offset the level's pixels align with (multiples of its downsample), an LR patch is
    the plain 4 x 4 block mean of that level's pixels under the patch."""
    with open_slide(cohort["slides"] / "s1.tiff") as slide:
        grid = build_grid(slide)
        assert slide.level_downsamples[1] == 4.0  # the level build_grid reads LR patches from
        coords = grid.coords[:6] + np.array([36, 92])  # multiples of 4
        lr = read_lr_patches(slide, coords, 256)
        for (x, y), got in zip(coords, lr):
            region = np.asarray(slide.read_region((int(x), int(y)), 1, (64, 64)))[..., :3].astype(np.float64)
            want = region.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
            assert np.abs(got - want).max() <= 0.5 + 1e-6
        # elsewhere it moves with the patch: not the grid's LR patch of the cell it started in
        moved = read_lr_patches(slide, grid.coords[:6] + np.array(OFFSET), 256)
        assert not np.array_equal(moved, grid.lr_patches()[:6])


def test_clam_and_trident_cohorts_train_lipn_end_to_end(cohort, tmp_path):
    rng = np.random.default_rng(0)
    clam, job = tmp_path / "clam", tmp_path / "job"
    for i in range(4):
        bag = read_features(cohort["ours"] / f"s{i}.h5")
        coords = _offset_coords(bag.coords)
        feats = rng.normal(i % 2, 1, (len(coords), 8)).astype(np.float32)
        # s3 as CLAM's feature extraction leaves it: no attributes at all
        _clam(clam / "h5_files" / f"s{i}.h5", feats, coords, patching_attrs=i != 3)
        _trident(job / "20x_256px_0px_overlap" / "features_uni_v1" / f"s{i}.h5", feats, bag.coords)
    for name, feats_dir in (("clam", clam), ("trident", job)):
        out = tmp_path / f"{name}_lr"
        assert main(["add-lr-patches", str(feats_dir), "--slides", str(cohort["slides"]), "--out", str(out)]) == 0
        bag = read_features(next(out.rglob("s3.h5")))
        assert bag.lr_patches.shape == (len(bag), 16, 16, 3)
        assert np.array_equal(bag.grid_index(), bag.coords[:, ::-1] // 256)  # the grid index
        common = ["--features", str(out), "--labels", str(cohort["labels"]), "--splits", str(cohort["splits"])]
        run = tmp_path / f"{name}_run"
        assert main(["train-dmin", *common, "--out", str(run / "dmin"), "--epochs", "1", "--min-epochs", "1",
                     "--hidden", "16", "--attn-dim", "8", "--k-sample", "2", "--device", "cpu"]) == 0
        assert main(["train-lipn", *common, "--dmin", str(run / "dmin"), "--out", str(run / "lipn"),
                     "--epochs", "1", "--min-epochs", "1"]) == 0
        assert (run / "lipn" / "fold_0" / "hdmil.safetensors").is_file()
    # CLAM's offset rows got the LR patches at their own positions, not their grid cell's
    lr = read_features(tmp_path / "clam_lr" / "h5_files" / "s0.h5")
    with open_slide(cohort["slides"] / "s0.tiff") as slide:
        assert np.array_equal(lr.lr_patches, read_lr_patches(slide, lr.coords, 256))


def test_a_bad_file_is_one_line_and_the_others_go_on(cohort, tmp_path, capsys):
    clam = tmp_path / "clam"
    bag = read_features(cohort["ours"] / "s0.h5")
    _clam(clam / "h5_files" / "s0.h5", bag.features, _offset_coords(bag.coords))
    _clam(clam / "h5_files" / "ghost.h5", bag.features, bag.coords)  # no such slide
    far = bag.coords.copy()
    far[2] = (SIZE[0] + 512, 0)
    _clam(clam / "h5_files" / "s1.h5", bag.features, far, patching_attrs=False)  # outside its slide
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["add-lr-patches", str(clam), "--slides", str(cohort["slides"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 2
    ghost = clam / "h5_files" / "ghost.h5"
    assert f"error: {ghost}: no slide named ghost among the slides given (--slides)" in errors[0]
    assert f"{clam / 'h5_files' / 's1.h5'}: 1 of {len(far)} patch coords lie outside the 2048 x 1536 px" in errors[1]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["s0.h5"]  # only inside --out


def test_where_it_writes(cohort, tmp_path, capsys):
    ours = tmp_path / "ours"
    bag = read_features(cohort["ours"] / "s2.h5")
    _trident(ours / "s2.h5", bag.features, bag.coords)
    with pytest.raises(Exception, match="--out DIR.*--in-place"):
        add_lr_patches(ours, [cohort["slides"]])
    rc = main(["add-lr-patches", str(ours), "--slides", str(cohort["slides"]), "--out", str(ours)])
    assert rc == 1 and "--out is the feature folder itself" in capsys.readouterr().err
    assert main(["add-lr-patches", str(ours), "--slides", str(cohort["slides"]), "--in-place"]) == 0
    assert np.array_equal(read_features(ours / "s2.h5").lr_patches, bag.lr_patches)
    # a file that has them: skipped in place, copied unchanged to --out
    [again] = add_lr_patches(ours, [cohort["slides"]], in_place=True)
    assert again.status == "skipped"
    [copied] = add_lr_patches(ours, [cohort["slides"]], out=tmp_path / "copy")
    assert copied.status == "kept" and np.array_equal(read_features(copied.target).lr_patches, bag.lr_patches)
