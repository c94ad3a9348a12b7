"""CocoDetection on hand-made COCO files: label maps, subsets, empty images, crowds, bad data."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.errors import DataError
from detection.config import DataConfig, DataSplit
from detection.data import CocoDetection, build_dataset, build_loader

W, H = 40, 30  # every hand-made image is 40 wide, 30 high


def _base() -> dict:
    """Three images; categories with COCO-style gaps (1, 5, 90); image 3 has no annotation."""
    return {
        "images": [{"id": i, "file_name": f"im{i}.png", "width": W, "height": H} for i in (1, 2, 3)],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
            {"id": 11, "image_id": 1, "category_id": 90, "bbox": [20, 5, 6, 6], "area": 36, "iscrowd": 0,
             "segmentation": [[20, 5, 26, 5, 26, 11, 20, 11]]},
            {"id": 12, "image_id": 2, "category_id": 5, "bbox": [1, 1, 5, 5], "iscrowd": 0,
             "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},
            {"id": 13, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 15], "area": 300, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": [10 * H + 10, 5, 25, 5, W * H - 10 * H - 45]}},
        ],
    }


def _write(tmp_path: Path, data: dict | str) -> tuple[str, str]:
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    for i in (1, 2, 3):
        Image.new("RGB", (W, H), (i * 40, 0, 0)).save(img_dir / f"im{i}.png")
    ann = tmp_path / "ann.json"
    ann.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(ann), str(img_dir)


def test_category_gaps_map_to_contiguous_labels_and_back(tmp_path):
    ds = CocoDetection(*_write(tmp_path, _base()), train=True, keep_empty=True)
    assert ds.label_to_cat_id == {1: 1, 2: 5, 3: 90}
    assert ds.cat_id_to_label == {1: 1, 5: 2, 90: 3}
    assert ds.class_names == ("person", "airplane", "toothbrush")
    assert ds.num_classes == 4
    _, target = ds[0]
    assert target["labels"].tolist() == [1, 3]
    assert target["boxes"].tolist() == [[2, 3, 12, 11], [20, 5, 26, 11]]  # xyxy
    assert target["image_id"].item() == 1 and target["orig_size"].tolist() == [H, W]
    assert all(isinstance(v, torch.Tensor) for v in target.values())


def test_class_subset(tmp_path):
    ann, img = _write(tmp_path, _base())
    ds = CocoDetection(ann, img, classes=["toothbrush", "person"], train=True, keep_empty=False)
    assert ds.label_to_cat_id == {1: 1, 2: 90}
    assert ds.class_names == ("person", "toothbrush")
    assert ds.ids == [1]  # image 2 has only an airplane and a crowd
    assert sorted(ds.coco.getCatIds()) == [1, 90]  # the evaluation ground truth is the subset too
    assert 12 not in ds.coco.anns
    with pytest.raises(DataError, match=r"'cat' not in .*valid names: person, airplane, toothbrush"):
        CocoDetection(ann, img, classes=["cat"])


def test_eval_split_follows_the_training_labels(tmp_path):
    ann, img = _write(tmp_path, _base())
    train = build_dataset(DataSplit(ann, img, classes=("toothbrush", "airplane")), DataConfig(), train=True)
    val = build_dataset(DataSplit(ann, img), DataConfig(), train=False, like=train)
    assert val.label_to_cat_id == train.label_to_cat_id == {1: 5, 2: 90}
    assert val.class_names == ("airplane", "toothbrush") and sorted(val.coco.getCatIds()) == [5, 90]
    subset_cfg = DataConfig(train=DataSplit(ann, img, classes=("airplane",)))
    alone = build_dataset(DataSplit(ann, img), subset_cfg, train=False)  # e.g. orch eval: no train set
    assert alone.class_names == ("airplane",)
    with pytest.raises(DataError, match="differ from the training classes"):
        build_dataset(DataSplit(ann, img, classes=("person",)), DataConfig(), train=False, like=train)
    other = copy.deepcopy(_base())
    other["categories"] = [c for c in other["categories"] if c["id"] != 90]
    other["annotations"] = [a for a in other["annotations"] if a["category_id"] != 90]
    (tmp_path / "other").mkdir()
    ann2, img2 = _write(tmp_path / "other", other)
    with pytest.raises(DataError, match=r"category ids \[90\] of the training data are not in"):
        build_dataset(DataSplit(ann2, img2), DataConfig(), train=False, like=train)


def test_keep_empty_and_eval_keeps_all(tmp_path):
    ann, img = _write(tmp_path, _base())
    assert CocoDetection(ann, img, train=True, keep_empty=False).ids == [1, 2]
    assert CocoDetection(ann, img, train=True, keep_empty=True).ids == [1, 2, 3]
    cfg = DataConfig(keep_empty=False)
    assert build_dataset(DataSplit(ann, img), cfg, train=False).ids == [1, 2, 3]
    assert build_dataset(DataSplit(ann, img), cfg, train=True).ids == [1, 2]


def test_crowd_ignored_in_training_kept_for_eval(tmp_path):
    ann, img = _write(tmp_path, _base())
    _, train_target = CocoDetection(ann, img, train=True)[1]
    assert train_target["labels"].tolist() == [2] and train_target["iscrowd"].tolist() == [0]
    _, eval_target = CocoDetection(ann, img, train=False)[1]
    assert eval_target["iscrowd"].tolist() == [0, 1]
    assert eval_target["area"].tolist() == [25.0, 300.0]  # missing area defaults to the box area


def test_masks_from_polygons_and_rle(tmp_path):
    ann, img = _write(tmp_path, _base())
    _, target = CocoDetection(ann, img, train=False, with_masks=True)[1]
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (2, H, W)
    assert 25 <= int(masks[0].sum()) <= 36  # 5x5 polygon, boundary pixels included
    assert int(masks[1].sum()) == 10  # the RLE: two runs of 5
    _, empty = CocoDetection(ann, img, train=False, keep_empty=True, with_masks=True)[2]
    assert empty["masks"].shape == (0, H, W) and empty["boxes"].shape == (0, 4)


def _bad(tmp_path: Path, mutate) -> tuple[str, str]:
    data = copy.deepcopy(_base())
    mutate(data)
    return _write(tmp_path, data)


BAD_CASES = {
    # reason: (mutation of the base file, words the error names, what "skip" leaves)
    "box_outside_image": (lambda d: d["annotations"][1].update(bbox=[W + 1, 5, 6, 6]), "annotation 11 (image 1)", [1]),
    "zero_area_box": (lambda d: d["annotations"][1].update(bbox=[20, 5, 0, 6]), "annotation 11 (image 1)", [1]),
    "unknown_category": (lambda d: d["annotations"][1].update(category_id=7), "category_id 7", [1]),
    "missing_image": (lambda d: d["images"][0].update(file_name="nope.png"), "nope.png", None),
    "invalid_annotation": (lambda d: d["annotations"][1].pop("bbox"), "bbox of 4 numbers", [1]),
    "invalid_image": (lambda d: d["images"][0].pop("width"), "positive width/height", None),
    "unknown_image": (lambda d: d["annotations"][1].update(image_id=77), "annotation 11 (image 77)", [1]),
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_data_error_names_file_id_and_option(tmp_path, reason):
    mutate, words, _ = BAD_CASES[reason]
    ann, img = _bad(tmp_path, mutate)
    with pytest.raises(DataError) as err:
        CocoDetection(ann, img, on_bad_data="error")
    message = str(err.value)
    assert ann in message and words in message and "data.on_bad_data=skip" in message
    assert "\n" not in message


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_data_skip_counts_and_warns_once(tmp_path, caplog, reason):
    mutate, _, labels_left = BAD_CASES[reason]
    ann, img = _bad(tmp_path, mutate)
    with caplog.at_level(logging.WARNING, logger="detection.data.coco"):
        ds = CocoDetection(ann, img, on_bad_data="skip", train=False)
    assert ds.skipped == {reason: 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{reason}=1" in warnings[0].getMessage()
    if labels_left is None:  # the whole image went: not in the dataset nor in the ground truth
        assert 1 not in ds.ids and 1 not in ds.coco.imgs and 10 not in ds.coco.anns
    else:
        assert 11 not in ds.coco.anns
        assert ds[0][1]["labels"].tolist() == labels_left


@pytest.mark.parametrize("segmentation, reason", [
    ([], "missing_segmentation"),
    ([[1, 2, 3]], "invalid_segmentation"),
    ({"size": [H, W], "counts": [5, 5]}, "invalid_segmentation"),
    ({"size": [W, H], "counts": "abc"}, "invalid_segmentation"),
])
def test_bad_segmentation_when_masks_are_asked(tmp_path, segmentation, reason):
    ann, img = _bad(tmp_path, lambda d: d["annotations"][0].update(segmentation=segmentation))
    with pytest.raises(DataError, match="annotation 10 .*segmentation"):
        CocoDetection(ann, img, with_masks=True)
    assert CocoDetection(ann, img, with_masks=True, on_bad_data="skip").skipped == {reason: 1}
    assert CocoDetection(ann, img, with_masks=False).skipped == {}  # boxes only: not needed


def test_box_partly_outside_is_clipped_with_skip_and_an_error_with_error(tmp_path):
    ann, img = _bad(tmp_path, lambda d: d["annotations"][1].update(bbox=[30, -4, 20, 10]))
    ds = CocoDetection(ann, img, on_bad_data="skip")
    assert ds.skipped == {}
    assert ds[0][1]["boxes"][1].tolist() == [30, 0, W, 6]
    assert ds.coco.anns[11]["bbox"] == [30, 0, 10, 6]
    # on_bad_data=error: what `orch data check` calls an error (beyond its 1 px tolerance) is one here
    with pytest.raises(DataError, match=r"annotation 11 .* reaches outside the .* image by more than 1 px"):
        CocoDetection(ann, img, on_bad_data="error")


def test_box_within_the_tolerance_is_clipped_with_error(tmp_path):
    ann, img = _bad(tmp_path, lambda d: d["annotations"][1].update(bbox=[30, -0.5, 10, 6.5]))
    ds = CocoDetection(ann, img, on_bad_data="error")
    assert ds.coco.anns[11]["bbox"] == [30, 0, 10, 6]


def test_file_level_errors_are_always_errors(tmp_path):
    ann, img = _write(tmp_path, "{\"images\": [1, 2,,]}")
    with pytest.raises(DataError, match=r"ann.json: broken JSON .* line 1 column"):
        CocoDetection(ann, img, on_bad_data="skip")
    with pytest.raises(DataError, match=r"does not exist; check data.<split>.ann_file"):
        CocoDetection(str(tmp_path / "missing.json"), img, on_bad_data="skip")
    ann, _ = _write(tmp_path, _base())
    with pytest.raises(DataError, match=r"image folder .*nowhere does not exist"):
        CocoDetection(ann, str(tmp_path / "nowhere"), on_bad_data="skip")
    ann, img = _write(tmp_path, json.dumps({"images": []}))
    with pytest.raises(DataError, match=r"'categories' is missing"):
        CocoDetection(ann, img)
    with pytest.raises(DataError, match=r"on_bad_data: 'ignore' is not valid"):
        CocoDetection(ann, img, on_bad_data="ignore")


def test_image_size_mismatch_is_a_clear_error(tmp_path):
    ann, img = _bad(tmp_path, lambda d: d["images"][0].update(width=41))
    ds = CocoDetection(ann, img)
    with pytest.raises(DataError, match=r"im1.png: image 1 is 40x30 but .* says 41x30"):
        ds[0]


def test_bad_data_found_before_any_worker_starts(tmp_path):
    """build_dataset raises in this process; with skip, a 2-worker loader then runs cleanly."""
    ann, img = _bad(tmp_path, lambda d: d["annotations"][0].update(bbox=[0, 0, -3, 4]))
    cfg = DataConfig(batch_size_per_gpu=1, workers_per_gpu=2, min_size=30, max_size=40)
    with pytest.raises(DataError, match="zero or negative size box"):
        build_dataset(DataSplit(ann, img), cfg, train=True)
    skip_cfg = DataConfig(batch_size_per_gpu=1, workers_per_gpu=2, min_size=30, max_size=40, on_bad_data="skip")
    ds = build_dataset(DataSplit(ann, img), skip_cfg, train=True)
    batches = list(build_loader(ds, skip_cfg, rank=0, world_size=1, train=True, seed=0))
    assert sorted(int(t[0]["image_id"]) for _, t in batches) == [1, 2]
    assert np.isclose(sum(float(t[0]["boxes"].numel()) for _, t in batches), 8)  # one box each


def _photo(width: int = 96, height: int = 64) -> Image.Image:
    """A noisy image, so JPEG has real work (flat colours decode identically anywhere)."""
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    return Image.fromarray((base + rng.integers(-40, 40, base.shape)).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("suffix, options, fast", [
    ("jpg", {"quality": 90}, True), ("png", {}, True), ("bmp", {}, False),
    ("png", {"mode": "L"}, True), ("png", {"mode": "RGBA"}, True), ("png", {"mode": "P"}, True),
    ("jpg", {"mode": "L", "quality": 90}, True),
])
def test_images_decode_as_pil_decodes_them(tmp_path, suffix, options, fast):
    """torchvision's decoders for JPEG/PNG (grey, alpha and palette PNGs too), PIL for the rest:
    the same pixels as PIL's decode + convert("RGB"), as uint8 [3, H, W]."""
    from torchvision.transforms.functional import pil_to_tensor

    from detection.data.decode import _decode_fast, read_image

    options = dict(options)
    mode = options.pop("mode", "RGB")
    path = tmp_path / f"im.{suffix}"
    _photo().convert(mode).save(path, **options)
    image = read_image(str(path))
    with Image.open(path) as handle:
        expected = pil_to_tensor(handle.convert("RGB"))
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 96)
    assert (image.int() - expected.int()).abs().max() <= (1 if suffix == "jpg" else 0)
    from torchvision.io import read_file

    assert (_decode_fast(read_file(str(path))) is not None) == fast


def test_unreadable_image_is_a_data_error(tmp_path):
    ann, img = _write(tmp_path, _base())
    Path(img, "im1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = CocoDetection(ann, img)
    with pytest.raises(DataError, match=r"im1.png: cannot read image 1 of .*ann.json"):
        ds[0]
