"""One real training run shows that the whole program learns (not just runs): SSDlite from
scratch on the synthetic shapes reaches an mAP50 far above chance (~0.0) in about a minute."""

from __future__ import annotations

import pytest

from cluster.env import DistEnv
from detection.shapes import make_shapes
from detection.train import main
from orchestrator.config import load_experiment


@pytest.mark.slow
def test_ssdlite_learns_the_shapes(tmp_path, make_experiment):
    data = tmp_path / "shapes128"
    make_shapes(str(data), n_train=200, n_val=40, size=128, seed=1)
    path = make_experiment(**{
        "data.train.ann_file": str(data / "annotations/instances_train.json"), "data.train.img_dir": str(data / "train"),
        "data.val.ann_file": str(data / "annotations/instances_val.json"), "data.val.img_dir": str(data / "val"),
        "data.min_size": 128, "data.max_size": 128, "data.batch_size_per_gpu": 4,
        "optim.auto_scale_lr.base_batch_size": 4, "optim.grad_clip": 10.0,
        "schedule.iterations": 400, "schedule.warmup_iters": 30, "schedule.warmup_ratio": 0.01,
        "schedule.policy": "cosine", "schedule.min_lr_ratio": 0.02,
        "eval.interval": 400, "checkpoint.interval": 400, "runtime.deterministic": True,
        "runtime.threads": 1, "runtime.log_interval": 50, "tracking.enable": False,
    })
    result = main(load_experiment(path), DistEnv.single())
    # Measured: mAP50 0.52, mAP 0.29 (seeded, 1 thread); an untrained model scores ~0.01.
    assert result.metrics["bbox_mAP_50"] > 0.35, result.metrics
    assert result.metrics["bbox_mAP"] > 0.15, result.metrics
