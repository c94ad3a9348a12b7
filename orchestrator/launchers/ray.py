"""The Ray backend: one Ray Train ``TorchTrainer`` run per job, on an existing Ray cluster
(``resources.ray.address``) or on a private local one that lives as long as the job.

``plan`` is pure and its text is the job as Ray will see it. ``submit`` returns at once: each job
is driven by a detached ``python -m orchestrator.launchers.ray_driver JOB.json`` process (it
connects to Ray, runs ``TorchTrainer.fit`` and records the outcome in the job's record), so
``orch status`` / ``orch cancel`` work from any shell through :func:`refresh_record` and
:func:`cancel_record`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Optional

from cluster.errors import ConfigError, LaunchError
from orchestrator.jobs import JobHandle
from orchestrator.spec import JobRecord, JobSpec, JobState, Plan

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


def job_payload(job: JobSpec) -> dict[str, Any]:
    """What the driver needs to run ``job`` (JSON-able). Raises ConfigError on bad options."""
    exp = job.experiment
    res, opts = exp.resources, exp.resources.ray
    if res.gpus < 1:
        raise ConfigError(f"resources.gpus={res.gpus}: a Ray job needs at least 1 worker; set --gpus N")
    if opts.cpus_per_worker <= 0:
        raise ConfigError(f"resources.ray.cpus_per_worker={opts.cpus_per_worker} must be > 0")
    if opts.max_failures < -1:
        raise ConfigError(f"resources.ray.max_failures={opts.max_failures}: use -1 (retry forever), 0 or more")
    nodes = res.nodes or 1
    if nodes > 1 and not opts.storage_path:
        raise ConfigError(
            f"resources.nodes={nodes}: a multi-node Ray run needs shared storage for checkpoints; "
            "set resources.ray.storage_path to an NFS folder or an object store URI (s3://, gs://)"
        )
    if opts.gpus_per_worker is not None:
        gpu_mode = "yes" if opts.gpus_per_worker > 0 else "no"
    else:
        # "auto": decided by the driver from the cluster's resources (GPUs present or not).
        gpu_mode = "no" if exp.runtime.device == "cpu" else ("yes" if exp.runtime.device == "cuda" else "auto")
    return {
        "name": job.name,
        "config_path": str(job.config_path),
        "output_dir": str(job.output_dir),
        "address": opts.address,
        "num_workers": res.gpus,
        "use_gpu": gpu_mode,
        "cpus_per_worker": opts.cpus_per_worker,
        "gpus_per_worker": opts.gpus_per_worker if opts.gpus_per_worker is not None else 1,
        "storage_path": opts.storage_path or str(Path(job.output_dir) / "ray"),
        "max_failures": opts.max_failures,
        "keep_checkpoints": max(1, exp.checkpoint.max_keep or 1),
        "mlflow_run_id": exp.tracking.run_id,
        "tracking_uri": exp.tracking.uri,
        "env": dict(job.extra_env, ORCH_BACKEND="ray"),
    }


def describe(payload: dict[str, Any]) -> str:
    """Readable description of one Ray job (the dry-run text)."""
    per_worker = f"CPU {payload['cpus_per_worker']:g}"
    gpu = payload["use_gpu"]
    if gpu == "yes":
        per_worker += f", GPU {payload['gpus_per_worker']:g}"
    elif gpu == "auto":
        per_worker += f", GPU {payload['gpus_per_worker']:g} if the cluster has GPUs (runtime.device=auto)"
    address = payload["address"] or "none: a private Ray head on 127.0.0.1 is started for the job and stopped after it"
    failures = payload["max_failures"]
    lines = [
        f"ray job {payload['name']}",
        f"  cluster address:      {address}",
        "  trainer:              ray.train.torch.TorchTrainer (Train V2), process group by Ray "
        f"({'nccl' if gpu == 'yes' else 'gloo' if gpu == 'no' else 'nccl on GPUs, else gloo'})",
        f"  workers:              {payload['num_workers']} (ScalingConfig num_workers)",
        f"  resources per worker: {per_worker}",
        f"  storage path:         {payload['storage_path']}",
        f"  run name:             {payload['name']}-<job id> (set at submission)",
        f"  failure config:       max_failures={failures} "
        f"({'retry forever' if failures == -1 else 'no restart' if failures == 0 else f'restart up to {failures} times'}"
        ", from the last reported checkpoint)",
        f"  checkpoints kept:     {payload['keep_checkpoints']}",
        f"  each worker runs:     detection.train.main(<{payload['config_path']}>, DistEnv from the Ray context, "
        "hooks=[RayReportHook])",
        f"  MLflow run:           {payload['mlflow_run_id'] or '(created at submission)'}",
    ]
    return "\n".join(lines)


class RayLauncher:
    """Backend ``ray``: Ray Train on a Ray cluster (see the module docstring)."""

    name: ClassVar[str] = "ray"

    def plan(self, jobs: list[JobSpec]) -> Plan:
        """Describe the Ray jobs; pure (no processes, no network, no writes)."""
        payloads = [job_payload(job) for job in jobs]
        text = "\n\n".join(describe(p) for p in payloads) + "\n"
        return Plan(backend=self.name, jobs=tuple(jobs), text=text, payload={"jobs": payloads})

    def preflight(self, plan: Plan) -> None:
        """Fail before any record or MLflow run exists when the named cluster does not answer
        (otherwise the detached driver would retry for minutes behind a successful submit)."""
        for address in dict.fromkeys(p["address"] for p in plan.payload["jobs"] if p["address"]):
            if address == "auto":
                found = resolve_auto()
                if not found:
                    raise LaunchError("resources.ray.address=auto but no Ray cluster runs here (no RAY_ADDRESS, no "
                                      f"{ray_temp_dir()}/ray_current_cluster); start one with `ray start --head`, or "
                                      "leave resources.ray.address empty for a private local Ray")
                address = found
            check_address(address)

    def submit(self, plan: Plan) -> list["RayHandle"]:
        """Start one detached driver per job; returns at once with one handle per job."""
        from orchestrator import jobs as records

        self.preflight(plan)  # callers that skip orchestrator.submit (k-fold) still get the check
        handles = []
        for job, payload in zip(plan.jobs, plan.payload["jobs"]):
            job_id = records.new_job_id(job.name)
            payload = dict(payload, job_id=job_id, run_name=job_id, cwd=os.getcwd())
            folder = records.job_dir(job_id)
            payload_path = folder / "ray_job.json"
            payload_path.write_text(json.dumps(payload, indent=1))
            log_file = records.log_path(job_id)
            record = JobRecord(
                job_id=job_id, name=job.name, backend=self.name, state=JobState.PENDING,
                output_dir=str(job.output_dir), config_path=str(job.config_path), log_path=str(log_file),
                submitted_at=time.time(), native_id=job_id, mlflow_run_id=payload["mlflow_run_id"],
                tracking_uri=payload["tracking_uri"], extra={"kind": "train", "address": payload["address"]},
            )
            records.save_record(record)
            start_detached([sys.executable, "-m", "orchestrator.launchers.ray_driver", str(payload_path)], job_id)
            handles.append(RayHandle(job_id))
        return handles


def start_detached(argv: list[str], job_id: str, env: Optional[dict[str, str]] = None) -> int:
    """Start ``argv`` in its own session (it outlives this shell), output appended to the job's
    log; record its pid and process group. Returns the pid."""
    from cluster.lease import owner_identity
    from orchestrator import jobs as records

    with open(records.log_path(job_id), "ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env or dict(os.environ), cwd=os.getcwd(),
        )
    start = owner_identity(process.pid)["start"]

    def mark(r: JobRecord) -> None:
        r.pid = process.pid
        r.extra.update(pgid=process.pid, pid_start=start)

    records.update_record(job_id, mark)
    return process.pid


class RayHandle(JobHandle):
    """A submitted Ray job (or sweep), seen through its orch record."""

    poll_s = 1.0


def refresh_record(record: JobRecord) -> JobRecord:
    """The record as the driver left it; a driver that died without recording an end (killed,
    machine rebooted) makes the job FAILED."""
    from cluster.lease import is_alive
    from orchestrator import jobs as records

    if record.state.finished or not record.pid:
        return record
    if is_alive(record.pid, record.extra.get("pid_start")):
        return record

    def mark(r: JobRecord) -> None:
        if not r.state.finished:
            r.state = JobState.FAILED
            r.ended_at = r.ended_at or time.time()
            r.error = r.error or f"the Ray driver (pid {r.pid}) ended without recording an exit status; see {r.log_path}"

    return records.update_record(record.job_id, mark)


def cancel_record(record: JobRecord) -> JobRecord:
    """SIGTERM the driver's process group: the driver stops the Ray run (and its private Ray
    head), marks the MLflow run KILLED and records CANCELLED. SIGKILL after a grace period."""
    from cluster.lease import is_alive

    pgid = record.extra.get("pgid")
    if not pgid:
        return record
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return record
    deadline = time.monotonic() + CANCEL_GRACE_S
    while time.monotonic() < deadline:
        if not is_alive(record.pid, record.extra.get("pid_start")):
            return record
        time.sleep(0.2)
    # The driver did not stop in time: kill it, and the private Ray head it started (that head
    # runs in its own process group).
    for group in (pgid, record.extra.get("ray_head_pid")):
        if group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
    return record


def describe_record(record: JobRecord) -> str:
    """Extra lines for ``orch status JOB`` of a Ray job: for a sweep, its trials (status,
    evaluations, metric, params) and the best trial so far."""
    if record.extra.get("kind") != "sweep":
        return f"  ray address: {record.extra.get('ray_address') or record.extra.get('address') or '-'}"
    metric = record.extra.get("metric", "metric")
    trials = record.extra.get("trials") or {}
    lines = [f"  trials ({len(trials)}), objective {record.extra.get('mode', '')} {metric}:"]
    for trial_id, t in sorted(trials.items()):
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.get("params", {}).items())
        value = t.get(metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
        lines.append(f"    {trial_id:<14} {t.get('status', '?'):<11} evals {t.get('evaluations', 0):<3} "
                     f"{metric} {shown:<8} {params}")
    best = record.extra.get("best")
    if best:
        lines.append(f"  best: trial {best['trial_id']} {metric}={best['value']:.4f} (MLflow run {best['run_id']})")
    return "\n".join(lines)
