"""The detached driver of one Ray job: ``python -m orchestrator.launchers.ray.driver JOB.json``.

Started by :meth:`orchestrator.launchers.ray.RayLauncher.submit` with a typed
:class:`~orchestrator.launchers.ray.request.RayJobRequest`. It starts a private Ray head when the
job names no address, runs the ``TorchTrainer``, and records RUNNING then SUCCEEDED / FAILED /
CANCELLED in the job's record (the record store closes the MLflow run of a job that did not
succeed). SIGTERM (``orch cancel``) stops the run cleanly: the Ray head it started is stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from cluster.errors import OrchError
from cluster.logs import setup_logging
from orchestrator import records
from orchestrator.launchers.ray.request import RayJobRequest
from orchestrator.spec import JobState

log = logging.getLogger("orchestrator.ray")


class Cancelled(KeyboardInterrupt):
    """Raised in the driver by SIGTERM. A KeyboardInterrupt: nothing on the way may swallow it,
    and ``ray.get``'s signal check passes only those on (as a plain KeyboardInterrupt; it swallows
    any other exception of a signal handler, so a cancel would never reach the driver)."""


def _raise_cancelled(*_: Any) -> None:
    raise Cancelled()


_hang: list[str] = []  # the reason, set by the watchdog thread before it signals the main thread


def _raise_hung(*_: Any) -> None:
    # KeyboardInterrupt: the one exception ray.get's signal check passes on (it swallows others).
    raise KeyboardInterrupt(_hang[0] if _hang else "hang")


def start_watchdog(request: RayJobRequest) -> Optional[threading.Event]:
    """The hang watchdog of a Ray job: a driver thread reads the workers' heartbeats; on a hang
    it dumps every worker's stacks on its own node (a Ray task pinned there runs py-spy) and acts
    on ``runtime.on_hang``: ``fail`` ends the job (an interrupt in the main thread; the workers go
    with the driver), ``requeue`` kills the hung workers on their nodes so that Ray Train restarts
    them from the last checkpoint (``max_failures``), ``wait`` reports only. Returns the event
    that stops it."""
    from orchestrator.launchers.ray.nodes import dump_on_nodes, kill_on_nodes
    from orchestrator.watchdog import HangSettings, Watchdog, write_report

    if not request.output_dir or not request.config_path:
        return None
    settings = HangSettings.of_config(request.config_path)
    stop = threading.Event()
    main_thread = threading.main_thread().ident

    def watch() -> None:
        watchdog = Watchdog(request.output_dir, settings, int(request.num_workers))
        while not stop.wait(5.0):
            stall = watchdog.check()
            if stall is None:
                continue
            report = write_report(request.output_dir, stall, dump_remote=dump_on_nodes(request.output_dir, stall))
            log.error("%s; stacks in %s", report.reason, report.folder)
            if request.job_id:
                records.annotate(request.job_id, extra={"hang": report.folder, "hang_reason": report.reason})
            if settings.on_hang == "fail":
                _hang[:] = [report.reason]
                signal.pthread_kill(main_thread, signal.SIGUSR2)
                return
            if settings.on_hang == "wait":
                return
            # requeue: Ray Train restarts the killed workers
            kill_on_nodes({r: (b.pid, b.host) for r, b in (stall.progress.ranks.items() if stall.progress else ())})
            watchdog = Watchdog(request.output_dir, settings, int(request.num_workers))  # the next attempt

    threading.Thread(target=watch, name="hang-watchdog", daemon=True).start()
    return stop


def record_worker_failures(job_id: Optional[str], error: BaseException) -> None:
    """Record which ranks failed and how (``worker_failures``: rank, error line, whether its
    process died rather than raised), what ``orch why`` names the first failure from. Ray Train
    gives them per rank (``WorkerGroupError.worker_failures``); a process that died (kill -9, the
    OOM killer, a crash) shows as an actor death whose signal Ray does not know."""
    failures = getattr(error, "worker_failures", None) or {}
    if not job_id or not failures:
        return
    rows = []
    for rank, failure in sorted(failures.items()):
        text = str(failure).strip()
        died = type(failure).__name__ == "ActorDiedError" or "worker process has died" in text
        lines = text.splitlines() or [type(failure).__name__]
        rows.append({"rank": int(rank), "died": died, "error": (lines[0] if died else lines[-1])[:500]})
    records.annotate(job_id, extra={"worker_failures": rows})


def node_name(node: dict[str, Any]) -> str:
    """The host name of a ``ray.nodes()`` entry (its address when Ray has no name for it)."""
    return node.get("NodeManagerHostname") or node.get("NodeManagerAddress") or node.get("NodeID", "?")[:8]


def workers_that_fit(nodes: list[dict[str, Any]], request: RayJobRequest, use_gpu: bool) -> int:
    """How many of the job's workers the alive ``nodes`` hold at most (by their total resources)."""
    fit = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        have = node.get("Resources") or {}
        count = int(have.get("CPU", 0) // request.cpus_per_worker) if request.cpus_per_worker > 0 else 10**6
        if use_gpu and request.gpus_per_worker > 0:
            count = min(count, int(have.get("GPU", 0) // request.gpus_per_worker))
        fit += count
    return fit


def lost_host_verdict(before: list[dict[str, Any]], now: list[dict[str, Any]], request: RayJobRequest,
                      use_gpu: bool) -> tuple[list[str], Optional[str]]:
    """``(hosts lost, error)`` between two ``ray.nodes()`` answers: the hosts alive in ``before``
    and dead or gone in ``now``; ``error`` (one line naming them) when the hosts left cannot hold
    the job's fixed world size, or fewer than ``min_workers`` when it is elastic; None when Ray
    Train can restart the workers on the hosts left."""
    alive_now = {n["NodeID"] for n in now if n.get("Alive")}
    lost = sorted({node_name(n) for n in before if n.get("Alive") and n["NodeID"] not in alive_now})
    if not lost:
        return [], None
    fit = workers_that_fit(now, request, use_gpu)
    need = int(request.min_workers or request.num_workers)
    if fit >= need:
        return lost, None
    gone = ", ".join(lost)
    if request.min_workers:
        why = (f"the hosts left hold {fit} of the {need} workers resources.ray.min_workers asks for; "
               "lower it, or bring the host back and resubmit")
    else:
        why = (f"the hosts left hold {fit} of its {request.num_workers} workers and its world size is fixed; "
               f"set resources.ray.min_workers (e.g. {max(1, fit)}) to go on with fewer, or bring the host back "
               "and resubmit")
    return lost, f"orch: error: host {gone} was lost (Ray marked its node dead); {why}"


def start_node_watch(request: RayJobRequest, use_gpu: bool, interval_s: float = 1.0) -> threading.Event:
    """A driver thread that compares ``ray.nodes()`` every ``interval_s`` with the nodes at the
    start: a host lost is logged and recorded (``hosts_lost``); when the hosts left cannot hold
    the job (:func:`lost_host_verdict`) the job ends at once with one line naming the host,
    instead of Ray Train retrying a worker group that cannot be placed. Returns its stop event."""
    import ray

    stop = threading.Event()
    main_thread = threading.main_thread().ident
    before = ray.nodes()
    seen: set[str] = set()

    def watch() -> None:
        while not stop.wait(interval_s):
            try:
                now = ray.nodes()
            except Exception:  # noqa: BLE001 - the GCS busy or going: ask again
                continue
            lost, error = lost_host_verdict(before, now, request, use_gpu)
            if set(lost) - seen:
                seen.update(lost)
                log.warning("host %s lost (Ray marked its node dead)%s", ", ".join(lost),
                            "" if error else f"; Ray Train restarts the workers on the hosts left "
                                             f"(resources.ray.min_workers={request.min_workers})")
                if request.job_id:
                    records.annotate(request.job_id, extra={"hosts_lost": sorted(seen)})
            if error:
                _hang[:] = [error]
                signal.pthread_kill(main_thread, signal.SIGUSR2)
                return

    threading.Thread(target=watch, name="node-watch", daemon=True).start()
    return stop


def set_state(job_id: Optional[str], state: JobState, **fields: Any) -> None:
    """Record ``state`` (and record fields) for ``job_id``; no-op without a job id (a sweep's
    trial runs a trainer that is not a job of its own)."""
    if job_id:
        records.transition(job_id, state, **fields)


def build_trainer(request: RayJobRequest, use_gpu: bool, callbacks: Optional[list] = None):
    """The ``TorchTrainer`` of the job (Train V2 API); ``callbacks`` are Ray Train callbacks."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.launchers.ray.worker import train_loop

    resources = {"CPU": float(request.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(request.gpus_per_worker)
    return TorchTrainer(
        train_loop,
        train_loop_config={"config_path": request.config_path, "output_dir": request.output_dir, "cwd": request.cwd,
                           "run_name": request.run_name or request.name},
        scaling_config=ray.train.ScalingConfig(
            num_workers=request.scaling_workers(), use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=request.run_name or request.name,
            storage_path=request.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=int(request.max_failures)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=int(request.keep_checkpoints)),
            worker_runtime_env={"env_vars": dict(request.env)},
            callbacks=callbacks,
        ),
    )


def job_runtime_env() -> dict[str, Any]:
    """The job-level runtime environment of a Ray job or sweep: gloo's interface on every node
    (Ray runs a ``worker_process_setup_hook`` only from here), and the submitter's ``ORCH_HOME``
    (this driver's: ``orch submit`` started it), so that the workers register their journals with
    the shipper of the submitter's ``ORCH_HOME``, where its ``orch status`` looks. Without it a
    worker inherits the environment of whoever started the cluster. Ray merges these ``env_vars``
    into every worker's, Ray Train's and Tune's included."""
    return {"worker_process_setup_hook": "orchestrator.launchers.ray.cluster.set_socket_ifname",
            "env_vars": {"ORCH_HOME": str(records.orch_home().absolute())}}


@contextlib.contextmanager
def ray_connection(address: Optional[str], job_id: Optional[str] = None, num_cpus: Optional[float] = None):
    """Connect to ``address``, or start a private local head first (stopped on exit)."""
    from orchestrator.launchers.ray.cluster import LocalRay, prepare_client

    prepare_client(address)
    import ray
    head = None
    try:
        if not address:
            head = LocalRay(num_cpus=num_cpus)
            address = head.start()
            if job_id:
                records.annotate(job_id, extra={"ray_head_pid": head.process.pid, "ray_address": address})
            log.info("started a private Ray head at %s", address)
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
        ray.init(address=address, log_to_driver=True, runtime_env=job_runtime_env())
        # ray.init installs its C++ failure handler for SIGTERM, which dumps and dies: the driver's
        # own handler (cancel: end the trials' runs, stop the head) is put back.
        for sig, handler in handlers.items():
            if callable(handler) and threading.current_thread() is threading.main_thread():
                signal.signal(sig, handler)
        yield address
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if head is not None:
            head.stop()


def run_job(request: RayJobRequest) -> JobState:
    """Run one Ray job to its end; returns the final state (also recorded)."""
    job_id = request.job_id
    try:
        with ray_connection(request.address, job_id):
            import ray

            gpu = request.use_gpu
            use_gpu = gpu == "yes" or (gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
            set_state(job_id, JobState.RUNNING)
            stop_watchdog = start_watchdog(request)
            stop_node_watch = start_node_watch(request, use_gpu)
            try:
                result = build_trainer(request, use_gpu).fit()
            finally:
                stop_node_watch.set()
                if stop_watchdog is not None:
                    stop_watchdog.set()
            error = getattr(result, "error", None)
            if error is not None:
                record_worker_failures(job_id, error)
                raise RuntimeError(str(error).strip().splitlines()[-1] if str(error).strip() else repr(error))
    except KeyboardInterrupt:  # SIGTERM (orch cancel), Ctrl-C, the hang watchdog or a host lost
        if _hang:
            set_state(job_id, JobState.FAILED, error=_hang[0][:2000], exit_code=1)
            return JobState.FAILED
        set_state(job_id, JobState.CANCELLED)
        return JobState.CANCELLED
    except Exception as err:  # noqa: BLE001 - any failure ends as a FAILED record with its line
        log.error("Ray job failed: %s", err)
        record_worker_failures(job_id, err)  # Train V2's fit() raises its WorkerGroupError
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        set_state(job_id, JobState.FAILED, error=message[:500], exit_code=1)
        return JobState.FAILED
    set_state(job_id, JobState.SUCCEEDED, exit_code=0)
    return JobState.SUCCEEDED


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; exit code 0 when the job succeeded, 1 otherwise."""
    args = sys.argv[1:] if argv is None else argv
    setup_logging()
    signal.signal(signal.SIGTERM, _raise_cancelled)
    signal.signal(signal.SIGUSR2, _raise_hung)
    try:
        request = RayJobRequest.from_json(json.loads(Path(args[0]).read_text()))
    except (IndexError, OSError, ValueError, TypeError) as err:
        print(f"orch ray driver: error: cannot read the job file: {err}", file=sys.stderr)
        return 2
    try:
        state = run_job(request)
    except OrchError as err:
        print(f"orch ray driver: error: {err}", file=sys.stderr)
        set_state(request.job_id, JobState.FAILED, error=str(err), exit_code=err.exit_code)
        return err.exit_code
    return 0 if state == JobState.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
