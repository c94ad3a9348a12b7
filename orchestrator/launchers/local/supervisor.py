"""The detached process that runs the jobs of one local or torchrun submission.

``python -m orchestrator.launchers.local.supervisor REQUEST.json`` is started by
``LocalLauncher.submit`` in its own session, so it outlives the submitting shell. It reads the
typed :class:`~orchestrator.launchers.local.plan.NodeRequest`. For each job, in queue order, it
waits for a device lease (GPU slice or CPU slots) while keeping at most ``max_parallel`` jobs past
the queue, leases the rendezvous port, starts the job's processes in one process group with their
output appended to the job's log, and records RUNNING, then SUCCEEDED / FAILED / CANCELLED with
the exit status (:func:`orchestrator.records.transition`), and frees the leases.

``{port}`` in a command's argv or env is replaced by the job's port. Local commands get a
disjoint share of the leased devices (``procs`` each) and their thread share.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from cluster.errors import ClusterError, OrchError
from cluster.gpus import DeviceLease, DeviceRequest, detect_pool
from cluster.lease import owner_identity
from cluster.logs import setup_logging
from cluster.ports import lease_port
from cluster.process import signal_group
from orchestrator.launchers.local.launcher import cancel_requested
from orchestrator.launchers.local.plan import NodeJob, NodeRequest
from orchestrator.launchers.local.reasons import failure_reason
from orchestrator.records import annotate, append_to_log, load_record, log_path, transition
from orchestrator.spec import JobState
from orchestrator.watchdog import HangSettings, Watchdog, write_report

POLL_S = 0.05
WATCH_POLL_S = 0.25  # how often a running job checks for `orch cancel`
QUEUE_POLL_S = 0.5  # other orch processes' releases are seen by polling; our own wake us at once
_released = threading.Condition()
_releases = [0]  # bumped under _released at every release, so a wake-up between try and wait is not lost
TERM_GRACE_S = 10.0
HANG_POLL_S = 5.0  # how often a running job's heartbeats are read
HANG_RESTARTS = 3  # runtime.on_hang=requeue: restarts from the last checkpoint before the job fails
_stopping = threading.Event()


def main(argv: Optional[list[str]] = None) -> int:
    """Run every job of the payload file; returns 0 once all of them have ended."""
    args = sys.argv[1:] if argv is None else argv
    setup_logging()
    plan = NodeRequest.from_json(json.loads(Path(args[0]).read_text()))
    signal.signal(signal.SIGTERM, lambda *_: _stopping.set())
    this_process = owner_identity()
    for job in plan.jobs:
        annotate(job.job_id, pid=this_process["pid"], extra={"pid_start": this_process["start"]})
    gate = threading.BoundedSemaphore(max(1, plan.max_parallel or len(plan.jobs)))
    pool = None
    threads = []
    for job in plan.jobs:
        # max_parallel: the next job joins the device queue only when a running one ends.
        acquired = False
        while not acquired and not _stopping.is_set():
            acquired = gate.acquire(timeout=0.2)
        if _stopping.is_set() or cancel_requested(job.job_id):
            _finish(job.job_id, JobState.CANCELLED, None, None)
            if acquired:
                gate.release()
            continue
        try:
            pool = pool or detect_pool(cpu_slots=plan.cpu_slots)
            request = DeviceRequest(job.slots, pool, label=job.job_id) if job.slots else None
        except OrchError as err:
            _finish(job.job_id, JobState.FAILED, None, str(err))
            gate.release()
            continue
        thread = threading.Thread(target=_run_job, args=(job, request, gate), name=job.job_id)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return 0


def _run_job(job: NodeJob, request: Optional[DeviceRequest], gate: threading.BoundedSemaphore) -> None:
    job_id = job.job_id
    devices: Optional[DeviceLease] = None
    port_lease = None
    try:
        if request is not None:
            devices = _wait_for_devices(job_id, request)
            if devices is None:
                _finish(job_id, JobState.CANCELLED, None, None)
                return
        port, port_lease = _choose_port(job)
        if cancel_requested(job_id) or _stopping.is_set():
            _finish(job_id, JobState.CANCELLED, None, None)
            return
        procs = _start(job, devices, port)
        code, hang = _watch(job_id, procs, _watchdog(job_id, job))
        restarts = 0
        while hang is not None and _on_hang(job_id) == "requeue" and restarts < HANG_RESTARTS \
                and not (cancel_requested(job_id) or _stopping.is_set()):
            restarts += 1
            append_to_log(job_id, f"runtime.on_hang=requeue: restarting from the last checkpoint ({restarts}/{HANG_RESTARTS})")
            procs = _start(_resuming(job), devices, port)
            code, hang = _watch(job_id, procs, _watchdog(job_id, job))
        ended_at = time.time()
        # Free the slice before the bookkeeping, so that the next queued job starts at once.
        for lease in (port_lease, devices):
            if lease is not None:
                lease.release()
        _wake_waiters()
        if cancel_requested(job_id) or _stopping.is_set():
            _finish(job_id, JobState.CANCELLED, code, None, ended_at)
        elif code == 0 and hang is None:
            _finish(job_id, JobState.SUCCEEDED, 0, None, ended_at)
        elif hang is not None:
            _finish(job_id, JobState.FAILED, code, hang, ended_at)
        else:
            _finish(job_id, JobState.FAILED, code, _failure_reason(job_id, procs, code), ended_at)
    except Exception as err:  # anything here is orch's fault or the machine's: record it
        append_to_log(job_id, f"error: {err}")
        _finish(job_id, JobState.FAILED, None, f"{type(err).__name__}: {err}")
    finally:
        if request is not None:
            request.cancel()
        if port_lease is not None:
            port_lease.release()
        if devices is not None:
            devices.release()
        gate.release()
        _wake_waiters()


def _wake_waiters() -> None:
    """Tell this supervisor's queued jobs that devices (or a max_parallel place) were freed."""
    with _released:
        _releases[0] += 1
        _released.notify_all()


def _wait_for_devices(job_id: str, request: DeviceRequest) -> Optional[DeviceLease]:
    """Poll the queue; None when the job was cancelled while waiting."""
    told = False
    while True:
        with _released:
            seen = _releases[0]
        lease = request.try_acquire()
        if lease is not None:
            return lease
        if cancel_requested(job_id) or _stopping.is_set():
            return None
        if not told:
            message = request.status()
            append_to_log(job_id, message)
            annotate(job_id, extra={"waiting": message})
            told = True
        with _released:
            if _releases[0] == seen:
                _released.wait(QUEUE_POLL_S)


def _choose_port(job: NodeJob):
    """(port, lease or None) following the job's port rule."""
    rule = job.port
    if rule.mode == "none":
        return None, None
    if rule.mode == "fixed":
        return int(rule.port), None
    if rule.mode == "probe":  # a remote master: ask it for a bind-checked free port over ssh
        out = subprocess.run(list(rule.argv), capture_output=True, text=True, timeout=120)
        if out.returncode != 0 or not out.stdout.strip().isdigit():
            raise ClusterError(f"could not get a free port from {rule.host or 'the master'} ({' '.join(rule.argv[:5])}): "
                               f"{out.stderr.strip() or out.stdout.strip()}; set resources.torchrun.rdzv_port")
        return int(out.stdout.strip()), None
    lease = lease_port(label=job.job_id)
    return lease.port, lease


def _start(job: NodeJob, devices: Optional[DeviceLease], port: Optional[int]) -> list[subprocess.Popen]:
    """Start the job's commands in one new process group; record RUNNING."""
    job_id = job.job_id
    log = open(log_path(job_id), "ab")
    procs: list[subprocess.Popen] = []
    offset = 0
    try:
        for command in job.commands:
            env = dict(os.environ)
            if devices is not None and command.local:
                share = DeviceLease(devices.pool, devices.devices[offset: offset + command.procs], None)
                offset += command.procs
                # A thread count the user exported wins over the computed share.
                env.update({k: v for k, v in share.environ(command.procs).items()
                            if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") or k not in os.environ})
            env.update({k: _fill(v, port) for k, v in command.env.items()})
            # Through cluster.pdeath: the job's processes die with this supervisor (kill -9, OOM)
            # instead of running on after their leases were freed for the next job.
            argv = [sys.executable, "-m", "cluster.pdeath", str(os.getpid()), "--", *(_fill(a, port) for a in command.argv)]
            # One new process group per job (joinable only within our session, hence not setsid):
            # `orch cancel` signals the whole group.
            group = {"process_group": procs[0].pid if procs else 0}
            procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=command.cwd, **group))
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    finally:
        log.close()
    pgid = procs[0].pid

    transition(job_id, JobState.RUNNING, extra={"pgid": pgid, "devices": list(devices.devices) if devices else [],
                                                "port": port, "waiting": None, "pids": [p.pid for p in procs]})
    append_to_log(job_id, f"started {len(procs)} process(es) (pgid {pgid})"
         + (f" on {devices.pool.kind} {','.join(devices.devices)}" if devices else "")
         + (f", port {port}" if port else ""))
    return procs


def _fill(text: str, port: Optional[int]) -> str:
    return text.replace("{port}", str(port)) if port is not None else text


def _watchdog(job_id: str, job: NodeJob) -> Optional[Watchdog]:
    """The hang watchdog of one attempt of ``job`` (None when its record names no config)."""
    record = load_record(job_id)
    if not record.config_path or not os.path.exists(record.config_path):
        return None
    world = sum(c.procs for c in job.commands)
    return Watchdog(record.output_dir, HangSettings.of_config(record.config_path), world)


def _on_hang(job_id: str) -> str:
    return HangSettings.of_config(load_record(job_id).config_path).on_hang


def _resuming(job: NodeJob) -> NodeJob:
    """``job`` with every worker told to resume from its newest checkpoint."""
    commands = tuple(dataclasses.replace(c, argv=(*c.argv, "--set", "runtime.resume=auto")) for c in job.commands)
    return dataclasses.replace(job, commands=commands)


def _hung(job_id: str, procs: list[subprocess.Popen], watchdog: Watchdog) -> Optional[str]:
    """When the job hangs: dump every rank's stack, record the reason; returns it (None: no hang)."""
    stall = watchdog.check()
    if stall is None:
        return None
    pids = {i: p.pid for i, p in enumerate(procs)} if len(procs) == watchdog.world_size else {}
    report = write_report(watchdog.output_dir, stall, pids)
    append_to_log(job_id, f"{report.reason}; stacks in {report.folder}")
    annotate(job_id, extra={"hang": report.folder, "hang_reason": report.reason})
    return report.reason


def _watch(job_id: str, procs: list[subprocess.Popen],
           watchdog: Optional[Watchdog] = None) -> tuple[int, Optional[str]]:
    """Wait for every process; when one fails (or on cancel, or a hang the job's
    ``runtime.on_hang`` does not wait out) stop the others, as torchrun does, since the survivors
    would block in a collective. Returns the first non-zero status (else 0) and the hang reason."""
    first_bad: Optional[int] = None
    stopped_at: Optional[float] = None
    hang: Optional[str] = None
    next_check = time.monotonic() + HANG_POLL_S
    pgid = procs[0].pid
    exits: dict[int, dict] = {}  # process index -> how and when it ended (what `orch why` reads)
    while True:
        codes = [p.poll() for p in procs]
        for index, code in enumerate(codes):
            if code is not None and index not in exits:
                exits[index] = {"index": index, "pid": procs[index].pid, "code": code, "at": time.time(),
                                "stopped": stopped_at is not None}
            if code not in (None, 0) and first_bad is None:
                first_bad = code
        if all(c is not None for c in codes):
            break
        if watchdog is not None and hang is None and stopped_at is None and time.monotonic() >= next_check:
            next_check = time.monotonic() + HANG_POLL_S
            hang = _hung(job_id, procs, watchdog)
            if hang is not None and watchdog.settings.on_hang == "wait":
                hang = None  # reported once; the job keeps its devices until it ends or is cancelled
        stop = first_bad is not None or hang is not None or _stopping.is_set() or cancel_requested(job_id)
        if stop and stopped_at is None:
            stopped_at = time.monotonic()
            signal_group(pgid, signal.SIGTERM)
        if stopped_at is not None and time.monotonic() - stopped_at > TERM_GRACE_S:
            signal_group(pgid, signal.SIGKILL)
        _wait_any(procs, WATCH_POLL_S)
    # Leftovers (data-loader workers, grandchildren) must not outlive the job or its lease.
    signal_group(pgid, signal.SIGKILL)
    annotate(job_id, extra={"exits": sorted(exits.values(), key=lambda e: e["at"]), "host": socket.gethostname()})
    return (first_bad if first_bad is not None else 0), hang


def _wait_any(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Sleep until one of ``procs`` exits or ``timeout_s`` passes. With pidfds (Linux >= 5.3) the
    wake-up is immediate, which matters for back-to-back queued jobs (bench_makespan.py)."""
    fds = []
    try:
        for proc in procs:
            if proc.returncode is None:
                try:
                    fds.append(os.pidfd_open(proc.pid))
                except (AttributeError, OSError):
                    time.sleep(POLL_S)
                    return
        if fds:
            select.select(fds, [], [], timeout_s)
    finally:
        for fd in fds:
            os.close(fd)


def _failure_reason(job_id: str, procs: list[subprocess.Popen], code: int) -> str:
    """One line saying why the job failed (:func:`reasons.failure_reason` over the log's tail)."""
    first = next(((i, p.pid) for i, p in enumerate(procs) if p.returncode == code), None)
    try:
        with open(log_path(job_id), "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 65536))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        tail = ""
    return failure_reason(tail, code, first)


def _finish(job_id: str, state: JobState, code: Optional[int], error: Optional[str],
            ended_at: Optional[float] = None) -> None:
    """Record the end of a job. ``ended_at`` is when its processes ended (taken before its slice
    was handed on, so that records never show more jobs running than there are slots)."""
    record = transition(job_id, state, exit_code=code, error=error, ended_at=ended_at, extra={"waiting": None})
    append_to_log(job_id, f"{record.state.value.lower()}" + (f" (exit status {code})" if code is not None else ""))


if __name__ == "__main__":
    sys.exit(main())
