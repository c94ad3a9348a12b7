"""Per-slice system metrics: CPU and resident memory of the job's own processes on a node (the
process groups of its ranks there: the ranks and their loader workers) and, where there is a
GPU, utilisation, memory and power of the job's own devices (``CUDA_VISIBLE_DEVICES``, never the
node's other cards), every ``interval`` seconds, as ``system/<host>/...`` metrics of the run.

One sampler per host: the lowest rank on it. The host is in the metric's key, as MLflow's own
multi-node system metrics do (``system/<node id>/...``): MLflow's charts group metrics by their
prefix, so each host gets a section of its own, and one host's series are never mixed with
another's. Rank 0's sampler appends to the run's journal through its own
:class:`detection.journal.Journal` handle (whole lines, ``O_APPEND``, like the training
thread's), so the loop never waits for it. The samplers of other hosts do not write the journal
(one writer per journal file: appends from several hosts to a network file system can clobber
each other); each appends to its own ``<output_dir>/system/<host>.jsonl``, and rank 0's sampler
relays their new lines into the journal at each of its samples, with their own times and steps.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any, Iterable, Optional, Sequence, Union

from detection.hooks.base import Hook

log = logging.getLogger("detection.train")
MB = 1024 * 1024


def own_devices(environ: Optional[dict] = None, local_world_size: int = 1) -> list[str]:
    """The GPUs this job may use, as NVML knows them: ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs),
    else the first ``local_world_size`` (the devices its ranks on this node pick)."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(max(1, local_world_size))]
    return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]


class GpuProbe:
    """NVML handles of ``devices`` (indices or ``GPU-`` UUIDs; MIG instances are skipped: NVML
    reports their parent's utilisation). Empty where NVML or a GPU is missing."""

    def __init__(self, devices: Sequence[str]) -> None:
        self.handles: list[tuple[str, Any]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no nvidia-ml-py, no driver, no GPU: CPU metrics only
            return
        self.nvml = pynvml
        for device in devices:
            try:
                if device.isdigit():
                    handle = pynvml.nvmlDeviceGetHandleByIndex(int(device))
                elif device.startswith("GPU-"):
                    handle = pynvml.nvmlDeviceGetHandleByUUID(device)
                else:
                    continue
            except pynvml.NVMLError:
                continue
            self.handles.append((device, handle))

    def sample(self) -> dict[str, float]:
        """``gpu<d>/utilization_percent``, ``gpu<d>/memory_used_mb``, ``gpu<d>/power_w`` per device."""
        values: dict[str, float] = {}
        for name, handle in self.handles:
            key = f"gpu{name if name.isdigit() else name[4:12]}"
            for metric, read in (("utilization_percent", lambda h: self.nvml.nvmlDeviceGetUtilizationRates(h).gpu),
                                 ("memory_used_mb", lambda h: self.nvml.nvmlDeviceGetMemoryInfo(h).used / MB),
                                 ("power_w", lambda h: self.nvml.nvmlDeviceGetPowerUsage(h) / 1000.0)):
                try:
                    values[f"{key}/{metric}"] = float(read(handle))
                except self.nvml.NVMLError:  # e.g. power on a card without a sensor
                    continue
        return values

    def close(self) -> None:
        if self.handles:
            self.nvml.nvmlShutdown()
            self.handles = []


class GroupProbe:
    """CPU (percent of one core, summed) and RSS of every process in process group ``pgid`` (or
    in any of several: ranks on one node may each lead a group of their own, as Ray's workers do)."""

    def __init__(self, pgid: Union[int, Iterable[int]]) -> None:
        self.pgids = {pgid} if isinstance(pgid, int) else set(pgid)
        self._procs: dict[int, Any] = {}

    def sample(self) -> dict[str, float]:
        import psutil

        cpu = rss = 0.0
        count = 0
        alive = {}
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) not in self.pgids:
                    continue
                known = self._procs.get(proc.pid, proc)
                with known.oneshot():
                    usage = known.cpu_percent(None)  # since the last sample (0.0 the first time)
                    rss += known.memory_info().rss
                cpu += usage
                count += 1
                alive[proc.pid] = known
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        self._procs = alive
        return {"cpu_percent": cpu, "rss_mb": rss / MB, "processes": float(count)}


RELAY_DIR = "system"  # <output_dir>/system/<host>.jsonl: other hosts' samples, for rank 0 to relay


def samplers(places: Sequence[tuple[str, int]]) -> dict[int, set[int]]:
    """Which ranks sample their host (the lowest rank on each) and the process groups each one
    covers, from every rank's ``(host, pgid)`` in rank order."""
    first: dict[str, int] = {}
    groups: dict[int, set[int]] = {}
    for rank, (host, pgid) in enumerate(places):
        groups.setdefault(first.setdefault(host, rank), set()).add(pgid)
    return groups


def _ended(path: str) -> bool:
    """Whether a relay file ends with its host's end line."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 64))
            return handle.read().rstrip().endswith(b'{"end": true}')
    except OSError:
        return False


class SystemMetricsHook(Hook):
    """Samples every ``interval`` s from a thread (and at the first step and the end). With
    ``relay_dir`` None it writes the journal at ``journal_folder`` (rank 0; add it before the
    journal hook: its last sample must come before the run's end status) and relays what other
    hosts wrote to ``relay_from``; with ``relay_dir`` set it appends its samples to
    ``<relay_dir>/<host>.jsonl`` instead (the lowest rank of another host)."""

    def __init__(self, journal_folder: str, interval: float, *, pgid: Union[int, Iterable[int], None] = None,
                 devices: Optional[Sequence[str]] = None, host: Optional[str] = None,
                 relay_dir: Optional[str] = None, relay_from: Optional[str] = None,
                 relay_hosts: Sequence[str] = (), end_wait_s: float = 15.0) -> None:
        self.folder, self.interval = journal_folder, float(interval)
        # rank 0: the other hosts whose last samples it waits for (``end_wait_s`` at most) at the end
        self.relay_hosts, self.end_wait_s = tuple(relay_hosts), float(end_wait_s)
        self.host = host or socket.gethostname()
        self.group = GroupProbe(os.getpgid(0) if pgid is None else pgid)
        self.relay_dir, self.relay_from = relay_dir, relay_from
        self._offsets: dict[str, int] = {}
        self.devices = devices
        self.gpus: Optional[GpuProbe] = None
        self.journal: Any = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._trainer: Any = None
        self._lock = threading.Lock()
        self._samples = 0
        self._closed = False

    def before_train(self, trainer: Any) -> None:
        self._trainer = trainer
        devices = self.devices if self.devices is not None else (
            own_devices(local_world_size=trainer.env.local_world_size) if trainer.device.type == "cuda" else [])
        self.gpus = GpuProbe(devices)
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()

    def after_iter(self, trainer: Any, log: dict[str, float]) -> None:
        if self._samples == 0:  # the first point of the series (the journal exists by now)
            self.sample()

    def after_train(self, trainer: Any, result: Any) -> None:
        self._close()

    def on_error(self, trainer: Any, error: BaseException) -> None:
        self._close(wait=False)  # the other hosts may be gone

    def sample(self) -> dict[str, float]:
        """One sample, written to the journal now; returns the values (keys without the prefix).
        The journal is opened at the first sample that finds it (the journal hook creates it)."""
        from detection.journal import Journal, is_journal

        with self._lock:
            values = dict(self.group.sample())
            if self.gpus is not None:
                values.update(self.gpus.sample())
            step = int(getattr(self._trainer, "iter", 0))
            keyed = {f"system/{self.host}/{k}": v for k, v in values.items()}
            if self.relay_dir is not None:
                if not self._closed:
                    self._append_relay(keyed, step)
                return values
            if self.journal is None and not self._closed and is_journal(self.folder):
                self.journal = Journal.open(self.folder)
            if self.journal is not None:
                self.journal.log_metrics(keyed, step=step)
                self._relay()
                self.journal.flush()
                self._samples += 1
            return values

    def _append_relay(self, keyed: dict[str, float], step: int) -> None:
        """One line in this host's own file (a single writer: safe on a shared file system)."""
        os.makedirs(self.relay_dir, exist_ok=True)
        line = json.dumps({"ts": int(time.time() * 1000), "step": step, "values": keyed}) + "\n"
        with open(os.path.join(self.relay_dir, f"{self.host}.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(line)
        self._samples += 1

    def _append_end(self) -> None:
        """The relay file's last line: this host has no more samples."""
        with self._lock:
            if not self._closed and os.path.isdir(self.relay_dir):
                with open(os.path.join(self.relay_dir, f"{self.host}.jsonl"), "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"end": True}) + "\n")

    def _wait_for_ends(self) -> None:
        deadline = time.monotonic() + self.end_wait_s
        pending = [os.path.join(self.relay_from or "", f"{host}.jsonl") for host in self.relay_hosts]
        while pending and time.monotonic() < deadline:
            pending = [path for path in pending if not _ended(path)]
            if pending:
                time.sleep(0.2)

    def _relay(self) -> None:
        """Copy the other hosts' new complete lines into the journal (with their times and steps)."""
        try:
            names = sorted(n for n in os.listdir(self.relay_from or "") if n.endswith(".jsonl"))
        except OSError:
            return
        for name in names:
            path = os.path.join(self.relay_from, name)
            with open(path, "rb") as handle:
                handle.seek(self._offsets.get(path, 0))
                data = handle.read()
            end = data.rfind(b"\n") + 1  # a line still being written waits for the next time
            self._offsets[path] = self._offsets.get(path, 0) + end
            for line in data[:end].splitlines():
                try:
                    sample = json.loads(line)
                    self.journal.log_metrics(sample["values"], step=int(sample["step"]), timestamp_ms=int(sample["ts"]))
                except (ValueError, KeyError, TypeError):
                    continue

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as err:  # a metric must never stop training
                log.warning("system metrics: %s; no more samples", err)
                return

    def _close(self, wait: bool = True) -> None:
        """Stop sampling; the last point is written now, before the journal hook (after this one
        in the hook list) ends the run, so that no value follows the run's end status."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.relay_dir is not None:
            self.sample()
            self._append_end()
        else:
            # No collective follows the last step: another host's last samples may still be on the
            # way when rank 0 ends (seen with a 1-step run under load); wait for their end lines.
            if wait:
                self._wait_for_ends()
            self.sample()
        with self._lock:
            self._closed = True
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            if self.gpus is not None:
                self.gpus.close()
