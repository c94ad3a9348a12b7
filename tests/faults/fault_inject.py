"""The means of injecting faults into real jobs, and of seeing where a job is (standard library).

Nothing here reaches into orch: a fault is a real signal to a real process found in ``/proc``, a
real daemon stopped, a real socket bound, a real (tmpfs) file system filled. Where it lands is
decided by watching what the job itself writes: its log (``iter N/M`` is printed after step N,
just before that step's evaluation starts, and ``eval at iter N`` when it ended) and its
checkpoint folder (the kernel tells us through inotify the moment a checkpoint's temporary file
is created, so a signal sent then lands inside the write, which takes a few hundred ms).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import select
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from orch_testing import cmdline, descendants  # noqa: F401 - re-exported for fault_backends

ITER_LINE = re.compile(r"iter (\d+)/(\d+) epoch")
RESUMED_LINE = re.compile(r"resumed from (\S+) at iteration (\d+)")
TRAINING_LINE = re.compile(r"\btraining \S+: \d+ iterations \(")
CHECKPOINT_LINE = re.compile(r"checkpoint \S+/(?:iter|epoch)_(\d+)\.pth \((\w+)\)")


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.02):
    """``predicate()``'s first truthy value; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def last_iter(text: str) -> int:
    """The last step a log reports as done (0 when none)."""
    found = ITER_LINE.findall(text)
    return max((int(n) for n, _ in found), default=0)


def log_reached(path: str | Path, iteration: int) -> Callable[[], bool]:
    """Predicate: the log reports step ``iteration`` (or a later one) as done."""
    return lambda: last_iter(read_text(path)) >= iteration


# -- processes -----------------------------------------------------------------------------------
def _stat(pid: int) -> Optional[list[str]]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def alive(pid: int) -> bool:
    """A live process (a zombie is dead: it holds nothing)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def live_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and alive(int(p))]


def ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        out.add(pid)
        fields = _stat(pid)
        if fields is None:
            break
        pid = int(fields[1])
    return out


def processes_matching(markers: list[str], pgids: set[int] = frozenset(),
                       exclude: Callable[[str], bool] = lambda line: False) -> list[tuple[int, str]]:
    """``(pid, command line)`` of every live process (not this one or its ancestors) whose
    command line holds one of ``markers`` or whose process group is one of ``pgids``."""
    mine = ancestors(os.getpid())
    found = []
    for pid in live_pids():
        if pid in mine:
            continue
        line = cmdline(pid)
        fields = _stat(pid)
        if not line or fields is None or exclude(line):
            continue
        if any(m and m in line for m in markers) or int(fields[2]) in pgids:
            found.append((pid, line))
    return found


def kill(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


# -- inotify: the moment a checkpoint write starts ------------------------------------------------
IN_CREATE = 0x100
_EVENT = struct.Struct("iIII")


class CreateWatch:
    """``with CreateWatch(folder) as watch: name = watch.next(pattern, timeout_s)``: names of files
    created in ``folder`` from now on, as the kernel reports them (no polling delay)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = str(folder)
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = -1
        self.pending: list[str] = []

    def __enter__(self) -> "CreateWatch":
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, self.folder.encode(), IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {self.folder}")
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)

    def next(self, pattern: re.Pattern, timeout_s: float, stop: Callable[[], bool] = lambda: False) -> Optional[str]:
        """The next created name matching ``pattern`` (None when ``timeout_s`` passed or ``stop()``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not stop():
            while self.pending:
                name = self.pending.pop(0)
                if pattern.fullmatch(name):
                    return name
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            offset = 0
            while offset < len(data):
                _, _, _, size = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size: offset + _EVENT.size + size]
                self.pending.append(raw.split(b"\0", 1)[0].decode(errors="replace"))
                offset += _EVENT.size + size
        return None


# -- ports ---------------------------------------------------------------------------------------
class Squatter:
    """Listening sockets on ports another job wants (on every IPv4 and IPv6 address, as rank 0's
    store would listen), held until :meth:`close`."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.ports: list[int] = []

    def take(self, port: int) -> bool:
        """Bind and listen on ``port``; False when it is busy already."""
        taken = []
        for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address, port))
                sock.listen(8)
                taken.append(sock)
            except OSError as err:
                sock.close()
                if err.errno not in (errno.EADDRINUSE, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise
                if err.errno == errno.EADDRINUSE and family == socket.AF_INET:
                    for other in taken:
                        other.close()
                    return False
        self.socks += taken
        self.ports.append(port)
        return bool(taken)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks, self.ports = [], []


def free_port_block(count: int, low: int = 30000, high: int = 32700, seed: int = 0) -> int:
    """The first port of ``count`` consecutive ports, below the ephemeral range, free now."""
    import random

    rng = random.Random(seed)
    for _ in range(200):
        first = rng.randrange(low, high - count)
        probe = Squatter()
        try:
            if all(probe.take(p) for p in range(first, first + count)):
                return first
        finally:
            probe.close()
    raise AssertionError(f"no {count} free consecutive ports in {low}-{high}")


# -- file systems --------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(folder: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MB mounted on ``folder`` for the block; always unmounted after (lazily
    when a process still holds a file there)."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(folder)], check=True,
                   capture_output=True, timeout=30)
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def fill(folder: Path, leave_bytes: int = 64 * 1024) -> Path:
    """Fill the file system of ``folder`` up to ``leave_bytes`` free; returns the filler file."""
    filler = folder / ".filler"
    stat = os.statvfs(folder)
    size = max(0, stat.f_bavail * stat.f_frsize - leave_bytes)
    with open(filler, "wb") as handle:
        chunk = b"\0" * (1 << 20)
        while size > 0:
            try:
                size -= handle.write(chunk[: min(len(chunk), size)])
            except OSError:
                break
    return filler


# -- Slurm daemons -------------------------------------------------------------------------------
def slurmd_pid(state_dir: Path, node: str) -> Optional[int]:
    try:
        pid = int((state_dir / "run" / f"slurmd-{node}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) and "slurmd" in cmdline(pid) else None


def start_slurmd(state_dir: Path, node: str) -> None:
    """Start ``node``'s slurmd again, as an admin would after it crashed."""
    env = dict(os.environ, SLURM_CONF=str(state_dir / "slurm.conf"))
    subprocess.run(["slurmd", "-f", str(state_dir / "slurm.conf"), "-N", node], env=env, check=True,
                   capture_output=True, timeout=60)
    wait_for(lambda: slurmd_pid(state_dir, node), 30, f"slurmd of {node} to start", poll_s=0.2)
