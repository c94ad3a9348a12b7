"""Ports, GPU slices and the distributed environment. Standard library only (no torch)."""

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
    "JobFailed",
    "JobNotFound",
    "LaunchError",
    "OrchError",
    "TrainingError",
]
