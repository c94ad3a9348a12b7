"""The invariants checked after every fault: each function returns what it found, and a list of
problems (empty when the invariant holds), so that a scenario reports every broken invariant at
once and the summary can count them."""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from fault_inject import CHECKPOINT_LINE, RESUMED_LINE, TRAINING_LINE, kill, last_iter, processes_matching

SHIPPER = "orchestrator.tracking.shipper"


@dataclass
class Progress:
    """Where the faulted run was and where it went on from: ``fault_iter`` the last step done
    before it stopped, ``saved_iter`` the last checkpoint it logged before that, ``resumed_iter``
    the step the next run started from (None: it never stopped)."""

    fault_iter: int = 0
    saved_iter: int = 0
    resumed_iter: Optional[int] = None

    @property
    def lost(self) -> int:
        return 0 if self.resumed_iter is None else max(0, self.fault_iter - self.resumed_iter)


def progress(log: str, offset: int, resumed_log: Optional[str] = None) -> Progress:
    """Progress around a fault injected when ``log`` (the faulted job's) was ``offset`` long. The
    run that went on is in ``resumed_log`` (a resubmission) or later in ``log`` itself (a Slurm
    requeue, a Ray restart; none when the job never stopped). A run starts with the line
    ``training NAME: N iterations``, preceded by ``resumed from PATH at iteration K`` when it
    resumed."""
    after = log[offset:] if resumed_log is None else resumed_log
    start = TRAINING_LINE.search(after)
    resumed = RESUMED_LINE.search(after[: start.start()] if start else "")
    if resumed_log is None:
        first = resumed or start
        cut = log[: offset + first.start()] if first else log
    else:
        cut = log
    saved = [int(n) for n, _ in CHECKPOINT_LINE.findall(cut)]
    start_iter = int(resumed.group(2)) if resumed else (0 if start else None)
    return Progress(last_iter(cut), max(saved, default=0), start_iter)


def lost_work_problems(p: Progress, interval: int) -> list[str]:
    problems = []
    if p.lost > interval:
        problems.append(f"lost {p.lost} steps (stopped after step {p.fault_iter}, resumed at {p.resumed_iter}), "
                        f"more than one checkpoint interval ({interval})")
    if p.resumed_iter is not None and p.resumed_iter < p.saved_iter:
        problems.append(f"resumed at step {p.resumed_iter} although step {p.saved_iter} was checkpointed before the fault")
    return problems


def checkpoint_problems(output_dir: str) -> tuple[int, list[str]]:
    """Every ``*.pth`` under ``<output_dir>/checkpoints`` loads (``weights_only``) and holds what a
    resume needs; the pointer names an existing file. Returns (files checked, problems)."""
    import torch

    from detection.checkpoint import POINTER, RESUME_KEYS

    folder = os.path.join(output_dir, "checkpoints")
    problems = []
    files = sorted(glob.glob(os.path.join(folder, "*.pth")))
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{os.path.basename(path)} does not load: {str(err).splitlines()[0][:200]}")
            continue
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            problems.append(f"{os.path.basename(path)} lacks {missing}")
    pointer = os.path.join(folder, POINTER)
    if os.path.exists(pointer):
        name = open(pointer).read().strip()
        if not os.path.isfile(os.path.join(folder, name)):
            problems.append(f"{POINTER} names {name}, which is missing")
    return len(files), problems


def one_line_problems(error: Optional[str], what: str) -> list[str]:
    if not error or not error.strip():
        return [f"{what}: the job failed without a reason"]
    if "\n" in error.strip():
        return [f"{what}: the reason is {len(error.strip().splitlines())} lines: {error.strip()[:300]!r}"]
    return []


def orphans(markers: list[str], pgids: set[int], grace_s: float, shippers: bool) -> list[tuple[int, str]]:
    """Processes of a job still alive after ``grace_s`` (markers: its folders, its Ray address;
    ``pgids``: its process groups). Shippers count only when ``shippers`` (they are meant to
    outlive training until the run's final status is shipped). What is found is killed after
    (so that one broken scenario does not break the next)."""
    exclude = (lambda line: False) if shippers else (lambda line: SHIPPER in line)
    deadline = time.monotonic() + grace_s
    while True:
        left = processes_matching(markers, pgids, exclude)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid, _ in left:
        kill(pid, 9)
    return left


def lease_problems() -> list[str]:
    from cluster.gpus import list_device_leases
    from orch_testing import port_leases

    found = [f"device lease {lease}" for kind in ("cpu", "gpu") for lease in list_device_leases(kind)]
    found += [f"port lease {lease}" for lease in port_leases()]
    return found


def run_statuses(output_dirs: list[str], uri: str, experiment: str) -> tuple[dict[str, str], list[str]]:
    """Ship every journal under ``output_dirs`` (``orch sync``), then read every run of
    ``experiment`` back: ``({run name: status}, problems)``; a run left RUNNING is a problem."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.sync import sync

    problems = []
    summary = sync([d for d in output_dirs if os.path.isdir(d)], uri)
    # Warnings (a resumed job's params already on its run) are not problems; failed or pending journals are.
    problems += [f"sync: {line.strip()}" for line in summary.lines()[1:] if not line.strip().startswith("warning")]
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=100) if found else []
    statuses = {f"{r.info.run_name}:{r.info.run_id[:8]}": r.info.status for r in runs}
    problems += [f"MLflow run {name} left RUNNING" for name, status in statuses.items() if status == "RUNNING"]
    return statuses, problems


def disjoint_problems(samples: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    """Two live jobs' devices and ports (each sample: one moment with both RUNNING) never overlap."""
    if not samples:
        return ["the two jobs never ran at the same time"]
    problems = []
    for a, b in samples:
        for key in ("devices", "ports"):
            shared = set(a.get(key) or ()) & set(b.get(key) or ())
            if shared:
                problems.append(f"two live jobs share {key} {sorted(shared)}")
    return sorted(set(problems))

