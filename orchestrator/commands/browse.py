"""``orch data browse``: look at training samples the way the model gets them."""

from __future__ import annotations

import click

from orchestrator.commands.common import experiment_argument, set_option


@click.command("browse")
@experiment_argument
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNG grids.")
@click.option("--n", "count", type=int, default=16, show_default=True, help="Samples to show (16 per PNG).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True,
              help="train: augmented by data.train_pipeline (or the default resize + flip); "
                   "val/test: as evaluation feeds them.")
@click.option("--seed", type=int, default=None, help="Seed of the draws (default: runtime.seed, as training).")
@set_option
def browse_cmd(experiment: str, out: str, count: int, split: str, seed: int | None,
               overrides: tuple[str, ...]) -> None:
    """Write PNG grids of samples of EXPERIMENT with their boxes and class names.

    Training samples are the first images of epoch 0 with the augmentation training draws for
    them (same seed, same pixels), so you see what the model sees.

    \b
    Examples:
      orch data browse experiments/shapes_demo.yaml --out browse/
      orch data browse exp.yaml --set data.train_pipeline=ssd --n 32 --seed 1 --out browse/ssd
      orch data browse exp.yaml --split val --n 8 --out browse/val
    """
    from orchestrator.config import load_experiment

    exp = load_experiment(experiment, overrides)
    from detection.data.browse import browse  # torch loads only now

    transforms, written = browse(exp, out, n=count, split=split, seed=seed)
    click.echo(transforms)
    for path, note in written:
        click.echo(f"{path}: {note}")
