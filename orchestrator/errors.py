"""Re-export of the orch error family (defined in :mod:`cluster.errors`)."""

from cluster.errors import (  # noqa: F401
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
