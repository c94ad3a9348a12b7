"""Data only: what a job is and what state it is in (a backend's plan is in
:mod:`orchestrator.launchers.base`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # `orch status` reads records without importing the experiment schema (and yaml)
    from orchestrator.config.schema import Experiment


class JobState(str, enum.Enum):
    """The life of a job, the same words for every backend."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


# A set, not a tuple of ``JobState.X``: reading an enum member off its class costs more than the
# test itself, and ``orch status`` asks this of every record.
_FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One training job, fully resolved, before a backend decides where it runs.

    Built by keyword only: a field added or removed then fails every old call at once, not just
    the ones whose argument count happens to differ.

    ``config_path`` is the resolved experiment YAML (no ``_base_``, overrides applied) that the
    worker loads; the orchestrator writes it (and creates the MLflow run) before launch, except in
    a dry run where nothing is written.
    """

    name: str
    experiment: Experiment
    config_path: Path
    output_dir: Path
    backend: str


@dataclass
class JobRecord:
    """What ``orch status`` knows of a job; kept as JSON in the orch home folder
    (``$ORCH_HOME`` or ``~/.orch``), one folder a job."""

    job_id: str
    name: str
    backend: str
    state: JobState
    output_dir: str
    config_path: str
    log_path: str
    submitted_at: float
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    exit_code: Optional[int] = None
    pid: Optional[int] = None  # supervising process (local/torchrun)
    native_id: Optional[str] = None  # Slurm job id, Ray job/run name
    mlflow_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    error: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)
