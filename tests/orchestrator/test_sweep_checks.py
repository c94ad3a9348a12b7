"""orch sweep refuses, before anything runs, values that every affected trial would fail on."""

import pytest

from cluster.errors import ConfigError
from orchestrator.config import build_experiment
from orchestrator.sweep import plan_sweep


def sweep_experiment(**sweep):
    return build_experiment({
        "name": "s",
        "data": {"train": {"ann_file": "a.json", "img_dir": "i"}},
        "schedule": {"epochs": None, "iterations": 20},
        "eval": {"interval": 5},
        "sweep": {"space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}, **sweep},
    })


def test_a_valid_sweep_plans():
    assert plan_sweep(sweep_experiment()).name == "s"


@pytest.mark.parametrize("sweep, message", [
    ({"space": {"optim.type": {"choice": ["adam", "sgd"]}}}, "choice value 'adam'"),
    ({"space": {"data.batch_size_per_gpu": {"uniform": [1.5, 3]}}}, "expected an integer"),
    ({"space": {"data.batch_size_per_gpu": {"randint": [0, 4]}}}, "data.batch_size_per_gpu"),
    ({"metric": "accuracy"}, "sweep.metric='accuracy'"),
    ({"cpus_per_trial": 0}, "cpus_per_trial"),
])
def test_values_every_trial_would_fail_on_are_refused(sweep, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        plan_sweep(sweep_experiment(**sweep))
