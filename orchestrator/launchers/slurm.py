"""The Slurm backend: one sbatch job per experiment (one job array per set of runs) via submitit.

Layout: ``gpus = nodes x gpus_per_node`` and **one task per GPU**: ``--ntasks-per-node`` equals
``--gpus-per-node``, every task is one rank and picks its device by local rank. That is
submitit's model (and torchvision's/detectron2's ``srun`` recipes): no second launcher inside the
allocation, Slurm itself counts, signals and accounts for every rank, and preemption signals reach
every rank directly. (One torchrun per node would add an agent and a second rendezvous.)

``plan`` is pure: it renders, with submitit's own ``_make_sbatch_string``, exactly the script
that ``submit`` hands to sbatch through ``submitit.SlurmExecutor`` with the same parameters, so
``orch submit --dry-run`` shows what runs. Slurm-specific options live in ``resources.slurm``;
``resources.slurm.additional`` takes any other sbatch option by name. Job state comes from
:mod:`orchestrator.launchers.slurm_state` (sacct when accounting exists, squeue / scontrol
otherwise); the code that runs inside the job is :mod:`orchestrator.launchers.slurm_job`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Optional

from cluster.errors import ConfigError, LaunchError
from orchestrator.jobs import JobHandle
from orchestrator.spec import JobRecord, JobSpec, JobState, Plan

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


def layout(resources) -> tuple[int, int]:
    """``(nodes, gpus_per_node)`` from ``gpus`` / ``nodes`` / ``gpus_per_node``; ConfigError when
    they do not multiply out."""
    gpus, nodes, per_node = resources.gpus, resources.nodes, resources.gpus_per_node
    if gpus < 1:
        raise ConfigError(f"resources.gpus={gpus}: a Slurm job needs at least 1 GPU/task (--gpus)")
    if per_node is None and nodes is None:
        return 1, gpus
    if per_node is None:
        if gpus % nodes:
            raise ConfigError(f"--gpus {gpus} is not divisible by --nodes {nodes}; give a multiple of {nodes}")
        return nodes, gpus // nodes
    if per_node < 1 or gpus % per_node:
        raise ConfigError(f"--gpus {gpus} is not divisible by --gpus-per-node {per_node}; "
                          f"give a multiple of {per_node} (e.g. --gpus {max(per_node, gpus - gpus % per_node)})")
    if nodes is not None and nodes * per_node != gpus:
        raise ConfigError(f"--nodes {nodes} x --gpus-per-node {per_node} != --gpus {gpus}; drop one of them")
    return gpus // per_node, per_node


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
    nodes, per_node = layout(res)
    params: dict[str, Any] = {
        "job_name": job.name,
        "time": parse_time(res.time),
        "nodes": nodes,
        "ntasks_per_node": per_node,  # one task (rank) per GPU
        "stderr_to_stdout": True,  # one log per task: `orch logs` shows tracebacks in place
        "wckey": None,  # submitit's default "submitit" is refused where wckeys are enforced
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
    params["array_parallelism"] = opts.array_parallelism
    valid = set(submitit_parameter_names())
    extra: dict[str, Any] = {}
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


def job_folder(jobs: list[JobSpec]) -> Path:
    """The submitit folder of a set of jobs: ``<common output folder>/slurm`` (on the shared file
    system with the outputs; it holds scripts, pickles, logs and rendezvous files)."""
    common = os.path.commonpath([str(j.output_dir) for j in jobs])
    return Path(common) / "slurm"


def render(params: dict[str, Any], folder: Path, count: int) -> str:
    """The sbatch script submitit writes for these parameters (``count`` > 1: a job array)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=count if count > 1 else None, **params)


class SlurmLauncher:
    """``orch submit --backend slurm`` (or ``--partition P`` with Slurm reachable)."""

    name: ClassVar[str] = "slurm"

    def plan(self, jobs: list[JobSpec]) -> Plan:
        """Group jobs with identical sbatch parameters (each group is one job or one array) and
        render each group's script. Pure: no processes, no files."""
        if not jobs:
            raise LaunchError("nothing to submit: no jobs were planned")
        groups: dict[str, dict[str, Any]] = {}
        for index, job in enumerate(jobs):
            params = sbatch_parameters(job)
            key = json.dumps({**params, "job_name": None}, sort_keys=True, default=str)
            groups.setdefault(key, {"params": params, "jobs": []})["jobs"].append(index)
        payload_groups, texts = [], []
        for group in groups.values():
            members = [jobs[i] for i in group["jobs"]]
            if len(members) > 1:  # one name for the array: what its runs' names share
                prefix = os.path.commonprefix([j.name for j in members]).rstrip("-_.")
                group["params"] = {**group["params"], "job_name": prefix or "orch-array"}
            folder = job_folder(members)
            script = render(group["params"], folder, len(members))
            payload_groups.append({**group, "folder": str(folder), "script": script})
            text = script
            if len(members) > 1:
                text += "# array tasks (each runs one resolved config):\n" + "".join(
                    f"#   {i}: {j.name}  {j.config_path}\n" for i, j in enumerate(members))
            texts.append(text)
        return Plan(backend=self.name, jobs=tuple(jobs), text="\n".join(texts), payload={"groups": payload_groups})

    def preflight(self, plan: Plan) -> None:
        """Fail before any file or MLflow run exists when no Slurm controller answers."""
        if not slurm_reachable():
            raise LaunchError("Slurm is not reachable (sinfo failed); check SLURM_CONF and that slurmctld runs, "
                              "start the local cluster (python scripts/local_slurm.py up), or use another --backend")

    def submit(self, plan: Plan) -> list["SlurmHandle"]:
        """sbatch every group; returns at once with one handle (and record) per job."""
        import submitit

        from orchestrator import jobs as records
        from orchestrator.launchers.slurm_job import SlurmTrainJob

        self.preflight(plan)  # callers that skip orchestrator.submit (k-fold) still get the check
        handles: list[SlurmHandle] = [None] * len(plan.jobs)  # type: ignore[list-item]
        for group in plan.payload["groups"]:
            members = [plan.jobs[i] for i in group["jobs"]]
            folder = Path(group["folder"])
            max_requeues = members[0].experiment.resources.slurm.max_requeues
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
            executor.update_parameters(**group["params"])
            calls = [SlurmTrainJob(str(j.config_path), str(folder), max_requeues, j.extra_env) for j in members]
            try:
                if len(calls) == 1:
                    submitted = [executor.submit(calls[0])]
                else:
                    with executor.batch():
                        pending = [executor.submit(call) for call in calls]
                    submitted = list(pending)
            except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError) as err:
                detail = getattr(err, "stderr", None) or getattr(err, "output", None) or str(err)
                detail = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
                line = next((s for s in reversed(detail.strip().splitlines()) if s.strip()), str(err))
                raise LaunchError(f"sbatch refused {members[0].name}: {line.strip()}; check --partition, "
                                  "--gpus-per-node and resources.slurm") from None
            for index, job, sjob in zip(group["jobs"], members, submitted):
                record = JobRecord(
                    job_id=records.new_job_id(job.name), name=job.name, backend=self.name,
                    state=JobState.PENDING, output_dir=str(job.output_dir), config_path=str(job.config_path),
                    log_path=str(sjob.paths.stdout), submitted_at=time.time(), native_id=str(sjob.job_id),
                    mlflow_run_id=job.experiment.tracking.run_id, tracking_uri=job.experiment.tracking.uri,
                    extra={"slurm_folder": str(folder), "result_path": str(sjob.paths.result_pickle),
                           # An array has one script, named after the array's own id.
                           "submission_file": str(folder / f"{str(sjob.job_id).split('_')[0]}_submission.sh")},
                )
                records.save_record(record)
                handles[index] = SlurmHandle(record.job_id)
        return handles


class SlurmHandle(JobHandle):
    """A submitted Slurm job, seen through its orch record."""

    poll_s = 1.0


def refresh_record(record: JobRecord) -> JobRecord:
    """Ask Slurm (sacct, else squeue / scontrol, else the job's result file) and store the answer.
    Called by :func:`orchestrator.jobs.refresh_record` for ``backend == "slurm"`` records."""
    from orchestrator import jobs as records
    from orchestrator.launchers import slurm_state

    if record.state.finished or not record.native_id:
        return record
    status = slurm_state.query(record.native_id, record.extra.get("result_path"))
    if status.state is JobState.UNKNOWN and status.source == "none":
        return record  # Slurm forgot the job and it left no result: keep what we knew

    def change(r: JobRecord) -> None:
        r.state = status.state
        r.started_at = status.started_at or r.started_at
        r.ended_at = status.ended_at or r.ended_at or (time.time() if status.state.finished else None)
        r.exit_code = status.exit_code if status.exit_code is not None else r.exit_code
        r.extra["slurm_state"] = status.raw
        r.extra["state_source"] = status.source
        if status.state is JobState.FAILED and not r.error:
            why = slurm_state.error_line(r.extra.get("result_path"), r.log_path)
            r.error = f"Slurm job {r.native_id} {status.raw.split()[0] if status.raw else 'FAILED'}" + (
                f" (exit {r.exit_code})" if r.exit_code is not None else "") + (f": {why}" if why else "")

    return records.update_record(record.job_id, change)


def cancel_record(record: JobRecord) -> JobRecord:
    """``scancel`` the job (idempotent: a finished job is left alone). Called by
    :func:`orchestrator.jobs.cancel_job`, which then marks the record CANCELLED."""
    if record.native_id and shutil.which("scancel"):
        proc = subprocess.run(["scancel", record.native_id], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0 and "already completing or completed" not in proc.stderr \
                and "Invalid job id" not in proc.stderr:
            raise LaunchError(f"scancel {record.native_id} failed: {proc.stderr.strip()}")
    return dataclasses.replace(record)
