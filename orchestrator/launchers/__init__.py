"""The backend registry: names to launcher classes, imported on demand so that submitit and ray
load only when their backend is used. The only place a module is looked up by name.

One package (or module) per backend: ``local/`` (this node's GPU slices: its supervisor and
process control), ``torchrun`` (the local backend with torchrun agents, on one node or several),
``slurm/`` (submitit), ``ray/`` (Ray Train). Backends never import each other, except that
``torchrun`` is the local backend with other command lines (it subclasses ``LocalLauncher``).
"""

from __future__ import annotations

import importlib

from cluster.errors import LaunchError
from orchestrator.launchers.base import Launcher, Plan
from orchestrator.spec import JobRecord

__all__ = ["LAUNCHERS", "Launcher", "Plan", "get_launcher", "launcher_for"]

# name -> "module:Class"
LAUNCHERS: dict[str, str] = {
    "local": "orchestrator.launchers.local:LocalLauncher",
    "torchrun": "orchestrator.launchers.torchrun:TorchrunLauncher",
    "slurm": "orchestrator.launchers.slurm:SlurmLauncher",
    "ray": "orchestrator.launchers.ray:RayLauncher",
}


def get_launcher(name: str) -> Launcher:
    """An instance of the launcher of backend ``name``."""
    if name not in LAUNCHERS:
        raise LaunchError(f"unknown backend {name!r}; valid backends: {', '.join(LAUNCHERS)}")
    module_name, class_name = LAUNCHERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


def launcher_for(record: JobRecord) -> Launcher:
    """The launcher that owns ``record``."""
    return get_launcher(record.backend)
