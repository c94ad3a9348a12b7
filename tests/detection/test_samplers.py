"""Sharding, aspect-ratio grouping and exact mid-epoch resume (samplers and real loaders)."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
import torch

from detection.config import DataConfig, DataSplit
from detection.data import build_dataset, build_loader
from detection.data.samplers import GroupedBatchSampler, SampleKey, ShardSampler, aspect_ratio_groups


@pytest.mark.parametrize("size, world", [(10, 1), (10, 3), (7, 4), (2, 4)])
def test_training_shards_cover_everything_with_equal_lengths(size, world):
    shards = [list(ShardSampler(size, rank, world, shuffle=True, seed=5)) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert all(len(s) == len(ShardSampler(size, r, world)) for r, s in enumerate(shards))
    counts = Counter(itertools.chain(*shards))
    assert set(counts) == set(range(size))
    assert sum(counts.values()) - size < world  # padding repeats fewer than world_size indices


@pytest.mark.parametrize("size, world", [(10, 1), (10, 3), (7, 4), (2, 4)])
def test_eval_shards_are_disjoint_and_cover_each_index_once(size, world):
    shards = [list(ShardSampler(size, rank, world, shuffle=False, pad=False)) for rank in range(world)]
    assert sorted(itertools.chain(*shards)) == list(range(size))
    assert [len(ShardSampler(size, r, world, pad=False)) for r in range(world)] == [len(s) for s in shards]


def test_shuffle_depends_on_seed_and_epoch_only():
    a, b = ShardSampler(50, seed=1), ShardSampler(50, seed=1)
    assert list(a) == list(b) and list(a) != list(range(50))
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ShardSampler(50, seed=2)) != list(ShardSampler(50, seed=1))
    with pytest.raises(ValueError):
        ShardSampler(5, rank=2, world_size=2)


def test_grouped_batches_share_an_aspect_ratio():
    sizes = [(40, 30) if i % 3 else (30, 40) for i in range(23)]  # about a third portrait
    groups = aspect_ratio_groups(sizes)
    assert groups[0] == 1 and groups[1] == 0 and aspect_ratio_groups([(5, 5)]) == [0]
    sampler = GroupedBatchSampler(ShardSampler(23, seed=0), groups, batch_size=4, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 23 // 4
    mixed = [b for b in batches if len({groups[i] for i in b}) > 1]
    assert len(mixed) <= 1  # only the leftovers of both groups may share a batch
    assert len({i for b in batches for i in b}) == 4 * len(batches)
    plain = GroupedBatchSampler(ShardSampler(23, shuffle=False, pad=False), None, batch_size=4, drop_last=False)
    assert list(plain)[-1] == [20, 21, 22] and len(plain) == 6


def test_skip_batches_continues_the_same_order():
    groups = [i % 2 for i in range(30)]

    def sampler() -> GroupedBatchSampler:
        return GroupedBatchSampler(ShardSampler(30, 1, 2, seed=3), groups, batch_size=3, sample_seed=9)

    full = sampler()
    full.set_epoch(2)
    epoch2 = list(full)
    assert all(isinstance(key, SampleKey) for key in epoch2[0])
    resumed = sampler()
    resumed.set_epoch(2)
    resumed.skip_batches(3)
    resumed.set_epoch(2)  # the trainer may set the epoch again before iterating
    assert list(resumed) == epoch2[3:]
    resumed.set_epoch(3)
    full.set_epoch(3)
    assert list(resumed) == list(full)  # the skip applied once
    with pytest.raises(ValueError):
        resumed.skip_batches(len(resumed) + 1)


@pytest.fixture(scope="module")
def loader_setup(shapes_data):
    root = shapes_data
    cfg = DataConfig(
        train=DataSplit(str(root / "annotations/instances_train.json"), str(root / "train")),
        val=DataSplit(str(root / "annotations/instances_val.json"), str(root / "val")),
        batch_size_per_gpu=2, workers_per_gpu=0, min_size=48, max_size=64, flip_prob=0.5,
    )
    return cfg, build_dataset(cfg.train, cfg, train=True), build_dataset(cfg.val, cfg, train=False)


def _run(loader, epochs):
    """(epoch, image ids, pixel checksum) per batch: the checksum sees the random flips."""
    seen = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for images, targets in loader:
            seen.append((epoch, [int(t["image_id"]) for t in targets], [round(float(i.sum()), 3) for i in images]))
    return seen


def test_loader_resumed_mid_epoch_sees_exactly_the_remaining_batches(loader_setup):
    cfg, train_set, _ = loader_setup
    full = _run(build_loader(train_set, cfg, 0, 1, train=True, seed=11), [0, 1, 2])
    per_epoch = len(full) // 3
    resumed = _run(build_loader(train_set, cfg, 0, 1, train=True, seed=11, start_epoch=1, start_batch=3), [1, 2])
    assert resumed == full[per_epoch + 3 :]
    assert full[:per_epoch] != full[per_epoch : 2 * per_epoch]  # epochs differ
    # Worker processes load the same samples with the same augmentations.
    cfg2 = DataConfig(**{**cfg.__dict__, "workers_per_gpu": 2})
    with_workers = _run(build_loader(train_set, cfg2, 0, 1, train=True, seed=11, start_epoch=1, start_batch=3), [1])
    assert with_workers == full[per_epoch + 3 : 2 * per_epoch]


def test_distributed_loaders(loader_setup):
    cfg, train_set, val_set = loader_setup
    train = [build_loader(train_set, cfg, rank, 3, train=True, seed=0) for rank in range(3)]
    assert len({len(loader) for loader in train}) == 1
    ids = [i for loader in train for _, targets in loader for i in (int(t["image_id"]) for t in targets)]
    assert set(ids) <= set(train_set.ids) and len(ids) >= len(train_set) - 3 * cfg.batch_size_per_gpu
    val = [build_loader(val_set, cfg, rank, 3, train=False, seed=0) for rank in range(3)]
    val_ids = [int(t["image_id"]) for loader in val for _, targets in loader for t in targets]
    assert sorted(val_ids) == sorted(val_set.ids)  # every image once, none padded in
    images, _ = next(iter(val[0]))
    assert images[0].shape[-1] == json.load(open(cfg.val.ann_file))["images"][0]["width"]  # not resized


def test_too_few_images_for_a_batch_is_a_clear_error(loader_setup):
    from cluster.errors import DataError

    cfg, train_set, _ = loader_setup
    big = DataConfig(**{**cfg.__dict__, "batch_size_per_gpu": 64})
    with pytest.raises(DataError, match="make no full batch of data.batch_size_per_gpu=64"):
        build_loader(train_set, big, 0, 1, train=True, seed=0)
    assert torch.is_tensor(train_set[0][0])
