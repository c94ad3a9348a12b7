"""A running job's progress from its ranks' heartbeats (``<output_dir>/heartbeat/rank-<r>.jsonl``,
written by :class:`detection.hooks.heartbeat.HeartbeatHook`): step of total, images per second,
ETA and when each rank last beat. Plain file reads, no MLflow, no torch: ``orch status`` and the
hang watchdog call it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional

HEARTBEAT_DIR = "heartbeat"  # detection.hooks.heartbeat.HEARTBEAT_DIR (detection is not imported here)
_RANK_FILE = re.compile(r"rank-(\d+)\.jsonl$")
WINDOW = 20  # steps over which speed and step time are measured


@dataclass(frozen=True)
class RankBeat:
    """One rank's newest beat: ``step``, ``phase`` (start/train/eval/checkpoint/end), ``time``
    (unix seconds), its ``host`` and ``pid``, and the step times of its recent beats."""

    rank: int
    step: int
    total: int
    phase: str
    time: float
    host: str
    pid: int
    step_times: tuple[float, ...] = ()
    images_per_s: Optional[float] = None


@dataclass(frozen=True)
class Progress:
    """A job's progress: the slowest rank's ``step`` of ``total``, the job's images per second,
    the ETA in seconds (None before two steps), the newest beat of any rank, and every rank."""

    step: int
    total: int
    images_per_s: Optional[float]
    eta_s: Optional[float]
    last_beat: float
    ranks: dict[int, RankBeat] = field(default_factory=dict)

    @property
    def median_step_s(self) -> Optional[float]:
        """The median step time over the ranks' recent steps (None before the first step)."""
        import statistics

        times = [t for beat in self.ranks.values() for t in beat.step_times]
        return statistics.median(times) if times else None

    def describe(self) -> str:
        """``step 120/400, 35.2 img/s, ETA 0:04:10`` (what a status column shows)."""
        text = f"step {self.step}/{self.total}"
        if self.images_per_s:
            text += f", {self.images_per_s:.1f} img/s"
        if self.eta_s is not None:
            minutes, seconds = divmod(int(self.eta_s), 60)
            text += f", ETA {minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
        return text


def read_rank(path: str, rank: int) -> Optional[RankBeat]:
    """The newest beat in one rank's heartbeat file (None when it has none yet)."""
    lines = _tail_lines(path)
    beats = []
    for line in lines:
        try:
            beats.append(json.loads(line))
        except ValueError:  # a line being written right now
            continue
    if not beats:
        return None
    last = beats[-1]
    steps = [b for b in beats if b.get("dt") is not None][-WINDOW:]
    speed = None
    if len(steps) >= 2:
        span = steps[-1]["t"] - steps[0]["t"]
        images = sum(b.get("images") or 0 for b in steps[1:])
        speed = images / span if span > 0 and images else None
    return RankBeat(rank=rank, step=int(last.get("step", 0)), total=int(last.get("total", 0)),
                    phase=str(last.get("phase", "")), time=float(last.get("t", 0.0)), host=str(last.get("host", "")),
                    pid=int(last.get("pid", 0)), step_times=tuple(float(b["dt"]) for b in steps),
                    images_per_s=speed)


def read_progress(output_dir: str) -> Optional[Progress]:
    """The progress of the run writing into ``output_dir`` (None before any rank beat)."""
    folder = os.path.join(output_dir, HEARTBEAT_DIR)
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    ranks = {}
    for name in names:
        match = _RANK_FILE.fullmatch(name)
        if match:
            beat = read_rank(os.path.join(folder, name), int(match.group(1)))
            if beat is not None:
                ranks[beat.rank] = beat
    if not ranks:
        return None
    step = min(b.step for b in ranks.values())
    total = max(b.total for b in ranks.values())
    # Every rank sees the global image count of its step: rank 0's speed is the job's speed.
    speed = ranks[min(ranks)].images_per_s
    progress = Progress(step=step, total=total, images_per_s=speed, eta_s=None,
                        last_beat=max(b.time for b in ranks.values()), ranks=ranks)
    median = progress.median_step_s
    if median is not None and total:
        progress = Progress(step, total, speed, max(0.0, (total - step) * median), progress.last_beat, ranks)
    return progress


def _tail_lines(path: str, size: int = 8192) -> list[str]:
    """The last complete lines of ``path`` (a heartbeat file stays small; this reads its end)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            handle.seek(max(0, end - size))
            data = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    lines = data.splitlines()
    if end > size and lines:
        lines = lines[1:]  # the first one is cut
    return lines


def age_s(progress: Progress, now: Optional[float] = None) -> float:
    """Seconds since any rank last beat."""
    return (now or time.time()) - progress.last_beat
