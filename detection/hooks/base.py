"""The hook interface: everything around the training loop (logging, LR, evaluation,
checkpoints, MLflow, a backend's preemption signal or Ray reporting) is a :class:`Hook`.

The trainer calls the hooks in list order. ``trainer.iter`` counts finished optimizer steps and
``trainer.epoch`` is the 0-based epoch in progress (in ``after_epoch``: the epoch just finished).
"""

from __future__ import annotations

from typing import Any


class Hook:
    """Base class with no-op methods; override what you need.

    Attributes of the trainer a hook may read: ``env, model, optimizer, epoch, iter, max_iters,
    iters_per_epoch, output_dir, checkpointer, history, metrics, stopping, pending_eval`` (and
    ``lr_scaling``, ``device``). A hook never sets them: it reports through the trainer's
    methods (``report_eval``, ``defer_eval``) and its own return values, so the trainer stays
    the one owner of training state (``Trainer.state_dict``). A hook gets its own settings
    (periods, intervals, schedule) when it is built.
    """

    def before_train(self, trainer: Any) -> None:
        """Once, after resume and before the first step."""

    def after_iter(self, trainer: Any, log: dict[str, float]) -> None:
        """After each optimizer step. ``log`` holds ``loss``, each loss term (averaged over
        ranks), ``lr``, ``time`` (s of this step), ``data_time`` and ``images`` (global count),
        and on logged steps ``images_per_s`` (since the previous logged step). Read it only."""

    def after_epoch(self, trainer: Any) -> None:
        """After the last step of a complete epoch."""

    def after_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        """After an evaluation, on every rank, with the same metrics everywhere."""

    def after_checkpoint(self, trainer: Any, path: str) -> None:
        """After a checkpoint file was written (every rank is told; rank 0 wrote it)."""

    def after_train(self, trainer: Any, result: Any) -> None:
        """Once at the end of a successful run, with the :class:`TrainResult` (mutable)."""

    def on_error(self, trainer: Any, error: BaseException) -> None:
        """When training stops with an exception (including ``Preempted``) before it propagates."""

    def should_stop(self, trainer: Any) -> bool:
        """Return True to have the trainer checkpoint and stop at the next step boundary (then
        it raises ``Preempted``). Checked on every rank; any rank asking stops all."""
        return False


def due(trainer: Any, period: int, unit: str) -> bool:
    """Whether an action timed in steps falls on the step just finished: every ``period``
    iterations when ``unit`` is ``"iter"`` (epoch units are timed in ``after_epoch``), and always
    on the last step."""
    return (unit == "iter" and trainer.iter % period == 0) or trainer.iter == trainer.max_iters
