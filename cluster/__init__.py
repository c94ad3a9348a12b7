"""Ports, GPU slices and the distributed environment. Standard library only (no torch)."""

from cluster.env import DistEnv
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
from cluster.gpus import DeviceLease, detect_pool, lease_devices
from cluster.hostlist import expand_hostlist
from cluster.ports import PortLease, lease_port

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
