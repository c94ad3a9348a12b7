"""``orch split``, ``orch kfold``, ``orch report`` (owned by the k-fold work).

Heavy modules (numpy, scikit-learn, mlflow, torch) load inside the command functions only.
"""

from __future__ import annotations

import click

from orchestrator.commands.common import experiment_argument, resource_options, set_option


@click.command("split")
@click.argument("ann_file", type=click.Path(dir_okay=False))
@click.option("--folds", "-k", type=int, required=True, help="Number of folds K (at least 2).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for train_<k>.json, val_<k>.json and manifest.json.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split (deterministic).")
@click.option("--group-key", default=None, help="Image field whose equal values stay in one fold (e.g. video_id).")
@click.option("--group-regex", default=None,
              help="Regex on file_name; group 1 (or the whole match) is the group kept in one fold.")
@click.option("--allow-small-classes", is_flag=True,
              help="Warn instead of failing when a class is on fewer than K images (groups).")
@click.option("--stratify", default="classes", show_default=True,
              help="What the folds balance, comma-separated: classes (presence per image), count (bins of boxes "
                   "per image), area (bins of the median box area per image).")
def split_cmd(ann_file, folds, out_dir, seed, group_key, group_regex, allow_small_classes, stratify) -> int:
    """Split a COCO file into K leak-free folds over whole images, stratified by class.

    \b
    Examples:
      orch split data/annotations/instances_train.json --folds 5 --out folds/
      orch split ann.json --folds 5 --out folds/ --group-regex '^(video\\d+)_'   # frames of a video together
      orch split ann.json --folds 3 --out folds/ --group-key site_id --seed 1
      orch split ann.json --folds 5 --out folds/ --stratify classes,count,area
    """
    import json
    from pathlib import Path

    from cluster.errors import DataError
    from orchestrator.kfold.split import balance_table, check_folds, read_folds, split_folds, write_folds
    from orchestrator.kfold.strata import parse_stratify

    strata = parse_stratify(stratify)
    try:
        coco = json.loads(Path(ann_file).read_text(encoding="utf-8-sig"))  # a BOM is allowed
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read COCO file {ann_file} ({err}); give a COCO instances JSON file") from None
    fold_list = split_folds(coco, folds, seed, group_key, group_regex, allow_small_classes, stratify=strata)
    write_folds(coco, fold_list, out_dir, ann_file=ann_file, seed=seed, group_key=group_key, group_regex=group_regex,
                stratify=strata)
    check_folds(coco, read_folds(out_dir))
    click.echo(balance_table(coco, fold_list, strata))
    click.echo(f"wrote {folds} folds to {out_dir} (manifest.json holds the sha256 of every file)")
    return 0


@click.command("kfold")
@experiment_argument
@click.option("--folds", "-k", type=int, default=None, help="Number of folds (default: kfold.folds, else 5).")
@resource_options
@set_option
@click.option("--dry-run", is_flag=True, help="Show the split and the plan; write and start nothing.")
def kfold_cmd(experiment, folds, flags, overrides, dry_run) -> int:
    """K-fold cross-validation of EXPERIMENT, times its grid: section, as one submission.

    Splits the training annotations into K folds (kfold: section), trains every grid point on
    every fold, then reports mean ± std, out-of-fold COCO metrics and a paired comparison of the
    grid points (also saved in <output_dir>/kfold-<set>/report and logged to MLflow parent runs).
    Running the same command again resumes the set: finished folds are not retrained.

    \b
    Examples:
      orch kfold exp.yaml --folds 5                         # 5 runs on local GPU slices
      orch kfold exp.yaml --folds 3 --max-parallel 2        # at most 2 folds at once
      orch kfold exp.yaml --set 'grid={optim.lr: [0.01, 0.02]}' --folds 3
      orch kfold exp.yaml --partition dev --gpus 4          # one Slurm job array
      orch kfold exp.yaml --backend ray --dry-run           # show the plan only
    """
    from orchestrator.kfold.runner import run_kfold

    outcome = run_kfold(experiment, tuple(overrides), folds=folds, dry_run=dry_run, echo=click.echo, flags=flags)
    if not dry_run:
        click.echo(f"set {outcome.set_id}: {len(outcome.launched)} trained now, {len(outcome.skipped)} "
                   f"already finished; report: {outcome.set_dir / 'report'}  (orch report {outcome.set_id})")
        from orchestrator.commands.report_util import mlflow_ui_hint
        from orchestrator.tracking.runs import run_id_of

        hint = mlflow_ui_hint(outcome.tracking_uri, run_id_of(outcome.parent_journal, outcome.tracking_uri)
                              if outcome.parent_journal else None, outcome.parent_journal, kfold_set=outcome.set_id)
        if hint:
            click.echo(hint)
    return 0


@click.command("report")
@click.argument("set_ref", metavar="SET")
def report_cmd(set_ref) -> int:
    """Print the comparison table of a finished k-fold SET (its id or its folder).

    \b
    Examples:
      orch report 3f2a9c01bd
      orch report work_dirs/exp/kfold-3f2a9c01bd
    """
    from orchestrator.kfold.report import comparison_markdown, read_report
    from orchestrator.kfold.runner import find_set

    set_dir = find_set(set_ref)
    meta, points = read_report(set_dir / "report")
    click.echo(f"k-fold set {meta.get('set_id')} of {meta.get('experiment')}: {set_dir}")
    click.echo(comparison_markdown(points, meta["metric"], meta.get("mode", "max")))
    click.echo(f"files: {set_dir / 'report'} (comparison.md, comparison.csv, boxplot.png, summary.json)")
    return 0
