"""A checkpoint's detector, ready to predict: built as ``orch eval`` builds it
(:func:`detection.build.build_model_from_checkpoint`), on the chosen device, in eval mode."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch

from cluster.env import DistEnv
from detection import build
from detection.inference.classes import ClassMap, resolve_class_map


@dataclasses.dataclass(frozen=True)
class Predictor:
    """Calls the detector on batches of images (``inference_mode``; float16 autocast on CUDA
    when ``amp``) and returns its outputs on the CPU in float32."""

    model: torch.nn.Module
    device: torch.device
    classes: ClassMap
    amp: bool
    masks: bool

    def __call__(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        inputs = [image.to(self.device, non_blocking=True) for image in images]
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            outputs = self.model(inputs)
        return [{key: (value.float() if value.is_floating_point() else value).cpu() for key, value in output.items()}
                for output in outputs]


def load_predictor(config: Any, checkpoint: str, device: Optional[str] = None) -> Predictor:
    """The model of ``checkpoint`` for experiment ``config`` on ``device`` (``auto``, ``cpu`` or
    ``cuda``; default ``runtime.device``), with its class map (:func:`resolve_class_map`).
    ConfigError for a missing file or a checkpoint of another model or class count."""
    from detection.models import check_local_weights

    path = check_local_weights(checkpoint, "--checkpoint")
    classes = resolve_class_map(config, path)
    runtime = dataclasses.replace(config.runtime, device=device or config.runtime.device)
    target = build.select_device(runtime, DistEnv.single())
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    model = build.build_model_from_checkpoint(config, path, classes.num_classes)
    model.to(target).eval()
    return Predictor(model, target, classes, amp=bool(runtime.amp) and target.type == "cuda",
                     masks=build.with_masks(config))
