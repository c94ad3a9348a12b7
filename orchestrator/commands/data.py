"""``orch data``: dataset tools."""

from __future__ import annotations

import click


@click.group("data")
def data_group() -> None:
    """Dataset tools."""


@data_group.command("shapes")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--train", "n_train", type=int, default=200, show_default=True, help="Training images.")
@click.option("--val", "n_val", type=int, default=50, show_default=True, help="Validation images.")
@click.option("--size", type=int, default=128, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
def shapes_cmd(out: str, n_train: int, n_val: int, size: int, seed: int) -> None:
    """Write the synthetic shapes dataset (COCO format: images + instances JSON).

    \b
    Example:
      orch data shapes --out data/shapes --train 400 --val 100 --seed 0
    """
    from cluster.errors import ConfigError
    from detection.shapes import make_shapes

    if n_train < 1:
        raise ConfigError("--train 0 would write a dataset nothing can train on; use 1 or more")

    paths = make_shapes(out, n_train=n_train, n_val=n_val, size=size, seed=seed)
    for split, (ann_file, img_dir) in paths.items():
        click.echo(f"{split}: {ann_file} ({img_dir})")


from orchestrator.commands.browse import browse_cmd  # noqa: E402  (orch data browse; own module)
data_group.add_command(browse_cmd)
