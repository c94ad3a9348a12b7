"""The typed request of one Ray Train job: what the detached driver reads back and what
``--dry-run`` prints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from cluster.errors import ConfigError
from orchestrator.spec import JobSpec

GpuMode = Literal["yes", "no", "auto"]


@dataclass(frozen=True)
class RayJobRequest:
    """One ``TorchTrainer`` run. ``use_gpu`` ``auto`` is decided by the driver from the cluster's
    resources. ``job_id``, ``run_name`` and ``cwd`` are filled at submission."""

    name: str
    config_path: str
    output_dir: str
    num_workers: int
    storage_path: str
    address: Optional[str] = None
    use_gpu: GpuMode = "auto"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 2
    min_workers: Optional[int] = None  # elastic: Ray Train may go on with min_workers..num_workers
    keep_checkpoints: int = 1
    tracking_uri: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)
    job_id: Optional[str] = None
    run_name: Optional[str] = None
    cwd: Optional[str] = None

    @classmethod
    def for_job(cls, job: JobSpec) -> "RayJobRequest":
        """The request of ``job`` (pure); ConfigError on bad options."""
        exp = job.experiment
        res, opts = exp.resources, exp.resources.ray
        if res.gpus < 1:
            raise ConfigError(f"resources.gpus={res.gpus}: a Ray job needs at least 1 worker; set --gpus N")
        if opts.cpus_per_worker <= 0:
            raise ConfigError(f"resources.ray.cpus_per_worker={opts.cpus_per_worker} must be > 0")
        if opts.max_failures < -1:
            raise ConfigError(f"resources.ray.max_failures={opts.max_failures}: use -1 (retry forever), 0 or more")
        if opts.min_workers is not None and not 1 <= opts.min_workers <= res.gpus:
            raise ConfigError(f"resources.ray.min_workers={opts.min_workers}: use 1..{res.gpus} (resources.gpus), "
                              "or null for a fixed world size")
        nodes, _ = res.layout()
        if nodes > 1 and not opts.storage_path:
            raise ConfigError(
                f"resources.nodes={nodes}: a multi-node Ray run needs shared storage for checkpoints; "
                "set resources.ray.storage_path to an NFS folder or an object store URI (s3://, gs://)"
            )
        if opts.gpus_per_worker is not None:
            gpu_mode: GpuMode = "yes" if opts.gpus_per_worker > 0 else "no"
        else:
            gpu_mode = "no" if exp.runtime.device == "cpu" else ("yes" if exp.runtime.device == "cuda" else "auto")
        return cls(
            name=job.name, config_path=str(job.config_path), output_dir=str(job.output_dir), num_workers=res.gpus,
            storage_path=opts.storage_path or str(Path(job.output_dir) / "ray"), address=opts.address,
            use_gpu=gpu_mode, cpus_per_worker=opts.cpus_per_worker,
            gpus_per_worker=opts.gpus_per_worker if opts.gpus_per_worker is not None else 1,
            max_failures=opts.max_failures,
            min_workers=opts.min_workers if opts.min_workers is not None and opts.min_workers < res.gpus else None,
            keep_checkpoints=max(1, exp.checkpoint.max_keep or 1),
            tracking_uri=exp.tracking.uri if exp.tracking.enable else None,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RayJobRequest":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def scaling_workers(self) -> "int | tuple[int, int]":
        """``ScalingConfig(num_workers=...)``: the fixed count, or ``(min, max)`` when elastic."""
        return (int(self.min_workers), int(self.num_workers)) if self.min_workers else int(self.num_workers)

    def workers_text(self) -> str:
        if not self.min_workers:
            return f"{self.num_workers} (ScalingConfig num_workers)"
        return (f"{self.min_workers}..{self.num_workers} (ScalingConfig num_workers=({self.min_workers}, "
                f"{self.num_workers}); after a host lost, restarts on the slots left, LR rule re-applied)")

    def describe(self) -> str:
        """Readable description (the dry-run text)."""
        per_worker = f"CPU {self.cpus_per_worker:g}"
        if self.use_gpu == "yes":
            per_worker += f", GPU {self.gpus_per_worker:g}"
        elif self.use_gpu == "auto":
            per_worker += f", GPU {self.gpus_per_worker:g} if the cluster has GPUs (runtime.device=auto)"
        address = self.address or "none: a private Ray head on 127.0.0.1 is started for the job and stopped after it"
        failures = self.max_failures
        backend = {"yes": "nccl", "no": "gloo"}.get(self.use_gpu, "nccl on GPUs, else gloo")
        retry = "retry forever" if failures == -1 else "no restart" if failures == 0 else f"restart up to {failures} times"
        return "\n".join([
            f"ray job {self.name}",
            f"  cluster address:      {address}",
            f"  trainer:              ray.train.torch.TorchTrainer (Train V2), process group by Ray ({backend})",
            f"  workers:              {self.workers_text()}",
            f"  resources per worker: {per_worker}",
            f"  storage path:         {self.storage_path}",
            f"  run name:             {self.name}-<job id> (set at submission)",
            f"  failure config:       max_failures={failures} ({retry}, from the last reported checkpoint)",
            f"  checkpoints kept:     {self.keep_checkpoints}",
            f"  each worker runs:     detection.train.main(<{self.config_path}>, DistEnv from the Ray context, "
            "hooks=[RayReportHook])",
            f"  MLflow:               {self.tracking_uri or 'off'} (the run's journal is shipped there)",
        ])
