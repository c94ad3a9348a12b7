"""What ``data.train_pipeline`` may say, as plain data: no torch, so ``orch config`` checks it fast.

A pipeline is a preset name or a list of ``{type: <transform>, <argument>: <value>, ...}``. The
presets are the training presets of torchvision's detection references
(``references/detection/presets.py``, ``DetectionPresetTrain``): the same transforms with the
same arguments, their horizontal flip probability being ``data.flip_prob`` (0.5 by default, as
there). :data:`TRANSFORMS` lists the ``torchvision.transforms.v2`` classes that work on a
detection sample (an image with boxes and, for Mask R-CNN, masks) and the argument names of each;
``tests/detection/test_pipelines.py`` checks it against the installed torchvision, and every other
v2 transform is in :data:`LEFT_OUT` with the reason.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional

#: Fill of the references' zoom-out and crop padding: the ImageNet mean in 0..255.
MEAN_FILL = [123.0, 117.0, 104.0]
#: RandomShortestSize sizes of the references' ``multiscale`` preset.
MULTISCALE_SIZES = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
FLIP = "RandomHorizontalFlip"

#: Preset -> its transforms (the flip gets ``p = data.flip_prob`` when expanded).
PRESETS: dict[str, tuple[dict[str, Any], ...]] = {
    "hflip": ({"type": FLIP},),
    "lsj": (
        {"type": "ScaleJitter", "target_size": [1024, 1024], "antialias": True},
        {"type": "FixedSizeCrop", "size": [1024, 1024], "fill": MEAN_FILL},
        {"type": FLIP},
    ),
    "multiscale": (
        {"type": "RandomShortestSize", "min_size": MULTISCALE_SIZES, "max_size": 1333},
        {"type": FLIP},
    ),
    "ssd": (
        {"type": "RandomPhotometricDistort"},
        {"type": "RandomZoomOut", "fill": MEAN_FILL},
        {"type": "RandomIoUCrop"},
        {"type": FLIP},
    ),
    "ssdlite": ({"type": "RandomIoUCrop"}, {"type": FLIP}),
}

#: Transform name -> the argument names it takes (torchvision.transforms.v2 0.29, plus orch's
#: FixedSizeCrop). Arguments named ``fill`` fill image pixels; masks are always filled with 0.
TRANSFORMS: dict[str, tuple[str, ...]] = {
    # geometry: boxes and masks follow the image
    "CenterCrop": ("size",),
    "ElasticTransform": ("alpha", "sigma", "interpolation", "fill"),
    "FixedSizeCrop": ("size", "fill", "padding_mode"),  # orch's, as the references' lsj uses it
    "Pad": ("padding", "fill", "padding_mode"),
    "RandomAffine": ("degrees", "translate", "scale", "shear", "interpolation", "fill", "center"),
    "RandomCrop": ("size", "padding", "pad_if_needed", "fill", "padding_mode"),
    "RandomHorizontalFlip": ("p",),
    "RandomIoUCrop": ("min_scale", "max_scale", "min_aspect_ratio", "max_aspect_ratio", "sampler_options", "trials"),
    "RandomPerspective": ("distortion_scale", "p", "interpolation", "fill"),
    "RandomResize": ("min_size", "max_size", "interpolation", "antialias"),
    "RandomResizedCrop": ("size", "scale", "ratio", "interpolation", "antialias"),
    "RandomRotation": ("degrees", "interpolation", "expand", "center", "fill"),
    "RandomShortestSize": ("min_size", "max_size", "interpolation", "antialias"),
    "RandomVerticalFlip": ("p",),
    "RandomZoomOut": ("fill", "side_range", "p"),
    "Resize": ("size", "interpolation", "max_size", "antialias"),
    "ScaleJitter": ("target_size", "scale_range", "interpolation", "antialias"),
    # colour: the image only
    "ColorJitter": ("brightness", "contrast", "saturation", "hue"),
    "GaussianBlur": ("kernel_size", "sigma"),
    "GaussianNoise": ("mean", "sigma", "clip"),
    "JPEG": ("quality",),
    "RGB": (),
    "RandomAdjustSharpness": ("sharpness_factor", "p"),
    "RandomAutocontrast": ("p",),
    "RandomChannelPermutation": (),
    "RandomEqualize": ("p",),
    "RandomGrayscale": ("p",),
    "RandomInvert": ("p",),
    "RandomPhotometricDistort": ("brightness", "contrast", "saturation", "hue", "p"),
    "RandomPosterize": ("bits", "p"),
    "RandomSolarize": ("threshold", "p"),
    # boxes
    "ClampBoundingBoxes": ("clamping_mode",),
    "Identity": (),
    "SanitizeBoundingBoxes": ("min_size", "min_area"),  # labels_getter is orch's to set
}

#: v2 transforms that are not offered, and why (the table test makes every new one a decision).
LEFT_OUT: dict[str, str] = {
    "AugMix": "refuses bounding boxes", "AutoAugment": "refuses bounding boxes",
    "RandAugment": "refuses bounding boxes", "TrivialAugmentWide": "refuses bounding boxes",
    "RandomErasing": "erases objects but keeps their boxes",
    "Grayscale": "one output channel by default; use RandomGrayscale(p: 1)",
    "CutMix": "mixes a batch of classification labels", "MixUp": "mixes a batch of classification labels",
    "FiveCrop": "returns several images", "TenCrop": "returns several images",
    "Compose": "the list is the composition", "RandomApply": "takes transform objects",
    "RandomChoice": "takes transform objects", "RandomOrder": "takes transform objects",
    "Lambda": "takes a function", "LinearTransformation": "takes matrices",
    "Normalize": "the detectors normalise inside the model",
    "ConvertBoundingBoxFormat": "orch keeps boxes xyxy", "ConvertImageDtype": "orch converts at the end",
    "ToDtype": "orch converts at the end", "ToImage": "orch decodes to an image",
    "PILToTensor": "orch decodes to an image", "ToPILImage": "orch works on tensors",
    "ToPureTensor": "orch converts at the end", "ToTensor": "orch decodes to an image",
    "ClampKeyPoints": "no keypoints", "SanitizeKeyPoints": "no keypoints", "SetClampingMode": "internal",
    "UniformTemporalSubsample": "videos only", "Transform": "the base class",
}


def expand_pipeline(spec: Any, flip_prob: float) -> list[dict[str, Any]]:
    """The transform list of ``spec`` (a preset name or a list), each item a fresh dict."""
    if isinstance(spec, str):
        return [{**item, "p": flip_prob} if item["type"] == FLIP else dict(item) for item in PRESETS[spec]]
    return [dict(item) for item in spec]


def pipeline_problem(spec: Any) -> Optional[tuple[str, str]]:
    """``(key, message)`` for the first thing wrong with a ``data.train_pipeline`` value, else
    None. ``key`` is relative to ``data.train_pipeline`` (``""`` or ``"[2]"``)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec in PRESETS:
            return None
        return "", f"unknown preset {spec!r}{_close(spec, PRESETS)}; valid presets: {', '.join(PRESETS)}, " \
                   "or a list of {type: <transform>, ...}"
    if not isinstance(spec, (list, tuple)):
        return "", f"must be a preset name ({', '.join(PRESETS)}) or a list of {{type: <transform>, ...}}"
    for i, item in enumerate(spec):
        where = f"[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            return where, f"{item!r} needs a 'type' naming a transform, e.g. {{type: RandomHorizontalFlip, p: 0.5}}"
        name = item["type"]
        if name not in TRANSFORMS:
            reason = f" ({LEFT_OUT[name]})" if name in LEFT_OUT else _close(name, TRANSFORMS)
            return where, f"unknown transform {name!r}{reason}; valid: {', '.join(TRANSFORMS)}"
        valid = TRANSFORMS[name]
        for arg in item:
            if arg != "type" and arg not in valid:
                return where, (f"{name} has no argument {arg!r}{_close(arg, valid)}; "
                               f"valid: {', '.join(valid) if valid else 'none'}")
    return None


def _close(word: str, candidates: Any) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
