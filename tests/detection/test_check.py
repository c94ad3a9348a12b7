"""``detection.data.check`` and ``detection.data.fix`` on a small COCO file with every problem
planted once, real image files, and the cleaned copy read back by pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from cluster.errors import DataError
from detection.data.check import analyse, check_coco, load_coco
from detection.data.fix import changes_path, fix_coco, write_fixed


def image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (10, 200, 30)).save(path)


def ann(ann_id, image_id, bbox, category_id=1, **extra):
    a = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0}
    a["area"] = bbox[2] * bbox[3] if all(isinstance(v, (int, float)) for v in bbox) else 0
    return {**a, **extra}


@pytest.fixture
def broken(tmp_path) -> tuple[Path, Path]:
    """A COCO file with each problem of ``detection.data.check.PROBLEMS`` (but the category
    ones that need an uncleanable file) planted, and its image folder."""
    imgs = tmp_path / "imgs"
    image(imgs / "a.png", 64, 48)
    image(imgs / "b.png", 40, 30)
    image(imgs / "empty.png", 16, 16)
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.png", "width": 30, "height": 30},  # the file is 40x30
            {"id": 3, "file_name": "missing.png", "width": 10, "height": 10},
            {"id": 4, "file_name": "broken.png", "width": 10, "height": 10},
            {"id": 2, "file_name": "a.png", "width": 64, "height": 48},  # repeated id (and file)
            {"id": 5, "file_name": "empty.png", "width": 16, "height": 16},
            {"id": 6, "file_name": "a.png"},  # no size
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 4, "name": "bird"}],
        "annotations": [
            ann(1, 1, [10, 10, 20, 20]),
            ann(2, 1, [5, 5, 0, 10]),  # degenerate
            ann(3, 1, [5, 5, math.nan, 10]),  # NaN
            ann(4, 1, [50, 30, 30, 10], category_id=2),  # reaches x=80 in a 64 px image
            ann(5, 1, [1, 1, 10, 10], area=5.0),  # area of a box-only annotation is its box's
            ann(1, 1, [10, 10, 20, 20]),  # exact copy of annotation 1
            ann(5, 2, [2, 2, 5, 5]),  # another object with id 5
            ann(7, 99, [1, 1, 2, 2]),  # image 99 does not exist
            ann(8, 1, [1, 1, 2, 2], category_id=42),  # category 42 does not exist
            ann(9, 3, [1, 1, 2, 2]),  # its image file is missing
            {"id": 10, "image_id": 1},  # no bbox
            ann(11, 1, [100, 100, 5, 5]),  # entirely outside
            ann(12, 2, [1, 1, 20, 20], segmentation=[[1, 1, 21, 1, 21, 21, 1, 21]], area=10_000.0),
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path, imgs


def test_finds_every_planted_problem(broken):
    path, imgs = broken
    rep, _ = check_coco(path, imgs, examples=5)
    counts = {p.code: p.count for p in rep.problems}
    assert counts == {
        "invalid_image": 1, "duplicate_image_id": 1, "missing_image_file": 1, "unreadable_image": 1,
        "size_mismatch": 1, "invalid_annotation": 1, "duplicate_annotation_id": 2,
        "annotation_of_missing_image": 1, "unknown_category": 1, "degenerate_box": 2, "box_outside_image": 2,
        "duplicate_file_name": 1, "gapped_category_ids": 1, "unused_category": 1, "area_inconsistent": 2,
        "empty_image": 2,  # images 4 (its file is broken) and 5
    }
    severities = {p.code: p.severity for p in rep.problems}
    assert severities["area_inconsistent"] == "warning" and severities["empty_image"] == "info"
    assert rep.has_errors
    examples = {p.code: p.examples for p in rep.problems}
    assert examples["size_mismatch"] == ("image 2 is 40x30, JSON says 30x30",)
    assert examples["gapped_category_ids"] == ("no id 3",)
    assert examples["unused_category"] == ("category 4 'bird'",)
    assert examples["missing_image_file"] == ("image 3 missing.png",)
    assert examples["degenerate_box"][0].startswith("ann 2 (image 1)")
    table = rep.table()
    assert "box_outside_image" in table and "clipped to the image" in table


def test_without_image_folder_files_are_not_checked(broken):
    path, _ = broken
    rep, _ = check_coco(path)
    codes = {p.code for p in rep.problems}
    assert not codes & {"missing_image_file", "unreadable_image", "size_mismatch"}
    assert "image files not checked" in rep.table()


def test_fix_writes_a_clean_copy_and_lists_every_change(broken, tmp_path):
    path, imgs = broken
    _, found = check_coco(path, imgs)
    out = tmp_path / "clean" / "ann.json"
    changes, after = write_fixed(found, out)
    assert not after.has_errors, after.table()
    assert {p.code for p in after.problems} <= {"gapped_category_ids", "unused_category", "empty_image",
                                                  "duplicate_file_name"}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out))
    anns = {a["id"]: a for a in coco.dataset["annotations"]}
    assert sorted(anns) == [1, 4, 5, 12, 13]  # the second id 5 became 13
    assert anns[4]["bbox"] == [50.0, 30.0, 14.0, 10.0] and anns[4]["area"] == 140.0  # clipped
    assert anns[5]["area"] == 100.0 and anns[13]["bbox"] == [2, 2, 5, 5]
    assert anns[12]["area"] == 400.0  # recomputed from the mask (pycocotools)
    images = {i["id"]: (i["file_name"], i["width"], i["height"]) for i in coco.dataset["images"]}
    assert images == {1: ("a.png", 64, 48), 2: ("b.png", 40, 30), 5: ("empty.png", 16, 16)}
    lines = [c.line() for c in changes]
    assert "dropped 2 annotations: degenerate box (w or h <= 0, or NaN) (ids 2, 3)" in lines
    assert "dropped 1 annotations: exact copies of an earlier annotation with the same id (ids 1)" in lines
    assert "changed 1 annotations: repeated id given a new one (old ids shown)" in "\n".join(lines)
    assert "dropped 1 annotations: their image was dropped above (ids 9)" in lines
    assert "dropped 1 annotations: box entirely outside its image (ids 11)" in lines
    assert "changed 1 images: width/height set from the image file (ids 2)" in lines
    logged = json.loads(changes_path(out).read_text())
    assert {tuple(c["ids"]) for c in logged} == {c.ids for c in changes}


def test_fix_leaves_what_it_cannot_decide(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
            "annotations": [ann(1, 1, [0, 0, 4, 4])],
            "categories": [{"id": 1, "name": "cat"}, {"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}]}
    found = analyse(data)
    assert found.problems["duplicate_category_id"][0] == 2
    fixed, changes = fix_coco(found)
    assert [c.line() for c in changes] == ["dropped 1 categories: exact copies of an earlier entry (ids 1)"]
    assert "duplicate_category_id" in analyse(fixed).problems  # cat and dog still share id 1


def test_warnings_alone_are_not_errors(tmp_path):
    image(tmp_path / "a.png", 8, 8)
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
            "annotations": [ann(1, 1, [0, 0, 4, 4], area=3.0)],
            "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    rep, _ = check_coco(tmp_path / "ann.json", tmp_path)
    assert {p.code for p in rep.problems} == {"area_inconsistent", "unused_category", "gapped_category_ids"}
    assert not rep.has_errors


def test_numbers_written_as_strings_are_caught():
    """pycocotools and COCOeval compare these with numbers and crash; numpy would quietly parse them."""
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
            "annotations": [ann(1, 1, [0, 0, 4, 4], area="16"), ann(2, 1, [0, "0", 4, 4])],
            "categories": [{"id": 1, "name": "cat"}]}
    found = analyse(data)
    assert found.problems["area_inconsistent"][0] == 1 and found.problems["invalid_annotation"][0] == 1
    fixed, _ = fix_coco(found)
    assert fixed["annotations"] == [{**data["annotations"][0], "area": 16.0}]


def test_shapes_dataset_is_clean(shapes_data):
    rep, _ = check_coco(shapes_data / "annotations" / "instances_train.json", shapes_data / "train")
    assert rep.problems == () and rep.images == 16


@pytest.mark.parametrize("text, match", [
    (None, "does not exist"),
    ("{", "broken JSON"),
    ("[]", "expected a COCO object"),
    ('{"images": [], "categories": {}}', "'categories' is missing or not a list"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "ann.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        load_coco(path)
    assert "\n" not in str(err.value)


def synthetic(n_images: int, per_image: int, seed: int = 0) -> dict:
    """A COCO dict of ``n_images x per_image`` random boxes, a few of them bad."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "file_name": f"{i:06d}.png", "width": 640, "height": 480} for i in range(1, n_images + 1)]
    n = n_images * per_image
    xy = rng.uniform(0, 400, (n, 2))
    wh = rng.uniform(1, 200, (n, 2))
    boxes = np.round(np.concatenate([xy, wh], axis=1), 2)
    boxes[::1000, 2] = 0  # 0.1% degenerate
    anns = [{"id": k + 1, "image_id": k // per_image + 1, "category_id": k % 80 + 1, "bbox": b,
             "area": b[2] * b[3], "iscrowd": 0} for k, b in enumerate(boxes.tolist())]
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 81)]
    return {"images": images, "annotations": anns, "categories": cats}


def test_vectorised_check_matches_counts():
    data = synthetic(50, 40)
    found = analyse(data)
    assert found.problems["degenerate_box"][0] == 2  # annotations 1 and 1001
    boxes = np.array([a["bbox"] for a in data["annotations"]])
    outside = ((boxes[:, 0] + boxes[:, 2] > 641) | (boxes[:, 1] + boxes[:, 3] > 481)) & (boxes[:, 2] > 0)
    assert found.problems["box_outside_image"][0] == int(outside.sum()) > 0


@pytest.mark.slow
def test_check_of_100k_annotations(tmp_path):
    """100k annotations on 2,000 images (with their files): the number the README quotes."""
    data = synthetic(2000, 50)
    for img in data["images"]:
        Image.new("RGB", (640, 480)).save(tmp_path / img["file_name"], compress_level=1)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    start = time.perf_counter()
    json_only, _ = check_coco(path)
    middle = time.perf_counter()
    with_files, found = check_coco(path, tmp_path)
    end = time.perf_counter()
    fixed, _ = fix_coco(found)
    fix_s = time.perf_counter() - end
    print(f"\n100k annotations: check {middle - start:.2f} s, with 2000 image files {end - middle:.2f} s, "
          f"fix {fix_s:.2f} s")
    assert json_only.annotations == 100_000 and {p.code for p in with_files.problems} >= {"degenerate_box"}
    assert len(fixed["annotations"]) == 100_000 - 100
