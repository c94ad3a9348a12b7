"""Hooks around the training loop (see :class:`Hook`). ``JournalHook`` lives in
:mod:`detection.journal_hook`.

Importing this package (or :mod:`detection.hooks.base`) does not import torch, so launchers can
subclass :class:`Hook` at module level; the torch-using hooks load on first access.
"""

from importlib import import_module
from typing import Any

from detection.hooks.base import Hook

_LAZY = {
    "CheckpointHook": "detection.hooks.checkpoint",
    "EvalHook": "detection.hooks.evaluation",
    "HeartbeatHook": "detection.hooks.heartbeat",
    "LoggerHook": "detection.hooks.logger",
    "LRSchedulerHook": "detection.hooks.lr",
    "SystemMetricsHook": "detection.hooks.system_metrics",
    "lr_at": "detection.hooks.lr",
    "lr_schedule": "detection.hooks.lr",
}

__all__ = ["Hook", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detection.hooks' has no attribute {name!r}")
