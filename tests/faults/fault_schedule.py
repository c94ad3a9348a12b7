"""The seeded schedule of the fault suite: seed -> one :class:`Scenario` (pure, standard library).

Seed ``s`` runs the fault ``MATRIX[s % len(MATRIX)]``; everything else about it (the window the
fault lands in, the step, the signal, the rank, how long a daemon stays down, whether a second
job runs beside it) is drawn from ``random.Random(s)``. So seeds ``0 .. len(MATRIX) - 1`` inject
every (backend, fault) pair once, and the first seeds, which CI runs, are ordered to spread over
every backend and the faults that matter most. Same seed, same scenario, on every machine.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from typing import Any, Optional

# The training every scenario runs: 16 steps of the tiny detector, 2 ranks (4 steps an epoch).
MAX_ITERS = 16
CHECKPOINT_INTERVAL = 4  # the most work a fault may cost, in steps
EVAL_INTERVAL = 6  # evaluations at 6, 12 and 16
WORLD = 2

# (backend, fault), in seed order. The first CI_SEEDS entries are what `make test` runs.
MATRIX: tuple[tuple[str, str], ...] = (
    ("torchrun", "kill_rank"),
    ("local", "kill_supervisor"),
    ("slurm", "signal_job"),
    ("ray", "kill_rank"),
    ("local", "disk_full"),
    ("slurm", "kill_slurmd"),
    ("ray", "kill_driver"),
    ("torchrun", "port_squat"),
    ("slurm", "requeue"),
    ("local", "kill_rank"),
    ("local", "mlflow_down"),
    ("slurm", "kill_rank"),
    ("ray", "signal_rank"),
    ("local", "port_squat"),
    ("torchrun", "kill_supervisor"),
    ("slurm", "disk_full"),
    ("ray", "mlflow_down"),
    ("local", "signal_rank"),
    ("slurm", "port_squat"),
    ("torchrun", "signal_rank"),
    ("slurm", "mlflow_down"),
    ("ray", "disk_full"),
    ("torchrun", "disk_full"),
    ("torchrun", "mlflow_down"),
)
# CI (`make test`) runs seeds 0..CI_SEEDS-1: the faults of issue 12's findings (a dead rank, a
# dead supervisor, a Slurm preemption) on local, torchrun and Slurm: 3 min 29 s for tests/faults
# on this 2-core machine at load 2-7 (12 min at load 11-15). A Ray worker restart (seed 3, ~4 minutes) is in CI through
# tests/orchestrator/ray/test_restart_resume.py; `make faults` runs it here.
CI_SEEDS = 3

# Faults after which the job is expected to fail (with a one-line reason) and to be resumed by
# hand (`orch submit ... --set runtime.resume=auto`), by backend; "*" = every backend. The other
# faults must be survived by the job itself.
FATAL: dict[str, frozenset[str]] = {
    "kill_rank": frozenset({"local", "torchrun", "slurm"}),  # no restart policy there; Ray restarts the group
    "signal_rank": frozenset({"local", "torchrun"}),  # a rank killed by a signal; Ray restarts the group
    "kill_supervisor": frozenset({"local", "torchrun"}),  # the job's owner is gone
    "kill_driver": frozenset({"ray"}),  # the job's owner is gone
    "disk_full": frozenset({"*"}),  # a checkpoint cannot be written
    "signal_job": frozenset(),  # filled per scenario: SIGTERM ends a Slurm job, USR2 requeues it
}
# Windows a signal or a kill lands in: at a training step, inside an evaluation, inside a checkpoint write.
WINDOWS = ("step", "eval", "checkpoint")
SIGNALS = ("SIGTERM", "SIGUSR2")
# Faults that hit a process of the job, so where it is (step, evaluation, checkpoint) matters.
WINDOWED = frozenset({"kill_rank", "signal_rank", "signal_job", "requeue", "kill_supervisor", "kill_driver"})


@dataclass(frozen=True)
class Scenario:
    """One seeded fault on one real job. ``at_iter``: the step after which the fault is armed
    (``window`` then says where exactly it lands); ``down_s``: how long a stopped daemon (slurmd,
    MLflow server) stays down; ``pair``: a second job runs beside the faulted one (devices and
    ports must stay disjoint, and it must succeed); ``mode``: a fault-specific variant."""

    seed: int
    backend: str
    fault: str
    window: str = "step"
    at_iter: int = 2
    signal: str = "SIGTERM"
    rank: int = 0
    down_s: float = 0.0
    pair: bool = False
    mode: str = ""

    @property
    def name(self) -> str:
        """Short, unique, usable as a job name: ``s7-local-kill_supervisor``."""
        return f"s{self.seed}-{self.backend}-{self.fault}"

    @property
    def fatal(self) -> bool:
        """Whether the job is expected to fail (then it is resumed by a second submission)."""
        if self.fault == "signal_job":
            return self.signal == "SIGTERM"  # a termination notice: checkpoint and end; USR2 requeues
        if self.fault == "port_squat":
            return self.mode == "all_ports"  # every port of the range taken: no port to lease
        backends = FATAL.get(self.fault, frozenset())
        return "*" in backends or self.backend in backends

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name, "fatal": self.fatal}


def schedule(seed: int) -> Scenario:
    """The scenario of ``seed`` (deterministic)."""
    backend, fault = MATRIX[seed % len(MATRIX)]
    rng = random.Random(seed)
    window = rng.choice(WINDOWS)
    at_iter = rng.randint(2, MAX_ITERS - 4)
    if window == "eval":
        at_iter = rng.choice([i for i in range(EVAL_INTERVAL, MAX_ITERS, EVAL_INTERVAL)])
    signal = rng.choice(SIGNALS)
    rank = rng.randrange(WORLD)
    down_s = round(rng.uniform(2.0, 8.0), 1)
    # A second job beside it on the backends where orch itself hands out devices and ports.
    pair = backend in ("local", "torchrun", "slurm") and rng.random() < 0.4
    mode = ""
    if fault == "port_squat":
        mode = rng.choice(["after_lease", "range", "all_ports"]) if backend != "slurm" else "after_lease"
        pair = pair and mode != "all_ports"
        at_iter = 0
    elif fault == "mlflow_down":
        mode = rng.choice(["restart_during", "restart_after_end"])
    elif fault == "kill_slurmd":
        mode = rng.choice(["node1", "node2"])
    if fault not in WINDOWED:
        window = "step"  # a daemon, the disk or a port: where the job is in its step does not matter
    return Scenario(seed, backend, fault, window, at_iter, signal, rank, down_s, pair, mode)


def seeds(n: Optional[int] = None, start: int = 0) -> list[int]:
    """The seeds of a run: ``start .. start + n - 1`` (``n`` None: the CI set)."""
    return list(range(start, start + (CI_SEEDS if n is None else n)))


def selected_seeds() -> list[int]:
    """The seeds this run asks for: those listed in ``ORCH_FAULTS_SEEDS``, else ``ORCH_FAULTS_N``
    seeds from ``ORCH_FAULTS_START`` (default 0); without either the CI set."""
    listed = os.environ.get("ORCH_FAULTS_SEEDS", "").replace(",", " ").split()
    if listed:  # `make faults SEEDS=8,11`: these seeds only (rerun what failed)
        return [int(s) for s in listed]
    n = os.environ.get("ORCH_FAULTS_N", "").strip()
    start = int(os.environ.get("ORCH_FAULTS_START", "0").strip() or 0)
    return seeds(int(n) if n else None, start)
