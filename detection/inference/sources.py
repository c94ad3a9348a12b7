"""What ``orch predict`` reads: SOURCE arguments resolved to image and video files, and the
images as a dataset the model's DataLoader batches.

A SOURCE is an image file, a video file, a folder (searched recursively for images by
extension; names starting with ``.`` are skipped, and so are videos: give those by name or
glob) or a quoted glob (``'data/**/*.jpg'``; ``**`` matches folders at any depth), whose matches
may be images and videos. Every input gets a relative name: its path below the folder (or the
glob's folder) it was found in, or its file name when given directly. Outputs keep those names,
so two inputs with the same name are refused up front.

Images are read as the evaluation dataset reads them (RGB, upright by their EXIF orientation
unless ``data.exif: ignore``) and go through the experiment's evaluation transforms, so a COCO
split predicted from its folder gives ``orch eval``'s predictions.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from PIL import UnidentifiedImageError

from cluster.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass(frozen=True)
class Source:
    """One input file: ``kind`` ``"image"`` or ``"video"``, its ``path`` and its relative
    ``name`` (POSIX separators), which outputs and ``images.json`` use."""

    path: str
    name: str
    kind: str


def kind_of(path: str) -> Optional[str]:
    """``"image"`` or ``"video"`` by the file's extension (case-insensitive), else None."""
    ext = os.path.splitext(path)[1].lower()
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None


def resolve_sources(args: Sequence[str]) -> list[Source]:
    """The input files that ``args`` name, in argument order (files of a folder or glob sorted by
    name). DataError for a missing path, a folder without images, a glob without matches, a file
    of another type, or two inputs with the same relative name."""
    if not args:
        raise DataError("no SOURCE given; name image files, folders, quoted globs or videos")
    sources: list[Source] = []
    for arg in args:
        sources.extend(_resolve(arg))
    seen: dict[str, str] = {}
    for source in sources:
        if source.name in seen and seen[source.name] != source.path:
            raise DataError(f"{seen[source.name]} and {source.path} would both be written as {source.name}; "
                            "predict them in separate runs (another --out each)")
        seen[source.name] = source.path
    return list({s.path: s for s in sources}.values())  # a file named twice is predicted once


def _resolve(arg: str) -> list[Source]:
    if _has_magic(arg):
        base = _glob_base(arg)
        matches = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p) and kind_of(p))
        if not matches:
            raise DataError(f"{arg!r}: no image or video file matches this pattern "
                            f"(images: {' '.join(IMAGE_EXTENSIONS)}; videos: {' '.join(VIDEO_EXTENSIONS)})")
        return [Source(p, _relative(p, base), kind_of(p) or "") for p in matches]
    if os.path.isdir(arg):
        found = sorted(_images_below(arg))
        if not found:
            raise DataError(f"{arg}: no image file ({' '.join(IMAGE_EXTENSIONS)}) in this folder or below")
        return [Source(p, _relative(p, arg), "image") for p in found]
    if not os.path.exists(arg):
        raise DataError(f"{arg}: no such file or folder; give an image, a video, a folder or a quoted glob")
    kind = kind_of(arg)
    if kind is None:
        raise DataError(f"{arg}: not an image ({' '.join(IMAGE_EXTENSIONS)}) or video "
                        f"({' '.join(VIDEO_EXTENSIONS)}) by its extension")
    return [Source(arg, os.path.basename(arg), kind)]


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _images_below(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, f) for f in files if not f.startswith(".") and kind_of(f) == "image")
    return found


def _glob_base(pattern: str) -> str:
    """The folder part of ``pattern`` before its first wildcard (``data/*/x.png`` -> ``data``)."""
    parts = pattern.replace(os.sep, "/").split("/")
    fixed = []
    for part in parts[:-1]:
        if _has_magic(part):
            break
        fixed.append(part)
    return "/".join(fixed) or ("/" if pattern.startswith("/") else ".")


def _relative(path: str, base: str) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def check_image_header(path: str, exif: bool = True) -> tuple[int, int]:
    """``(width, height)`` from the file's header (nothing is decoded), upright by its EXIF
    orientation with ``exif``; DataError when the file is not an image PIL can open. A
    truncated image is found only when it is decoded."""
    from detection.data.orientation import read_header

    try:
        return read_header(path).size(exif)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the image ({short_reason(err)}); remove it or give another SOURCE") from None


def load_image(path: str, exif: bool = True) -> torch.Tensor:
    """The RGB image in ``path`` as ``uint8 [3, H, W]``, decoded as the COCO dataset decodes it
    (torchvision's JPEG/PNG decoders, else PIL; upright by EXIF unless ``exif`` is false)."""
    from detection.data.decode import read_image

    return read_image(path, exif)


def to_model_input(image: torch.Tensor, transforms: Any) -> torch.Tensor:
    """A ``uint8 [3, H, W]`` image through the evaluation ``transforms``, as float in 0..1."""
    image, _ = transforms(image, {}, None)
    return image if image.is_floating_point() else image.float().div_(255.0)


class ImageFiles(torch.utils.data.Dataset):
    """``paths`` as model inputs: item ``i`` is ``(float image [3, H, W], i, None)``, or
    ``(None, i, message)`` when the file cannot be decoded, so the main process raises one
    DataError line instead of a DataLoader worker's traceback."""

    def __init__(self, paths: Sequence[str], transforms: Any, exif: bool = True) -> None:
        self.paths = list(paths)
        self.transforms = transforms
        self.exif = exif

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Optional[torch.Tensor], int, Optional[str]]:
        path = self.paths[index]
        try:
            image = load_image(path, self.exif)
        except (OSError, ValueError) as err:  # truncated, corrupt, vanished since the check
            return None, index, f"{path}: cannot decode the image ({short_reason(err)}); remove it or give another SOURCE"
        return to_model_input(image, self.transforms), index, None


def image_batches(paths: Sequence[str], transforms: Any, batch_size: int, workers: int, exif: bool = True) -> Any:
    """Batches ``[(image, index), ...]`` of :class:`ImageFiles` in order, decoded by ``workers``
    DataLoader processes (0 = in this process), upright by EXIF unless ``exif`` is false.
    Raises DataError at the first unreadable file."""
    loader = torch.utils.data.DataLoader(ImageFiles(paths, transforms, exif), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=list)
    for batch in loader:
        for _, _, problem in batch:
            if problem:
                raise DataError(problem)
        yield [(image, index) for image, index, _ in batch]


def short_reason(err: BaseException) -> str:
    """The first line of an exception's message (at most 160 characters), for one-line errors."""
    text = str(err).strip().splitlines()
    return text[0][:160] if text else type(err).__name__
