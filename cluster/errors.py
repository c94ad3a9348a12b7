"""The one error family of orch.

It lives in ``cluster`` (the standard-library-only base layer) so that ``detection``, ``cluster``
and ``orchestrator`` can all raise it without ``detection`` importing ``orchestrator``.
The CLI turns any :class:`OrchError` into one line on stderr and exit code 2 (user error) or,
for :class:`JobFailed`, exit code 1.
"""

from __future__ import annotations


class OrchError(Exception):
    """Base of every error orch raises on purpose. ``str(err)`` is the one line the user sees:
    what was wrong, where, and how to fix it."""

    exit_code = 2


class ConfigError(OrchError):
    """An experiment file, a ``--set`` override or a command-line option is wrong."""


class DataError(OrchError):
    """A dataset (COCO JSON, image folder) is missing or malformed."""


class ClusterError(OrchError):
    """Ports, GPU leases or the distributed environment could not be set up."""


class LaunchError(OrchError):
    """A backend could not start (or plan) a job: missing tool, unreachable cluster, bad option."""


class JobNotFound(OrchError):
    """``orch status/logs/cancel`` was given a job id that no record holds."""


class TrainingError(OrchError):
    """Training itself failed in a way the user must act on (NaN loss, diverged run)."""

    exit_code = 1


class JobFailed(OrchError):
    """A job that was started ended with a non-zero status."""

    exit_code = 1
