"""One shipping pass over one journal: find or create the run, then send every complete line
after the cursor in journal order (see ``shipper`` for the exactly-once argument).

``Shipment`` holds the destination's client, the cursor and the batch being filled; ``ship``
(in ``shipper``) makes one per call, under the cursor lock.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

from cluster.errors import OrchError
from cluster.retry import retry
from detection.journal import TERMINAL, read_entries, read_meta
from orchestrator.tracking import store
from orchestrator.tracking.cursor import Cursor, load_cursor, save_cursor

log = logging.getLogger(__name__)
# MLflow answers that trying again does not change (a bad value, a run that is gone).
_PERMANENT_CODES = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")

PARAMS_PER_BATCH, METRICS_PER_BATCH, TAGS_PER_BATCH = 100, 1000, 100
READ_BYTES = 4 << 20  # journal bytes read at a time
MAX_PARENT_DEPTH = 8
SQLITE_ATTEMPTS = 6  # "database is locked" with many writers: back off and try again


class ShipPending(OrchError):
    """A journal cannot be shipped yet (its parent's run cannot be found); try again later."""


def _permanent(err: BaseException, code: str = "INVALID_PARAMETER_VALUE") -> bool:
    return getattr(err, "error_code", None) == code


class Shipment:
    """One pass over one journal to one destination (the caller holds the cursor lock).

    ``ship_parent(folder)`` ships a parent journal and returns its (run id, experiment id)."""

    def __init__(self, journal_dir: str, uri: str, index: dict[str, str], depth: int,
                 ship_parent: Callable[[str], tuple[Optional[str], Optional[str]]]) -> None:
        self.dir, self.uri, self.index, self.depth = journal_dir, uri, index, depth
        self.ship_parent = ship_parent
        self.meta = read_meta(journal_dir)
        self.client, warnings = store.open_client(uri)
        self.warnings = list(warnings)
        self.cursor = load_cursor(journal_dir, uri)
        self.attempts = SQLITE_ATTEMPTS if store.sqlite_path(uri) else 1  # HTTP: urllib3 retries
        self.created = False
        self.values = self.artifacts = 0
        self.params: dict[str, str] = {}
        self.batch: dict[str, Any] = {"params": {}, "metrics": [], "tags": {}}
        self.batch_end = (self.cursor.offset, self.cursor.item)

    # -- store calls ---------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)``, tried again on transient errors of a SQLite store."""
        return retry(lambda: fn(*args, **kwargs), self.attempts, delay_s=0.5, max_delay_s=8.0,
                     retry_if=lambda err: getattr(err, "error_code", None) not in _PERMANENT_CODES,
                     on_retry=lambda err, pause: log.warning("shipper: %s busy (%s); retrying in %.1f s", self.uri,
                                                             (str(err).splitlines() or [""])[0][:200], pause))

    def save(self, **changes: Any) -> None:
        """Move the cursor to the end of what was processed (everything before it is shipped)."""
        offset, item = self.batch_end
        if (offset, item) == (self.cursor.offset, self.cursor.item) and all(
                getattr(self.cursor, k) == v for k, v in changes.items()):
            return
        self.cursor = self.cursor.moved(offset, item, **changes)
        save_cursor(self.dir, self.cursor)

    # -- identity ------------------------------------------------------------------------------
    def identify(self) -> None:
        """Find or create the run, and keep its id in the cursor."""
        if self.cursor.run_id:
            try:
                run = self.call(self.client.get_run, self.cursor.run_id)
            except Exception as err:  # noqa: BLE001
                if not _permanent(err, "RESOURCE_DOES_NOT_EXIST"):
                    raise
                self.warnings.append(f"run {self.cursor.run_id} no longer exists at {self.uri}; shipping again")
                self.cursor = Cursor(self.uri)
                self.batch_end = (0, 0)
            else:
                if run.info.lifecycle_stage == "deleted":
                    raise ShipPending(f"run {run.info.run_id} was deleted at {self.uri}; restore it "
                                      f"(mlflow runs restore) or delete {self.dir}/cursors to ship a new run")
                self.params = dict(run.data.params)
                return
        parent_run_id, experiment = self.parent()
        run = self.call(store.find_run, self.client, experiment, self.meta["journal_id"])
        if run is None:
            run = self.call(store.create_run, self.client, experiment, self.meta, parent_run_id)
            self.created = True
        else:
            self.params = dict(run.data.params)
        self.save(run_id=run.info.run_id, experiment_id=run.info.experiment_id)

    def parent(self) -> tuple[Optional[str], str]:
        """(parent run id, experiment id): a nested run lives in its parent's experiment."""
        ref = self.meta.get("parent")
        if not ref:
            return None, self.call(store.experiment_id, self.client, self.meta["experiment"])
        if self.depth >= MAX_PARENT_DEPTH:
            raise ShipPending(f"journal {self.dir}: parent chain deeper than {MAX_PARENT_DEPTH} (a cycle?)")
        folder = _parent_folder(self.dir, ref, self.index)
        if folder is not None:
            return self.ship_parent(folder)
        found = self.call(self.client.get_experiment_by_name, self.meta["experiment"])
        run = found and self.call(store.find_run, self.client, found.experiment_id, ref["journal_id"])
        if not run:
            raise ShipPending(f"parent journal {ref['journal_id']} of {self.dir} is not at {ref.get('path')} and not "
                              f"shipped to {self.uri}; sync the parent's folder first")
        return run.info.run_id, run.info.experiment_id

    # -- values --------------------------------------------------------------------------------
    def add(self, kind: str, item: Any, end: tuple[int, int]) -> None:
        """Add one item to the batch, sending the batch first when it is full."""
        if kind == "param":
            key, value = item
            old = self.params.get(key, self.batch["params"].get(key))
            if old is not None:  # already on the run (a resumed job logs its config again)
                if old != value:
                    self.warnings.append(f"param {key} kept its first value {old!r} (MLflow params are immutable)")
                self.batch_end = end
                return
        group, limit = {"param": ("params", PARAMS_PER_BATCH), "metric": ("metrics", METRICS_PER_BATCH),
                        "tag": ("tags", TAGS_PER_BATCH)}[kind]
        if len(self.batch[group]) >= limit and not (kind == "tag" and item[0] in self.batch["tags"]):
            self.send()
        if kind == "metric":
            self.batch["metrics"].append(item)
        else:
            self.batch[group][item[0]] = item[1]
        self.batch_end = end

    def pending(self) -> int:
        return len(self.batch["params"]) + len(self.batch["metrics"]) + len(self.batch["tags"])

    def send(self) -> None:
        """Send the batch with ``log_batch`` and move the cursor past it."""
        from mlflow.entities import Metric, Param, RunTag

        count = self.pending()
        if count:
            params = [Param(k, v) for k, v in self.batch["params"].items()]
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in self.batch["metrics"]]
            tags = [RunTag(k, v) for k, v in self.batch["tags"].items()]
            try:
                self.call(self.client.log_batch, self.cursor.run_id, metrics=metrics, params=params, tags=tags)
            except Exception as err:  # noqa: BLE001
                if not _permanent(err):
                    raise
                count = self.send_one_by_one(params, metrics, tags)
            self.values += count
            self.params.update(self.batch["params"])
            self.batch = {"params": {}, "metrics": [], "tags": {}}
        self.save()

    def send_one_by_one(self, params: list, metrics: list, tags: list) -> int:
        """After the store refused a batch as invalid: send each item, report the bad ones."""
        sent, bad = 0, []
        for kind, items in (("params", params), ("metrics", metrics), ("tags", tags)):
            for item in items:
                try:
                    self.call(self.client.log_batch, self.cursor.run_id, **{kind: [item]})
                    sent += 1
                except Exception as err:  # noqa: BLE001
                    if not _permanent(err):
                        raise
                    bad.append(f"{item.key}: {str(err).splitlines()[0][:200]}")
        if bad:
            self.warnings.append(f"{len(bad)} value(s) refused by {self.uri}, first: {bad[0]}")
        return sent

    # -- other events --------------------------------------------------------------------------
    def status(self, event: dict[str, Any]) -> None:
        status = event["status"]
        if status in TERMINAL:
            self.call(self.client.set_terminated, self.cursor.run_id, status=status, end_time=event.get("ts"))
        else:
            self.call(self.client.update_run, self.cursor.run_id, status=status)

    def artifact(self, event: dict[str, Any]) -> None:
        paths = [os.path.normpath(os.path.join(self.dir, event["rel"]))] if event.get("rel") else []
        path = next((p for p in paths + [event["path"]] if os.path.exists(p)), None)
        if path is None:
            self.warnings.append(f"artifact {event['path']} is gone; not uploaded")
            return
        upload = self.client.log_artifacts if os.path.isdir(path) else self.client.log_artifact
        self.call(upload, self.cursor.run_id, path, event.get("artifact_path"))
        self.artifacts += 1

    # -- the replay ----------------------------------------------------------------------------
    def replay(self) -> None:
        """Ship every complete line after the cursor, in journal order."""
        while True:
            entries, _ = read_entries(self.dir, self.batch_end[0], READ_BYTES)
            if not entries:
                break
            for entry in entries:
                items = _items(entry.event)
                first = self.batch_end[1] if entry.start == self.batch_end[0] else 0
                for index in range(first, len(items)):
                    kind, item = items[index]
                    end = (entry.end, 0) if index + 1 == len(items) else (entry.start, index + 1)
                    if kind in ("param", "metric", "tag"):
                        self.add(kind, item, end)
                        continue
                    self.send()  # the values before it first: keep the journal's order
                    if kind == "status":
                        self.status(item)
                    else:
                        self.artifact(item)
                    self.batch_end = end
                    self.save(**({"status": item["status"]} if kind == "status" else {}))
                self.batch_end = (entry.end, 0)  # also past lines with nothing to ship (torn)
        self.send()


def _items(event: Optional[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The shippable items of one journal line, in a fixed order (the cursor counts them)."""
    if not event:
        return []
    kind = event.get("t")
    if kind == "metrics":
        return [("metric", (k, v, ts, step)) for ts, step, values in event.get("v", ()) for k, v in values.items()]
    if kind == "params":
        return [("param", kv) for kv in event.get("params", {}).items()]
    if kind == "tags":
        return [("tag", kv) for kv in event.get("tags", {}).items()]
    if kind in ("status", "artifact"):
        return [(kind, event)]
    return []  # a kind from a newer orch: skipped


def _parent_folder(journal_dir: str, ref: dict[str, Any], index: dict[str, str]) -> Optional[str]:
    """The parent journal's folder: relative to this one (a copied tree), absolute, or found
    by ``orch sync`` (``index``: journal id -> folder)."""
    candidates = [os.path.normpath(os.path.join(journal_dir, ref["rel"]))] if ref.get("rel") else []
    candidates += [ref.get("path"), index.get(ref["journal_id"])]
    for folder in candidates:
        try:
            if folder and read_meta(folder)["journal_id"] == ref["journal_id"]:
                return folder
        except FileNotFoundError:
            continue
    return None


__all__ = ["METRICS_PER_BATCH", "PARAMS_PER_BATCH", "TAGS_PER_BATCH", "ShipPending", "Shipment"]
