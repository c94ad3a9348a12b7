"""Helpers shared by test modules (``from orch_testing import ...``; tests/ is on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def root_conftest() -> Any:
    """tests/conftest.py as a plain module (its ``tiny_experiment_dict``), loaded under its own
    name: ``from conftest import`` finds whichever conftest module was imported first."""
    import importlib.util
    import sys

    name = "orch_tests_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("conftest.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def shipped_run(record: Any, timeout_s: float = 180.0) -> Any:
    """The MLflow run of a job, once the shipper beside it has delivered its final status
    (read back with ``MlflowClient``); fails the test when it does not arrive in time."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.runs import journal_dir, wait_shipped

    run_id = wait_shipped(journal_dir(record.output_dir), record.tracking_uri, timeout_s)
    assert run_id, f"the MLflow run of job {record.job_id} was not shipped within {timeout_s:.0f} s"
    return MlflowClient(record.tracking_uri).get_run(run_id)


def descendants(root: int) -> list[int]:
    """Pids of every live descendant of ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    """The (Ray-retitled) command line of ``pid``, or '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def fifo_dataset(shapes_data: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the shapes data whose first training image is a named pipe nobody writes
    (reading it blocks, as a hung network file system does); returns (folder, image name)."""
    import json
    import shutil

    data = Path(tmp_path) / "data"
    shutil.copytree(shapes_data, data)
    first = json.loads((data / "annotations" / "instances_train.json").read_text())["images"][0]["file_name"]
    image = data / "train" / first
    image.unlink()
    os.mkfifo(image)
    return data, os.path.basename(first)
