"""bench/bench_scale_mlflow.py --synthetic goes through before anyone spends half an hour on its
1000 trials: a 6-trial set (3 grid points x 2 folds) made by orch's own functions, its journals
written by training's hooks with the trainer stood in for, shipped by the host shipper to a real
``mlflow server`` and read back; with Chromium installed, the runs page is opened too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_scale_mlflow.py"


@pytest.mark.slow  # an mlflow server, the host shipper, Chromium: about 40 s
@pytest.mark.timeout(600)
def test_a_synthetic_6_trial_set_is_shipped_nested_and_finished(tmp_path):
    out = tmp_path / "summary.json"
    browser = ["--browser"] if shutil.which("chromium") else []
    proc = subprocess.run([sys.executable, str(BENCH), "--synthetic", "--points", "3", "--folds", "2", "--store",
                           "sqlite", "--out", str(out), *browser], capture_output=True, text=True, timeout=550)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["synthetic"] and result["problems"] == [], result
    # the grid parent, 3 point parents, 6 folds: one experiment, all ended
    assert result["experiments"] == 1 and result["statuses"] == {"FINISHED": 10}
    assert result["host_shipper_runs"] == 1 and result["shippers_at_once"] == 1 and result["shippers_left"] == []
    assert result["busy_retries"] == 0 and not result["wrong_store_written"]
    if browser:  # one parent row; its points once expanded; the first point's folds once it is expanded
        assert result["browser_problems"] == [] and result["browser"]["folds_shown_s"] >= 0, result
