"""A k-fold dry run never imports scikit-learn (nor iterstrat): not when its folds are on disk, not
when it computes a new split; and 1000 trials' configs are derived, not re-validated."""

from __future__ import annotations

import json
import subprocess
import sys

from orchestrator.cli import main


def _dry_run_without_heavy_imports(exp, tmp_path) -> subprocess.CompletedProcess:
    """``orch kfold EXP --backend slurm --dry-run`` in a fresh interpreter; asserts it succeeded
    and imported neither scikit-learn nor iterstrat."""
    code = ("import sys, json; from orchestrator.cli import main\n"
            f"rc = main(['kfold', {str(exp)!r}, '--backend', 'slurm', '--dry-run'])\n"
            "print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'iterstrat'))]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        "ORCH_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=120)
    rc, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rc == 0 and heavy == [], proc.stderr[-2000:]
    return proc


def test_cached_split_imports_no_scikit_learn(make_experiment, shapes_data, tmp_path):
    folds = tmp_path / "folds"
    ann = shapes_data / "annotations" / "instances_train.json"
    assert main(["split", str(ann), "--folds", "3", "--out", str(folds), "--allow-small-classes"]) == 0
    exp = make_experiment(**{"kfold.folds": 3, "kfold.out_dir": str(folds), "kfold.allow_small_classes": True,
                             "grid": {"optim.lr": [0.01, 0.02]}})
    proc = _dry_run_without_heavy_imports(exp, tmp_path)
    assert "#SBATCH --array=0-5" in proc.stdout  # 2 points x 3 folds, one array


def test_new_split_imports_no_scikit_learn(make_experiment, tmp_path):
    exp = make_experiment(**{"kfold.folds": 3, "kfold.allow_small_classes": True, "grid": {"optim.lr": [0.01, 0.02]}})
    proc = _dry_run_without_heavy_imports(exp, tmp_path)
    assert "#SBATCH --array=0-5" in proc.stdout
