"""orch at a lab's volume (issue 18): ``orch status`` over many records, planning of large sets,
Slurm commands per ``orch status``.

Parts (each prints one line per figure; run them one at a time on a busy machine):

- ``records``: N ended records in today's on-disk format (written by the record store's own
  writer, ``records.create_record`` + ``records.transition``; 1000 of them one k-fold set), then
  ``orch status`` in fresh processes: the first call (which builds the index) and later calls;
  ``orch status --all --json``.
- ``trials``: ``orch kfold`` of a 200-point grid x 5 folds ``--backend slurm --dry-run`` and
  ``orch sweep --num-samples 1000 --dry-run``: wall time and peak memory (ru_maxrss) of the
  command, in a fresh process.
- ``slurm``: Slurm commands per ``orch status`` with ``--slurm-jobs`` of the records queued or
  running on a live Slurm cluster (``SLURM_CONF``), counted by wrapper scripts put first on PATH.

    .venv/bin/python bench/bench_scale.py records --records 10000 --repeats 3
    .venv/bin/python bench/bench_scale.py trials --repeats 3
    .venv/bin/python bench/bench_scale.py slurm --records 10000 --slurm-jobs 200   # needs a cluster
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ORCH = str(Path(sys.executable).parent / "orch")


def load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak resident MB of the child, stdout) of one command in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) / 1024, proc.stdout


def peak_of(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall time and the child's own peak RSS (via /usr/bin/time when present, else ru_maxrss of
    all children so far, which is an upper bound)."""
    if shutil.which("/usr/bin/time"):
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return wall, int(proc.stderr.strip().splitlines()[-1]) / 1024, proc.stdout
    return timed(argv, env)


def tiny_experiment(tmp: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_experiment_dict
    from detection.shapes import make_shapes

    data = tmp / "shapes"
    if not data.exists():
        make_shapes(data, n_train=40, n_val=8, size=64, seed=0)
    return tiny_experiment_dict(data, tmp / "work", f"sqlite:///{tmp}/mlflow.db")


def bench_trials(args) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "ORCH_HOME": str(tmp / "home")}
        mapping = tiny_experiment(tmp)
        kfold = {**mapping, "kfold": {"folds": 5, "allow_small_classes": True},
                 "grid": {"optim.lr": [round(0.001 * (i + 1), 6) for i in range(20)],
                          "optim.weight_decay": [round(1e-5 * (i + 1), 8) for i in range(10)]}}
        kfold_path = tmp / "kfold.yaml"
        kfold_path.write_text(yaml.safe_dump(kfold, sort_keys=False))
        # The same set with its folds already on disk (kfold.out_dir made by `orch split`): no split
        # computed, scikit-learn never imported.
        folds_dir = tmp / "folds"
        subprocess.run([ORCH, "split", mapping["data"]["train"]["ann_file"], "--folds", "5", "--out", str(folds_dir),
                        "--allow-small-classes"], env=env, check=True, capture_output=True)
        cached_path = tmp / "kfold_cached.yaml"
        cached_path.write_text(yaml.safe_dump({**kfold, "kfold": {**kfold["kfold"], "out_dir": str(folds_dir)}},
                                              sort_keys=False))
        sweep = {**mapping, "sweep": {"space": {"optim.lr": {"loguniform": [1e-4, 1e-1]}},
                                       "metric": "bbox_mAP", "mode": "max", "num_samples": 1000}}
        sweep_path = tmp / "sweep.yaml"
        sweep_path.write_text(yaml.safe_dump(sweep, sort_keys=False))
        commands = {
            "kfold 200 points x 5 folds --backend slurm --dry-run":
                [ORCH, "kfold", str(kfold_path), "--backend", "slurm", "--dry-run"],
            "kfold 200 points x 5 folds --backend slurm --dry-run, folds on disk":
                [ORCH, "kfold", str(cached_path), "--backend", "slurm", "--dry-run"],
            "sweep --num-samples 1000 --dry-run":
                [ORCH, "sweep", str(sweep_path), "--num-samples", "1000", "--dry-run"],
        }
        for label, argv in commands.items():
            if args.only and args.only not in label:
                continue
            runs = [peak_of(argv, env) for _ in range(args.repeats)]
            walls = sorted(r[0] for r in runs)
            print(f"{label}: wall best {walls[0]:.2f} s, median {walls[len(walls) // 2]:.2f} s; "
                  f"peak {max(r[1] for r in runs):.0f} MB; load {load()}", flush=True)
            if args.verbose:
                print(runs[-1][2][:3000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["records", "trials", "slurm"])
    parser.add_argument("--records", type=int, default=10000)
    parser.add_argument("--slurm-jobs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    {"trials": bench_trials}[args.part](args)


if __name__ == "__main__":
    main()
