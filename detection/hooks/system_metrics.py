"""Per-slice system metrics: CPU and resident memory of the job's own process group (its ranks
and their loader workers on this node) and, where there is a GPU, utilisation, memory and power
of the job's own devices (``CUDA_VISIBLE_DEVICES``, never the node's other cards), every
``interval`` seconds, as ``system/<host>/...`` metrics in the run's journal (the shipper sends
them to MLflow with the rest; the host in the key, as MLflow's own multi-node system metrics do).

A small thread samples; it appends through its own :class:`detection.journal.Journal` handle
(whole lines, ``O_APPEND``, like the training thread's), so the loop never waits for it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any, Optional, Sequence

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
    """CPU (percent of one core, summed) and RSS of every process in process group ``pgid``."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self._procs: dict[int, Any] = {}

    def sample(self) -> dict[str, float]:
        import psutil

        cpu = rss = 0.0
        count = 0
        alive = {}
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) != self.pgid:
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


class SystemMetricsHook(Hook):
    """Samples every ``interval`` s from a thread (and at the first step and the end) into the
    journal at ``journal_folder``. Add it on the rank that writes the journal, before the journal
    hook (its last sample must come before the run's end status)."""

    def __init__(self, journal_folder: str, interval: float, *, pgid: Optional[int] = None,
                 devices: Optional[Sequence[str]] = None, host: Optional[str] = None) -> None:
        self.folder, self.interval = journal_folder, float(interval)
        self.host = host or socket.gethostname()
        self.group = GroupProbe(os.getpgid(0) if pgid is None else pgid)
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
        self._close()

    def sample(self) -> dict[str, float]:
        """One sample, written to the journal now; returns the values (keys without the prefix).
        The journal is opened at the first sample that finds it (the journal hook creates it)."""
        from detection.journal import Journal, is_journal

        with self._lock:
            values = dict(self.group.sample())
            if self.gpus is not None:
                values.update(self.gpus.sample())
            if self.journal is None and not self._closed and is_journal(self.folder):
                self.journal = Journal.open(self.folder)
            if self.journal is not None:
                step = int(getattr(self._trainer, "iter", 0))
                self.journal.log_metrics({f"system/{self.host}/{k}": v for k, v in values.items()}, step=step)
                self.journal.flush()
                self._samples += 1
            return values

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as err:  # a metric must never stop training
                log.warning("system metrics: %s; no more samples", err)
                return

    def _close(self) -> None:
        """Stop sampling; the last point is written now, before the journal hook (after this one
        in the hook list) ends the run, so that no value follows the run's end status."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.sample()
        with self._lock:
            self._closed = True
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            if self.gpus is not None:
                self.gpus.close()
