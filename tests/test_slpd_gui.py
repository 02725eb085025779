"""The SLPD part of the dock widget against real SLPD outputs: the prototype map (a Labels layer
aligned in µm with the slide, values from ``prototype_map``), the similar-slides list (scores from
``similar_slides``), clicking an entry opens that slide, and a slide without SLPD outputs gives a
clear notification while the widget stays usable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from qtpy.QtCore import Qt

from hdmil.features.io import write_features
from hdmil.models.slpd import slpd_config
from hdmil.slpd_index import prototype_map, similar_slides
from hdmil.train.slpd_trainer import pretrain_slpd
from napari_hdmil._qt.layer_store import layer_name
from napari_hdmil._widget import HDMILWidget

pytestmark = pytest.mark.gui

SIDE = 2048  # level-0 px of each synthetic slide
MPP = 0.5
PS = 128  # level-0 px per patch: a 16 × 16 patch grid, 4 × 4 regions of 4 × 4 patches (tiny)
DIM = 8


def _features(rng: np.random.Generator, kind: int, drop_block: tuple[int, int] | None):
    """Features of the full 16 × 16 grid; left half patch type A, right half type B (+ noise).
    ``drop_block`` (region row, col) leaves one 4 × 4 region without patches (no region there)."""
    n = SIDE // PS
    rr, cc = np.mgrid[:n, :n]
    keep = np.ones((n, n), bool)
    if drop_block is not None:
        br, bc = drop_block
        keep[br * 4 : br * 4 + 4, bc * 4 : bc * 4 + 4] = False
    rr, cc = rr[keep], cc[keep]
    coords = np.stack([cc, rr], 1) * PS  # (x, y) level 0
    centers = np.eye(DIM, dtype=np.float32) * 3
    types = np.where(cc < n // 2, kind % DIM, (kind + 3) % DIM)
    feats = centers[types] + rng.normal(scale=0.3, size=(len(coords), DIM)).astype(np.float32)
    return feats, coords


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three synthetic slides (a, b, c) with SLPD outputs in ``feats/``, slide ``small`` whose
    features there are too few regions for prototypes, and slide ``lonely`` without features."""
    from hdmil.synth import synth_slide

    root = tmp_path_factory.mktemp("slpd_gui")
    slides, feats = root / "slides", root / "feats"
    feats.mkdir()
    rng = np.random.default_rng(0)
    paths = {}
    for i, (name, kind, drop) in enumerate([("a", 0, (0, 3)), ("b", 0, None), ("c", 1, (2, 1))]):
        path = synth_slide(slides / f"slide_{name}.tiff", size=(SIDE, SIDE), seed=i + 1, mpp=MPP).path
        f, xy = _features(rng, kind, drop)
        attrs = {
            "patch_size_level0": PS, "slide": f"slide_{name}", "slide_path": str(Path(path).resolve()), "mpp": MPP,
        }  # fmt: skip
        write_features(feats / f"slide_{name}.h5", f, xy, attrs)
        paths[name] = Path(path)
    # 512 px: one region, too few for prototypes; its features are in the folder
    paths["small"] = Path(synth_slide(slides / "small.tiff", size=(512, 512), seed=8, mpp=MPP).path)
    n = 512 // PS
    xy = np.stack(np.meshgrid(np.arange(n), np.arange(n)), -1).reshape(-1, 2) * PS
    f = rng.normal(size=(len(xy), DIM)).astype(np.float32)
    write_features(feats / "small.h5", f, xy, {"patch_size_level0": PS, "slide": "small", "mpp": MPP})
    paths["lonely"] = Path(synth_slide(slides / "lonely.tiff", size=(512, 512), seed=9, mpp=MPP).path)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread beats two fighting on a shared machine
    try:
        pretrain_slpd(feats, slpd_config("tiny", epochs=2), root / "slpd.safetensors", resume=False)
    finally:
        torch.set_num_threads(n)
    return paths, feats


@pytest.fixture
def viewer_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = HDMILWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HDMIL", area="right")
    return viewer, widget


def _click(qtbot, button) -> None:
    qtbot.mouseClick(button, Qt.LeftButton)


def test_prototype_map_similar_list_and_open(viewer_widget, cohort, qtbot, errors):
    viewer, w = viewer_widget
    paths, feats = cohort
    viewer.open(str(paths["a"]), plugin="napari-hdmil")
    slide = viewer.layers["slide_a"]
    assert w.slide_box.value is slide
    w.index_edit.value = str(feats)

    # ---- prototype map: values of prototype_map, one pixel per region, aligned in µm
    _click(qtbot, w.protomap_button)
    assert errors() == []
    layer = viewer.layers[layer_name("prototype map", "slide_a")]  # named for its slide
    assert type(layer).__name__ == "Labels"
    pmap = prototype_map(feats / "slide_a.h5")
    np.testing.assert_array_equal(np.asarray(layer.data), pmap.labels)
    assert pmap.labels.shape == (4, 4) and pmap.region_size_level0 == 4 * PS
    assert pmap.labels[0, 3] == 0  # the dropped block: no region
    assert (pmap.labels[pmap.labels > 0] <= 2).all() and len(np.unique(pmap.labels[pmap.labels > 0])) == 2
    S = pmap.region_size_level0
    for r, c in [(0, 0), (1, 2), (3, 3)]:
        # the region's top-left corner (edge of its first level-0 pixel) in world µm ...
        corner = np.asarray(layer.data_to_world((r - 0.5, c - 0.5)))
        np.testing.assert_allclose(corner, (np.array([r * S, c * S]) - 0.5) * MPP, atol=1e-6)
        # ... is the same point as that level-0 pixel edge of the slide layer
        np.testing.assert_allclose(corner, slide.data_to_world((r * S - 0.5, c * S - 0.5)), atol=1e-6)
    far = np.asarray(layer.data_to_world((3.5, 3.5)))
    np.testing.assert_allclose(far, (SIDE - 0.5) * MPP, atol=1e-6)  # the map ends where the slide does

    # pressing it again replaces the layer instead of stacking a second one
    _click(qtbot, w.protomap_button)
    assert [lay.name for lay in viewer.layers].count(layer_name("prototype map", "slide_a")) == 1

    # ---- similar slides: the other slides, scores of similar_slides, best first
    _click(qtbot, w.similar_button)
    assert errors() == []
    expected = similar_slides(paths["a"], feats, top=5)
    assert [sid for sid, _, _ in expected] == ["slide_b", "slide_c"]  # a and b share a pattern
    items = [w.similar_list.item(i) for i in range(w.similar_list.count())]
    assert len(items) == 2
    for item, (sid, score, _) in zip(items, expected, strict=True):
        assert item.text().split() == [sid, f"{score:.3f}"]

    # ---- clicking an entry opens that slide as a new image layer
    target = items[1]
    rect = w.similar_list.visualItemRect(target)
    qtbot.mouseClick(w.similar_list.viewport(), Qt.LeftButton, pos=rect.center())
    qtbot.waitUntil(lambda: "slide_c" in [lay.name for lay in viewer.layers], timeout=10_000)
    opened = viewer.layers["slide_c"]
    assert type(opened).__name__ == "Image"
    assert Path(opened.metadata["slide_path"]).resolve() == paths["c"].resolve()
    assert errors() == []


def test_slide_without_slpd_outputs_notifies_and_widget_stays_usable(viewer_widget, cohort, qtbot, errors):
    viewer, w = viewer_widget
    paths, feats = cohort
    # no index folder chosen yet
    viewer.open(str(paths["lonely"]), plugin="napari-hdmil")
    _click(qtbot, w.protomap_button)
    assert any("index folder" in m for m in errors())

    w.index_edit.value = str(feats)
    before = len(errors())
    _click(qtbot, w.protomap_button)
    msgs = errors()[before:]
    assert len(msgs) == 1 and "lonely" in msgs[0] and "pretrain-slpd" in msgs[0]
    assert not any(lay.name.startswith("prototype map") for lay in viewer.layers)

    before = len(errors())
    _click(qtbot, w.similar_button)
    msgs = errors()[before:]
    assert len(msgs) == 1 and "lonely" in msgs[0] and "pretrain-slpd" in msgs[0]
    assert w.similar_list.count() == 0

    # features but too few regions for prototypes: said so, no empty layer
    viewer.open(str(paths["small"]), plugin="napari-hdmil")
    w.slide_box.value = viewer.layers["small"]
    before = len(errors())
    _click(qtbot, w.protomap_button)
    _click(qtbot, w.similar_button)
    msgs = errors()[before:]
    assert len(msgs) == 2 and all("small.h5" in m and "no SLPD prototypes" in m for m in msgs)
    assert not any(lay.name.startswith("prototype map") for lay in viewer.layers)
    assert w.similar_list.count() == 0

    # still usable: open a slide with outputs, pick it, and both actions work
    viewer.open(str(paths["b"]), plugin="napari-hdmil")
    w.slide_box.value = viewer.layers["slide_b"]
    before = len(errors())
    _click(qtbot, w.protomap_button)
    _click(qtbot, w.similar_button)
    assert errors()[before:] == []
    assert layer_name("prototype map", "slide_b") in [lay.name for lay in viewer.layers]
    assert w.similar_list.count() == 2  # a and c; small has no prototypes
