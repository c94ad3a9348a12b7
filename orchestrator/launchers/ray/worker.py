"""What runs inside each Ray Train worker: the Ray context becomes a :class:`DistEnv`, the last
reported checkpoint becomes ``runtime.resume``, and the one training entry point runs with a hook
that reports evaluations and checkpoints back to Ray.

Ray Train's ``TorchTrainer`` has already initialised the process group (gloo on CPU, nccl on GPU)
when :func:`train_loop` starts; ``detection.train.main`` uses an existing group instead of
creating a second one. ``ray.train.report`` is a barrier over all workers, so :class:`RayReportHook`
reports from every rank at the same points (the trainer calls ``after_eval`` and
``after_checkpoint`` on every rank); only rank 0 attaches the checkpoint it wrote.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from typing import Any, Optional

from detection.hooks.base import Hook

log = logging.getLogger(__name__)

# Periodic (resumable) checkpoints; best_<metric>.pth copies are not reported.
PERIODIC = re.compile(r"(iter|epoch)_\d+\.pth")
# Values from the training log that go with every report (so a sweep can rank on loss too).
TRAIN_KEYS = ("loss", "lr")


def report_metrics(trainer: Any, metrics: Optional[dict[str, float]], train_log: dict[str, float]) -> dict[str, Any]:
    """The flat dict reported to Ray: eval metrics, last train loss/lr, iteration and epoch."""
    out: dict[str, Any] = {f"train/{k}": float(train_log[k]) for k in TRAIN_KEYS if k in train_log}
    if "loss" in train_log:
        out["loss"] = float(train_log["loss"])
    out.update({k: float(v) for k, v in (metrics or {}).items()})
    out["iteration"] = int(trainer.iter)
    out["max_iters"] = int(trainer.max_iters)
    out["epoch"] = trainer.iter / max(1, trainer.iters_per_epoch)
    return out


class StepReporter(Hook):
    """Collects what happened at one step (an evaluation, a periodic checkpoint) and sends it
    once, at the step boundary, with that step's training loss: launcher hooks run after the
    trainer's own, so by this hook's ``after_iter`` / ``after_epoch`` the step's evaluation and
    checkpoint are done. Subclasses implement :meth:`send`."""

    def __init__(self) -> None:
        self.train_log: dict[str, float] = {}
        self.metrics: Optional[dict[str, float]] = None  # evaluated at this step, not yet sent
        self.checkpoint: Optional[str] = None
        self.last_metrics: dict[str, float] = {}

    def after_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.metrics = self.last_metrics = dict(metrics)

    def after_checkpoint(self, trainer: Any, path: str) -> None:
        if PERIODIC.fullmatch(os.path.basename(path)):
            self.checkpoint = path

    def after_iter(self, trainer: Any, log_values: dict[str, float]) -> None:
        self.train_log = dict(log_values)
        self._flush(trainer)

    def after_epoch(self, trainer: Any) -> None:
        self._flush(trainer)  # epoch schedules evaluate and save in after_epoch

    def after_train(self, trainer: Any, result: Any) -> None:
        self._flush(trainer)

    def _flush(self, trainer: Any) -> None:
        if self.metrics is None and self.checkpoint is None:
            return
        values = report_metrics(trainer, self.metrics or self.last_metrics, self.train_log)
        checkpoint, self.metrics, self.checkpoint = self.checkpoint, None, None
        self.send(trainer, values, checkpoint)

    def send(self, trainer: Any, values: dict[str, Any], checkpoint: Optional[str]) -> None:
        """Report ``values`` (and ``checkpoint``, a file path or None): Ray Train or Tune below."""
        raise NotImplementedError  # abstract: RayReportHook and TuneReportHook implement it


class RayReportHook(StepReporter):
    """Reports to Ray Train after each evaluation (metrics) and each periodic checkpoint
    (metrics + the checkpoint file, attached by rank 0), so Ray can restart a failed worker group
    from the newest checkpoint. ``best_<metric>.pth`` copies are not reported."""

    def send(self, trainer: Any, values: dict[str, Any], checkpoint: Optional[str]) -> None:
        import ray.train

        if checkpoint is None or trainer.env.rank != 0:
            ray.train.report(values)
            return
        # Ray copies the folder into its storage (synchronously), so a temporary hard link is
        # enough; the trainer's own retention may delete the file afterwards.
        with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as folder:
            target = os.path.join(folder, os.path.basename(checkpoint))
            try:
                os.link(checkpoint, target)
            except OSError:
                shutil.copy2(checkpoint, target)
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(folder))


def restore_checkpoint(checkpoint: Any, output_dir: str, rank: int) -> Optional[str]:
    """Copy a Ray checkpoint (possibly on remote storage) next to the run and return the path of
    the ``.pth`` file in it, or None when it holds none."""
    folder = os.path.join(output_dir, "ray_restore", f"rank{rank}")
    shutil.rmtree(folder, ignore_errors=True)
    checkpoint.to_directory(folder)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".pth"))
    return os.path.join(folder, files[-1]) if files else None


def dist_env_from_ray():
    """The :class:`DistEnv` of this Ray Train worker (rank, local rank, node; the rendezvous
    address Ray's torch backend exported)."""
    import ray.train

    from cluster.env import DistEnv

    ctx = ray.train.get_context()
    port = os.environ.get("MASTER_PORT", "").strip()
    return DistEnv.from_values(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        local_world_size=ctx.get_local_world_size(),
        node_rank=ctx.get_node_rank(),
        master_addr=os.environ.get("MASTER_ADDR") or None,
        master_port=int(port) if port else None,
        source="ray",
    )


def checkpoint_step(path: str) -> int:
    """The step (or epoch) a periodic checkpoint file was written at, from its name (-1: unknown)."""
    match = re.fullmatch(r"(?:iter|epoch)_(\d+)\.pth", os.path.basename(path))
    return int(match.group(1)) if match else -1


def own_checkpoint(output_dir: str) -> Optional[str]:
    """The newest checkpoint the job wrote to its own output folder (``last_checkpoint``), if here."""
    folder = os.path.join(output_dir, "checkpoints")
    try:
        with open(os.path.join(folder, "last_checkpoint")) as handle:
            path = os.path.join(folder, handle.read().strip())
    except OSError:
        return None
    return path if os.path.isfile(path) else None


def resume_point(restored: Optional[str], output_dir: str, restarted: bool) -> Optional[str]:
    """The checkpoint a worker (re)starts from: the one Ray restored (the last one reported) or,
    when Ray restarted this job's workers, the job's own newest one if it is newer. A worker
    that died during a report (a barrier of all workers) leaves Ray a checkpoint behind, or
    without any, although the job's folder holds the newer one."""
    candidates = [p for p in (restored, own_checkpoint(output_dir) if restarted else None) if p]
    return max(candidates, key=checkpoint_step) if candidates else None


def train_loop(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of orch's ``TorchTrainer``. ``loop_config``: ``config_path``
    (resolved YAML), ``output_dir``, ``cwd`` (the submitting directory, for relative paths),
    ``run_name`` (unique per submission: tells a restart by Ray from the first start)."""
    import ray.train

    from cluster.logs import setup_logging
    from orchestrator.worker import run

    cwd = loop_config.get("cwd")
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)  # Ray workers start elsewhere; relative data paths mean the submit dir
    env = dist_env_from_ray()
    setup_logging(env.rank)
    output_dir = loop_config["output_dir"]
    # This submission's workers started here before: Ray is restarting them after a failure.
    started = os.path.join(output_dir, "ray_restore", f"{loop_config.get('run_name') or 'run'}.started")
    restarted = os.path.exists(started)
    if env.rank == 0 and not restarted:
        os.makedirs(os.path.dirname(started), exist_ok=True)
        open(started, "w").close()
    checkpoint = ray.train.get_checkpoint()
    restored = restore_checkpoint(checkpoint, output_dir, env.rank) if checkpoint is not None else None
    path = resume_point(restored, output_dir, restarted)
    overrides = []
    if path:
        log.info("restarted by Ray: resuming from %s", path)
        overrides.append(f"runtime.resume={path}")
    run(loop_config["config_path"], overrides, hooks=[RayReportHook()], env=env)
