"""Experiment files: YAML with ``_base_`` inheritance, ``--set`` overrides, typed validation.

>>> exp = load_experiment("experiments/coco/retinanet_r50_fpn_1x_coco.yaml", ["optim.lr=0.01"])
>>> exp.optim.lr
0.01
"""

from detection.config import output_dir_of
from orchestrator.config.api import build_experiment, derive, load_experiment, with_overrides
from orchestrator.config.loader import load_raw, load_with_sources
from orchestrator.config.overrides import apply_dotted, apply_overrides, parse_override
from orchestrator.config.schema import Experiment
from orchestrator.config.serialize import (
    config_hash,
    dump_experiment,
    experiment_to_dict,
    flatten,
)

__all__ = [
    "Experiment",
    "apply_dotted",
    "apply_overrides",
    "build_experiment",
    "config_hash",
    "derive",
    "dump_experiment",
    "experiment_to_dict",
    "flatten",
    "load_experiment",
    "load_raw",
    "load_with_sources",
    "output_dir_of",
    "parse_override",
    "with_overrides",
]
