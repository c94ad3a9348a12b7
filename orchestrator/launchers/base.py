"""The launcher interface: the whole life of a job as one abstract class (TorchX's scheduler API,
submitit's executor) and the typed plan every backend returns.

A backend is one class filling in :class:`Launcher`: ``plan`` is pure (no processes, no network,
no writes) and its :class:`Plan`'s text is exactly what ``orch submit --dry-run`` prints;
``preflight`` asks the live system whether the plan can ever run (and refuses with one line
before anything is written); ``submit`` takes only a plan, so what the dry run showed is what
runs; ``status`` (read-only, one call for many records: submitit's ``InfoWatcher``, TorchX's
``describe``) and ``cancel`` are what ``orch status`` and ``orch cancel`` call for records of that
backend, and :mod:`orchestrator.jobs` alone turns ``status`` answers into state transitions;
``describe`` adds backend lines to ``orch status JOB``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

from orchestrator.spec import JobRecord, JobSpec, JobState

if TYPE_CHECKING:
    from orchestrator.config.schema import Experiment


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a backend will do with ``jobs``. Subclasses add their typed, JSON-able request
    (``to_json``/``from_json``) and render :attr:`text` from it."""

    backend: str
    jobs: tuple[JobSpec, ...]

    @property
    def text(self) -> str:
        """Exactly what ``--dry-run`` prints."""
        raise NotImplementedError  # each backend's plan renders its own request

    def __str__(self) -> str:
        return self.text


@dataclasses.dataclass(frozen=True)
class Status:
    """A backend's answer about one job: what it says now, nothing stored. ``extra`` entries are
    merged into the record's ``extra`` (e.g. Slurm's own word for the state)."""

    state: JobState
    exit_code: Optional[int] = None
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    error: Optional[str] = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def changes(self, record: JobRecord) -> dict[str, Any]:
        """The record fields this answer would change (empty: nothing new, nothing to write)."""
        fields = {k: v for k, v in (("exit_code", self.exit_code), ("started_at", self.started_at),
                                    ("ended_at", self.ended_at), ("error", self.error))
                  if v is not None and getattr(record, k) != v}
        if any(record.extra.get(k) != v for k, v in self.extra.items()):
            fields["extra"] = dict(self.extra)
        return fields


def owners_gone(records: Sequence[JobRecord], owner: str) -> dict[str, Status]:
    """FAILED for each of ``records`` whose owning process (``record.pid``: a local supervisor, a
    Ray driver, which records every change itself) is gone without having recorded an end; one
    pass over the pids, no file read."""
    from cluster.lease import is_alive

    answers = {}
    for record in records:
        if record.state.finished or not record.pid or is_alive(record.pid, record.extra.get("pid_start")):
            continue
        where = record.extra.get("supervisor_log") or record.log_path
        answers[record.job_id] = Status(
            JobState.FAILED, error=f"the {owner} (pid {record.pid}) ended without recording an exit status; see {where}")
    return answers


class Launcher(abc.ABC):
    """One backend. Launchers take no constructor arguments: everything a job needs is in its
    :class:`JobSpec` (the resolved experiment, with the command-line flags folded in)."""

    name: ClassVar[str]
    poll_s: ClassVar[float] = 1.0  # how often a JobHandle of this backend asks for a fresh state

    def fit(self, experiment: "Experiment") -> "Experiment":
        """``experiment`` with what the cluster itself decides filled in, before any plan (Slurm:
        GPUs per node from the partition's nodes when the flags leave the layout open). Default:
        unchanged."""
        return experiment

    @abc.abstractmethod
    def plan(self, jobs: Sequence[JobSpec]) -> Plan:
        """Pure: what would run for ``jobs``. Raises ConfigError / LaunchError on bad options."""

    @abc.abstractmethod
    def preflight(self, plan: Plan, wait_s: float = 0.0) -> None:
        """Can the cluster ever run ``plan``? Raise an OrchError naming the shortfall (what was
        asked, what the cluster has, which flag to change) otherwise. Called before any record,
        config file or MLflow run exists. ``wait_s`` > 0 (``--wait-for-resources``): a cluster
        that can grow is polled that long for the request to fit before the refusal."""

    @abc.abstractmethod
    def submit(self, plan: Plan) -> list[str]:
        """Start ``plan`` (writing one record per job); returns at once, one job id per job in
        the order of ``plan.jobs`` (TorchX's ``schedule`` returns the app id; the handle of a
        job is :class:`orchestrator.jobs.JobHandle`, above the launchers)."""

    @abc.abstractmethod
    def status(self, records: Sequence[JobRecord]) -> dict[str, Status]:
        """Read-only: the backend's current answer for each of ``records`` (unfinished ones of
        this backend), by job id, asked in one query for all of them (never one per job); a job
        it has no news of is left out. Writes nothing; may raise when the backend cannot be
        asked (the caller keeps the stored states)."""

    def release(self, record: JobRecord) -> None:
        """Called once when ``status`` found the job ended: stop whatever of it is left (its
        devices and port must not be used twice). Default: nothing."""

    @abc.abstractmethod
    def cancel(self, record: JobRecord) -> None:
        """Stop the job's processes. Idempotent; the caller records CANCELLED."""

    def cancel_many(self, records: Sequence[JobRecord]) -> None:
        """Stop many jobs (an interrupted set); default: :meth:`cancel` each."""
        for record in records:
            self.cancel(record)

    def describe(self, record: JobRecord) -> list[tuple[str, str]]:
        """Extra ``(label, value)`` rows for ``orch status JOB``."""
        return []


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively (what ``json.dumps`` of a plan request needs)."""
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value
