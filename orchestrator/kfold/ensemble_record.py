"""What ``orch ensemble`` leaves behind: the test table, the ensemble's COCO results, its settings,
and an MLflow run nested under the set's (or grid point's) parent run.

Files in ``<set>/ensemble/<point>/<method>-tta_<tta>/``: ``table.md`` (test score of each fold,
their mean and the ensemble, without and with TTA), ``results_test.json`` (COCO results of the
ensemble chosen by ``--tta`` on the test images), ``ensemble.json`` (tuned settings, every
setting tried with its OOF proxy score, fold weights, all test metrics) and ``journal/``, the
MLflow run: the settings as params (``fusion.*``), the table's numbers as metrics
(``ensemble/<metric>``, ``ensemble_none/...``, ``ensemble_hflip/...``, ``folds_mean/...``,
``fold-<k>/...``, ``oof_proxy/<metric>``), the three files as artifacts under ``ensemble/``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from cluster.files import write_json_atomic, write_text_atomic

TTA_LABEL = {"none": "", "hflip": " (hflip TTA)"}


@dataclass(frozen=True)
class Record:
    """Everything an ensemble run decided and measured."""

    set_dir: Path
    state: dict
    point: str
    folds: list[int]
    experiment: Any  # a fold's resolved experiment: tracking settings and name
    split: Any  # HeldOutSplit
    out_dir: Path
    tuned: Any  # Tuned
    weights: list[float]
    fold_scores: dict[int, float]  # each fold model on its own validation fold (OOF)
    rows: dict[str, dict[str, dict[str, float]]]
    results: list[dict[str, Any]]
    tta: str
    metric: str
    weight_rule: str = "equal"


def _num(value: Optional[float]) -> str:
    return "-" if value is None or value < 0 else f"{value:.4f}"


def table_markdown(rec: Record) -> str:
    """The test table: one row per fold, their mean and the ensemble; ``metric`` and mAP_50,
    each without and with TTA."""
    metrics = list(dict.fromkeys([rec.metric, "bbox_mAP_50"]))
    heads = [f"{m}{TTA_LABEL[t]}" for m in metrics for t in TTA_LABEL]
    method = rec.tuned.settings.method
    lines = [f"### Test set {rec.split.ann_file}: {len(rec.folds)} fold models, their mean, and the {method} "
             f"ensemble of {rec.point or 'the set'}", "",
             "| model | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for name, by_tta in rec.rows.items():
        label = f"**{name}**" if name == "ensemble" else name
        lines.append(f"| {label} | " + " | ".join(_num(by_tta[t].get(m)) for m in metrics for t in TTA_LABEL) + " |")
    best_fold = max((r for n, r in rec.rows.items() if n.startswith("fold-")), key=lambda r: r["none"][rec.metric])
    gain = rec.rows["ensemble"][rec.tta][rec.metric] - best_fold["none"][rec.metric]
    weights = ", ".join(f"fold-{f}: {w:.3f}" for f, w in zip(rec.folds, rec.weights))
    lines += ["", f"Ensemble{TTA_LABEL[rec.tta]} {rec.metric} {_num(rec.rows['ensemble'][rec.tta][rec.metric])}: "
                  f"{gain:+.4f} against the best single fold (no TTA).",
              f"Fusion settings tuned on out-of-fold predictions only: {rec.tuned.settings.params()} "
              f"(OOF proxy {rec.metric} {rec.tuned.score:.4f}; library defaults {rec.tuned.default_score:.4f}; "
              f"{len(rec.tuned.trace)} settings tried).",
              f"Fold weights ({rec.weight_rule}): {weights}."]
    return "\n".join(lines) + "\n"


def record(rec: Record, echo: Callable[[str], None]) -> Any:
    """Write the files, record the MLflow run (when the set is tracked) and return the
    :class:`~orchestrator.kfold.ensemble.EnsembleOutcome`."""
    from detection.evaluation import write_predictions
    from orchestrator.kfold.ensemble import EnsembleOutcome

    rec.out_dir.mkdir(parents=True, exist_ok=True)
    table = table_markdown(rec)
    results = Path(write_predictions(str(rec.out_dir / "results_test.json"), rec.results))
    write_text_atomic(rec.out_dir / "table.md", table)
    write_json_atomic(rec.out_dir / "ensemble.json", {
        "set_id": rec.state.get("set_id"), "point": rec.point, "folds": rec.folds, "tta": rec.tta,
        "metric": rec.metric, "test": {"ann_file": rec.split.ann_file, "img_dir": rec.split.img_dir},
        "settings": rec.tuned.settings.params(), "oof_proxy": rec.tuned.score, "oof_proxy_default": rec.tuned.default_score,
        "tried": [{"settings": s, "oof_proxy": v} for s, v in rec.tuned.trace],
        "weights": {"rule": rec.weight_rule, **{f"fold-{f}": w for f, w in zip(rec.folds, rec.weights)}},
        "oof_fold_scores": {f"fold-{f}": v for f, v in rec.fold_scores.items()},
        "rows": rec.rows, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=1, sort_keys=False)
    echo(table)
    echo(f"files: {rec.out_dir} (table.md, results_test.json, ensemble.json)")
    outcome = EnsembleOutcome(str(rec.state.get("set_id")), rec.point, rec.out_dir, rec.tuned, rec.weights,
                              rec.rows, results, table)
    outcome.journal = _journal(rec, echo)
    return outcome


def _metrics(rec: Record) -> dict[str, float]:
    from detection.journal_hook import metric_key

    values: dict[str, float] = {}
    for name, by_tta in rec.rows.items():
        key = "folds_mean" if name == "mean of folds" else name
        for tta, metrics in by_tta.items():
            full = name == "ensemble"  # per class for the ensemble; the 12 COCO numbers elsewhere
            chosen = {k: v for k, v in metrics.items() if full or "/" not in k}
            suffix = "" if tta == "none" else "_tta"
            if name == "ensemble":
                values.update({metric_key(f"ensemble_{tta}/{k}"): v for k, v in chosen.items()})
                if tta == rec.tta:
                    values.update({metric_key(f"ensemble/{k}"): v for k, v in chosen.items()})
            else:
                values.update({metric_key(f"{key}{suffix}/{k}"): v for k, v in chosen.items()})
    values[metric_key(f"oof_proxy/{rec.metric}")] = rec.tuned.score
    values[metric_key(f"oof_proxy_default/{rec.metric}")] = rec.tuned.default_score
    values.update({metric_key(f"oof_fold-{f}/{rec.metric}"): v for f, v in rec.fold_scores.items()})
    return {k: float(v) for k, v in values.items()}


def _journal(rec: Record, echo: Callable[[str], None]) -> Optional[str]:
    """The MLflow run of the ensemble, nested under its point's parent run; shipped now when
    the tracking server answers, else by a background shipper (or ``orch sync``)."""
    from orchestrator.tracking import runs

    exp = rec.experiment
    parent = rec.state.get("parents", {}).get("points", {}).get(rec.point)
    if not exp.tracking.enable or not parent:
        echo("tracking is off for this set: no MLflow run")
        return None
    method, tta = rec.tuned.settings.method, rec.tta
    run_name = f"{rec.point + ' ' if rec.point else ''}ensemble {method} tta={tta}"
    journal = runs.create_journal(str(rec.out_dir / "journal"), exp, run_name, parent=parent,
                                  tags={"orch.kfold_set": rec.state.get("set_id"), "orch.kind": "kfold-ensemble",
                                        "fusion.method": method, "tta": tta})
    with journal:
        journal.log_params({"point": rec.point or "(all)", "folds": len(rec.folds), "tta": tta,
                            "test.ann_file": rec.split.ann_file, "tuning": "out-of-fold, own fold model, views none+hflip",
                            "tuning.tried": len(rec.tuned.trace), "fusion.weights": rec.weight_rule,
                            **{f"fusion.{k}": v for k, v in rec.tuned.settings.params().items()},
                            **{f"fusion.weight.fold-{f}": round(w, 4) for f, w in zip(rec.folds, rec.weights)}})
        journal.log_metrics(_metrics(rec), step=0)
        for name in ("table.md", "results_test.json", "ensemble.json"):
            journal.log_artifact(str(rec.out_dir / name), artifact_path="ensemble")
        journal.set_status("FINISHED")
    _ship(journal.folder, runs.tracking_uri_of(exp), exp.tracking.mode, echo)
    return journal.folder


def _ship(folder: str, uri: str, mode: str, echo: Callable[[str], None]) -> None:
    from orchestrator.tracking import runs

    if mode == "offline":
        echo(f"tracking.mode=offline: ship the run later with orch sync {folder}")
        return
    if runs.reachable(uri):
        from orchestrator.tracking.sync import sync

        summary = sync([folder], uri)
        if not summary.failed and not summary.pending:
            echo(f"MLflow run {runs.run_id_of(folder, uri)} at {uri}")
            return
        echo("\n".join(summary.lines()))
    runs.start_shipper(folder, uri)
    echo(f"the MLflow run is shipped in the background to {uri} (or later: orch sync {folder})")
