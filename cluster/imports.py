"""Importing torch, torchvision or MLflow without paying Python's cyclic garbage collector for it.

Those imports allocate millions of objects; with the collector's default thresholds it runs
hundreds of times meanwhile, the full collections walking everything imported so far. Measured
on the development machine (``perf stat``, CPU seconds of ``import detection.train, mlflow``):
3.9 s with the collector on, 2.3 s with it paused. Every training process, Ray worker, shipper
and `orch` command that tracks pays that import, so it is paid with the collector paused, and what
the imports made is then frozen (:func:`gc.freeze`): later full collections skip it.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from typing import Iterator


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """Run the block (imports) with the cyclic collector paused; then, when it imported something,
    freeze what exists, and restore the collector's state. Reference counting still frees what the
    block drops; frozen objects are never collected as cycles, so a block that imports nothing new
    (a shipper's next destination, a Ray worker's next trial) freezes nothing: a long-lived
    process's later objects stay collectable."""
    enabled, modules = gc.isenabled(), len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) != modules:
            gc.freeze()
        if enabled:
            gc.enable()
