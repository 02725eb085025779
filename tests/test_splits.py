"""Labels, cohorts and k-fold splits by case: no patient in two sets, stratified, reproducible,
CLAM's split CSVs in and out."""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hdmil.errors import HDMILError
from hdmil.train.data import LabelsError, MissingFeaturesError, load_cohort, read_labels
from hdmil.train.splits import (
    Split,
    SplitError,
    make_splits,
    read_split_csv,
    read_splits,
    write_splits,
)


def _write_labels(path: Path, rows, header=("slide_id", "label", "case_id")) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def cohort(tmp_path):
    """60 cases, 1-3 slides each, three classes in proportion 3 : 2 : 1."""
    rng = np.random.default_rng(3)
    rows = []
    for case in range(60):
        label = ("benign", "luad", "lusc")[[0, 0, 0, 1, 1, 2][case % 6]]
        for k in range(int(rng.integers(1, 4))):
            rows.append((f"s{case:02d}_{k}", label, f"patient{case:02d}"))
    return read_labels(_write_labels(tmp_path / "labels.csv", rows))


# -- labels -------------------------------------------------------------------------------------


def test_read_labels_classes_cases(tmp_path):
    path = _write_labels(
        tmp_path / "l.csv", [("a", "10", ""), ("b", "2", "p1"), ("c", "2", "p1")],
    )
    c = read_labels(path)
    assert c.classes == ("2", "10")  # numeric order, not string order
    assert list(c.labels) == [1, 0, 0]
    assert c.case_ids == ("a", "p1", "p1")  # no case id: the slide is its own case
    c2 = read_labels(path, classes=["10", "2"])
    assert list(c2.labels) == [0, 1, 1]


def test_read_labels_errors(tmp_path):
    with pytest.raises(LabelsError, match="slide_id"):
        read_labels(_write_labels(tmp_path / "a.csv", [("x", "1")], header=("name", "label")))
    with pytest.raises(LabelsError, match="twice"):
        read_labels(_write_labels(tmp_path / "b.csv", [("x", "0", ""), ("x", "1", "")]))
    with pytest.raises(LabelsError, match="not among the classes"):
        read_labels(_write_labels(tmp_path / "c.csv", [("x", "0", ""), ("y", "2", "")]), classes=["0", "1"])
    with pytest.raises(LabelsError, match="two classes"):
        read_labels(_write_labels(tmp_path / "d.csv", [("x", "0", ""), ("y", "0", "")]))
    with pytest.raises(LabelsError, match="nope.csv"):
        read_labels(tmp_path / "nope.csv")


def test_missing_features_listed_or_skipped(tmp_path):
    import h5py

    feats = tmp_path / "features"
    feats.mkdir()
    for sid in ("a", "b"):
        with h5py.File(feats / f"{sid}.h5", "w") as h5:
            h5["features"] = np.zeros((3, 4), np.float32)
    rows = [("a", "0", ""), ("b.svs", "1", ""), ("c", "1", ""), ("d", "0", "")]
    labels = _write_labels(tmp_path / "l.csv", rows)
    with pytest.raises(MissingFeaturesError, match="2 of 4.*c, d"):
        load_cohort(labels, feats)
    with pytest.warns(UserWarning, match="skipping 2"):
        c = load_cohort(labels, feats, skip_missing=True)
    assert c.slide_ids == ("a", "b.svs")  # an id with the slide's extension finds b.h5
    assert c.skipped == ("c", "d")
    assert c.bags["b.svs"].features.shape == (3, 4)


# -- splits -------------------------------------------------------------------------------------


def test_no_case_in_two_sets_and_each_case_tested_once(cohort):
    splits = make_splits(cohort, k=5, seed=1)
    case_of = dict(zip(cohort.slide_ids, cohort.case_ids))
    tested = Counter()
    for s in splits:
        cases = {name: {case_of[x] for x in s[name]} for name in ("train", "val", "test")}
        for a, b in itertools.combinations(cases.values(), 2):
            assert not a & b
        assert sorted(s.all_ids) == sorted(cohort.slide_ids)  # every slide used in every fold
        tested.update(s.test)
    assert set(tested) == set(cohort.slide_ids) and set(tested.values()) == {1}


def test_stratified_by_label(cohort):
    k = 5
    splits = make_splits(cohort, k=k, seed=0)
    case_label = dict(zip(cohort.case_ids, cohort.labels))
    case_of = dict(zip(cohort.slide_ids, cohort.case_ids))
    for label in range(cohort.n_classes):
        per_fold = [
            sum(1 for c in {case_of[x] for x in s.test} if case_label[c] == label) for s in splits
        ]
        total = sum(1 for v in case_label.values() if v == label)
        assert sum(per_fold) == total
        assert max(per_fold) - min(per_fold) <= 1, (label, per_fold)


def test_deterministic_for_a_seed(cohort):
    a = make_splits(cohort, k=4, seed=7)
    b = make_splits(cohort, k=4, seed=7)
    c = make_splits(cohort, k=4, seed=8)
    assert a == b
    assert [s.test for s in a] != [s.test for s in c]


def test_clam_csv_round_trip(cohort, tmp_path):
    splits = make_splits(cohort, k=3, seed=0)
    paths = write_splits(splits, tmp_path / "splits")
    assert [p.name for p in paths] == ["splits_0.csv", "splits_1.csv", "splits_2.csv"]
    header = paths[0].read_text().splitlines()[0]
    assert header == ",train,val,test"  # CLAM's layout: unnamed index column first
    # CLAM also writes these beside the splits; they are not splits
    (tmp_path / "splits" / "splits_0_bool.csv").write_text(",train,val,test\nx,True,False,False\n")
    (tmp_path / "splits" / "splits_0_descriptor.csv").write_text(",train,val,test\n0,1,1,1\n")
    assert read_splits(tmp_path / "splits") == splits


def test_read_pandas_style_ragged_csv(tmp_path):
    # what pandas' to_csv writes for ragged columns: NaN cells, and files without an index
    p = tmp_path / "splits_4.csv"
    p.write_text(",train,val,test\n0,a,c,e\n1,b,d,\n2,f,NaN,nan\n")
    s = read_split_csv(p)
    assert s == Split(("a", "b", "f"), ("c", "d"), ("e",), fold=4)
    q = tmp_path / "noindex.csv"
    q.write_text("train,val,test\na,b,c\n")
    assert read_split_csv(q, fold=0) == Split(("a",), ("b",), ("c",), fold=0)


def test_split_errors(cohort, tmp_path):
    with pytest.raises(SplitError, match="at least 3"):
        make_splits(cohort, k=2)
    with pytest.raises(SplitError, match="at least 100 cases"):
        make_splits(cohort, k=100)
    bad = tmp_path / "splits_0.csv"
    bad.write_text(",train,val,test\n0,a,a,\n")
    with pytest.raises(SplitError, match="both train and val"):
        read_split_csv(bad)
    bad.write_text(",train,test\n0,a,b\n")
    with pytest.raises(SplitError, match="missing val"):
        read_split_csv(bad)
    with pytest.raises(SplitError, match="no splits_"):
        read_splits(_empty_dir(tmp_path))
    assert issubclass(SplitError, HDMILError)


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_restrict_drops_slides(cohort):
    s = make_splits(cohort, k=3, seed=0)[0]
    keep = set(cohort.slide_ids[::2])
    r = s.restrict(keep)
    assert set(r.all_ids) == keep & set(s.all_ids)
    assert set(r.test) <= set(s.test)
