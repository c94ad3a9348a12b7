"""The Ray backend: one Ray Train ``TorchTrainer`` run per job, on an existing Ray cluster
(``resources.ray.address``) or on a private local one that lives as long as the job.

``plan`` is pure and its text is the job as Ray will see it (:class:`RayPlan` of
:class:`~.request.RayJobRequest`). ``submit`` returns at once: each job is driven by a detached
``python -m orchestrator.launchers.ray.driver JOB.json`` process (it connects to Ray, runs
``TorchTrainer.fit`` and records the outcome), so ``orch status`` / ``orch cancel`` work from any
shell. Sweeps (``orch sweep``) are Ray jobs too: their records have ``extra.kind == "sweep"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

from cluster.errors import LaunchError
from cluster.files import write_json_atomic
from cluster.process import signal_group, start_detached, stop_group
from orchestrator import records
from orchestrator.launchers.base import Launcher, Status, owners_gone, Plan
from orchestrator.launchers.ray.request import RayJobRequest
from orchestrator.spec import JobRecord, JobSpec

if TYPE_CHECKING:
    from orchestrator.launchers.ray.capacity import RayAsk

CANCEL_GRACE_S = 30.0
CONNECT_TIMEOUT_S = 3.0


def ray_temp_dir() -> str:
    """Ray's default temp folder, found the way Ray finds it (RAY_TMPDIR, TMPDIR, /tmp) + ``/ray``."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, "ray")


def resolve_auto() -> Optional[str]:
    """The cluster ``auto`` means, as Ray resolves it without importing Ray: RAY_ADDRESS, else the
    address the last ``ray start`` on this machine wrote to ``<temp>/ray_current_cluster``."""
    env = os.environ.get("RAY_ADDRESS")
    if env and env != "auto":
        return env
    with contextlib.suppress(OSError):
        return Path(ray_temp_dir(), "ray_current_cluster").read_text().strip() or None
    return None


def check_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """LaunchError unless something accepts a TCP connection at ``address`` (``HOST:PORT`` or
    ``ray://HOST:PORT``); other schemes are left to Ray."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    if "://" in target:
        return
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise LaunchError(f"resources.ray.address={address!r} is not HOST:PORT; give e.g. 10.0.0.5:6379, "
                          "ray://HOST:10001 or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError:
        raise LaunchError(f"no Ray cluster answers at {target} (start one with `ray start --head`, or leave "
                          "resources.ray.address empty for a private local Ray)") from None


@dataclass(frozen=True)
class RayPlan(Plan):
    """One :class:`RayJobRequest` per job."""

    requests: tuple[RayJobRequest, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(r.describe() for r in self.requests) + "\n"


def start_driver(argv: list[str], job_id: str) -> None:
    """Start a detached driver process (a Ray job's or a sweep's) writing to the job's log, and
    record its pid and process group on the job."""
    driver = start_detached(argv, str(records.log_path(job_id)))
    records.annotate(job_id, pid=driver["pid"], extra={"pgid": driver["pid"], "pid_start": driver["start"]})


def check_addresses(addresses: Sequence[Optional[str]]) -> dict[Optional[str], Optional[str]]:
    """LaunchError unless every named cluster answers (``auto`` resolved as Ray would). Returns
    each address as given -> the address it resolved to (None: a private head)."""
    resolved: dict[Optional[str], Optional[str]] = {}
    for address in dict.fromkeys(addresses):
        if not address:
            resolved[address] = None
            continue
        target = address
        if address == "auto":
            target = resolve_auto()
            if not target:
                raise LaunchError("resources.ray.address=auto but no Ray cluster runs here (no RAY_ADDRESS, no "
                                  f"{ray_temp_dir()}/ray_current_cluster); start one with `ray start --head`, or "
                                  "leave resources.ray.address empty for a private local Ray")
        check_address(target)
        resolved[address] = target
    return resolved


def job_ask(request: RayJobRequest) -> "RayAsk":
    """What one Ray job asks of its cluster: ``num_workers`` x (CPUs, GPUs per worker)."""
    from orchestrator.launchers.ray.capacity import RayAsk

    return RayAsk(
        label=f"job {request.name}", workers=int(request.num_workers), use_gpu=request.use_gpu,
        per_worker={"CPU": float(request.cpus_per_worker), "GPU": float(request.gpus_per_worker)},
        hints={"CPU": "lower --gpus (the number of workers) or resources.ray.cpus_per_worker, or use a bigger "
                      "cluster (--address)",
               "GPU": "lower --gpus (the number of workers) or resources.ray.gpus_per_worker, or use a cluster with "
                      "more GPUs (--address); runtime.device=auto (gpus_per_worker unset) trains on CPU where a "
                      "cluster has no GPU"})


class RayLauncher(Launcher):
    """Backend ``ray``: Ray Train on a Ray cluster (see the module docstring)."""

    name: ClassVar[str] = "ray"
    poll_s: ClassVar[float] = 1.0

    def plan(self, jobs: Sequence[JobSpec]) -> RayPlan:
        """Describe the Ray jobs; pure (no processes, no network, no writes)."""
        return RayPlan(self.name, tuple(jobs), tuple(RayJobRequest.for_job(job) for job in jobs))

    def preflight(self, plan: RayPlan, wait_s: float = 0.0) -> None:
        """Fail before any record or MLflow run exists when the named cluster does not answer
        (otherwise the detached driver would retry for minutes behind a successful submit), or
        when a job asks more than the cluster can ever give (Ray would keep it PENDING forever).
        ``wait_s``: poll a named cluster that long for it to grow first."""
        resolved = check_addresses([r.address for r in plan.requests])
        by_cluster: dict[Optional[str], list] = {}
        for request in plan.requests:
            by_cluster.setdefault(resolved[request.address], []).append(job_ask(request))
        from orchestrator.launchers.ray.capacity import require_capacity

        for address, asks in by_cluster.items():
            require_capacity(address, asks, wait_s)

    def submit(self, plan: RayPlan) -> list[str]:
        """Start one detached driver per job; returns at once with one job id per job."""
        job_ids = []
        for job, request in zip(plan.jobs, plan.requests):
            job_id = records.new_job_id(job.name)
            request = dataclasses.replace(request, job_id=job_id, run_name=job_id, cwd=os.getcwd())
            request_path = records.job_dir(job_id) / "ray_job.json"
            write_json_atomic(request_path, request.to_json())
            records.create_record(
                job_id=job_id, name=job.name, backend=self.name, output_dir=str(job.output_dir),
                config_path=str(job.config_path), native_id=job_id,
                tracking_uri=request.tracking_uri, extra={"kind": "train", "address": request.address})
            start_driver([sys.executable, "-m", "orchestrator.launchers.ray.driver", str(request_path)], job_id)
            job_ids.append(job_id)
        return job_ids

    def status(self, records: Sequence[JobRecord]) -> dict[str, Status]:
        """The driver records every change itself; a driver that died without recording an end
        (killed, machine rebooted) makes the job FAILED (pid checks: no Ray call)."""
        return owners_gone(records, "Ray driver")

    def cancel(self, record: JobRecord) -> None:
        """SIGTERM the driver's process group: the driver stops the Ray run (and its private Ray
        head) and records CANCELLED. SIGKILL after a grace period, the private head too."""
        pgid = record.extra.get("pgid")
        if not pgid or stop_group(pgid, grace_s=CANCEL_GRACE_S, poll_s=0.2):
            return
        # The driver did not stop in time (stop_group killed it): kill the private Ray head it
        # started too (that head runs in its own process group).
        head = records.load_record(record.job_id).extra.get("ray_head_pid")
        if head:
            signal_group(head, signal.SIGKILL)

    def describe(self, record: JobRecord) -> list[tuple[str, str]]:
        """The Ray address; for a sweep, its trials and the best trial so far."""
        if record.extra.get("kind") != "sweep":
            return [("ray address", record.extra.get("ray_address") or record.extra.get("address") or "-")]
        from orchestrator.sweep.report import trial_table

        return [("trials", "\n" + trial_table(record))]
