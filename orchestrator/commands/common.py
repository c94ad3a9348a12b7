"""Options shared by several commands."""

from __future__ import annotations

import functools
from typing import Any, Callable

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
    "--max-parallel", type=int, default=None, help="Cap on jobs running at once (the width of a Slurm job array)."
)

# The one set of resource flags of `orch submit` and `orch kfold` (orchestrator.launch.ResourceFlags).
_RESOURCE_OPTIONS = (
    backend_option,
    gpus_option,
    click.option("--nodes", type=int, default=None, help="Number of nodes."),
    click.option("--gpus-per-node", type=int, default=None, help="GPUs (processes) per node."),
    click.option("--partition", default=None, help="Slurm partition (selects the Slurm backend)."),
    click.option("--time", "time", default=None, help="Time limit, Slurm format (e.g. 2-00:00:00)."),
    click.option("--cpus-per-task", type=int, default=None),
    click.option("--mem-gb", type=float, default=None),
    click.option("--account", default=None, help="Slurm account."),
    click.option("--qos", default=None, help="Slurm QOS."),
    max_parallel_option,
    click.option("--no-wait", is_flag=True, help="Local: fail at once when the GPUs/slots are busy instead of queueing."),
    click.option("--address", default=None, help="Ray: auto | HOST:PORT | ray://HOST:10001."),
    click.option("--hosts", default=None, help="torchrun: comma-separated hosts, one node each (ssh)."),
    click.option("--node-rank", type=int, default=None, help="torchrun: start only this node (by hand)."),
    click.option("--master-addr", default=None, help="torchrun: address of node 0 (with --node-rank)."),
)
RESOURCE_NAMES = ("backend", "gpus", "nodes", "gpus_per_node", "partition", "time", "cpus_per_task", "mem_gb",
                  "account", "qos", "max_parallel", "no_wait", "address", "hosts", "node_rank", "master_addr")


def resource_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the resource flags to ``command``; it receives them as one ``flags`` argument
    (:class:`orchestrator.launch.ResourceFlags`)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from orchestrator.launch import ResourceFlags

        values = {name: kwargs.pop(name) for name in RESOURCE_NAMES}
        return command(*args, flags=ResourceFlags(**values), **kwargs)

    for option in reversed(_RESOURCE_OPTIONS):
        wrapper = option(wrapper)
    return wrapper
