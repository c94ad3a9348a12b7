"""``orch sync``: ship every run journal under some folders to the store each run was made
for (the tracking URI its journal records), or to one URI given.

Journals are found recursively (a folder holding a journal ``meta.json``), shipped parents
first (a k-fold set or sweep parent before its children), each under its own cursor for the
destination. Syncing again only sends what is new, so it can be run any number of times; a new
destination gets every run anew with its parent links rebuilt there.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from cluster.errors import ConfigError
from detection.journal import META, destination, read_meta
from orchestrator.tracking.replay import ShipPending
from orchestrator.tracking.shipper import ship

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """One journal after a sync pass. ``problem`` (one line) says why it is not done."""

    journal_dir: str
    uri: str = ""
    run_id: Optional[str] = None
    created_run: bool = False
    values: int = 0
    artifacts: int = 0
    status: Optional[str] = None
    done: bool = False  # its final status is shipped
    problem: Optional[str] = None
    failed: bool = False  # an error (else: waiting for its parent, or the run still going)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class SyncSummary:
    """What a sync did to each journal, and totals. ``uri``: the destination (or a description
    of several: each run's own store)."""

    uri: str
    outcomes: tuple[Outcome, ...]

    @property
    def runs_created(self) -> int:
        return sum(o.created_run for o in self.outcomes)

    @property
    def values(self) -> int:
        return sum(o.values for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    @property
    def pending(self) -> list[Outcome]:
        """Not failed and not ended: waiting for a parent, or a run still being written."""
        return [o for o in self.outcomes if not o.failed and not o.done]

    def lines(self) -> list[str]:
        """The summary as text: a total, then one line per journal that needs attention."""
        out = [f"{len(self.outcomes)} journal(s) -> {self.uri}: {self.runs_created} run(s) created, "
               f"{self.values} value(s) sent, {len(self.pending)} pending, {len(self.failed)} failed"]
        for o in self.outcomes:
            if o.problem:
                out.append(f"  {'FAILED ' if o.failed else 'pending'} {o.journal_dir}: {o.problem}")
            for warning in o.warnings:
                out.append(f"  warning {o.journal_dir}: {warning}")
        return out


def find_journals(paths: Iterable[str]) -> list[str]:
    """Journal folders in or under ``paths`` (each path a journal or any folder above some)."""
    found: list[str] = []
    for path in paths:
        if not os.path.isdir(path):
            raise ConfigError(f"orch sync: {path} is not a folder; give a job's output folder or a folder above it")
        for folder, dirs, files in os.walk(os.path.abspath(path)):
            if META in files:
                try:
                    read_meta(folder)
                except FileNotFoundError:
                    continue
                found.append(folder)
                dirs[:] = []  # a journal holds only cursors/ and files/
            dirs.sort()
    return list(dict.fromkeys(found))


def order_parents_first(folders: list[str]) -> list[str]:
    """``folders`` with every journal after the journals of its parent chain among them."""
    ids = {read_meta(f)["journal_id"]: f for f in folders}

    def depth(folder: str, seen: tuple[str, ...] = ()) -> int:
        parent = (read_meta(folder).get("parent") or {}).get("journal_id")
        if parent not in ids or parent in seen:
            return 0
        return 1 + depth(ids[parent], seen + (parent,))

    return sorted(folders, key=lambda f: (depth(f), f))


def _ship_one(folder: str, uri: str, index: dict[str, str]) -> Outcome:
    try:
        result = ship(folder, uri, journals=index)
    except ShipPending as err:
        return Outcome(folder, uri, problem=str(err))
    except Exception as err:  # noqa: BLE001 - one line per journal; the others go on
        text = (str(err).strip().splitlines() or [""])[0][:300]
        return Outcome(folder, uri, problem=f"{type(err).__name__}: {text}", failed=True)
    problem = None
    if not result.done:
        problem = f"run {result.status or 'without a status'}: shipped up to now, the rest on the next sync"
    return Outcome(folder, result.uri, result.run_id, result.created_run, result.values, result.artifacts,
                   result.status, result.done, problem, warnings=result.warnings)


def destination_of(folder: str, uri: Optional[str], default: Optional[str]) -> str:
    """Where journal ``folder`` goes: ``uri`` when given (``--uri``), else the store its run was
    made for (recorded in the journal), else ``default`` (a job record's URI, then
    ``$MLFLOW_TRACKING_URI``, then ``./mlflow.db``)."""
    if uri:
        return uri
    recorded = destination(folder)
    if recorded:
        return recorded
    if default:
        return default
    from orchestrator.tracking.runs import resolve_tracking_uri

    return resolve_tracking_uri(None)


def sync(paths: Iterable[str], uri: Optional[str], watch: bool = False, poll_s: float = 5.0,
         stop_when: Optional[Callable[[], bool]] = None,
         on_pass: Optional[Callable[[SyncSummary], None]] = None, default: Optional[str] = None) -> SyncSummary:
    """Ship every journal under ``paths`` to ``uri``, or (``uri`` None) each to the store its run
    was made for (:func:`destination_of`, ``default`` where a journal records none); return what
    happened to each.

    ``watch``: pass again every ``poll_s`` seconds (finding new journals too) until every
    journal has shipped its final status or ``stop_when()`` is true; ``on_pass`` sees each
    pass's summary. The returned summary adds up the values and runs of all passes."""
    paths = list(paths)
    totals: dict[str, Outcome] = {}
    while True:
        folders = order_parents_first(find_journals(paths))
        if not folders:
            raise ConfigError(f"orch sync: no run journal under {', '.join(paths)}; give the output folder of a job "
                              "run with this version of orch")
        index = {read_meta(f)["journal_id"]: f for f in folders}
        outcomes = [_ship_one(f, destination_of(f, uri, default), index) for f in folders]
        summary = SyncSummary(_describe(outcomes), tuple(outcomes))
        if on_pass is not None:
            on_pass(summary)
        for o in outcomes:
            before = totals.get(o.journal_dir)
            if before is not None:
                o = Outcome(**{**o.__dict__, "values": o.values + before.values,
                               "artifacts": o.artifacts + before.artifacts,
                               "created_run": o.created_run or before.created_run})
            totals[o.journal_dir] = o
        if not watch or all(o.done for o in outcomes) or (stop_when and stop_when()):
            return SyncSummary(summary.uri, tuple(totals[f] for f in folders))
        time.sleep(poll_s)


def _describe(outcomes: list[Outcome]) -> str:
    """The destination of a pass: one URI, or the list of several."""
    uris = list(dict.fromkeys(o.uri for o in outcomes))
    return uris[0] if len(uris) == 1 else "their own stores (" + ", ".join(uris) + ")"


__all__ = ["Outcome", "SyncSummary", "destination_of", "find_journals", "order_parents_first", "sync"]
