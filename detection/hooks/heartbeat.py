"""The heartbeat: every rank appends one short JSON line per step (and per phase change) to
``<output_dir>/heartbeat/rank-<r>.jsonl``, no collective involved, so whoever supervises the job
(a hang watchdog, ``orch status``'s progress) can tell which rank stopped advancing and where.

A line: ``{"t": unix time, "step": n, "total": max_iters, "phase": "start|train|eval|checkpoint|end",
"dt": seconds of the step, "images": images of the step (all ranks), "pid": ..., "host": ...}``.

Evaluation and checkpoint writing count as progress: while the rank is in one of those phases a
small thread repeats the beat every ``tick_s`` seconds (never longer than ``max_phase_s``: an
evaluation stuck past the collective timeout is a hang again). The file is kept small: past
``max_bytes`` it is rewritten with its last lines.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import threading
import time
from typing import Any, Optional

from detection.hooks.base import Hook, due

HEARTBEAT_DIR = "heartbeat"
STACK_SIGNAL = signal.SIGUSR1  # orchestrator.watchdog_stacks sends it where py-spy cannot read the stacks
KEEP_LINES = 50


def heartbeat_path(output_dir: str, rank: int) -> str:
    """Where rank ``rank`` of a run with ``output_dir`` writes its beats."""
    return os.path.join(output_dir, HEARTBEAT_DIR, f"rank-{rank}.jsonl")


class HeartbeatHook(Hook):
    """Writes this rank's beats. ``eval_period``/``checkpoint_period`` (with ``unit``) say which
    steps are followed by an evaluation or a checkpoint, so the beat announces those phases before
    they start (0: never)."""

    def __init__(self, output_dir: str, rank: int, *, unit: str = "epoch", eval_period: int = 0,
                 checkpoint_period: int = 0, tick_s: float = 30.0, max_phase_s: float = 600.0,
                 max_bytes: int = 16384) -> None:
        self.path = heartbeat_path(output_dir, rank)
        self.unit, self.eval_period, self.checkpoint_period = unit, eval_period, checkpoint_period
        self.tick_s, self.max_phase_s, self.max_bytes = tick_s, max_phase_s, max_bytes
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._lock = threading.Lock()
        self._handle: Any = None
        self._last: dict[str, Any] = {}
        self._phase_since: Optional[float] = None
        self._ticker: Optional[threading.Thread] = None
        self._wake = threading.Event()
        self._stack_file: Any = None

    # -- hook methods ----------------------------------------------------------------------------
    def before_train(self, trainer: Any) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._register_stacks()
        self.beat(trainer, "start")

    def after_iter(self, trainer: Any, log: dict[str, float]) -> None:
        phase = "train"
        if self.eval_period and due(trainer, self.eval_period, self.unit):
            phase = "eval"
        elif self.checkpoint_period and due(trainer, self.checkpoint_period, self.unit):
            phase = "checkpoint"
        self.beat(trainer, phase, dt=round(float(log.get("time", 0.0)), 4), images=log.get("images"))

    def after_epoch(self, trainer: Any) -> None:
        if self.unit != "epoch" or trainer.iter == trainer.max_iters:
            return
        epochs = trainer.epoch + 1
        if self.eval_period and epochs % self.eval_period == 0:
            self.beat(trainer, "eval")
        elif self.checkpoint_period and epochs % self.checkpoint_period == 0:
            self.beat(trainer, "checkpoint")

    def after_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        checkpoint_next = self.checkpoint_period and (
            due(trainer, self.checkpoint_period, self.unit) if self.unit == "iter"
            else trainer.iter % trainer.iters_per_epoch == 0 and (trainer.epoch + 1) % self.checkpoint_period == 0)
        self.beat(trainer, "checkpoint" if checkpoint_next else "train")

    def after_checkpoint(self, trainer: Any, path: str) -> None:
        self.beat(trainer, "train")

    def after_train(self, trainer: Any, result: Any) -> None:
        self.beat(trainer, "end")
        self._close()

    def on_error(self, trainer: Any, error: BaseException) -> None:
        self.beat(trainer, "end")
        self._close()

    # -- writing ---------------------------------------------------------------------------------
    def beat(self, trainer: Any, phase: str, **fields: Any) -> None:
        """Append one line now; start or stop the ticker of an eval/checkpoint phase."""
        line = {"t": round(time.time(), 3), "step": int(trainer.iter), "total": int(trainer.max_iters),
                "phase": phase, **{k: v for k, v in fields.items() if v is not None},
                "pid": self.pid, "host": self.host}
        self._write(line)
        if phase in ("eval", "checkpoint"):
            self._phase_since = self._phase_since or time.monotonic()
            self._start_ticker()
        else:
            self._phase_since = None
            self._wake.set()

    def _write(self, line: dict[str, Any]) -> None:
        with self._lock:
            self._last = line
            if self._handle is None:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._handle = open(self.path, "a", encoding="utf-8")
            self._handle.write(json.dumps(line) + "\n")
            self._handle.flush()
            if self._handle.tell() > self.max_bytes:
                self._shrink()

    def _shrink(self) -> None:
        """Keep the last lines only (the readers need a window of recent steps, not the history)."""
        self._handle.close()
        with open(self.path, encoding="utf-8") as handle:
            lines = handle.readlines()[-KEEP_LINES:]
        while len(lines) > 2 and sum(map(len, lines)) > self.max_bytes // 2:
            lines = lines[1:]
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
        os.replace(tmp, self.path)
        self._handle = open(self.path, "a", encoding="utf-8")

    def _start_ticker(self) -> None:
        if self._ticker is not None and self._ticker.is_alive():
            if not self._wake.is_set():
                return
            self._ticker.join(1.0)  # told to stop a moment ago: let it end, then start a fresh one
        self._wake.clear()
        self._ticker = threading.Thread(target=self._tick, name="heartbeat", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._wake.wait(self.tick_s):
            since = self._phase_since
            if since is None or time.monotonic() - since > self.max_phase_s:
                return
            self._write({**self._last, "t": round(time.time(), 3)})

    def _register_stacks(self) -> None:
        """The watchdog's fallback: ``STACK_SIGNAL`` writes every thread's Python stack to
        ``rank-<r>.stack.txt`` beside the heartbeat (faulthandler: safe in any state)."""
        try:
            self._stack_file = open(self.path.replace(".jsonl", ".stack.txt"), "a", encoding="utf-8")
            faulthandler.register(STACK_SIGNAL, file=self._stack_file, all_threads=True)
        except (OSError, ValueError, RuntimeError):  # not the main interpreter, or no such signal
            self._stack_file = None

    def _close(self) -> None:
        self._wake.set()
        if self._stack_file is not None:
            faulthandler.unregister(STACK_SIGNAL)
            self._stack_file.close()
            self._stack_file = None
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
