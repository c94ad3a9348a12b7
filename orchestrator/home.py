"""Where orch keeps its own state on this machine: ``$ORCH_HOME``, else ``~/.orch`` (job records,
the shippers' registries, k-fold set ids, Slurm answers)."""

from __future__ import annotations

import os
from pathlib import Path


def orch_home() -> Path:
    """``$ORCH_HOME`` or ``~/.orch``."""
    return Path(os.environ.get("ORCH_HOME") or Path.home() / ".orch").expanduser()
