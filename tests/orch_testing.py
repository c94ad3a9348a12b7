"""Helpers shared by test modules (``from orch_testing import ...``; tests/ is on sys.path)."""

from __future__ import annotations

from typing import Any


def shipped_run(record: Any, timeout_s: float = 180.0) -> Any:
    """The MLflow run of a job, once the shipper beside it has delivered its final status
    (read back with ``MlflowClient``); fails the test when it does not arrive in time."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.runs import journal_dir, wait_shipped

    run_id = wait_shipped(journal_dir(record.output_dir), record.tracking_uri, timeout_s)
    assert run_id, f"the MLflow run of job {record.job_id} was not shipped within {timeout_s:.0f} s"
    return MlflowClient(record.tracking_uri).get_run(run_id)
