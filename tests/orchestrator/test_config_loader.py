"""Experiment files: ``_base_`` inheritance, ``_delete_``, cycles, YAML dialect, round trips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.errors import ConfigError
from orchestrator.config import (
    build_experiment,
    config_hash,
    dump_experiment,
    experiment_to_dict,
    flatten,
    load_experiment,
    load_raw,
    load_with_sources,
    output_dir_of,
    with_overrides,
)


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_single_base_deep_merges_and_file_wins(tmp_path):
    write(tmp_path, "base.yaml", "optim:\n  lr: 0.02\n  momentum: 0.9\nschedule:\n  milestones: [8, 11]\n")
    exp = write(tmp_path, "exp.yaml", "_base_: base.yaml\noptim:\n  lr: 0.01\nschedule:\n  milestones: [3]\n")
    raw = load_raw(exp)
    assert raw == {"optim": {"lr": 0.01, "momentum": 0.9}, "schedule": {"milestones": [3]}}
    assert "_base_" not in raw


def test_list_of_bases_merges_in_order_then_the_file(tmp_path):
    write(tmp_path, "a.yaml", "optim: {lr: 1.0, momentum: 0.5}\nname: a\n")
    write(tmp_path, "b.yaml", "optim: {lr: 2.0}\ndata: {workers_per_gpu: 3}\n")
    exp = write(tmp_path, "exp.yaml", "_base_: [a.yaml, b.yaml]\ndata: {min_size: 10}\n")
    raw = load_raw(exp)
    assert raw["optim"] == {"lr": 2.0, "momentum": 0.5}
    assert raw["data"] == {"workers_per_gpu": 3, "min_size": 10}
    assert raw["name"] == "a"


def test_nested_bases_resolve_relative_to_the_file_naming_them(tmp_path):
    write(tmp_path, "lib/_base_/models/m.yaml", "model: {type: fcos_resnet50_fpn}\n")
    write(tmp_path, "lib/_base_/schedules/s.yaml", "_base_: ../models/m.yaml\nschedule: {epochs: 3, milestones: [2]}\n")
    exp = write(tmp_path, "lib/deep/er/exp.yaml", "_base_: ../../_base_/schedules/s.yaml\n")
    loaded = load_experiment(exp)
    assert loaded.model.type == "fcos_resnet50_fpn"
    assert loaded.schedule.epochs == 3
    assert loaded.name == "exp"  # the file stem when nobody sets a name


def test_diamond_inheritance_is_not_a_cycle(tmp_path):
    write(tmp_path, "root.yaml", "optim: {lr: 0.5}\n")
    write(tmp_path, "left.yaml", "_base_: root.yaml\noptim: {momentum: 0.1}\n")
    write(tmp_path, "right.yaml", "_base_: root.yaml\noptim: {weight_decay: 0.2}\n")
    exp = write(tmp_path, "exp.yaml", "_base_: [left.yaml, right.yaml]\n")
    assert load_raw(exp)["optim"] == {"lr": 0.5, "momentum": 0.1, "weight_decay": 0.2}


def test_lists_are_replaced_not_merged(tmp_path):
    write(tmp_path, "base.yaml", "eval: {metric: [bbox, segm]}\n")
    exp = write(tmp_path, "exp.yaml", "_base_: base.yaml\neval: {metric: [bbox]}\n")
    assert load_experiment(exp).eval.metric == ("bbox",)


def test_delete_replaces_the_inherited_mapping(tmp_path):
    write(tmp_path, "base.yaml", "model:\n  type: fasterrcnn\n  options: {rpn_batch_size_per_image: 64, box_batch_size_per_image: 32}\n")
    exp = write(
        tmp_path, "exp.yaml",
        "_base_: base.yaml\nmodel:\n  options:\n    _delete_: true\n    box_detections_per_img: 10\n",
    )
    raw = load_raw(exp)
    assert raw["model"] == {"type": "fasterrcnn", "options": {"box_detections_per_img": 10}}
    without = write(tmp_path, "merge.yaml", "_base_: base.yaml\nmodel:\n  options: {box_detections_per_img: 10}\n")
    assert len(load_raw(without)["model"]["options"]) == 3


def test_delete_of_a_whole_section_falls_back_to_schema_defaults(tmp_path):
    write(tmp_path, "base.yaml", "optim: {type: adamw, lr: 0.001, weight_decay: 0.05}\n")
    exp = write(tmp_path, "exp.yaml", "_base_: base.yaml\noptim: {_delete_: true, lr: 0.1}\n")
    optim = load_experiment(exp).optim
    assert (optim.type, optim.lr, optim.weight_decay) == ("sgd", 0.1, 1e-4)


def test_delete_must_be_a_boolean(tmp_path):
    write(tmp_path, "base.yaml", "optim: {lr: 0.1}\n")
    exp = write(tmp_path, "exp.yaml", "_base_: base.yaml\noptim: {_delete_: yes please}\n")
    with pytest.raises(ConfigError, match="exp.yaml: _delete_ must be true or false"):
        load_raw(exp)


def test_cycle_names_the_chain_of_files(tmp_path):
    write(tmp_path, "a.yaml", "_base_: sub/b.yaml\n")
    write(tmp_path, "sub/b.yaml", "_base_: c.yaml\n")
    write(tmp_path, "sub/c.yaml", "_base_: ../a.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_raw(tmp_path / "a.yaml")
    message = str(err.value)
    assert "cycle" in message
    assert message.index("a.yaml") < message.index("b.yaml") < message.index("c.yaml")
    assert message.count("a.yaml ->") == 1 and message.rstrip().split(";")[0].endswith("a.yaml")
    assert "\n" not in message


def test_self_inheritance_is_a_cycle(tmp_path):
    exp = write(tmp_path, "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_raw(exp)


def test_missing_base_names_the_chain(tmp_path):
    write(tmp_path, "mid.yaml", "_base_: nowhere/missing.yaml\n")
    exp = write(tmp_path, "exp.yaml", "_base_: mid.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_raw(exp)
    message = str(err.value)
    assert "missing.yaml not found" in message
    assert "exp.yaml -> " in message and "mid.yaml -> " in message
    assert "relative to the file" in message


def test_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found: .*nope.yaml"):
        load_experiment(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text, match",
    [
        ("optim: [1, 2\n", r"bad.yaml:\d+: invalid YAML"),
        ("- a\n- b\n", "must be a mapping of sections, got a list"),
        ("optim: {lr: 1}\noptim: {lr: 2}\n", r"bad.yaml:2: invalid YAML: duplicate key 'optim'"),
        ("_base_: 3\n", "_base_ must be a path or a list of paths"),
        ("_base_: [a.yaml, null]\n", "_base_ must be a path or a list of paths"),
    ],
)
def test_malformed_files(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment(write(tmp_path, "bad.yaml", text))


def test_empty_experiment_file_is_refused_but_an_empty_base_is_fine(tmp_path):
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_experiment(write(tmp_path, "empty.yaml", "# only a comment\n"))
    write(tmp_path, "nothing.yaml", "")
    exp = load_experiment(write(tmp_path, "child.yaml", "_base_: nothing.yaml\nname: child\n"))
    assert exp == build_experiment({"name": "child"})


def test_yaml_dialect_is_1_2_core(tmp_path):
    exp = load_experiment(write(
        tmp_path, "dialect.yaml",
        "optim: {weight_decay: 1e-4, lr: 5E-3}\nresources: {time: 4:00:00}\n"
        "data: {train: {classes: [NO, yes, on]}}\nruntime: {seed: 010}\n",
    ))
    assert exp.optim.weight_decay == 1e-4 and exp.optim.lr == 5e-3  # YAML 1.1: strings
    assert exp.resources.time == "4:00:00"  # YAML 1.1: 14400
    assert exp.data.train.classes == ("NO", "yes", "on")  # YAML 1.1: booleans
    assert exp.runtime.seed == 10  # YAML 1.1: octal 8


def test_epochs_and_iterations_exclude_each_other_across_layers(tmp_path):
    write(tmp_path, "base.yaml", "schedule: {epochs: 12, milestones: [8, 11]}\n")
    child = write(tmp_path, "iters.yaml", "_base_: base.yaml\nschedule: {iterations: 400, milestones: [300]}\n")
    schedule = load_experiment(child).schedule
    assert (schedule.epochs, schedule.iterations) == (None, 400)
    # And back: a grandchild that sets epochs clears the inherited iterations.
    back = write(tmp_path, "back.yaml", "_base_: iters.yaml\nschedule: {epochs: 2, milestones: [1]}\n")
    schedule = load_experiment(back).schedule
    assert (schedule.epochs, schedule.iterations) == (2, None)
    # Only iterations anywhere: the schema's default of 12 epochs does not apply.
    alone = write(tmp_path, "alone.yaml", "schedule: {iterations: 50, milestones: []}\n")
    assert load_experiment(alone).schedule.epochs is None


def test_one_layer_setting_both_is_an_error_naming_the_files(tmp_path):
    exp = write(tmp_path, "both.yaml", "schedule: {epochs: 3, iterations: 100}\n")
    with pytest.raises(ConfigError, match=r"both epochs \(3, from .*both.yaml\) and iterations .*null"):
        load_experiment(exp)


def test_sources_record_the_file_of_each_key(tmp_path):
    write(tmp_path, "_base_/b.yaml", "optim: {lr: 0.1, momentum: 0.5}\n")
    exp = write(tmp_path, "exp.yaml", "_base_: _base_/b.yaml\noptim: {lr: 0.2}\n")
    _, sources = load_with_sources(exp)
    assert sources["optim.lr"].endswith("exp.yaml")
    assert sources["optim.momentum"].endswith(os.path.join("_base_", "b.yaml"))


def test_dump_reloads_to_an_equal_experiment(tmp_path):
    write(tmp_path, "base.yaml", "optim: {lr: 1e-4, type: adamw}\nschedule: {iterations: 100, milestones: [50]}\n")
    exp_path = write(
        tmp_path, "exp.yaml",
        "_base_: base.yaml\nresources: {time: '12:00:00', slurm: {setup: [module load cuda], additional: {gres: 'gpu:8'}}}\n"
        "tracking: {tags: {note: '1e-4', flag: 'true'}}\ngrid: {optim.lr: [0.1, 0.01]}\n"
        "data: {train: {classes: ['010', 'yes']}}\nmodel: {options: {a: [1, {b: 2}]}}\n",
    )
    exp = load_experiment(exp_path)
    resolved = write(tmp_path, "resolved.yaml", dump_experiment(exp))
    assert "_base_" not in resolved.read_text()
    again = load_experiment(resolved)
    assert again == exp
    assert config_hash(again) == config_hash(exp)


def test_config_hash_is_stable_and_ignores_the_parent_run():
    exp = build_experiment({"name": "h"})
    assert config_hash(exp) == config_hash(build_experiment({"name": "h"}))
    assert len(config_hash(exp)) == 12 and int(config_hash(exp), 16) >= 0
    assert config_hash(with_overrides(exp, {"tracking.parent_journal": "/x/journal"})) == config_hash(exp)
    assert config_hash(with_overrides(exp, {"optim.lr": 0.03})) != config_hash(exp)


def test_flatten_and_output_dir():
    exp = build_experiment({"name": "demo", "runtime": {"output_dir": "/runs/{name}/x"}})
    flat = flatten(experiment_to_dict(exp))
    assert flat["optim.auto_scale_lr.rule"] == "linear"
    assert flat["schedule.milestones"] == [8, 11]
    assert flat["grid"] == {}
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}
    assert output_dir_of(exp) == "/runs/demo/x"
    assert exp.runtime.output_dir == "/runs/{name}/x"



def test_dump_experiment_by_sections_is_the_whole_dump_and_follows_derived_sections():
    from detection.serialize import dump_yaml
    from orchestrator.config import derive

    paths = [p for p in sorted(Path("experiments").rglob("*.yaml")) if "_base_" not in p.parts]
    assert len(paths) >= 4
    for path in paths:
        exp = load_experiment(path)
        assert dump_experiment(exp) == dump_yaml(exp), path
        trial = derive(exp, {"optim.lr": 0.0123, "runtime.seed": 7, "tracking.tags": {"fold": "2"}})
        assert dump_experiment(trial) == dump_yaml(trial), path
        assert dump_experiment(exp) == dump_yaml(exp), path  # the experiment's own sections unchanged
