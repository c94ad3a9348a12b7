"""PNG grids of samples as the loader hands them to the model (``orch data browse``).

Training samples are drawn with the seeds training uses: sample ``k`` of the grid is the ``k``-th
image of epoch 0's shuffled order on a single process (before aspect-ratio batching regroups
portrait and landscape images), augmented with its seed ``(runtime.seed, 0, index)``, so the grid
shows what the model sees in its first epoch. Evaluation splits are shown in file order,
as the evaluation transforms leave them.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.io import encode_png
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, make_grid

from cluster.errors import ConfigError
from cluster.files import write_bytes_atomic
from detection.data.loader import build_dataset
from detection.data.samplers import SampleKey, ShardSampler, mix_seed
from detection.inference.draw import label_font_options

CELL = 320  # pixels of the longer side of one sample in the grid
CAPTION = 16  # pixels of the caption strip under each sample
PER_GRID = 16  # samples per PNG (4 x 4)
# Distinct, readable box colours, one per class (cycled).
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
           "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000")


def browse(config: Any, out_dir: str, n: int = 16, split: str = "train",
           seed: Optional[int] = None) -> tuple[str, list[tuple[str, str]]]:
    """Write ``n`` samples of ``split`` of experiment ``config`` as PNG grids into ``out_dir``;
    return the transforms in one line and ``(path, one-line description)`` per file. ``seed``
    defaults to ``runtime.seed``."""
    if n < 1:
        raise ConfigError(f"--n {n}: show at least one sample")
    data = config.data
    data_split = getattr(data, split, None)
    if data_split is None:
        raise ConfigError(f"data.{split} is not set in the experiment; pick another --split or add data.{split}")
    seed = config.runtime.seed if seed is None else seed
    train = split == "train"
    dataset = build_dataset(data_split, data, train=train)
    if train:
        order = list(ShardSampler(len(dataset), shuffle=True, seed=seed, pad=False))[:n]
        keys: list[Any] = [SampleKey(i, mix_seed(seed, 0, i)) for i in order]  # epoch 0, as in training
    else:
        keys = list(range(min(n, len(dataset))))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for start in range(0, len(keys), PER_GRID):
        chunk = keys[start : start + PER_GRID]
        cells, notes = [], []
        for key in chunk:
            image, target = dataset[key]
            cells.append(_cell(image, target, dataset.class_names))
            notes.append(f"{int(target['image_id'])}:{len(target['boxes'])}")
        grid = make_grid(cells, nrow=4, padding=4, pad_value=255)
        path = os.path.join(out_dir, f"browse_{split}_{start // PER_GRID:02d}.png")
        write_bytes_atomic(path, encode_png(grid).numpy().tobytes())
        written.append((path, f"{len(chunk)} samples (image id:boxes) {' '.join(notes)}"))
    return _describe(dataset.transforms, data, train), written


def _describe(transforms: Any, data: Any, train: bool) -> str:
    if hasattr(transforms, "describe"):
        return f"data.train_pipeline: {transforms.describe()}"
    if not train:
        return "evaluation: as decoded (the model resizes to data.min_size/max_size itself)"
    return f"default: Resize(min_size={data.min_size}, max_size={data.max_size}) > RandomHorizontalFlip(p={data.flip_prob})"


def _cell(image: torch.Tensor, target: dict[str, torch.Tensor], class_names: tuple[str, ...]) -> torch.Tensor:
    """One sample scaled into a CELL x CELL square with its boxes and class names, and a caption
    (image id, size as the model gets it, box count) underneath."""
    height, width = image.shape[-2:]
    scale = CELL / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    pixels = F.resize(image.mul(255).round().clamp(0, 255).to(torch.uint8), size, antialias=True)
    boxes = target["boxes"] * scale
    if len(boxes):
        labels = target["labels"].tolist()
        names = [class_names[label - 1] for label in labels]
        pixels = draw_bounding_boxes(
            pixels, boxes, labels=names, colors=[PALETTE[(label - 1) % len(PALETTE)] for label in labels], width=2,
            **label_font_options(names, size=12),
        )
    canvas = torch.full((3, CELL + CAPTION, CELL), 64, dtype=torch.uint8)
    canvas[:, : size[0], : size[1]] = pixels
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    caption = f"id {int(target['image_id'])}  {width}x{height}  {len(boxes)} box{'' if len(boxes) == 1 else 'es'}"
    ImageDraw.Draw(picture).text((4, CELL + 2), caption, fill=(255, 255, 255))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
