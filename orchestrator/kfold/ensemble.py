"""``orch ensemble``: from the k fold models of a set to one better model, tuned honestly.

Each fold's checkpoint (:func:`~orchestrator.kfold.predictions.fold_checkpoint`) predicts its own
validation fold (out-of-fold, OOF) and the held-out test file, each image as it is and mirrored
(``hflip``, boxes mirrored back). The folds' boxes are fused per test image (:mod:`.fusion`:
weighted boxes fusion, NMS or soft-NMS), with settings tuned on OOF predictions only.

Why the OOF proxy is built the way it is. On the test set every image gets k fold models; on a
training image only ONE of them is honest: the fold model whose validation set holds it (the
other k-1 trained on it, and fusing their memorised boxes would teach the tuner to trust fusion
far more than it should). So an honest proxy cannot fuse k models per image. The standard answer
(tune fusion on OOF predictions of several *model types*) does not apply to one model type.
orch's proxy fuses, per training image, the predictions of its own fold model under both views
(as is and hflip): two members that differ (as fold models differ), neither of which saw the
image. The proxy is fused and scored against the full training annotation file, and a coordinate
search (:mod:`.tune`) picks the IoU threshold, the skip threshold and WBF's confidence type
(soft-NMS: sigma). One member alone could not tell the settings apart, which is why the proxy
uses both views even when the delivered ensemble (``--tta none``) does not.

Per-fold weights cannot be tuned on that proxy: every member of an image comes from the same
fold, and WBF's and NMS's scores are invariant to a weight all members share. What OOF data does
give is each fold model's score on its own validation fold; ``--weights oof`` weighs the folds
by it (over the mean). The default is ``equal``: folds of one model type are exchangeable, and
their OOF scores are measured on *different* images, so their differences say more about which
images a fold drew than about its model (with the tiny test set, 0.022 vs 0.000 gave weights
1.96 and 0.04).

The test annotation file is read only after tuning has ended (``on_tuned`` is called first):
nothing about the test set can leak into the settings. The test table then gives each fold's
score, their mean, and the ensemble, without and with TTA; ``--tta`` picks which ensemble is
written as COCO results and leads the MLflow run (:mod:`.ensemble_record`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from cluster.errors import ConfigError, DataError
from orchestrator.kfold.fusion import FusionSettings, fuse, index_results
from orchestrator.kfold.predictions import fold_checkpoint, predict_split
from orchestrator.kfold.split import file_sha256
from orchestrator.kfold.tune import Tuned, cached_search

log = logging.getLogger(__name__)
VIEWS = ("none", "hflip")
TTA_CHOICES = ("none", "hflip")
WEIGHT_RULES = ("equal", "oof")


@dataclass(frozen=True)
class FoldModel:
    """One fold of the chosen point: its index, its resolved experiment and its checkpoint."""

    fold: int
    experiment: Any
    checkpoint: Path


@dataclass
class EnsembleOutcome:
    """What ``run_ensemble`` made: the tuned settings, the fold weights, the test scores
    (``rows[name][tta] -> metrics``), and the files (see :mod:`.ensemble_record`)."""

    set_id: str
    point: str
    out_dir: Path
    tuned: Tuned
    weights: list[float]
    rows: dict[str, dict[str, dict[str, float]]]
    results: Path
    table: str
    journal: Optional[str] = None


def pick_points(set_dir: Path, state: dict, point: str) -> list[str]:
    """The grid points to ensemble: ``point`` by name, ``best`` (the set's only point, or the
    best one of its report) or ``all`` (every point, one ensemble each)."""
    names = sorted({t["point"] for t in state.get("trials", {}).values()})
    if not names:
        raise DataError(f"{set_dir}/set.json lists no trials; run orch kfold first")
    if point == "all":
        return names
    if point == "best":
        if len(names) == 1:
            return names
        from orchestrator.kfold.aggregate import compare_points
        from orchestrator.kfold.report import read_report

        meta, summaries = read_report(set_dir / "report")
        return [compare_points(summaries, meta["metric"], meta.get("mode", "max"))[0]["point"]]
    if point not in names:
        raise ConfigError(f"--point {point!r} is not a grid point of this set; choose best, all or one of: "
                          f"{', '.join(names)}")
    return [point]


def fold_models(state: dict, point: str) -> list[FoldModel]:
    """The finished folds of ``point``, by fold index; DataError when one did not finish."""
    from orchestrator.config import load_experiment

    models = []
    for name, record in sorted(state["trials"].items(), key=lambda item: item[1].get("fold") or 0):
        if record["point"] != point:
            continue
        if record.get("status") != "SUCCEEDED":
            raise DataError(f"trial {name} is {record.get('status')}, not SUCCEEDED; run orch kfold again to finish it")
        folder = Path(record["output_dir"])
        exp = load_experiment(str(folder / "config.yaml"))
        models.append(FoldModel(int(record["fold"]), exp, fold_checkpoint(folder, exp.checkpoint.save_best)))
    if len(models) < 2:
        raise DataError(f"point {point or '(all)'} has {len(models)} finished fold(s); an ensemble needs 2 or more")
    return models


def run_ensembles(set_ref: str, point: str = "best", **options: Any) -> list[EnsembleOutcome]:
    """:func:`run_ensemble` for each point :func:`pick_points` names (``best``, ``all``, a name)."""
    from orchestrator.kfold.runner import find_set, load_state

    set_dir = find_set(set_ref)
    names = pick_points(set_dir, load_state(set_dir), point)
    return [run_ensemble(str(set_dir), point=name, **options) for name in names]


def run_ensemble(set_ref: str, test: Optional[str] = None, img_dir: Optional[str] = None, tta: str = "none",
                 method: str = "wbf", point: str = "best", weights: str = "equal", device: Optional[str] = None,
                 batch_size: int = 8, echo: Callable[[str], None] = print,
                 on_tuned: Optional[Callable[[Tuned], None]] = None) -> EnsembleOutcome:
    """Ensemble the folds of one point of a k-fold set (``point``: its name, or ``best``; see the
    module docstring); ``on_tuned`` is called once the settings are final, before the test
    annotations are read."""
    from orchestrator.kfold import ensemble_record
    from orchestrator.kfold.expand import slug_of
    from orchestrator.kfold.heldout import check_held_out, held_out_split
    from orchestrator.kfold.runner import find_set, load_state

    if tta not in TTA_CHOICES:
        raise ConfigError(f"--tta {tta}: choose one of {', '.join(TTA_CHOICES)}")
    if weights not in WEIGHT_RULES:
        raise ConfigError(f"--weights {weights}: choose one of {', '.join(WEIGHT_RULES)}")
    FusionSettings(method=method)  # a bad --method fails before any prediction
    if test and not img_dir:  # a guessed folder could hold training images of the same names
        raise ConfigError(f"--test {test} needs --img-dir DIR, the folder its file_name entries are relative to")
    set_dir = find_set(set_ref)
    state = load_state(set_dir)
    if point == "all":
        raise ConfigError("--point all: one point at a time here; run_ensembles ensembles every point")
    [name] = pick_points(set_dir, state, point)
    models = fold_models(state, name)
    first = models[0].experiment
    recorded = state.get("test") or {}
    split = held_out_split(first, test or recorded.get("ann_file"), img_dir or recorded.get("img_dir"))
    if split is None:
        raise ConfigError(f"set {state.get('set_id')} has no test file: give --test ANN (and --img-dir DIR) or set "
                          "kfold.test in the experiment")
    metric = first.checkpoint.save_best or "bbox_mAP"
    if not metric.startswith("bbox_"):
        metric = "bbox_mAP"  # fusion is of boxes
    engine = first.eval.engine
    out_dir = set_dir / "ensemble" / (slug_of(name) or "all") / f"{method}-tta_{tta}"
    cache = set_dir / "ensemble" / (slug_of(name) or "all") / "cache"
    echo(f"ensemble of {len(models)} folds of {name or 'set ' + str(state.get('set_id'))} ({method}, tta {tta})")

    # 1. out-of-fold: every training image, predicted by the one model that did not train on it
    oof = {m.fold: predict_split(m.experiment, m.checkpoint, m.experiment.data.val.ann_file,
                                 m.experiment.data.val.img_dir, VIEWS, cache / f"fold-{m.fold}-oof.json",
                                 device=device, batch_size=batch_size) for m in models}
    fold_scores = {m.fold: _score(m.experiment.data.val.ann_file, oof[m.fold].views["none"], engine)[metric]
                   for m in models}
    weight_list = _weights([fold_scores[m.fold] for m in models], weights)
    proxy_members = [_union(oof, view) for view in VIEWS]
    proxy_sizes = {i: s for p in oof.values() for i, s in p.sizes.items()}
    gt = _ground_truth(state["ann_file"])

    def proxy_score(settings: FusionSettings) -> float:
        fused = fuse(proxy_members, [1.0, 1.0], proxy_sizes, settings)
        return _evaluate(gt, fused, engine, classwise="/" in metric)[metric]

    # 2. tuning, on those predictions only (kept: another --tta on the same predictions reuses it)
    key = {"oof": {str(m.fold): file_sha256(cache / f"fold-{m.fold}-oof.json") for m in models},
           "ann_sha256": file_sha256(Path(state["ann_file"])), "metric": metric, "engine": engine}
    tuned, reused = cached_search(proxy_score, method, cache / f"tuned-{method}.json", key)
    echo(f"tuned on out-of-fold predictions ({len(proxy_sizes)} images, {len(tuned.trace)} settings tried"
         f"{'; reused' if reused else ''}): {tuned.settings.params()}; OOF proxy {metric} {tuned.score:.4f} "
         f"(defaults {tuned.default_score:.4f})")
    if on_tuned is not None:
        on_tuned(tuned)

    # 3. the test set, read only now
    check_held_out(split, state["ann_file"], first.data.train.img_dir)
    test_preds = {m.fold: predict_split(m.experiment, m.checkpoint, split.ann_file, split.img_dir, VIEWS,
                                        cache / f"fold-{m.fold}-test.json", device=device, batch_size=batch_size)
                  for m in models}
    rows, fused = _test_rows(models, test_preds, weight_list, tuned.settings, _ground_truth(split.ann_file), engine)
    return ensemble_record.record(ensemble_record.Record(
        set_dir=set_dir, state=state, point=name, folds=[m.fold for m in models], experiment=first, split=split,
        out_dir=out_dir, tuned=tuned, weights=weight_list, fold_scores=fold_scores, rows=rows, results=fused[tta],
        tta=tta, metric=metric, weight_rule=weights), echo)


def _ground_truth(ann_file: str) -> Any:
    from detection.evaluation import load_ground_truth

    return load_ground_truth(ann_file)


def _evaluate(gt: Any, results: list, engine: str, classwise: bool = True) -> dict[str, float]:
    from detection.evaluation import evaluate_coco

    return evaluate_coco(gt, results, iou_types=("bbox",), classwise=classwise, engine=engine)


def _score(ann_file: str, results: list, engine: str) -> dict[str, float]:
    return _evaluate(_ground_truth(ann_file), results, engine)


def _union(preds: dict[int, Any], view: str) -> dict[int, Any]:
    """One view's OOF predictions of every fold as one member (the folds' images are disjoint)."""
    member: dict[int, Any] = {}
    for p in preds.values():
        member.update(index_results(p.views[view]))
    return member


def _weights(scores: list[float], rule: str) -> list[float]:
    """Per-fold weights: each fold's OOF score over their mean (``oof``), or all 1 (``equal``)."""
    clean = [max(0.0, s) for s in scores]  # -1 = undefined
    mean = sum(clean) / len(clean)
    if rule == "equal" or mean <= 0:
        return [1.0] * len(scores)
    return [s / mean for s in clean]


def _test_rows(models: list[FoldModel], preds: dict[int, Any], weights: list[float], settings: FusionSettings,
               gt: Any, engine: str) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, list]]:
    """Test metrics of each fold, their mean, and the ensemble, each without and with TTA
    (``rows[name][tta]``); and the ensemble's COCO results per TTA choice."""
    from orchestrator.kfold.aggregate import mean_std

    members = {m.fold: {v: index_results(preds[m.fold].views[v]) for v in VIEWS} for m in models}
    sizes = preds[models[0].fold].sizes
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for m in models:
        single = members[m.fold]
        rows[f"fold-{m.fold}"] = {
            "none": _evaluate(gt, preds[m.fold].views["none"], engine),
            "hflip": _evaluate(gt, fuse([single["none"], single["hflip"]], [1.0, 1.0], sizes, settings), engine),
        }
    rows["mean of folds"] = {tta: mean_std({m.fold: rows[f"fold-{m.fold}"][tta] for m in models})[0]
                             for tta in TTA_CHOICES}
    fused = {"none": fuse([members[m.fold]["none"] for m in models], weights, sizes, settings),
             "hflip": fuse([members[m.fold][v] for m in models for v in VIEWS], [w for w in weights for _ in VIEWS],
                           sizes, settings)}
    rows["ensemble"] = {tta: _evaluate(gt, results, engine) for tta, results in fused.items()}
    return rows, fused
