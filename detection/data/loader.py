"""Datasets and DataLoaders from the ``data`` section of an experiment.

The trainer calls :func:`build_dataset` once per split and :func:`build_loader` once per run (per
rank). The loader is seeded from ``(seed, rank)``, its batch order from ``(seed, epoch)``, and
each sample's augmentation from ``(seed, epoch, index)``, so a run resumed at
``(start_epoch, start_batch)`` sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import logging
import random
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from cluster.errors import DataError
from detection.config import DataConfig, DataSplit
from detection.data.batches import Batch, share_in_one_block
from detection.data.coco import CocoDetection
from detection.data.pipelines import Pipeline, check_keeps_boxes
from detection.data.samplers import GroupedBatchSampler, ShardSampler, aspect_ratio_groups, mix_seed
from detection.data.transforms import build_transforms

log = logging.getLogger(__name__)


def build_dataset(
    split: DataSplit,
    data_cfg: DataConfig,
    train: bool,
    with_masks: bool = False,
    like: Optional[CocoDetection] = None,
) -> CocoDetection:
    """The COCO dataset of one split, checked up front (see :class:`CocoDetection`).

    Training datasets resize and flip (or run ``data.train_pipeline``, tried on a few images
    here: see :func:`detection.data.pipelines.check_keeps_boxes`) and drop images without
    annotations unless ``data.keep_empty``; evaluation datasets keep every image and are not
    resized (the detector resizes internally and maps predictions back to the original image
    size).

    A split without its own ``classes`` uses ``data.train.classes``, so evaluation covers the
    classes the model was trained on. Pass the training set as ``like`` when building an
    evaluation set: it then uses the very same label map, and a file whose categories do not
    match is a DataError instead of silently wrong labels.
    """
    if not split.ann_file or not split.img_dir:
        raise DataError(
            f"data split needs both ann_file and img_dir (got ann_file={split.ann_file!r}, "
            f"img_dir={split.img_dir!r}); set them under data.train / data.val / data.test"
        )
    transforms = build_transforms(data_cfg, train)
    dataset = CocoDetection(
        split.ann_file,
        split.img_dir,
        classes=split.classes if split.classes is not None else data_cfg.train.classes,
        train=train,
        keep_empty=data_cfg.keep_empty if train else True,
        transforms=transforms,
        with_masks=with_masks,
        on_bad_data=data_cfg.on_bad_data,
        label_to_cat_id=like.label_to_cat_id if like is not None else None,
        exif=data_cfg.exif == "apply",
    )
    if isinstance(transforms, Pipeline):
        log.info("data.train_pipeline: %s", transforms.describe())
        check_keeps_boxes(dataset)  # here, not as a crash or an empty epoch inside the workers
    return dataset


class DetectionLoader(DataLoader):
    """A ``DataLoader`` whose batch sampler is a :class:`GroupedBatchSampler`.

    ``len(loader)`` is the number of batches of a whole epoch, also for the epoch that was
    started at ``start_batch`` (that one yields ``len(loader) - start_batch`` batches).
    """

    def __iter__(self) -> Iterator:
        batches = super().__iter__()
        # Workers hand over uint8 images (a quarter of the bytes); they become float here, or
        # already in the pinning thread (Batch.pin_memory).
        return batches if self.num_workers == 0 else (batch.to_float() for batch in batches)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next ``iter(loader)`` (batch order and augmentations)."""
        self.batch_sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter(loader)`` runs."""
        return self.batch_sampler.epoch


def collate(batch: Sequence[tuple[Any, dict[str, Any]]]) -> tuple[list[Any], list[dict[str, Any]]]:
    """``[(image, target), ...]`` -> ``([images], [targets])``: detectors take lists, not stacks.

    In a loader worker every tensor of the batch is copied into ONE shared-memory block (see
    :mod:`detection.data.batches`), as ``default_collate`` does for the stacks it builds.
    """
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    if torch.utils.data.get_worker_info() is not None:
        images, targets = share_in_one_block((images, targets))
    return Batch((images, targets))


def build_loader(
    dataset: CocoDetection,
    data_cfg: DataConfig,
    rank: int,
    world_size: int,
    train: bool,
    seed: int,
    start_epoch: int = 0,
    start_batch: int = 0,
    device: Any = None,
    pin_memory: Optional[bool] = None,
) -> DetectionLoader:
    """The DataLoader of one rank.

    Training: a seeded shuffle per epoch, split across ranks with padding (every rank runs the
    same number of steps), aspect-ratio grouped batches (``data.aspect_ratio_grouping``), the
    last partial batch dropped; the first epoch is ``start_epoch`` and starts at batch
    ``start_batch``; call ``loader.set_epoch(e)`` before each later epoch.
    Evaluation: natural order, each rank a disjoint shard (``rank::world_size``, no padding, so no
    image is predicted twice), every image kept.

    Workers: ``data.workers_per_gpu`` (0 = load in this process), each seeded from
    ``(seed, rank, worker id)`` and limited to one torch thread; they decode and augment, stay
    alive across epochs (``persistent_workers``), keep ``data.prefetch_factor`` batches each
    ready, and hand each batch over as uint8 images in one shared-memory block (see
    :mod:`detection.data.batches`); the loader yields float images either way. ``pin_memory``
    (default: when ``device`` is a CUDA device) makes it yield page-locked tensors, so
    ``tensor.to(device, non_blocking=True)`` copies asynchronously.
    """
    sampler = ShardSampler(len(dataset), rank, world_size, shuffle=train, seed=seed, pad=train)
    groups = None
    if train and data_cfg.aspect_ratio_grouping:
        groups = aspect_ratio_groups(dataset.image_sizes)
    batch_sampler = GroupedBatchSampler(
        sampler, groups, data_cfg.batch_size_per_gpu, drop_last=train, sample_seed=seed if train else None
    )
    if train and len(batch_sampler) == 0:
        raise DataError(
            f"{dataset.ann_file}: {len(sampler)} training images per rank (of {len(dataset)}, world size "
            f"{world_size}) make no full batch of data.batch_size_per_gpu={data_cfg.batch_size_per_gpu}; "
            "lower the batch size or add images"
        )
    batch_sampler.set_epoch(start_epoch)
    if start_batch:
        batch_sampler.skip_batches(start_batch)
    workers = data_cfg.workers_per_gpu
    if pin_memory is None:
        pin_memory = device is not None and torch.device(device).type == "cuda"
    return DetectionLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_seed_worker, seed, rank) if workers > 0 else None,
        generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
        # The batch order lives in the batch sampler, iterated in this process: workers that
        # outlive an epoch still get each epoch's (and a resumed epoch's) batches.
        persistent_workers=workers > 0,
        prefetch_factor=getattr(data_cfg, "prefetch_factor", 2) if workers > 0 else None,
    )


def _seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """Seed Python, NumPy and torch in a worker; one thread, since workers already run in parallel;
    the worker's copy of the dataset hands out uint8 images (the loader makes them float)."""
    dataset = torch.utils.data.get_worker_info().dataset
    if hasattr(dataset, "float_images"):
        dataset.float_images = False
    worker_seed = mix_seed(seed, rank, worker_id)
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)
    torch.manual_seed(worker_seed)
    torch.set_num_threads(1)
