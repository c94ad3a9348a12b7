"""Test-time augmentation: a checkpoint's COCO results on a list of images, once per *view*.

Views: ``none`` (the image as the evaluation dataset reads it) and ``hflip`` (the image mirrored
left-right; the predicted boxes are mirrored back, so both views' results are in the original
image's coordinates and can be fused box by box). Each view's results are COCO result dicts
with the training file's category ids (the predictor's class map), every detection scoring at
least the predictor's floor (0.001), as ``orch eval`` writes them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from cluster.errors import ConfigError
from detection.inference.model import Predictor
from detection.inference.outputs import detections_to_results
from detection.inference.sources import image_batches

VIEWS = ("none", "hflip")


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """xyxy ``boxes`` of a mirrored image of ``width`` pixels, mapped back onto the original."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def predict_views(predictor: Predictor, data_cfg: Any, images: Sequence[tuple[str, int]],
                  views: Sequence[str] = ("none",), batch_size: int = 8) -> tuple[dict[str, list], dict[int, tuple[int, int]]]:
    """Predict ``images`` (``(path, image id)`` pairs) under each of ``views``.

    Returns ``({view: [COCO result dict, ...]}, {image id: (width, height)})``; images are decoded
    once and every view of a batch goes through the model together. Masks are not returned
    (fusion works on boxes)."""
    from detection.data.transforms import build_transforms

    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ConfigError(f"--tta: views {list(views)} unknown; choose from {', '.join(VIEWS)}")
    transforms = build_transforms(data_cfg, train=False)
    label_map = predictor.classes.label_to_cat_id
    results: dict[str, list] = {view: [] for view in views}
    sizes: dict[int, tuple[int, int]] = {}
    for batch in image_batches([path for path, _ in images], transforms, batch_size, workers=0,
                               exif=data_cfg.exif == "apply"):
        inputs = []
        for view in views:
            inputs += [image.flip(-1) if view == "hflip" else image for image, _ in batch]
        outputs = predictor(inputs)
        for v, view in enumerate(views):
            for (image, index), output in zip(batch, outputs[v * len(batch):(v + 1) * len(batch)]):
                image_id = images[index][1]
                height, width = image.shape[-2:]
                sizes[image_id] = (int(width), int(height))
                boxes = hflip_boxes(output["boxes"], int(width)) if view == "hflip" else output["boxes"]
                kept = {"boxes": boxes, "scores": output["scores"], "labels": output["labels"]}
                results[view].extend(detections_to_results(kept, image_id, label_map, masks=False))
    return results, sizes
