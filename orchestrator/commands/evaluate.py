"""``orch eval``: evaluate a saved checkpoint on a split and write COCO-format predictions."""

from __future__ import annotations

import click

from orchestrator.commands.common import experiment_argument, set_option


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics as an aligned two-column table (the 12 COCO numbers first, then per class)."""
    if not metrics:
        return "(no metrics)"
    keys = [k for k in metrics if "/" not in k] + sorted(k for k in metrics if "/" in k)
    width = max(len(k) for k in keys)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {metrics[k]:.4f}" for k in keys]
    return "\n".join(lines)


@click.command("eval")
@experiment_argument
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to evaluate (an orch checkpoint or a state dict).")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="Dataset split of the experiment to evaluate on.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Predictions JSON to write (default: <output_dir>/predictions_<split>.json).")
@set_option
def eval_cmd(experiment: str, checkpoint: str, split: str, out: str | None, overrides: tuple[str, ...]) -> None:
    """Evaluate CHECKPOINT on a split of EXPERIMENT (COCO bbox/segm numbers, per-class AP).

    \b
    Examples:
      orch eval experiments/shapes_demo.yaml --checkpoint work_dirs/shapes_demo/checkpoints/best_bbox_mAP.pth
      orch eval exp.yaml --checkpoint model.pth --split test --out preds.json --set eval.classwise=true
    """
    import os

    from orchestrator.config import load_experiment, output_dir_of

    exp = load_experiment(experiment, overrides)
    out = out or os.path.join(output_dir_of(exp), f"predictions_{split}.json")
    from detection.train import evaluate_checkpoint  # torch loads only now

    metrics = evaluate_checkpoint(exp, checkpoint, split=split, out=out)
    click.echo(format_metrics(metrics))
    click.echo(f"predictions: {out}")
