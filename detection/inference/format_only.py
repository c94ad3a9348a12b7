"""``orch eval --format-only``: COCO results of a split for an evaluation server, no metrics.

The split is an annotated one (its images and ids from its annotation file) or, for ``data.test``
only, an image folder without one (``data.test: {img_dir: DIR}``: every image below DIR, sorted
by relative file name). Image ids come from ``--image-info`` (a COCO file with ``images`` and
``categories``, such as ``image_info_test-dev2017.json``, matched by ``file_name``; then only its
images are predicted) or the annotation file; a folder without either gets ids 1..N and an
``images.json`` beside the results naming them. Category ids are the training file's. Results
keep detections scoring at least 0.001 and are streamed into a file renamed into place at the end.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from cluster.errors import ConfigError, DataError
from detection import build
from detection.inference.classes import read_image_info
from detection.inference.model import load_predictor
from detection.inference.outputs import JsonArrayWriter, check_out_dir, detections_to_results
from detection.inference.progress import Progress
from detection.inference.sources import check_image_header, image_batches, resolve_sources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FormatSummary:
    """What ``--format-only`` wrote."""

    images: int
    detections: int
    results: str
    image_info: Optional[str]  # the images.json written, when ids were assigned here
    seconds: float


def split_images(data_split: Any, split: str, image_info: Optional[dict[str, int]]) -> list[tuple[str, str, int]]:
    """``(file_name, path, image id)`` of every image to predict, sorted by id."""
    if data_split.ann_file:
        from detection.data.coco import load_coco_json

        listed = [(img["file_name"], img["id"]) for img in load_coco_json(data_split.ann_file)["images"]]
        if image_info is not None:
            unknown = [name for name, _ in listed if name not in image_info]
            if unknown:
                raise DataError(f"--image-info: {len(unknown)} image(s) of {data_split.ann_file} are not in it "
                                f"(first: {unknown[0]}); give the image-info file of this split")
            listed = [(name, image_info[name]) for name, _ in listed]
    else:
        if not os.path.isdir(data_split.img_dir):
            raise DataError(f"data.{split}.img_dir {data_split.img_dir} is not a folder; check the experiment")
        names = [s.name for s in resolve_sources([data_split.img_dir])]
        if image_info is None:
            listed = [(name, i) for i, name in enumerate(names, start=1)]
        else:
            here = set(names)
            missing = [name for name in image_info if name not in here]
            if missing:
                raise DataError(f"--image-info lists {len(missing)} image(s) not under {data_split.img_dir} "
                                f"(first: {missing[0]}); the server expects results for all of them")
            log.info("--image-info: predicting its %d images (%d others under %s left out)",
                     len(image_info), len(here) - len(image_info), data_split.img_dir)
            listed = sorted(image_info.items(), key=lambda item: item[1])
    images = [(name, os.path.join(data_split.img_dir, *name.split("/")), image_id) for name, image_id in listed]
    for name, path, _ in images:
        if not os.path.isfile(path):
            raise DataError(f"image {name} does not exist under data.{split}.img_dir {data_split.img_dir}")
    return sorted(images, key=lambda item: item[2])


def format_results(config: Any, checkpoint: str, split: str, out: str, image_info: Optional[str] = None,
                   batch_size: Optional[int] = None) -> FormatSummary:
    """Predict ``split`` of ``config`` with ``checkpoint`` and write COCO results to ``out`` (see
    the module docstring); nothing is scored."""
    from detection.data.transforms import build_transforms

    data_split = build.eval_split(config, split)
    if data_split is None:
        raise ConfigError(f"data.{split} is not set in the experiment; add data.{split}.img_dir (and ann_file) or pick --split")
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a folder; give the path of the results JSON file")
    check_out_dir(os.path.dirname(out) or ".")
    predictor = load_predictor(config, checkpoint)
    ids = read_image_info(image_info, predictor.classes) if image_info else None
    images = split_images(data_split, split, ids)
    exif = config.data.exif == "apply"
    sizes = [check_image_header(path, exif) for _, path, _ in images]  # a non-image fails here, before any output
    info_path = None if (ids is not None or data_split.ann_file) else os.path.join(os.path.dirname(out) or ".", "images.json")
    transforms = build_transforms(config.data, train=False)
    progress = Progress(len(images))
    label_map = predictor.classes.label_to_cat_id
    try:
        with JsonArrayWriter(out) as results:
            batches = image_batches([path for _, path, _ in images], transforms,
                                    batch_size or config.data.batch_size_per_gpu, config.data.workers_per_gpu, exif)
            for batch in batches:
                outputs = predictor([image for image, _ in batch])
                for (_, index), output in zip(batch, outputs):
                    for result in detections_to_results(output, images[index][2], label_map, predictor.masks):
                        results.append(result)
                progress.update(len(batch))
            if info_path:
                _write_image_info(info_path, images, sizes, predictor)
    finally:
        progress.close()
    return FormatSummary(len(images), results.count, out, info_path, progress.seconds)


def _write_image_info(path: str, images: list[tuple[str, str, int]], sizes: list[tuple[int, int]],
                      predictor: Any) -> None:
    with JsonArrayWriter(path, wrap=("images", {"categories": predictor.classes.categories})) as infos:
        for (name, _, image_id), (width, height) in zip(images, sizes):
            infos.append({"id": image_id, "file_name": name, "width": width, "height": height})
