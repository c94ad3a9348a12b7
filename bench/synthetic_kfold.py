"""A k-fold set as ``orch kfold EXPERIMENT --backend local`` makes it, with each trial's training
stood in for: what ``bench_scale_mlflow.py --synthetic`` ships (1000 trials in minutes, not hours).

Real (orch's own functions, in the order ``orchestrator.kfold.runner.run_kfold`` calls them): the
experiment loaded with the resource flags, its set id, the fold split, the trials expanded (grid x
folds), the plan and preflight of the local backend, the parent runs' journals
(``kfold.tracking.ensure_parents``: grid parent -> one per point, registered with this host's
shipper), each trial's identity (``Launch.identify``, what ``Launch.submit`` writes before it
starts the jobs: config file, journal under its point's parent, made durable together), ``set.json``;
per trial what the worker does before training (``worker.with_destination``,
``worker.start_shipping``: its journal registered, this process its owner) and the journal lines
training writes, by training's own hooks (``SystemMetricsHook`` and ``JournalHook`` in
``build_hooks``' order: tags, params, config.yaml, a system sample, the loss values of every
step, the evaluation metrics, eval_val.json, per_class_ap.md, FINISHED), then what
the local backend does as the job ends (``runs.close_journal``, ``runs.ensure_shipping``); at
the end the report (``write_report``) and the parents' metrics and end
(``kfold.tracking.log_summaries``).

Stood in for: the trainer (no model, no data loading, no optimizer: a :class:`StandInTrainer`
holding what hooks read, with made-up losses and mAPs drawn per trial, and no history: the
training curves' picture, a trial's fourth artifact, is not drawn), the COCO evaluation of
each fold's predictions (its metrics are the stand-in's; out-of-fold = the fold mean), and the
job processes (one process writes every trial, one after another, where the local backend would
start a supervisor and a worker per trial, ``--max-parallel`` at once).

    python bench/synthetic_kfold.py EXPERIMENT.yaml [--max-parallel 2]

prints one JSON line: trials, the grid parent's journal, the tracking URI, seconds taken.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass
class StandInTrainer:
    """What the training hooks read of ``detection.engine.Trainer`` (see ``detection.hooks.base``)."""

    env: Any
    device: Any
    output_dir: str
    lr_scaling: Any
    max_iters: int
    iters_per_epoch: int
    checkpointer: Any
    iter: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # Left empty: no curves.png (matplotlib draws it in ~0.5 s of this machine a trial: training's
    # cost, not tracking's, and 1000 of them would be most of the bench's time).
    history: dict[str, list] = field(default_factory=lambda: {"train": [], "eval": []})


@dataclass
class _Best:
    """The checkpointer's part the journal hook reads: its best-metric record."""

    best: dict[str, Any] = field(default_factory=dict)


def eval_metrics(rng: random.Random, classes: list[str], classwise: bool) -> dict[str, float]:
    """COCO-style bbox metrics of a barely trained detector (made up, per trial)."""
    m = rng.uniform(0.0, 0.01)
    metrics = {"bbox_mAP": m, "bbox_mAP_50": 5 * m, "bbox_mAP_75": m / 2, "bbox_mAP_s": m, "bbox_AR_1": 0.0,
               "bbox_AR_10": 5 * m, "bbox_AR_100": 50 * m, "bbox_AR_s": 50 * m}
    if classwise:
        metrics.update({f"bbox_AP/{name}": rng.uniform(0.0, 2 * m) for name in classes})
    return metrics


def train_stand_in(config_path: str, seed: int) -> dict[str, float]:
    """What ``python -m orchestrator.worker CONFIG`` journals for a run of the experiment at
    ``config_path``, with its trainer stood in for; returns the evaluation metrics."""
    import torch

    from cluster.env import DistEnv
    from detection.hooks.system_metrics import SystemMetricsHook
    from detection.journal import journal_dir
    from detection.journal_hook import JournalHook
    from detection.lr_scaling import scale_lr
    from orchestrator.config import load_experiment, output_dir_of
    from orchestrator.worker import start_shipping, with_destination

    config = with_destination(load_experiment(config_path))
    start_shipping(config)  # the worker's rank 0: this journal registered with this host's shipper
    out = output_dir_of(config)
    env = DistEnv.detect({})
    scaling = scale_lr(config.optim, config.schedule, env.world_size, config.data.batch_size_per_gpu)
    train = json.loads(Path(config.data.train.ann_file).read_text())
    iters_per_epoch = max(1, math.ceil(len(train["images"]) / config.data.batch_size_per_gpu))
    max_iters = config.schedule.iterations
    trainer = StandInTrainer(env, torch.device("cpu"), out, scaling, max_iters, iters_per_epoch, _Best())
    hooks = [SystemMetricsHook(journal_dir(out), config.runtime.system_metrics_interval, pgid=os.getpgid(0)),
             JournalHook(config, hosts=[socket.gethostname()], log_interval=config.runtime.log_interval)]
    rng = random.Random(seed)
    for hook in hooks:
        hook.before_train(trainer)
    for step in range(1, max_iters + 1):
        trainer.iter = step
        terms = {"loss_bbox_regression": rng.uniform(3, 9), "loss_classification": rng.uniform(6, 8)}
        log = {"loss": sum(terms.values()), **terms, "lr": scaling.lr, "time": 0.2, "data_time": 0.01,
               "images": float(config.data.batch_size_per_gpu), "images_per_s": 10.0}
        if step == max_iters:  # the evaluation hook and the checkpoint hook run before the journal hook
            classes = [c["name"] for c in train.get("categories", [])]
            trainer.metrics = eval_metrics(rng, classes, config.eval.classwise)
            Path(out, f"eval_{config.eval.split}.json").write_text(json.dumps(trainer.metrics))
            if config.checkpoint.save_best:
                name = config.checkpoint.save_best
                trainer.checkpointer.best = {"metric": name, "value": trainer.metrics[name], "iter": step,
                                             "epoch": step // iters_per_epoch}
            for hook in hooks:
                hook.after_eval(trainer, trainer.metrics)
            for hook in hooks:
                hook.after_checkpoint(trainer, str(Path(out, "checkpoints", f"iter_{step}.pth")))
        for hook in hooks:
            hook.after_iter(trainer, log)
    for hook in hooks:
        hook.after_train(trainer, None)
    return trainer.metrics


def run_synthetic_set(path: str, max_parallel: int = 2, echo=print) -> dict[str, Any]:
    """The set of the experiment file ``path`` (see the module docstring); returns what the
    bench reads: trials, the grid parent's journal, the tracking URI, seconds taken."""
    from orchestrator.config import load_experiment, output_dir_of, with_overrides
    from orchestrator.kfold import tracking
    from orchestrator.kfold.aggregate import PointSummary, mean_std
    from orchestrator.kfold.expand import expand
    from orchestrator.kfold.report import write_report
    from orchestrator.kfold.runner import load_state, prepare_folds, save_state, set_identity
    from orchestrator.kfold.split import file_sha256
    from orchestrator.launch import Launch, ResourceFlags
    from orchestrator.tracking import runs
    from orchestrator.weights import resolve_weights

    started = time.monotonic()
    flags = ResourceFlags(backend="local", max_parallel=max_parallel)
    exp = load_experiment(path, (), extra=flags.as_overrides())
    resolve_weights(exp, download=True, echo=echo)
    kcfg = exp.kfold
    ann_file = Path(kcfg.ann_file or exp.data.train.ann_file)
    set_id = set_identity(exp, kcfg, file_sha256(ann_file))
    root = Path(output_dir_of(exp)).expanduser().resolve()
    set_dir = root / f"kfold-{set_id}"
    ann_file, fold_files = prepare_folds(exp, kcfg, root / "folds", write=True, echo=lambda _: None)
    trials = expand(with_overrides(exp, {"runtime.output_dir": str(set_dir)}), fold_files)
    launch = Launch.for_backend("local")
    plan = launch.plan([t.experiment for t in trials], [f"{exp.name}/{t.name}" for t in trials])
    launch.preflight(plan)
    planned_s = time.monotonic() - started

    state = load_state(set_dir)
    state.update({"set_id": set_id, "experiment": exp.name, "folds": kcfg.folds, "seed": kcfg.seed,
                  "ann_file": str(ann_file), "folds_dir": str(root / "folds"), "source": str(Path(path).resolve()),
                  "test": None})
    uri = tracking.ensure_parents(exp, trials, state, set_id, set_dir)
    if not uri:
        raise SystemExit(f"{path}: tracking is off; nothing to ship")
    save_state(set_dir, state)
    keys = []
    for t, job in zip(trials, plan.jobs):
        trial_keys = tracking.trial_tracking(t, state, set_id, uri)
        trial_keys["tracking.tags"] = {**job.experiment.tracking.tags, **trial_keys["tracking.tags"]}
        keys.append(trial_keys)
        state["trials"][t.name] = {"status": "PENDING", "fold": t.fold, "point": t.point_name,
                                   "output_dir": str(job.output_dir)}
    plan = launch.identify(plan, continue_runs=True, tracking=keys)
    save_state(set_dir, state)
    identified_s = time.monotonic() - started

    per_point: dict[str, dict[int, dict[str, float]]] = {}
    for index, (t, job) in enumerate(zip(trials, plan.jobs)):
        metrics = train_stand_in(str(job.config_path), seed=index)
        folder = runs.journal_dir(str(job.output_dir))
        runs.close_journal(folder, "FINISHED")  # what the job's end does (a no-op: training ended it)
        if exp.tracking.mode != "offline":
            runs.ensure_shipping(folder, uri)
        per_point.setdefault(t.point_name, {})[t.fold] = metrics
        state["trials"][t.name]["status"] = "SUCCEEDED"
        if (index + 1) % 100 == 0:
            save_state(set_dir, state)
            echo(f"  {index + 1} of {len(trials)} trials written ({time.monotonic() - started:.0f} s)")
    save_state(set_dir, state)
    trained_s = time.monotonic() - started

    summaries = []
    for t in trials:
        if t.point_name not in {s.name for s in summaries}:
            folds = per_point[t.point_name]
            mean, std = mean_std(folds)
            summaries.append(PointSummary(t.point_name, dict(t.point), folds, mean, std, oof=dict(mean)))
    metric = exp.checkpoint.save_best or f"{exp.eval.metric[0]}_mAP"
    mode = "max" if exp.checkpoint.rule == "greater" else "min"
    paths = write_report(set_dir / "report", summaries, metric, mode,
                         meta={"set_id": set_id, "experiment": exp.name, "folds": kcfg.folds, "seed": kcfg.seed,
                               "parents": state["parents"]})
    tracking.log_summaries(state, summaries, paths, finished=True, metric=metric, mode=mode)
    parents = state["parents"]
    return {"trials": len(trials), "set_id": set_id, "uri": uri,
            "top_journal": parents.get("grid") or next(iter(parents["points"].values())),
            "planned_s": round(planned_s, 2), "identified_s": round(identified_s - planned_s, 2),
            "trained_s": round(trained_s - identified_s, 2), "set_s": round(time.monotonic() - started, 2)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("--max-parallel", type=int, default=2)
    args = parser.parse_args(argv)
    result = run_synthetic_set(args.experiment, args.max_parallel, echo=lambda line: print(line, file=sys.stderr))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
