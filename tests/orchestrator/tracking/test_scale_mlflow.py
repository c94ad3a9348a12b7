"""MLflow at a study's scale, small enough for the suite: a 12-trial k-fold grid set (6 points x
2 folds, 2 iterations each; 20 trials took 7 minutes of the suite here) on the local backend into an ``mlflow server`` backed by a private
PostgreSQL. The 200-trial measurement is ``bench/bench_scale_mlflow.py`` (BENCHMARKS.md)."""

from __future__ import annotations

import sys

import pytest

from ship_helpers import REPO

sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_12_trial_set_into_a_postgresql_backed_server(tmp_path):
    """One experiment, every fold under its point and every point under the grid parent, nothing
    RUNNING, one shipper process for the whole set (never one per trial), none left after."""
    from bench_scale_mlflow import run_scale

    result = run_scale(tmp_path, points=6, folds=2, iterations=2, store="postgres")
    print(result)
    assert result["problems"] == [] and result["experiments"] == 1 and result["runs"] == 12 + 6 + 1
    assert result["statuses"] == {"FINISHED": 19}
    assert result["shippers_at_once"] == 1 and result["shippers_left"] == []
    assert not result["wrong_store_written"]  # $MLFLOW_TRACKING_URI names another store: not used
