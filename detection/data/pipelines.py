"""``data.train_pipeline``: training augmentation on ``torchvision.transforms.v2``.

The sample handed to the v2 transforms is the decoded ``uint8`` image as a ``tv_tensors.Image``
and its target with ``boxes`` as ``tv_tensors.BoundingBoxes`` (xyxy), ``masks`` as
``tv_tensors.Mask`` (Mask R-CNN: masks follow every geometric transform) and ``labels``. Like the
references' ``DetectionPresetTrain``, the image stays ``uint8`` while it is augmented (fills are in
0..255; the dataset makes it ``float`` in 0..1 afterwards), and ``SanitizeBoundingBoxes`` runs
last (added when the list does not end with one), so boxes left degenerate by a crop are dropped
with their labels and masks. ``area`` is recomputed from the final boxes.

Determinism: v2 transforms draw from torch's global CPU generator, so each sample runs with that
generator seeded from its own seed (``(runtime.seed, epoch, index)``, see
:mod:`detection.data.samplers`) and restored afterwards: the draws of a sample do not depend on
the worker that ran it, on the number of workers or on where a run resumed, and the training
process's own random stream is left as it was.

Images whose boxes all disappear (a crop beside every object): torchvision's references keep them
as background-only images. orch does the same when ``data.keep_empty`` is true; otherwise it
redraws the augmentation of that image (same image, seeds derived from the sample's seed, up to
:data:`MAX_REDRAWS` times) and keeps it empty only if every draw lost every box. A pipeline that
empties all of the first training images even so is a one-line ConfigError at start.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.functional import pil_to_tensor

from cluster.errors import ConfigError
from detection.data.pipeline_spec import TRANSFORMS, expand_pipeline
from detection.data.samplers import mix_seed

KEY = "data.train_pipeline"
MAX_REDRAWS = 10  # draws of one image before it is kept without boxes
CHECK_IMAGES = 8  # training images tried at start before a pipeline is called box-destroying

Target = dict[str, torch.Tensor]


class FixedSizeCrop(v2.Transform):
    """Crop to at most ``size`` (h, w) at a random offset, then pad bottom/right with ``fill`` up
    to exactly ``size``: the ``FixedSizeCrop`` of the references' ``lsj`` preset, on v2 inputs.

    One uniform draw places the crop along both axes, as in the references, so the same seed
    gives the same crop. Masks are padded with 0; boxes are clipped to the crop (those left empty
    are removed by ``SanitizeBoundingBoxes``).
    """

    def __init__(self, size: Any, fill: Any = 0, padding_mode: str = "constant") -> None:
        super().__init__()
        size = [size, size] if isinstance(size, int) else list(size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"size must be one positive int or [height, width], got {size}")
        self.size = tuple(size)
        self.fill = fill
        self.padding_mode = padding_mode

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = min(height, self.size[0]), min(width, self.size[1])
        top = left = 0
        if (crop_h, crop_w) != (height, width):
            r = float(torch.rand(1))
            top, left = int(max(height - self.size[0], 0) * r), int(max(width - self.size[1], 0) * r)
        return dict(crop=(top, left, crop_h, crop_w), crop_needed=(crop_h, crop_w) != (height, width),
                    padding=[0, 0, self.size[1] - crop_w, self.size[0] - crop_h])

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["crop_needed"]:
            top, left, height, width = params["crop"]
            inpt = self._call_kernel(F.crop, inpt, top=top, left=left, height=height, width=width)
        if any(params["padding"]):
            if isinstance(self.fill, dict):  # {tv_tensors.Image: value, tv_tensors.Mask: 0}, as v2's fills
                fill = self.fill.get(type(inpt), 0)
            else:
                fill = 0 if isinstance(inpt, tv_tensors.Mask) else self.fill
            inpt = self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill,
                                     padding_mode=self.padding_mode)
        return inpt


def build_pipeline(spec: Any, flip_prob: float = 0.5, keep_empty: bool = False) -> "Pipeline":
    """The :class:`Pipeline` of a ``data.train_pipeline`` value (a preset name or a list);
    arguments torchvision refuses are a one-line :class:`ConfigError`."""
    steps = expand_pipeline(spec, flip_prob)
    transforms = [_build_step(i, item) for i, item in enumerate(steps)]
    if not transforms or not isinstance(transforms[-1], v2.SanitizeBoundingBoxes):
        transforms.append(v2.SanitizeBoundingBoxes())
    return Pipeline(transforms, steps, keep_empty)


def _build_step(index: int, item: dict[str, Any]) -> Any:
    name = item["type"]
    if name not in TRANSFORMS:  # orch config checks this first; a grid could still get here
        raise ConfigError(f"{KEY}[{index}]: unknown transform {name!r}; valid: {', '.join(TRANSFORMS)}")
    kwargs = {k: v for k, v in item.items() if k != "type"}
    if "fill" in kwargs and not isinstance(kwargs["fill"], dict):
        # Pixels get the fill, masks 0 (else a zoom-out would paint instance masks with 123).
        kwargs["fill"] = {tv_tensors.Image: kwargs["fill"], tv_tensors.Mask: 0}
    cls = FixedSizeCrop if name == "FixedSizeCrop" else getattr(v2, name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{KEY}[{index}] ({name}): {_one_line(err)}; fix the arguments "
                          f"({', '.join(TRANSFORMS[name]) or 'none'})") from err


class Pipeline:
    """``pipeline(image, target, generator)`` -> ``(uint8 image [3, H, W], target)``, the
    callable :class:`~detection.data.coco.CocoDetection` takes as ``transforms``.

    ``image`` is a ``uint8 [3, H, W]`` tensor (or a PIL image); ``generator``'s seed, when given,
    decides every random draw (see the module docstring).
    """

    def __init__(self, transforms: Sequence[Any], steps: Sequence[dict[str, Any]], keep_empty: bool) -> None:
        self.compose = v2.Compose(list(transforms))
        #: The expanded list of transform dicts (presets spelled out), for logs and ``orch data browse``.
        self.steps = [dict(step) for step in steps]
        self.keep_empty = keep_empty

    def __call__(self, image: Any, target: Target, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Target]:
        if not isinstance(image, torch.Tensor):
            image = pil_to_tensor(image)
        seed = generator.initial_seed() if generator is not None else None
        had_boxes = len(target["boxes"]) > 0
        for attempt in range(MAX_REDRAWS + 1):
            draw = seed if seed is None or attempt == 0 else mix_seed(seed, attempt)
            out_image, out = self._run(image, target, draw)
            if len(out["boxes"]) or self.keep_empty or not had_boxes:
                break
        return out_image, out

    def _run(self, image: torch.Tensor, target: Target, seed: Optional[int]) -> tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        sample: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width)),
            "labels": target["labels"],
        }
        if "masks" in target:
            sample["masks"] = tv_tensors.Mask(target["masks"])
        with _seeded(seed):
            out_image, sample = self.compose(tv_tensors.Image(image), sample)
        out_image = out_image.as_subclass(torch.Tensor)
        boxes = sample["boxes"].as_subclass(torch.Tensor).float()
        out = dict(target)  # image_id, orig_size pass through
        out["boxes"] = boxes
        out["labels"] = sample["labels"]
        out["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        out["iscrowd"] = torch.zeros(len(boxes), dtype=torch.int64)  # training drops crowds
        if "masks" in sample:
            out["masks"] = sample["masks"].as_subclass(torch.Tensor)
        return out_image, out

    def describe(self) -> str:
        """The transforms in one line, presets spelled out: ``ScaleJitter(target_size=[1024, 1024],
        antialias=True) > FixedSizeCrop(...) > ... > SanitizeBoundingBoxes()``."""
        steps = list(self.steps)
        if len(self.compose.transforms) > len(steps):
            steps.append({"type": "SanitizeBoundingBoxes"})
        return " > ".join(f"{s['type']}({', '.join(f'{k}={v}' for k, v in s.items() if k != 'type')})" for s in steps)

    def __repr__(self) -> str:
        return f"Pipeline({self.compose.transforms!r}, keep_empty={self.keep_empty})"


@contextlib.contextmanager
def _seeded(seed: Optional[int]) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded to ``seed``, then restore it (CUDA
    generators are not touched: ``torch.manual_seed`` would reseed them too)."""
    if seed is None:
        yield
        return
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def check_keeps_boxes(dataset: Any, images: int = CHECK_IMAGES) -> None:
    """Run the training pipeline of ``dataset`` on up to ``images`` images that have boxes; a
    ConfigError when it fails, or when every one of them comes out without any box."""
    step = max(1, len(dataset) // images)
    indices = [i for i in range(0, len(dataset), step) if dataset.annotation_count(i)][:images]
    for index in indices:
        try:
            _, target = dataset[(index, mix_seed(0, index))]
        except (TypeError, ValueError, RuntimeError, IndexError) as err:
            raise ConfigError(f"{KEY}: fails on training image {dataset.ids[index]}: "
                              f"{_one_line(err)}; fix the transform or its arguments") from err
        if len(target["boxes"]):
            return
    if indices:
        draws = "once each" if dataset.transforms.keep_empty else f"{MAX_REDRAWS + 1} draws each"
        raise ConfigError(
            f"{KEY}: every one of the {len(indices)} training images tried lost all its boxes ({draws}); "
            "the crops or sizes leave no object whole enough for SanitizeBoundingBoxes: check their "
            "arguments (orch data browse shows what the pipeline does)"
        )


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()).rstrip(".")
