"""Our feature files read by CLAM's and TRIDENT's code, and theirs by ours (issue 18 §3).

The readers below are written from CLAM's and TRIDENT's published code, reading exactly the
datasets and attribute names their functions read (docs: ../shared/docs/ECOSYSTEM.md):

- CLAM ``datasets/dataset_h5.Whole_Slide_Bag_FP``: ``coords`` and its ``patch_level`` and
  ``patch_size``, then ``wsi.read_region(coord, patch_level, (patch_size, patch_size))``;
- CLAM ``wsi_core/WholeSlideImage.StitchCoords``: ``patch_size`` scaled by the level's downsample;
- CLAM's patching ``save_hdf5`` attributes on ``coords``: ``patch_size``, ``patch_level``,
  ``downsample``, ``downsampled_level_dim``, ``level_dim``, ``name``, ``save_path``;
- CLAM ``datasets/dataset_generic.Generic_MIL_Dataset``: ``<dir>/pt_files/<slide>.pt`` (a
  tensor, ``torch.load``) or ``<dir>/h5_files/<slide>.h5`` (``features``, ``coords``);
- TRIDENT ``read_coords`` (all ``coords`` attributes), ``read_coords_legacy`` (``patch_size``,
  ``patch_level``, ``custom_downsample`` default 1), ``visualize_coords`` and the TITAN /
  GigaPath slide encoders (``patch_size_level0``), ``extract_patch_features`` (``patch_size``,
  ``level0_magnification``, ``target_magnification``), and ``encoder`` on ``features``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hdmil.cli import main
from hdmil.features import read_features
from hdmil.features.io import FeatureBag, coords_attributes, find_feature_files, write_features
from hdmil.slide import open_slide
from helpers import TINY

# -- the peers' readers, as their code reads ---------------------------------------------------


def clam_whole_slide_bag_fp(h5_path: Path, slide_path: Path) -> list[np.ndarray]:
    """CLAM's Whole_Slide_Bag_FP: every patch region as CLAM's extraction reads it."""
    with h5py.File(h5_path, "r") as f:
        dset = f["coords"]
        patch_level = int(f["coords"].attrs["patch_level"])
        patch_size = int(f["coords"].attrs["patch_size"])
        coords = dset[:]
    with open_slide(slide_path) as wsi:
        return [wsi.read_region(tuple(int(v) for v in c), patch_level, (patch_size, patch_size))
                for c in coords]


def clam_stitch_patch_size(h5_path: Path, slide_path: Path) -> tuple[int, int]:
    """CLAM's StitchCoords: the level-0 size of a patch it paints into the heatmap canvas."""
    with h5py.File(h5_path, "r") as file, open_slide(slide_path) as wsi:
        dset = file["coords"]
        patch_size = dset.attrs["patch_size"]
        patch_level = dset.attrs["patch_level"]
        ds = wsi.level_downsamples[patch_level]
        return tuple((np.array((patch_size, patch_size)) * ds).astype(np.int32).tolist())


CLAM_PATCHING_ATTRS = ("patch_size", "patch_level", "downsample", "downsampled_level_dim",
                       "level_dim", "name", "save_path")


def clam_generic_mil_item(data_dir: Path, slide_id: str, use_h5: bool) -> torch.Tensor:
    """CLAM's Generic_MIL_Dataset.__getitem__ (data_dir = the extraction's output root)."""
    if not use_h5:
        return torch.load(os.path.join(data_dir, "pt_files", f"{slide_id}.pt"))
    with h5py.File(os.path.join(data_dir, "h5_files", f"{slide_id}.h5"), "r") as hdf5_file:
        features = hdf5_file["features"][:]
        hdf5_file["coords"][:]
    return torch.from_numpy(features)


def trident_read_coords(path: Path) -> tuple[dict, np.ndarray]:
    with h5py.File(path, "r") as f:
        return dict(f["coords"].attrs), f["coords"][:]


def trident_read_coords_legacy(path: Path) -> tuple[int, int, int, np.ndarray]:
    with h5py.File(path, "r") as f:
        patch_size = f["coords"].attrs["patch_size"]
        patch_level = f["coords"].attrs["patch_level"]
        custom_downsample = f["coords"].attrs.get("custom_downsample", 1)
        coords = f["coords"][:]
    return int(patch_size), int(patch_level), int(custom_downsample), coords


def trident_slide_encoder_inputs(path: Path) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """What TITAN / GigaPath's slide encoders take from a TRIDENT feature file."""
    with h5py.File(path, "r") as f:
        feats = torch.from_numpy(f["features"][:])
        coords = torch.from_numpy(f["coords"][:])
        patch_size_lv0 = int(f["coords"].attrs["patch_size_level0"])
        encoder = f["features"].attrs["encoder"]
    return feats, coords, patch_size_lv0, encoder


def trident_patcher_args(path: Path) -> tuple[int, float, float, int, int]:
    """extract_patch_features / visualize_coords: the geometry they read from ``coords``."""
    attrs, _ = trident_read_coords(path)
    return (int(attrs["patch_size"]), float(attrs["level0_magnification"]),
            float(attrs["target_magnification"]), int(attrs["patch_size_level0"]),
            int(attrs["overlap"]))


# -- our files through them --------------------------------------------------------------------


@pytest.fixture(scope="module")
def clam_root(synthetic_slide, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clam")
    rc = main(["features", str(synthetic_slide), "--encoder", TINY, "--out", str(out),
               "--layout", "clam", "--batch-size", "32"])
    assert rc == 0
    return out


def test_clam_reads_our_clam_layout(clam_root, synthetic_slide):
    sid = synthetic_slide.stem
    h5 = clam_root / "h5_files" / f"{sid}.h5"
    ours = read_features(h5)
    with h5py.File(h5, "r") as f:
        assert set(CLAM_PATCHING_ATTRS) <= set(f["coords"].attrs)
        assert f["coords"].attrs["name"] == sid and f["coords"].attrs["level_dim"].tolist() == [4096, 3072]
    # Generic_MIL_Dataset, both ways: the same features, the .pt a plain tensor
    pt = clam_generic_mil_item(clam_root, sid, use_h5=False)
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32
    np.testing.assert_array_equal(pt.numpy(), ours.features)
    np.testing.assert_array_equal(clam_generic_mil_item(clam_root, sid, use_h5=True).numpy(), ours.features)
    # Whole_Slide_Bag_FP reads, for each coord, exactly the region we embedded
    regions = clam_whole_slide_bag_fp(h5, synthetic_slide)
    ps0 = ours.attrs["patch_size_level0"]
    assert len(regions) == len(ours) and regions[0].shape == (ps0, ps0, 3)
    with open_slide(synthetic_slide) as s:
        c = ours.coords[len(ours) // 2]
        np.testing.assert_array_equal(regions[len(ours) // 2], s.read_region(tuple(c), 0, (ps0, ps0)))
    assert clam_stitch_patch_size(h5, synthetic_slide) == (ps0, ps0)
    # and every command finds the files under the CLAM root (pt and h5: the h5 wins)
    assert find_feature_files(clam_root) == {sid: h5}


def test_trident_reads_our_files(clam_root, synthetic_slide):
    h5 = clam_root / "h5_files" / f"{synthetic_slide.stem}.h5"
    ours = read_features(h5)
    attrs, coords = trident_read_coords(h5)
    np.testing.assert_array_equal(coords, ours.coords)
    assert {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
            "overlap", "name", "savetodir", "level0_width", "level0_height"} <= set(attrs)
    patch_size, level0_mag, target_mag, ps0, overlap = trident_patcher_args(h5)
    # 0.5 µm/px is a 20x level 0: TRIDENT's patch size at 20x is our patch_px, 256 px
    assert (level0_mag, target_mag, overlap) == (20.0, 20.0, 0)
    assert patch_size == ps0 * target_mag / level0_mag == ours.attrs["patch_px"] == 256
    assert trident_read_coords_legacy(h5)[:3] == (256, 0, 1)
    feats, tcoords, ps_lv0, encoder = trident_slide_encoder_inputs(h5)
    assert ps_lv0 == 256 and encoder == TINY and feats.shape == (len(ours), 8)
    assert (attrs["level0_width"], attrs["level0_height"]) == (4096, 3072)


def test_coords_attributes_of_a_40x_slide():
    a = coords_attributes({"patch_size_level0": 512, "magnification": 20.0, "level0_magnification": 40.0,
                           "slide": "s", "slide_width": 9000, "slide_height": 7000}, "/out")
    # CLAM reads 512 px at level 0; TRIDENT's slide encoders read patch_size_level0
    assert (a["patch_size"], a["patch_level"], a["patch_size_level0"]) == (512, 0, 512)
    assert a["downsample"].tolist() == [1.0, 1.0] and a["level_dim"].tolist() == [9000, 7000]
    assert (a["target_magnification"], a["level0_magnification"], a["save_path"]) == (20.0, 40.0, "/out")
    assert coords_attributes({}) == {}


def test_our_own_files_keep_their_grid_check_and_attrs(tmp_path):
    coords = np.array([[0, 0], [512, 0], [1024, 512]], np.int64)
    bag = FeatureBag(np.ones((3, 4), np.float32), coords,
                     {"encoder": "x", "patch_size_level0": 512, "patch_px": 256, "magnification": 20.0})
    back = read_features(write_features(tmp_path / "s.h5", bag))
    assert "coords_attrs" not in back.attrs and back.attrs["patch_size_level0"] == 512
    bad = FeatureBag(bag.features, coords + [[0, 0], [0, 0], [100, 0]], bag.attrs)
    from hdmil.errors import FeatureFileError

    with pytest.raises(FeatureFileError, match="off the grid of 512 px"):
        read_features(write_features(tmp_path / "bad.h5", bad))


def _trident_file(path: Path, feats: np.ndarray, coords: np.ndarray, encoder: str = "uni_v1") -> Path:
    """A feature file as TRIDENT writes it: no root attributes, geometry on coords, encoder on features."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats).attrs["encoder"] = encoder
        c = f.create_dataset("coords", data=coords)
        c.attrs.update({"patch_size": 256, "patch_size_level0": 256, "level0_magnification": 20,
                        "target_magnification": 20, "overlap": 0, "name": path.stem,
                        "savetodir": str(path.parent), "level0_width": 4096, "level0_height": 3072})
    return path


def test_trident_encoder_attribute_is_read_and_mapped(tmp_path):
    from hdmil.features.recipe import recipe_from_attrs

    job = tmp_path / "job"
    path = _trident_file(job / "20x_256px_0px_overlap" / "features_uni_v1" / "s.h5",
                         np.ones((2, 1024), np.float32), np.array([[0, 0], [256, 0]]))
    assert find_feature_files(job) == {"s": path}  # a TRIDENT job folder, two levels down
    bag = read_features(path)
    assert bag.attrs["encoder"] == "uni_v1"
    recipe = recipe_from_attrs(bag.attrs)
    assert (recipe.name, recipe.weights, recipe.hub_id, recipe.source, recipe.dim) == (
        "uni", "pretrained", "hf-hub:MahmoodLab/uni", "trident", 1024)
    # rewritten by us (e.g. to add lr_patches) it keeps TRIDENT's attributes where TRIDENT reads them
    out = write_features(tmp_path / "again.h5", bag)
    attrs, _ = trident_read_coords(out)
    assert attrs["level0_width"] == 4096 and attrs["savetodir"] == str(path.parent)
    assert trident_slide_encoder_inputs(out)[3] == "uni_v1"


def test_similar_index_accepts_clam_root_and_trident_job(tmp_path):
    from hdmil.slpd_index import index_folder, load_index

    clam = tmp_path / "clam"
    for sid in ("a", "b"):
        write_features(clam / "h5_files" / f"{sid}.h5", np.ones((2, 4), np.float32))
        with h5py.File(clam / "h5_files" / f"{sid}.h5", "a") as f:
            f["prototypes"] = np.eye(2, 8, k={"a": 0, "b": 1}[sid], dtype=np.float32)
    assert index_folder(clam) == clam / "h5_files"
    assert load_index(clam).slide_ids == ["a", "b"]
    job = tmp_path / "job"
    _trident_file(job / "20x_256px_0px_overlap" / "features_uni_v1" / "c.h5",
                  np.ones((1, 4), np.float32), np.array([[0, 0]]))
    idx = load_index(job)
    assert idx.slide_ids == [] and [p.name for p in idx.without_prototypes] == ["c.h5"]
    rc = main(["similar", str(clam / "h5_files" / "a.h5"), "--index", str(clam), "--top", "1"])
    assert rc == 0


def test_same_encoder_skip_compares_weights_not_only_names(tmp_path, synthetic_slide, capsys):
    from hdmil.features import create_encoder, save_encoder

    enc = create_encoder(TINY, device="cpu")
    with torch.no_grad():
        for p in enc.model.parameters():
            p.add_(0.5)
    weights = save_encoder(enc, tmp_path / "w.safetensors")
    out = tmp_path / "f"
    assert main(["features", str(synthetic_slide), "--encoder", TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    # same architecture, other weights: recomputed, not skipped as "same encoder"
    assert main(["features", str(synthetic_slide), "--encoder", str(weights), "--out", str(out)]) == 0
    assert "skipped" not in capsys.readouterr().err
    recipe = json.loads(read_features(out / f"{synthetic_slide.stem}.h5").attrs["encoder_recipe"])
    assert recipe["weights"] == "file" and recipe["file"] == "w.safetensors" and len(recipe["sha256"]) == 64
    assert main(["features", str(synthetic_slide), "--encoder", str(weights), "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().err


def test_dmin_trained_on_a_trident_job_records_trident_encoder(tmp_path, synthetic_slide, capsys):
    from hdmil.checkpoint import read_checkpoint_config
    from hdmil.features import create_encoder, save_encoder
    from hdmil.train import DMINTrainConfig, train_dmin
    from hdmil.train.data import load_cohort
    from hdmil.train.splits import Split

    rng = np.random.default_rng(0)
    job = tmp_path / "job"
    feats_dir = job / "20x_256px_0px_overlap" / "features_uni_v1"
    grid = np.array([[x, y] for y in range(0, 1024, 256) for x in range(0, 1024, 256)])
    for i in range(4):
        _trident_file(feats_dir / f"s{i}.h5", rng.normal(i % 2, 1, (16, 8)).astype(np.float32), grid)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ns0,a\ns1,b\ns2,a\ns3,b\n")
    cohort = load_cohort(labels, job)  # the job folder, as every command takes it
    cfg = DMINTrainConfig(max_epochs=1, min_epochs=1, patience=1, hidden=16, device="cpu")
    res = train_dmin(cohort, Split(("s0", "s1"), ("s2", "s3"), ("s2", "s3")), cfg, tmp_path / "run")
    config = read_checkpoint_config(res.checkpoint)
    assert config["encoder"] == "uni"
    assert config["encoder_recipe"] == {"name": "uni", "weights": "pretrained", "kwargs": {}, "dim": 8,
                                        "hub_id": "hf-hub:MahmoodLab/uni", "source": "trident"}
    # another encoder than TRIDENT's UNI is refused, even of the right width
    enc = create_encoder(TINY, device="cpu")
    other = save_encoder(enc, tmp_path / "tiny.safetensors")
    capsys.readouterr()
    rc = main(["predict", str(synthetic_slide), "--model", str(res.checkpoint), "--out", str(tmp_path / "o"),
               "--no-lipn", "--encoder", str(other)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.splitlines()[-1] == (
        f"hdmil predict: error: --encoder {other}: it is encoder '{TINY}', but the DMIN in {res.checkpoint} "
        "was trained on features of uni (pretrained, hf-hub:MahmoodLab/uni); refused")
