"""What a training run records for MLflow, written from rank 0 to the run's journal only.

Training never talks to a tracking server: :class:`JournalHook` appends params, tags, metric
values, artifact references and the run's status to ``<output_dir>/journal/``
(:mod:`detection.journal`); a shipper process replays the journal to MLflow, beside training or
later (``orch sync``), exactly once. A server that is down at the start, mid-run or at the end,
or that compute nodes cannot reach at all, costs training nothing and loses no value: the job's
outcome is the training's outcome. Per step the hook only appends to a buffer (microseconds);
the buffer is written every ``flush_every`` logged steps or 10 s, and made durable (fsync) after
every checkpoint (the checkpointed step's own values included) and at the end, so a resumed or
requeued job continues the same journal (and the same MLflow run) from where its last checkpoint
left it. Steps after that checkpoint may already be in the journal (flushed before a kill -9):
the resumed run does not log them again, so MLflow holds each step once (the first values stay).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import subprocess
import time
from typing import Any, Optional, Sequence

from detection.hooks.base import Hook
from detection.journal import Journal, is_journal, journal_dir, last_steps
from detection.serialize import config_hash, dump_yaml, to_plain

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000  # MLflow's limit; longer values are cut (the full YAML is an artifact)
FLUSH_EVERY_S = 10.0

def open_journal(folder: str, config: Any) -> Journal:
    """The run's journal: the one orch created at submit (with its parent and tags), else a new
    one named after the experiment (``detection.train.main`` called directly, ``orch train``)."""
    if is_journal(folder):
        return Journal.open(folder)
    tracking = config.tracking
    return Journal.create(folder, experiment=tracking.experiment or config.name,
                          run_name=tracking.run_name or config.name, tags=dict(tracking.tags or {}),
                          parent=tracking.parent_journal or None, tracking_uri=tracking.uri or None)


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


class JournalHook(Hook):
    """Records a training run in its journal (rank 0 only; see the module docstring).

    ``config``: the experiment (its params, YAML and ``tracking`` tags are logged once);
    ``hosts``: host names of all ranks (gathered by the builder); ``log_interval``: log the
    training values every that many iterations (and at the end); ``flush_every``: write the
    buffered values every that many logged steps (or every 10 s).
    """

    def __init__(self, config: Any, hosts: Sequence[str] = (), log_interval: int = 10, flush_every: int = 50) -> None:
        self.config = config
        self.log_interval = max(1, int(log_interval))
        self.tracking = config.tracking
        self.hosts = sorted(set(hosts)) or [socket.gethostname()]
        self.flush_every = flush_every
        self.journal: Optional[Journal] = None
        self._steps = 0
        self._last_flush = time.monotonic()
        self._durable_at = -1  # the step a checkpoint was just saved at (its values come after)
        self._logged: dict[str, int] = {}  # a resumed run: the last step of each key already journaled

    # -- lifecycle -------------------------------------------------------------------------
    def before_train(self, trainer: Any) -> None:
        self.journal = open_journal(journal_dir(trainer.output_dir), self.config)
        if trainer.iter > 0:  # resumed: what was journaled after the checkpoint is not logged twice
            self._logged = last_steps(self.journal.folder)
        self.journal.set_status("RUNNING")
        self.journal.set_tags({
            "hosts": ",".join(self.hosts),
            "world_size": str(trainer.env.world_size),
            "device": device_model(trainer.device),
            "git_commit": git_commit(),
            "config_hash": config_hash(self.config),
            "orch_version": orch_version(),
            "lr_scaling": trainer.lr_scaling.describe()[:5000],
            **{str(k): str(v) for k, v in (self.tracking.tags or {}).items()},
        })
        # A resumed run logs its config again; the shipper keeps the first value of each param.
        self.journal.log_params(flatten_params(self.config))
        self.journal.log_text(dump_yaml(self.config), "config.yaml")
        self.journal.flush(durable=True)
        log.info("tracking: journal %s (shipped to MLflow by the shipper / orch sync)", self.journal.folder)

    def after_iter(self, trainer: Any, log_values: dict[str, float]) -> None:
        if trainer.iter % self.log_interval and trainer.iter != trainer.max_iters:
            return
        values = {k: v for k, v in log_values.items() if k == "loss" or k.startswith("loss_") or k in ("lr", "images_per_s")}
        if "images_per_s" not in values and log_values.get("time"):
            values["images_per_s"] = log_values["images"] / log_values["time"]
        self._log(values, trainer.iter)
        self._steps += 1
        if trainer.iter == self._durable_at:  # the checkpoint of this step is on disk: so are its values
            self.journal.flush(durable=True)
            self._last_flush = time.monotonic()
        elif self._steps % self.flush_every == 0 or time.monotonic() - self._last_flush > FLUSH_EVERY_S:
            self.flush()

    def after_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        values = {metric_key(k): v for k, v in metrics.items()}
        best = getattr(trainer.checkpointer, "best", None) or {}
        if best.get("metric") and best.get("value") is not None:
            values[metric_key(f"best/{best['metric']}")] = best["value"]
            values["best_epoch"] = float(best.get("epoch", 0))
            values["best_iter"] = float(best.get("iter", 0))
        values["epoch"] = trainer.iter / trainer.iters_per_epoch
        self._log(values, trainer.iter)
        self.flush()

    def after_checkpoint(self, trainer: Any, path: str) -> None:
        # What the checkpoint holds is in the journal for good: a requeued run resumes from it.
        # An iteration checkpoint is saved before this hook's after_iter logs that step (the
        # checkpoint hook runs first), so that step is made durable there too.
        self.journal.flush(durable=True)
        self._last_flush = time.monotonic()
        self._durable_at = trainer.iter

    def after_train(self, trainer: Any, result: Any) -> None:
        self._finish(trainer, "FINISHED")

    def on_error(self, trainer: Any, error: BaseException) -> None:
        from detection.engine import Preempted

        if self.journal is None:
            return
        status = "KILLED" if isinstance(error, (Preempted, KeyboardInterrupt)) else "FAILED"
        self._finish(trainer, status, artifacts=not isinstance(error, Preempted))

    # -- helpers ---------------------------------------------------------------------------
    def _log(self, values: dict[str, float], step: int) -> None:
        """Journal ``values`` at ``step``, less the keys a resumed run had journaled at this step
        or later (before the kill that it resumes from)."""
        if self._logged:
            values = {k: v for k, v in values.items() if step > self._logged.get(k, -1)}
        if values:
            self.journal.log_metrics(values, step)

    def flush(self) -> None:
        """Write the buffered metric values to the journal."""
        self.journal.flush()
        self._last_flush = time.monotonic()

    def _finish(self, trainer: Any, status: str, artifacts: bool = True) -> None:
        if artifacts:  # a preempted run writes its checkpoint first and leaves at once
            try:
                self._log_artifacts(trainer)
            except Exception as err:  # noqa: BLE001 - a failed plot must not hide the run's result
                log.warning("tracking: artifacts not recorded: %s", err)
        self.journal.set_status(status)  # durable
        self.journal.close()

    def _log_artifacts(self, trainer: Any) -> None:
        from detection.evaluation import per_class_table

        out = trainer.output_dir
        path = os.path.join(out, f"eval_{self.config.eval.split}.json")
        if os.path.isfile(path):
            self.journal.log_artifact(path)
        if trainer.metrics:
            self.journal.log_text(per_class_table(trainer.metrics), "per_class_ap.md")
        if trainer.history.get("train") or trainer.history.get("eval"):
            self.journal.log_artifact(plot_curves(trainer.history, os.path.join(out, "curves.png")))
        best = getattr(trainer.checkpointer, "best", None) or {}
        if self.tracking.log_checkpoints and best.get("path") and os.path.isfile(best["path"]):
            self.journal.log_artifact(best["path"], artifact_path="checkpoints")
