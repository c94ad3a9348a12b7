"""GPU slices of this node, leased to jobs for their whole life; CPU slots where there is no GPU.

Every concurrent ``orch`` job of the user on this node draws from one pool: the GPUs named in
``CUDA_VISIBLE_DEVICES`` when the user restricted them, else every GPU the driver lists (counted
with ``nvidia-smi -L`` or ``/proc/driver/nvidia/gpus``, never by importing torch). Without a GPU
the pool is made of CPU slots (``ORCH_CPU_SLOTS`` or ``resources.local.cpu_slots``, default the
number of cores) so that the same queueing runs everywhere.

Queueing is FIFO with backfill: a waiting request is served when enough devices are free and no
older request that would also fit is waiting; a request that does not fit lets younger, smaller
ones pass, until it has waited ``ORCH_LEASE_STARVE_S`` (default 300 s), after which nobody
passes it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping, Optional

from cluster.errors import ClusterError
from cluster.files import read_json, unlink_quietly, write_json_atomic
from cluster.lease import lease_dir, locked, owner_alive, owner_identity


@dataclass(frozen=True)
class DevicePool:
    """The devices jobs of this node share: GPU ids (as CUDA_VISIBLE_DEVICES spells them) or
    CPU slots ``cpu0..cpuN-1``; ``threads_per_device`` is each device's share of the cores."""

    kind: Literal["gpu", "cpu"]
    ids: tuple[str, ...]
    threads_per_device: int

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def unit(self) -> str:
        return "GPU" if self.kind == "gpu" else "CPU slot"


def list_gpus(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """GPU ids visible to orch: ``CUDA_VISIBLE_DEVICES`` entries when set (an empty value means
    none), else the driver's list."""
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0:
            return [m.group(1) for m in re.finditer(r"^GPU (\d+):", out.stdout, re.MULTILINE)]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def detect_pool(environ: Optional[Mapping[str, str]] = None, cpu_slots: Optional[int] = None) -> DevicePool:
    """The pool of this node. ``cpu_slots`` (from ``resources.local.cpu_slots``) is used when
    there is no GPU; ``ORCH_CPU_SLOTS`` overrides it."""
    env = os.environ if environ is None else environ
    cores = os.cpu_count() or 1
    gpus = list_gpus(env)
    if gpus:
        return DevicePool("gpu", tuple(gpus), max(1, cores // len(gpus)))
    if env.get("ORCH_CPU_SLOTS", "").strip():
        try:
            cpu_slots = int(env["ORCH_CPU_SLOTS"])
        except ValueError:
            raise ClusterError(f"ORCH_CPU_SLOTS={env['ORCH_CPU_SLOTS']!r} is not an integer") from None
    slots = cores if cpu_slots is None else cpu_slots
    if slots < 1:
        raise ClusterError(f"the CPU slot pool size must be >= 1, got {slots} (resources.local.cpu_slots / ORCH_CPU_SLOTS)")
    return DevicePool("cpu", tuple(f"cpu{i}" for i in range(slots)), max(1, cores // slots))


class DeviceLease:
    """Devices held by one job. ``environ(nprocs)`` is what each of the job's processes gets."""

    def __init__(self, pool: DevicePool, devices: tuple[str, ...], path: Optional[Path]):
        self.pool = pool
        self.devices = devices
        self.path = path

    def environ(self, nprocs: int = 1) -> dict[str, str]:
        """``CUDA_VISIBLE_DEVICES`` for GPU leases, and each process's thread share."""
        threads = str(max(1, self.pool.threads_per_device * len(self.devices) // max(1, nprocs)))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "ORCH_LEASED_DEVICES": ",".join(self.devices)}
        if self.pool.kind == "gpu":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        return env

    def release(self) -> None:
        """Give the devices back (idempotent)."""
        if self.path is not None:
            unlink_quietly(self.path)
            self.path = None

    def __enter__(self) -> "DeviceLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DeviceLease({self.pool.kind}: {','.join(self.devices)})"


class DeviceRequest:
    """A place in the queue for ``count`` devices; created in submission order, served by
    :meth:`try_acquire` / :meth:`wait`. ``cancel()`` leaves the queue."""

    def __init__(self, count: int, pool: DevicePool, *, owner_pid: Optional[int] = None, label: str = "",
                 environ: Optional[Mapping[str, str]] = None, enqueue: bool = True):
        if count < 1:
            raise ClusterError(f"a job needs at least 1 {pool.unit}, got {count} (--gpus)")
        if count > pool.size:
            raise ClusterError(
                f"the job asks for {count} {pool.unit}s but this node has {pool.size} "
                f"({', '.join(pool.ids)}); lower --gpus or use another backend"
            )
        env = os.environ if environ is None else environ
        self.count, self.pool, self.label = count, pool, label
        self.owner = owner_identity(owner_pid)
        self.folder = lease_dir(f"devices-{pool.kind}", env)
        self.starve_s = float(env.get("ORCH_LEASE_STARVE_S", "300"))
        self.ticket: Optional[Path] = None
        if enqueue:
            self.enqueue()

    def enqueue(self) -> None:
        """Take a place in the queue (a request that is not queued is served only when nobody
        that fits is waiting)."""
        if self.ticket is None:
            # time_ns first so that names sort in arrival order; the uuid breaks ties.
            self.ticket = self.folder / f"ticket-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
            write_json_atomic(self.ticket, dict(self.owner, n=self.count, label=self.label, created=time.time()))

    def try_acquire(self) -> Optional[DeviceLease]:
        """Take the devices if it is this request's turn and enough are free, else None."""
        with locked(self.folder):
            leases, tickets = _scan(self.folder)
            busy = {d for record in leases.values() for d in record["devices"]}
            free = [d for d in self.pool.ids if d not in busy]
            if len(free) < self.count:
                return None
            now = time.time()
            for path, record in tickets:
                if path == self.ticket:
                    break
                # An older request goes first when it fits too, or when it has waited too long.
                if record["n"] <= len(free) or now - record["created"] > self.starve_s:
                    return None
            devices = tuple(free[: self.count])
            path = self.folder / f"lease-{uuid.uuid4().hex}.json"
            write_json_atomic(path, dict(self.owner, devices=list(devices), label=self.label, created=now))
            self.cancel()
            return DeviceLease(self.pool, devices, path)

    def status(self) -> str:
        """One line for the user: how many are free and how many requests are ahead."""
        with locked(self.folder):
            leases, tickets = _scan(self.folder)
        busy = {d for record in leases.values() for d in record["devices"]}
        ahead = sum(1 for path, _ in tickets if self.ticket is None or path.name < self.ticket.name)
        return (f"waiting for {self.count} {self.pool.unit}(s): {self.pool.size - len(busy & set(self.pool.ids))} "
                f"of {self.pool.size} free, {ahead} request(s) ahead")

    def wait(self, timeout_s: Optional[float] = None, poll_s: float = 0.05,
             on_wait: Optional[Callable[[str], None]] = None) -> DeviceLease:
        """Block until served; ``on_wait(message)`` is called once if it has to wait."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        told = False
        try:
            while True:
                lease = self.try_acquire()
                if lease is not None:
                    return lease
                if on_wait is not None and not told:
                    on_wait(self.status())
                    told = True
                if deadline is not None and time.monotonic() > deadline:
                    raise ClusterError(f"timed out after {timeout_s:.0f} s {self.status()}")
                time.sleep(poll_s)
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Leave the queue (idempotent)."""
        if self.ticket is not None:
            unlink_quietly(self.ticket)
            self.ticket = None


def lease_devices(count: int, *, queue: bool = True, owner_pid: Optional[int] = None, label: str = "",
                  environ: Optional[Mapping[str, str]] = None, cpu_slots: Optional[int] = None,
                  timeout_s: Optional[float] = None, on_wait: Optional[Callable[[str], None]] = None) -> DeviceLease:
    """Lease ``count`` devices of this node (see the module docstring for the order).

    ``queue=False`` (``--no-wait``) fails at once with :class:`ClusterError` when they are not
    free; asking for more than the pool has fails at once either way.
    """
    pool = detect_pool(environ, cpu_slots)
    request = DeviceRequest(count, pool, owner_pid=owner_pid, label=label, environ=environ, enqueue=False)
    # Fast path without a queue ticket: served at once when free and nobody who fits waits.
    lease = request.try_acquire()
    if lease is not None:
        return lease
    if not queue:
        raise ClusterError(f"{request.status().replace('waiting for', 'no')} and --no-wait was given; "
                           "drop --no-wait to queue")
    request.enqueue()
    return request.wait(timeout_s=timeout_s, on_wait=on_wait)


def list_device_leases(kind: str = "cpu", environ: Optional[Mapping[str, str]] = None) -> list[dict]:
    """Live leases of this node's ``kind`` (gpu|cpu) pool, oldest first."""
    folder = lease_dir(f"devices-{kind}", environ)
    with locked(folder):
        leases, _ = _scan(folder)
    return sorted(leases.values(), key=lambda record: record["created"])


def _scan(folder: Path) -> tuple[dict[Path, dict], list[tuple[Path, dict]]]:
    """Live leases and waiting tickets (oldest first); those of dead owners are removed."""
    leases: dict[Path, dict] = {}
    tickets: list[tuple[Path, dict]] = []
    for path in sorted(folder.glob("*.json")):
        record = read_json(path)
        if record is None or not owner_alive(record):
            unlink_quietly(path)
        elif path.name.startswith("lease-"):
            leases[path] = record
        else:
            tickets.append((path, record))
    return leases, tickets
