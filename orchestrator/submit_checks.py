"""What ``orch submit`` checks on the submitting machine before anything is queued: the files a
run reads that ``orch train`` would miss at its first step. A mistake found here costs one line
and exit 2, not a queued job that fails minutes (on a busy partition: hours) later with a FAILED
MLflow run.

Checked (real submissions; a dry run only plans): every split's annotation file and image folder (``data.train``, ``data.val``,
``data.test``), the class names of ``data.classes`` against the training file's categories, and
the local weights and checkpoint files (``model.weights`` / ``model.backbone_weights`` when they
are paths, ``runtime.load_from``, a ``runtime.resume`` path). Weights *names* are resolved by
:mod:`orchestrator.weights`. On a cluster whose data is visible only from its compute nodes,
``orch submit --no-data-check`` skips the data part (the job then checks it when it starts).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from cluster.errors import ConfigError, DataError

__all__ = ["check_inputs"]

SKIP_HINT = "(data only on the compute nodes? orch submit --no-data-check)"


def check_inputs(experiments: Iterable[Any], data: bool = True) -> None:
    """Raise a one-line :class:`DataError` / :class:`ConfigError` for the first input file of
    ``experiments`` that is missing; ``data=False`` checks only the weights and checkpoints."""
    for exp in experiments:
        if data:
            check_data(exp)
        check_files(exp)


def check_data(exp: Any) -> None:
    """Each split's ``ann_file`` (a COCO file; ``data.test`` may leave it empty) and ``img_dir``
    exist; ``data.classes`` names categories of the training file."""
    for key in ("train", "val", "test"):
        split = getattr(exp.data, key)
        if split is None:
            continue
        if split.ann_file or key != "test":
            if not split.ann_file or not os.path.isfile(split.ann_file):
                raise DataError(f"data.{key}.ann_file: annotation file {split.ann_file!r} does not exist on this "
                                f"machine; fix the path in {exp.name}'s experiment file or --set data.{key}.ann_file=... "
                                f"{SKIP_HINT}")
        if not split.img_dir or not os.path.isdir(split.img_dir):
            raise DataError(f"data.{key}.img_dir: image folder {split.img_dir!r} does not exist on this machine; fix "
                            f"the path or --set data.{key}.img_dir=... {SKIP_HINT}")
    classes = exp.data.train.classes
    if classes:
        names = _category_names(exp.data.train.ann_file)
        unknown = [name for name in classes if name not in names]
        if unknown:
            raise DataError(f"data.train.classes: {', '.join(map(repr, unknown))} not in {exp.data.train.ann_file}; "
                            f"valid names: {', '.join(sorted(names))}")


def check_files(exp: Any) -> None:
    """Local weights and checkpoint paths exist (names are the weights cache's business)."""
    from detection.models import check_local_weights
    from detection.weights import is_weights_name

    for key in ("model.weights", "model.backbone_weights"):
        value = getattr(exp.model, key.split(".", 1)[1])
        if value and not is_weights_name(value):
            check_local_weights(value, key)
    check_local_weights(exp.runtime.load_from, "runtime.load_from")
    resume = exp.runtime.resume
    if resume and resume != "auto" and not os.path.isfile(resume):
        raise ConfigError(f"runtime.resume: checkpoint {resume!r} does not exist; give an existing .pth file, "
                          "or runtime.resume=auto to continue from the output folder's last checkpoint")


def _category_names(ann_file: str) -> set[str]:
    try:
        with open(ann_file, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        raise DataError(f"{ann_file}: cannot read the annotation file ({err}); check data.train.ann_file") from err
    categories = data.get("categories") if isinstance(data, dict) else None
    return {c.get("name") for c in categories or [] if isinstance(c, dict)}
