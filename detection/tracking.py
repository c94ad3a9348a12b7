"""MLflow records of training runs: one run per job, written from rank 0 only.

Everything goes through ``MlflowClient`` with an explicit run id (never the fluent API's global
"active run"), so a Ray worker, a Slurm requeue or a resumed job continues exactly the run that
``orch`` created at submit time (``tracking.run_id``). Per-step metrics are buffered and written
by a background thread with ``log_batch`` (a synchronous call per step costs ~56 ms against a
server; 1000 values in one batch cost 0.2 s, see FIELD_NOTES), so logging does not slow the loop.

mlflow is imported inside functions: ``orch --help`` must not load it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import re
import socket
import subprocess
import threading
import time
from typing import Any, Optional, Sequence


from cluster.errors import ConfigError, OrchError
from detection.hooks.base import Hook
from detection.serialize import config_hash, dump_yaml, to_plain

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000  # MLflow's limit; longer values are cut (the full YAML is an artifact)
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
FLUSH_EVERY_S = 10.0
# Params a requeued / restarted job changes on purpose (it resumes from its checkpoint).
RESTART_PARAMS = frozenset({"runtime.resume", "runtime.load_from"})


def resolve_tracking_uri(tracking: Any) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    if getattr(tracking, "uri", None):
        return str(tracking.uri)
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(os.getcwd(), 'mlflow.db')}"


def _client(tracking: Any):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking))


def artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Where a new experiment's artifacts go: beside a local SQLite store
    (``<db folder>/mlartifacts/<experiment>``) instead of MLflow's default ``./mlruns`` of
    whatever the current directory is; ``None`` (the server decides) for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):]))
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment) or "default"
    return "file://" + os.path.join(folder, "mlartifacts", safe)


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    for _ in range(5):  # several jobs may create the same experiment at once
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))
        except MlflowException:
            time.sleep(0.2)
    found = client.get_experiment_by_name(name)
    if found is None:
        raise RuntimeError(f"MLflow experiment {name!r} could not be created")
    return found.experiment_id


def create_run(tracking: Any, name: str, tags: Optional[dict[str, str]] = None, parent_run_id: Optional[str] = None) -> str:
    """Create an MLflow run (status RUNNING) in experiment ``tracking.experiment or name`` and
    return its id. ``parent_run_id`` nests it (k-fold set, sweep)."""
    client = _client(tracking)
    experiment = getattr(tracking, "experiment", None) or name
    all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(_experiment_id(client, experiment), tags=all_tags,
                            run_name=getattr(tracking, "run_name", None) or name)
    return run.info.run_id


def end_run_if_running(uri: str, run_id: str, status: str = "FAILED") -> bool:
    """Close a run its job left RUNNING (the job failed before its MLflow hook could, or was
    killed). Returns True when the run was closed here."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, status=status)
    return True


def flatten_params(config: Any) -> dict[str, str]:
    """``{"optim.lr": "0.02", ...}`` with values cut to MLflow's length limit."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
            return
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        if len(text) > MAX_PARAM_VALUE:
            marker = "...[truncated]"
            text = text[: MAX_PARAM_VALUE - len(marker)] + marker
        out[prefix[:250]] = text

    walk("", to_plain(config))
    return out


def metric_key(name: str) -> str:
    """A metric name MLflow accepts (class names may hold any character)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)[:250]


def git_commit(path: Optional[str] = None) -> str:
    """The git commit of ``path`` (default: cwd), or ``unknown`` outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or os.getcwd(), capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def orch_version() -> str:
    """The installed orch version (detection does not import orchestrator)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orch")
    except PackageNotFoundError:
        return "unknown"


def device_model(device: Any) -> str:
    """``NVIDIA H100 80GB HBM3`` or the CPU's name."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def plot_curves(history: dict[str, list], path: str) -> str:
    """PNG of the training loss and the evaluation mAP over iterations (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 4))
    train = history.get("train", [])
    ax_loss.plot([p["iter"] for p in train], [p["loss"] for p in train], lw=1)
    ax_loss.set(title="training loss", xlabel="iteration", ylabel="loss")
    evals = history.get("eval", [])
    for key in ("bbox_mAP", "bbox_mAP_50", "segm_mAP"):
        points = [(e["iter"], e["metrics"][key]) for e in evals if key in e["metrics"]]
        if points:
            ax_map.plot(*zip(*points), marker="o", label=key)
    ax_map.set(title="evaluation", xlabel="iteration", ylabel="AP", ylim=(0, 1))
    if evals:
        ax_map.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


class _BatchWriter(threading.Thread):
    """Writes queued metric batches with ``log_batch`` off the training thread."""

    def __init__(self, client: Any, run_id: str) -> None:
        super().__init__(name="mlflow-writer", daemon=True)
        self.client, self.run_id = client, run_id
        self.jobs: queue.Queue = queue.Queue()
        self.errors = 0
        self.busy_s = 0.0  # this thread's CPU time spent writing (the cost of logging, measured)

    def run(self) -> None:
        while True:
            metrics = self.jobs.get()
            if metrics is None:
                return
            started = time.thread_time()
            for start in range(0, len(metrics), METRICS_PER_BATCH):
                chunk = metrics[start : start + METRICS_PER_BATCH]
                for attempt in range(4):  # SQLite shared by many jobs: "database is locked"
                    try:
                        self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                        break
                    except Exception as err:  # noqa: BLE001 - tracking must not kill training
                        if attempt == 3:
                            self.errors += 1
                            log.warning("MLflow: %d metric values not logged: %s", len(chunk), err)
                        time.sleep(0.5 * (attempt + 1))
            self.busy_s += time.thread_time() - started


class MlflowHook(Hook):
    """Records a training run in MLflow (rank 0 only; see the module docstring).

    ``config``: the experiment (its params, YAML and ``tracking`` section are logged once);
    ``hosts``: host names of all ranks (gathered by the builder); ``log_interval``: log the
    training values every that many iterations (and at the end); ``flush_every``: hand buffered
    values to the writer thread every that many logged steps. The run is ``tracking.run_id``
    (set by the orchestrator before launch), else the one a resumed checkpoint belonged to, else
    a new one. ``tracking.tags`` (the orchestrator puts ``backend`` there) are logged as tags.
    """

    def __init__(self, config: Any, hosts: Sequence[str] = (), log_interval: int = 10, flush_every: int = 50) -> None:
        self.config = config
        self.log_interval = max(1, int(log_interval))
        self.tracking = config.tracking
        self.hosts = sorted(set(hosts)) or [socket.gethostname()]
        self.flush_every = flush_every
        self.client: Any = None
        self.run_id: Optional[str] = None
        self._buffer: list = []
        self._steps = 0
        self._last_flush = time.monotonic()
        self._writer: Optional[_BatchWriter] = None
        self.writer_cpu_s = 0.0  # CPU time of the writer thread, known after the run

    # -- lifecycle -------------------------------------------------------------------------
    def before_train(self, trainer: Any) -> None:
        try:
            self._start(trainer)
        except Exception as err:  # noqa: BLE001 - one clear line instead of a client traceback
            if isinstance(err, OrchError):
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ConfigError(
                f"MLflow tracking at {resolve_tracking_uri(self.tracking)} failed: {first}; start the "
                "server or fix tracking.uri / MLFLOW_TRACKING_URI, or set tracking.enable=false"
            ) from err

    def _start(self, trainer: Any) -> None:
        from mlflow.entities import Param, RunTag

        # The run orch created at submit time, else the one a resumed checkpoint belonged to.
        run_id = self.tracking.run_id or trainer.run_id
        self.client = _client(self.tracking)
        if run_id:
            self.run_id = run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = create_run(self.tracking, self.config.name, parent_run_id=self.tracking.parent_run_id)
        trainer.run_id = self.run_id
        tags = {
            "hosts": ",".join(self.hosts),
            "world_size": str(trainer.env.world_size),
            "device": device_model(trainer.device),
            "git_commit": git_commit(),
            "config_hash": config_hash(self.config),
            "orch_version": orch_version(),
            "lr_scaling": trainer.lr_scaling.describe()[:5000],
            **{str(k): str(v) for k, v in (self.tracking.tags or {}).items()},
        }
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        existing = self.client.get_run(self.run_id).data.params
        params = flatten_params(self.config)
        # A restart legitimately differs in how it resumes; only other edits deserve a warning.
        changed = sorted(k for k, v in params.items()
                         if k in existing and existing[k] != v and k not in RESTART_PARAMS)
        if changed:  # params are immutable in MLflow: a resumed run with edits keeps the old ones
            log.warning("MLflow run %s already has other values for %s; kept the old ones", self.run_id, changed[:5])
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + PARAMS_PER_BATCH])
        self._log_text(dump_yaml(self.config), "config.yaml")
        self._writer = _BatchWriter(self.client, self.run_id)
        self._writer.start()
        log.info("MLflow run %s at %s", self.run_id, resolve_tracking_uri(self.tracking))

    def after_iter(self, trainer: Any, log_values: dict[str, float]) -> None:
        if trainer.iter % self.log_interval and trainer.iter != trainer.max_iters:
            return
        values = {k: v for k, v in log_values.items() if k == "loss" or k.startswith("loss_") or k in ("lr", "images_per_s")}
        if "images_per_s" not in values and log_values.get("time"):
            values["images_per_s"] = log_values["images"] / log_values["time"]
        self._add(values, trainer.iter)
        self._steps += 1
        if self._steps % self.flush_every == 0 or time.monotonic() - self._last_flush > FLUSH_EVERY_S:
            self.flush()

    def after_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        values = {metric_key(k): v for k, v in metrics.items()}
        best = getattr(trainer.checkpointer, "best", None) or {}
        if best.get("metric") and best.get("value") is not None:
            values[metric_key(f"best/{best['metric']}")] = best["value"]
            values["best_epoch"] = float(best.get("epoch", 0))
            values["best_iter"] = float(best.get("iter", 0))
        values["epoch"] = trainer.iter / trainer.iters_per_epoch
        self._add(values, trainer.iter)
        self.flush()

    def after_train(self, trainer: Any, result: Any) -> None:
        result.run_id = self.run_id
        self._finish(trainer, "FINISHED")

    def on_error(self, trainer: Any, error: BaseException) -> None:
        from detection.engine import Preempted

        status = "KILLED" if isinstance(error, (Preempted, KeyboardInterrupt)) else "FAILED"
        if self.run_id is not None:
            self._finish(trainer, status)

    # -- helpers ---------------------------------------------------------------------------
    def _add(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, int(step)) for k, v in values.items())

    def flush(self) -> None:
        """Hand the buffered metric values to the writer thread."""
        if self._buffer and self._writer is not None:
            self._writer.jobs.put(self._buffer)
            self._buffer = []
        self._last_flush = time.monotonic()

    def _finish(self, trainer: Any, status: str) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.jobs.put(None)
            self._writer.join(timeout=120)
            self.writer_cpu_s = self._writer.busy_s
            self._writer = None
        try:
            self._log_artifacts(trainer)
        except Exception as err:  # noqa: BLE001 - a failed upload must not hide the run's result
            log.warning("MLflow: artifacts not logged: %s", err)
        self.client.set_terminated(self.run_id, status=status)

    def _log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def _log_artifacts(self, trainer: Any) -> None:
        from detection.evaluation import per_class_table

        out = trainer.output_dir
        split = self.config.eval.split
        for name in (f"eval_{split}.json",):
            if os.path.isfile(os.path.join(out, name)):
                self.client.log_artifact(self.run_id, os.path.join(out, name))
        if trainer.metrics:
            self._log_text(per_class_table(trainer.metrics), "per_class_ap.md")
        if trainer.history.get("train") or trainer.history.get("eval"):
            self.client.log_artifact(self.run_id, plot_curves(trainer.history, os.path.join(out, "curves.png")))
        best = getattr(trainer.checkpointer, "best", None) or {}
        if self.tracking.log_checkpoints and best.get("path") and os.path.isfile(best["path"]):
            self.client.log_artifact(self.run_id, best["path"], artifact_path="checkpoints")
