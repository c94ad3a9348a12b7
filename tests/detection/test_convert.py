"""``detection.data.convert``: VOC, YOLO and LabelMe -> COCO, read back with pycocotools.

Each source file is written here from known COCO boxes following the format's public
description (VOC: 1-based inclusive pixel indices in ``<bndbox>``; YOLO: ``class cx cy w h``
normalised by the image size; LabelMe: ``shapes`` with ``points`` and ``shape_type``), converted,
and compared with the known boxes.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cluster.errors import ConfigError, DataError
from detection.data.convert import convert, polygon_area


def write_image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)
    return path


def write_voc(path: Path, filename: str, width: int, height: int, objects: list[tuple]) -> Path:
    """``objects``: ``(name, xmin, ymin, xmax, ymax, difficult)`` in VOC's 1-based pixel indices."""
    parts = [f"<annotation><folder>VOC</folder><filename>{filename}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size><segmented>0</segmented>"]
    for name, xmin, ymin, xmax, ymax, difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>1</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                     f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts) + "</annotation>")
    return path


def known_boxes(rng: random.Random, width: int, height: int, n: int, integer: bool) -> list[list[float]]:
    """Random COCO xywh boxes inside a ``width x height`` image."""
    boxes = []
    for _ in range(n):
        w, h = rng.uniform(3, width / 2), rng.uniform(3, height / 2)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append([float(round(v)) for v in (x, y, w, h)] if integer else [x, y, w, h])
    return boxes


def load(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def boxes_by_file(coco: COCO) -> dict[str, list[tuple[str, list[float], int]]]:
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    out = {}
    for img in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        out[img["file_name"]] = [(names[a["category_id"]], a["bbox"], a["iscrowd"]) for a in anns]
    return out


def assert_close(got: list[float], want: list[float], tol: float = 0.5) -> None:
    """Every box edge (x0, y0, x1, y1) within ``tol`` pixels."""
    def edges(b):
        return [b[0], b[1], b[0] + b[2], b[1] + b[3]]
    assert all(abs(g - w) <= tol for g, w in zip(edges(got), edges(want))), (got, want)


def test_voc_round_trip_keeps_boxes_within_half_a_pixel(tmp_path):
    rng = random.Random(0)
    want = {}
    for i in range(4):
        w, h = 200 + 10 * i, 150 + 7 * i
        boxes = known_boxes(rng, w, h, 3, integer=False)
        labels = [("cat", "dog", "bird")[j % 3] for j in range(3)]
        # COCO [x, x + w) covers 1-based pixels x + 1 .. x + w: VOC's xmin, xmax (integers).
        objects = [(lab, round(b[0]) + 1, round(b[1]) + 1, round(b[0] + b[2]), round(b[1] + b[3]), int(j == 2))
                   for j, (lab, b) in enumerate(zip(labels, boxes))]
        write_voc(tmp_path / "voc" / f"{i:06d}.xml", f"{i:06d}.jpg", w, h, objects)
        want[f"{i:06d}.jpg"] = (w, h, list(zip(labels, boxes, [0, 0, 1])))
    summary = convert("voc", tmp_path / "voc", tmp_path / "out.json")
    coco = load(tmp_path / "out.json")
    assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == ["bird", "cat", "dog"]
    assert sorted(coco.getCatIds()) == [1, 2, 3]
    got = boxes_by_file(coco)
    assert set(got) == set(want)
    for img in coco.loadImgs(coco.getImgIds()):
        assert (img["width"], img["height"]) == want[img["file_name"]][:2]
    for name, (_, _, objects) in want.items():
        assert len(got[name]) == len(objects)
        for (label, box, crowd), (glabel, gbox, gcrowd) in zip(objects, got[name]):
            assert (label, crowd) == (glabel, gcrowd)  # difficult=1 -> iscrowd=1
            assert_close(gbox, box)
    assert summary.images == 4 and summary.annotations == 12 and summary.crowd == 4


def test_voc_whole_image_box_is_the_whole_image(tmp_path):
    write_voc(tmp_path / "a.xml", "a.jpg", 64, 48, [("cat", 1, 1, 64, 48, 0), ("cat", 5, 5, 5, 5, 0)])
    convert("voc", tmp_path, tmp_path / "out" / "ann.json")
    anns = load(tmp_path / "out" / "ann.json").dataset["annotations"]
    assert anns[0]["bbox"] == [0.0, 0.0, 64.0, 48.0] and anns[0]["area"] == 64 * 48
    assert anns[1]["bbox"] == [4.0, 4.0, 1.0, 1.0]  # a single pixel is a 1x1 box


def test_voc_root_split_and_missing_size_read_from_image(tmp_path):
    root = tmp_path / "VOC2007"
    write_voc(root / "Annotations" / "000001.xml", "000001.jpg", 0, 0, [("dog", 10, 10, 20, 30, 0)])
    write_voc(root / "Annotations" / "000002.xml", "000002.jpg", 50, 40, [("cat", 1, 1, 5, 5, 0)])
    write_image(root / "JPEGImages" / "000001.jpg", 77, 55)  # <size> of 000001 is 0x0
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n")
    summary = convert("voc", root, tmp_path / "train.json", split="train")
    coco = load(tmp_path / "train.json")
    assert [(i["file_name"], i["width"], i["height"]) for i in coco.dataset["images"]] == [("000001.jpg", 77, 55)]
    assert summary.img_dir == str(root / "JPEGImages")
    with pytest.raises(DataError, match="available splits: train"):
        convert("voc", root, tmp_path / "x.json", split="val")


def write_yolo(root: Path, name: str, size: tuple[int, int], lines: list[str]) -> None:
    write_image(root / "images" / f"{name}.png", *size)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")


def test_yolo_round_trip_with_data_yaml(tmp_path):
    rng = random.Random(1)
    root = tmp_path / "yolo"
    names = ["person", "car", "zebra"]
    (root).mkdir()
    (root / "data.yaml").write_text("path: .\ntrain: images\nnames:\n  0: person\n  1: car\n  2: zebra\n")
    want = {}
    for i, (w, h) in enumerate([(320, 240), (100, 300), (64, 64)]):
        boxes = known_boxes(rng, w, h, 4, integer=False)
        classes = [rng.randrange(3) for _ in boxes]
        lines = [f"{c} {(b[0] + b[2] / 2) / w} {(b[1] + b[3] / 2) / h} {b[2] / w} {b[3] / h}" for c, b in zip(classes, boxes)]
        write_yolo(root, f"img{i}", (w, h), lines)
        want[f"img{i}.png"] = [(names[c], b) for c, b in zip(classes, boxes)]
    write_image(root / "images" / "background.png", 32, 32)  # no label file: an image without objects
    convert("yolo", root, tmp_path / "out.json")
    coco = load(tmp_path / "out.json")
    assert [c["name"] for c in coco.dataset["categories"]] == names  # data.yaml order, ids 1..3
    assert {i["file_name"]: (i["width"], i["height"]) for i in coco.dataset["images"]} == {
        "img0.png": (320, 240), "img1.png": (100, 300), "img2.png": (64, 64), "background.png": (32, 32)}
    got = boxes_by_file(coco)
    assert got["background.png"] == []
    for name, objects in want.items():
        for (label, box), (glabel, gbox, crowd) in zip(objects, got[name]):
            assert label == glabel and crowd == 0
            assert_close(gbox, box, 0.01)


def test_yolo_classes_file_polygon_line_and_split_layout(tmp_path):
    labels, images = tmp_path / "ds" / "labels" / "train", tmp_path / "ds" / "images" / "train"
    write_image(images / "a.jpg", 200, 100)
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.3 0.1 0.3 0.5\n")
    (tmp_path / "ds" / "classes.txt").write_text("tri\nsquare\n")
    convert("yolo", labels, tmp_path / "out.json")  # images/train found from labels/train
    anns = load(tmp_path / "out.json").dataset["annotations"]
    assert anns[0]["category_id"] == 2 and anns[0]["bbox"] == [80.0, 30.0, 40.0, 40.0]
    assert anns[1]["bbox"] == [20.0, 10.0, 40.0, 40.0] and anns[1]["segmentation"] == [[20, 10, 60, 10, 60, 50]]
    assert anns[1]["area"] == pytest.approx(800.0)
    classes = tmp_path / "names.txt"
    classes.write_text("only\n")
    with pytest.raises(DataError, match=r"a.txt line 1: label '1' is not in --classes"):
        convert("yolo", labels, tmp_path / "x.json", classes_file=classes)


def write_labelme(path: Path, image: str, size: tuple[int, int], shapes: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image,
                                "imageData": None, "imageWidth": size[0], "imageHeight": size[1]}))


def shape(label: str, kind: str, points: list[list[float]], group_id=None) -> dict:
    return {"label": label, "points": points, "group_id": group_id, "description": "", "shape_type": kind, "flags": {}}


def test_labelme_rectangles_polygons_groups_and_skipped_types(tmp_path):
    src = tmp_path / "lm"
    write_labelme(src / "a.json", "a.jpg", (120, 80), [
        shape("car", "rectangle", [[50.5, 40.25], [10.25, 5.5]]),  # corners in any order
        shape("person", "polygon", [[10, 10], [30, 10], [30, 50], [10, 50]]),
        shape("person", "circle", [[60, 60], [65, 60]]),
        shape("tree", "polygon", [[0, 0], [10, 0], [10, 10]], group_id=1),
        shape("tree", "polygon", [[20, 20], [30, 20], [30, 30]], group_id=1),
    ])
    write_labelme(src / "sub" / "b.json", "..\\imgs\\b.png", (64, 64), [shape("car", "point", [[1, 1]])])
    summary = convert("labelme", src, tmp_path / "out.json")
    coco = load(tmp_path / "out.json")
    got = boxes_by_file(coco)
    assert set(got) == {"a.jpg", "imgs/b.png"}
    assert got["imgs/b.png"] == []
    assert [(label, box) for label, box, _ in got["a.jpg"]] == [
        ("car", [10.25, 5.5, 40.25, 34.75]), ("person", [10.0, 10.0, 20.0, 40.0]), ("tree", [0.0, 0.0, 30.0, 30.0])]
    tree = coco.dataset["annotations"][2]
    assert len(tree["segmentation"]) == 2 and tree["area"] == 100.0  # two triangles of 50
    assert "segmentation" not in coco.dataset["annotations"][0]  # a rectangle is a box, not a mask
    assert dict(summary.skipped) == {"LabelMe circle shapes": 1, "LabelMe point shapes": 1}


def test_classes_file_fixes_ids_and_unknown_labels(tmp_path):
    write_voc(tmp_path / "v" / "a.xml", "a.jpg", 50, 50, [("dog", 1, 1, 9, 9, 0), ("horse", 2, 2, 8, 8, 0)])
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\n\n")
    with pytest.raises(DataError) as err:
        convert("voc", tmp_path / "v", tmp_path / "out.json", classes_file=classes)
    assert "a.xml object 2: label 'horse' is not in --classes" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.json").exists()
    summary = convert("voc", tmp_path / "v", tmp_path / "out.json", classes_file=classes, skip_unknown=True)
    coco = load(tmp_path / "out.json")
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [(1, "dog"), (2, "cat")]
    assert [a["category_id"] for a in coco.dataset["annotations"]] == [1]
    assert summary.skipped == ((f"objects labelled 'horse' (not in --classes {classes})", 1),)
    assert "cat" in summary.text() and "1 objects labelled 'horse'" in summary.text()


def test_difficult_boxes_are_ignored_by_cocoeval(tmp_path):
    """A difficult box (iscrowd) need not be found, and a detection on it is no false positive:
    VOC's own rule. Were it a normal box, missing it would cost recall; were it dropped, the
    top-scored detection on it would be a false positive."""
    write_voc(tmp_path / "v" / "a.xml", "a.jpg", 100, 100, [("cat", 11, 11, 40, 40, 0), ("cat", 51, 51, 90, 90, 1)])
    convert("voc", tmp_path / "v", tmp_path / "gt.json")
    gt = load(tmp_path / "gt.json")

    def ap50(dets):
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return evaluator.stats[1]

    normal = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.5}
    on_difficult = {"image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "score": 0.99}
    assert ap50([normal]) == pytest.approx(1.0)
    assert ap50([normal, on_difficult]) == pytest.approx(1.0)


@pytest.mark.parametrize("fmt, make, match", [
    ("voc", lambda p: None, "is not a folder"),
    ("voc", lambda p: (p.mkdir(), (p / "a.xml").write_text("<annotation><size>")), "broken XML"),
    ("voc", lambda p: (p.mkdir(), (p / "a.xml").write_text("<html/>")), "not a Pascal VOC file"),
    ("voc", lambda p: write_voc(p / "a.xml", "a.jpg", 9, 9, [("c", 1, "x", 3, 3, 0)]), "not a number"),
    ("labelme", lambda p: (p.mkdir(), (p / "a.json").write_text("{\"shapes\": [")), "broken JSON"),
    ("labelme", lambda p: (p.mkdir(), (p / "a.json").write_text("{\"images\": []}")), "not a LabelMe file"),
    ("labelme", lambda p: p.mkdir(), "no .json files"),
    ("yolo", lambda p: write_yolo(p, "a", (8, 8), ["0 0.5 0.5 0.2"]), r"a.txt line 1: 4 numbers"),
    ("yolo", lambda p: write_yolo(p, "a", (8, 8), ["0 50 40 20 10"]), "must be normalised"),
    ("yolo", lambda p: write_yolo(p, "a", (8, 8), ["cat 0.5 0.5 0.2 0.2"]), "is not 'class cx cy w h'"),
    ("yolo", lambda p: (write_yolo(p, "a", (8, 8), ["0 .5 .5 .2 .2"]), (p / "images" / "a.png").write_bytes(b"x")),
     "cannot read the size of image"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, fmt, make, match):
    src = tmp_path / "src"
    make(src)
    classes = tmp_path / "classes.txt"
    classes.write_text("c\n")
    out = tmp_path / "out" / "ann.json"
    with pytest.raises(DataError, match=match) as err:
        convert(fmt, src, out, classes_file=classes)
    assert "\n" not in str(err.value)
    assert not out.parent.exists()


def test_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="--split is for VOC"):
        convert("yolo", tmp_path, tmp_path / "a.json", split="train")
    with pytest.raises(ConfigError, match="is a folder"):
        convert("voc", tmp_path, tmp_path)
    with pytest.raises(DataError, match="no labelled objects"):
        write_voc(tmp_path / "v" / "a.xml", "a.jpg", 5, 5, [])
        convert("voc", tmp_path / "v", tmp_path / "a.json")
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(DataError, match="'a' is listed twice"):
        convert("voc", tmp_path / "v", tmp_path / "a.json", classes_file=tmp_path / "dup.txt")


def test_polygon_area():
    assert polygon_area([0, 0, 4, 0, 4, 3, 0, 3]) == 12.0
    assert polygon_area([0, 0, 0, 3, 4, 3, 4, 0]) == 12.0  # either winding
