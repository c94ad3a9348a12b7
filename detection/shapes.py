"""Synthetic shapes: a small, real COCO-format detection dataset written from a seed.

Coloured rectangles, ellipses and triangles on noisy backgrounds, 1-4 objects per image, some of
them COCO-"small" (area < 32x32). Every object has a bbox (xywh), an ``area`` and a polygon
``segmentation`` that is exactly the polygon drawn, so Mask R-CNN can train on it too.

Only numpy and PIL are used (no torch), so ``orch data shapes`` stays light. The same seed gives
the same bytes: every split draws from its own ``numpy`` generator seeded from ``(seed, split)``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cluster.errors import ConfigError
from cluster.files import write_text_atomic

#: Category ids and names written into every split (COCO ids start at 1; 0 is no category).
CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
)

_SPLIT_KEYS = {"train": 0, "val": 1, "test": 2}
_ELLIPSE_VERTICES = 32
# Object side as a fraction of the image side: most objects medium-sized, one in five drawn small
# (at 128 px a small side is 13-28 px, so COCO's "small" range (area < 32x32) is exercised).
_SMALL_PROB = 0.2
_SMALL_REL = (0.10, 0.22)
_LARGE_REL = (0.22, 0.50)


def make_shapes(
    out_dir: str,
    n_train: int = 200,
    n_val: int = 50,
    size: int = 128,
    seed: int = 0,
    n_test: int = 0,
) -> dict[str, tuple[str, str]]:
    """Write the shapes dataset under ``out_dir`` and return ``{split: (ann_file, img_dir)}``.

    Layout: ``out_dir/annotations/instances_<split>.json`` and ``out_dir/<split>/NNNNNN.png``
    for the splits ``train``, ``val`` and (when ``n_test > 0``) ``test``. Splits with zero images
    are not written. Existing files of the same names are overwritten.
    """
    if size < 32:
        raise ConfigError(f"shapes: image size {size} is too small (--size); use 32 pixels or more")
    if seed < 0:
        raise ConfigError(f"shapes: seed {seed} is negative (--seed); use 0 or more")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if min(counts.values()) < 0:
        raise ConfigError(f"shapes: negative image count in {counts} (--train/--val/--test); use 0 or more")
    paths: dict[str, tuple[str, str]] = {}
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    for split, count in counts.items():
        if count <= 0:
            continue
        rng = np.random.default_rng([seed, _SPLIT_KEYS[split]])
        img_dir = os.path.join(out_dir, split)
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            file_name = f"{image_id:06d}.png"
            pixels, objects = _draw_image(rng, size)
            Image.fromarray(pixels).save(os.path.join(img_dir, file_name), optimize=False)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for category_id, polygon in objects:
                annotations.append(_annotation(len(annotations) + 1, image_id, category_id, polygon))
        ann_file = os.path.join(out_dir, "annotations", f"instances_{split}.json")
        dataset = {
            "info": {"description": "orch synthetic shapes", "seed": seed, "split": split},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": list(CATEGORIES),
        }
        # Compact separators: the file is only read by programs, and the same seed gives the same bytes.
        write_text_atomic(ann_file, json.dumps(dataset, separators=(",", ":")))
        paths[split] = (ann_file, img_dir)
    return paths


def _draw_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One noisy background with 1-4 non-overlapping shapes; returns pixels and (category, polygon)."""
    base = rng.uniform(40, 215, size=3)
    noise = rng.normal(0.0, 12.0, size=(size, size, 3))
    # A smooth gradient as well as pixel noise, so "background" is not one flat colour.
    ramp = np.linspace(-20, 20, size)[None, :, None] * rng.uniform(-1, 1, size=3)
    background = np.clip(base + noise + ramp, 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)

    boxes: list[tuple[float, float, float, float]] = []
    objects: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, 5))):
        # Rejection-sample a box that does not touch the others (with a 2 px margin), so no
        # annotation is hidden under a later shape; give up on this object after a few tries.
        # The size is drawn once (redrawing it on every try would favour small objects).
        low, high = _SMALL_REL if rng.random() < _SMALL_PROB else _LARGE_REL
        w, h = rng.uniform(low, high, size=2) * size
        for _attempt in range(20):
            x0 = rng.uniform(1, size - w - 1)
            y0 = rng.uniform(1, size - h - 1)
            box = (x0, y0, x0 + w, y0 + h)
            if all(not _touches(box, other, margin=2.0) for other in boxes):
                break
        else:
            continue
        boxes.append(box)
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        # Round once, then draw and annotate the same vertices (2 decimals keep the JSON small).
        polygon = np.round(_polygon(rng, category_id, box), 2)
        draw.polygon([tuple(p) for p in polygon.tolist()], fill=_contrasting_colour(rng, base))
        objects.append((category_id, polygon))
    return np.asarray(image), objects


def _polygon(rng: np.random.Generator, category_id: int, box: tuple[float, ...]) -> np.ndarray:
    """The outline of one shape filling ``box`` exactly, as an (N, 2) array of x, y."""
    x0, y0, x1, y1 = box
    if category_id == 1:  # rectangle
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    if category_id == 2:  # ellipse
        t = np.linspace(0, 2 * np.pi, _ELLIPSE_VERTICES, endpoint=False)
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)
    # Triangle: apex somewhere on one side, base on the opposite side; 4 orientations.
    u = rng.uniform(0.2, 0.8)
    orientation = int(rng.integers(0, 4))
    if orientation == 0:
        pts = [[x0 + u * (x1 - x0), y0], [x1, y1], [x0, y1]]
    elif orientation == 1:
        pts = [[x0 + u * (x1 - x0), y1], [x0, y0], [x1, y0]]
    elif orientation == 2:
        pts = [[x0, y0 + u * (y1 - y0)], [x1, y0], [x1, y1]]
    else:
        pts = [[x1, y0 + u * (y1 - y0)], [x0, y1], [x0, y0]]
    return np.array(pts)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least ~90 away (RGB distance) from the background's base colour."""
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - background) > 90:
            break
    else:
        colour = 255 - background
    return tuple(int(c) for c in colour)


def _touches(a: tuple[float, ...], b: tuple[float, ...], margin: float) -> bool:
    return not (a[2] + margin < b[0] or b[2] + margin < a[0] or a[3] + margin < b[1] or b[3] + margin < a[1])


def _annotation(ann_id: int, image_id: int, category_id: int, polygon: np.ndarray) -> dict[str, Any]:
    """A COCO annotation: bbox from the polygon's extent, area from the shoelace formula
    (the polygon's exact area; the mask pycocotools rasterises from it differs by a boundary)."""
    xs, ys = polygon[:, 0], polygon[:, 1]
    x_min, y_min, x_max, y_max = xs.min(), ys.min(), xs.max(), ys.max()
    area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [round(float(v), 2) for v in (x_min, y_min, x_max - x_min, y_max - y_min)],
        "area": round(area, 2),
        "segmentation": [[float(v) for v in polygon.reshape(-1)]],
        "iscrowd": 0,
    }
