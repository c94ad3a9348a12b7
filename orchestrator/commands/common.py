"""Options shared by several commands."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional

import click

from cluster.errors import ConfigError

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

UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str, flag: str = "--wait-for-resources") -> float:
    """``90`` / ``90s``, ``10m``, ``1h``, ``1h30m``, ``2d`` -> seconds (ConfigError otherwise)."""
    value = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    if not value or not re.fullmatch(r"(\d+(\.\d+)?[dhms])+", value):
        raise ConfigError(f"{flag} {text!r} is not a duration; use e.g. 90s, 10m, 1h or 1h30m")
    return sum(float(n) * UNIT_S[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([dhms])", value))


def _duration(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[float]:
    return None if value is None else parse_duration(value, "--" + param.name.replace("_", "-"))


wait_for_resources_option = click.option(
    "--wait-for-resources", "wait_for_resources", metavar="DURATION", default=None, callback=_duration,
    help="Where the cluster can grow (Ray autoscaling, Slurm nodes back from DOWN/DRAIN): wait up to DURATION "
         "(90s, 10m, 1h) for it to fit the request before refusing (default: refuse at once).",
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
    wait_for_resources_option,
)
RESOURCE_NAMES = ("backend", "gpus", "nodes", "gpus_per_node", "partition", "time", "cpus_per_task", "mem_gb",
                  "account", "qos", "max_parallel", "no_wait", "address", "hosts", "node_rank", "master_addr",
                  "wait_for_resources")


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
