"""Grid x folds expansion: names, seeds, overrides, product size."""

from __future__ import annotations

import pytest

from cluster.errors import ConfigError
from orchestrator.config import build_experiment, with_overrides
from orchestrator.kfold.expand import expand, format_value, short_keys

FOLDS = [("/f/train_0.json", "/f/val_0.json"), ("/f/train_1.json", "/f/val_1.json"),
         ("/f/train_2.json", "/f/val_2.json")]


def experiment(grid=None, **changes):
    exp = build_experiment({
        "name": "exp",
        "data": {"train": {"ann_file": "/d/ann.json", "img_dir": "/d/img"}},
        "model": {"type": "fasterrcnn", "backbone": "resnet50"},  # a type that takes a backbone
        "runtime": {"seed": 7, "output_dir": "/out/{name}"},
        "tracking": {"tags": {"team": "vision"}},
        "grid": grid or {},
    })
    return with_overrides(exp, changes) if changes else exp


def test_product_size_names_and_order():
    exp = experiment({"optim.lr": [0.01, 0.001], "model.backbone": ["resnet18", "resnet34"],
                      "optim.type": ["sgd"]})
    trials = expand(exp, FOLDS)
    assert len(trials) == 2 * 2 * 1 * 3
    assert trials[0].name == "lr=0.01,backbone=resnet18,type=sgd/fold-0"
    assert trials[5].name == "lr=0.01,backbone=resnet34,type=sgd/fold-2"
    assert trials[-1].name == "lr=0.001,backbone=resnet34,type=sgd/fold-2"
    assert len({t.name for t in trials}) == len(trials)
    assert [t.name for t in expand(exp, FOLDS)] == [t.name for t in trials]  # deterministic


def test_short_key_rule_keeps_ambiguous_keys_long():
    assert short_keys(["optim.lr", "model.options.lr", "model.backbone"]) == {
        "optim.lr": "optim.lr", "model.options.lr": "model.options.lr", "model.backbone": "backbone"}
    assert format_value(1e-05) == "1e-05" and format_value(True) == "true"
    assert format_value(None) == "null" and format_value([8, 11]) == "[8,11]"


def test_trial_experiment_has_fold_files_seed_dirs_and_tags():
    exp = experiment({"optim.lr": [0.01, 0.02]})
    trials = expand(exp, FOLDS)
    t = trials[4]  # lr=0.02, fold 1
    assert (t.point_name, t.fold, t.point) == ("lr=0.02", 1, {"optim.lr": 0.02})
    e = t.experiment
    assert e.optim.lr == 0.02
    assert e.data.train.ann_file == "/f/train_1.json" and e.data.train.img_dir == "/d/img"
    assert e.data.val.ann_file == "/f/val_1.json" and e.data.val.img_dir == "/d/img"
    assert e.eval.split == "val"
    assert e.runtime.output_dir == "/out/exp/lr=0.02/fold-1"
    assert e.tracking.run_name == "lr=0.02/fold-1"
    assert e.tracking.tags == {"team": "vision", "optim.lr": "0.02", "fold": "1"}
    assert e.grid == {} and e.kfold is None
    assert t.overrides["data.train.ann_file"] == "/f/train_1.json"


def test_seeds_differ_per_fold_and_pair_across_grid_points():
    trials = expand(experiment({"optim.lr": [0.01, 0.02]}), FOLDS)
    seeds = {(t.point_name, t.fold): t.experiment.runtime.seed for t in trials}
    assert [seeds[("lr=0.01", f)] for f in range(3)] == [7, 8, 9]
    assert all(seeds[("lr=0.01", f)] == seeds[("lr=0.02", f)] for f in range(3))
    seeded = expand(experiment({"runtime.seed": [100, 200]}), FOLDS[:2])
    assert [t.seed for t in seeded] == [100, 101, 200, 201]


def test_no_grid_and_no_folds():
    exp = experiment()
    folds_only = expand(exp, FOLDS)
    assert [t.name for t in folds_only] == ["fold-0", "fold-1", "fold-2"]
    assert folds_only[2].experiment.runtime.output_dir == "/out/exp/fold-2"
    grid_only = expand(experiment({"optim.lr": [0.1, 0.2]}))
    assert [t.name for t in grid_only] == ["lr=0.1", "lr=0.2"] and grid_only[0].fold is None
    assert [t.name for t in expand(exp)] == ["exp"]


def test_unsafe_values_give_safe_folders():
    trials = expand(experiment({"model.weights": ["/w/a b.pt"]}), FOLDS[:2])
    assert trials[0].name == "weights=/w/a b.pt/fold-0"
    assert trials[0].experiment.runtime.output_dir == "/out/exp/weights=_w_a_b.pt/fold-0"


def test_bad_grids_raise_config_errors():
    with pytest.raises(ConfigError, match="appears twice"):
        expand(experiment({"optim.lr": [0.1, 0.1]}))
    with pytest.raises(ConfigError, match="grid.optim.nope"):
        expand(experiment({"optim.nope": [1]}))


def test_trials_are_derived_equal_to_full_validation():
    """Each trial is built from the checked base plus its overrides (no re-validation per trial)
    and equals what validating the whole experiment with those overrides gives."""
    exp = experiment({"optim.lr": [0.01, 0.001], "schedule.iterations": [10, 20]})
    for trial in expand(exp, FOLDS):
        full = with_overrides(exp, {**trial.overrides, "grid": {}, "kfold": None})
        assert trial.experiment == full


def test_a_bad_grid_value_fails_naming_its_key():
    with pytest.raises(ConfigError, match="grid.optim.lr value oops"):
        expand(experiment({"optim.lr": [0.01, "oops"], "runtime.seed": [1, 2]}), FOLDS)
