"""Whole-process start-up time of the commands users type most: ``orch --help``, ``orch config``,
``orch submit --dry-run`` for Slurm (the plan and the sbatch script, no cluster needed).

Each command runs ``--repeats`` times as a fresh process (``python -m`` of the installed ``orch``
script, so what a shell does); the table shows the median and the fastest wall time. Goals (issue
14): --help <= 0.15 s, config and a Slurm dry run <= 0.2 s: the CLI imports no torch, ray, mlflow or
submitit.

Usage:
    .venv/bin/python bench/bench_cli_startup.py --repeats 5 --out bench/results/cli_startup.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "experiments/shapes_demo.yaml"
COMMANDS = {
    "orch --help": ["--help"],
    "orch config": ["config", EXPERIMENT],
    "orch submit --dry-run (Slurm, 2 nodes x 8 GPUs)": [
        "submit", EXPERIMENT, "--backend", "slurm", "--partition", "dev", "--gpus", "16", "--dry-run"],
}


def orch_script() -> str:
    """The ``orch`` console script beside this interpreter (the one ``make install`` made)."""
    found = Path(sys.executable).with_name("orch")
    return str(found) if found.exists() else shutil.which("orch") or "orch"


def time_once(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench_cli_startup: {' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="orch-bench-cli-") as home:
        env = {**os.environ, "ORCH_HOME": home}
        script = orch_script()
        rows = []
        for label, argv in COMMANDS.items():
            time_once([script, *argv], env)  # warm the page cache: users run commands often
            times = [time_once([script, *argv], env) for _ in range(args.repeats)]
            rows.append((label, statistics.median(times), min(times)))
    load = os.getloadavg()[0]
    lines = [
        "# CLI start-up: whole-process wall time",
        "",
        f"Command: `.venv/bin/python bench/bench_cli_startup.py {' '.join(sys.argv[1:])}`",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; {args.repeats} runs "
        f"each after one untimed run; load average {load:.1f} at the end.",
        "",
        "| command | median s | fastest s |",
        "|---|---:|---:|",
        *[f"| `{label}` | {median:.3f} | {fastest:.3f} |" for label, median, fastest in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
