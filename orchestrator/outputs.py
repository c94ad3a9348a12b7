"""A run's folder: which one a new run gets, and one live run per folder.

**Identity.** A new run never goes into a folder that holds another run (its checkpoints,
journal and MLflow run stay as they are): :func:`choose_run_folder` gives the experiment's
``runtime.output_dir`` when it holds no run yet, else the first of ``<output_dir>-2``,
``<output_dir>-3``, ... that holds none. ``runtime.resume`` (``auto`` or a checkpoint) is the only
way to continue a run: it keeps ``runtime.output_dir`` as it is. ``orch train`` and ``orch submit``
choose (and print) the folder; the processes they start are handed the chosen one and never
choose again (a requeue, a restart goes on in it).

**One live run per folder.** The process that trains (rank 0) holds an ``fcntl.flock`` on
``<folder>/.orch-run.lock`` for the run's life (:func:`hold`): it dies with its owner, so a
killed run leaves nothing to clean. A queued job has no process yet; for it the folder is
claimed at submit (below).

Two jobs writing one folder lose work: a re-submitted experiment of the same name would overwrite
``config.yaml`` under a pending requeue (which then resumes with the new config), both would write
and prune the same ``checkpoints/``, and one's start-up purge of temporary files would delete the
other's checkpoint in flight. So a submission claims each job's output folder
(``<output_dir>/.orch-owner.json``: the job id), and a folder whose owner is still pending or
running is refused at preflight, before anything is written. The same job (a requeue, a restart)
and any job after its owner has ended may use it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Collection, Iterator, Optional

from cluster.errors import JobNotFound, LaunchError
from cluster.files import file_lock, lock_fd, read_json, write_json_atomic
from cluster.lease import is_alive, owner_identity

OWNER_FILE = ".orch-owner.json"
RUN_LOCK = ".orch-run.lock"
# What a run leaves in its folder (written at submit, or by its first steps): a folder with any
# of them holds a run; one with only orch's lock and owner files does not.
RUN_MARKS = ("config.yaml", "journal", "checkpoints", "result.json")
_held: dict[str, int] = {}  # folder -> its run lock, held by this process


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / ".orch-owner.lock", mode=0o644):
        yield


def live_owner(folder: Path, job_id: Optional[str] = None) -> Optional[str]:
    """Who holds ``folder``, if alive: a process training in it (its run lock), a pending or
    running job other than ``job_id``, or a submission in progress (another ``orch submit``
    between its claim and its job ids)."""
    from orchestrator.jobs import refresh_job

    if is_locked(folder):
        data = read_json(Path(folder) / OWNER_FILE) or {}
        owner = data.get("job_id")
        return f"{owner} (RUNNING)" if owner and owner != job_id else None if owner else "a running orch train"
    data = read_json(Path(folder) / OWNER_FILE) or {}
    if data.get("submitter"):
        same_host = data.get("host") == socket.gethostname()
        mine = data["submitter"] == os.getpid() and same_host
        alive = same_host and is_alive(int(data["submitter"]), data.get("start"))
        return f"being submitted by process {data['submitter']}" if alive and not mine else None
    owner = data.get("job_id")
    if not owner or owner == job_id:
        return None
    try:
        record = refresh_job(owner)
    except JobNotFound:  # its record was removed (another ORCH_HOME): nothing to protect
        return None
    return None if record.state.finished else f"{owner} ({record.state.value})"


def check_free(folder: Path) -> None:
    """LaunchError (one line) when a live job owns ``folder``."""
    owner = live_owner(folder)
    if owner:
        stop = "stop it" if owner.startswith("a running") else f"cancel it (orch cancel {owner.split()[0]})"
        raise LaunchError(f"the output folder {folder} belongs to {'' if owner.startswith('a ') else 'job '}{owner}; "
                          f"wait for it to end, {stop}, or give this run another name / runtime.output_dir")


def claim_for_submission(folder: Path) -> None:
    """Hold ``folder`` for this submitting process (before its config and journal are written)."""
    folder = Path(folder)
    with _locked(folder):
        check_free(folder)
        write_json_atomic(folder / OWNER_FILE, {**owner_identity(), "submitter": os.getpid(),
                                                "host": socket.gethostname()})


def claim(folder: Path, job_id: str) -> None:
    """Make the submitted job ``job_id`` the owner of ``folder``."""
    folder = Path(folder)
    with _locked(folder):
        write_json_atomic(folder / OWNER_FILE, {"job_id": job_id})


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run (finished, failed or live): its config, journal,
    checkpoints or result."""
    return any((Path(folder) / mark).exists() for mark in RUN_MARKS)


def choose_run_folder(base: Path, resume: bool, probe: bool = True, skip: Collection[Path] = ()) -> Path:
    """The folder a new run of an experiment whose ``runtime.output_dir`` is ``base`` trains in
    (see the module docstring): ``base`` when ``resume`` or when it holds no run, else the first
    ``<base>-N`` (N = 2, 3, ...) that holds none. ``probe``: a folder on the way that a live run
    holds is refused (LaunchError) rather than passed by; ranks other than 0 choose without
    probing (they see the same files, and rank 0 alone takes the lock). ``skip``: folders given
    to other runs of the same submission."""
    base = Path(base)
    n = 1
    while True:
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if probe:
            check_free(folder)
        if resume or not (holds_run(folder) or folder in skip):
            return folder
        n += 1


def new_folder_note(base: Path, folder: Path) -> str:
    """The line that says a run goes to ``folder`` because ``base`` holds another run."""
    return (f"note: {base} holds an earlier run (kept as it is); this run goes to {folder} "
            f"(to continue that run instead: --set runtime.resume=auto)")


def run_folder_overrides(experiment, folder: Path) -> dict[str, str]:
    """The dotted keys that send a run of ``experiment`` to ``folder``: its output folder, and
    the folder's name as the MLflow run's name (unless ``tracking.run_name`` sets one), so that
    the runs of one experiment are told apart in the MLflow UI."""
    keys = {"runtime.output_dir": str(folder)}
    if not experiment.tracking.run_name:
        keys["tracking.run_name"] = Path(folder).name
    return keys


def is_locked(folder: Path) -> bool:
    """Whether a live process (this one included) holds ``folder``'s run lock."""
    folder = Path(folder)
    if str(folder.resolve()) in _held:
        return True
    if not (folder / RUN_LOCK).exists():  # probing never creates the lock file
        return False
    with file_lock(folder / RUN_LOCK, blocking=False, mode=0o644) as free:
        return not free  # leaving the block drops the probe's own lock


def hold(folder: Path, wait_s: float = 0.0) -> bool:
    """Hold ``folder``'s run lock in this process until :func:`release` or its exit (the lock
    dies with the process: a killed run leaves the folder free). True when taken here, False
    when this process held it already. LaunchError (one line) when another process holds it
    (after ``wait_s`` seconds: a restarted rank 0 may start while its killed predecessor exits)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _held:
        return False
    deadline = time.monotonic() + wait_s
    while True:
        fd = lock_fd(folder / RUN_LOCK, blocking=False, mode=0o644)  # open until release(); dies with us
        if fd is not None:
            break
        if time.monotonic() >= deadline:
            raise LaunchError(f"the output folder {folder} is in use by another running training; wait for it to "
                              "end or stop it, or give this run another name / runtime.output_dir")
        time.sleep(0.5)
    _held[key] = fd
    return True


def release(folder: Path) -> None:
    """Let go of ``folder``'s run lock held by this process (nothing when it holds none)."""
    fd = _held.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)
