"""The typed plan of a sweep: checked from the experiment's ``sweep:`` section (pure), printed by
``--dry-run``, and read back by the detached sweep driver and by every trial."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from cluster.errors import ConfigError
from orchestrator.config.schema import Experiment
from orchestrator.sweep.space import Dimension, check_searcher, parse_space, trial_count

if TYPE_CHECKING:
    from orchestrator.launchers.ray.capacity import RayAsk

DRIVER_CPUS = 0.1  # the Tune trial that only drives a TorchTrainer (FIELD_NOTES: fits on 2 cores)


@dataclass(frozen=True)
class TrialScheduler:
    """The Tune scheduler of a sweep (``max_t`` and ``grace_period`` count evaluations)."""

    type: str
    grace_period: int
    reduction_factor: float
    max_t: int


@dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep needs. The identity fields at the end (``job_id`` ... ``tracking_uri``)
    are decided by :func:`orchestrator.sweep.driver.prepare_sweep` before anything runs."""

    name: str
    config_path: str
    config_yaml: str  # the base experiment, resolved
    output_root: str
    address: Optional[str]
    storage_path: Optional[str]
    space: tuple[Dimension, ...]
    searcher: str
    num_samples: int
    trials: int
    metric: str
    mode: str
    scheduler: TrialScheduler
    max_concurrent: Optional[int]
    workers_per_trial: int
    gpus_per_trial: float
    cpus_per_trial: float
    gpus_per_worker: float
    cpus_per_worker: float
    job_id: Optional[str] = None
    output_dir: Optional[str] = None
    cwd: Optional[str] = None
    parent_journal: Optional[str] = None
    tracking_uri: Optional[str] = None
    # Resumed sweep only: trial id -> its entry in the record's trial table, for the trials that
    # ended before the driver died (Tune's saved state may be older than their end).
    finished_trials: Optional[dict[str, dict[str, Any]]] = None

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_trial > 0

    def trial_ask(self) -> "RayAsk":
        """What one trial asks of the Ray cluster: its own CPUs and GPUs, or for a DDP trial its
        workers plus the small driver that fits their ``TorchTrainer``."""
        from orchestrator.launchers.ray.capacity import RayAsk

        hints = {"CPU": "lower sweep.cpus_per_trial (--set sweep.cpus_per_trial=1), or use a bigger cluster (--address)",
                 "GPU": "lower sweep.gpus_per_trial (0 trains on CPU: --set sweep.gpus_per_trial=0), or use a "
                        "cluster with more GPUs (--address)"}
        gpu = "yes" if self.use_gpu else "no"
        if self.workers_per_trial > 1:
            return RayAsk(label=f"each trial of sweep {self.name}", workers=self.workers_per_trial, use_gpu=gpu,
                          per_worker={"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker},
                          driver={"CPU": DRIVER_CPUS}, unit="DDP worker", hints=hints)
        return RayAsk(label=f"each trial of sweep {self.name}", workers=1, use_gpu=gpu, unit="trial", hints=hints,
                      per_worker={"CPU": self.cpus_per_trial, "GPU": self.gpus_per_trial})

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["space"] = [[d.key, d.kind, list(d.args)] for d in self.space]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SweepPlan":
        return cls(**{**data, "space": tuple(Dimension(k, kind, tuple(a)) for k, kind, a in data["space"]),
                      "scheduler": TrialScheduler(**data["scheduler"])})

    @property
    def text(self) -> str:
        """Readable description of the sweep (what ``--dry-run`` prints)."""
        s = self.scheduler
        sched = (f"asha (grace_period {s.grace_period}, reduction_factor {s.reduction_factor:g}, "
                 f"max_t {s.max_t} evaluations)" if s.type == "asha" else s.type)
        if self.workers_per_trial > 1:
            per_trial = (f"{self.workers_per_trial} DDP workers (TorchTrainer inside the trial, "
                         f"{self.gpus_per_worker:g} GPU + {self.cpus_per_worker:g} CPU each) + {DRIVER_CPUS} CPU driver")
        else:
            per_trial = f"{self.cpus_per_trial:g} CPU, {self.gpus_per_trial:g} GPU (training in the trial itself)"
        return "\n".join([
            f"ray tune sweep {self.name}",
            f"  cluster address: {self.address or 'none: a private Ray head on 127.0.0.1 for the sweep'}",
            "  search space:",
            *[f"    {d.describe()}" for d in self.space],
            f"  searcher:        {self.searcher}; {self.trials} trials (num_samples {self.num_samples})",
            f"  objective:       {self.mode} {self.metric} (reported at every evaluation)",
            f"  scheduler:       {sched}",
            f"  max concurrent:  {self.max_concurrent or 'as resources allow'}",
            f"  per trial:       {per_trial}",
            f"  outputs:         {self.output_root}/<sweep id>/trials/<trial id>",
            "  MLflow:          one parent run, one child run per trial (mlflow.parentRunId)",
        ])

    def __str__(self) -> str:
        return self.text


def evaluations(exp: Experiment) -> int:
    """How many evaluations one trial reports (Tune iterations): every ``eval.interval`` and at
    the end (an estimate for world sizes that rescale the schedule)."""
    total = exp.schedule.iterations if exp.schedule.iterations is not None else (exp.schedule.epochs or 1)
    interval = max(1, exp.eval.interval)
    return max(1, math.ceil(total / interval))


def check_space_values(exp: Experiment, dims: list[Dimension]) -> None:
    """Every value a trial can get must make a valid experiment: choices and grid values each,
    and the bounds of ranges (a float range over an integer key fails here, not in every trial)."""
    from orchestrator.config import with_overrides

    for dim in dims:
        values = (dim.args[0], dim.args[1] - 1) if dim.kind == "randint" else dim.args
        for value in values:
            with_overrides(exp, {dim.key: value, "sweep": None}, source=f"sweep.space.{dim.key} ({dim.kind} value {value!r})")


def plan_sweep(exp: Experiment, config_path: str = "<experiment>") -> SweepPlan:
    """Check the ``sweep:`` section and return the sweep's plan. Pure."""
    sweep = exp.sweep
    if sweep is None:
        raise ConfigError(f"{config_path} has no `sweep:` section; add one (see `orch sweep --help`)")
    dims = parse_space(sweep.space)
    check_searcher(dims, sweep.searcher)
    check_space_values(exp, dims)
    if not (sweep.metric in ("loss",) or sweep.metric.startswith(("bbox_", "segm_", "loss_"))):
        raise ConfigError(f"sweep.metric={sweep.metric!r} is not a metric orch reports; use an evaluation metric "
                          "(bbox_mAP, bbox_mAP_50, segm_mAP, ...) or loss")
    if sweep.cpus_per_trial <= 0 or sweep.gpus_per_trial < 0:
        raise ConfigError("sweep.cpus_per_trial must be > 0 and sweep.gpus_per_trial >= 0 (fractions allowed)")
    sched = sweep.scheduler
    if sched.type == "pbt":
        raise ConfigError(
            "sweep.scheduler.type=pbt is not supported: PBT changes hyperparameters of a running trial "
            "and resumes it from another trial's checkpoint, but an orch checkpoint restores the "
            "optimizer state (and its LR) exactly, so the mutation would be silently undone; use asha or fifo"
        )
    max_t = sched.max_t or evaluations(exp)
    if sched.type == "asha":
        if sched.grace_period < 1 or sched.grace_period > max_t:
            raise ConfigError(f"sweep.scheduler.grace_period={sched.grace_period} must be in 1..max_t ({max_t} "
                              "evaluations per trial); lower it or evaluate more often (eval.interval)")
        if sched.reduction_factor <= 1:
            raise ConfigError(f"sweep.scheduler.reduction_factor={sched.reduction_factor} must be > 1 (e.g. 2 or 3)")
    gpus = float(sweep.gpus_per_trial)
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"sweep.gpus_per_trial={gpus}: above 1 it is a DDP world size and must be whole")
    workers = int(gpus) if gpus > 1 else 1
    from orchestrator.config import dump_experiment, output_dir_of

    return SweepPlan(
        name=exp.name, config_path=str(config_path), config_yaml=dump_experiment(exp),
        output_root=str(Path(output_dir_of(exp)).expanduser().resolve()), address=exp.resources.ray.address,
        storage_path=exp.resources.ray.storage_path, space=tuple(dims), searcher=sweep.searcher,
        num_samples=sweep.num_samples, trials=trial_count(dims, sweep.searcher, sweep.num_samples),
        metric=sweep.metric, mode=sweep.mode,
        scheduler=TrialScheduler(sched.type, sched.grace_period, sched.reduction_factor, max_t),
        max_concurrent=sweep.max_concurrent, workers_per_trial=workers, gpus_per_trial=gpus,
        cpus_per_trial=float(sweep.cpus_per_trial), gpus_per_worker=1.0 if gpus > 1 else gpus,
        cpus_per_worker=float(sweep.cpus_per_trial) / workers,
    )
