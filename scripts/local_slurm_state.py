"""The state folder of ``scripts/local_slurm.py``, checked before root writes into it or deletes it.

local_slurm runs as root, and its default folder is in /tmp, where any user may create names. A
folder made there first by another user, or a symlink to ``/etc``, would have root write configs
where it points, chown folders to mysql, kill the pids of planted pid files, and ``down`` delete
the target. So the folder is used only when it is a real folder (checked with ``lstat``: a
symlink is never followed) owned by the user running the script and writable by no one else,
in a parent no other user can swap it out of (every folder up to ``/`` owned by root or us and
writable only by its owner, or sticky like /tmp). It is deleted only when it holds the marker
file written when it was made here (or is empty): ``--state-dir /etc`` deletes nothing.

Mode 0755, not 0700: MariaDB runs as user mysql and must reach its datadir inside, and other
users read ``slurm.conf`` through ``SLURM_CONF``. What matters is that no one else can write.
Standard library only, like the script.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

MARKER = ".orch-local-slurm"


class UnsafeStateDir(RuntimeError):
    """The state folder is not safe for root to use; the message says why and what to do."""


def state_path(arg: str) -> Path:
    """``arg`` made absolute: its parent's symlinks resolved (the checks then see the real
    folders), the last part kept as given (a symlink there is refused, never followed)."""
    absolute = os.path.abspath(arg)
    name = os.path.basename(absolute)
    if not name:
        raise UnsafeStateDir(f"--state-dir {arg!r} names a file system root; pass a folder of its own")
    return Path(os.path.realpath(os.path.dirname(absolute))) / name


def _refuse(state: Path, problem: str) -> UnsafeStateDir:
    return UnsafeStateDir(f"state dir {state} {problem}; remove it or pass --state-dir DIR in a folder "
                          "only root can write (e.g. one made by mktemp -d)")


def _check_parents(state: Path) -> None:
    # Whoever may write a folder on the way may rename the state dir and put a symlink there.
    uid = os.geteuid()
    for folder in state.parents:
        info = os.stat(folder)
        if info.st_uid not in (0, uid):
            raise _refuse(state, f"is inside {folder}, which belongs to uid {info.st_uid}")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise _refuse(state, f"is inside {folder}, which other users can write (mode {stat.S_IMODE(info.st_mode):o})")


def check_state_dir(state: Path) -> bool:
    """Whether ``state`` exists; raises :class:`UnsafeStateDir` when it, or a folder above it, is
    not safe for this user (see the module docstring)."""
    if state.parent.exists():
        _check_parents(state)
    try:
        info = os.lstat(state)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(state, f"is a symlink (to {os.readlink(state)})")
    if not stat.S_ISDIR(info.st_mode):
        raise _refuse(state, "is not a folder")
    if info.st_uid != os.geteuid():
        raise _refuse(state, f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})")
    if info.st_mode & 0o022:
        raise _refuse(state, f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o})")
    return True


def make_state_dir(state: Path) -> None:
    """Create ``state`` (mode 0755, parents too) and its marker, or check the existing one."""
    os.makedirs(state.parent, mode=0o755, exist_ok=True)
    _check_parents(state)
    try:
        os.mkdir(state, 0o755)
    except FileExistsError:
        pass  # made by us before, or planted: the check says which
    check_state_dir(state)
    (state / MARKER).touch()


def check_removable(state: Path) -> bool:
    """Whether ``state`` exists; raises :class:`UnsafeStateDir` when it is unsafe
    (:func:`check_state_dir`) or is a folder local_slurm did not make (no marker, not empty):
    nothing in it (pid files to kill, files to delete) is then used."""
    if not check_state_dir(state):
        return False
    entries = os.listdir(state)
    if entries and MARKER not in entries:
        raise _refuse(state, f"is not a local_slurm state dir (not empty, no {MARKER} in it), so it is left alone")
    return True


def remove_state_dir(state: Path) -> bool:
    """Delete ``state`` when :func:`check_removable`; returns whether it is gone. On Linux
    ``shutil.rmtree`` works through file descriptors: symlinks inside are removed, never followed."""
    if not check_removable(state):
        return True
    if not shutil.rmtree.avoids_symlink_attacks:
        raise _refuse(state, "cannot be deleted safely on this platform (shutil.rmtree follows symlinks here)")
    shutil.rmtree(state, ignore_errors=True)
    return not os.path.lexists(state)
