"""The hang watchdog inside the ranks, for backends where no process of orch sits beside them
on every node (Slurm: task 0 supervises; every task dumps its own stack when asked).

Every rank runs a small thread. Rank 0's reads the heartbeats (:class:`~orchestrator.watchdog.
Watchdog`); on a hang it creates ``<output_dir>/hang-<time>/`` and writes the request file
``<output_dir>/heartbeat/hang-request.json``; every rank's thread (on whatever node) sees it,
dumps its own process and loader workers into ``rank-<r>.txt`` / ``rank-<r>.json``; rank 0 waits
for them (shared output folder), writes the reason line and calls ``on_hang`` with the report.
A blocked main thread does not stop these threads (a blocked read or a collective releases the GIL).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Optional

from cluster.files import write_json_atomic
from orchestrator.watchdog import HangReport, HangSettings, Stall, Watchdog, dump_rank, new_report_folder, write_reason
from orchestrator.watchdog_stacks import Where

log = logging.getLogger(__name__)
REQUEST = "hang-request.json"
POLL_S = 5.0
GATHER_S = 90.0  # how long rank 0 waits for the other ranks' dumps


class TaskWatchdog:
    """The watchdog thread of one rank (start with :meth:`start`, end with :meth:`stop`)."""

    def __init__(self, output_dir: str, settings: HangSettings, rank: int, world_size: int,
                 on_hang: Callable[[HangReport], None], poll_s: float = POLL_S) -> None:
        self.output_dir, self.settings, self.rank, self.world_size = output_dir, settings, rank, world_size
        self.on_hang, self.poll_s = on_hang, poll_s
        self.request_path = os.path.join(output_dir, "heartbeat", REQUEST)
        self.watchdog = Watchdog(output_dir, settings, world_size) if rank == 0 else None
        self.started_wall = time.time()
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._dumped: set[str] = set()

    def start(self) -> "TaskWatchdog":
        self._thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._step()
            except Exception as err:  # the watchdog must never take training down
                log.warning("hang watchdog: %s", err)

    def _step(self) -> None:
        request = self._request()
        if request is not None and request["folder"] not in self._dumped:
            self._dump(request["folder"], Stall(**{**request["stall"], "progress": None}))
        if self.watchdog is None:
            return
        stall = self.watchdog.check()
        if stall is None:
            return
        folder = new_report_folder(self.output_dir)
        write_json_atomic(self.request_path, {"folder": folder, "at": time.time(), "stall": {
            "idle_s": stall.idle_s, "limit_s": stall.limit_s, "startup": stall.startup}})
        self._dump(folder, stall)
        report = self._gather(folder, stall)
        log.error("%s; stacks in %s", report.reason, report.folder)
        self.on_hang(report)

    def _request(self) -> Optional[dict]:
        try:
            with open(self.request_path, encoding="utf-8") as handle:
                request = json.load(handle)
        except (OSError, ValueError):
            return None
        return request if request.get("at", 0) >= self.started_wall - 5.0 else None

    def _dump(self, folder: str, stall: Stall) -> None:
        self._dumped.add(folder)
        dump_rank(folder, self.output_dir, self.rank, os.getpid(), self.host, stall, in_process=True)

    def _gather(self, folder: str, stall: Stall) -> HangReport:
        deadline = time.monotonic() + GATHER_S
        wheres: dict[int, Where] = {}
        hosts: dict[int, str] = {}
        while True:
            for rank in range(self.world_size):
                try:
                    with open(os.path.join(folder, f"rank-{rank}.json"), encoding="utf-8") as handle:
                        data = json.load(handle)
                except (OSError, ValueError):
                    continue
                wheres[rank], hosts[rank] = Where(data["state"], data["detail"]), data["host"]
            if len(wheres) == self.world_size or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        for rank in range(self.world_size):
            if rank not in wheres:  # its thread did not answer: the whole process may be stuck
                beat = stall.progress.ranks.get(rank) if stall.progress else None
                wheres[rank] = Where("did not answer the dump request")
                hosts[rank] = beat.host if beat else ""
        return write_reason(folder, stall, wheres, hosts)
