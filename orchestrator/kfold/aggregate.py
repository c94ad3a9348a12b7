"""Numbers of a finished k-fold set: per-fold metrics, mean and std across folds, the out-of-fold
score, and a paired comparison of grid points.

Per-fold metrics are recomputed here from each fold's ``predictions_val.json`` against its
``val_<k>.json`` with :func:`detection.evaluation.evaluate_coco` (the same call the trainer
makes), so the summary depends only on files in the set folder, not on what a backend logged.

The out-of-fold (OOF) score is ONE COCOeval over the union of every fold's validation predictions
against the full annotation file: each image is predicted exactly once, by the model that did not
train on it; for rare classes it is stabler than the mean of per-fold APs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from cluster.errors import DataError

PathLike = Union[str, Path]


@dataclass
class PointSummary:
    """One grid point (or the whole set without a grid) over its folds."""

    name: str
    point: dict[str, Any]
    folds: dict[int, dict[str, float]]  # fold -> metrics
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    oof: dict[str, float] = field(default_factory=dict)
    # on the held-out test file (kfold.test), when the set has one: fold -> metrics, mean, std
    test: dict[int, dict[str, float]] = field(default_factory=dict)
    test_mean: dict[str, float] = field(default_factory=dict)
    test_std: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "point": self.point, "folds": {str(k): v for k, v in self.folds.items()},
                "mean": self.mean, "std": self.std, "oof": self.oof, "test": {str(k): v for k, v in self.test.items()},
                "test_mean": self.test_mean, "test_std": self.test_std}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PointSummary":
        return cls(name=data["name"], point=dict(data["point"]),
                   folds={int(k): v for k, v in data["folds"].items()},
                   mean=dict(data["mean"]), std=dict(data["std"]), oof=dict(data["oof"]),
                   test={int(k): v for k, v in data.get("test", {}).items()},
                   test_mean=dict(data.get("test_mean", {})), test_std=dict(data.get("test_std", {})))


def load_coco(ann_file: PathLike) -> Any:
    """A pycocotools ``COCO`` of ``ann_file``, without its prints (a BOM is allowed)."""
    from detection.evaluation import load_ground_truth

    if not Path(ann_file).is_file():
        raise DataError(f"annotation file {ann_file} does not exist; re-run orch split / orch kfold")
    return load_ground_truth(str(ann_file))


def load_predictions(path: PathLike) -> list[dict[str, Any]]:
    """COCO result dicts written by the trainer (``<output_dir>/predictions_val.json``)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read predictions {path} ({err}); the fold did not finish its evaluation") from None


def evaluate_fold(val_ann: PathLike, predictions: Sequence[Mapping[str, Any]],
                  iou_types: Sequence[str] = ("bbox",), engine: str = "auto") -> dict[str, float]:
    """COCOeval of one fold's validation predictions against its ``val_<k>.json``, per class too;
    ``engine`` is ``eval.engine``."""
    from detection.evaluation import evaluate_coco

    return evaluate_coco(load_coco(val_ann), predictions, iou_types=tuple(iou_types), classwise=True, engine=engine)


def out_of_fold(full_ann: PathLike, fold_predictions: Sequence[Sequence[Mapping[str, Any]]],
                iou_types: Sequence[str] = ("bbox",), engine: str = "auto") -> dict[str, float]:
    """One COCOeval over the concatenated predictions of every fold against the full file.

    Raises :class:`DataError` when two folds predicted the same image (the folds leak)."""
    from detection.evaluation import evaluate_coco

    seen: dict[int, int] = {}
    union: list[Mapping[str, Any]] = []
    for index, preds in enumerate(fold_predictions):
        for image_id in {int(p["image_id"]) for p in preds}:
            if seen.setdefault(image_id, index) != index:
                raise DataError(f"image {image_id} has validation predictions from folds {seen[image_id]} and {index}; the folds leak")
        union.extend(preds)
    return evaluate_coco(load_coco(full_ann), union, iou_types=tuple(iou_types), classwise=True, engine=engine)


def mean_std(per_fold: Mapping[int, Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (ddof=1; 0 with one fold) of every metric across folds.

    COCOeval's ``-1`` (no ground truth in that area range / class on this fold) is "undefined",
    not a score: it is left out of the average, and a metric undefined on every fold stays -1.
    """
    keys = sorted({k for metrics in per_fold.values() for k in metrics})
    mean, std = {}, {}
    for key in keys:
        values = [m[key] for m in per_fold.values() if key in m and m[key] != -1 and not math.isnan(m[key])]
        if not values:
            mean[key], std[key] = -1.0, 0.0
            continue
        mu = sum(values) / len(values)
        mean[key] = mu
        std[key] = math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize_point(name: str, point: Mapping[str, Any], folds: Mapping[int, tuple[PathLike, PathLike]],
                    full_ann: PathLike, iou_types: Sequence[str] = ("bbox",), engine: str = "auto") -> PointSummary:
    """Summary of one grid point; ``folds`` maps fold -> ``(val_ann_file, predictions_file)``;
    ``engine`` is ``eval.engine``."""
    per_fold, preds = {}, []
    for fold in sorted(folds):
        val_ann, pred_file = folds[fold]
        fold_preds = load_predictions(pred_file)
        per_fold[fold] = evaluate_fold(val_ann, fold_preds, iou_types, engine)
        preds.append(fold_preds)
    mean, std = mean_std(per_fold)
    return PointSummary(name=name, point=dict(point), folds=per_fold, mean=mean, std=std,
                        oof=out_of_fold(full_ann, preds, iou_types, engine))


def compare_points(points: Sequence[PointSummary], metric: str = "bbox_mAP", mode: str = "max") -> list[dict[str, Any]]:
    """Rows of the comparison table, best point first.

    The best point has the highest (``mode="max"``) mean ``metric``. Every other point is compared
    with it *paired by fold* (both were trained on the same folds): ``diff`` is the mean of the
    per-fold differences (point - best) and ``p_value`` the two-sided paired t-test
    (``scipy.stats.ttest_rel``). We use the t-test rather than Wilcoxon because with the usual
    3-10 folds Wilcoxon's smallest possible p-value is too large to ever say anything
    (0.25 for 3 folds). p is None with fewer than 2 shared folds or identical scores.
    """
    def mean_of(p: PointSummary) -> float:
        value = p.mean.get(metric, float("nan"))
        return -math.inf if math.isnan(value) else (value if mode == "max" else -value)

    ranked = sorted(points, key=mean_of, reverse=True)
    if not ranked:
        return []
    best = ranked[0]
    rows = []
    for p in ranked:
        shared = sorted(set(p.folds) & set(best.folds))
        a = [p.folds[f].get(metric, float("nan")) for f in shared]
        b = [best.folds[f].get(metric, float("nan")) for f in shared]
        diffs = [x - y for x, y in zip(a, b)]
        rows.append({
            "point": p.name,
            "mean": p.mean.get(metric, float("nan")),
            "std": p.std.get(metric, float("nan")),
            "oof": p.oof.get(metric, float("nan")),
            "diff": sum(diffs) / len(diffs) if diffs else float("nan"),
            "p_value": None if p is best else _paired_p(a, b),
            "folds": {f: p.folds[f].get(metric, float("nan")) for f in sorted(p.folds)},
            "best": p is best,
        })
    return rows


def _paired_p(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    if len(a) < 2 or all(x == y for x, y in zip(a, b)):
        return None
    import warnings

    from scipy.stats import ttest_rel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant differences: scipy warns and returns nan/0
        p = float(ttest_rel(a, b).pvalue)
    return None if math.isnan(p) else p
