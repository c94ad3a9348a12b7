"""The one launch path of ``orch submit`` and ``orch kfold``: flags -> experiments -> fit and
plan (once) -> preflight (once) -> identity (config file and run journal written) -> submit of
that same plan.

A bad option fails while planning unwritten specs, and a request the cluster can never satisfy
fails in the launcher's ``preflight``: both before any file, record or MLflow run exists, so
nothing is half-submitted. A dry run stops after the plan and writes nothing. What the dry run
printed is what runs (TorchX: ``submit = schedule(submit_dryrun(...))``): :meth:`Launch.submit`
takes the plan, writes each job's identity and hands the plan to the launcher, whose ``submit``
neither plans nor preflights again.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from cluster.errors import LaunchError
from cluster.files import write_text_atomic
from orchestrator.config.schema import Experiment
from orchestrator.jobs import JobHandle
from orchestrator.launchers.base import Launcher, Plan
from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ResourceFlags:
    """The resource flags ``orch submit`` and ``orch kfold`` share (None = keep the experiment's
    value); folded into ``experiment.resources`` so that launchers read only the experiment."""

    backend: Optional[str] = None
    gpus: Optional[int] = None
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    max_parallel: Optional[int] = None
    no_wait: bool = False
    address: Optional[str] = None
    hosts: Optional[str] = None
    node_rank: Optional[int] = None
    master_addr: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)
    # A launch option, not a resource (never folded into the experiment): seconds that preflight
    # may wait for a growing cluster to fit the request (--wait-for-resources).
    wait_for_resources: Optional[float] = None

    def as_overrides(self) -> dict[str, Any]:
        """The flags as dotted config keys for :func:`orchestrator.config.load_experiment`."""
        keys = {
            "resources.gpus": self.gpus,
            "resources.nodes": self.nodes,
            "resources.gpus_per_node": self.gpus_per_node,
            "resources.partition": self.partition,
            "resources.time": self.time,
            "resources.cpus_per_task": self.cpus_per_task,
            "resources.mem_gb": self.mem_gb,
            "resources.local.max_parallel": self.max_parallel,
            "resources.ray.address": self.address,
            "resources.torchrun.node_rank": self.node_rank,
            "resources.torchrun.master_addr": self.master_addr,
            "resources.slurm.account": self.account,
            "resources.slurm.qos": self.qos,
        }
        out = {k: v for k, v in keys.items() if v is not None}
        if self.gpus is None and self.nodes is not None and self.gpus_per_node is not None:
            out["resources.gpus"] = self.nodes * self.gpus_per_node  # --nodes 2 --gpus-per-node 8: 16 in all
        if self.max_parallel is not None:
            # One cap for every backend: local slots at once, the width of a Slurm job array.
            out["resources.slurm.array_parallelism"] = self.max_parallel
        if self.no_wait:
            out["resources.local.queue"] = False
        if self.hosts:
            out["resources.torchrun.hosts"] = [h for h in self.hosts.split(",") if h]
        out.update(self.extra)
        return out


def choose_backend(experiment: Experiment, requested: Optional[str]) -> str:
    """The backend named by the flag, else by the experiment; ``auto`` means Slurm when a
    partition is set and Slurm answers, else local."""
    backend = requested or experiment.resources.backend
    if backend != "auto":
        return backend
    if experiment.resources.partition:
        from orchestrator.launchers.slurm.sbatch import slurm_reachable

        if slurm_reachable():
            return "slurm"
        raise LaunchError(
            f"--partition {experiment.resources.partition} asks for Slurm, but no Slurm controller "
            "answers (sinfo failed); check SLURM_CONF / that slurmctld runs, or pass --backend local"
        )
    return "local"


def job_output_dir(experiment: Experiment) -> Path:
    """Absolute output folder of an experiment (``runtime.output_dir`` with ``{name}`` filled)."""
    from orchestrator.config import output_dir_of

    return Path(output_dir_of(experiment)).expanduser().resolve()


def job_spec(experiment: Experiment, backend: str, *, name: Optional[str] = None, write: bool = True,
             continue_run: Optional[bool] = None) -> JobSpec:
    """The :class:`JobSpec` of a resolved experiment named ``name`` (default: the experiment's
    name): its absolute output folder, config path, tracking URI and backend tag decided; pure
    unless ``write`` (then :func:`write_identity` writes its identity, as a submission does)."""
    from orchestrator.config import derive
    from orchestrator.weights import weights_overrides

    output_dir = job_output_dir(experiment)
    updates: dict[str, Any] = {"runtime.output_dir": str(output_dir), **weights_overrides(experiment)}
    tracking = experiment.tracking
    if tracking.enable:
        from orchestrator.tracking import runs

        updates["tracking.uri"] = runs.tracking_uri_of(experiment)
        updates["tracking.tags"] = {**tracking.tags, "backend": backend}
    experiment = derive(experiment, updates, source="orch's own settings")  # checked values: no re-validation
    spec = JobSpec(name=name or experiment.name, experiment=experiment, config_path=output_dir / "config.yaml",
                   output_dir=output_dir, backend=backend)
    if write:
        write_identity(spec, continue_run)
    return spec


def write_identity(job: JobSpec, continue_run: Optional[bool] = None, durable: bool = True) -> list[str]:
    """Decide a planned job's identity before anything runs: its output folder is claimed (one
    live job per folder), its journal created in ``<output_dir>/journal`` (continued when
    ``continue_run``, by default when ``runtime.resume`` is set: a resumed job goes on in the same
    MLflow run), and the resolved config, with the absolute tracking URI and the backend tag,
    written to ``<output_dir>/config.yaml``. ``durable=False``: the new journal is not fsynced
    here; returns the paths that make it durable (``cluster.files.fsync_paths``), [] else."""
    from orchestrator.config import dump_experiment
    from orchestrator.outputs import claim_for_submission

    experiment = job.experiment
    claim_for_submission(job.output_dir)  # refused before anything is written
    if experiment.tracking.enable:
        from orchestrator.tracking import runs

        tracking = experiment.tracking
        folder = runs.journal_dir(str(job.output_dir))
        runs.create_journal(folder, experiment, tracking.run_name or experiment.name,
                            tags=tracking.tags, parent=tracking.parent_journal,
                            resume=bool(experiment.runtime.resume) if continue_run is None else continue_run,
                            durable=durable)
        to_sync = [] if durable else runs.Journal.paths_to_sync(folder)
    else:
        to_sync = []
    write_text_atomic(job.config_path, dump_experiment(experiment))
    return to_sync


@dataclass
class Launch:
    """One submission to one backend: :meth:`plan` (pure), :meth:`preflight` (live checks),
    :meth:`submit` (identity, then the launcher)."""

    backend: str
    launcher: Launcher

    @classmethod
    def for_backend(cls, backend: str) -> "Launch":
        from orchestrator.launchers import get_launcher

        return cls(backend, get_launcher(backend))

    def plan(self, experiments: Sequence[Experiment], names: Optional[Sequence[str]] = None) -> Plan:
        """Fit and plan the unwritten specs, once: what ``--dry-run`` prints and what
        :meth:`submit` starts; bad options fail here."""
        names = names or [None] * len(experiments)
        experiments = [self.launcher.fit(e) for e in experiments]
        return self.launcher.plan([job_spec(e, self.backend, name=n, write=False) for e, n in zip(experiments, names)])

    def preflight(self, plan: Plan, wait_s: Optional[float] = None) -> None:
        """Can the cluster ever run it, does an ``online`` tracking server answer, are the
        output folders free of live jobs, are the records writable? Nothing is written.
        ``wait_s`` (``--wait-for-resources``): how long a cluster that can grow may take to fit
        the request before the refusal."""
        from orchestrator.outputs import check_free
        from orchestrator.records import jobs_dir
        from orchestrator.tracking.runs import require_reachable

        for job in plan.jobs:
            require_reachable(job.experiment)
            check_free(job.output_dir)
        self.launcher.preflight(plan, wait_s=wait_s or 0.0)
        jobs_dir()

    def submit(self, plan: Plan, continue_runs: Optional[bool] = None,
               tracking: Optional[Sequence[dict[str, Any]]] = None) -> tuple[Plan, list[JobHandle]]:
        """Write the identity of every job of ``plan`` (:meth:`identify`) and start that plan
        (planned and preflighted already)."""
        from orchestrator.outputs import claim

        plan = self.identify(plan, continue_runs, tracking)
        handles = [JobHandle(job_id, self.launcher.poll_s) for job_id in self.launcher.submit(plan)]
        for job, handle in zip(plan.jobs, handles):
            claim(job.output_dir, handle.job_id)
        return plan, handles

    def identify(self, plan: Plan, continue_runs: Optional[bool] = None,
                 tracking: Optional[Sequence[dict[str, Any]]] = None) -> Plan:
        """Write the identity of every job of ``plan`` (config files, journals, made durable
        together) before any job can start; returns the plan with ``tracking``. ``tracking``: per
        job, ``tracking.*`` keys decided only now (a k-fold trial's parent run, made after
        preflight); they change no part of the plan but the configs written."""
        from cluster.files import fsync_paths
        from orchestrator.config import derive

        if tracking is not None:
            if any(not all(k.startswith("tracking.") for k in t) for t in tracking):
                raise LaunchError("Launch.submit: only tracking.* keys may change after planning")
            jobs = tuple(dataclasses.replace(job, experiment=derive(job.experiment, t, source="set tracking"))
                         for job, t in zip(plan.jobs, tracking))
            plan = dataclasses.replace(plan, jobs=jobs)
        to_sync: list[str] = []
        for job in plan.jobs:
            to_sync += write_identity(job, continue_runs, durable=len(plan.jobs) == 1)
        fsync_paths(to_sync)
        return plan
