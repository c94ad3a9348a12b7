"""Helpers of the shipper tests: a real ``mlflow server`` that can be stopped and restarted on
the same port, journals of known content, and every value of a run at a destination."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from cluster.process import stop_group
from detection.journal import Journal

REPO = Path(__file__).resolve().parents[3]
KEYS = ("loss", "loss_cls", "lr", "images_per_s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (SQLite store unless ``store`` names another, e.g. a
    PostgreSQL URI; proxied artifacts, one worker)."""

    def __init__(self, folder: Path, store: Optional[str] = None) -> None:
        self.folder = folder
        self.store = store
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self._held: Optional[socket.socket] = None

    def start(self, timeout_s: float = 180.0) -> None:
        if self._held is not None:  # the port kept from other tests while the server was down
            self._held.close()
            self._held = None
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        log = open(self.folder / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server",
             "--backend-store-uri", self.store or f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start: {(self.folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def stop(self, hold_port: bool = False) -> None:
        """Stop the server's whole process group (it runs in its own session). ``hold_port``:
        keep its port bound, not listening, until :meth:`start` (clients are refused as by a
        closed port, and no other test's ``_free_port`` is handed it meanwhile)."""
        if self.proc is None:
            return
        stop_group(self.proc.pid, grace_s=30)
        self.proc.wait(timeout=30)
        self.proc = None
        if hold_port:
            self._held = socket.socket()
            self._held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT connections
            self._held.bind(("127.0.0.1", self.port))


def make_journal(folder: Path, experiment: str = "ship-tests", run_name: str = "run", steps: int = 50,
                 keys: tuple[str, ...] = KEYS, flush_every: int = 10, parent: Any = None, status: str = "FINISHED",
                 start_step: int = 0) -> Journal:
    """A journal with params, tags, ``steps`` x ``keys`` metric values (value = step + key index
    / 10), a text artifact and ``status`` at the end (None: left open, RUNNING)."""
    journal = Journal.create(folder, experiment, run_name, tags={"backend": "test"}, parent=parent)
    journal.set_status("RUNNING")
    journal.log_params({"optim.lr": "0.01", "model.type": "ssdlite"})
    for step in range(start_step, start_step + steps):
        journal.log_metrics({k: step + i / 10 for i, k in enumerate(keys)}, step=step)
        if (step + 1) % flush_every == 0:
            journal.flush()
    journal.log_text(f"name: {run_name}\n", "config.yaml")
    if status:
        journal.set_status(status)
    journal.flush()
    return journal


def values_of(uri: str, run_id: str) -> dict[str, Any]:
    """Every row of a run: params, tags, and the full history of each metric as sorted
    ``(step, timestamp, value)`` tuples (duplicates would show as repeated tuples)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    history = {key: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
               for key in run.data.metrics}
    return {"run": run, "params": dict(run.data.params), "tags": dict(run.data.tags), "metrics": history}


def shipper_command(journal_dir: Path, uri: str, *extra: str) -> list[str]:
    """The shipper process a launcher starts beside training."""
    return [sys.executable, "-m", "orchestrator.tracking.shipper", str(journal_dir), "--uri", uri, *extra]


def shipper_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def expected_metrics(steps: int, keys: tuple[str, ...] = KEYS, start: int = 0) -> dict[str, list]:
    """{key: [(step, value)]} of a journal written by :func:`make_journal`."""
    return {k: [(s, s + i / 10) for s in range(start, start + steps)] for i, k in enumerate(keys)}


def step_values(found: dict[str, Any]) -> dict[str, list]:
    """{key: [(step, value)]} from :func:`values_of` (a duplicate row shows twice)."""
    return {k: [(step, value) for step, _, value in rows] for k, rows in found["metrics"].items()}
