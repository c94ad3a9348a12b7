"""Evaluation during training: predictions on the eval split from every rank, COCOeval on rank 0,
the same numbers on every rank afterwards (so ``save_best`` decisions agree)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from detection.evaluation import evaluate_coco, gather_predictions, predictions_to_coco, write_predictions
from detection.hooks.base import Hook

log = logging.getLogger(__name__)


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: Any, device: torch.device, dataset: Any, with_masks: bool = False) -> list[dict]:
    """COCO result dicts of ``model`` on every batch of ``loader`` (this rank's shard).

    The evaluation dataset is not resized (the detector resizes internally and maps its boxes
    back to the input size), so boxes are in original image coordinates.
    """
    was_training = model.training
    model.eval()
    preds: list[dict] = []
    try:
        for images, targets in loader:
            outputs = model([img.to(device, non_blocking=True) for img in images])
            ids = [int(t["image_id"]) for t in targets]
            preds.extend(predictions_to_coco(outputs, ids, dataset.label_to_cat_id, with_masks=with_masks))
    finally:
        model.train(was_training)
    return preds


def evaluate_model(
    model: torch.nn.Module, loader: Any, dataset: Any, device: torch.device, eval_cfg: Any,
    world_size: int = 1, rank: int = 0, predictions_path: Optional[str] = None, with_masks: bool = False,
) -> dict[str, float]:
    """Predict on every rank, gather, evaluate on rank 0 (writing ``predictions_path``), and
    return the metrics on every rank."""
    preds = gather_predictions(predict(model, loader, device, dataset, with_masks), world_size)
    metrics: dict[str, float] = {}
    if rank == 0:
        if predictions_path:
            write_predictions(predictions_path, preds)
        iou_types = tuple(eval_cfg.metric)
        metrics = evaluate_coco(dataset.coco, preds, iou_types=iou_types, classwise=eval_cfg.classwise,
                                engine=eval_cfg.engine)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


class EvalHook(Hook):
    """Evaluate every ``eval.interval`` epochs (iterations when the schedule is in iterations)
    and at the end; write ``predictions_<split>.json`` and ``eval_<split>.json`` (rank 0); tell
    the other hooks through ``after_eval``."""

    def __init__(self, loader: Any, dataset: Any, with_masks: bool = False) -> None:
        self.loader, self.dataset, self.with_masks = loader, dataset, with_masks
        self.last_evaluated: Optional[int] = None

    def after_iter(self, trainer: Any, log_values: dict[str, float]) -> None:
        by_iter = trainer.config.schedule.iterations is not None
        interval = max(1, trainer.config.eval.interval)
        if (by_iter and trainer.iter % interval == 0) or trainer.iter == trainer.max_iters:
            self.evaluate(trainer)

    def after_epoch(self, trainer: Any) -> None:
        if trainer.config.schedule.iterations is None and (trainer.epoch + 1) % max(1, trainer.config.eval.interval) == 0:
            self.evaluate(trainer)

    def evaluate(self, trainer: Any) -> dict[str, float]:
        """Run one evaluation now (once per iteration at most)."""
        if self.last_evaluated == trainer.iter:
            return trainer.metrics
        self.last_evaluated = trainer.iter
        split = trainer.config.eval.split
        metrics = evaluate_model(
            trainer.model, self.loader, self.dataset, trainer.device, trainer.config.eval,
            world_size=trainer.env.world_size, rank=trainer.env.rank,
            predictions_path=os.path.join(trainer.output_dir, f"predictions_{split}.json"),
            with_masks=self.with_masks,
        )
        trainer.metrics = metrics
        record = {"iter": trainer.iter, "epoch": trainer.iter / trainer.iters_per_epoch, "metrics": metrics}
        trainer.history["eval"].append(record)
        if trainer.env.rank == 0:
            path = os.path.join(trainer.output_dir, f"eval_{split}.json")
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                json.dump({"split": split, **record}, handle, indent=1)
            os.replace(path + ".tmp", path)
        trainer.call_hooks("after_eval", metrics)
        return metrics
