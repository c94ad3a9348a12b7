"""``orch eval``: evaluate a saved checkpoint on a split and write COCO-format predictions."""

from __future__ import annotations

import click

from orchestrator.commands.common import experiment_argument, set_option


@click.command("eval")
@experiment_argument
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to evaluate (an orch checkpoint or a state dict).")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="Dataset split of the experiment to evaluate on.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Predictions JSON to write (default: <output_dir>/predictions_<split>.json).")
@click.option("--format-only", is_flag=True,
              help="Only write COCO results (for an evaluation server): no metrics; the split may be an "
                   "image folder without annotations (data.test: {img_dir: DIR}).")
@click.option("--image-info", type=click.Path(dir_okay=False), default=None,
              help="With --format-only: a COCO image-info file (images, categories; e.g. "
                   "image_info_test-dev2017.json) whose image ids the results use, matched by file_name.")
@set_option
def eval_cmd(experiment: str, checkpoint: str, split: str, out: str | None, format_only: bool,
             image_info: str | None, overrides: tuple[str, ...]) -> None:
    """Evaluate CHECKPOINT on a split of EXPERIMENT (COCO bbox/segm numbers, per-class AP).

    With --format-only it writes the COCO results of the split for an evaluation server and
    computes nothing. Image ids: --image-info's, else the annotation file's, else 1..N in file-name
    order with an images.json beside the results; category ids: the training file's.

    \b
    Examples:
      orch eval experiments/shapes_demo.yaml --checkpoint work_dirs/shapes_demo/checkpoints/best_bbox_mAP.pth
      orch eval exp.yaml --checkpoint model.pth --split test --out preds.json --set eval.classwise=true
      orch eval exp.yaml --checkpoint model.pth --split test --format-only --out test-dev.json \\
          --image-info annotations/image_info_test-dev2017.json --set data.test.img_dir=test2017
    """
    import os

    from cluster.errors import ConfigError
    from orchestrator.config import load_experiment, output_dir_of

    if image_info and not format_only:
        raise ConfigError("--image-info is for --format-only results; add --format-only")
    exp = load_experiment(experiment, overrides)
    out = out or os.path.join(output_dir_of(exp), f"predictions_{split}.json")
    data_split = getattr(exp.data, split)
    if not format_only and data_split is not None and not data_split.ann_file:
        raise ConfigError(f"data.{split} has no ann_file, so there is nothing to score against; "
                          "add --format-only to write its COCO results for an evaluation server")
    if format_only:
        from cluster.logs import setup_logging
        from detection.inference import format_results  # torch loads only now

        setup_logging()
        summary = format_results(exp, checkpoint, split, out, image_info=image_info)
        click.echo(f"{summary.images} images, {summary.detections} detections (>= 0.001), no metrics "
                   f"(--format-only), {summary.seconds:.1f} s")
        click.echo(f"results: {out}")
        if summary.image_info:
            click.echo(f"image ids: {summary.image_info}")
        return
    from detection.train import evaluate_checkpoint  # torch loads only now

    from orchestrator.commands.report_util import print_metrics

    metrics = evaluate_checkpoint(exp, checkpoint, split=split, out=out)
    print_metrics(metrics, title=f"{split} metrics")
    click.echo(f"predictions: {out}")
