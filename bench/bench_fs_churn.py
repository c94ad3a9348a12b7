"""File-system churn without orch: what a 1000-trial submission does to the disk (per trial a
run folder with a config, a claim and a journal, and a job record folder: ~13,000 files and
folders), created and then deleted, ``--repeats`` times in a row; prints each repeat's wall time
and the process's system CPU. It separates orch's own cost from the file system's: on an ext4
*without a journal* the inode allocator skips inodes freed in the last 30-35 s one by one
(``recently_deleted()``), so creating files soon after many deletions costs more and more system
CPU; on tmpfs or a journaled file system it stays flat (figures in BENCHMARKS.md).

    python bench/bench_fs_churn.py --dir /tmp [--fsync] [--pause 40]
    python bench/bench_fs_churn.py --dir /dev/shm
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

TRIALS = 1000


def churn(base: str, fsync: bool) -> tuple[float, float, float]:
    """Create one submission's files under a new folder of ``base``, then delete them: (create
    wall s, create system CPU s, delete system CPU s)."""
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    tmp = tempfile.mkdtemp(dir=base)
    for i in range(TRIALS):
        run = os.path.join(tmp, "work", f"trial-{i:04d}")
        os.makedirs(os.path.join(run, "journal", "files"))
        os.makedirs(os.path.join(tmp, "home", "jobs", f"job-{i:04d}"))
        for name in ("config.yaml", "journal/meta.json", "journal/events.jsonl", "claim.json"):
            path = os.path.join(run, name)
            with open(path + ".tmp", "w") as handle:  # written aside, then renamed: as orch writes
                handle.write("x" * 800)
                if fsync and name.endswith("events.jsonl"):
                    os.fsync(handle.fileno())
            os.replace(path + ".tmp", path)
        with open(os.path.join(tmp, "home", "jobs", f"job-{i:04d}", "record.json"), "w") as handle:
            handle.write("y" * 1500)
    created, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    shutil.rmtree(tmp)
    deleted = resource.getrusage(resource.RUSAGE_SELF)
    return wall, created.ru_stime - before.ru_stime, deleted.ru_stime - created.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to create the files")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--fsync", action="store_true", help="fsync each journal's events file, as a submission does")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between repeats")
    args = parser.parse_args()
    for repeat in range(args.repeats):
        if repeat and args.pause:
            time.sleep(args.pause)
        wall, create_sys, delete_sys = churn(args.dir, args.fsync)
        print(f"repeat {repeat}: created {TRIALS} trials' files in {wall:.2f} s (system CPU {create_sys:.2f} s), "
              f"deleted them (system CPU {delete_sys:.2f} s); {args.dir}; load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
