"""One live job per output folder.

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
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator, Optional

from cluster.errors import JobNotFound, LaunchError
from cluster.files import read_json, write_json_atomic
from cluster.lease import is_alive, owner_identity

OWNER_FILE = ".orch-owner.json"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".orch-owner.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def live_owner(folder: Path, job_id: Optional[str] = None) -> Optional[str]:
    """Who holds ``folder``, if alive: a pending or running job other than ``job_id``, or a
    submission in progress (another ``orch submit`` between its claim and its job ids)."""
    from orchestrator.jobs import refresh_job

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
        raise LaunchError(f"the output folder {folder} belongs to job {owner}; wait for it to end, cancel it "
                          f"(orch cancel {owner.split()[0]}), or give this run another name / runtime.output_dir")


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
