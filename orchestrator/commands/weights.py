"""``orch weights``: fill the weights cache by hand, list the weights names of a model type."""

from __future__ import annotations

import click

from orchestrator.commands.common import set_option


@click.group("weights")
def weights_group() -> None:
    """Pretrained torchvision weights by name (model.weights: COCO_V1, backbone_weights: DEFAULT).

    \b
    The cache is $ORCH_WEIGHTS_DIR (shared storage on a cluster), else $TORCH_HOME/hub/checkpoints.
    `orch submit` downloads missing files there on the submitting machine; jobs only read it.
    $ORCH_WEIGHTS_MIRROR=http://host/path replaces https://download.pytorch.org/models.
    """


@weights_group.command("fetch")
@click.argument("experiments", nargs=-1, required=True, type=click.Path(dir_okay=False))
@set_option
def fetch_cmd(experiments, overrides) -> int:
    """Download the weights that EXPERIMENTS name into the cache (once; hash-checked).

    \b
    Examples:
      orch weights fetch experiments/coco/faster_rcnn_r50_fpn_ft_coco_v1.yaml
      ORCH_WEIGHTS_DIR=/shared/weights orch weights fetch exp.yaml --set model.backbone_weights=DEFAULT
    """
    from orchestrator.downloads import cache_dir
    from orchestrator.config import load_experiment
    from orchestrator.weights import resolve_weights

    resolved = resolve_weights([load_experiment(path, overrides) for path in experiments], download=True,
                               echo=click.echo)
    if not resolved:
        click.echo(f"no torchvision weights names in {', '.join(experiments)}; nothing to fetch (cache: {cache_dir()})")
    return 0


@weights_group.command("list")
@click.argument("model_type", required=False)
def list_cmd(model_type) -> int:
    """The weights names of MODEL_TYPE (every model type without it), and which are cached.

    \b
    Examples:
      orch weights list fasterrcnn_resnet50_fpn
      orch weights list fasterrcnn          # ImageNet ResNet weights per model.backbone
    """
    from detection.models import MODELS, get_entry
    from detection.weights import BACKBONE_ENUMS, DETECTOR_ENUMS, RESNET_ENUMS
    from orchestrator.downloads import cache_dir

    if model_type is not None:
        get_entry(model_type)  # one line naming the valid types
    folder = cache_dir()
    click.echo(f"cache: {folder}  (* = cached)")
    for name in [model_type] if model_type else list(MODELS):
        click.echo(name)
        rows = [("model.weights", DETECTOR_ENUMS.get(name))]
        if name == "fasterrcnn":
            rows += [(f"model.backbone_weights ({b})", enum) for b, enum in RESNET_ENUMS.items()]
        else:
            rows.append(("model.backbone_weights", BACKBONE_ENUMS.get(name)))
        for key, enum in rows:
            click.echo(f"  {key + ':':34} {_names(enum, folder)}")
    return 0


def _names(enum, folder) -> str:
    """``DEFAULT (= COCO_V1), COCO_V1*  [FasterRCNN_ResNet50_FPN_Weights]`` or ``none``."""
    from detection.weights import ENUMS

    if enum is None:
        return "none (a local file only)"
    row = ENUMS[enum]
    members = ", ".join(m + ("*" if (folder / f).is_file() else "") for m, f in row.files.items())
    return f"DEFAULT (= {row.default}), {members}  [{enum}]"
