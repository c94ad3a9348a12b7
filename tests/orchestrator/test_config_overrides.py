"""``--set KEY=VALUE`` overrides and the ``extra`` flags of ``load_experiment``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.errors import ConfigError
from orchestrator.config import apply_overrides, load_experiment, parse_override


@pytest.fixture
def exp_file(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text(
        "optim: {lr: 0.02, momentum: 0.9}\nschedule: {epochs: 12, milestones: [8, 11]}\n"
        "data: {train: {ann_file: a.json, img_dir: a}}\n"
    )
    path = tmp_path / "exp.yaml"
    path.write_text("_base_: base.yaml\nname: ovr\n")
    return path


@pytest.mark.parametrize(
    "item, key, value",
    [
        ("optim.lr=0.01", "optim.lr", 0.01),
        ("optim.lr=1e-3", "optim.lr", 1e-3),
        ("data.batch_size_per_gpu=4", "data.batch_size_per_gpu", 4),
        ("runtime.amp=true", "runtime.amp", True),
        ("runtime.amp=false", "runtime.amp", False),
        ("schedule.milestones=[3, 5]", "schedule.milestones", [3, 5]),
        ("data.train.ann_file=/data/x.json", "data.train.ann_file", "/data/x.json"),
        ("runtime.resume=null", "runtime.resume", None),
        ("runtime.resume=", "runtime.resume", None),
        ("name='123'", "name", "123"),
        ("tracking.tags={fold: '1'}", "tracking.tags", {"fold": "1"}),
        ("name=a=b", "name", "a=b"),  # only the first '=' splits
        (" optim.lr =0.5", "optim.lr", 0.5),
    ],
)
def test_parse_override_values_as_yaml(item, key, value):
    assert parse_override(item) == (key, value)


@pytest.mark.parametrize(
    "item, match",
    [
        ("optim.lr", r"--set optim.lr: expected KEY=VALUE"),
        ("=3", "is not a dotted key"),
        ("optim..lr=3", "is not a dotted key"),
        ("optim.lr=[1,", r"--set optim.lr=\[1,: invalid YAML"),
        ("optim.lr={a: 1", "invalid YAML"),
    ],
)
def test_malformed_overrides_name_the_flag(item, match):
    with pytest.raises(ConfigError, match=match):
        parse_override(item)


def test_overrides_apply_in_order_and_create_nested_keys(exp_file):
    exp = load_experiment(exp_file, [
        "optim.lr=0.1", "optim.lr=0.05", "data.val.ann_file=v.json", "data.val.img_dir=v",
        "runtime.amp=true", "schedule.milestones=[4]", "optim.auto_scale_lr.rule=sqrt",
        "model.options.rpn_batch_size_per_image=32",
    ])
    assert exp.optim.lr == 0.05 and exp.optim.momentum == 0.9
    assert exp.data.val.ann_file == "v.json" and exp.data.val.img_dir == "v"
    assert exp.runtime.amp is True and exp.schedule.milestones == (4,)
    assert exp.optim.auto_scale_lr.rule == "sqrt"
    assert exp.model.options == {"rpn_batch_size_per_image": 32}


def test_mapping_value_replaces_the_section(exp_file):
    exp = load_experiment(exp_file, ["data.train={ann_file: b.json, img_dir: imgs}"])
    # nothing of the file's data.train is left (a train split without img_dir is refused)
    assert (exp.data.train.ann_file, exp.data.train.img_dir, exp.data.train.classes) == ("b.json", "imgs", None)


def test_overriding_through_a_scalar_is_an_error(exp_file):
    with pytest.raises(ConfigError, match=r"--set optim.lr.x=1: cannot set 'optim.lr.x': 'optim.lr' is float"):
        load_experiment(exp_file, ["optim.lr.x=1"])


def test_override_errors_name_the_flag(exp_file):
    with pytest.raises(ConfigError, match=r"^--set optim.lrr=0.1: unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_experiment(exp_file, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"^--set runtime.amp=maybe: runtime.amp: expected true or false"):
        load_experiment(exp_file, ["runtime.amp=maybe"])


def test_schedule_unit_switch_from_the_command_line(exp_file):
    schedule = load_experiment(exp_file, ["schedule.iterations=500", "schedule.milestones=[400]"]).schedule
    assert (schedule.epochs, schedule.iterations, schedule.milestones) == (None, 500, (400,))
    with pytest.raises(ConfigError, match="both epochs"):
        load_experiment(exp_file, ["schedule.iterations=500", "schedule.epochs=3"])
    schedule = load_experiment(exp_file, ["schedule.epochs=null", "schedule.iterations=7"]).schedule
    assert (schedule.epochs, schedule.iterations) == (None, 7)


def test_extra_flags_apply_after_overrides_and_skip_none(exp_file):
    exp = load_experiment(
        exp_file, ["resources.gpus=2"], extra={"resources.gpus": 4, "resources.partition": None}
    )
    assert exp.resources.gpus == 4 and exp.resources.partition is None
    with pytest.raises(ConfigError, match="^command-line option: resources.gpus: must be >= 1"):
        load_experiment(exp_file, extra={"resources.gpus": 0})


def test_name_defaults_to_the_stem_unless_set(tmp_path, exp_file):
    assert load_experiment(exp_file).name == "ovr"
    assert load_experiment(exp_file, ["name=other"]).name == "other"
    plain = tmp_path / "plain_name.yaml"
    plain.write_text("optim: {lr: 0.1}\n")
    assert load_experiment(plain).name == "plain_name"


def test_apply_overrides_does_not_modify_its_input():
    original = {"optim": {"lr": 0.1}}
    changed = apply_overrides(original, ["optim.lr=0.2", "optim.momentum=0.5"])
    assert original == {"optim": {"lr": 0.1}}
    assert changed == {"optim": {"lr": 0.2, "momentum": 0.5}}
