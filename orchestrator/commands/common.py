"""Options shared by several commands."""

from __future__ import annotations

import click

set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key; VALUE is parsed as YAML (repeatable): --set optim.lr=0.01",
)

experiment_argument = click.argument("experiment", type=click.Path(dir_okay=False))

backend_option = click.option(
    "--backend",
    type=click.Choice(["auto", "local", "torchrun", "slurm", "ray"]),
    default=None,
    help="Where to run (default: slurm when --partition is given and Slurm is reachable, else local).",
)
gpus_option = click.option("--gpus", type=int, default=None, help="Total GPUs (world size).")
max_parallel_option = click.option(
    "--max-parallel", type=int, default=None, help="Cap on jobs running at once."
)
