"""The whole experiment: training sections (from :mod:`detection.config`) plus launch sections.

Every section is a frozen dataclass; :func:`orchestrator.config.validate.build` turns a merged
YAML mapping into an :class:`Experiment`, naming the file and key path of anything wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from cluster.errors import ConfigError

from detection.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    ScheduleConfig,
    TrackingConfig,
)


@dataclass(frozen=True)
class LocalOptions:
    """Options of the local backend (this machine, GPU slices)."""

    cpu_slots: Optional[int] = None  # size of the slot pool when there is no GPU; None = cores
    max_parallel: Optional[int] = None  # cap on jobs running at once
    queue: bool = True  # wait for free GPUs/slots; False (--no-wait) fails at once


@dataclass(frozen=True)
class TorchrunOptions:
    """Options of the torchrun backend."""

    hosts: tuple[str, ...] = ()  # start one node per host over ssh
    master_addr: Optional[str] = None
    node_rank: Optional[int] = None  # start just this node (by hand, like dist_train.sh)
    rdzv_port: Optional[int] = None


@dataclass(frozen=True)
class SlurmOptions:
    """Options of the Slurm backend (passed to submitit / sbatch)."""

    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    nodelist: Optional[str] = None
    # The YAML is data, except these lines, which are shell run by sbatch: copied verbatim into the
    # batch script before the job starts (module load, conda activate), on purpose, unquoted.
    setup: tuple[str, ...] = ()
    max_requeues: int = 3
    # A node lost (NODE_FAIL): false = the job fails naming it; true = Slurm requeues it (sbatch
    # --requeue) and it resumes from its last checkpoint once it has its nodes again.
    requeue_on_node_fail: bool = False
    array_parallelism: Optional[int] = None  # None: as many as the partition can run at once
    additional: dict[str, Any] = field(default_factory=dict)  # any other sbatch option


@dataclass(frozen=True)
class RayOptions:
    """Options of the Ray backend."""

    address: Optional[str] = None  # None = start a local Ray; auto | HOST:PORT | ray://HOST:10001
    storage_path: Optional[str] = None  # shared storage for checkpoints (needed for multi-node)
    max_failures: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: Optional[float] = None  # None = 1 when the job uses GPUs
    # None = the world size is fixed (a host lost that leaves too few slots fails the job, naming it);
    # N = Ray Train may restart on N..gpus workers (ScalingConfig(num_workers=(N, gpus)), LR re-scaled).
    min_workers: Optional[int] = None


@dataclass(frozen=True)
class Resources:
    """One resource vocabulary for every backend."""

    gpus: int = 1  # total GPUs (world size); on a CPU-only machine: processes / CPU slots
    gpus_per_node: Optional[int] = None  # None = all of `gpus` on one node
    nodes: Optional[int] = None  # None = gpus / gpus_per_node
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    time: Optional[str] = None  # Slurm time format: MM, HH:MM:SS, D-HH:MM:SS
    partition: Optional[str] = None
    backend: Literal["auto", "local", "torchrun", "slurm", "ray"] = "auto"
    local: LocalOptions = field(default_factory=LocalOptions)
    torchrun: TorchrunOptions = field(default_factory=TorchrunOptions)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    ray: RayOptions = field(default_factory=RayOptions)

    def layout(self) -> tuple[int, int]:
        """``(nodes, gpus_per_node)``: the one rule every backend and ``orch config`` use.
        ``gpus`` is the world size; ``nodes`` and ``gpus_per_node`` default to what the others
        imply (all on one node when neither is given). ConfigError when they do not multiply out."""
        gpus, nodes, per_node = self.gpus, self.nodes, self.gpus_per_node
        if gpus < 1:
            raise ConfigError(f"resources.gpus={gpus}: a job needs at least 1 GPU / process (--gpus)")
        if (nodes is not None and nodes < 1) or (per_node is not None and per_node < 1):
            raise ConfigError(f"--nodes {nodes} / --gpus-per-node {per_node}: both must be >= 1")
        if per_node is None and nodes is None:
            return 1, gpus
        if per_node is None:
            if gpus % nodes:
                raise ConfigError(f"--gpus {gpus} does not split evenly over --nodes {nodes}; "
                                  f"give a multiple of {nodes} (e.g. --gpus {nodes * max(1, gpus // nodes)})")
            return nodes, gpus // nodes
        if gpus % per_node:
            raise ConfigError(f"--gpus {gpus} does not fill whole nodes of --gpus-per-node {per_node}; "
                              f"give a multiple of {per_node} (e.g. --gpus {max(per_node, gpus - gpus % per_node)})")
        if nodes is not None and nodes * per_node != gpus:
            raise ConfigError(f"--nodes {nodes} x --gpus-per-node {per_node} != --gpus {gpus}; "
                              f"give --gpus {nodes * per_node}, or drop --nodes / --gpus-per-node")
        return gpus // per_node, per_node


@dataclass(frozen=True)
class KFoldConfig:
    """K-fold cross-validation over whole images (``orch kfold``)."""

    folds: int = 5
    seed: int = 0
    ann_file: Optional[str] = None  # None = data.train.ann_file
    group_key: Optional[str] = None  # an image field whose equal values stay in one fold
    group_regex: Optional[str] = None  # regex on file_name; group 1 (or the match) is the key
    allow_small_classes: bool = False  # warn instead of failing when a class has < K images
    out_dir: Optional[str] = None  # None = <output_dir>/folds
    # What the folds balance (iterative stratification): class presence per image, and bins of
    # the box count / median box area per image (orch split --stratify classes,count,area).
    stratify: tuple[Literal["classes", "count", "area"], ...] = ("classes",)
    # A COCO file kept out of every fold: each fold's best checkpoint is evaluated on it at the
    # end of the set (test_mean/test_std), and `orch ensemble` scores the fused folds on it.
    test: Optional[str] = None
    test_img_dir: Optional[str] = None  # None = data.test.img_dir if set, else data.train.img_dir


@dataclass(frozen=True)
class SchedulerConfig:
    """Ray Tune trial scheduler."""

    type: Literal["fifo", "asha", "pbt"] = "fifo"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: Optional[int] = None
    perturbation_interval: int = 1


@dataclass(frozen=True)
class SweepConfig:
    """Ray Tune search (``orch sweep``). ``space`` maps config keys to distributions, e.g.
    ``optim.lr: {loguniform: [1.0e-4, 1.0e-2]}`` or ``model.backbone: {choice: [resnet18, resnet34]}``
    (kinds: choice, grid, uniform, loguniform, randint)."""

    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_samples: int = 1
    metric: str = "bbox_mAP"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    searcher: Literal["random", "grid", "optuna"] = "random"
    max_concurrent: Optional[int] = None
    gpus_per_trial: float = 0.0  # fractions allowed; > 1 means DDP inside the trial
    cpus_per_trial: float = 1.0


@dataclass(frozen=True)
class Experiment:
    """A whole resolved experiment."""

    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    resources: Resources = field(default_factory=Resources)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # key -> values (cartesian product)
    kfold: Optional[KFoldConfig] = None
    sweep: Optional[SweepConfig] = None
