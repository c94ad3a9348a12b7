"""Ports, GPU slices and the distributed environment. Standard library only (no torch).

The names below are loaded on first use, so that importing one small module (``cluster.errors``,
as every ``orch`` command does) does not import all of them (and psutil)."""

from __future__ import annotations

from cluster.errors import (
    ClusterError,
    ConfigError,
    DataError,
    JobFailed,
    JobNotFound,
    LaunchError,
    OrchError,
    TrainingError,
)

__all__ = [
    "ClusterError",
    "ConfigError",
    "DataError",
    "DeviceLease",
    "DistEnv",
    "JobFailed",
    "JobNotFound",
    "LaunchError",
    "OrchError",
    "PortLease",
    "TrainingError",
    "detect_pool",
    "expand_hostlist",
    "lease_devices",
    "lease_port",
]


def __getattr__(name: str):
    if name == "DistEnv":
        from cluster.env import DistEnv

        return DistEnv
    if name in ("DeviceLease", "detect_pool", "lease_devices"):
        from cluster import gpus

        return getattr(gpus, name)
    if name in ("PortLease", "lease_port"):
        from cluster import ports

        return getattr(ports, name)
    if name == "expand_hostlist":
        from cluster.hostlist import expand_hostlist

        return expand_hostlist
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
