"""Datasets and DataLoaders from the ``data`` section of an experiment.

The trainer calls :func:`build_dataset` once per split and :func:`build_loader` once per run (per
rank). The loader is seeded from ``(seed, rank)``, its batch order from ``(seed, epoch)``, and
each sample's augmentation from ``(seed, epoch, index)``, so a run resumed at
``(start_epoch, start_batch)`` sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import random
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from cluster.errors import DataError
from detection.config import DataConfig, DataSplit
from detection.data.coco import CocoDetection
from detection.data.samplers import GroupedBatchSampler, ShardSampler, aspect_ratio_groups, mix_seed
from detection.data.transforms import build_transforms


def build_dataset(
    split: DataSplit,
    data_cfg: DataConfig,
    train: bool,
    with_masks: bool = False,
    like: Optional[CocoDetection] = None,
) -> CocoDetection:
    """The COCO dataset of one split, checked up front (see :class:`CocoDetection`).

    Training datasets resize and flip and drop images without annotations unless
    ``data.keep_empty``; evaluation datasets keep every image and are not resized (the detector
    resizes internally and maps predictions back to the original image size).

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
    return CocoDetection(
        split.ann_file,
        split.img_dir,
        classes=split.classes if split.classes is not None else data_cfg.train.classes,
        train=train,
        keep_empty=data_cfg.keep_empty if train else True,
        transforms=build_transforms(data_cfg, train),
        with_masks=with_masks,
        on_bad_data=data_cfg.on_bad_data,
        label_to_cat_id=like.label_to_cat_id if like is not None else None,
    )


class DetectionLoader(DataLoader):
    """A ``DataLoader`` whose batch sampler is a :class:`GroupedBatchSampler`.

    ``len(loader)`` is the number of batches of a whole epoch, also for the epoch that was
    started at ``start_batch`` (that one yields ``len(loader) - start_batch`` batches).
    """

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next ``iter(loader)`` (batch order and augmentations)."""
        self.batch_sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter(loader)`` runs."""
        return self.batch_sampler.epoch


def collate(batch: Sequence[tuple[Any, dict[str, Any]]]) -> tuple[list[Any], list[dict[str, Any]]]:
    """``[(image, target), ...]`` -> ``([images], [targets])``: detectors take lists, not stacks."""
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    return images, targets


def build_loader(
    dataset: CocoDetection,
    data_cfg: DataConfig,
    rank: int,
    world_size: int,
    train: bool,
    seed: int,
    start_epoch: int = 0,
    start_batch: int = 0,
) -> DetectionLoader:
    """The DataLoader of one rank.

    Training: a seeded shuffle per epoch, split across ranks with padding (every rank runs the
    same number of steps), aspect-ratio grouped batches (``data.aspect_ratio_grouping``), the
    last partial batch dropped; the first epoch is ``start_epoch`` and starts at batch
    ``start_batch``; call ``loader.set_epoch(e)`` before each later epoch.
    Evaluation: natural order, each rank a disjoint shard (``rank::world_size``, no padding, so no
    image is predicted twice), every image kept.

    Workers: ``data.workers_per_gpu`` (0 = load in this process), not persistent, each seeded
    from ``(seed, rank, worker id)`` and limited to one torch thread.
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
    return DetectionLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=functools.partial(_seed_worker, seed, rank) if workers > 0 else None,
        generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
        persistent_workers=False,
    )


def _seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """Seed Python, NumPy and torch in a worker; one thread, since workers already run in parallel."""
    worker_seed = mix_seed(seed, rank, worker_id)
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)
    torch.manual_seed(worker_seed)
    torch.set_num_threads(1)
