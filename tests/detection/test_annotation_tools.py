"""Datasets as real annotation tools write them, each file made here in the tool's documented
format: phone photos with an EXIF orientation (labelled upright, as LabelMe, Roboflow and
Ultralytics show them), LabelMe 5 mask shapes and its ``__ignore__``/``_background_`` labels and
``imageData``, text written by Windows tools (a UTF-8 BOM), and VOC files whose ``<filename>``
disagrees with their stem (torchvision/MMDetection/detectron2 take the stem).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from cluster.errors import DataError
from detection.data.check import check_coco
from detection.data.convert import convert
from detection.data.fix import write_fixed
from detection.data.orientation import upright_array, upright_box

UPRIGHT = (80, 120)  # width, height of the upright picture: a portrait phone photo
TRUTH = (10.0, 60.0, 30.0, 40.0)  # the object's box (x, y, w, h) in the upright frame
BLUE = (0, 0, 255)
BOM = "\ufeff"


def phone_photo(path: Path, orientation: int = 6) -> Path:
    """A JPEG stored sideways (120 x 80) with EXIF orientation ``orientation``, so that the
    upright picture is 80 x 120 with a blue object at :data:`TRUTH` (as a phone writes it)."""
    upright = Image.new("RGB", UPRIGHT, (255, 255, 255))
    x, y, w, h = TRUTH
    upright.paste(BLUE, (int(x), int(y), int(x + w), int(y + h)))
    # Stored = the inverse of what the orientation does: 6 (turn 90° clockwise) <- turn 90° anticlockwise.
    inverse = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(inverse[orientation]) if inverse[orientation] is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def assert_close(got, want, tol: float = 0.5) -> None:
    """Every edge (x0, y0, x1, y1) of box ``got`` within ``tol`` px of ``want`` (both xywh)."""
    def edges(b):
        return [b[0], b[1], b[0] + b[2], b[1] + b[3]]
    assert all(abs(g - w) <= tol for g, w in zip(edges(got), edges(want))), (got, want)


def yolo_phone_dataset(root: Path, bom: bool = False) -> Path:
    """A YOLO export (Ultralytics layout, ``data.yaml``) of one phone photo, labelled upright."""
    phone_photo(root / "images" / "train" / "p1.jpg")
    x, y, w, h = TRUTH
    W, H = UPRIGHT
    line = f"0 {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}\r\n"
    (root / "labels" / "train").mkdir(parents=True)
    prefix = BOM if bom else ""
    (root / "labels" / "train" / "p1.txt").write_text(prefix + line, encoding="utf-8")
    (root / "data.yaml").write_text(prefix + "names: ['WP']\n", encoding="utf-8")
    return root


# EXIF orientation -----------------------------------------------------------------------------

def test_orientation_helpers_turn_points_as_the_decoders_turn_pixels():
    """upright_box/upright_array agree with PIL's exif_transpose for all 8 orientations."""
    stored = np.zeros((30, 40), dtype=np.uint8)
    stored[3:9, 5:17] = 1  # box (5, 3, 12, 6) in the stored 40 x 30 frame
    for orientation in range(1, 9):
        image = Image.fromarray(stored * 255)
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        image.save(buffer, "PNG", exif=exif.tobytes())
        pil = np.asarray(ImageOps.exif_transpose(Image.open(buffer))) > 0
        ours = upright_array(stored, orientation) > 0
        assert (pil == ours).all(), orientation
        rows, cols = np.flatnonzero(ours.any(axis=1)), np.flatnonzero(ours.any(axis=0))
        want = (cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0])
        assert_close(upright_box((5, 3, 12, 6), 40, 30, orientation), want, tol=0)


def test_exif_photo_converts_checks_and_loads_upright(tmp_path):
    """YOLO labels of an orientation-6 photo: the COCO size is upright, the box within 0.5 px of
    the truth; data check finds nothing; the training dataset hands out the upright picture with
    the object under its box."""
    from detection.data.coco import CocoDetection

    root = yolo_phone_dataset(tmp_path / "yolo")
    out = tmp_path / "all.json"
    summary = convert("yolo", root, out)
    assert "also: 1 YOLO images with an EXIF orientation (labels taken as drawn on the upright picture)" in summary.text()
    data = json.loads(out.read_text())
    assert (data["images"][0]["width"], data["images"][0]["height"]) == UPRIGHT
    assert_close(data["annotations"][0]["bbox"], TRUTH)

    report, _ = check_coco(out, root / "images")
    assert not report.problems, report.table()

    for train in (True, False):
        dataset = CocoDetection(str(out), str(root / "images"), train=train)
        dataset.float_images = False
        image, target = dataset[0]
        assert tuple(image.shape) == (3, UPRIGHT[1], UPRIGHT[0])
        x0, y0, x1, y1 = target["boxes"][0].tolist()
        assert_close((x0, y0, x1 - x0, y1 - y0), TRUTH)
        inside = image[:, int(y0) + 2 : int(y1) - 2, int(x0) + 2 : int(x1) - 2].float().mean(dim=(1, 2))
        assert inside[2] > 200 and inside[0] < 60, inside  # blue: the object is where its box is

    # data.exif: ignore reads the stored frame, so the upright JSON no longer fits.
    raw = CocoDetection(str(out), str(root / "images"), exif=False)
    with pytest.raises(DataError, match=r"is 120x80 but .* says 80x120 \(read in its stored frame"):
        raw[0]
    converted_raw = convert("yolo", root, tmp_path / "raw.json", exif=False)
    assert converted_raw.images == 1
    assert json.loads((tmp_path / "raw.json").read_text())["images"][0]["width"] == 120


def test_predict_reads_upright(tmp_path):
    """orch predict's image reader and header size: upright, and the stored frame with exif off."""
    from detection.inference.sources import check_image_header, load_image

    photo = str(phone_photo(tmp_path / "p.jpg"))
    assert check_image_header(photo) == UPRIGHT and check_image_header(photo, exif=False) == (120, 80)
    assert tuple(load_image(photo).shape) == (3, 120, 80)
    assert tuple(load_image(photo, exif=False).shape) == (3, 80, 120)


def stored_frame_coco(tmp_path: Path, boxes_upright: bool) -> tuple[Path, Path]:
    """A COCO file of an orientation-6 photo whose size is the stored frame's (120 x 80), as a
    tool that ignores EXIF writes it, with its box in the stored frame (or, ``boxes_upright``,
    in the upright frame: only the size is wrong)."""
    img_dir = tmp_path / "img"
    phone_photo(img_dir / "p1.jpg")
    # The object in the stored frame: turn the upright box back (orientation 8 undoes 6).
    stored_box = upright_box(TRUTH, *UPRIGHT, 8)
    box = TRUTH if boxes_upright else stored_box
    seg = [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2], box[1] + box[3], box[0], box[1] + box[3]]]
    data = {"images": [{"id": 1, "file_name": "p1.jpg", "width": 120, "height": 80}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": list(box), "area": box[2] * box[3],
                             "iscrowd": 0, "segmentation": seg}],
            "categories": [{"id": 1, "name": "WP"}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, img_dir


def test_check_names_stored_frame_sizes_and_fix_turns_the_boxes(tmp_path):
    ann, img_dir = stored_frame_coco(tmp_path, boxes_upright=False)
    report, found = check_coco(ann, img_dir)
    codes = {p.code: p for p in report.problems}
    assert "exif_rotated" in codes and "size_mismatch" not in codes
    assert "p1.jpg (EXIF orientation 6: turned 90° clockwise) is 80x120 upright, JSON says 120x80" in \
        codes["exif_rotated"].examples[0]
    changes, after = write_fixed(found, tmp_path / "fixed.json")
    assert not after.has_errors, after.table()
    lines = [c.line() for c in changes]
    assert "changed 1 images: width/height set upright by the EXIF orientation (the JSON had the stored frame's) (ids 1)" in lines
    assert "changed 1 annotations: box (and mask) turned upright with its image (EXIF orientation) (ids 1)" in lines
    fixed = json.loads((tmp_path / "fixed.json").read_text())
    assert (fixed["images"][0]["width"], fixed["images"][0]["height"]) == UPRIGHT
    assert_close(fixed["annotations"][0]["bbox"], TRUTH)
    polygon = fixed["annotations"][0]["segmentation"][0]
    assert_close((min(polygon[0::2]), min(polygon[1::2]), max(polygon[0::2]) - min(polygon[0::2]),
                  max(polygon[1::2]) - min(polygon[1::2])), TRUTH)


def test_fix_keeps_boxes_that_fit_only_the_upright_frame(tmp_path):
    """The box reaches below y = 80 (outside the stored 120 x 80 frame): it was drawn upright and
    only the size is wrong, so --fix sets the size and says it kept the box."""
    ann, img_dir = stored_frame_coco(tmp_path, boxes_upright=True)
    _, found = check_coco(ann, img_dir)
    changes, after = write_fixed(found, tmp_path / "fixed.json")
    lines = [c.line() for c in changes]
    assert "kept 1 annotations: boxes of EXIF-turned images already upright (they fit only the upright frame) (ids 1)" \
        in lines and not any("turned upright with its image" in line for line in lines)
    fixed = json.loads((tmp_path / "fixed.json").read_text())
    assert fixed["annotations"][0]["bbox"] == list(TRUTH) and fixed["images"][0]["width"] == 80
    assert not after.has_errors


def test_check_warns_of_orientations_the_size_cannot_show(tmp_path):
    phone_photo(tmp_path / "img" / "p1.jpg", orientation=3)
    data = {"images": [{"id": 1, "file_name": "p1.jpg", "width": 80, "height": 120}], "annotations": [],
            "categories": [{"id": 1, "name": "WP"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    report, _ = check_coco(tmp_path / "ann.json", tmp_path / "img")
    assert {p.code: p.severity for p in report.problems}["exif_mirrored"] == "warning"
    report, _ = check_coco(tmp_path / "ann.json", tmp_path / "img", exif=False)
    assert "exif_mirrored" not in {p.code for p in report.problems}


# LabelMe 5 ------------------------------------------------------------------------------------

def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def labelme_file(path: Path, shapes: list[dict], image_path: str, width: int = 64, height: int = 48,
                 image_data: str | None = None, bom: bool = False) -> Path:
    """A LabelMe 5.x JSON file (the keys and order LabelMe writes)."""
    data = {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": image_path, "imageData": image_data,
            "imageHeight": height, "imageWidth": width}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((BOM if bom else "") + json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def shape(label: str, kind: str, points: list, **extra) -> dict:
    return {"label": label, "points": points, "group_id": None, "description": "", "shape_type": kind,
            "flags": {}, "mask": None, **extra}


def test_labelme5_masks_ignore_and_background(tmp_path):
    """A mask shape (AI tool: points = the two box corners, mask = a PNG of that box) becomes an
    RLE mask boxed by its pixels; __ignore__ an ignore region of every class; _background_ is
    skipped and named; both special labels in the labels file are no categories."""
    from pycocotools import mask as mask_utils

    patch = np.zeros((12, 16), dtype=np.uint8)  # the box from (20, 10) to (35, 21), 16 x 12 pixels
    patch[3:9, 2:12] = 255  # the object: columns 22..31, rows 13..18
    shapes = [
        shape("WP", "mask", [[20.0, 10.0], [35.0, 21.0]], mask=png_b64(patch)),
        shape("cat", "rectangle", [[40, 30], [50, 44]]),
        shape("__ignore__", "rectangle", [[0, 0], [10, 8]]),
        shape("_background_", "polygon", [[0, 0], [63, 0], [63, 47]]),
        shape("cat", "circle", [[5, 5], [8, 8]]),
    ]
    src = tmp_path / "lm"
    Image.new("RGB", (64, 48)).save(tmp_path / "x.png")
    labelme_file(src / "a.json", shapes, "../x.png")
    (tmp_path / "labels.txt").write_text("__ignore__\n_background_\nWP\ncat\n")
    summary = convert("labelme", src, tmp_path / "out.json", classes_file=tmp_path / "labels.txt")
    data = json.loads((tmp_path / "out.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["WP", "cat"]
    masked, rect, *ignored = data["annotations"]
    assert masked["bbox"] == [22.0, 13.0, 10.0, 6.0] and masked["area"] == 60 and masked["iscrowd"] == 0
    rle = dict(masked["segmentation"], counts=masked["segmentation"]["counts"].encode())
    decoded = mask_utils.decode(rle)
    assert decoded.shape == (48, 64) and decoded.sum() == 60 and decoded[13:19, 22:32].all()
    assert rect["bbox"] == [40, 30, 10, 14] and rect["iscrowd"] == 0
    assert [(a["category_id"], a["iscrowd"], a["bbox"]) for a in ignored] == [(1, 1, [0, 0, 10, 8]), (2, 1, [0, 0, 10, 8])]
    assert all(a["segmentation"] for a in ignored)  # mask training needs every region's mask
    text = summary.text()
    # Mask training reads the RLE as drawn, and every ignore region has a mask (the box-only
    # rectangle has none: mask training skips it).
    from detection.data.coco import CocoDetection

    dataset = CocoDetection(str(tmp_path / "out.json"), str(src), train=False, with_masks=True, on_bad_data="skip")
    assert dataset.skipped == {"missing_segmentation": 1}
    masks = dataset[0][1]["masks"]
    assert masks.shape == (3, 48, 64) and masks[0].sum() == 60 and masks[0][13:19, 22:32].all()
    assert "1 LabelMe _background_ shapes" in text and "1 LabelMe circle shapes" in text
    assert "(2 ignore regions, iscrowd=1)" in text


def test_masks_only_without_classes_names_what_was_skipped(tmp_path):
    src = tmp_path / "lm"
    labelme_file(src / "a.json", [shape("cat", "circle", [[5, 5], [8, 8]])] * 3, "a.png")
    with pytest.raises(DataError, match=r"no labelled objects found.*skipped: 3 LabelMe circle shapes"):
        convert("labelme", src, tmp_path / "out.json")


def test_ignore_regions_are_left_out_of_training_and_ignored_by_the_evaluation(tmp_path):
    """The converted __ignore__ region: not a training target; in evaluation a detection on it
    is neither a false positive nor a hit (COCOeval's iscrowd)."""
    from detection.data.coco import CocoDetection
    from detection.evaluation import evaluate_coco

    src = tmp_path / "lm"
    Image.new("RGB", (64, 48)).save(src.mkdir() or src / "a.png")
    labelme_file(src / "a.json", [shape("cat", "rectangle", [[40, 30], [50, 44]]),
                                  shape("__ignore__", "rectangle", [[0, 0], [20, 16]])], "a.png")
    convert("labelme", src, tmp_path / "out.json")
    train = CocoDetection(str(tmp_path / "out.json"), str(src), train=True)
    assert train[0][1]["boxes"].tolist() == [[40.0, 30.0, 50.0, 44.0]]
    val = CocoDetection(str(tmp_path / "out.json"), str(src), train=False)
    assert val[0][1]["iscrowd"].tolist() == [0, 1]
    hit = {"image_id": 1, "category_id": 1, "bbox": [40, 30, 10, 14], "score": 0.9}
    on_ignore = {"image_id": 1, "category_id": 1, "bbox": [2, 2, 16, 12], "score": 0.95}
    assert evaluate_coco(val.coco, [hit, on_ignore])["bbox_mAP"] == pytest.approx(1.0)


def test_image_data_only_and_images_kept_elsewhere(tmp_path):
    """imagePath pointing at the JSON itself, the picture only in imageData: written out; a bare
    imagePath with the images in another folder: found through --img-dir."""
    src, pictures = tmp_path / "lm", tmp_path / "pictures"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (9, 9, 9)).save(buffer, "JPEG")
    labelme_file(src / "only_data.json", [shape("cat", "rectangle", [[1, 1], [9, 9]])], "only_data.json",
                 image_data=base64.b64encode(buffer.getvalue()).decode())
    Image.new("RGB", (64, 48)).save(pictures.mkdir() or pictures / "elsewhere.png")
    labelme_file(src / "elsewhere.json", [shape("cat", "rectangle", [[1, 1], [9, 9]])], "elsewhere.png")
    summary = convert("labelme", src, tmp_path / "out.json", img_dir=pictures)
    data = json.loads((tmp_path / "out.json").read_text())
    assert sorted(i["file_name"] for i in data["images"]) == ["elsewhere.png", "only_data.jpg"]
    assert (pictures / "only_data.jpg").read_bytes() == buffer.getvalue()
    assert "1 images written out from LabelMe imageData" in summary.text()
    report, _ = check_coco(tmp_path / "out.json", pictures)
    assert not report.has_errors, report.table()


# BOMs -----------------------------------------------------------------------------------------

def test_text_written_with_a_bom_reads_as_without(tmp_path):
    """Classes file, YOLO labels and data.yaml, LabelMe JSON, VOC XML and COCO JSON, each with a
    UTF-8 BOM (as Windows tools write them)."""
    from detection.data.coco import load_coco_json

    root = yolo_phone_dataset(tmp_path / "yolo", bom=True)
    summary = convert("yolo", root, tmp_path / "y.json")
    assert [name for _, name, _, _ in summary.categories] == ["WP"]
    (tmp_path / "classes.txt").write_text(BOM + "WP\r\ncat\r\n", encoding="utf-8")
    summary = convert("yolo", root, tmp_path / "y2.json", classes_file=tmp_path / "classes.txt")
    assert [name for _, name, _, _ in summary.categories] == ["WP", "cat"]

    labelme_file(tmp_path / "lm" / "a.json", [shape("WP", "rectangle", [[1, 1], [9, 9]])], "a.png", bom=True)
    convert("labelme", tmp_path / "lm", tmp_path / "l.json", classes_file=tmp_path / "classes.txt")

    voc = tmp_path / "voc"
    voc.mkdir()
    (voc / "a.xml").write_text(BOM + "<annotation><filename>a.jpg</filename><size><width>20</width><height>20</height>"
                               "</size><object><name>WP</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
                               "<ymax>5</ymax></bndbox></object></annotation>", encoding="utf-8")
    convert("voc", voc, tmp_path / "v.json", classes_file=tmp_path / "classes.txt")

    coco = tmp_path / "bom_coco.json"
    coco.write_text(BOM + (tmp_path / "v.json").read_text(), encoding="utf-8")
    assert load_coco_json(str(coco))["categories"][0]["name"] == "WP"
    report, _ = check_coco(coco)
    assert report.images == 1
    # scoring (orch eval of saved predictions, k-fold out-of-fold scores) reads it too
    from detection.evaluation import load_ground_truth
    from orchestrator.kfold.aggregate import load_coco

    assert len(load_ground_truth(str(coco)).imgs) == 1
    assert load_coco(coco).cats[1]["name"] == "WP"


# VOC file names -------------------------------------------------------------------------------

def test_voc_image_comes_from_the_stem(tmp_path):
    """``<filename>`` naming another file (copied XMLs), one without suffix (ILSVRC), and one whose
    stem has no image (then ``<filename>`` is used)."""
    root = tmp_path / "VOC"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    body = ("<size><width>40</width><height>30</height></size><object><name>cat</name><bndbox><xmin>1</xmin>"
            "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    for stem, filename in (("000001", "IMG_2041.jpg"), ("n01_0002", "n01_0002"), ("copy", "000003.png")):
        (root / "Annotations" / f"{stem}.xml").write_text(f"<annotation><filename>{filename}</filename>{body}")
    for name in ("000001.jpg", "IMG_2041.jpg", "n01_0002.JPEG", "000003.png"):
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / name, "PNG" if name.endswith("png") else "JPEG")
    summary = convert("voc", root, tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert [i["file_name"] for i in data["images"]] == ["000001.jpg", "000003.png", "n01_0002.JPEG"]
    text = summary.text()
    assert "1 VOC files whose <filename> differs from their stem (image taken from the stem)" in text
    assert "1 VOC <filename>s without suffix (suffix found on disk)" in text
    assert "1 VOC images named by <filename> (no image has the XML file's stem)" in text


def test_voc_drawn_on_the_stored_frame_is_turned_upright(tmp_path):
    """labelImg draws on the stored frame: <size> 120 x 80 for an orientation-6 photo; the
    converted box is the upright truth."""
    root = tmp_path / "voc"
    phone_photo(root / "p1.jpg")
    x, y, w, h = upright_box(TRUTH, *UPRIGHT, 8)  # the object in the stored frame
    (root / "p1.xml").write_text(
        f"<annotation><filename>p1.jpg</filename><size><width>120</width><height>80</height></size><object>"
        f"<name>WP</name><bndbox><xmin>{x + 1:g}</xmin><ymin>{y + 1:g}</ymin><xmax>{x + w:g}</xmax>"
        f"<ymax>{y + h:g}</ymax></bndbox></object></annotation>")
    summary = convert("voc", root, tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert (data["images"][0]["width"], data["images"][0]["height"]) == UPRIGHT
    assert_close(data["annotations"][0]["bbox"], TRUTH)
    assert "1 VOC files drawn on the stored frame of an EXIF-turned image (boxes turned upright)" in summary.text()


# Drawing class names --------------------------------------------------------------------------

def test_cjk_class_names_are_drawn_as_glyphs():
    """Two different CJK names draw different pixels (Pillow's built-in font draws both as the
    same empty boxes)."""
    import torch

    from detection.inference.draw import draw_detections, label_font

    if label_font() is None:
        pytest.skip("no CJK font on this machine (CI installs fonts-wqy-zenhei)")
    image = torch.zeros((3, 120, 200), dtype=torch.uint8)
    output = {"boxes": torch.tensor([[10.0, 30.0, 190.0, 110.0]]), "labels": torch.tensor([1]),
              "scores": torch.tensor([0.9])}
    cat, dog = (draw_detections(image, output, [name], 0.5) for name in ("猫", "狗"))
    assert not torch.equal(cat, dog)


def test_browse_shows_the_phone_photo_upright_with_its_box(make_experiment, tmp_path):
    """orch data browse of the orientation-6 photo: the upright (portrait) picture, the box
    outline around the object within a pixel of the truth (0.4 px in the photo's scale)."""
    from detection.data.browse import CELL, PALETTE, browse
    from orchestrator.config import load_experiment

    root = yolo_phone_dataset(tmp_path / "yolo")
    convert("yolo", root, tmp_path / "all.json")
    split = {"ann_file": str(tmp_path / "all.json"), "img_dir": str(root / "images")}
    config = load_experiment(make_experiment(**{"data.val": split}))
    (path, _), = browse(config, str(tmp_path / "val"), n=1, split="val")[1]
    with Image.open(path) as grid:
        pad = 0 if grid.width == CELL else 4  # make_grid pads only when there are several cells
        cell = np.asarray(grid.convert("RGB"))[pad : pad + CELL, pad : pad + CELL].astype(int)
    scale = CELL / max(UPRIGHT)
    assert (cell[: round(UPRIGHT[1] * scale), round(UPRIGHT[0] * scale) + 1 :] == 64).all()  # portrait: grey beside
    red = np.array([int(PALETTE[0][i : i + 2], 16) for i in (1, 3, 5)])
    rows, cols = np.nonzero(np.abs(cell - red).sum(axis=2) < 60)
    x, y, w, h = (v * scale for v in TRUTH)
    assert abs(cols.min() - x) <= 1 and abs(rows.min() - y) <= 1
    assert abs(cols.max() + 1 - (x + w)) <= 1 and abs(rows.max() + 1 - (y + h)) <= 1


def test_without_a_cjk_font_one_warning_and_pillows_font(monkeypatch, caplog):
    """No CJK font on the machine: Pillow's built-in font (no font arguments), and one warning,
    only when a name needs one."""
    from detection.inference import draw

    monkeypatch.setattr(draw, "label_font", lambda: None)
    draw._warn_no_font.cache_clear()
    assert draw.label_font_options(["car 0.90"], 12) == {}
    assert not caplog.records
    for _ in range(3):
        assert draw.label_font_options(["猫 0.90"], 12) == {}
    assert [r.getMessage()[:32] for r in caplog.records] == ["no font with CJK glyphs found (l"]
    draw._warn_no_font.cache_clear()
