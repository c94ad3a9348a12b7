"""Replays a run journal (``detection.journal``) to an MLflow tracking URI, exactly once.

``ship(journal_dir, uri)`` sends what is new since the last call and returns; ``ship_forever``
follows one journal that training is still writing (``python -m orchestrator.tracking.shipper
JOURNAL_DIR --uri URI --follow``, by hand). Beside jobs, one process per host ships every
journal with ``ship`` (:mod:`.host_shipper`).

Exactly once, in three parts:
1. The run: found by its tag ``orch.journal_id`` before one is created (``store``), and its id
   kept in the destination's cursor (``cursor``).
2. Values: params, metric values and tags go out in ``log_batch`` calls (<= 100 params, 1000
   metrics, 100 tags) cut at journal item boundaries; after each call the cursor moves past
   the items sent. A crash between the call and the cursor save sends the batch again. That
   writes nothing new: MLflow's SQL stores (SQLite, PostgreSQL, MySQL; directly or behind
   ``mlflow server``, which runs the same store) keep metrics under the primary key (run, key,
   timestamp, step, value, is_nan) and drop rows already there (``_log_metrics``); the journal
   fixes each value's timestamp when training logs it, so a replay is the same row. A param
   sent again with its value is accepted as is; tags are overwritten with the same value.
   (The deprecated file store appends blindly: shipping there is at-least-once.)
3. Events that are not values are idempotent: statuses (``update_run`` / ``set_terminated``
   with the event's time as end time) and artifacts (uploaded again over the same path).

Params already on the run (a resumed job logs its config again) are not sent twice: MLflow
refuses a changed value, so a changed one is kept old and reported. Values the store refuses
as invalid are sent one by one and the bad ones reported, so one bad key never blocks a journal.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from cluster.lease import is_alive
from detection.journal import EVENTS, TERMINAL, read_entries, read_meta
from orchestrator.tracking.cursor import cursor_lock, normalize_uri
from orchestrator.tracking.replay import ShipPending, Shipment
from orchestrator.tracking.store import quiet_store_logs

log = logging.getLogger(__name__)

POLL_S = 2.0
MAX_BACKOFF_S = 60.0
# While the server's port is closed (stopped, restarting): look again this often with a plain
# connect, rather than sit in MLflow's own HTTP retries, whose waits grow to 2 min each (they
# stay for a server that answers and fails).
PROBE_S = 5.0


@dataclass(frozen=True)
class ShipResult:
    """What one ``ship`` call did, and what is left."""

    journal_dir: str
    uri: str
    run_id: Optional[str]
    experiment_id: Optional[str]
    created_run: bool  # this call created the run
    values: int  # params + metric values + tags sent by this call
    artifacts: int  # artifacts uploaded by this call
    offset: int  # bytes of events.jsonl shipped
    size: int  # bytes of events.jsonl when this call ended
    status: Optional[str]  # the last run status shipped
    done: bool  # a terminal status is shipped and every complete line with it
    warnings: tuple[str, ...] = ()


def ship(journal_dir: str, tracking_uri: str, *, journals: Optional[dict[str, str]] = None,
         _depth: int = 0) -> ShipResult:
    """Ship what is new in the journal ``journal_dir`` to ``tracking_uri`` (a parent journal
    first). Raises on errors (the cursor keeps what was shipped); ShipPending when the parent's
    run cannot be found. ``journals``: journal id -> folder, to find parents by id."""
    journal_dir = os.path.abspath(journal_dir)
    uri = normalize_uri(tracking_uri)
    read_meta(journal_dir)  # a clear error before any lock or client
    with cursor_lock(journal_dir, uri):
        index = journals or {}

        def ship_parent(folder: str) -> tuple[Optional[str], Optional[str]]:
            parent = ship(folder, uri, journals=index, _depth=_depth + 1)
            return parent.run_id, parent.experiment_id

        shipment = Shipment(journal_dir, uri, index, _depth, ship_parent)
        shipment.identify()
        shipment.replay()
        cursor = shipment.cursor
        try:
            size = os.path.getsize(os.path.join(journal_dir, EVENTS))
        except FileNotFoundError:
            size = 0
        left = read_entries(journal_dir, cursor.offset, 1)[0]
        return ShipResult(journal_dir, uri, cursor.run_id, cursor.experiment_id, shipment.created, shipment.values,
                          shipment.artifacts, cursor.offset, size, cursor.status,
                          cursor.status in TERMINAL and not left, tuple(dict.fromkeys(shipment.warnings)))


def ship_forever(journal_dir: str, tracking_uri: str, stop_when: Optional[Callable[[], bool]] = None,
                 poll_s: float = POLL_S, max_backoff_s: float = MAX_BACKOFF_S) -> Optional[ShipResult]:
    """Follow a journal that training is writing: ship new lines every ``poll_s`` seconds until
    a terminal status and everything before it is shipped, or ``stop_when()`` is true (then one
    last pass is made). Errors (server down, database locked, no journal yet) are logged in one
    line and retried with a backoff doubling up to ``max_backoff_s``; MLflow's own HTTP retries
    stay as configured, but no call is made while the server's port is closed (it is probed every
    ``PROBE_S`` seconds). Returns the last successful result (None if none succeeded)."""
    from orchestrator.tracking.runs import reachable

    result: Optional[ShipResult] = None
    backoff = poll_s
    down_since: Optional[float] = None
    while True:
        stopping = bool(stop_when and stop_when())  # decided before the pass: it is the last one
        if not reachable(tracking_uri):
            if stopping:
                log.warning("shipper: stopped with %s not fully shipped: %s does not answer", journal_dir, tracking_uri)
                return result
            if down_since is None:
                down_since = time.monotonic()
                log.warning("shipper: %s does not answer; the journal keeps everything, trying again every %.0f s",
                            tracking_uri, PROBE_S)
            _sleep(PROBE_S, stop_when)
            continue
        if down_since is not None:
            log.info("shipper: %s answers again after %.0f s", tracking_uri, time.monotonic() - down_since)
            down_since = None
        try:
            result = ship(journal_dir, tracking_uri)
        except Exception as err:  # noqa: BLE001 - the journal keeps everything: try again later
            if stopping:
                log.warning("shipper: stopped with %s not fully shipped: %s", journal_dir, _one_line(err))
                return result
            log.warning("shipper: %s; retrying in %.0f s", _one_line(err), backoff)
            delay, backoff = backoff, min(backoff * 2, max_backoff_s)
        else:
            for warning in result.warnings:
                log.warning("shipper: %s", warning)
            if result.done or stopping:
                return result
            delay = backoff = poll_s
        _sleep(delay, stop_when)


def _sleep(seconds: float, stop_when: Optional[Callable[[], bool]]) -> None:
    """Sleep, waking early once ``stop_when()`` turns true."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (stop_when and stop_when()):
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _one_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{type(err).__name__}: {text[:300]}"


_gone_since: list[float] = []


def _owner_gone(pid: Optional[int], linger_s: float) -> bool:
    """True once process ``pid`` has been gone for ``linger_s`` seconds."""
    if pid is None or is_alive(pid):
        return False
    if not _gone_since:
        _gone_since.append(time.monotonic())
    return time.monotonic() - _gone_since[0] >= linger_s


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m orchestrator.tracking.shipper JOURNAL_DIR --uri URI [--follow]``: exit 0 when
    everything is shipped (with --follow: also the final status), 1 otherwise.
    ``... shipper --host REGISTRY_DIR --lock-fd FD``: this host's shipper (:mod:`.host_shipper`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--host"]:
        from orchestrator.tracking.host_shipper import main as host_main

        return host_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m orchestrator.tracking.shipper", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("journal_dir")
    parser.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--follow", action="store_true", help="keep shipping until the run's final status is shipped")
    parser.add_argument("--poll", type=float, default=POLL_S, help="seconds between passes with --follow")
    parser.add_argument("--until-pid", type=int, default=None,
                        help="with --follow: make a last pass and stop once this process has exited (and --linger passed)")
    parser.add_argument("--linger", type=float, default=0.0, metavar="S",
                        help="with --until-pid: keep trying this long after the process exited (a server that is "
                             "down when training ends still gets the run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quiet_store_logs()
    from orchestrator.tracking.runs import resolve_tracking_uri

    uri = args.uri or resolve_tracking_uri(None)
    if not args.follow:
        try:
            result = ship(args.journal_dir, uri)
        except Exception as err:  # noqa: BLE001 - one line for the log; the cursor keeps progress
            log.error("shipper: %s not shipped to %s: %s", args.journal_dir, uri, _one_line(err))
            return 1
        for warning in result.warnings:
            log.warning("shipper: %s", warning)
    else:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a last pass, then exit
        result = ship_forever(args.journal_dir, uri, poll_s=args.poll,
                              stop_when=lambda: stop.is_set() or _owner_gone(args.until_pid, args.linger))
        if result is None:
            return 1
    log.info("shipper: %s -> %s run %s: %d bytes of %d shipped, status %s", args.journal_dir, uri, result.run_id,
             result.offset, result.size, result.status)
    return 0 if result.done or not args.follow or result.offset >= result.size else 1


__all__ = ["ShipPending", "ShipResult", "main", "ship", "ship_forever"]


if __name__ == "__main__":
    sys.exit(main())
