"""Rank-aware logging, set up in one place for every orch process (CLI, worker, supervisor,
drivers, training). Standard library only."""

from __future__ import annotations

import logging
from typing import Optional

DATEFMT = "%H:%M:%S"


def setup_logging(rank: Optional[int] = None, level: Optional[int] = None, force: bool = False) -> None:
    """Give the root logger one stderr handler whose lines say which rank wrote them.

    ``rank`` None is a process that is no rank (a supervisor, a driver). Rank 0 and non-ranks log
    INFO; other ranks only WARNING, so a 16-rank job does not print everything 16 times. A process
    that already configured logging keeps its handlers unless ``force``.
    """
    who = f"[rank {rank}] " if rank is not None else ""
    if level is None:
        level = logging.INFO if not rank else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s {who}%(levelname)s %(name)s: %(message)s",
                        datefmt=DATEFMT, force=force)
    logging.getLogger().setLevel(level)
