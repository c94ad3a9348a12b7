"""Trying a call again after transient failures, with a growing pause. Standard library only.

One helper instead of a loop per call site: the number of tries, the pause and its growth, which
errors are worth another try and what to say before it are arguments, so each caller states its
policy in one line."""

from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def retry(call: Callable[[], T], attempts: int, delay_s: float = 0.5, backoff: float = 2.0,
          max_delay_s: float = 8.0, retry_if: Callable[[Exception], bool] = lambda err: True,
          on_retry: Optional[Callable[[Exception, float], None]] = None,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, tried up to ``attempts`` times while it raises an ``Exception`` that
    ``retry_if`` accepts. The pause before try ``k + 1`` (from 0) is ``delay_s * backoff**k``,
    at most ``max_delay_s``; ``on_retry(error, pause)`` is told before each pause (to log one
    line). The last error, or one ``retry_if`` refuses, is raised as it is."""
    if attempts < 1:
        raise ValueError(f"attempts={attempts}: at least 1")
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - retry_if decides which are transient
            if attempt + 1 == attempts or not retry_if(err):
                raise
            pause = min(delay_s * backoff ** attempt, max_delay_s)
            if on_retry is not None:
                on_retry(err, pause)
            sleep(pause)
    raise AssertionError("unreachable")


__all__ = ["retry"]
