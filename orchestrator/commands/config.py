"""``orch config``: show the resolved experiment and the values derived from it.

Imports no torch, ray, mlflow or submitit: it must answer in well under a second.
"""

from __future__ import annotations

import json
from typing import Any

import click

from orchestrator.commands.common import experiment_argument, gpus_option, set_option


def derived_values(exp: Any) -> dict[str, Any]:
    """What the experiment implies for its resources: world size, batches, scaled LR, schedule."""
    from detection.lr_scaling import scale_lr
    from orchestrator.config import config_hash, output_dir_of

    res = exp.resources
    nodes, per_node = res.layout()
    scaling = scale_lr(exp.optim, exp.schedule, res.gpus, exp.data.batch_size_per_gpu)
    return {
        "world_size": res.gpus,
        "nodes": nodes,
        "gpus_per_node": per_node,
        "batch_per_gpu": scaling.batch_per_gpu,
        "accumulation_steps": scaling.accumulation_steps,
        "effective_batch": scaling.effective_batch,
        "lr": {
            "rule": scaling.rule,
            "enabled": scaling.enabled,
            "base_lr": scaling.base_lr,
            "base_batch_size": scaling.base_batch_size,
            "factor": round(scaling.factor, 10),
            "lr": round(scaling.lr, 12),
        },
        "schedule": {
            "epochs": scaling.epochs,
            "iterations": scaling.iterations,
            "warmup_iters": scaling.warmup_iters,
            "milestones": list(scaling.milestones),
            "rescaled": scaling.schedule_scaled,
        },
        "output_dir": output_dir_of(exp),
        "config_hash": config_hash(exp),
        "summary": scaling.describe(),
    }


def _comment_block(derived: dict[str, Any]) -> str:
    # YAML comments, so `orch config exp.yaml > resolved.yaml` stays a loadable experiment.
    import yaml

    from detection.serialize import Dumper

    body = yaml.dump({"derived": derived}, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=1000)
    return "\n".join(f"# {line}" for line in body.rstrip().splitlines())


@click.command("config")
@experiment_argument
@set_option
@gpus_option
@click.option("--batch-per-gpu", type=int, default=None, help="Images per GPU (data.batch_size_per_gpu).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {experiment, derived}.")
def config_cmd(
    experiment: str, overrides: tuple[str, ...], gpus: int | None, batch_per_gpu: int | None, as_json: bool
) -> None:
    """Print the resolved EXPERIMENT (bases merged, overrides applied) and derived values.

    The experiment is printed as YAML that loads back as is (no _base_), followed by a commented
    "derived" block: world size, effective batch (GPUs x images per GPU x accumulation steps),
    the learning rate scaled by optim.auto_scale_lr, and the schedule rescaled when it counts
    iterations.

    \b
    Examples:
      orch config experiments/coco/faster_rcnn_r50_fpn_1x_coco.yaml
      orch config experiments/coco/retinanet_r50_fpn_1x_coco.yaml --gpus 4 --batch-per-gpu 1
      orch config exp.yaml --set optim.lr=0.01 --set optim.auto_scale_lr.rule=sqrt
      orch config exp.yaml --gpus 16 --json | jq .derived.lr
      orch config exp.yaml > resolved.yaml     # a flat, reloadable copy
    """
    from orchestrator.config import dump_experiment, experiment_to_dict, load_experiment

    extra = {"resources.gpus": gpus, "data.batch_size_per_gpu": batch_per_gpu}
    exp = load_experiment(experiment, overrides, extra=extra)
    derived = derived_values(exp)
    if as_json:
        click.echo(json.dumps({"experiment": experiment_to_dict(exp), "derived": derived}, indent=2))
        return
    click.echo(dump_experiment(exp).rstrip())
    click.echo(_comment_block(derived))
