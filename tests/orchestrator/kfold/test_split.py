"""Fold splitting: property tests on random COCO dicts, files and manifest, errors."""

from __future__ import annotations

import json
import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.errors import ConfigError, DataError
from orchestrator.kfold.split import (
    balance_table,
    check_folds,
    read_folds,
    split_folds,
    verify_folds,
    write_folds,
)


def make_coco(image_classes: list[list[int]], n_classes: int, groups: list[int] | None = None) -> dict:
    """A COCO dict: image i has one annotation per entry of ``image_classes[i]`` (class index)."""
    images, annotations = [], []
    for i, classes in enumerate(image_classes):
        g = groups[i] if groups else i
        images.append({"id": 100 + i, "file_name": f"vid{g:03d}_frame{i:04d}.png", "width": 64,
                       "height": 64, "site": f"s{g}"})
        for c in classes:
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": c + 1,
                                "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0})
    return {"info": {"description": "t"}, "licenses": [{"id": 1, "name": "x"}], "images": images,
            "annotations": annotations,
            "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(n_classes)]}


@st.composite
def cocos(draw):
    n_classes = draw(st.integers(1, 4))
    n_images = draw(st.integers(2, 30))
    image_classes = draw(st.lists(st.lists(st.integers(0, n_classes - 1), max_size=4),
                                  min_size=n_images, max_size=n_images))
    groups = draw(st.lists(st.integers(0, max(1, n_images // 3)), min_size=n_images, max_size=n_images))
    k = draw(st.integers(2, min(5, n_images)))
    return make_coco(image_classes, n_classes, groups), k, draw(st.integers(0, 2**16))


def val_fold_of(folds) -> dict[int, int]:
    return {i: f.fold for f in folds for i in f.val_ids}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cocos())
def test_folds_partition_images_without_leakage(case):
    coco, k, seed = case
    folds = split_folds(coco, k, seed=seed, allow_small_classes=True)
    ids = sorted(img["id"] for img in coco["images"])
    assert len(folds) == k
    assert sorted(i for f in folds for i in f.val_ids) == ids  # each image validated exactly once
    for f in folds:
        assert not set(f.train_ids) & set(f.val_ids)
        assert sorted(f.train_ids + f.val_ids) == ids
        assert f.val_ids, "every fold validates on at least one image"
    check_folds(coco, folds)


@settings(max_examples=40, deadline=None)
@given(cocos())
def test_split_is_deterministic_from_the_seed(case):
    coco, k, seed = case
    first = split_folds(coco, k, seed=seed, allow_small_classes=True)
    shuffled = dict(coco, annotations=list(reversed(coco["annotations"])))
    assert split_folds(shuffled, k, seed=seed, allow_small_classes=True) == first
    assert split_folds(coco, k, seed=seed, allow_small_classes=True) == first


@settings(max_examples=40, deadline=None)
@given(cocos(), st.sampled_from(["key", "regex"]))
def test_groups_stay_together(case, how):
    coco, k, seed = case
    n_groups = len({img["site"] for img in coco["images"]})
    kwargs = {"group_key": "site"} if how == "key" else {"group_regex": r"^(vid\d+)_"}
    if k > n_groups:
        with pytest.raises(ConfigError, match="groups"):
            split_folds(coco, k, seed=seed, allow_small_classes=True, **kwargs)
        return
    folds = split_folds(coco, k, seed=seed, allow_small_classes=True, **kwargs)
    check_folds(coco, folds)
    fold_of = val_fold_of(folds)
    by_group: dict[str, set[int]] = {}
    for img in coco["images"]:
        by_group.setdefault(img["site"], set()).add(fold_of[img["id"]])
    assert all(len(s) == 1 for s in by_group.values())


def _imbalance(coco, folds, n_classes: int) -> float:
    """Mean over classes and folds of |images with the class in the val fold - expected|."""
    k = len(folds)
    present: dict[int, set[int]] = {}
    for a in coco["annotations"]:
        present.setdefault(a["category_id"], set()).add(a["image_id"])
    total = 0.0
    for c in range(1, n_classes + 1):
        ids = present.get(c, set())
        for f in folds:
            total += abs(len(ids & set(f.val_ids)) - len(ids) / k)
    return total / (n_classes * k)


def test_class_balance_at_least_as_good_as_plain_kfold_on_average():
    from sklearn.model_selection import KFold

    from orchestrator.kfold.split import FoldSplit

    rng = random.Random(0)
    strat, plain = [], []
    for trial in range(40):
        n_classes, n_images, k = rng.randint(2, 6), rng.randint(20, 60), rng.randint(2, 5)
        # skewed class frequencies, as in real detection data
        weights = [2.0 ** -c for c in range(n_classes)]
        image_classes = [rng.choices(range(n_classes), weights, k=rng.randint(0, 3)) for _ in range(n_images)]
        coco = make_coco(image_classes, n_classes)
        strat.append(_imbalance(coco, split_folds(coco, k, seed=trial, allow_small_classes=True), n_classes))
        ids = [img["id"] for img in coco["images"]]
        kf = KFold(n_splits=k, shuffle=True, random_state=trial)
        folds = [FoldSplit(j, tuple(ids[t] for t in tr), tuple(ids[v] for v in va))
                 for j, (tr, va) in enumerate(kf.split(ids))]
        plain.append(_imbalance(coco, folds, n_classes))
    assert sum(strat) / len(strat) < 0.8 * sum(plain) / len(plain)


def test_images_without_annotations_are_spread():
    coco = make_coco([[0]] * 6 + [[]] * 6, 1)
    folds = split_folds(coco, 3, seed=1)
    empty = {img["id"] for img in coco["images"][6:]}
    assert [len(set(f.val_ids) & empty) for f in folds] == [2, 2, 2]
    assert [len(f.val_ids) for f in folds] == [4, 4, 4]


def test_errors_for_bad_k_and_small_classes(caplog):
    coco = make_coco([[0], [0], [0], [1], [0, 1]], 2)
    with pytest.raises(ConfigError, match="more than the 5 images"):
        split_folds(coco, 6)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        split_folds(coco, 1)
    with pytest.raises(ConfigError, match=r"c1 \(2\).*--allow-small-classes"):
        split_folds(coco, 3)
    with caplog.at_level(logging.WARNING):
        folds = split_folds(coco, 3, allow_small_classes=True)
    assert "fewer than 3 images" in caplog.text and len(folds) == 3
    with pytest.raises(ConfigError, match="does not match file_name"):
        split_folds(coco, 2, group_regex=r"^nomatch(\d+)")
    with pytest.raises(ConfigError, match="missing from 5 image"):
        split_folds(coco, 2, group_key="video")
    with pytest.raises(ConfigError, match="not both"):
        split_folds(coco, 2, group_key="site", group_regex="x")


def test_check_folds_reports_leaks():
    from orchestrator.kfold.split import FoldSplit

    coco = make_coco([[0]] * 4, 1)
    good = split_folds(coco, 2)
    check_folds(coco, good)
    a, b = good
    with pytest.raises(DataError, match="validation sets of folds 0 and 1"):
        check_folds(coco, [a, FoldSplit(1, b.train_ids, b.val_ids + a.val_ids[:1])])
    with pytest.raises(DataError, match="both train and val"):
        check_folds(coco, [FoldSplit(0, a.train_ids + a.val_ids, a.val_ids), b])


def test_write_folds_files_manifest_and_table(tmp_path):
    coco = make_coco([[0], [1], [0, 1], [], [0], [1], [0, 0]], 2)
    src = tmp_path / "ann.json"
    src.write_text(json.dumps(coco))
    folds = split_folds(coco, 3, seed=5, allow_small_classes=True)
    manifest = write_folds(coco, folds, tmp_path / "folds", ann_file=src, seed=5, group_key=None)
    assert manifest["k"] == 3 and manifest["seed"] == 5
    assert len(manifest["source"]["sha256"]) == 64
    val0 = json.loads((tmp_path / "folds" / "val_0.json").read_text())
    assert val0["info"] == coco["info"] and val0["licenses"] == coco["licenses"]
    assert val0["categories"] == coco["categories"]
    assert {a["image_id"] for a in val0["annotations"]} <= {i["id"] for i in val0["images"]}
    on_disk = json.loads((tmp_path / "folds" / "manifest.json").read_text())
    assert on_disk == manifest
    assert read_folds(tmp_path / "folds") == folds
    check_folds(coco, read_folds(tmp_path / "folds"))
    (tmp_path / "folds" / "train_1.json").write_text("{}")
    with pytest.raises(DataError, match="train_1.json is missing or changed"):
        verify_folds(tmp_path / "folds")

    table = balance_table(coco, folds)
    assert "c0" in table and "c1" in table and "all" in table
    total_row = [line for line in table.splitlines() if " all " in line][0]
    # 7 images, 8 annotations; c0: 5 instances on 4 images; c1: 3 on 3
    assert total_row.split()[1::2] == ["all", "7", "8", "5/4", "3/3"]


def test_orch_split_command(tmp_path, capsys):
    from orchestrator.cli import main

    coco = make_coco([[0], [1], [0, 1], [], [0], [1], [0], [1]], 2, groups=[0, 0, 1, 1, 2, 2, 3, 3])
    src = tmp_path / "ann.json"
    src.write_text(json.dumps(coco))
    out = tmp_path / "folds"
    assert main(["split", str(src), "--folds", "2", "--out", str(out), "--group-key", "site", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "2-fold split" in text and "wrote 2 folds" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["grouping"] == {"group_key": "site", "group_regex": None} and manifest["seed"] == 3
    check_folds(coco, read_folds(out))
    assert main(["split", str(src), "--folds", "9", "--out", str(out)]) == 2
    assert "more than the 8 images" in capsys.readouterr().err
    assert main(["split", str(tmp_path / "nope.json"), "--folds", "2", "--out", str(out)]) == 2


# -- stratification beyond classes: box count and median box area per image ------------------

def make_sized_coco(counts: list[int], sides: list[float]) -> dict:
    """Image i holds ``counts[i]`` boxes of one class, each ``sides[i]`` pixels square."""
    images, annotations = [], []
    for i, (n, side) in enumerate(zip(counts, sides)):
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 256, "height": 256})
        for _ in range(n):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "bbox": [0, 0, side, side], "area": side * side, "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "c"}]}


def test_image_bins_follow_the_quartiles():
    from orchestrator.kfold.strata import bin_order, image_bins

    coco = make_sized_coco([1, 2, 3, 4, 0, 1, 2, 3, 4], [10, 20, 30, 40, 0, 10, 20, 30, 40])
    bins = image_bins(coco)
    assert [bins["count"][i] for i in range(1, 10)] == ["1", "2", "3", "4+", "0", "1", "2", "3", "4+"]
    assert [bins["area"][i] for i in range(1, 10)] == ["<=10^2", "<=20^2", "<=30^2", ">30^2", "none",
                                                       "<=10^2", "<=20^2", "<=30^2", ">30^2"]
    assert bin_order(bins["count"].values()) == ["0", "1", "2", "3", "4+"]
    crowded = image_bins(make_sized_coco([1, 2, 5, 9, 12, 30, 40, 50], [8] * 8))["count"]
    assert sorted(set(crowded.values()), key=lambda s: int(s.split("-")[0].rstrip("+"))) == ["1-2", "3-9", "10-30", "31+"]


def _bin_imbalance(coco: dict, folds, stratum: str) -> float:
    from orchestrator.kfold.strata import image_bins

    bins = image_bins(coco)[stratum]
    total = 0.0
    for label in set(bins.values()):
        ids = {i for i, b in bins.items() if b == label}
        total += sum(abs(len(ids & set(f.val_ids)) - len(ids) / len(folds)) for f in folds)
    return total


def test_count_and_area_strata_balance_their_bins_better_than_classes_alone():
    rng = random.Random(1)
    by_classes, by_strata = [], []
    for trial in range(25):
        n = rng.randint(30, 60)
        counts = [rng.choice([1, 1, 1, 2, 2, 3, 5, 8]) for _ in range(n)]
        sides = [rng.choice([8, 12, 30, 60, 120]) for _ in range(n)]
        coco = make_sized_coco(counts, sides)
        k = rng.randint(3, 5)
        plain = split_folds(coco, k, seed=trial)
        strat = split_folds(coco, k, seed=trial, stratify=("classes", "count", "area"))
        by_classes.append(_bin_imbalance(coco, plain, "count") + _bin_imbalance(coco, plain, "area"))
        by_strata.append(_bin_imbalance(coco, strat, "count") + _bin_imbalance(coco, strat, "area"))
        check_folds(coco, strat)
    assert sum(by_strata) < 0.7 * sum(by_classes)


def test_stratify_choices_errors_and_table():
    from orchestrator.kfold.strata import parse_stratify

    assert parse_stratify("area, classes") == ("classes", "area")
    assert parse_stratify(None) == ("classes",)
    with pytest.raises(ConfigError, match="--stratify classes,size"):
        parse_stratify("classes,size")
    with pytest.raises(ConfigError, match="choose one or more"):
        parse_stratify("")
    coco = make_sized_coco([1, 2, 3, 4] * 3, [10, 20, 30, 40] * 3)
    folds = split_folds(coco, 3, seed=0, stratify=("count",))  # without classes: bins only
    check_folds(coco, folds)
    table = balance_table(coco, folds, ("classes", "count", "area"))
    assert "box count and median box area" in table and "count 4+" in table and "area >30^2" in table
    assert "median box area" not in balance_table(coco, folds)


def test_orch_split_stratify_flag_and_manifest(tmp_path, capsys):
    from orchestrator.cli import main

    coco = make_sized_coco([1, 2, 3, 4] * 4, [10, 20, 30, 40] * 4)
    src = tmp_path / "ann.json"
    src.write_text(json.dumps(coco))
    out = tmp_path / "folds"
    assert main(["split", str(src), "--folds", "2", "--out", str(out), "--stratify", "classes,count,area"]) == 0
    assert "median box area" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["stratify"] == ["classes", "count", "area"]
    assert main(["split", str(src), "--folds", "2", "--out", str(out), "--stratify", "count,colour"]) == 2
    assert "--stratify count,colour" in capsys.readouterr().err


def test_same_folds_as_iterstrat_for_the_same_seed():
    """The numpy-only stratification assigns every row the fold iterstrat's
    MultilabelStratifiedKFold(shuffle=True) gives it: folds written before keep their meaning."""
    import numpy as np
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    from orchestrator.kfold.split import _stratified_folds

    rng = np.random.RandomState(7)
    for trial in range(30):
        n, cols, k = rng.randint(5, 80), rng.randint(2, 8), rng.randint(2, 6)
        y = rng.rand(n, cols) < rng.uniform(0.05, 0.6, size=cols)  # skewed columns, some rows empty
        y[: rng.randint(0, 3)] = False
        expected = np.empty(n, dtype=int)
        splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=trial)
        for fold, (_, val) in enumerate(splitter.split(np.zeros((n, 1)), y)):
            expected[val] = fold
        assert _stratified_folds(y, k, trial).tolist() == expected.tolist(), (trial, n, cols, k)
