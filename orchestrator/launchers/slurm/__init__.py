"""The Slurm backend through submitit: sbatch parameters and scripts (:mod:`.sbatch`), the
launcher (:mod:`.launcher`), job state with or without accounting (:mod:`.state`), and the code
each task runs (:mod:`.task`, imported only inside Slurm jobs: it needs submitit)."""

from orchestrator.launchers.slurm.launcher import SbatchGroup, SlurmLauncher, SlurmPlan
from orchestrator.launchers.slurm.sbatch import parse_time, sbatch_parameters, slurm_reachable

__all__ = ["SbatchGroup", "SlurmLauncher", "SlurmPlan", "parse_time", "sbatch_parameters", "slurm_reachable"]
