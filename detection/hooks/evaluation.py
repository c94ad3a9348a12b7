"""Evaluation during training: every ``period`` epochs or iterations and at the end, predictions
from every rank, COCOeval on rank 0, the same numbers on every rank afterwards (so ``save_best``
decisions agree). The evaluation itself is :func:`detection.evaluation.evaluate_model`."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from cluster.files import write_json_atomic
from detection.evaluation import evaluate_model
from detection.hooks.base import Hook, due


class EvalHook(Hook):
    """Evaluate every ``period`` ``unit``\\ s (``"epoch"`` or ``"iter"``) and at the end; write
    ``predictions_<split>.json`` and ``eval_<split>.json`` (rank 0); report the metrics to the
    trainer (``trainer.report_eval``), which records them and tells the other hooks."""

    def __init__(self, loader: Any, dataset: Any, *, period: int = 1, unit: str = "epoch", split: str = "val",
                 iou_types: Sequence[str] = ("bbox",), classwise: bool = False, with_masks: bool = False,
                 engine: str = "auto") -> None:
        assert unit in ("epoch", "iter"), unit
        self.loader, self.dataset = loader, dataset
        self.period, self.unit = max(1, int(period)), unit
        self.split, self.iou_types, self.classwise, self.with_masks = split, tuple(iou_types), classwise, with_masks
        self.engine = engine
        self.last_evaluated: Optional[int] = None

    def before_train(self, trainer: Any) -> None:
        if trainer.pending_eval:  # the run stopped (preempted) where an evaluation was due
            self.evaluate(trainer)

    def after_iter(self, trainer: Any, log_values: dict[str, float]) -> None:
        if due(trainer, self.period, self.unit):
            self.evaluate(trainer)

    def after_epoch(self, trainer: Any) -> None:
        if self.unit == "epoch" and (trainer.epoch + 1) % self.period == 0:
            self.evaluate(trainer)

    def evaluate(self, trainer: Any) -> dict[str, float]:
        """Run one evaluation now (once per iteration at most). When the run is stopping (a
        preemption signal gives seconds, an evaluation may take minutes) it is left to the
        resumed run instead: the checkpoint records it as pending."""
        if self.last_evaluated == trainer.iter:
            return trainer.metrics
        if trainer.stopping:
            trainer.defer_eval()
            return trainer.metrics
        self.last_evaluated = trainer.iter
        metrics = evaluate_model(
            trainer.model, self.loader, self.dataset, trainer.device, iou_types=self.iou_types,
            classwise=self.classwise, world_size=trainer.env.world_size, rank=trainer.env.rank,
            predictions_path=os.path.join(trainer.output_dir, f"predictions_{self.split}.json"),
            with_masks=self.with_masks, engine=self.engine,
        )
        if trainer.env.rank == 0:  # before the hooks hear of it: the journal hook ships this file
            record = {"iter": trainer.iter, "epoch": trainer.iter / trainer.iters_per_epoch, "metrics": metrics}
            write_json_atomic(os.path.join(trainer.output_dir, f"eval_{self.split}.json"),
                              {"split": self.split, **record}, sort_keys=False)
        trainer.report_eval(metrics)  # the trainer records it and tells the hooks (after_eval)
        return metrics
