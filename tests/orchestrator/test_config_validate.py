"""Validation into the frozen schema: types, messages naming file/key/expectation, cross-field rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cluster.errors import ConfigError
from orchestrator.config import build_experiment, load_experiment, with_overrides
from orchestrator.config.schema import Experiment
from orchestrator.config.validate import all_key_paths, describe, is_schema_path


def check_error(mapping: dict, *parts: str) -> str:
    with pytest.raises(ConfigError) as err:
        build_experiment(mapping, source="exp.yaml")
    message = str(err.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message
    return message


def test_empty_mapping_gives_the_schema_defaults():
    assert build_experiment({}) == Experiment()


def test_conversion_to_frozen_typed_objects():
    exp = build_experiment({
        "optim": {"lr": 1, "auto_scale_lr": {"rule": "sqrt"}},
        "schedule": {"milestones": [2, 4]},
        "data": {"val": {"ann_file": "v.json", "img_dir": "v", "classes": ["a", "b"]}},
        "resources": {"torchrun": {"hosts": ["n1", "n2"]}, "slurm": {"additional": {"gres": "gpu:8"}}},
        "kfold": {"folds": 3},
        "sweep": {"space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}},
        "model": {"options": {"anything": [1, {"goes": None}]}},
    })
    assert exp.optim.lr == 1.0 and isinstance(exp.optim.lr, float)  # int accepted for float
    assert exp.optim.auto_scale_lr.rule == "sqrt"
    assert exp.schedule.milestones == (2, 4)
    assert exp.data.val.classes == ("a", "b") and exp.data.test is None
    assert exp.resources.torchrun.hosts == ("n1", "n2")
    assert exp.kfold.folds == 3 and exp.kfold.seed == 0
    assert exp.sweep.space["optim.lr"] == {"loguniform": [1.0e-4, 1.0e-2]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        exp.optim.lr = 3.0  # type: ignore[misc]


def test_unknown_key_names_file_path_valid_keys_and_suggestion():
    message = check_error(
        {"optim": {"auto_scale_lr": {"rulee": "sqrt"}}},
        "exp.yaml", "'optim.auto_scale_lr.rulee'", "did you mean 'optim.auto_scale_lr.rule'?",
        "enable, base_batch_size, rule",
    )
    assert message.startswith("exp.yaml: unknown key")


def test_unknown_key_in_the_wrong_section_points_to_the_right_one():
    check_error({"optim": {"epochs": 3}}, "'optim.epochs'", "did you mean 'schedule.epochs'?")


def test_unknown_top_level_section():
    check_error({"schedul": {}}, "unknown key 'schedul'", "did you mean 'schedule'?", "valid keys: name, model")


def test_unknown_key_names_the_file_that_set_it(tmp_path: Path):
    (tmp_path / "_base_").mkdir()
    (tmp_path / "_base_" / "bad.yaml").write_text("data:\n  trian: {ann_file: x.json}\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("_base_: _base_/bad.yaml\noptim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"_base_/bad.yaml: unknown key 'data.trian' \(did you mean 'data.train'\?\)"):
        load_experiment(exp)


@pytest.mark.parametrize(
    "mapping, parts",
    [
        ({"optim": {"lr": "fast"}}, ["optim.lr", "expected a number, got string 'fast'"]),
        ({"optim": {"lr": True}}, ["optim.lr", "expected a number, got boolean True"]),
        ({"data": {"batch_size_per_gpu": 2.5}}, ["data.batch_size_per_gpu", "expected an integer, got number 2.5"]),
        ({"data": {"batch_size_per_gpu": True}}, ["expected an integer, got boolean True"]),
        ({"runtime": {"deterministic": "yes"}}, ["runtime.deterministic", "expected true or false, got string 'yes'"]),
        ({"schedule": {"milestones": 8}}, ["schedule.milestones", "expected a list of integers, got integer 8"]),
        ({"schedule": {"milestones": [8, "x"]}}, ["schedule.milestones[1]", "expected an integer"]),
        ({"optim": 0.1}, ["optim", "expected a mapping (section OptimConfig), got number 0.1"]),
        ({"data": {"val": "val.json"}}, ["data.val", "a mapping (section DataSplit) or null"]),
        ({"runtime": {"resume": 3}}, ["runtime.resume", "expected a string or null, got integer 3"]),
        ({"tracking": {"tags": {"fold": 0}}}, ["tracking.tags.fold", "expected a string, got integer 0"]),
        ({"tracking": {"tags": ["a"]}}, ["tracking.tags", "expected a mapping of names to strings"]),
        ({"name": None}, ["name", "expected a string, got null"]),
    ],
)
def test_wrong_types_say_what_was_expected_and_given(mapping, parts):
    check_error(mapping, "exp.yaml", *parts)


def test_literal_lists_the_allowed_values():
    check_error(
        {"optim": {"auto_scale_lr": {"rule": "cubic"}}},
        "optim.auto_scale_lr.rule", "must be one of 'linear', 'sqrt'", "got string 'cubic'",
    )
    check_error({"optim": {"type": "adam"}}, "one of 'sgd', 'adamw'", "did you mean 'adamw'?")
    check_error({"resources": {"backend": 1}}, "resources.backend", "one of 'auto', 'local'")


def test_grid_accepts_dotted_or_nested_keys_and_checks_them():
    nested = build_experiment({"grid": {"optim": {"lr": [0.1, 0.01]}, "model.type": ["a", "b"]}})
    assert nested.grid == {"optim.lr": [0.1, 0.01], "model.type": ["a", "b"]}
    check_error({"grid": {"optim.lrr": [1]}}, "grid.optim.lrr", "not a config key")
    check_error({"grid": {"optim.lr": []}}, "grid.optim.lr", "at least one value")
    check_error({"grid": {"optim.lr": 0.1}}, "grid.optim.lr", "expected a list")
    check_error({"sweep": {"space": {"optim.nope": {"choice": [1]}}}}, "sweep.space.optim.nope", "not a config key")
    assert build_experiment({"grid": {"model.options.rpn_batch_size_per_image": [64]}}).grid


@pytest.mark.parametrize(
    "mapping, parts",
    [
        ({"schedule": {"epochs": None}}, ["schedule", "needs epochs or iterations"]),
        ({"schedule": {"epochs": 0}}, ["schedule.epochs", "must be >= 1, got 0"]),
        ({"schedule": {"milestones": [11, 8]}}, ["schedule.milestones", "strictly increasing", "[11, 8]"]),
        ({"schedule": {"milestones": [8, 8]}}, ["strictly increasing"]),
        ({"schedule": {"warmup_ratio": 0}}, ["schedule.warmup_ratio", "must be > 0"]),
        ({"data": {"batch_size_per_gpu": 0}}, ["data.batch_size_per_gpu", "must be >= 1, got 0"]),
        ({"data": {"min_size": 800, "max_size": 600}}, ["data.max_size", ">= data.min_size"]),
        ({"data": {"workers_per_gpu": -1}}, ["data.workers_per_gpu", ">= 0"]),
        ({"optim": {"lr": 0}}, ["optim.lr", "must be > 0"]),
        ({"optim": {"accumulation_steps": 0}}, ["optim.accumulation_steps", ">= 1"]),
        ({"optim": {"auto_scale_lr": {"base_batch_size": 0}}}, ["optim.auto_scale_lr.base_batch_size"]),
        ({"resources": {"gpus": 0}}, ["resources.gpus", ">= 1"]),
        ({"resources": {"gpus": 12, "gpus_per_node": 8}}, ["resources.gpus", "does not fill whole nodes of --gpus-per-node 8"]),
        ({"resources": {"gpus": 16, "gpus_per_node": 8, "nodes": 3}}, ["resources.nodes", "--nodes 3 x --gpus-per-node 8 != --gpus 16"]),
        ({"resources": {"gpus": 5, "nodes": 2}}, ["resources.nodes"]),
        ({"resources": {"time": "two hours"}}, ["resources.time", "not a Slurm time"]),
        ({"eval": {"metric": ["bbox", "keypoints"]}}, ["eval.metric", "bbox, segm"]),
        ({"kfold": {"folds": 1}}, ["kfold.folds", ">= 2"]),
        ({"name": " "}, ["name", "must not be empty"]),
        ({"runtime": {"output_dir": "runs/{experiment}"}}, ["runtime.output_dir", "{name}"]),
    ],
)
def test_cross_field_rules(mapping, parts):
    check_error(mapping, "exp.yaml", *parts)


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", ".hidden", "..", "-rf", "a b", "x{a,b}", "ex\u00e9"])
def test_a_name_that_is_not_one_plain_folder_is_refused(name):
    # runtime.output_dir is work_dirs/{name}: "../x" would write outside work_dirs.
    message = check_error({"name": name}, "exp.yaml: name: must be a plain folder name",
                          "letters, digits, '_', '.', '-'; not starting with '.' or '-'", repr(name),
                          "set name: to one (it defaults to the file's name) and runtime.output_dir to write elsewhere")
    assert message.startswith("exp.yaml: name:")


def test_plain_names_and_an_explicit_output_dir_stay_allowed(tmp_path):
    for name in ("shapes_demo", "exp-1.v2", "_x", "2026"):
        assert build_experiment({"name": name}).name == name
    exp = build_experiment({"name": "mine", "runtime": {"output_dir": str(tmp_path / ".." / "elsewhere")}})
    assert exp.runtime.output_dir == str(tmp_path / ".." / "elsewhere")


@pytest.mark.parametrize(
    "mapping, parts",
    [
        ({"model": {"type": "fasterrcnn_resnet50"}},
         ["model.type", "'fasterrcnn_resnet50' is not a known detector", "did you mean 'fasterrcnn_resnet50_fpn'?",
          "valid: fasterrcnn_resnet50_fpn,", "ssdlite320_mobilenet_v3_large"]),
        ({"model": {"type": "retinanet_resnet50_fpn", "backbone": "resnet18"}},
         ["model.backbone", "only used by model.type fasterrcnn", "remove it"]),
        ({"model": {"type": "fasterrcnn", "backbone": "resnet19"}},
         ["model.backbone", "did you mean 'resnet18'?", "valid: resnet18, resnet34, resnet50"]),
        ({"model": {"weights": "https://download.pytorch.org/models/x.pth"}},
         ["model.weights", "is a URL; orch does not download URLs", "orch weights list"]),
        ({"model": {"weights": "IMAGENET1K_V1"}},
         ["model.weights", "'IMAGENET1K_V1' is not a weights name of model.type ssdlite320_mobilenet_v3_large",
          "valid: DEFAULT (= COCO_V1), COCO_V1, or SSDLite320_MobileNet_V3_Large_Weights.<name>"]),
        ({"model": {"type": "fasterrcnn_mobilenet_v3_large_fpn", "backbone_weights": "ResNet50_Weights.IMAGENET1K_V1"}},
         ["model.backbone_weights", "(MobileNet_V3_Large_Weights)", "valid: DEFAULT (= IMAGENET1K_V2)"]),
        ({"model": {"backbone_weights": "IMAGENET1K_V1"}},
         ["model.backbone_weights", "no backbone weights that fit model.type ssdlite320_mobilenet_v3_large"]),
        ({"model": {"type": "fasterrcnn", "backbone": "resnet50", "weights": "COCO_V1"}},
         ["model.weights", "torchvision has no detector weights for model.type fasterrcnn"]),
        ({"runtime": {"load_from": "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"}},
         ["runtime.load_from", "is a torchvision weights name; names go in model.weights"]),
    ],
)
def test_model_rules_are_checked_before_any_job_starts(mapping, parts):
    check_error(mapping, "exp.yaml", *parts)


@pytest.mark.parametrize("model", [
    {"weights": "DEFAULT"},
    {"type": "fasterrcnn_mobilenet_v3_large_fpn", "weights": "COCO_V1", "backbone_weights": "IMAGENET1K_V1"},
    {"type": "fasterrcnn_resnet50_fpn_v2", "weights": "FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1"},
    {"type": "fasterrcnn", "backbone": "resnet34", "backbone_weights": "ResNet34_Weights.DEFAULT"},
    {"type": "fasterrcnn", "backbone_weights": "IMAGENET1K_V2"},  # a grid may still set the backbone
])
def test_torchvision_weights_names_of_the_model_are_accepted(model):
    exp = build_experiment({"model": model})
    assert exp.model.weights == model.get("weights")


def test_weight_files_are_not_required_to_exist_at_config_time():
    # Configs are resolved on login nodes; the files may exist only on the compute nodes.
    exp = build_experiment({"model": {"type": "fasterrcnn", "backbone": "resnet50",
                                      "weights": "/nowhere/detector.pth", "backbone_weights": "/nowhere/r50.pth"}})
    assert exp.model.weights == "/nowhere/detector.pth"


def test_valid_resource_shapes():
    for resources in ({"gpus": 16, "gpus_per_node": 8}, {"gpus": 16, "nodes": 2},
                      {"gpus": 16, "gpus_per_node": 8, "nodes": 2}, {"gpus": 3}, {"time": "1-12:00:00"},
                      {"time": "90"}):
        assert build_experiment({"resources": resources}).resources.gpus >= 1


def test_with_overrides_revalidates_and_clears_the_other_schedule_unit():
    exp = build_experiment({"name": "x"})
    changed = with_overrides(exp, {"optim.lr": 0.01, "schedule.iterations": 300, "tracking.tags.fold": "2"})
    assert changed.optim.lr == 0.01 and exp.optim.lr == 0.02
    assert (changed.schedule.epochs, changed.schedule.iterations) == (None, 300)
    assert changed.tracking.tags == {"fold": "2"}
    with pytest.raises(ConfigError, match=r"with_overrides.*optim.lr: expected a number"):
        with_overrides(exp, {"optim.lr": "x"})
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        with_overrides(exp, {"optim.lrr": 0.1})


def test_schema_helpers():
    paths = all_key_paths()
    assert "optim.auto_scale_lr.rule" in paths and "resources.slurm.partition" not in paths
    assert is_schema_path("model.options.anything") and not is_schema_path("optim.lr.x")
    assert describe(tuple[int, ...]) == "a list of integers"


def test_numpy_scalars_from_search_libraries_become_python_numbers():
    np = pytest.importorskip("numpy")
    exp = with_overrides(build_experiment({}), {"optim.lr": np.float32(0.5), "data.batch_size_per_gpu": np.int64(3)})
    assert type(exp.optim.lr) is float and type(exp.data.batch_size_per_gpu) is int
    check_error({"data": {"batch_size_per_gpu": np.float64(2.0)}}, "expected an integer")


def test_a_long_spelling_of_a_short_key_is_suggested():
    check_error({"optim": {"learning_rate": 0.1}}, "unknown key 'optim.learning_rate'", "did you mean 'optim.lr'?")
    check_error({"schedule": {"iters": 10}}, "did you mean 'schedule.iterations'?")
