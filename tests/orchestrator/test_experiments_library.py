"""Every file of the ``experiments/`` library loads and validates; the recipes keep their promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from detection.lr_scaling import scale_lr
from orchestrator.config import build_experiment, load_experiment, load_raw

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
RUNNABLE = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if "_base_" not in p.parts)
BASES = sorted((EXPERIMENTS / "_base_").rglob("*.yaml"))
COCO = sorted((EXPERIMENTS / "coco").glob("*_1x_coco.yaml"))
DETECTORS = [
    "faster_rcnn_r50_fpn", "faster_rcnn_r50_fpn_v2", "faster_rcnn_r18_fpn",
    "faster_rcnn_mobilenet_v3_fpn", "retinanet_r50_fpn", "retinanet_r50_fpn_v2", "fcos_r50_fpn",
    "ssd300_vgg16", "ssdlite320_mobilenet_v3", "mask_rcnn_r50_fpn",
]


def rel(path: Path) -> str:
    return str(path.relative_to(EXPERIMENTS))


def test_library_is_there():
    assert len(COCO) == len(DETECTORS)
    assert {p.name for p in (EXPERIMENTS / "_base_" / "models").glob("*.yaml")} == {f"{d}.yaml" for d in DETECTORS}
    for name in ("datasets/coco_detection.yaml", "datasets/coco_instance.yaml", "datasets/shapes.yaml",
                 "schedules/schedule_1x.yaml", "schedules/schedule_2x.yaml", "default_runtime.yaml"):
        assert (EXPERIMENTS / "_base_" / name).is_file(), name


@pytest.mark.parametrize("path", RUNNABLE, ids=rel)
def test_runnable_experiment_loads_and_validates(path):
    exp = load_experiment(path)
    assert exp.name
    assert exp.data.train.ann_file and exp.data.train.img_dir


@pytest.mark.parametrize("path", BASES, ids=rel)
def test_each_base_validates_on_its_own(path):
    build_experiment(load_raw(path), source=str(path))


@pytest.mark.parametrize("detector", DETECTORS)
def test_coco_recipe_uses_the_standard_8x2_setting(detector):
    exp = load_experiment(EXPERIMENTS / "coco" / f"{detector}_1x_coco.yaml")
    assert exp.name == f"{detector}_1x_coco"
    assert exp.resources.gpus == 8 and exp.data.batch_size_per_gpu == 2
    assert exp.optim.auto_scale_lr.enable and exp.optim.auto_scale_lr.base_batch_size == 16
    assert (exp.schedule.epochs, exp.schedule.iterations) == (12, None)
    assert exp.data.train.ann_file == "data/coco/annotations/instances_train2017.json"
    assert exp.data.val.img_dir == "data/coco/val2017"
    # On the reference hardware the configured LR is used as is.
    assert scale_lr(exp.optim, exp.schedule, exp.resources.gpus, exp.data.batch_size_per_gpu).factor == 1.0
    assert ("segm" in exp.eval.metric) == detector.startswith("mask_rcnn")


def test_r18_recipe_builds_fasterrcnn_with_resnet18():
    model = load_experiment(EXPERIMENTS / "coco" / "faster_rcnn_r18_fpn_1x_coco.yaml").model
    assert (model.type, model.backbone) == ("fasterrcnn", "resnet18")


def test_schedule_bases():
    one = build_experiment(load_raw(EXPERIMENTS / "_base_" / "schedules" / "schedule_1x.yaml"))
    assert (one.schedule.epochs, one.schedule.milestones, one.optim.lr) == (12, (8, 11), 0.02)
    assert (one.schedule.warmup_iters, one.schedule.warmup_ratio) == (500, 0.001)
    two = build_experiment(load_raw(EXPERIMENTS / "_base_" / "schedules" / "schedule_2x.yaml"))
    assert (two.schedule.epochs, two.schedule.milestones) == (24, (16, 22))


def test_shapes_dataset_base_paths():
    data = build_experiment(load_raw(EXPERIMENTS / "_base_" / "datasets" / "shapes.yaml")).data
    assert data.train.ann_file == "data/shapes/annotations/instances_train.json"
    assert data.val.img_dir == "data/shapes/val"


@pytest.mark.parametrize("path", RUNNABLE, ids=rel)
def test_models_are_in_the_trainers_table(path):
    from detection.models import MODELS, RESNET_BACKBONES  # the table itself imports no torch

    exp = load_experiment(path)
    entry = MODELS.get(exp.model.type)
    assert entry is not None, f"{rel(path)}: model.type {exp.model.type!r} not in detection.models.MODELS"
    if entry.takes_backbone:
        assert exp.model.backbone in RESNET_BACKBONES
    if entry.masks:
        assert "segm" in exp.eval.metric
    assert exp.data.min_size >= entry.min_input
    if entry.fixed_size and path.parent.name == "coco":
        assert exp.data.min_size == exp.data.max_size in (300, 320)
