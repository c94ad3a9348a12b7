"""The held-out test split of a k-fold set (``kfold.test``): a COCO file kept out of every fold,
on which each fold's best checkpoint is scored when the set ends.

Validation numbers of k-fold are out-of-fold but still *selected on*: the best checkpoint of a
fold is the one that scored best on that fold's validation images, and grid points are compared
on them. A test file no fold trained or selected on gives the unbiased number, and, with one
model per fold, its spread over folds (``test_mean/<metric>``, ``test_std/<metric>`` on the
point's parent run, test columns in the report). ``orch ensemble`` then fuses the folds on the
same file.

The test file's images must not be training images: checked before anything is launched (same
image file, or same ``file_name`` in the same image folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from cluster.errors import DataError, OrchError

CACHE = "predictions_test.views.json"


@dataclass(frozen=True)
class HeldOutSplit:
    """A held-out COCO file and the folder its ``file_name`` are relative to."""

    ann_file: str
    img_dir: str


def held_out_split(exp: Any, ann_file: Optional[str], img_dir: Optional[str] = None) -> Optional[HeldOutSplit]:
    """The test split ``ann_file`` (``kfold.test`` or ``--test``) with its images in ``img_dir``
    (``kfold.test_img_dir`` or ``--img-dir``), else ``data.test.img_dir``, else
    ``data.train.img_dir`` of experiment ``exp``, as absolute paths. None without ``ann_file``.
    Only checks that the file exists: it is not read."""
    if not ann_file:
        return None
    if not os.path.isfile(ann_file):
        raise DataError(f"test annotation file {ann_file} does not exist; fix kfold.test (or --test)")
    test_cfg = exp.data.test
    folder = img_dir or (test_cfg.img_dir if test_cfg and test_cfg.img_dir else exp.data.train.img_dir)
    if not os.path.isdir(folder):
        raise DataError(f"test image folder {folder} is not a folder; set kfold.test_img_dir (or --img-dir)")
    # absolute: set.json records them, and orch ensemble may run from another folder
    return HeldOutSplit(os.path.abspath(ann_file), os.path.abspath(folder))


def check_held_out(split: HeldOutSplit, train_ann: str, train_img_dir: str) -> None:
    """DataError when an image of the test file is also an image of the training file (the same
    file on disk): a test set must be kept out of every fold."""
    from detection.data.coco import load_coco_json

    def paths(ann: str, folder: str) -> dict[str, str]:
        return {os.path.realpath(os.path.join(folder, img["file_name"])): img["file_name"]
                for img in load_coco_json(ann)["images"]}

    shared = sorted(set(paths(split.ann_file, split.img_dir)) & set(paths(train_ann, train_img_dir)))
    if shared:
        raise DataError(f"kfold.test {split.ann_file} shares {len(shared)} image(s) with the training file "
                        f"{train_ann} (first: {shared[0]}); a test split must be kept out of every fold")


def evaluate_test(exp: Any, split: HeldOutSplit, summaries: Sequence[Any], trials: Mapping[str, Sequence[Any]],
                  state: dict, echo: Callable[[str], None]) -> None:
    """Score each fold's checkpoint (:func:`~orchestrator.kfold.predictions.fold_checkpoint`) of
    every summarised point on ``split`` and fill the summaries' ``test``, ``test_mean`` and
    ``test_std`` (bbox metrics, per class too). Predictions are cached in each fold's folder."""
    from orchestrator.kfold.aggregate import evaluate_fold, mean_std
    from orchestrator.kfold.predictions import fold_checkpoint, predict_split

    for summary in summaries:
        try:
            for trial in trials[summary.name]:
                folder = Path(state["trials"][trial.name]["output_dir"])
                checkpoint = fold_checkpoint(folder, exp.checkpoint.save_best)
                preds = predict_split(trial.experiment, checkpoint, split.ann_file, split.img_dir, ("none",),
                                      folder / CACHE)
                summary.test[trial.fold] = evaluate_fold(split.ann_file, preds.views["none"], ("bbox",),
                                                         exp.eval.engine)
        except OrchError as err:  # the validation numbers stand; the parents must still be ended
            summary.test = {}
            echo(f"  {summary.name or 'set'}: no test scores ({err})")
            continue
        summary.test_mean, summary.test_std = mean_std(summary.test)
        echo(f"  {summary.name or 'set'}: test bbox_mAP {summary.test_mean.get('bbox_mAP', float('nan')):.4f} "
             f"± {summary.test_std.get('bbox_mAP', float('nan')):.4f} over {len(summary.test)} folds ({split.ann_file})")
