"""CPU seconds a process spends importing what a training rank and a shipper import (torch,
torchvision through ``detection.train``, and MLflow), with Python's cyclic garbage collector at
its defaults and inside :func:`cluster.imports.heavy_imports` (paused, then frozen).

Each import runs in a fresh ``python`` process, the two ways alternating; the CPU (user +
system) of each child comes from ``getrusage`` and does not count other processes, so the
figure holds on a loaded machine better than wall time does. Prints one line per way (best and
median of ``--repeats``) and a JSON summary last.

    .venv/bin/python bench/bench_imports.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = "detection.train, mlflow.tracking"
WAYS = {
    "collector at its defaults": f"import {MODULES}",
    "heavy_imports (paused, then frozen)": f"from cluster.imports import heavy_imports\nwith heavy_imports():\n    import {MODULES}",
}


def child_cpu(code: str) -> float:
    """CPU seconds of one ``python -c code`` child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    child_cpu(f"import {MODULES}")  # warm the page cache and the .pyc files
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way, code in WAYS.items():
            times[way].append(child_cpu(code))
    summary = {"modules": MODULES, "repeats": args.repeats, "load_after": os.getloadavg()[0]}
    for way, values in times.items():
        print(f"{way}: best {min(values):.2f} CPU-s, median {statistics.median(values):.2f}")
        summary[way] = {"best": round(min(values), 3), "median": round(statistics.median(values), 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
