"""The synthetic shapes dataset: a valid COCO file, deterministic, with what the demo needs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detection.shapes import make_shapes


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def shapes128(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes128")
    return out, make_shapes(str(out), n_train=60, n_val=20, size=128, seed=3, n_test=5)


def test_layout_and_return_value(shapes128):
    out, paths = shapes128
    assert set(paths) == {"train", "val", "test"}
    for split, (ann_file, img_dir) in paths.items():
        assert ann_file == str(out / "annotations" / f"instances_{split}.json")
        assert img_dir == str(out / split)
        data = json.loads(Path(ann_file).read_text())
        names = sorted(p.name for p in Path(img_dir).iterdir())
        assert names == sorted(img["file_name"] for img in data["images"])
    assert not list(out.rglob("*.tmp.*"))


@pytest.mark.parametrize("kwargs, words", [
    ({"size": 16}, "--size"), ({"seed": -1}, "--seed"), ({"n_val": -2}, "--train/--val")])
def test_bad_arguments_are_config_errors(tmp_path, kwargs, words):
    from cluster.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        make_shapes(str(tmp_path), n_train=1, **kwargs)


def test_empty_splits_are_not_written(tmp_path):
    paths = make_shapes(str(tmp_path), n_train=3, n_val=0, size=64)
    assert set(paths) == {"train"}
    assert not (tmp_path / "val").exists()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    make_shapes(str(tmp_path / "a"), n_train=6, n_val=3, size=64, seed=7)
    make_shapes(str(tmp_path / "b"), n_train=6, n_val=3, size=64, seed=7)
    make_shapes(str(tmp_path / "c"), n_train=6, n_val=3, size=64, seed=8)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    a, c = _digest(tmp_path / "a"), _digest(tmp_path / "c")
    assert a["train/000001.png"] != c["train/000001.png"]


def test_annotations_are_valid_coco(shapes128):
    _, paths = shapes128
    data = json.loads(Path(paths["train"][0]).read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "rectangle"), (2, "ellipse"), (3, "triangle")]
    per_image = {img["id"]: 0 for img in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]] += 1
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
        assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h + 0.005  # area is rounded to 2 decimals
        poly = np.array(ann["segmentation"][0]).reshape(-1, 2)
        assert np.allclose([poly[:, 0].min(), poly[:, 1].min()], [x, y], atol=0.011)
        assert np.allclose([poly[:, 0].max() - x, poly[:, 1].max() - y], [w, h], atol=0.021)
    assert set(per_image.values()) <= {1, 2, 3, 4} and len(set(per_image.values())) >= 3
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3}
    areas = [a["area"] for a in data["annotations"]]
    assert any(a < 32 * 32 for a in areas), "COCO 'small' objects must occur"
    assert any(a >= 32 * 32 for a in areas)


def test_segmentation_is_what_was_drawn(shapes128):
    """Inside each (eroded) mask the pixels are one flat colour: the polygon is the drawn shape."""
    _, paths = shapes128
    ann_file, img_dir = paths["val"]
    coco = COCO(ann_file)
    checked = 0
    for img in coco.dataset["images"]:
        pixels = np.asarray(Image.open(Path(img_dir) / img["file_name"])).astype(int)
        for ann in coco.imgToAnns[img["id"]]:
            mask = coco.annToMask(ann).astype(bool)
            assert abs(mask.sum() - ann["area"]) <= 0.25 * ann["area"] + 8
            inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
            if inner.sum() >= 4:
                assert np.ptp(pixels[inner], axis=0).max() == 0
                outside = pixels[~mask].mean(axis=0)
                assert np.linalg.norm(pixels[inner][0] - outside) > 30
                checked += 1
    assert checked > 10


def test_light(tmp_path):
    make_shapes(str(tmp_path), n_train=100, n_val=0, size=128)
    code = "import sys, detection.shapes; assert 'torch' not in sys.modules, 'shapes imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_writes_dataset(tmp_path):
    from click.testing import CliRunner

    from orchestrator.commands.data import data_group

    args = ["shapes", "--out", str(tmp_path), "--train", "4", "--val", "2", "--size", "64"]
    result = CliRunner().invoke(data_group, args)
    assert result.exit_code == 0, result.output
    assert "instances_train.json" in result.output
    data = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    assert len(data["images"]) == 2 and data["images"][0]["width"] == 64
