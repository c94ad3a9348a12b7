"""What ``orch submit`` (local backend) adds before the first training step, versus ``orch train``.

Both commands run the tiny shapes experiment from a fresh process; the clock starts when the
command starts and stops when the first ``iter 1/`` log line appears (``orch train``: its own
output; ``orch submit``: the job's log under ``$ORCH_HOME``). Runs alternate (train, submit, ...)
so that machine load hits both alike; the paired differences and the minima are compared. Target: at most 1 s.

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
    start = time.time()
    proc = subprocess.Popen([ORCH, "train", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if MARK in line:
            elapsed = time.time() - start
            proc.wait()
            return elapsed
    raise RuntimeError(f"orch train ended (status {proc.wait()}) without a training step")


def time_submit(path: Path) -> tuple[float, float, float]:
    """(time to first step, time until `orch submit` returned, time until the worker started)."""
    from orchestrator.records import list_records

    start = time.time()
    out = subprocess.run([ORCH, "submit", str(path), "--backend", "local"], capture_output=True, text=True, check=True)
    returned = time.time() - start
    record = list_records()[0]
    while MARK not in Path(record.log_path).read_text(errors="replace"):
        if time.time() - start > 600:
            raise RuntimeError(f"no training step: {out.stdout} {out.stderr}")
        time.sleep(0.02)
    elapsed = time.time() - start
    while not list_records()[0].state.finished:
        time.sleep(0.2)  # let it finish before the next run, so runs do not overlap
    return elapsed, returned, list_records()[0].started_at - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ.update(ORCH_HOME=str(tmp / "home"), ORCH_RUNTIME_DIR=str(tmp / "rt"), OMP_NUM_THREADS="1")
        os.chdir(tmp)
        trains, submits, parts = [], [], []
        for i in range(args.repeats):
            trains.append(time_train(write_experiment(tmp, f"train{i}")))
            total, returned, worker = time_submit(write_experiment(tmp, f"submit{i}"))
            submits.append(total)
            parts.append((returned, worker))
            print(f"pair {i}: orch train {trains[-1]:.2f} s | orch submit {total:.2f} s (command returned after "
                  f"{returned:.2f} s, worker started after {worker:.2f} s) | difference {total - trains[-1]:+.2f} s",
                  flush=True)
        diffs = [s - t for s, t in zip(submits, trains)]
        print("\n| command | runs | median s | min s | max s |")
        print("|---|---|---|---|---|")
        for name, values in (("orch train: time to first step", trains), ("orch submit (local): time to first step", submits),
                             ("orch submit: command returned", [p[0] for p in parts]),
                             ("orch submit: worker process started", [p[1] for p in parts]),
                             ("paired difference submit - train", diffs)):
            print(f"| {name} | {len(values)} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
        print(f"\nsubmit overhead: median of paired differences {statistics.median(diffs):+.2f} s, "
              f"difference of minima {min(submits) - min(trains):+.2f} s (target <= 1 s)")


if __name__ == "__main__":
    main()
