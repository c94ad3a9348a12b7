"""The search space and plan of ``orch sweep`` (pure; literal inputs)."""

from __future__ import annotations

import pytest

from cluster.errors import ConfigError
from orchestrator.config import load_experiment
from orchestrator.sweep import evaluations, plan_sweep
from orchestrator.sweep.space import Dimension, check_searcher, parse_space, trial_count


def test_every_kind_parses_in_file_order():
    dims = parse_space({
        "optim.lr": {"loguniform": [1e-4, 1e-2]},
        "optim.weight_decay": {"uniform": [0.0, 0.001]},
        "data.batch_size_per_gpu": {"randint": [2, 9]},
        "model.backbone": {"choice": ["resnet18", "resnet34"]},
        "optim.type": {"grid": ["sgd", "adamw"]},
    })
    assert [d.key for d in dims] == ["optim.lr", "optim.weight_decay", "data.batch_size_per_gpu",
                                     "model.backbone", "optim.type"]
    assert dims[0] == Dimension("optim.lr", "loguniform", (1e-4, 1e-2))
    assert dims[3].args == ("resnet18", "resnet34")
    assert dims[0].describe() == "optim.lr: loguniform [0.0001, 0.01)"
    # num_samples repeats the grid (Tune's rule); choice is sampled, not enumerated, under random.
    assert trial_count(dims, "random", 3) == 6


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"normal": [0, 1]}, "unknown kind 'normal'; valid kinds: choice, grid, uniform, loguniform, randint"),
        ({"uniform": [1.0, 0.5]}, "sweep.space.optim.lr.uniform: low 1.0 must be below high 0.5"),
        ({"loguniform": [0.0, 0.1]}, "bounds must be > 0"),
        ({"uniform": [0.1]}, "expected two numbers [low, high]"),
        ({"uniform": ["a", "b"]}, "expected two numbers [low, high]"),
        ({"randint": [1.5, 4]}, "bounds must be integers"),
        ({"choice": []}, "needs at least one value"),
        ({"choice": "abc"}, "expected a list"),
        ({"uniform": [0, 1], "choice": [1]}, "expected one kind and its arguments"),
        (0.01, "expected one kind and its arguments"),
    ],
)
def test_bad_dimensions_name_the_key_and_the_fix(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_space({"optim.lr": spec})
    text = str(err.value)
    assert message in text and "sweep.space.optim.lr" in text
    assert "\n" not in text


def test_empty_space_is_an_error():
    with pytest.raises(ConfigError, match="sweep.space is empty"):
        parse_space({})


def test_searchers_check_the_kinds():
    continuous = parse_space({"optim.lr": {"uniform": [0.1, 0.2]}})
    with pytest.raises(ConfigError, match="grid cannot enumerate continuous kinds \\(optim.lr\\)"):
        check_searcher(continuous, "grid")
    grid = parse_space({"optim.type": {"grid": ["sgd", "adamw"]}, "model.backbone": {"choice": ["a", "b", "c"]}})
    check_searcher(grid, "grid")
    assert trial_count(grid, "grid", 1) == 6  # choice is enumerated under the grid searcher
    with pytest.raises(ConfigError, match="optuna samples values; use choice instead of grid"):
        check_searcher(grid, "optuna")
    with pytest.raises(ConfigError, match="unknown searcher 'bayes'"):
        check_searcher(grid, "bayes")


def test_to_tune_builds_tune_domains():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    from orchestrator.sweep.space import to_tune

    dims = parse_space({"optim.lr": {"loguniform": [1e-4, 1e-2]}, "optim.type": {"grid": ["sgd", "adamw"]},
                        "data.batch_size_per_gpu": {"randint": [2, 4]}, "model.backbone": {"choice": ["a", "b"]}})
    space = to_tune(dims, "random")
    assert isinstance(space["optim.lr"], Float) and space["optim.lr"].lower == 1e-4
    assert space["optim.type"] == tune.grid_search(["sgd", "adamw"])
    assert isinstance(space["data.batch_size_per_gpu"], Integer)
    assert isinstance(space["model.backbone"], Categorical)


def _sweep_experiment(make_experiment, **sweep):
    sweep.setdefault("space", {"optim.lr": {"loguniform": [1e-4, 1e-2]}})
    return load_experiment(make_experiment(**{"sweep": sweep, "schedule.iterations": 8, "eval.interval": 2}))


def test_plan_describes_the_search(make_experiment):
    exp = _sweep_experiment(make_experiment, num_samples=4, metric="loss", mode="min", max_concurrent=2,
                            scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    assert evaluations(exp) == 4
    plan = plan_sweep(exp, "tiny.yaml")
    assert plan.trials == 4 and plan.scheduler.max_t == 4 and plan.workers_per_trial == 1
    text = plan.text
    assert type(plan).from_json(plan.to_json()) == plan  # what the driver reads back
    assert "optim.lr: loguniform [0.0001, 0.01)" in text
    assert "asha (grace_period 1, reduction_factor 2, max_t 4 evaluations)" in text
    assert "min loss" in text and "max concurrent:  2" in text
    assert "1 CPU, 0 GPU (training in the trial itself)" in text
    assert "private Ray head on 127.0.0.1" in text


def test_plan_with_ddp_trials(make_experiment):
    exp = _sweep_experiment(make_experiment, gpus_per_trial=2, cpus_per_trial=4)
    plan = plan_sweep(exp)
    assert plan.workers_per_trial == 2 and plan.cpus_per_worker == 2.0
    assert "2 DDP workers (TorchTrainer inside the trial, 1 GPU + 2 CPU each) + 0.1 CPU driver" in plan.text


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"scheduler": {"type": "pbt"}}, "pbt is not supported"),
        ({"scheduler": {"type": "asha", "grace_period": 9}}, "grace_period=9 must be in 1..max_t (4 evaluations"),
        ({"scheduler": {"type": "asha", "reduction_factor": 1}}, "reduction_factor=1.0 must be > 1"),
        ({"gpus_per_trial": 1.5}, "above 1 it is a DDP world size and must be whole"),
        ({"space": {"optim.lr": {"gauss": [1, 2]}}}, "unknown kind 'gauss'"),
    ],
)
def test_plan_refuses_unsound_settings(make_experiment, sweep, message):
    with pytest.raises(ConfigError) as err:
        plan_sweep(_sweep_experiment(make_experiment, **sweep))
    assert message in str(err.value)


def test_no_sweep_section(tiny_experiment):
    with pytest.raises(ConfigError, match="has no `sweep:` section"):
        plan_sweep(load_experiment(tiny_experiment), str(tiny_experiment))
