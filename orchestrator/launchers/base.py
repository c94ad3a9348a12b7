"""The launcher interface (TorchX's printable dry run, submitit's handles) and the backend table."""

from __future__ import annotations

import importlib
from typing import ClassVar, Optional, Protocol

from cluster.errors import LaunchError
from orchestrator.spec import JobSpec, JobState, Plan


class Handle(Protocol):
    """A submitted job."""

    job_id: str

    def state(self) -> JobState: ...

    def wait(self, timeout_s: Optional[float] = None) -> JobState: ...

    def cancel(self) -> None:  # idempotent
        ...


class Launcher(Protocol):
    """One backend. ``plan`` is pure (no processes, no network, no writes); ``submit`` only takes
    a :class:`Plan`, so what ``--dry-run`` showed is what runs."""

    name: ClassVar[str]

    def plan(self, jobs: list[JobSpec]) -> Plan: ...

    def submit(self, plan: Plan) -> list[Handle]: ...


# name -> "module:Class"; imported on demand so that submitit / ray load only when used.
LAUNCHERS: dict[str, str] = {
    "local": "orchestrator.launchers.local:LocalLauncher",
    "torchrun": "orchestrator.launchers.torchrun:TorchrunLauncher",
    "slurm": "orchestrator.launchers.slurm:SlurmLauncher",
    "ray": "orchestrator.launchers.ray:RayLauncher",
}


def get_launcher(name: str, **options) -> Launcher:
    """Instantiate the launcher of backend ``name``."""
    if name not in LAUNCHERS:
        raise LaunchError(f"unknown backend {name!r}; valid backends: {', '.join(LAUNCHERS)}")
    module_name, class_name = LAUNCHERS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise LaunchError(f"the {name} backend is not available yet in this orch version") from None
        raise
    return getattr(module, class_name)(**options)
