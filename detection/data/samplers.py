"""Seedable, distributed-aware, resumable sampling.

- :class:`ShardSampler`: this rank's share of the indices; a fresh seeded permutation each epoch
  (``set_epoch``), padded so every rank gets as many (training: DDP needs equal step counts) or
  disjoint and unpadded (evaluation: no image counted twice).
- :class:`GroupedBatchSampler`: batches of images on the same side of the aspect-ratio line
  (w >= h and w < h), as in torchvision's detection references, so padding to a common size in a
  batch wastes little. ``skip_batches(k)`` starts the next epoch at batch ``k``: the order is a
  pure function of ``(seed, epoch, rank, world_size)``, so an interrupted run continues with
  exactly the batches it had not seen yet.

Batches may carry a per-sample seed (:class:`SampleKey`) that :class:`CocoDetection` turns into
the generator of that sample's random transforms.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Sampler


class SampleKey(NamedTuple):
    """A dataset index with the seed of its random transforms."""

    index: int
    seed: int


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (seed, epoch, index, ...)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def aspect_ratio_groups(image_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Group id per image from ``(width, height)``: 0 for landscape or square, 1 for portrait."""
    return [0 if width >= height else 1 for width, height in image_sizes]


class ShardSampler(Sampler[int]):
    """The indices one rank reads in one epoch.

    Args:
        size: dataset length.
        rank, world_size: this process's place in the job.
        shuffle: a seeded permutation per epoch (training) or the natural order (evaluation).
        seed: base seed; the permutation is a function of ``(seed, epoch)``, the same on all ranks.
        pad: repeat indices from the start so ``size`` divides evenly across ranks (every rank
            gets ``ceil(size / world_size)``); without it the shards are disjoint and their
            lengths may differ by one.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, pad: bool = True) -> None:
        if size <= 0:
            raise ValueError(f"ShardSampler: dataset is empty (size={size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardSampler: rank {rank} is not in 0..{world_size - 1}")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.pad:
            total = math.ceil(self.size / self.world_size) * self.world_size
            # Repeat as often as needed: a dataset smaller than the world still fills every rank.
            order = (order * math.ceil(total / self.size))[:total]
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))


class GroupedBatchSampler(Sampler[list]):
    """Batches from ``sampler`` whose images share an aspect-ratio group.

    Full batches are formed per group in sampling order; the leftovers of all groups are then
    batched together (mixed groups are rare and harmless), so the number of batches is exactly
    ``len(sampler) // batch_size`` with ``drop_last`` (else rounded up) on every rank.

    Args:
        sampler: index sampler with ``set_epoch`` (a :class:`ShardSampler`).
        group_ids: group per dataset index; ``None`` = one group (plain batching).
        batch_size: images per batch.
        drop_last: drop the final partial batch (training).
        sample_seed: when set, batches hold :class:`SampleKey` ``(index, seed)`` pairs whose seed
            is a function of ``(sample_seed, epoch, index)``; else plain indices.
    """

    def __init__(self, sampler: ShardSampler, group_ids: Optional[Sequence[int]], batch_size: int,
                 drop_last: bool = True, sample_seed: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"GroupedBatchSampler: batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids) if group_ids is not None else None
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.sample_seed = sample_seed
        self.epoch = getattr(sampler, "epoch", 0)
        self._skip: Optional[tuple[int, int]] = None  # (epoch, batches to skip)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the next iteration (forwarded to the index sampler)."""
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def skip_batches(self, count: int, epoch: Optional[int] = None) -> None:
        """Make the iteration over ``epoch`` (default: the current one) start at batch ``count``.

        Applies once: later epochs start at their first batch.
        """
        if count < 0 or count > len(self):
            raise ValueError(f"skip_batches: {count} is not in 0..{len(self)} (batches per epoch)")
        self._skip = (self.epoch if epoch is None else epoch, count)

    def batches(self) -> list[list[int]]:
        """All batches of the current epoch, in order (plain indices)."""
        indices = list(self.sampler)
        if self.group_ids is None:
            ordered = indices
            full: list[list[int]] = []
        else:
            buffers: dict[int, list[int]] = {}
            full = []
            for index in indices:
                buffer = buffers.setdefault(self.group_ids[index], [])
                buffer.append(index)
                if len(buffer) == self.batch_size:
                    full.append(buffer[:])
                    buffer.clear()
            ordered = [index for group in sorted(buffers) for index in buffers[group]]
        for start in range(0, len(ordered), self.batch_size):
            chunk = ordered[start : start + self.batch_size]
            if len(chunk) == self.batch_size or not self.drop_last:
                full.append(chunk)
        return full

    def __iter__(self) -> Iterator[list[Union[int, SampleKey]]]:
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start, self._skip = self._skip[1], None
        for batch in self.batches()[start:]:
            if self.sample_seed is None:
                yield batch
            else:
                yield [SampleKey(i, mix_seed(self.sample_seed, self.epoch, i)) for i in batch]

    def __len__(self) -> int:
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)
