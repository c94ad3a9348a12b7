"""What a Slurm job is asked for: submitit parameters from ``resources``, and the sbatch script
submitit writes for them (rendered with submitit's own ``_make_sbatch_string``, so the dry run is
exactly what is submitted). Pure: no processes, no files.

Layout: ``gpus = nodes x gpus_per_node`` and **one task per GPU**: ``--ntasks-per-node`` equals
``--gpus-per-node``, every task is one rank and picks its device by local rank. That is
submitit's model (and torchvision's/detectron2's ``srun`` recipes): no second launcher inside the
allocation, Slurm itself counts, signals and accounts for every rank, and preemption signals reach
every rank directly. (One torchrun per node would add an agent and a second rendezvous.)
Slurm-specific options live in ``resources.slurm``; ``resources.slurm.additional`` takes any other
sbatch option by name.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from cluster.errors import ConfigError, LaunchError
from orchestrator.spec import JobSpec

DEFAULT_TIME_MIN = 24 * 60  # submitit would otherwise ask for 5 minutes
# sbatch long options that submitit has no parameter for; `resources.slurm.additional` may set
# them (Slurm 22.05+ spelling). Anything else is a typo until proven otherwise. Left out on
# purpose: array (orch makes the arrays), wait (submission must return at once), parsable (breaks
# reading the job id).
SBATCH_OPTIONS = frozenset("""
acctg-freq batch bb bbf begin chdir cluster-constraint clusters container core-spec
cores-per-socket cpu-freq cpus-per-gpu deadline delay-boot distribution export export-file
extra-node-info get-user-env gid gpu-bind gpu-freq gpus gpus-per-socket gres-flags hint hold
ignore-pbs kill-on-invalid-dep licenses mcs-label mem-bind mincpus network nice no-kill no-requeue
ntasks ntasks-per-core ntasks-per-gpu ntasks-per-socket overcommit oversubscribe power
prefer priority profile propagate reboot requeue reservation sockets-per-node spread-job switches
thread-spec threads-per-core time-min tmp uid use-min-nodes wait-all-nodes
""".split())


def slurm_reachable(timeout_s: float = 5.0) -> bool:
    """True when ``sinfo`` is installed and a Slurm controller answers (``SLURM_CONF`` honoured)."""
    if shutil.which("sinfo") is None:
        return False
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout_s)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return proc.returncode == 0


def parse_time(text: Optional[str]) -> int:
    """Slurm time (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) -> minutes."""
    if text is None:
        return DEFAULT_TIME_MIN
    value = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match:
        raise ConfigError(f"resources.time={value!r} is not a Slurm time; use MM, HH:MM:SS or D-HH:MM:SS (--time)")
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total = int(days) * 1440 + hours * 60 + minutes + seconds / 60
    elif len(parts) == 1:
        total = parts[0]
    elif len(parts) == 2:  # MM:SS
        total = parts[0] + parts[1] / 60
    else:
        total = parts[0] * 60 + parts[1] + parts[2] / 60
    minutes = max(1, int(-(-total // 1)))
    return minutes


def submitit_parameter_names() -> list[str]:
    """Every parameter ``submitit.SlurmExecutor.update_parameters`` accepts."""
    from submitit.slurm.slurm import _get_default_parameters

    # additional_parameters is how orch passes the sbatch-only options; not a name to set directly.
    return sorted(set(_get_default_parameters()) - {"additional_parameters"})


def sbatch_parameters(job: JobSpec) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters for ``job`` (pure)."""
    from submitit.slurm.slurm import _convert_mem

    exp = job.experiment
    res, opts = exp.resources, exp.resources.slurm
    nodes, per_node = res.layout()
    params: dict[str, Any] = {
        "job_name": job.name,
        "time": parse_time(res.time),
        "nodes": nodes,
        "ntasks_per_node": per_node,  # one task (rank) per GPU
        "stderr_to_stdout": True,  # one log per task: `orch logs` shows tracebacks in place
        "wckey": None,  # submitit's default "submitit" is refused where wckeys are enforced
        # One rank that dies ends the step: the others would otherwise wait in a collective.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    # A CPU-only experiment (runtime.device=cpu) asks for tasks, not GPUs.
    if exp.runtime.device != "cpu":
        params["gpus_per_node"] = per_node
    optional = {"partition": res.partition, "cpus_per_task": res.cpus_per_task, "account": opts.account,
                "qos": opts.qos, "constraint": opts.constraint, "exclude": opts.exclude, "nodelist": opts.nodelist}
    params.update({k: v for k, v in optional.items() if v is not None})
    if res.mem_gb is not None:
        params["mem"] = _convert_mem(res.mem_gb)
    if opts.setup:
        params["setup"] = list(opts.setup)
    if opts.array_parallelism is not None:  # else the launcher's plan sets what the partition can run
        params["array_parallelism"] = opts.array_parallelism
    valid = set(submitit_parameter_names())
    extra: dict[str, Any] = {"requeue": True} if opts.requeue_on_node_fail else {}
    for key, value in opts.additional.items():
        name = str(key).replace("-", "_")
        if name in valid:
            params[name] = value
        elif name.replace("_", "-") in SBATCH_OPTIONS:
            extra[name.replace("_", "-")] = value
        else:
            known = ", ".join(sorted(valid | {o.replace("-", "_") for o in SBATCH_OPTIONS}))
            raise LaunchError(f"resources.slurm.additional.{key}: unknown sbatch option; valid options: {known}")
    if extra:
        params["additional_parameters"] = extra
    return params


def job_folder(jobs: Sequence[JobSpec]) -> Path:
    """The submitit folder of a set of jobs: ``<common output folder>/slurm`` (on the shared file
    system with the outputs; it holds scripts, pickles, logs and rendezvous files)."""
    common = os.path.commonpath([str(j.output_dir) for j in jobs])
    return Path(common) / "slurm"


def render(params: dict[str, Any], folder: Path, count: int) -> str:
    """The sbatch script submitit writes for these parameters (``count`` > 1: a job array)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=count if count > 1 else None, **params)
