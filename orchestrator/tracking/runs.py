"""The life of an MLflow run, on the orchestrator side: where the store is, which experiment a run
belongs to, creating a run (nested or not) before launch, reopening it on a resume, closing it
when its job could not.

Identity is decided before launch (STYLE.md): every job, fold, grid point and sweep trial gets
its run here, in ONE MLflow experiment per experiment file (``tracking.experiment``, default the
experiment's ``name``), so that ``mlflow ui`` shows parents with their children nested under
them (the UI nests only inside one experiment). mlflow is imported inside the functions.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Mapping, Optional

from detection.tracking import resolve_tracking_uri

__all__ = [
    "absolute_uri", "client", "close_run", "create_run", "experiment_id", "experiment_name", "is_active",
    "log_params", "reopen", "resolve_tracking_uri", "tracking_uri_of",
]

PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
MAX_PARAM_VALUE = 6000


def absolute_uri(uri: str) -> str:
    """A SQLite URI with its file made absolute, so workers in other folders (or on other nodes
    sharing the filesystem) write to the same store; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def tracking_uri_of(exp: Any) -> str:
    """The absolute tracking URI an experiment logs to (``tracking.uri``, ``MLFLOW_TRACKING_URI``,
    else ``./mlflow.db``)."""
    return absolute_uri(resolve_tracking_uri(exp.tracking))


def experiment_name(exp: Any) -> str:
    """The MLflow experiment of an experiment file: ``tracking.experiment``, else its ``name``.
    Every job, fold, grid point and trial of that file goes there."""
    return exp.tracking.experiment or exp.name


def client(uri: str):
    """An ``MlflowClient`` for ``uri``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Where a new experiment's artifacts go: beside a local SQLite store
    (``<db folder>/mlartifacts/<experiment>``) instead of MLflow's default ``./mlruns`` of
    whatever the current directory is; ``None`` (the server decides) for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):]))
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment) or "default"
    return "file://" + os.path.join(folder, "mlartifacts", safe)


def experiment_id(mlflow_client: Any, name: str) -> str:
    """The id of MLflow experiment ``name``, created when missing (several jobs may create the
    same experiment at once: the loser of the race finds the winner's)."""
    from mlflow.exceptions import MlflowException

    for _ in range(5):
        found = mlflow_client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return mlflow_client.create_experiment(
                name, artifact_location=artifact_location(mlflow_client.tracking_uri, name))
        except MlflowException:
            time.sleep(0.2)
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        raise RuntimeError(f"MLflow experiment {name!r} could not be created")
    return found.experiment_id


def create_run(uri: str, experiment: str, run_name: str, tags: Optional[Mapping[str, Any]] = None,
               parent_run_id: Optional[str] = None) -> str:
    """Create a RUNNING run named ``run_name`` in MLflow experiment ``experiment`` and return its
    id; ``parent_run_id`` nests it under a parent of the same experiment."""
    mlflow_client = client(uri)
    all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(experiment_id(mlflow_client, experiment), tags=all_tags, run_name=run_name)
    return run.info.run_id


def is_active(uri: str, run_id: Optional[str]) -> bool:
    """Whether run ``run_id`` exists and is not deleted (a resumed set reuses it)."""
    if not run_id:
        return False
    try:
        return client(uri).get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - a deleted store or run: the caller creates a new one
        return False


def reopen(uri: str, run_id: str) -> None:
    """Mark a finished run RUNNING again (a resumed k-fold set continues its parents)."""
    mlflow_client = client(uri)
    if mlflow_client.get_run(run_id).info.status != "RUNNING":
        mlflow_client.update_run(run_id, status="RUNNING")


def close_run(uri: str, run_id: str, status: str = "FAILED", only_if_running: bool = True) -> bool:
    """End run ``run_id`` with ``status`` (FINISHED, FAILED, KILLED). With ``only_if_running`` a
    run that its training already ended keeps its status. Returns True when closed here."""
    mlflow_client = client(uri)
    if only_if_running and mlflow_client.get_run(run_id).info.status != "RUNNING":
        return False
    mlflow_client.set_terminated(run_id, status=status)
    return True


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Log ``params`` (keys and values cut to MLflow's limits) in batches of 100."""
    from mlflow.entities import Param

    items = [Param(str(k)[:250], str(v)[:MAX_PARAM_VALUE]) for k, v in params.items()]
    mlflow_client = client(uri)
    for start in range(0, len(items), PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=items[start:start + PARAMS_PER_BATCH])
