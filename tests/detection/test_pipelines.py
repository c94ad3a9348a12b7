"""data.train_pipeline: v2 transforms on detection samples, presets, checks, determinism."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from cluster.errors import ConfigError
from detection.config import DataConfig, DataSplit
from detection.data import build_dataset, build_loader, build_pipeline
from detection.data.pipeline_spec import LEFT_OUT, PRESETS, TRANSFORMS, pipeline_problem
from detection.data.batches import Batch, share_in_one_block
from detection.data.pipelines import FixedSizeCrop

REPO = Path(__file__).resolve().parents[2]


def _sample(height=40, width=60):
    """A uint8 image with two objects whose masks fill their boxes exactly."""
    image = torch.full((3, height, width), 50, dtype=torch.uint8)
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1
    masks[1, 20:38, 40:58] = 1
    image[:, masks.sum(0) > 0] = 200
    target = {
        "boxes": torch.tensor([[10.0, 5.0, 30.0, 15.0], [40.0, 20.0, 58.0, 38.0]]),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
        "area": torch.tensor([200.0, 324.0]),
        "iscrowd": torch.zeros(2, dtype=torch.int64),
        "image_id": torch.tensor(7),
    }
    return image, target


def _seed(value: int) -> torch.Generator:
    return torch.Generator().manual_seed(value)


def _mask_box(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# --- the table orch config checks against -------------------------------------------------

def test_table_matches_the_installed_torchvision():
    """Every v2 transform is offered or left out with a reason, and the offered ones take
    exactly the arguments the table lists (regenerate the table when torchvision changes)."""
    classes = {name for name in dir(v2) if inspect.isclass(getattr(v2, name)) and issubclass(getattr(v2, name), v2.Transform)}
    assert classes - set(TRANSFORMS) - set(LEFT_OUT) == set(), "new v2 transforms: add to TRANSFORMS or LEFT_OUT"
    assert set(LEFT_OUT) <= classes and not set(TRANSFORMS) & set(LEFT_OUT)
    for name, args in TRANSFORMS.items():
        cls = FixedSizeCrop if name == "FixedSizeCrop" else getattr(v2, name)
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        hidden = {"labels_getter"} if name == "SanitizeBoundingBoxes" else set()
        assert tuple(p for p in params if p not in hidden) == args, name


@pytest.mark.parametrize("spec, key, words", [
    ("lsjj", "", ["unknown preset 'lsjj'", "did you mean 'lsj'", "hflip, lsj, multiscale, ssd, ssdlite"]),
    ([{"type": "RandomIOUCrop"}], "[0]", ["did you mean 'RandomIoUCrop'", "RandomZoomOut", "ScaleJitter"]),
    ([{"type": "RandomHorizontalFlip"}, {"type": "RandomZoomOut", "fil": 0}], "[1]",
     ["no argument 'fil'", "did you mean 'fill'", "valid: fill, side_range, p"]),
    ([{"type": "RandomErasing"}], "[0]", ["keeps their boxes"]),
    ([{"p": 0.5}], "[0]", ["needs a 'type'"]),
    ([{"type": "SanitizeBoundingBoxes", "labels_getter": None}], "[0]", ["valid: min_size, min_area"]),
])
def test_problems_are_found_without_torchvision(spec, key, words):
    found_key, message = pipeline_problem(spec)
    assert found_key == key and "\n" not in message
    for word in words:
        assert word in message
    assert pipeline_problem("ssd") is None and pipeline_problem(None) is None
    assert pipeline_problem([{"type": "ScaleJitter", "target_size": [64, 64]}]) is None


def test_orch_config_checks_the_pipeline_without_loading_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {REPO / 'experiments/shapes_demo.yaml'}\n"
                   "data:\n  train_pipeline:\n    - {type: RandomZoomOut, fil: [123, 117, 104]}\n")
    probe = ("import sys\nfrom orchestrator.cli import main\n"
             "code = main(['config', sys.argv[1], '--set', 'data.train_pipeline=ssd'])\n"
             "print(code, 'torch' in sys.modules, file=sys.stderr)\n"
             "sys.exit(main(['config', sys.argv[2]]))\n")
    result = subprocess.run([sys.executable, "-c", probe, str(REPO / "experiments/shapes_demo.yaml"), str(bad)],
                            capture_output=True, text=True, timeout=120)
    first, error = result.stderr.strip().splitlines()
    assert first == "0 False"
    assert result.returncode == 2
    assert error.startswith("orch: error: ") and "bad.yaml: data.train_pipeline[0]: RandomZoomOut has no argument 'fil'" in error


def test_bad_argument_values_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"data.train_pipeline\[1\] \(RandomZoomOut\): .*side range.*\]; fix the arguments \(fill, side_range, p\)$"):
        build_pipeline([{"type": "RandomHorizontalFlip"}, {"type": "RandomZoomOut", "side_range": [0.5, 1.0]}])


# --- presets: the references' DetectionPresetTrain ------------------------------------------

def test_presets_are_the_references_presets():
    def described(name, flip=0.5):
        out = []
        for t in build_pipeline(name, flip).compose.transforms:
            keep = {k: v for k, v in vars(t).items() if not k.startswith("_") and k != "training"}
            out.append((type(t).__name__, keep))
        return out

    flip = ("RandomHorizontalFlip", {"p": 0.5})
    sanitize = ("SanitizeBoundingBoxes", {"min_size": 1.0, "min_area": 1.0, "labels_getter": "default"})
    assert described("hflip") == [flip, sanitize]
    assert described("hflip", 0.25)[0] == ("RandomHorizontalFlip", {"p": 0.25})  # data.flip_prob
    lsj = described("lsj")
    assert lsj[0] == ("ScaleJitter", {"target_size": [1024, 1024], "scale_range": (0.1, 2.0),
                                      "interpolation": "bilinear", "antialias": True})
    assert lsj[1][0] == "FixedSizeCrop" and lsj[1][1]["size"] == (1024, 1024)
    assert list(lsj[1][1]["fill"].values()) == [[123.0, 117.0, 104.0], 0]  # image mean, masks 0
    assert lsj[2:] == [flip, sanitize]
    multiscale = described("multiscale")
    assert multiscale[0][0] == "RandomShortestSize" and multiscale[0][1]["max_size"] == 1333
    assert list(multiscale[0][1]["min_size"]) == list(range(480, 801, 32))
    ssd = described("ssd")
    assert [n for n, _ in ssd] == ["RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop",
                                   "RandomHorizontalFlip", "SanitizeBoundingBoxes"]
    assert ssd[1][1]["side_range"] == (1.0, 4.0) and ssd[1][1]["p"] == 0.5
    assert ssd[2][1]["options"] == [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0] and ssd[2][1]["trials"] == 40
    assert [n for n, _ in described("ssdlite")] == ["RandomIoUCrop", "RandomHorizontalFlip", "SanitizeBoundingBoxes"]
    assert set(PRESETS) == {"hflip", "lsj", "multiscale", "ssd", "ssdlite"}


# --- what the pipeline does to a sample -----------------------------------------------------

def test_masks_and_boxes_follow_the_geometry():
    image, target = _sample()
    pipeline = build_pipeline([
        {"type": "RandomZoomOut", "fill": [123, 117, 104], "p": 1.0},
        {"type": "RandomHorizontalFlip", "p": 1.0},
        {"type": "Resize", "size": [64]},
    ])
    out_image, out = pipeline(image, target, _seed(3))
    assert out_image.dtype == torch.uint8 and out_image.shape[-2] == 64  # the dataset makes it float
    assert out["masks"].dtype == torch.uint8 and out["masks"].shape[-2:] == out_image.shape[-2:]
    assert set(out["masks"].unique().tolist()) <= {0, 1}  # the zoom-out canvas is 0 in masks, not 123
    for box, mask in zip(out["boxes"], out["masks"]):
        assert torch.allclose(torch.tensor(_mask_box(mask), dtype=torch.float32), box, atol=1.0)
    assert out["labels"].tolist() == [1, 2] and out["image_id"].item() == 7
    assert torch.allclose(out["area"], (out["boxes"][:, 2:] - out["boxes"][:, :2]).prod(1))
    assert out_image[:, 0, 0].tolist() in ([123, 117, 104], [50, 50, 50])  # the fill, or the image


def test_sanitize_drops_labels_and_masks_with_their_boxes():
    image, target = _sample()
    # rows 15..25, columns 18..42: the first object is cut to zero height, the second keeps a 2x5 corner
    out_image, out = build_pipeline([{"type": "CenterCrop", "size": [10, 24]}])(image, target, _seed(0))
    assert out_image.shape == (3, 10, 24)
    assert out["boxes"].tolist() == [[22.0, 5.0, 24.0, 10.0]] and out["labels"].tolist() == [2]
    assert out["masks"].shape == (1, 10, 24) and _mask_box(out["masks"][0]) == [22, 5, 24, 10]
    assert out["area"].tolist() == [10.0] and out["iscrowd"].tolist() == [0]
    cropped, out = build_pipeline([{"type": "FixedSizeCrop", "size": [30, 35]}])(image, target, _seed(0))
    assert cropped.shape == (3, 30, 35) and len(out["boxes"]) == len(out["labels"]) == len(out["masks"])
    padded, out = build_pipeline([{"type": "FixedSizeCrop", "size": 80, "fill": 9}])(image, target, _seed(0))
    assert padded.shape == (3, 80, 80) and padded[:, 79, 79].tolist() == [9, 9, 9]
    assert out["masks"][:, 40:, :].sum() == 0 and out["boxes"].tolist() == target["boxes"].tolist()


def test_the_seed_decides_every_draw_and_the_global_stream_is_left_alone():
    image, target = _sample()
    pipeline = build_pipeline("ssd")
    torch.manual_seed(99)
    before = torch.get_rng_state()
    first = pipeline(image, target, _seed(5))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(1)  # another global state: same sample seed, same result
    again = pipeline(image, target, _seed(5))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    shapes = {tuple(pipeline(image, target, _seed(s))[0].shape) for s in range(12)}
    assert len(shapes) > 3  # zoom-out and IoU crop really draw


def test_an_emptied_image_is_redrawn_unless_keep_empty():
    image, target = _sample()
    target = {**target, "boxes": target["boxes"][:1], "labels": target["labels"][:1], "masks": target["masks"][:1]}
    spec = [{"type": "RandomCrop", "size": [12, 12]}]  # usually misses the one 20x10 object
    redrawn = [build_pipeline(spec)(image, target, _seed(s))[1] for s in range(20)]
    kept = [build_pipeline(spec, keep_empty=True)(image, target, _seed(s))[1] for s in range(20)]
    assert sum(len(t["boxes"]) == 0 for t in kept) >= 5  # the references' behaviour: background images
    assert sum(len(t["boxes"]) == 0 for t in redrawn) < sum(len(t["boxes"]) == 0 for t in kept)
    again = build_pipeline(spec)(image, target, _seed(3))[1]
    assert torch.equal(again["boxes"], redrawn[3]["boxes"])  # redraws are seeded too


# --- with the dataset and the loader --------------------------------------------------------

def _cfg(shapes_data, **changes):
    root = Path(shapes_data)
    base = dict(train=DataSplit(str(root / "annotations/instances_train.json"), str(root / "train")),
                batch_size_per_gpu=2, workers_per_gpu=0, min_size=64, max_size=64)
    return DataConfig(**{**base, **changes})


def test_a_pipeline_that_empties_every_image_is_refused_at_start(shapes_data):
    cfg = _cfg(shapes_data, train_pipeline=[{"type": "SanitizeBoundingBoxes", "min_size": 500}])
    with pytest.raises(ConfigError) as err:
        build_dataset(cfg.train, cfg, train=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.train_pipeline: every one of the 8 training images")
    assert "11 draws each" in message


def test_orch_train_with_a_box_destroying_pipeline_exits_2_with_one_line(make_experiment):
    path = make_experiment(**{"data.train_pipeline": [
        {"type": "RandomHorizontalFlip"}, {"type": "SanitizeBoundingBoxes", "min_area": 5000}], "tracking.enable": False})
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(path)],
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert lines[-1].startswith("orch: error: data.train_pipeline: every one of the") and "Traceback" not in result.stderr


def _batches(loader, epochs):
    seen = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for images, targets in loader:
            seen.append([(int(t["image_id"]), tuple(i.shape), round(float(i.sum()), 3), t["boxes"].tolist())
                         for i, t in zip(images, targets)])
    return seen


def test_worker_count_does_not_change_the_batches(shapes_data):
    cfg = _cfg(shapes_data, train_pipeline="ssd")
    dataset = build_dataset(cfg.train, cfg, train=True)
    in_process = _batches(build_loader(dataset, cfg, 0, 1, train=True, seed=4), [0, 1])
    workers = DataConfig(**{**cfg.__dict__, "workers_per_gpu": 2})
    loader = build_loader(dataset, workers, 0, 1, train=True, seed=4)
    assert loader.persistent_workers and loader.prefetch_factor == 2
    assert _batches(loader, [0, 1]) == in_process
    assert in_process[: len(in_process) // 2] != in_process[len(in_process) // 2 :]  # epochs differ
    resumed = build_loader(dataset, workers, 0, 1, train=True, seed=4, start_epoch=1, start_batch=2)
    assert _batches(resumed, [1]) == in_process[len(in_process) // 2 + 2 :]


def test_workers_hand_over_uint8_in_one_block_and_the_loader_makes_floats(shapes_data):
    cfg = _cfg(shapes_data, workers_per_gpu=1)
    dataset = build_dataset(cfg.train, cfg, train=True)
    images, targets = next(iter(build_loader(dataset, cfg, 0, 1, train=True, seed=2)))
    assert dataset.float_images  # the workers' copies changed, not this one
    keys = build_loader(dataset, cfg, 0, 1, train=True, seed=2).batch_sampler
    expected = [dataset[key] for key in next(iter(keys))]
    for image, target, (want_image, want) in zip(images, targets, expected):
        assert image.dtype == torch.float32 and torch.equal(image, want_image)  # bit for bit
        assert all(torch.equal(target[k], want[k]) for k in want)
    blocks = {t.untyped_storage().data_ptr() for target in targets for t in target.values()}
    assert len(blocks) == 1  # one shared-memory segment for the whole batch's targets


def test_batch_conversions_give_the_dataset_values():
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    target = {"boxes": torch.zeros(1, 4), "image_id": torch.tensor(3)}
    batch = Batch(([image, image.float() / 255], [target, target]))
    images, targets = batch.to_float()
    assert torch.equal(images[0], image.float().div_(255)) and images[1] is batch[0][1]
    assert targets is batch[1] and batch.to_float().to_float()[0][1] is images[1]
    shared = share_in_one_block(([image], [target]))
    assert shared[0][0].is_shared() and torch.equal(shared[0][0], image) and torch.equal(shared[1][0]["boxes"], target["boxes"])
    if torch.cuda.is_available():  # page-locked memory needs a CUDA driver
        pinned_images, pinned_targets = batch.pin_memory()
        assert pinned_images[0].is_pinned() and pinned_targets[0]["boxes"].is_pinned()
        assert torch.equal(pinned_images[0], images[0])


def test_pin_memory_follows_the_device(shapes_data):
    cfg = _cfg(shapes_data)
    dataset = build_dataset(cfg.train, cfg, train=True)
    assert not build_loader(dataset, cfg, 0, 1, train=True, seed=0).pin_memory  # callers of before
    assert build_loader(dataset, cfg, 0, 1, train=True, seed=0, device="cuda:0").pin_memory
    assert not build_loader(dataset, cfg, 0, 1, train=True, seed=0, device=torch.device("cpu")).pin_memory
    assert not build_loader(dataset, cfg, 0, 1, train=True, seed=0, device="cuda", pin_memory=False).pin_memory


def test_resumed_run_with_a_random_pipeline_has_the_losses_of_an_uninterrupted_one(make_experiment):
    """Exact resume with random crops and zoom-outs, and with loader workers in the resumed half."""
    from cluster.env import DistEnv
    from detection.engine import Preempted
    from detection.hooks import Hook
    from detection.train import main
    from orchestrator.config import load_experiment

    class Losses(Hook):
        def __init__(self):
            self.losses = {}

        def after_iter(self, trainer, log):
            self.losses[trainer.iter] = log["loss"]

    class StopAfter(Hook):
        def should_stop(self, trainer):
            return trainer.iter + 1 >= 5

    path = make_experiment(**{
        "tracking.enable": False, "data.val": None, "schedule.iterations": 9, "data.train_pipeline": "ssd",
        "model.type": "fasterrcnn_mobilenet_v3_large_320_fpn",
        "model.options": {"rpn_batch_size_per_image": 32, "box_batch_size_per_image": 32,
                          "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50},
        "checkpoint.interval": 100, "checkpoint.save_best": None, "optim.type": "sgd", "optim.lr": 0.01,
        "schedule.warmup_iters": 2,
    })
    whole = Losses()
    main(load_experiment(path, [f"runtime.output_dir={path.parent / 'whole'}"]), DistEnv.single(), hooks=[whole])
    split = [f"runtime.output_dir={path.parent / 'split'}", "data.workers_per_gpu=2"]
    first, second = Losses(), Losses()
    with pytest.raises(Preempted):
        main(load_experiment(path, split), DistEnv.single(), hooks=[first, StopAfter()])
    main(load_experiment(path, [*split, "runtime.resume=auto"]), DistEnv.single(), hooks=[second])
    assert sorted(whole.losses) == list(range(1, 10))
    assert {**first.losses, **second.losses} == whole.losses  # exactly equal floats
