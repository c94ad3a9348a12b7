"""orch at a lab's volume (issue 18): ``orch status`` over many records, planning of large sets,
Slurm commands per ``orch status``.

Parts (each prints one line per figure; run them one at a time on a busy machine):

- ``status``: N records written by the record store's own writer (``records.create_record`` +
  ``records.transition``), the index then deleted (an ``ORCH_HOME`` of the format before it);
  ``--slurm-jobs K`` of them are the tasks of a real array (``sleep``) queued or running on the
  Slurm cluster of ``SLURM_CONF``. Then ``orch status`` (and ``--all --json``) in fresh
  processes: the first call (which rebuilds the index) and later calls, with the Slurm commands
  of each call counted by wrapper scripts put first on PATH.
- ``trials``: ``orch kfold`` of a 200-point grid x 5 folds ``--backend slurm --dry-run`` (a new
  set, and one whose folds are on disk) and ``orch sweep --num-samples 1000 --dry-run``: wall
  time and peak memory (``/usr/bin/time``) of the command, in a fresh process.
- ``submit``: the same 1000-trial set submitted for real to the Slurm cluster of ``SLURM_CONF``
  (start it with ``scripts/local_slurm.py --max-array-size 300 up`` to see several arrays), its
  jobs held (``resources.slurm.additional.hold``) so that nothing trains: time from the command's
  start to its "submitted jobs" line (where ``orch kfold`` starts waiting for the set), its CPU
  seconds (user + system) until then, the arrays made and the trials in ``set.json``; then the
  jobs are cancelled and the command stopped. Each run creates ~13,000 files and folders and
  deletes them at its end. On an ext4 file system *without a journal* (this machine's root) the
  kernel's inode allocator skips inodes freed in the last 30-35 s one by one
  (``recently_deleted()`` in ``find_inode_bit``): files created soon after many deletions cost
  ever more system CPU, whoever deleted them (a test suite beside it too). ``--pause 40`` waits
  that window out between repeats; ``--tmp-dir /dev/shm`` (tmpfs) measures orch without it.

    .venv/bin/python bench/bench_scale.py status --records 10000 --slurm-jobs 200 --repeats 5
    .venv/bin/python bench/bench_scale.py trials --repeats 3
    .venv/bin/python bench/bench_scale.py submit --repeats 3 [--no-tracking] [--pause 40] [--tmp-dir /dev/shm]
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
    """(wall seconds, CPU seconds (user + system) of the child and its children, stdout) of one
    command in a fresh process. On a loaded machine the CPU time is the steadier figure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, proc.stdout


def peak_of(argv: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """Wall time, CPU seconds and the command's own peak RSS in MB (``/usr/bin/time``), stdout."""
    if shutil.which("/usr/bin/time"):
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", *argv], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        peak, user, system = proc.stderr.strip().splitlines()[-1].split()
        return wall, float(user) + float(system), int(peak) / 1024, proc.stdout
    raise RuntimeError("/usr/bin/time is needed for the peak memory (apt-get install time)")


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
            walls, cpus = sorted(r[0] for r in runs), sorted(r[1] for r in runs)
            print(f"{label}: wall best {walls[0]:.2f} s, median {walls[len(walls) // 2]:.2f} s; CPU best "
                  f"{cpus[0]:.2f} s; peak {max(r[2] for r in runs):.0f} MB; load {load()}", flush=True)
            if args.verbose:
                print(runs[-1][3][:3000])


def bench_submit(args) -> None:
    for repeat in range(args.repeats):
        if repeat and args.pause:
            time.sleep(args.pause)  # past ext4's recently-deleted window (see the module docstring)
        with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp_name:
            tmp = Path(tmp_name)
            env = {**os.environ, "ORCH_HOME": str(tmp / "home")}
            mapping = tiny_experiment(tmp)
            mapping["resources"] = {**mapping.get("resources", {}), "slurm": {"additional": {"hold": True}}}
            if args.no_tracking:  # no journals, parents or shipper: the submission alone
                mapping["tracking"] = {**mapping.get("tracking", {}), "enable": False}
            kfold = {**mapping, "kfold": {"folds": 5, "allow_small_classes": True},
                     "grid": {"optim.lr": [round(0.001 * (i + 1), 6) for i in range(20)],
                              "optim.weight_decay": [round(1e-5 * (i + 1), 8) for i in range(10)]}}
            path = tmp / "kfold.yaml"
            path.write_text(yaml.safe_dump(kfold, sort_keys=False))
            start = time.perf_counter()
            proc = subprocess.Popen([ORCH, "kfold", str(path), "--backend", "slurm"], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            lines = []
            try:
                for line in proc.stdout:
                    lines.append(line)
                    if line.startswith("submitted jobs"):
                        break
                wall = time.perf_counter() - start
                with open(f"/proc/{proc.pid}/stat") as handle:  # utime, stime in clock ticks
                    fields = handle.read().rsplit(")", 1)[1].split()
                user, system = int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")
            finally:
                proc.kill()
                proc.wait()
            if not lines or not lines[-1].startswith("submitted jobs"):
                raise RuntimeError("orch kfold did not submit: " + "".join(lines[-20:]))
            records = [json.loads((d / "record.json").read_text()) for d in (tmp / "home" / "jobs").iterdir()
                       if (d / "record.json").exists()]
            arrays = sorted({r["native_id"].split("_")[0] for r in records if r.get("native_id")})
            subprocess.run(["scancel", *arrays], check=False)
            set_file = next((tmp / "work").glob("kfold-*/set.json"), None)
            trials = len(json.loads(set_file.read_text())["trials"]) if set_file else 0
            print(f"kfold 1000 trials submitted to Slurm (tracking {'off' if args.no_tracking else 'on'}): {wall:.2f} s to 'submitted jobs', CPU {user + system:.2f} s "
                  f"(user {user:.2f} s, system {system:.2f} s); "
                  f"{len(records)} records, {len(arrays)} arrays, {trials} trials in set.json; "
                  f"folder {args.tmp_dir or tempfile.gettempdir()}; load {load()}",
                  flush=True)
            for pid in subprocess.run(["pgrep", "-f", f"shipper --host {tmp}"], capture_output=True,
                                      text=True).stdout.split():
                os.kill(int(pid), 15)  # the set's shipper (its jobs were cancelled before any ran)


WRAPPED = ("sacct", "squeue", "scontrol", "sinfo", "sbatch", "scancel")


def wrappers(folder: Path, count_file: Path) -> str:
    """Scripts named like Slurm's commands that log each call to ``count_file`` and run the real
    one; returns the PATH that puts them first."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in WRAPPED:
        real = shutil.which(name)
        if real is None:
            continue
        script = folder / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {count_file}\nexec {real} "$@"\n')
        script.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def make_records(home: Path, total: int, slurm_ids: list[str]) -> None:
    """``total`` records written by the record store itself (``create_record`` + ``transition``),
    all within the last 24 h: one 1000-trial k-fold set (812 succeeded, 8 running, 180 pending),
    the Slurm array tasks ``slurm_ids`` (queued or running), the rest single jobs (mostly
    succeeded, some failed), each with its MLflow run id. The index is then deleted: the home
    looks like one written before the index existed."""
    os.environ["ORCH_HOME"] = str(home)
    from orchestrator import records
    from orchestrator.spec import JobState

    work = home.parent / "work"
    uri = f"sqlite:///{home.parent}/mlflow.db"
    set_dir = work / "kfold-0123456789"
    made = 0
    for i in range(min(1000, total - len(slurm_ids))):
        point, fold = divmod(i, 5)
        r = records.create_record(name=f"tiny/lr={point},wd=1/fold-{fold}", backend="slurm",
                                  output_dir=str(set_dir / f"lr={point},wd=1" / f"fold-{fold}"),
                                  config_path=str(set_dir / "config.yaml"), native_id=f"9{point:04d}{fold}",
                                  tracking_uri=uri, mlflow_run_id=f"{i:032x}")
        state = JobState.SUCCEEDED if i < 812 else JobState.RUNNING if i < 820 else JobState.PENDING
        if state is not JobState.PENDING:
            records.transition(r.job_id, JobState.RUNNING)
        if state.finished:
            records.transition(r.job_id, state, exit_code=0)
        made += 1
    for native in slurm_ids:
        records.create_record(name="bench-array", backend="slurm", output_dir=str(work / "array" / native),
                              config_path=str(work / "config.yaml"), native_id=native, tracking_uri=uri)
        made += 1
    for i in range(total - made):
        r = records.create_record(name=f"job-{i % 97}", backend="local", output_dir=str(work / f"job-{i}"),
                                  config_path=str(work / f"job-{i}" / "config.yaml"), tracking_uri=uri,
                                  mlflow_run_id=f"{i:032x}")
        records.transition(r.job_id, JobState.RUNNING)
        records.transition(r.job_id, JobState.FAILED if i % 50 == 0 else JobState.SUCCEEDED, exit_code=i % 50 and 0)
    records.index_path().unlink()


def bench_status(args) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        slurm_ids: list[str] = []
        if args.slurm_jobs:
            proc = subprocess.run(["sbatch", "--parsable", f"--array=0-{args.slurm_jobs - 1}", "-o", "/dev/null",
                                   "--wrap", "sleep 900"], capture_output=True, text=True, check=True)
            array = proc.stdout.strip().split(";")[0]
            slurm_ids = [f"{array}_{i}" for i in range(args.slurm_jobs)]
        try:
            started = time.perf_counter()
            make_records(home, args.records, slurm_ids)
            print(f"{args.records} records written in {time.perf_counter() - started:.1f} s "
                  f"({len(slurm_ids)} of them Slurm array tasks on the cluster)", flush=True)
            count_file = tmp / "slurm-calls.txt"
            env = {**os.environ, "ORCH_HOME": str(home), "PATH": wrappers(tmp / "bin", count_file),
                   "COLUMNS": "200"}
            for label, argv, poll in (("orch status", [ORCH, "status"], None),
                                      ("orch status --all --json", [ORCH, "status", "--all", "--json"], None),
                                      ("orch status, Slurm asked every call (ORCH_SLURM_POLL_S=0)",
                                       [ORCH, "status"], "0")):
                call_env = {**env, **({"ORCH_SLURM_POLL_S": poll} if poll is not None else {})}
                walls, cpus, calls = [], [], []
                for _ in range(args.repeats + 1):
                    count_file.write_text("")
                    wall, cpu, out = timed(argv, call_env)
                    walls.append(wall)
                    cpus.append(cpu)
                    calls.append([line.split()[0] for line in count_file.read_text().splitlines()])
                later, later_cpu = sorted(walls[1:]), sorted(cpus[1:])
                print(f"{label}: first {walls[0]:.2f} s (CPU {cpus[0]:.2f} s), later best {later[0]:.2f} s, median "
                      f"{later[len(later) // 2]:.2f} s (CPU best {later_cpu[0]:.2f} s); Slurm commands per call {[len(c) for c in calls]} "
                      f"({', '.join(sorted(set(sum(calls, []))))}); {len(out.splitlines())} lines out; "
                      f"load {load()}", flush=True)
                if args.verbose:
                    print("\n".join(out.splitlines()[:12]))
        finally:
            if slurm_ids:
                subprocess.run(["scancel", slurm_ids[0].split("_")[0]], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["status", "trials", "submit"])
    parser.add_argument("--records", type=int, default=10000)
    parser.add_argument("--slurm-jobs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="")
    parser.add_argument("--no-tracking", action="store_true", help="submit: tracking.enable false")
    parser.add_argument("--tmp-dir", default=None,
                        help="submit: make each run's ORCH_HOME and outputs here (default: the temp folder)")
    parser.add_argument("--pause", type=float, default=0.0, help="submit: seconds to wait between repeats")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    {"trials": bench_trials, "status": bench_status, "submit": bench_submit}[args.part](args)


if __name__ == "__main__":
    main()
