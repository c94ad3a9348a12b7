"""What runs inside a Slurm job: one task per GPU (rank), each calling the training entry point.

submitit pickles a :class:`SlurmTrainJob` and starts it in every task (``srun``). The task:

1. installs signal handlers that only set a flag: USR2 (sent ``signal_delay_s`` before the time
   limit, or by ``scancel --signal=USR2``) and SIGTERM (``scontrol requeue``, preemption with
   ``PreemptMode=REQUEUE``, ``scancel``). The trainer sees the flag through
   :class:`PreemptionHook`, checkpoints at the next step boundary and raises ``Preempted``;
   nothing heavy ever runs inside a signal handler;
2. agrees on the rendezvous: MASTER_ADDR is the first host of the allocation, MASTER_PORT is
   leased once by task 0 (which Slurm places on that first host) and shared with the other tasks
   through a file in the job folder (shared by every node, as submitit already requires);
3. trains through :func:`orchestrator.worker.run`, resuming (``runtime.resume=auto``) when
   ``SLURM_RESTART_COUNT`` says this is a requeued run. The MLflow run id is in the resolved
   config, so a requeued job continues the same run; task 0 records the restart count on it;
4. after a USR2 preemption, task 0 requeues the job (``scontrol requeue``) at most
   ``max_requeues`` times. After SIGTERM Slurm is already requeueing or cancelling: just exit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from submitit.helpers import Checkpointable, DelayedSubmission

from cluster.errors import ClusterError, TrainingError
from detection.hooks.base import Hook

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_S = 600
# Variables of other launchers that a submitting shell may have exported; sbatch copies the
# submitter's environment into the job, and DistEnv.detect would prefer them to Slurm's.
FOREIGN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ORCH_MASTER_PORT")


class StopFlag:
    """Set by a signal handler, read by the training loop (async-signal-safe: one assignment)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def set(self, signum: int, frame: Any = None) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> None:
        """Replace submitit's handlers (which checkpoint inside the handler) with flag setters."""
        signal.signal(signal.SIGUSR2, self.set)
        signal.signal(signal.SIGTERM, self.set)


class PreemptionHook(Hook):
    """Asks the trainer to checkpoint and stop once Slurm has signalled this task."""

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag

    def should_stop(self, trainer: Any) -> bool:
        return self.flag.signum is not None


def job_key(environ=os.environ) -> str:
    """``123`` or, for an array task, ``123_4`` (what squeue/sacct call it)."""
    if environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ["SLURM_JOB_ID"]


def rendezvous(folder: Path, environ=os.environ) -> tuple[str, Optional[int], Any]:
    """``(master_addr, master_port, lease)``: the same address and port on every task of this
    run of the job (a requeued run gets a new port: its file name holds the restart count).
    ``lease`` is task 0's :class:`cluster.ports.PortLease` (release it when training ends)."""
    from cluster.hostlist import expand_hostlist

    master_addr = expand_hostlist(environ["SLURM_JOB_NODELIST"])[0]
    if int(environ.get("SLURM_NTASKS", "1")) == 1:
        return master_addr, None, None
    path = folder / f"{job_key(environ)}_rendezvous_{environ.get('SLURM_RESTART_COUNT', '0')}.json"
    if int(environ["SLURM_PROCID"]) == 0:
        from cluster.files import write_json_atomic
        from cluster.ports import lease_port

        clean = {k: v for k, v in environ.items() if k not in FOREIGN_VARS}
        lease = lease_port(environ=clean, label=f"slurm job {job_key(environ)}")
        write_json_atomic(path, {"master_addr": master_addr, "master_port": lease.port,
                                 "host": socket.gethostname(), "job": job_key(environ)})
        return master_addr, lease.port, lease
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            data = json.loads(path.read_text())
            return data["master_addr"], int(data["master_port"]), None
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    raise ClusterError(f"task 0 never wrote the rendezvous file {path} within {RENDEZVOUS_TIMEOUT_S} s; "
                       "is the submitit folder on a file system shared by every node?")


class SlurmTrainJob(Checkpointable):
    """The callable submitit runs in each task. Picklable: only paths and numbers."""

    def __init__(self, config_path: str, folder: str, max_requeues: int) -> None:
        self.config_path = config_path
        self.folder = folder
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        flag = StopFlag()
        flag.install()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        for name in FOREIGN_VARS:
            os.environ.pop(name, None)
        master_addr, master_port, lease = rendezvous(Path(self.folder))
        os.environ["MASTER_ADDR"] = master_addr
        if master_port is not None:
            os.environ["ORCH_MASTER_PORT"] = os.environ["MASTER_PORT"] = str(master_port)
        from cluster.env import DistEnv
        from cluster.logs import setup_logging
        from orchestrator.worker import run

        env = DistEnv.detect(os.environ)
        setup_logging(env.rank)
        logging.getLogger("submitit").propagate = False  # it has its own handler: no double lines
        write_task_env(Path(self.folder), env, restarts)
        log.info("slurm job %s task %d/%d on %s, master %s:%s, restart %d", job_key(), env.rank,
                 env.world_size, socket.gethostname(), master_addr, master_port, restarts)
        overrides = ["runtime.resume=auto"] if restarts else []
        if env.is_main:
            record_restarts(self.config_path, restarts)
        from detection.engine import Preempted

        watchdog = start_watchdog(self.config_path, env)
        try:
            result = run(self.config_path, overrides, hooks=[PreemptionHook(flag)], env=env)
        except Preempted as err:
            self._after_preemption(flag, env.is_main, restarts, err)
            raise  # only reached when no requeue is left
        finally:
            watchdog.stop()
            if lease is not None:
                lease.release()
        return {"metrics": dict(result.metrics), "output_dir": result.output_dir,
                "iterations": result.iterations, "restarts": restarts}

    def _after_preemption(self, flag: StopFlag, is_main: bool, restarts: int, err: Exception) -> None:
        """Requeue after USR2 (task 0 only, bounded); exit quietly after SIGTERM."""
        if flag.signum == signal.SIGTERM:
            log.warning("SIGTERM: checkpoint written (%s); Slurm requeues or cancels the job", err)
            sys.exit(143)  # SystemExit: submitit writes no result, so nobody reads this run as done
        if not is_main:
            sys.exit(0)  # task 0 decides; srun keeps the others' exit quiet
        if restarts >= self.max_requeues:
            raise TrainingError(f"job {job_key()} was preempted {restarts + 1} times, more than "
                                f"resources.slurm.max_requeues={self.max_requeues}; raise it or resubmit "
                                f"with runtime.resume=auto") from err
        log.warning("USR2: checkpoint written; requeueing job %s (restart %d of at most %d)",
                    job_key(), restarts + 1, self.max_requeues)
        subprocess.run(["scontrol", "requeue", job_key()], check=True, timeout=60)
        sys.exit(0)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """submitit's own requeue path (a USR2 before our handlers are installed): run the same
        callable again; the requeued run resumes from the last checkpoint (resume=auto)."""
        return DelayedSubmission(self, *args, **kwargs)


def start_watchdog(config_path: str, env: Any) -> Any:
    """The hang watchdog thread of this task (task 0 decides, every task dumps its own stack);
    on a hang task 0 acts on ``runtime.on_hang``: ``fail`` exits (srun --kill-on-bad-exit stops
    the other tasks), ``requeue`` asks Slurm to requeue the job, ``wait`` only reports."""
    from orchestrator.config import load_experiment, output_dir_of
    from orchestrator.watchdog import HangSettings
    from orchestrator.watchdog_task import TaskWatchdog

    settings = HangSettings.of_config(config_path)

    def act(report: Any) -> None:
        if settings.on_hang == "requeue":
            subprocess.run(["scontrol", "requeue", job_key()], check=False, timeout=60)
        elif settings.on_hang == "fail":
            print(f"orch worker: error: {report.reason}; stacks in {report.folder}", file=sys.stderr, flush=True)
            os._exit(1)  # the main thread is the one hung: no clean way out of it

    output = str(output_dir_of(load_experiment(config_path)))
    return TaskWatchdog(output, settings, env.rank, env.world_size, act).start()


def write_task_env(folder: Path, env: Any, restarts: int) -> None:
    """``<job>_rank<r>_env.json``: what this rank saw (rank, node, master address and port, GPUs),
    for diagnosing a hung rendezvous and for the tests that check that ranks agree."""
    import dataclasses

    from cluster.files import write_json_atomic

    data = {**dataclasses.asdict(env), "host": socket.gethostname(), "restarts": restarts,
            "slurm_node": os.environ.get("SLURMD_NODENAME"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    write_json_atomic(folder / f"{job_key()}_rank{env.rank}_env.json", data)


def record_restarts(config_path: str, restarts: int) -> None:
    """Tag the job's MLflow run with the restart count (tag ``slurm.restarts`` and metric
    ``restarts``), so the runs table shows which runs were requeued."""
    from detection.journal import Journal, is_journal
    from orchestrator.config import load_experiment
    from orchestrator.tracking import runs

    experiment = load_experiment(config_path)
    folder = runs.journal_dir(experiment.runtime.output_dir)
    if not (experiment.tracking.enable and is_journal(folder)):
        return
    with Journal.open(folder) as journal:
        journal.set_tags({"slurm.restarts": str(restarts), "slurm.job_id": job_key()})
        journal.log_metrics({"restarts": restarts}, step=restarts)
