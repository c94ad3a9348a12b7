"""What ``orch submit`` (local backend) adds before the first training step, versus ``orch train``.

Both commands run the tiny shapes experiment from a fresh process; the clock starts when the
command starts and stops when the first ``iter 1/`` log line appears (``orch train``: its own
output; ``orch submit``: the job's log under ``$ORCH_HOME``). Runs alternate (train, submit, ...)
so that machine load hits both alike; the medians are compared. Target: at most 1 s.

    .venv/bin/python bench/bench_submit_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ORCH = str(Path(sys.executable).parent / "orch")
MARK = "iter 1/"


def write_experiment(tmp: Path, tag: str) -> Path:
    """The tests' tiny experiment (64 px shapes, SSDlite, a few iterations) in ``tmp``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_experiment_dict
    from detection.shapes import make_shapes

    data = tmp / "shapes"
    if not data.exists():
        make_shapes(data, n_train=16, n_val=8, size=64, seed=0)
    mapping = tiny_experiment_dict(data, tmp / f"work-{tag}", f"sqlite:///{tmp}/mlflow-{tag}.db")
    path = tmp / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def time_train(path: Path) -> float:
    start = time.monotonic()
    proc = subprocess.Popen([ORCH, "train", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if MARK in line:
            elapsed = time.monotonic() - start
            proc.wait()
            return elapsed
    raise RuntimeError(f"orch train ended (status {proc.wait()}) without a training step")


def time_submit(path: Path) -> float:
    start = time.monotonic()
    out = subprocess.run([ORCH, "submit", str(path), "--backend", "local"], capture_output=True, text=True, check=True)
    from orchestrator.jobs import list_records

    record = list_records()[0]
    while True:
        if MARK in Path(record.log_path).read_text(errors="replace"):
            elapsed = time.monotonic() - start
            break
        if time.monotonic() - start > 600:
            raise RuntimeError(f"no training step: {out.stdout} {out.stderr}")
        time.sleep(0.02)
    while not list_records()[0].state.value in ("SUCCEEDED", "FAILED", "CANCELLED"):
        time.sleep(0.2)  # let it finish before the next run, so runs do not overlap
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ.update(ORCH_HOME=str(tmp / "home"), ORCH_RUNTIME_DIR=str(tmp / "rt"), OMP_NUM_THREADS="1")
        os.chdir(tmp)
        trains, submits = [], []
        for i in range(args.repeats):
            trains.append(time_train(write_experiment(tmp, f"train{i}")))
            submits.append(time_submit(write_experiment(tmp, f"submit{i}")))
            print(f"run {i}: orch train {trains[-1]:.2f} s, orch submit {submits[-1]:.2f} s", flush=True)
        train, submit = statistics.median(trains), statistics.median(submits)
        print("\n| command | runs | median time to first step s | min s | max s |")
        print("|---|---|---|---|---|")
        print(f"| orch train | {len(trains)} | {train:.2f} | {min(trains):.2f} | {max(trains):.2f} |")
        print(f"| orch submit (local) | {len(submits)} | {submit:.2f} | {min(submits):.2f} | {max(submits):.2f} |")
        print(f"\nsubmit overhead (median difference): {submit - train:+.2f} s (target <= 1 s)")


if __name__ == "__main__":
    main()
