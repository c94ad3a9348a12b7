"""The one launch path of ``orch submit`` and ``orch kfold``: flags -> experiments -> plan ->
preflight -> identity (config file written, MLflow run created) -> plan -> submit.

A bad option fails while planning unwritten specs, and a request the cluster can never satisfy
fails in the launcher's ``preflight``: both before any file, record or MLflow run exists, so
nothing is half-submitted. A dry run stops after the first plan and writes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from cluster.errors import LaunchError
from cluster.files import write_text_atomic
from orchestrator.config.schema import Experiment
from orchestrator.launchers.base import JobHandle, Launcher, Plan
from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)

RUN_ID_FILE = ".mlflow_run_id"


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
             defer_run: bool = False) -> JobSpec:
    """Turn a resolved experiment into a :class:`JobSpec` named ``name`` (default: the
    experiment's name).

    With ``write`` (a real submission) the job's identity is decided now: the MLflow run is
    created (unless the experiment names one already, e.g. a k-fold child) and its id, the
    absolute tracking URI and the backend tag go into the config written to
    ``<output_dir>/config.yaml``. Without it (a dry run) nothing is created or written. With
    ``defer_run`` the run is created by :func:`create_deferred_runs` right after launch, while
    the worker imports torch; the worker waits for ``<output_dir>/.mlflow_run_id``.
    """
    from orchestrator.config import dump_experiment, with_overrides
    from orchestrator.weights import weights_overrides

    output_dir = job_output_dir(experiment)
    updates: dict[str, Any] = {"runtime.output_dir": str(output_dir)}
    extra_env = {"ORCH_BACKEND": backend}
    updates.update(weights_overrides(experiment))
    tracking = experiment.tracking
    if write and tracking.enable:
        from orchestrator.tracking import runs

        uri = runs.tracking_uri_of(experiment)
        updates["tracking.uri"] = uri
        updates["tracking.tags"] = {**tracking.tags, "backend": backend}
        if not tracking.run_id and defer_run:
            run_id_file = output_dir / RUN_ID_FILE
            run_id_file.unlink(missing_ok=True)
            extra_env["ORCH_RUN_ID_FILE"] = str(run_id_file)
        elif not tracking.run_id:
            updates["tracking.run_id"] = runs.create_run(
                uri, runs.experiment_name(experiment), tracking.run_name or experiment.name,
                tags=updates["tracking.tags"], parent_run_id=tracking.parent_run_id)
    experiment = with_overrides(experiment, updates)
    config_path = output_dir / "config.yaml"
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(config_path, dump_experiment(experiment))
    return JobSpec(name=name or experiment.name, experiment=experiment, config_path=config_path,
                   output_dir=output_dir, backend=backend, extra_env=extra_env)


def create_deferred_runs(plan: Plan, handles: Sequence[JobHandle]) -> None:
    """Create the MLflow runs of jobs launched with ``defer_run`` and hand their ids to the
    waiting workers (the run id file) and to ``orch status`` (the job record)."""
    from orchestrator import records
    from orchestrator.tracking import runs

    for job, handle in zip(plan.jobs, handles):
        run_id_file = job.extra_env.get("ORCH_RUN_ID_FILE")
        if not run_id_file:
            continue
        exp = job.experiment
        run_id = runs.create_run(exp.tracking.uri, runs.experiment_name(exp), exp.tracking.run_name or exp.name,
                                 tags=exp.tracking.tags, parent_run_id=exp.tracking.parent_run_id)
        write_text_atomic(run_id_file, run_id)
        record = records.annotate(handle.job_id, mlflow_run_id=run_id)
        if record.state.finished:
            # The job ended before its run existed (e.g. bad input found by the worker at once):
            # nobody could close the run, so close it here.
            from orchestrator.spec import JobState

            runs.close_run(exp.tracking.uri, run_id, "KILLED" if record.state == JobState.CANCELLED else
                           "FINISHED" if record.state == JobState.SUCCEEDED else "FAILED")


@dataclass
class Launch:
    """One submission to one backend: :meth:`plan` (pure), :meth:`preflight` (live checks),
    :meth:`submit` (identity, then the launcher)."""

    backend: str
    launcher: Launcher

    @classmethod
    def to(cls, backend: str) -> "Launch":
        from orchestrator.launchers import get_launcher

        return cls(backend, get_launcher(backend))

    def plan(self, experiments: Sequence[Experiment], names: Optional[Sequence[str]] = None) -> Plan:
        """The plan of unwritten specs: what ``--dry-run`` prints; bad options fail here."""
        names = names or [None] * len(experiments)
        return self.launcher.plan([job_spec(e, self.backend, name=n, write=False) for e, n in zip(experiments, names)])

    def preflight(self, plan: Plan) -> None:
        """Can the cluster ever run it (and are the records writable)? Nothing is written."""
        self.launcher.preflight(plan)
        from orchestrator.records import jobs_dir

        jobs_dir()

    def submit(self, experiments: Sequence[Experiment],
               names: Optional[Sequence[str]] = None) -> tuple[Plan, list[JobHandle]]:
        """Decide identities (config files, MLflow runs), plan them and start them."""
        # Local jobs start before their MLflow run exists (it is created while the worker imports
        # torch): that keeps `orch submit` within a second of a bare `orch train`.
        defer = self.backend == "local"
        names = names or [None] * len(experiments)
        specs = [job_spec(e, self.backend, name=n, defer_run=defer) for e, n in zip(experiments, names)]
        plan = self.launcher.plan(specs)
        handles = self.launcher.submit(plan)
        if defer:
            create_deferred_runs(plan, handles)
        return plan, handles

