"""Resize and flip keep image, boxes and masks consistent; randomness follows the generator."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from detection.config import DataConfig
from detection.data.transforms import Compose, RandomHorizontalFlip, Resize, ToTensor, build_transforms, image_to_float


def _sample(height: int = 30, width: int = 60):
    """An image with one filled box whose mask and box agree exactly."""
    image = torch.zeros(3, height, width)
    masks = torch.zeros(1, height, width, dtype=torch.uint8)
    image[:, 5:15, 10:30] = 1.0
    masks[0, 5:15, 10:30] = 1
    target = {
        "boxes": torch.tensor([[10.0, 5.0, 30.0, 15.0]]),
        "labels": torch.tensor([1]),
        "area": torch.tensor([200.0]),
        "masks": masks,
    }
    return image, target


def _mask_box(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.mark.parametrize("size, min_size, max_size, expected", [
    ((30, 60), 60, 1000, (60, 120)),   # shorter side to min_size
    ((30, 60), 60, 100, (50, 100)),    # longer side capped at max_size
    ((60, 30), 15, 100, (30, 15)),     # downscale, portrait
    ((64, 64), 64, 64, (64, 64)),      # already there: unchanged
])
def test_resize_output_size(size, min_size, max_size, expected):
    assert Resize(min_size, max_size).output_size(*size) == expected


def test_resize_scales_boxes_area_and_masks_together():
    image, target = _sample()
    out_image, out = Resize(60, 1000)(image, target)
    assert out_image.shape == (3, 60, 120)
    assert out["boxes"].tolist() == [[20.0, 10.0, 60.0, 30.0]]
    assert out["area"].tolist() == [800.0]
    assert out["masks"].dtype == torch.uint8 and out["masks"].shape == (1, 60, 120)
    assert _mask_box(out["masks"][0]) == [20, 10, 60, 30]
    assert target["boxes"].tolist() == [[10.0, 5.0, 30.0, 15.0]]  # input untouched
    same_image, same = Resize(30, 60)(image, target)
    assert same_image is image and same is target


def test_flip_mirrors_boxes_and_masks():
    image, target = _sample()
    flipped_image, out = RandomHorizontalFlip(1.0)(image, target)
    assert out["boxes"].tolist() == [[30.0, 5.0, 50.0, 15.0]]
    assert _mask_box(out["masks"][0]) == [30, 5, 50, 15]
    assert torch.equal(flipped_image, image.flip(-1))
    assert _mask_box(flipped_image[0]) == [30, 5, 50, 15]
    back_image, back = RandomHorizontalFlip(1.0)(flipped_image, out)
    assert torch.equal(back_image, image) and torch.equal(back["boxes"], target["boxes"])
    kept_image, kept = RandomHorizontalFlip(0.0)(image, target)
    assert kept_image is image and kept is target


def test_flip_is_decided_by_the_generator():
    flip = RandomHorizontalFlip(0.5)
    image, target = _sample()

    def decisions(seed: int) -> list[bool]:
        generator = torch.Generator().manual_seed(seed)
        return [flip(image, target, generator)[1]["boxes"][0, 0].item() != 10.0 for _ in range(200)]

    first = decisions(1)
    assert first == decisions(1)
    assert first != decisions(2)
    assert 60 < sum(first) < 140


def test_pipeline_from_config():
    cfg = DataConfig(min_size=20, max_size=50, flip_prob=1.0)
    pil = Image.new("RGB", (40, 10), (255, 0, 0))
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}
    train = build_transforms(cfg, train=True)
    # float conversion inside Resize, when it resizes; the dataset converts the others at the end
    assert [type(t) for t in train.transforms] == [Resize, RandomHorizontalFlip]
    image, out = train(pil, target, torch.Generator().manual_seed(0))
    assert image.shape == (3, 12, 50) and image.dtype == torch.float32 and image.max() == 1.0
    same_size, _ = build_transforms(DataConfig(min_size=10, max_size=40), train=True)(pil, target, torch.Generator())
    assert same_size.dtype == torch.uint8 and image_to_float(same_size).max() == 1.0
    assert out["boxes"].tolist() == [[37.5, 0.0, 50.0, 12.0]]
    evaluation = build_transforms(cfg, train=False)
    assert evaluation.transforms == []
    assert isinstance(build_transforms(cfg, train=False, resize_eval=True).transforms[0], Resize)
    image, out = ToTensor()(pil, target)
    assert image.shape == (3, 10, 40) and image.dtype == torch.float32 and out is target
    assert isinstance(Compose([]), Compose)


@pytest.mark.parametrize("size, min_size, max_size", [((48, 64), 80, 200), ((120, 90), 30, 40), ((33, 47), 33, 47)])
def test_default_pipeline_gives_exactly_the_values_of_before(size, min_size, max_size):
    """Decoded uint8 in, the same bits out as orch's former pipeline (to float, resize, flip)."""
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8)
    target = {"boxes": torch.tensor([[1.0, 2.0, 20.0, 30.0]]), "area": torch.tensor([551.0])}
    for flip in (0.0, 1.0):
        cfg = DataConfig(min_size=min_size, max_size=max_size, flip_prob=flip)
        new_image, new = build_transforms(cfg, train=True)(image, target)
        new_image = image_to_float(new_image)
        before = [ToTensor(), Resize(min_size, max_size)] + ([RandomHorizontalFlip(flip)] if flip else [])
        old_image, old = Compose(before)(image, target)
        assert new_image.dtype == torch.float32 and torch.equal(new_image, old_image)
        assert torch.equal(new["boxes"], old["boxes"]) and torch.equal(new["area"], old["area"])
