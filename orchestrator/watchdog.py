"""The hang watchdog: whoever supervises a job's ranks (the local supervisor for local and
torchrun jobs, task 0 on Slurm, the Ray driver) asks :meth:`Watchdog.check` every few seconds;
when no rank advanced for ``runtime.hang_timeout`` (default the larger of 5 minutes and 20x the
median step time; ``runtime.startup_timeout`` until every rank began training) it returns a
:class:`Stall`, and :func:`write_report` dumps every rank's stack to
``<output_dir>/hang-<time>/rank-<r>.txt`` with the one-line reason naming the ranks that differ.
Progress is any new heartbeat line: a step, or an evaluation or checkpoint still running.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from cluster.files import write_json_atomic
from orchestrator.progress import Progress, read_progress
from orchestrator.watchdog_stacks import Where, dump_stacks, faulthandler_stacks, hang_reason, parse_faulthandler
from orchestrator.watchdog_stacks import render, where

MIN_HANG_S = 300.0
STEP_FACTOR = 20.0
REASON_FILE = "reason.txt"


@dataclass(frozen=True)
class HangSettings:
    """``runtime.hang_timeout`` (None: automatic), ``runtime.startup_timeout``, ``runtime.on_hang``."""

    hang_timeout: Optional[float] = None
    startup_timeout: float = 1800.0
    on_hang: str = "fail"

    @classmethod
    def of_config(cls, config_path: str) -> "HangSettings":
        """The settings in a resolved experiment file (defaults where it has none)."""
        from orchestrator.config.loader import read_section

        runtime = read_section(config_path, "runtime")
        return cls(hang_timeout=runtime.get("hang_timeout"),
                   startup_timeout=float(runtime.get("startup_timeout") or cls.startup_timeout),
                   on_hang=str(runtime.get("on_hang") or "fail"))

    def limit(self, median_step_s: Optional[float]) -> float:
        """Seconds without progress that make a hang once training runs."""
        if self.hang_timeout:
            return float(self.hang_timeout)
        return max(MIN_HANG_S, STEP_FACTOR * (median_step_s or 0.0))


@dataclass(frozen=True)
class Stall:
    """A hang: ``idle_s`` without progress past ``limit_s``; ``startup`` when training had not
    begun on every rank; the progress last seen."""

    idle_s: float
    limit_s: float
    startup: bool
    progress: Optional[Progress]

    def describe(self) -> str:
        if self.startup:
            return f"training did not start on every rank within runtime.startup_timeout={self.limit_s:g} s"
        step = f" at step {self.progress.step}/{self.progress.total}" if self.progress else ""
        return f"no rank advanced for {self.idle_s:.0f} s{step} (runtime.hang_timeout={self.limit_s:g} s)"


class Watchdog:
    """Watches the heartbeats of one attempt of a job of ``world_size`` ranks in ``output_dir``
    (beats older than the watchdog, left by an earlier attempt, do not count)."""

    def __init__(self, output_dir: str, settings: HangSettings, world_size: int,
                 clock: Callable[[], float] = time.monotonic, now: Callable[[], float] = time.time) -> None:
        self.output_dir, self.settings, self.world_size = output_dir, settings, max(1, world_size)
        self.clock, self.now = clock, now
        self.started, self.started_wall = clock(), now()
        self.changed = self.started
        self.seen: Any = None
        self.reported = False

    def current(self) -> Optional[Progress]:
        """This attempt's progress (ranks that beat since the watchdog started)."""
        progress = read_progress(self.output_dir)
        if progress is None:
            return None
        ranks = {r: b for r, b in progress.ranks.items() if b.time >= self.started_wall - 5.0}
        if not ranks:
            return None
        return Progress(progress.step, progress.total, progress.images_per_s, progress.eta_s,
                        max(b.time for b in ranks.values()), ranks)

    def check(self) -> Optional[Stall]:
        """A :class:`Stall` when the job hangs now, else None (also after one was reported)."""
        progress = self.current()
        key = None if progress is None else tuple(sorted((r, b.time, b.step, b.phase) for r, b in progress.ranks.items()))
        now = self.clock()
        if key != self.seen:
            self.seen, self.changed = key, now
        if progress is not None and any(b.phase == "end" for b in progress.ranks.values()):
            return None  # finishing (or failing): the exit statuses tell the rest
        started = progress is not None and len(progress.ranks) >= self.world_size
        if not started:
            idle, limit = now - self.started, self.settings.startup_timeout
        else:
            idle, limit = now - self.changed, self.settings.limit(progress.median_step_s)
        if idle < limit or self.reported:
            return None
        self.reported = True
        return Stall(idle, limit, not started, progress)


@dataclass(frozen=True)
class HangReport:
    """Where the stacks went and the one-line reason."""

    folder: str
    reason: str


def new_report_folder(output_dir: str) -> str:
    """``<output_dir>/hang-<time>`` (created)."""
    folder = os.path.join(output_dir, "hang-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(folder, exist_ok=True)
    return folder


def dump_rank(folder: str, output_dir: str, rank: int, pid: int, host: str, stall: Stall,
              in_process: bool = False) -> Where:
    """Write ``<folder>/rank-<r>.txt`` (the stacks of ``pid`` and its loader workers) and
    ``rank-<r>.json`` (where it is); returns where. ``in_process``: ``pid`` is this process (a
    Slurm task dumping itself), whose fallback is ``faulthandler.dump_traceback``."""
    threads, how = dump_stacks(pid)  # itself too: py-spy is another process, pausing this one is safe
    if not threads:  # the fallback: faulthandler, Python frames only
        if in_process:
            text = own_stacks()
        else:
            text = faulthandler_stacks(pid, os.path.join(output_dir, "heartbeat", f"rank-{rank}.stack.txt"))
        threads = parse_faulthandler(text, pid)
        how = f"{how}; faulthandler" if threads else f"{how}; faulthandler gave nothing"
    found = where(threads, pid)
    with open(os.path.join(folder, f"rank-{rank}.txt"), "w", encoding="utf-8") as handle:
        handle.write(f"rank {rank} on {host}, pid {pid}: {found.text()}\n")
        handle.write(f"stacks read with {how}; {stall.describe()}\n\n")
        handle.write(render(threads))
    write_json_atomic(os.path.join(folder, f"rank-{rank}.json"),
                      {"rank": rank, "host": host, "pid": pid, "state": found.state, "detail": found.detail})
    return found


def own_stacks() -> str:
    """This process's threads as faulthandler writes them."""
    import faulthandler
    import tempfile

    with tempfile.TemporaryFile("w+") as handle:
        faulthandler.dump_traceback(handle, all_threads=True)
        handle.seek(0)
        return handle.read()


def write_reason(folder: str, stall: Stall, wheres: dict[int, Where], hosts: dict[int, str]) -> HangReport:
    """``<folder>/reason.txt``: the one line naming the ranks that differ."""
    detail = hang_reason(wheres, hosts) if wheres else "no rank's process could be found"
    reason = f"hang: {stall.describe()}: {detail}"
    with open(os.path.join(folder, REASON_FILE), "w", encoding="utf-8") as handle:
        handle.write(reason + "\n")
    return HangReport(folder, reason)


#: Dumps ranks where they run: (report folder, {rank: (pid, host)}) -> {rank: where it is}.
RemoteDump = Callable[[str, dict[int, tuple[int, str]]], dict[int, Where]]


def write_report(output_dir: str, stall: Stall, pids: Optional[dict[int, int]] = None,
                 host: Optional[str] = None, dump_remote: Optional[RemoteDump] = None) -> HangReport:
    """Dump every rank (their heartbeat's pid, else ``pids``: rank -> pid) into
    ``<output_dir>/hang-<time>/rank-<r>.txt`` and return the reason line. ``dump_remote`` dumps
    every rank on its own node (the Ray driver: a task pinned to each rank's node); without it
    the ranks of this host are dumped here, and those of other hosts are named in the reason with
    what their heartbeat last said."""
    host = host or socket.gethostname()
    folder = new_report_folder(output_dir)
    ranks: dict[int, tuple[int, str]] = {r: (pid, host) for r, pid in (pids or {}).items()}
    if stall.progress is not None:
        ranks.update({r: (b.pid, b.host) for r, b in stall.progress.ranks.items()})
    hosts = {rank: rank_host for rank, (_, rank_host) in ranks.items()}
    if dump_remote is not None:
        return write_reason(folder, stall, dump_remote(folder, ranks), hosts)
    wheres: dict[int, Where] = {}
    for rank, (pid, rank_host) in sorted(ranks.items()):
        if rank_host != host:
            wheres[rank] = Where("on another host, not dumped")
            with open(os.path.join(folder, f"rank-{rank}.txt"), "w", encoding="utf-8") as handle:
                handle.write(f"rank {rank} runs on {rank_host} (pid {pid}); this watchdog runs on {host}\n")
            continue
        wheres[rank] = dump_rank(folder, output_dir, rank, pid, rank_host, stall)
    return write_reason(folder, stall, wheres, hosts)


def latest_report(output_dir: str) -> Optional[HangReport]:
    """The newest hang report of a run (None when it never hung)."""
    try:
        folders = sorted(n for n in os.listdir(output_dir) if n.startswith("hang-"))
    except OSError:
        return None
    if not folders:
        return None
    folder = os.path.join(output_dir, folders[-1])
    try:
        with open(os.path.join(folder, REASON_FILE), encoding="utf-8") as handle:
            reason = handle.read().strip()
    except OSError:
        reason = ""
    return HangReport(folder, reason)
