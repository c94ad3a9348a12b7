"""A checkpoint's detector, ready to predict: built as ``orch eval`` builds it
(:func:`detection.build.build_model_from_checkpoint`), on the chosen device, in eval mode."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch

from cluster.env import DistEnv
from cluster.errors import ConfigError
from detection import build
from detection.inference.classes import ClassMap, resolve_class_map
from detection.inference.draw import MASK_THRESHOLD
from detection.inference.outputs import RESULTS_SCORE_FLOOR


@dataclasses.dataclass(frozen=True)
class Predictor:
    """Calls the detector on batches of images (``inference_mode``; autocast to ``amp_dtype`` on
    CUDA when ``runtime.amp`` asks for it, as training does) and returns, on the CPU, its detections scoring at least ``floor`` (boxes and
    scores in float32, masks thresholded at 0.5 to bool while still on the device: a float mask
    per detection of a full-HD frame would be 8 MB)."""

    model: torch.nn.Module
    device: torch.device
    classes: ClassMap
    amp_dtype: Optional[torch.dtype]
    masks: bool
    floor: float = RESULTS_SCORE_FLOOR

    def __call__(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        inputs = [image.to(self.device, non_blocking=True) for image in images]
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                                     enabled=self.amp_dtype is not None):
            outputs = self.model(inputs)
        return [self._kept(output) for output in outputs]

    def _kept(self, output: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = output["scores"] >= self.floor
        kept = {}
        for key, value in output.items():
            value = value[keep]
            if key == "masks":
                value = value > MASK_THRESHOLD
            elif value.is_floating_point():
                value = value.float()
            kept[key] = value.cpu()
        return kept


def load_predictor(config: Any, checkpoint: str, device: Optional[str] = None) -> Predictor:
    """The model of ``checkpoint`` for experiment ``config`` on ``device`` (``auto``, ``cpu`` or
    ``cuda``; default ``runtime.device``), with its class map (:func:`resolve_class_map`).
    ConfigError for a missing file or a checkpoint of another model or class count."""
    from detection.models import check_local_weights

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible here; use --device auto or cpu")
    path = check_local_weights(checkpoint, "--checkpoint")
    classes = resolve_class_map(config, path)
    runtime = dataclasses.replace(config.runtime, device=device or config.runtime.device)
    target = build.select_device(runtime, DistEnv.single())
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    model = build.build_model_from_checkpoint(config, path, classes.num_classes)
    model.to(target).eval()
    return Predictor(model, target, classes, amp_dtype=build.amp_dtype(runtime, target),
                     masks=build.with_masks(config))
