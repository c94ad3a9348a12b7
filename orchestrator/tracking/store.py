"""The MLflow side of shipping: clients, experiments and finding a journal's run.

- SQLite stores: the first client of a process creates the tables under a machine-wide lock
  (32 shippers starting on a fresh ``mlflow.db`` at once would race in the schema migration)
  and switches the file to WAL mode on local disks, where readers (``mlflow ui``) no longer
  wait for the writer. MLflow sets a 20 s busy timeout on every session, yet its sessions read
  then write in one transaction, which SQLite fails at once ("database is locked") when another
  writer got in between, in WAL mode too (bench_journal.py: 24 writers, 3-7 failed calls either
  way): the shipper retries those calls (``replay.Shipment.call``), the journal keeps the values.
  On NFS/Lustre WAL cannot work and SQLite locking is unreliable: a warning says to use a server.
- Experiments are created with MLflow 3's experiment-kind tag (earlier 3.x UIs open a tagged
  experiment on its runs table). The 3.17 UI ignores it: a GenAI / model-training switch, kept in
  the browser and GenAI at first, decides, so the links orch prints carry the training view
  (``runs.ui_url``); a bare ``/#/experiments/<id>`` opens the GenAI overview.
- A journal's run is the run tagged ``orch.journal_id=<id>``: a shipper looks it up before it
  creates one, so a crash between "created" and "cursor saved", or a run folder synced again
  from another machine, finds the same run.

mlflow is imported inside functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import tempfile
from typing import Any, Iterator, Optional

from cluster.files import file_lock
from cluster.imports import heavy_imports
from cluster.retry import retry

log = logging.getLogger(__name__)

JOURNAL_TAG = "orch.journal_id"
PARENT_TAG = "mlflow.parentRunId"
# The tag and value MLflow 3 UIs read (server/js bundle: "Machine learning", i.e. custom model
# development); 3.17 shows it as the experiment's type but opens pages by its workflow switch.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "beegfs", "glusterfs", "fuse")

_clients: dict[str, Any] = {}


def quiet_store_logs() -> None:
    """Silence the full traceback MLflow's SQL store logs at ERROR for each "database is
    locked" it raises (the shipper retries those and logs one line). For process entry points."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def sqlite_path(uri: str) -> Optional[str]:
    """The database file of a ``sqlite:///`` URI, else None."""
    return os.path.abspath(uri[len("sqlite:///"):].split("?")[0]) if uri.startswith("sqlite:///") else None


def filesystem_type(path: str) -> str:
    """The type of the file system holding ``path`` (the longest mount point above it; '' if
    unknown)."""
    import psutil

    best, kind = "", ""
    try:
        partitions = psutil.disk_partitions(all=True)
    except OSError:
        return kind
    for part in partitions:
        mount = part.mountpoint
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, part.fstype
    return kind


@contextlib.contextmanager
def _machine_lock(name: str) -> Iterator[None]:
    """An exclusive lock shared by this machine's processes (a file in the temp folder, so
    nothing is added beside the user's database)."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    with file_lock(os.path.join(tempfile.gettempdir(), f"orch-{os.getuid()}-{digest}.lock")):
        yield


def _enable_wal(path: str) -> None:
    """Switch a local SQLite file to WAL (persistent; skipped quietly while it is busy)."""
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as con:
            if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as err:
        log.debug("WAL mode not set on %s: %s", path, err)


def open_client(uri: str) -> tuple[Any, list[str]]:
    """An ``MlflowClient`` for ``uri`` (one per process and URI) and warnings about the store."""
    if uri in _clients:
        return _clients[uri], []
    with heavy_imports():
        from mlflow.tracking import MlflowClient
    # Ending a run on a server prints two "View run" lines to stdout (and costs a get_run):
    # one per journal would bury the shipper's and orch sync's own summary.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    warnings: list[str] = []
    path = sqlite_path(uri)
    if path is None:
        client = MlflowClient(tracking_uri=uri)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fs = filesystem_type(path)
        with _machine_lock(path):
            client = MlflowClient(tracking_uri=uri)  # creates or migrates the tables
            if fs.split(".")[0] in NETWORK_FS:
                warnings.append(f"SQLite store {path} is on {fs}: SQLite locking is unreliable there; "
                                "use an mlflow server (--uri http://HOST:PORT) for shared folders")
            else:
                _enable_wal(path)
    _clients[uri] = client
    return client, warnings


def artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Where a new experiment's artifacts go: beside a local SQLite store
    (``<db folder>/mlartifacts/<experiment>``) instead of MLflow's default ``./mlruns`` of
    whatever the current directory is; ``None`` (the server decides) for other stores."""
    import re

    path = sqlite_path(uri)
    if path is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment) or "default"
    return "file://" + os.path.join(os.path.dirname(path), "mlartifacts", safe)


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created (with the experiment-kind tag) when missing.
    An existing experiment without a kind gets it; one with another kind is left alone."""
    from mlflow.exceptions import MlflowException

    def find_or_create() -> str:
        found = client.get_experiment_by_name(name)
        if found is not None:
            if EXPERIMENT_KIND_TAG not in (found.tags or {}):
                client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return found.experiment_id
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})

    try:  # several shippers may create the same experiment at once: the losers find it next time
        return retry(find_or_create, 6, delay_s=0.2, max_delay_s=1.0,
                     retry_if=lambda err: isinstance(err, MlflowException))
    except MlflowException as err:
        raise RuntimeError(f"MLflow experiment {name!r} could neither be found nor created at "
                           f"{client.tracking_uri}: {err}") from err


def find_run(client: Any, experiment: str, journal_id: str) -> Optional[Any]:
    """The run of journal ``journal_id`` in experiment id ``experiment`` (oldest if several)."""
    runs = client.search_runs([experiment], filter_string=f"tags.`{JOURNAL_TAG}` = '{journal_id}'",
                              order_by=["attributes.start_time ASC"], max_results=5)
    return runs[0] if runs else None


def create_run(client: Any, experiment: str, meta: dict[str, Any], parent_run_id: Optional[str]) -> Any:
    """A new run for the journal ``meta``: named after it, tagged with its id (and its parent),
    started at the journal's creation time."""
    tags = {JOURNAL_TAG: meta["journal_id"]}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    return client.create_run(experiment, start_time=meta.get("created_ms"), tags=tags, run_name=meta.get("run_name"))


__all__ = ["EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "JOURNAL_TAG", "PARENT_TAG", "create_run", "experiment_id",
           "filesystem_type", "find_run", "open_client",
           "quiet_store_logs", "sqlite_path"]
