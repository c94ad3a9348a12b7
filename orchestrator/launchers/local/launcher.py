"""The local backend: jobs on this node, each on its own GPU slice (or CPU slots), in parallel.

``plan`` is pure: it writes down each job's worker command lines, how many devices it leases and
the queue order (largest first, so that smaller jobs backfill the gaps). ``submit`` writes one
job record per job and starts one detached supervisor (:mod:`.supervisor`) for the whole
submission, then returns at once; the supervisor leases devices and ports, runs the workers and
records how each job ended. A job of world size N runs N worker processes with the torch
``env://`` variables set and ``MASTER_PORT`` from a bind-checked port lease.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import ClassVar, Optional, Sequence

from cluster.env import LOOPBACK, DistEnv
from cluster.errors import ClusterError, LaunchError
from cluster.files import write_json_atomic
from cluster.gpus import DevicePool, detect_pool, list_device_leases
from cluster.process import group_alive, signal_group, start_detached, stop_group
from orchestrator import records
from orchestrator.launchers.base import Launcher, Status, owners_gone
from orchestrator.launchers.local.plan import (
    NodeCommand,
    NodeJob,
    NodePlan,
    NodeRequest,
    PortRule,
    base_env,
    format_command,
    worker_argv,
)
from orchestrator.spec import JobRecord, JobSpec


def queue_order(slots: list[int], work: list[float]) -> list[int]:
    """Indices of the jobs, widest first, then longest first (stable): with backfill this keeps
    the makespan within a few percent of total device time / pool size (bench/bench_makespan.py)."""
    return sorted(range(len(slots)), key=lambda i: (-slots[i], -work[i]))


def schedule_length(job: JobSpec) -> float:
    """A job's length for ordering: its iterations, else its epochs (one submission's jobs
    usually share the unit)."""
    schedule = job.experiment.schedule
    return float(schedule.iterations or schedule.epochs or 0)


def max_parallel(jobs: Sequence[JobSpec]) -> Optional[int]:
    """The smallest ``resources.local.max_parallel`` of ``jobs`` (None: no cap)."""
    caps = [j.experiment.resources.local.max_parallel for j in jobs if j.experiment.resources.local.max_parallel]
    if any(cap < 1 for cap in caps):
        raise LaunchError(f"--max-parallel must be >= 1, got {min(caps)}")
    return min(caps) if caps else None


def node_request(jobs: Sequence[JobSpec], entries: list[NodeJob], cap: Optional[int]) -> NodeRequest:
    """The supervisor's request for ``entries`` (already in queue order)."""
    return NodeRequest(jobs=tuple(entries), max_parallel=cap,
                       cpu_slots=jobs[0].experiment.resources.local.cpu_slots if jobs else None,
                       queue=all(j.experiment.resources.local.queue for j in jobs))


class LocalLauncher(Launcher):
    """Backend ``local``: this node, GPU slices (CPU slots without a GPU), parallel jobs."""

    name: ClassVar[str] = "local"
    poll_s: ClassVar[float] = 0.2

    def plan(self, jobs: Sequence[JobSpec]) -> NodePlan:
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
        cap = max_parallel(jobs)
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
                commands.append(NodeCommand(argv=tuple(worker_argv(job)), env=env))
            entries.append(NodeJob(index=index, name=job.name, slots=world, commands=tuple(commands),
                                   port=PortRule("lease" if world > 1 else "none")))
            lines.append(f"job {position}: {job.name}  devices={world}  processes={world}  output={job.output_dir}")
            lines.extend("  " + format_command(c.argv, c.env) for c in commands)
        if any(s > 1 for s in slots):
            lines.append("# {port}: leased at launch (bind-checked, one per job); a MASTER_PORT you export wins")
        return NodePlan(self.name, tuple(jobs), node_request(jobs, entries, cap), tuple(lines))

    def preflight(self, plan: NodePlan, wait_s: float = 0.0) -> None:
        """Fail before anything is written when a job can never fit on this node (or, with
        ``--no-wait``, cannot start now). ``wait_s`` changes nothing: this node never grows, and
        a job that fits but finds its devices busy waits in the queue anyway."""
        request = plan.request
        needs = [j.slots for j in request.jobs if j.slots]
        if not needs:
            return
        pool = detect_pool(cpu_slots=request.cpu_slots)
        for job in request.jobs:
            if job.slots > pool.size:
                raise ClusterError(too_big(job.name, job.slots, pool, request.cpu_slots))
        if not request.queue:
            busy = {d for lease in list_device_leases(pool.kind) for d in lease["devices"]}
            free = len([d for d in pool.ids if d not in busy])
            first = needs[: request.max_parallel or len(needs)]
            if sum(first) > free:
                raise ClusterError(
                    f"--no-wait: {sum(first)} {pool.unit}(s) needed now but {free} of {pool.size} are free; "
                    "drop --no-wait to queue, or lower --gpus / --max-parallel"
                )

    def submit(self, plan: NodePlan) -> list[str]:
        """Write the records and start one detached supervisor for the plan; returns one job id
        per job (in the order of ``plan.jobs``) without waiting."""
        if not plan.jobs:
            return []
        ids: dict[int, str] = {}
        entries = []
        for entry in plan.request.jobs:
            job = plan.jobs[entry.index]
            tracking = job.experiment.tracking
            record = records.create_record(
                name=job.name, backend=plan.backend, output_dir=str(job.output_dir), config_path=str(job.config_path),
                tracking_uri=tracking.uri if tracking.enable else None,
                extra={"slots": entry.slots, "world_size": job.experiment.resources.gpus})
            ids[entry.index] = record.job_id
            entries.append(dataclasses.replace(entry, job_id=record.job_id))
        first = records.job_dir(ids[plan.request.jobs[0].index])
        payload_path = first / "supervisor.json"
        write_json_atomic(payload_path, dataclasses.replace(plan.request, jobs=tuple(entries)).to_json())
        supervisor_log = str(first / "supervisor.log")
        supervisor = start_detached([sys.executable, "-m", "orchestrator.launchers.local.supervisor",
                                     str(payload_path)], supervisor_log)
        for job_id in ids.values():
            records.annotate(job_id, pid=supervisor["pid"],
                             extra={"pid_start": supervisor["start"], "supervisor_log": supervisor_log})
        return [ids[i] for i in range(len(plan.jobs))]

    def status(self, records: Sequence[JobRecord]) -> dict[str, Status]:
        """The supervisor records every change itself; this only notices a supervisor that died
        without recording an end: FAILED."""
        return owners_gone(records, "orch supervisor")

    def release(self, record: JobRecord) -> None:
        """Whatever of the job's processes is left is killed (they die with the supervisor; this
        also covers their own children), so that its devices and port, freed with the
        supervisor, are never used twice."""
        pgid = record.extra.get("pgid")
        if pgid and group_alive(pgid):
            signal_group(pgid, signal.SIGKILL)

    def cancel(self, record: JobRecord) -> None:
        """The cancel marker keeps a queued job from starting (and tells the supervisor to record
        CANCELLED); a running job's process group gets SIGTERM, then SIGKILL after a grace (also
        the leftovers of a job already recorded as ended)."""
        (records.job_dir(record.job_id) / "cancel").touch()
        pgid = records.load_record(record.job_id).extra.get("pgid")
        if pgid:
            stop_group(pgid)

    def describe(self, record: JobRecord) -> list[tuple[str, str]]:
        rows = []
        if record.extra.get("devices"):
            rows.append(("devices", ",".join(record.extra["devices"])))
        if record.extra.get("port"):
            rows.append(("port", str(record.extra["port"])))
        if record.extra.get("waiting") and not record.state.finished and not record.started_at:
            rows.append(("queue", record.extra["waiting"]))
        return rows


def too_big(name: str, slots: int, pool: DevicePool, cpu_slots: Optional[int] = None) -> str:
    """The refusal of a job wider than this node: what it asks, what the node has (and where
    that number comes from), which flag to change."""
    if pool.kind == "gpu":
        have = f"{pool.size} (GPUs {','.join(pool.ids)}; CUDA_VISIBLE_DEVICES limits them)"
    elif os.environ.get("ORCH_CPU_SLOTS", "").strip():
        have = f"{pool.size} (no GPU; ORCH_CPU_SLOTS={os.environ['ORCH_CPU_SLOTS'].strip()})"
    elif cpu_slots is not None:
        have = f"{pool.size} (no GPU; resources.local.cpu_slots={cpu_slots})"
    else:
        have = (f"{pool.size} (no GPU: one slot per CPU core; resources.local.cpu_slots or ORCH_CPU_SLOTS "
                "set another number)")
    return (f"job {name} asks for {slots} {pool.unit}s but this node has {have}; lower --gpus to {pool.size} "
            "or less, or use --backend torchrun/slurm/ray for more nodes")


def cancel_requested(job_id: str) -> bool:
    """Whether ``orch cancel`` was run on the job."""
    return (records.job_dir(job_id) / "cancel").exists()
