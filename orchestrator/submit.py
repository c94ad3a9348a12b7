"""``orch submit``: resolve experiments, fold command-line flags into them, plan, then launch.

Identity is decided here, before any process starts: the resolved config is written to the job's
output folder and the MLflow run is created, so every rank, restart and requeue continues the
same run and ``orch status`` can point at it before the first step. A dry run does none of that:
it plans and prints, and writes nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cluster.errors import ConfigError, LaunchError
from orchestrator.config.schema import Experiment
from orchestrator.spec import JobSpec, Plan
from orchestrator.weights import resolve_weights, weights_environ

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmitFlags:
    """Command-line flags of ``orch submit`` (None = keep the experiment's value)."""

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
        """The flags as dotted config keys for :func:`orchestrator.config.with_overrides`."""
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
            # --nodes 2 --gpus-per-node 8 means 16 in all.
            out["resources.gpus"] = self.nodes * self.gpus_per_node
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
        from orchestrator.launchers.slurm import slurm_reachable

        if slurm_reachable():
            return "slurm"
        raise LaunchError(
            f"--partition {experiment.resources.partition} asks for Slurm, but no Slurm controller "
            "answers (sinfo failed); check SLURM_CONF / that slurmctld runs, or pass --backend local"
        )
    return "local"


def resolve_experiments(paths: list[str], overrides: tuple[str, ...], flags: SubmitFlags) -> list[Experiment]:
    """Load every experiment file with ``--set`` overrides and the command-line flags applied."""
    from orchestrator.config import load_experiment

    if not paths:
        raise ConfigError("no experiment file given; usage: orch submit EXPERIMENT.yaml [...]")
    return [load_experiment(path, overrides, extra=flags.as_overrides()) for path in paths]


def absolute_tracking_uri(uri: str) -> str:
    """A SQLite URI with its file made absolute, so workers in other folders (or on other nodes
    sharing the filesystem) write to the same store; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def job_output_dir(experiment: Experiment) -> Path:
    """Absolute output folder of an experiment (``runtime.output_dir`` with ``{name}`` filled)."""
    from orchestrator.config import output_dir_of

    return Path(output_dir_of(experiment)).expanduser().resolve()


RUN_ID_FILE = ".mlflow_run_id"


def build_job_spec(experiment: Experiment, backend: str, write: bool = True, tags: Optional[dict[str, str]] = None,
                   defer_run: bool = False) -> JobSpec:
    """Turn a resolved experiment into a :class:`JobSpec`.

    With ``write`` (a real submission) the MLflow run is created now and its id, and the absolute
    tracking URI, go into the config that is written to ``<output_dir>/config.yaml``. Without it
    (a dry run) nothing is created or written. With ``defer_run`` the run is created by
    :func:`create_deferred_runs` right after launch, while the worker imports torch; the worker
    waits for ``<output_dir>/.mlflow_run_id`` before training, so it still never makes its own run.
    """
    from orchestrator.config import dump_experiment, with_overrides

    output_dir = job_output_dir(experiment)
    updates: dict[str, Any] = {"runtime.output_dir": str(output_dir)}
    extra_env = {"ORCH_BACKEND": backend, **weights_environ(experiment)}
    if write and experiment.tracking.enable:
        from detection.tracking import resolve_tracking_uri

        uri = absolute_tracking_uri(resolve_tracking_uri(experiment.tracking))
        updates["tracking.uri"] = uri
        if defer_run and not experiment.tracking.run_id:
            run_id_file = output_dir / RUN_ID_FILE
            run_id_file.unlink(missing_ok=True)
            extra_env["ORCH_RUN_ID_FILE"] = str(run_id_file)
        elif not experiment.tracking.run_id:
            from detection.tracking import create_run

            experiment = with_overrides(experiment, {"tracking.uri": uri})
            run_tags = {"orch.backend": backend, **(tags or {})}
            updates["tracking.run_id"] = create_run(
                experiment.tracking,
                experiment.tracking.run_name or experiment.name,
                tags=run_tags,
                parent_run_id=experiment.tracking.parent_run_id,
            )
    experiment = with_overrides(experiment, updates)
    config_path = output_dir / "config.yaml"
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = config_path.with_suffix(".yaml.tmp")
        tmp.write_text(dump_experiment(experiment))
        os.replace(tmp, config_path)
    return JobSpec(
        name=experiment.name,
        experiment=experiment,
        config_path=config_path,
        output_dir=output_dir,
        backend=backend,
        extra_env=extra_env,
    )


def create_deferred_runs(plan: Plan, handles: list) -> None:
    """Create the MLflow runs of jobs launched with ``defer_run`` and hand their ids to the
    waiting workers (the run id file) and to ``orch status`` (the job record)."""
    from detection.tracking import create_run
    from orchestrator.jobs import update_record

    for job, handle in zip(plan.jobs, handles):
        run_id_file = job.extra_env.get("ORCH_RUN_ID_FILE")
        if not run_id_file:
            continue
        tracking = job.experiment.tracking
        run_id = create_run(tracking, tracking.run_name or job.name, tags={"orch.backend": job.backend},
                            parent_run_id=tracking.parent_run_id)
        tmp = run_id_file + ".tmp"
        Path(tmp).write_text(run_id)
        os.replace(tmp, run_id_file)
        record = update_record(handle.job_id, lambda r, run_id=run_id: setattr(r, "mlflow_run_id", run_id))
        if record.state.finished:
            # The job ended before its run existed (e.g. bad input found by the worker at once):
            # the supervisor could not close the run, so close it here.
            from orchestrator.jobs import close_mlflow_run

            close_mlflow_run(record)


def submit(paths: list[str], overrides: tuple[str, ...], flags: SubmitFlags, dry_run: bool = False):
    """Resolve, plan and (unless ``dry_run``) launch. Returns ``(plan, handles)``; handles is
    empty for a dry run."""
    experiments = resolve_experiments(paths, overrides, flags)
    backends = {choose_backend(exp, flags.backend) for exp in experiments}
    if len(backends) > 1:
        raise ConfigError(
            f"the experiments ask for different backends ({', '.join(sorted(backends))}); "
            "submit them separately or pass --backend"
        )
    backend = backends.pop()
    from orchestrator.launchers.base import get_launcher

    launcher = get_launcher(backend)
    # Plan from unwritten specs first: a bad option fails here, before any run or file exists,
    # so nothing is half-submitted.
    plan = launcher.plan([build_job_spec(exp, backend, write=False) for exp in experiments])
    resolve_weights(experiments, download=not dry_run)  # weights names -> the cache, before anything is queued
    if dry_run:
        return plan, []
    # Checks that look at the live system (free GPUs, a reachable cluster) also come before any
    # file or MLflow run exists.
    preflight = getattr(launcher, "preflight", None)
    if preflight is not None:
        preflight(plan)
    from orchestrator.jobs import jobs_dir

    jobs_dir()  # the records must be writable too
    # Local jobs start before their MLflow run exists (the run is created while the worker
    # imports torch): that keeps `orch submit` within a second of a bare `orch train`.
    defer = backend == "local"
    plan = launcher.plan([build_job_spec(exp, backend, write=True, defer_run=defer) for exp in experiments])
    handles = launcher.submit(plan)
    if defer:
        create_deferred_runs(plan, handles)
    return plan, handles

