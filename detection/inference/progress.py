"""Progress of a prediction run: a tqdm bar on a terminal, a plain log line every few seconds
otherwise (a log file or a CI console would fill up with a bar's redraws)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

log = logging.getLogger("detection.inference")

PLAIN_EVERY_S = 10.0


class Progress:
    """Counts images (and video frames) done out of ``total`` (None when unknown)."""

    def __init__(self, total: Optional[int], what: str = "images", stream: Any = None) -> None:
        self.total, self.what = total, what
        self.done = 0
        self.start = time.perf_counter()
        self._last = self.start
        stream = stream or sys.stderr
        self._bar = None
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", desc="predict", file=stream, dynamic_ncols=True)

    @property
    def seconds(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """Images per second so far."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def update(self, count: int) -> None:
        """``count`` more done."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.perf_counter()
        if now - self._last >= PLAIN_EVERY_S:
            self._last = now
            of = f"/{self.total}" if self.total else ""
            log.info("predict: %d%s %s, %.1f %s/s", self.done, of, self.what, self.rate, self.what)

    def close(self) -> None:
        """End the bar."""
        if self._bar is not None:
            self._bar.close()
