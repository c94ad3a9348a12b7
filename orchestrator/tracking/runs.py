"""The life of a run, on the orchestrator side: its identity (a journal, created before launch),
where it goes (tracking URI, one MLflow experiment per experiment file), who ships it, and how
it ends when its training could not end it.

Every MLflow run orch makes (a job, a fold, a k-fold or grid parent, a sweep and its trials) is
first a journal (:mod:`detection.journal`) in the run's folder, created here before anything
runs, with the tracking URI it is made for; this host's shipper
(:mod:`orchestrator.tracking.host_shipper`, one process for every journal registered on the host)
creates the MLflow run from it, nested under its parent's run in the parent's experiment, and
replays every value exactly once. The run id is known once the journal was shipped
(:func:`run_id_of`).

``tracking.mode``: ``auto`` ships when the server is reachable and keeps journaling (with one
warning) when it is not; ``online`` refuses to submit when the server does not answer;
``offline`` never ships during the job (``orch sync`` later).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import urllib.parse
from typing import Any, Mapping, Optional

from cluster.errors import LaunchError
from detection.journal import TERMINAL, Journal, is_journal, journal_dir, last_status
from orchestrator.spec import JobRecord, JobState

log = logging.getLogger(__name__)

REACH_TIMEOUT_S = 3.0

MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"  # where `mlflow ui` serves unless told otherwise
# MLflow 3.17's UI picks between its GenAI pages and its model-training pages by a switch kept in
# the browser (GenAI at first) or given in the URL; the experiment-kind tag no longer decides.
UI_TRAINING_VIEW = "workflowType=machine_learning"

__all__ = [
    "absolute_uri", "close_journal", "create_journal", "end_job_run", "ensure_shipping", "experiment_id_of", "experiment_name",
    "fully_shipped", "journal_dir", "reachable", "require_reachable", "resolve_tracking_uri", "run_id_of",
    "start_shipper", "tracking_uri_of", "ui_hint", "ui_url", "wait_shipped",
]


def resolve_tracking_uri(tracking: Any) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    if getattr(tracking, "uri", None):
        return str(tracking.uri)
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(os.getcwd(), 'mlflow.db')}"


def absolute_uri(uri: str) -> str:
    """A SQLite URI with its file made absolute, so workers in other folders (or on other nodes
    sharing the filesystem) write to the same store; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def tracking_uri_of(exp: Any) -> str:
    """The absolute tracking URI an experiment's runs ship to."""
    return absolute_uri(resolve_tracking_uri(exp.tracking))


def experiment_name(exp: Any) -> str:
    """The MLflow experiment of an experiment file: ``tracking.experiment``, else its ``name``.
    Every job, fold, grid point and sweep trial of that file goes there."""
    return exp.tracking.experiment or exp.name


def create_journal(folder: str, exp: Any, run_name: str, tags: Optional[Mapping[str, Any]] = None,
                   parent: Optional[str] = None, resume: bool = False, durable: bool = True) -> Journal:
    """The journal of a new run in ``folder`` (the run's identity, decided before launch).

    An existing journal there is continued when ``resume`` (a resumed job, a retried fold, a
    resumed set: the same MLflow run goes on); otherwise it is moved aside (``journal.<time>``,
    still found by ``orch sync``) so that a fresh run gets a fresh MLflow run. ``durable=False``:
    the caller fsyncs ``Journal.paths_to_sync(folder)`` itself, with other journals at once."""
    if is_journal(folder):
        if resume:
            journal = Journal.open(folder)
            journal.set_tags({str(k): str(v) for k, v in (tags or {}).items()})
            return journal
        os.replace(folder, f"{folder}.{time.strftime('%Y%m%d-%H%M%S')}")
    return Journal.create(folder, experiment=experiment_name(exp), run_name=run_name,
                          tags={str(k): str(v) for k, v in (tags or {}).items()}, parent=parent,
                          tracking_uri=tracking_uri_of(exp), durable=durable)


def close_journal(folder: str, status: str, error: Optional[str] = None) -> bool:
    """End the run of journal ``folder`` with ``status`` (FAILED / KILLED / FINISHED) unless its
    training already did; ``error`` (one line) becomes the tag ``orch.error``. True when the
    status was written here."""
    if not is_journal(folder) or last_status(folder) in TERMINAL:
        return False
    with Journal.open(folder) as journal:
        if error:
            journal.set_tags({"orch.error": error[:5000]})
        journal.set_status(status)
    return True


def run_id_of(folder: str, uri: Optional[str]) -> Optional[str]:
    """The MLflow run id of journal ``folder`` at ``uri``, once it was shipped there."""
    if not uri or not is_journal(folder):
        return None
    from orchestrator.tracking.cursor import shipped_run_id

    return shipped_run_id(folder, uri)


def experiment_id_of(folder: str, uri: Optional[str]) -> Optional[str]:
    """The MLflow experiment id of journal ``folder``'s run at ``uri``, once it was shipped there."""
    if not uri or not is_journal(folder):
        return None
    from orchestrator.tracking.cursor import load_cursor

    return load_cursor(folder, uri).experiment_id


def ui_url(uri: str, experiment_id: Optional[str] = None, kfold_set: Optional[str] = None) -> str:
    """The MLflow UI page that shows an experiment's runs: its runs table (nested runs under
    their parents) in the UI's model-training view; the UI's front page without an experiment.
    A server URI is its own UI; any other store is shown by ``mlflow ui`` at its default address.

    ``kfold_set``: the table shows that set's runs only (its tag ``orch.kfold_set``), oldest first.
    The UI loads 100 runs a page and nests a run under its parent only when both are loaded; it
    fetches the missing parents of what it loaded, one level up. Newest first, a grid set of more
    than 100 runs fills the first page with its last folds: their points become top-level rows and
    the grid parent is not shown. Oldest first, the set's parents (made before its trials) lead:
    the grid is the one top-level row, its points under it."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI_DEFAULT
    if not experiment_id:
        return base
    url = f"{base}/#/experiments/{experiment_id}/runs?{UI_TRAINING_VIEW}"
    if kfold_set:
        url += "&" + urllib.parse.urlencode({"searchFilter": f"tags.`orch.kfold_set` = '{kfold_set}'",
                                             "orderByKey": "attributes.start_time", "orderByAsc": "true"},
                                            quote_via=urllib.parse.quote)
    return url


def ui_hint(uri: Optional[str], run_id: Optional[str] = None, journal: Optional[str] = None,
            kfold_set: Optional[str] = None) -> Optional[str]:
    """``view it: open <link>   (run <id>)``: what shows a run in the MLflow UI (for a SQLite
    store, the ``mlflow ui`` command first). The link is its experiment's runs table once the
    journal ``journal`` was shipped to ``uri`` (``kfold_set``: that set's runs, see :func:`ui_url`),
    else the UI's front page."""
    if not uri:
        return None
    url = ui_url(uri, experiment_id_of(journal, uri) if journal else None, kfold_set)
    where = f"open {url}" if uri.startswith(("http://", "https://")) else \
        f"mlflow ui --backend-store-uri {uri}, then open {url}"
    return f"view it: {where}" + (f"   (run {run_id})" if run_id else "")


def wait_shipped(folder: str, uri: Optional[str], timeout_s: float) -> Optional[str]:
    """Wait up to ``timeout_s`` for the run of journal ``folder`` to be shipped to ``uri`` with its
    final status (its shipper works in the background); returns its run id (None if not yet)."""
    if not uri or not is_journal(folder):
        return None
    from orchestrator.tracking.cursor import load_cursor

    deadline = time.monotonic() + timeout_s
    while not fully_shipped(folder, uri) and time.monotonic() < deadline:
        time.sleep(0.2)
    return load_cursor(folder, uri).run_id


def fully_shipped(folder: str, uri: str) -> bool:
    """Whether journal ``folder`` is at ``uri`` up to its last line and that line's final status
    (a requeued run writes on after the KILLED of its preemption: that is not the end)."""
    from detection.journal import read_entries
    from orchestrator.tracking.cursor import load_cursor

    cursor = load_cursor(folder, uri)
    return cursor.status in TERMINAL and not read_entries(folder, cursor.offset, 1)[0]


def reachable(uri: str, timeout_s: float = REACH_TIMEOUT_S) -> bool:
    """Whether the tracking store at ``uri`` answers now (an HTTP server accepts a connection; a
    SQLite file's folder exists or can be made). Quick: no MLflow import, no retries."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout_s).close()
            return True
        except OSError:
            return False
    if uri.startswith("sqlite:///"):
        folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):]))
        return os.path.isdir(folder) or os.access(os.path.dirname(folder) or "/", os.W_OK)
    return True  # databricks, postgresql, ...: left to MLflow


def require_reachable(exp: Any) -> None:
    """``tracking.mode: online``: refuse (one line) before anything is written when the server
    does not answer."""
    tracking = exp.tracking
    if not tracking.enable or tracking.mode != "online":
        return
    uri = tracking_uri_of(exp)
    if not reachable(uri):
        raise LaunchError(f"tracking.mode=online but the MLflow tracking server {uri} does not answer; start it, fix "
                          "tracking.uri, or use tracking.mode=auto (journal now, ship when it answers) or offline "
                          "(orch sync later)")


def start_shipper(folder: str, uri: str, until_pid: Optional[int] = None) -> Optional[int]:
    """Have journal ``folder`` shipped to ``uri`` by this host's shipper (:mod:`.host_shipper`),
    starting it unless one runs. ``until_pid``: the process writing the journal (its end means
    no more lines will come). Returns the pid of a shipper started now (None: one was running)."""
    from orchestrator.tracking import registry

    registry.register(folder, uri, owner_pid=until_pid)
    return registry.ensure_shipper()


def ensure_shipping(folder: str, uri: Optional[str]) -> bool:
    """Have journal ``folder`` shipped to ``uri`` unless its final status is already there (a
    Slurm job's own shipper dies with the job's allocation: the login node's ``orch status``
    picks the journal up). True when it was handed to this host's shipper."""
    if not uri or not is_journal(folder) or fully_shipped(folder, uri):
        return False
    start_shipper(folder, uri)
    return True


def end_job_run(record: JobRecord) -> Optional[str]:
    """The MLflow side of a job's end (:func:`orchestrator.records.transition` calls it once). A
    job that failed before its training started (bad input found by the worker), was killed, or
    was cancelled while queued must not leave its MLflow run RUNNING: its journal gets the final
    status (and the error as the tag ``orch.error``) unless training wrote one, and a shipper
    delivers it, or whatever its own shipper could not (a Slurm job's dies with its allocation):
    now, or once the server answers again (never in ``tracking.mode: offline``). Returns the
    line to note in the job's log (None: nothing to say)."""
    from orchestrator.config.loader import read_section

    status = {JobState.SUCCEEDED: "FINISHED", JobState.CANCELLED: "KILLED"}.get(record.state, "FAILED")
    folder = journal_dir(record.output_dir)
    try:
        closed = close_journal(folder, status, error=record.error if status == "FAILED" else None)
        if (read_section(record.config_path, "tracking").get("mode") or "auto") != "offline":
            ensure_shipping(folder, record.tracking_uri)
    except Exception as err:  # noqa: BLE001 - the job's own state is recorded; sync can finish it
        return f"could not end the MLflow run in {folder}: {err}; run `orch sync {record.output_dir}`"
    return f"MLflow run of {record.name} ends {status} (journal {folder})" if closed else None
