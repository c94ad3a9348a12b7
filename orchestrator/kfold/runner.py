"""``orch kfold``: split, expand grid x folds, create the MLflow parents and children, launch every
trial as ONE submission on any backend, wait, aggregate, report.

A set is identified before anything runs: ``set_id`` hashes the experiment (launch resources
and run ids left out, so ``--max-parallel`` or another backend resumes the same set), the number
of folds, the seed, the grouping, what is stratified and the annotation file's content. Its folder
``<output_dir>/kfold-<set_id>/`` holds ``set.json`` (parents and one record per trial: run id,
status, output folder), the trials' output folders and ``report/``. Running the same command again
skips trials recorded SUCCEEDED whose predictions exist, and re-launches the others in their
same MLflow runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from cluster.errors import DataError, JobFailed, JobNotFound
from cluster.files import write_json_atomic
from orchestrator.config.schema import Experiment, KFoldConfig, Resources
from orchestrator.kfold.split import file_sha256

if TYPE_CHECKING:
    from orchestrator.launch import ResourceFlags

log = logging.getLogger(__name__)
PREDICTIONS = "predictions_val.json"
SET_FILE = "set.json"


@dataclass
class KFoldOutcome:
    """What ``run_kfold`` did: the set folder and id, the report text (None for a dry run) and
    the names of the trials trained now / skipped as already finished."""

    set_id: str
    set_dir: Path
    report: Optional[str]
    launched: list[str]
    skipped: list[str]
    tracking_uri: Optional[str] = None
    parent_journal: Optional[str] = None  # the grid parent's journal, else the set's parent's


def set_identity(exp: Experiment, kcfg: KFoldConfig, ann_sha: str) -> str:
    """The set id: same experiment + folds + seed + grouping + annotation content -> same id."""
    from orchestrator.config import config_hash

    # where and how wide it runs does not change what is trained
    normalized = dataclasses.replace(exp, resources=Resources(), kfold=None)
    parts = [config_hash(normalized), kcfg.folds, kcfg.seed, kcfg.group_key, kcfg.group_regex, ann_sha]
    if tuple(kcfg.stratify) != ("classes",):  # other folds; the default keeps the ids of earlier sets
        parts.append(list(kcfg.stratify))
    key = json.dumps(parts)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def _index_path(set_id: str) -> Path:
    from orchestrator.home import orch_home

    return orch_home() / "kfold" / f"{set_id}.json"


def find_set(ref: str) -> Path:
    """The folder of a set given its id (looked up in ``$ORCH_HOME/kfold``), its folder, or its
    ``report`` folder."""
    path = Path(ref).expanduser()
    for candidate in (path, path.parent):
        if (candidate / SET_FILE).is_file():
            return candidate.resolve()
    index = _index_path(ref)
    if index.is_file():
        return Path(json.loads(index.read_text())["set_dir"])
    raise JobNotFound(f"no k-fold set {ref!r}: give a set id printed by orch kfold or the set folder (kfold-<id>)")


def load_state(set_dir: Path) -> dict[str, Any]:
    """``set.json`` of a set folder (empty state when new)."""
    path = set_dir / SET_FILE
    return json.loads(path.read_text()) if path.is_file() else {"parents": {}, "trials": {}}


def save_state(set_dir: Path, state: dict[str, Any]) -> None:
    """Write ``set.json`` atomically: a crash never leaves a half-written record."""
    set_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(set_dir / SET_FILE, state, indent=2, sort_keys=False)


def prepare_folds(exp: Experiment, kcfg: KFoldConfig, folds_dir: Path, write: bool, echo: Callable[[str], None]):
    """Split the annotation file (or reuse matching folds on disk); returns the fold files."""
    from orchestrator.kfold.split import balance_table, check_folds, read_folds, split_folds, write_folds

    ann_file = Path(kcfg.ann_file or exp.data.train.ann_file)
    coco = json.loads(ann_file.read_text(encoding="utf-8-sig"))  # a BOM is allowed
    # Folds on disk made from this very file with these settings are reused as they are: no
    # split computed (scikit-learn is imported only when one is), also for a dry run.
    folds = _cached_folds(folds_dir, ann_file, kcfg)
    if folds is None:
        folds = split_folds(coco, kcfg.folds, kcfg.seed, kcfg.group_key, kcfg.group_regex, kcfg.allow_small_classes,
                            stratify=kcfg.stratify)
        if write:
            write_folds(coco, folds, folds_dir, ann_file=ann_file, seed=kcfg.seed,
                        group_key=kcfg.group_key, group_regex=kcfg.group_regex, stratify=kcfg.stratify)
    if write:
        check_folds(coco, read_folds(folds_dir))  # what is on disk, not what was meant
    echo(balance_table(coco, folds, kcfg.stratify))
    return ann_file, [(str(folds_dir / f"train_{f.fold}.json"), str(folds_dir / f"val_{f.fold}.json")) for f in folds]


def _cached_folds(folds_dir: Path, ann_file: Path, kcfg: KFoldConfig):
    """The folds written in ``folds_dir`` when its manifest says they split this very file
    (same sha256) with these settings; None otherwise (or when unreadable)."""
    from orchestrator.kfold.split import read_folds

    manifest_file = folds_dir / "manifest.json"
    if not manifest_file.is_file():
        return None
    try:
        old = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        return None
    same = (old.get("source", {}).get("sha256") == file_sha256(ann_file) and old.get("k") == kcfg.folds
            and old.get("seed") == kcfg.seed
            and old.get("grouping") == {"group_key": kcfg.group_key, "group_regex": kcfg.group_regex}
            and old.get("stratify", ["classes"]) == list(kcfg.stratify))
    if not same:
        return None
    try:
        return read_folds(folds_dir)
    except DataError:
        return None


def run_kfold(path: str, overrides: tuple[str, ...] = (), folds: Optional[int] = None, backend: Optional[str] = None,
              gpus: Optional[int] = None, max_parallel: Optional[int] = None, dry_run: bool = False,
              echo: Callable[[str], None] = print, poll_s: float = 1.0,
              flags: Optional["ResourceFlags"] = None) -> KFoldOutcome:
    """Run (or resume) the k-fold set of the experiment file ``path``; see the module docstring.
    ``flags`` are the resource flags shared with ``orch submit`` (``--gpus``, ``--partition``,
    ``--max-parallel``, ``--address``, ...); ``backend``/``gpus``/``max_parallel`` override them."""
    from orchestrator.config import load_experiment, output_dir_of, with_overrides
    from orchestrator.kfold.expand import expand
    from orchestrator.launch import Launch, ResourceFlags, choose_backend
    from orchestrator.weights import resolve_weights

    changes = {k: v for k, v in {"backend": backend, "gpus": gpus, "max_parallel": max_parallel}.items() if v is not None}
    flags = dataclasses.replace(flags or ResourceFlags(), **changes)
    flags = dataclasses.replace(flags, extra={**flags.extra, **({"kfold.folds": folds} if folds is not None else {})})
    exp = load_experiment(path, overrides, extra=flags.as_overrides())
    resolve_weights(exp, download=not dry_run, echo=echo)  # weights names -> the cache, before anything is written
    kcfg = exp.kfold or KFoldConfig()
    backend = choose_backend(exp, flags.backend)
    ann_file = Path(kcfg.ann_file or exp.data.train.ann_file)
    if not ann_file.is_file():
        raise DataError(f"k-fold annotation file {ann_file} does not exist; set kfold.ann_file or data.train.ann_file")
    set_id = set_identity(exp, kcfg, file_sha256(ann_file))
    root = Path(output_dir_of(exp)).expanduser().resolve()
    set_dir = root / f"kfold-{set_id}"
    folds_dir = Path(kcfg.out_dir).expanduser().resolve() if kcfg.out_dir else root / "folds"
    echo(f"k-fold set {set_id}: {kcfg.folds} folds, seed {kcfg.seed}, folder {set_dir}")
    ann_file, fold_files = prepare_folds(exp, kcfg, folds_dir, write=not dry_run, echo=echo)
    test = _held_out(exp, kcfg, ann_file)  # a bad kfold.test fails here, before anything runs

    base = with_overrides(exp, {"runtime.output_dir": str(set_dir)})
    trials = expand(base, fold_files)
    state = load_state(set_dir)
    attached = {} if dry_run else _still_running(state, trials)
    done = {t.name for t in trials if _finished(state, t)}
    pending = [t for t in trials if t.name not in done and t.name not in attached]
    launch = Launch.for_backend(backend)
    names = [f"{exp.name}/{t.name}" for t in pending]  # so that `orch status` and job ids tell the folds apart
    # Plan from unwritten specs first: a bad option fails here, before any run or file exists.
    # Nothing pending (a finished set resumed) plans nothing: Slurm refuses an empty plan.
    plan = launch.plan([t.experiment for t in pending], names) if pending else "nothing"
    if dry_run:
        echo(f"{len(trials)} trials, {len(done)} already finished; would run:\n{plan}")
        return KFoldOutcome(set_id, set_dir, None, [t.name for t in pending], sorted(done))
    if pending:  # live checks (free slots, reachable cluster) before any run exists
        launch.preflight(plan, wait_s=flags.wait_for_resources)

    from orchestrator.kfold import tracking

    state.update({"set_id": set_id, "experiment": exp.name, "folds": kcfg.folds, "seed": kcfg.seed,
                  "ann_file": str(ann_file), "folds_dir": str(folds_dir), "source": str(Path(path).resolve()),
                  "test": dataclasses.asdict(test) if test else None})
    uri = tracking.ensure_parents(exp, trials, state, set_id, set_dir)
    save_state(set_dir, state)
    _index_path(set_id).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(_index_path(set_id), {"set_dir": str(set_dir)})

    trial_tracking = []
    for t, job in zip(pending, plan.jobs if pending else ()):
        if uri:  # the trial's parent run, made just now; the job's own tags (backend) kept
            keys = tracking.trial_tracking(t, state, set_id, uri)
            keys["tracking.tags"] = {**job.experiment.tracking.tags, **keys["tracking.tags"]}
            trial_tracking.append(keys)
        state["trials"][t.name] = {**state["trials"].get(t.name, {}), "status": "PENDING", "fold": t.fold,
                                   "point": t.point_name, "output_dir": str(job.output_dir)}
    save_state(set_dir, state)
    waiting = dict(attached)
    if attached:
        echo(f"{len(attached)} trial(s) of an earlier `orch kfold` still running: waiting for them")
    if pending:
        echo(f"launching {len(pending)} trial(s) on {backend} ({len(done)} already finished)")
        # the plan made and preflighted above; a retried fold continues its own MLflow run (its journal)
        submitted, handles = launch.submit(plan, continue_runs=True, tracking=trial_tracking if uri else None)
        for t, job in zip(pending, submitted.jobs):
            state["trials"][t.name]["output_dir"] = str(job.output_dir)
        echo(f"submitted jobs {handles[0].job_id} .. {handles[-1].job_id}; follow one with: orch logs -f JOB")
        waiting.update(zip([t.name for t in pending], handles))
    if waiting:
        try:
            _wait_all(set_dir, state, waiting, poll_s, echo)
        except KeyboardInterrupt:
            if uri:  # the folds were cancelled (KILLED); their parents must not stay RUNNING
                tracking.end_parents(state, {name: "KILLED" for name in state["parents"]["points"]}, "KILLED")
            raise
    else:
        echo(f"all {len(trials)} trials already finished; aggregating")

    failed = sorted(t.name for t in trials if not _finished(state, t))
    report = _aggregate(exp, kcfg, set_dir, set_id, ann_file, fold_files, trials, state, uri, failed, echo, test)
    if failed:
        raise JobFailed(f"{len(failed)} trial(s) of set {set_id} failed ({', '.join(failed[:3])}); "
                        f"see {set_dir / SET_FILE}; run the same command again to retry only those")
    parents = state.get("parents", {})
    top = parents.get("grid") or next(iter(parents.get("points", {}).values()), None)
    return KFoldOutcome(set_id, set_dir, report, [t.name for t in pending], sorted(done), uri, top)


def _finished(state: dict, trial) -> bool:
    record = state["trials"].get(trial.name, {})
    return record.get("status") == "SUCCEEDED" and (Path(record.get("output_dir", "")) / PREDICTIONS).is_file()


def _still_running(state: dict, trials) -> dict[str, Any]:
    """Trials an earlier, interrupted ``orch kfold`` launched and whose jobs still run: waited
    for, not launched twice into the same folder and run."""
    from orchestrator.jobs import JobHandle

    running = {}
    for t in trials:
        record = state["trials"].get(t.name, {})
        if record.get("status") in ("PENDING", "RUNNING") and record.get("job_id"):
            handle = JobHandle(record["job_id"])
            try:
                if not handle.state().finished:
                    running[t.name] = handle
            except JobNotFound:
                pass
    return running


def _wait_all(set_dir: Path, state: dict, waiting: dict[str, Any], poll_s: float,
              echo: Callable[[str], None]) -> None:
    """Poll every trial's job, all of them in one refresh per round (one backend query, not one
    per trial); record each trial in ``set.json`` the moment it ends, so an interrupted
    ``orch kfold`` still remembers what finished."""
    from orchestrator.jobs import refresh_records
    from orchestrator.records import load_record
    from orchestrator.spec import JobState

    for name, handle in waiting.items():
        state["trials"][name].update(status="RUNNING", job_id=handle.job_id)
    save_state(set_dir, state)
    try:
        while waiting:
            fresh = refresh_records([load_record(h.job_id) for h in waiting.values()], run_ids=False)
            states = {r.job_id: r.state for r in fresh}
            for name, handle in list(waiting.items()):
                job_state = states[handle.job_id]
                if not job_state.finished:
                    continue
                record = state["trials"][name]
                ok = job_state == JobState.SUCCEEDED and (Path(record["output_dir"]) / PREDICTIONS).is_file()
                # a job that exits 0 without writing its validation predictions cannot be aggregated
                record["status"] = "SUCCEEDED" if ok else ("FAILED" if job_state == JobState.SUCCEEDED else job_state.value)
                save_state(set_dir, state)
                echo(f"  {name}: {record['status']}  (job {handle.job_id})")
                del waiting[name]
            if waiting:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        from orchestrator.jobs import cancel_jobs

        cancel_jobs([h.job_id for h in waiting.values()])  # one scancel for a Slurm set, not one per trial
        for name in waiting:
            state["trials"][name]["status"] = "CANCELLED"
        save_state(set_dir, state)
        raise


def _held_out(exp: Experiment, kcfg: KFoldConfig, ann_file: Path):
    """The set's test split (``kfold.test``), checked to share no image with the folds; or None."""
    from orchestrator.kfold.heldout import check_held_out, held_out_split

    test = held_out_split(exp, kcfg.test, kcfg.test_img_dir)
    if test is not None:
        check_held_out(test, str(ann_file), exp.data.train.img_dir)
    return test


def _aggregate(exp, kcfg, set_dir, set_id, ann_file, fold_files, trials, state, uri, failed, echo, test=None) -> str:
    """Summaries of the points whose folds all finished; report files; metrics to the parents."""
    from orchestrator.kfold import tracking
    from orchestrator.kfold.aggregate import summarize_point
    from orchestrator.kfold.report import comparison_markdown, write_report

    points: dict[str, list] = {}
    for t in trials:
        points.setdefault(t.point_name, []).append(t)
    summaries = []
    for name, point_trials in points.items():
        if any(t.name in failed for t in point_trials):
            echo(f"  {name or 'set'}: not aggregated, some folds did not finish")
            continue
        files = {t.fold: (fold_files[t.fold][1], Path(state["trials"][t.name]["output_dir"]) / PREDICTIONS)
                 for t in point_trials}
        summaries.append(summarize_point(name, point_trials[0].point, files, ann_file, exp.eval.metric,
                                         exp.eval.engine))
    if test is not None and summaries:  # each fold's checkpoint on the held-out test file
        from orchestrator.kfold.heldout import evaluate_test

        evaluate_test(exp, test, summaries, points, state, echo)
    metric = exp.checkpoint.save_best or f"{exp.eval.metric[0]}_mAP"
    mode = "max" if exp.checkpoint.rule == "greater" else "min"
    report = comparison_markdown(summaries, metric, mode)
    paths = {}
    if summaries:
        paths = write_report(set_dir / "report", summaries, metric, mode,
                             meta={"set_id": set_id, "experiment": exp.name, "folds": kcfg.folds,
                                   "seed": kcfg.seed, "parents": state.get("parents", {})})
    if uri:  # also when nothing finished: the parents must not stay RUNNING
        tracking.log_summaries(state, summaries, paths, finished=not failed, metric=metric, mode=mode)
    echo(report)
    return report
