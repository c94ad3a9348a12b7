"""One rendezvous port per job: chosen on rank 0's host, checked by binding, leased until the job ends.

Why a lease and not "bind port 0 and close it" (detectron2) or a hash of the job id (submitit,
Lightning): two jobs started at the same moment on one node must never get the same port, even
from independent ``orch`` processes. The decision is made under the lock of a per-user lease
folder; a lease names its owner by pid and start time and is reclaimed once the owner has died.

Ports come from ``ORCH_PORT_RANGE`` (default 29500-39999) minus the kernel's ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``, usually 32768-60999), because an outgoing connection
may take an ephemeral port between our bind check and the moment the job's rank 0 listens.
A ``MASTER_PORT`` the user exported wins, but is still leased so that two parallel jobs cannot
both use it.

``python -m cluster.ports`` prints a bind-checked free port (used over ssh for a remote master).
"""

from __future__ import annotations

import errno
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

from cluster.errors import ClusterError
from cluster.files import read_json, unlink_quietly, write_json_atomic
from cluster.lease import lease_dir, locked, owner_alive, owner_identity

DEFAULT_PORT_RANGE = (29500, 39999)


class PortLease:
    """A port held for one job. ``release()`` (or leaving the ``with`` block) gives it back;
    releasing twice is fine. ``user_set`` is True when the port came from ``MASTER_PORT``."""

    def __init__(self, port: int, path: Optional[Path], owner_pid: int, user_set: bool = False):
        self.port = port
        self.path = path
        self.owner_pid = owner_pid
        self.user_set = user_set

    def release(self) -> None:
        """Delete the lease file."""
        if self.path is not None:
            unlink_quietly(self.path)
            self.path = None

    def __enter__(self) -> "PortLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"PortLease(port={self.port}, owner_pid={self.owner_pid}, user_set={self.user_set})"


def port_range(environ: Optional[Mapping[str, str]] = None) -> tuple[int, int]:
    """The configured range ``ORCH_PORT_RANGE=LOW-HIGH`` (inclusive), else the default."""
    env = os.environ if environ is None else environ
    text = env.get("ORCH_PORT_RANGE", "").strip()
    if not text:
        return DEFAULT_PORT_RANGE
    try:
        low, high = (int(part) for part in text.split("-"))
    except ValueError:
        raise ClusterError(f"ORCH_PORT_RANGE={text!r} is not LOW-HIGH, e.g. 29500-32000") from None
    if not 1024 <= low <= high <= 65535:
        raise ClusterError(f"ORCH_PORT_RANGE={text!r} must satisfy 1024 <= LOW <= HIGH <= 65535")
    return low, high


def ephemeral_range() -> Optional[tuple[int, int]]:
    """The kernel's range for outgoing connections, or None where it cannot be read."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def candidate_ports(low: int, high: int) -> list[int]:
    """Ports of ``low..high`` outside the ephemeral range (all of them if none would be left)."""
    ports = list(range(low, high + 1))
    eph = ephemeral_range()
    if eph:
        safe = [p for p in ports if not eph[0] <= p <= eph[1]]
        ports = safe or ports
    return ports


def port_is_free(port: int, host: Optional[str] = None) -> bool:
    """True when ``port`` can be bound on ``host`` (None: every IPv4 and IPv6 address, the
    strictest test, since rank 0's store listens on all interfaces)."""
    targets = [(socket.AF_INET, host)] if host else [(socket.AF_INET, ""), (socket.AF_INET6, "::")]
    for family, address in targets:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host
        try:
            # No SO_REUSEADDR on purpose: a port in TIME_WAIT counts as busy.
            sock.bind((address, port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            if err.errno != errno.EADDRNOTAVAIL:
                raise
        finally:
            sock.close()
    return True


def lease_port(
    owner_pid: Optional[int] = None,
    host: Optional[str] = None,
    *,
    environ: Optional[Mapping[str, str]] = None,
    ports: Optional[tuple[int, int]] = None,
    label: str = "",
) -> PortLease:
    """Lease a free port on this host for the job whose supervising process is ``owner_pid``
    (default: this process). ``ports`` overrides the configured range; ``label`` (e.g. the job
    id) is stored for ``orch`` diagnostics.

    Raises :class:`ClusterError` when ``MASTER_PORT`` is leased by another live job or when no
    port of the range is free.
    """
    env = os.environ if environ is None else environ
    owner = owner_identity(owner_pid)
    folder = lease_dir("ports", env)
    user_port = env.get("MASTER_PORT", "").strip()
    low, high = ports or port_range(env)
    candidates = candidate_ports(low, high)
    # A random starting point: independent orch instances on other hosts, sharing nothing,
    # should not all try the bottom of the range first.
    first = random.randrange(len(candidates))
    with locked(folder):
        leased = _live_leases(folder)
        if user_port:
            try:
                port = int(user_port)
            except ValueError:
                raise ClusterError(f"MASTER_PORT={user_port!r} is not a port number; unset it to let orch choose") from None
            if port in leased:
                raise ClusterError(
                    f"MASTER_PORT={port} is already used by orch job {leased[port].get('label') or leased[port]['pid']}; "
                    "unset MASTER_PORT so that orch gives each job its own port"
                )
            return _write(folder, port, owner, label, user_set=True)
        for port in candidates[first:] + candidates[:first]:
            if port not in leased and port_is_free(port, host):
                return _write(folder, port, owner, label, user_set=False)
    raise ClusterError(
        f"no free port in {low}-{high} on {socket.gethostname()} ({len(leased)} leased by orch jobs); "
        "set ORCH_PORT_RANGE to a wider range"
    )


def _live_leases(folder: Path) -> dict[int, dict]:
    """Leases whose owner runs; those of dead owners are deleted (reclaimed) on the way."""
    live: dict[int, dict] = {}
    for path in folder.glob("*.json"):
        record = read_json(path)
        if record is None or not owner_alive(record):
            unlink_quietly(path)
            continue
        live[int(path.stem)] = record
    return live


def _write(folder: Path, port: int, owner: dict, label: str, user_set: bool) -> PortLease:
    path = folder / f"{port}.json"
    write_json_atomic(path, dict(owner, label=label, created=time.time(), user_set=user_set))
    return PortLease(port, path, owner["pid"], user_set=user_set)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cluster.ports``: print a bind-checked free port of this host (no lease)."""
    low, high = port_range()
    candidates = candidate_ports(low, high)
    random.shuffle(candidates)
    for port in candidates:
        if port_is_free(port):
            print(port)
            return 0
    print(f"no free port in {low}-{high}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
