"""The local backend: jobs on this node, each on its own GPU slice (or CPU slots), in parallel.

``plan`` is pure: it writes down each job's worker command lines, how many devices it leases and
the queue order (largest first, so that smaller jobs backfill the gaps). ``submit`` writes one
job record per job and starts one detached supervisor (:mod:`orchestrator.supervisor`) for the
whole submission, then returns at once; the supervisor leases devices and ports, runs the
workers and records how each job ended. A job of world size N runs N worker processes with the
torch ``env://`` variables set and ``MASTER_PORT`` from a bind-checked port lease.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from typing import ClassVar, Optional

from cluster.env import DistEnv
from cluster.errors import ClusterError, LaunchError
from cluster.gpus import detect_pool, list_device_leases
from cluster.files import write_json_atomic
from cluster.lease import owner_identity
from orchestrator.jobs import (
    JobHandle,
    job_dir,
    log_path,
    new_job_id,
    save_record,
    update_record,
)
from orchestrator.spec import JobRecord, JobSpec, JobState, Plan

LOOPBACK = "127.0.0.1"


class LocalHandle(JobHandle):
    """A submitted local (or torchrun) job, read from its record: works from any process."""

    poll_s = 0.2


def worker_argv(job: JobSpec) -> list[str]:
    """``<python> -m orchestrator.worker <config>``: what every backend finally runs."""
    return [sys.executable, "-m", "orchestrator.worker", str(job.config_path)]


def base_env(job: JobSpec) -> dict[str, str]:
    """Variables every process of a job gets (unbuffered output so `orch logs -f` is live)."""
    # PASSIVE: spinning OpenMP waiters collapse throughput when parallel jobs share few cores.
    return {"PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **job.extra_env}


def _quote(text: str) -> str:
    # Placeholders such as {port} stay readable: a lone {word} is literal in sh/bash.
    return text if re.fullmatch(r"[\w@%+=:,./{}-]+", text) else shlex.quote(text)


def format_command(argv: list[str], env: dict[str, str]) -> str:
    """One shell-pasteable line: ``VAR=value ... argv``."""
    return " ".join([f"{k}={_quote(v)}" for k, v in env.items()] + [_quote(a) for a in argv])


def queue_order(slots: list[int], work: list[float]) -> list[int]:
    """Indices of the jobs, widest first, then longest first (stable): with backfill this keeps
    the makespan within a few percent of total device time / pool size (bench/bench_makespan.py)."""
    return sorted(range(len(slots)), key=lambda i: (-slots[i], -work[i]))


def schedule_length(job: JobSpec) -> float:
    """A job's length for ordering: its iterations, else its epochs (one submission's jobs
    usually share the unit)."""
    schedule = job.experiment.schedule
    return float(schedule.iterations or schedule.epochs or 0)


def _max_parallel(jobs: list[JobSpec]) -> Optional[int]:
    caps = [j.experiment.resources.local.max_parallel for j in jobs if j.experiment.resources.local.max_parallel]
    if any(cap < 1 for cap in caps):
        raise LaunchError(f"--max-parallel must be >= 1, got {min(caps)}")
    return min(caps) if caps else None


class LocalLauncher:
    """Backend ``local``: this node, GPU slices (CPU slots without a GPU), parallel jobs."""

    name: ClassVar[str] = "local"

    def plan(self, jobs: list[JobSpec]) -> Plan:
        """Pure: command lines, device counts and queue order of ``jobs``."""
        slots = []
        for job in jobs:
            res = job.experiment.resources
            if (res.nodes or 1) > 1:
                raise LaunchError(
                    f"job {job.name}: the local backend runs on this node only, but --nodes is {res.nodes}; "
                    "use --backend torchrun (with --hosts) or slurm"
                )
            if res.gpus < 1:
                raise LaunchError(f"job {job.name}: --gpus must be >= 1, got {res.gpus}")
            slots.append(res.gpus)
        order = queue_order(slots, [schedule_length(job) for job in jobs])
        cap = _max_parallel(jobs)
        entries, lines = [], [
            f"# orch local plan: {len(jobs)} job(s) on this node's device pool (GPUs, else CPU slots)",
            "# each job leases its devices for its whole life; jobs that do not fit wait in the queue",
            f"# queue order: widest first, then longest; smaller jobs backfill; at most {cap or 'unlimited'} at once",
        ]
        for position, index in enumerate(order, 1):
            job, world = jobs[index], slots[index]
            commands = []
            for rank in range(world):
                env = base_env(job)
                if world > 1:
                    dist = DistEnv(rank=rank, local_rank=rank, world_size=world, local_world_size=world,
                                   master_addr=LOOPBACK, master_port=1, source="torchrun").to_environ()
                    env.update(dist, MASTER_PORT="{port}")
                commands.append({"argv": worker_argv(job), "env": env, "procs": 1, "local": True})
            entries.append({"index": index, "slots": world, "commands": commands,
                            "port": {"mode": "lease" if world > 1 else "none"}})
            lines.append(f"job {position}: {job.name}  devices={world}  processes={world}  output={job.output_dir}")
            for command in commands:
                lines.append("  " + format_command(command["argv"], command["env"]))
        if any(s > 1 for s in slots):
            lines.append("# {port}: leased at launch (bind-checked, one per job); a MASTER_PORT you export wins")
        local = jobs[0].experiment.resources.local if jobs else None
        payload = {"max_parallel": cap, "queue": all(j.experiment.resources.local.queue for j in jobs),
                   "cpu_slots": local.cpu_slots if local else None, "jobs": entries}
        return Plan(backend=self.name, jobs=tuple(jobs), text="\n".join(lines) + "\n", payload=payload)

    def preflight(self, plan: Plan) -> None:
        """Fail before anything is written when a job can never fit on this node (or, with
        ``--no-wait``, cannot start now)."""
        _check_capacity(plan)

    def submit(self, plan: Plan) -> list[LocalHandle]:
        """Write the records and start the detached supervisor; returns one handle per job
        (in the order of ``plan.jobs``) without waiting."""
        return start_supervisor(plan)


def _check_capacity(plan: Plan) -> None:
    """Fail at once when a job can never fit, or (``--no-wait``) cannot start right now."""
    payload = plan.payload
    needs = [e["slots"] for e in payload["jobs"] if e["slots"]]
    if not needs:
        return
    pool = detect_pool(cpu_slots=payload.get("cpu_slots"))
    for entry in payload["jobs"]:
        if entry["slots"] > pool.size:
            name = plan.jobs[entry["index"]].name
            raise ClusterError(
                f"job {name} asks for {entry['slots']} {pool.unit}s but this node has {pool.size}; "
                "lower --gpus, or use --backend torchrun/slurm for more"
            )
    if not payload.get("queue", True):
        busy = {d for lease in list_device_leases(pool.kind) for d in lease["devices"]}
        free = len([d for d in pool.ids if d not in busy])
        first = needs[: payload.get("max_parallel") or len(needs)]
        if sum(first) > free:
            raise ClusterError(
                f"--no-wait: {sum(first)} {pool.unit}(s) needed now but {free} of {pool.size} are free; "
                "drop --no-wait to queue, or lower --gpus / --max-parallel"
            )


def start_supervisor(plan: Plan) -> list[LocalHandle]:
    """Shared by the local and torchrun backends: records, payload file, detached supervisor."""
    if not plan.jobs:
        return []
    _check_capacity(plan)
    ids: dict[int, str] = {}
    entries = []
    for entry in plan.payload["jobs"]:
        job = plan.jobs[entry["index"]]
        job_id = new_job_id(job.name)
        ids[entry["index"]] = job_id
        tracking = job.experiment.tracking
        save_record(JobRecord(
            job_id=job_id, name=job.name, backend=plan.backend, state=JobState.PENDING,
            output_dir=str(job.output_dir), config_path=str(job.config_path), log_path=str(log_path(job_id)),
            submitted_at=time.time(), mlflow_run_id=tracking.run_id if tracking.enable else None,
            tracking_uri=tracking.uri if tracking.enable else None,
            extra={"slots": entry["slots"], "world_size": job.experiment.resources.gpus},
        ))
        log_path(job_id).touch()
        entries.append(dict(entry, job_id=job_id))
    first = job_dir(ids[plan.payload["jobs"][0]["index"]])
    payload_path = first / "supervisor.json"
    write_json_atomic(payload_path, dict(plan.payload, jobs=entries))
    with open(first / "supervisor.log", "ab") as out:
        # Own session: the supervisor survives the shell (no SIGHUP) and Ctrl-C of `orch submit`.
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.supervisor", str(payload_path)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env=dict(os.environ))
    me = owner_identity(proc.pid)
    for job_id in ids.values():
        update_record(job_id, lambda r: (setattr(r, "pid", me["pid"]),
                                         r.extra.update(pid_start=me["start"], supervisor_log=str(first / "supervisor.log"))))
    return [LocalHandle(ids[i]) for i in range(len(plan.jobs))]
