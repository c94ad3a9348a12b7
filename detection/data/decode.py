"""Image files to ``uint8 [3, H, W]`` tensors, upright and fast where torchvision's decoders can.

JPEG goes through ``torchvision.io.decode_jpeg`` (libjpeg-turbo straight into a tensor: about 3x
faster than PIL's decode + ``convert("RGB")`` + copy, and the same pixels: both are libjpeg-turbo
with its default IDCT and upsampling); PNG through ``decode_png``. Anything else (BMP, TIFF,
WebP, 16-bit PNG, a file those decoders refuse) is read by PIL as before. Runs in the loader's
workers.

EXIF orientation (see :mod:`detection.data.orientation`) is applied by default, as annotation
tools show the picture: torchvision's decoders do it themselves (``apply_exif_orientation``),
PIL through ``ImageOps.exif_transpose``. ``exif=False`` (``data.exif: ignore``) reads the
stored frame.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg, decode_png
from torchvision.transforms.functional import pil_to_tensor

_JPEG = [0xFF, 0xD8, 0xFF]
_PNG = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]


def read_image(path: str, exif: bool = True) -> torch.Tensor:
    """The RGB image in ``path`` as a ``uint8 [3, H, W]`` tensor, turned upright by its EXIF
    orientation unless ``exif`` is false. Raises ``OSError`` when no decoder can read it."""
    # Python's reader, not torchvision.io.read_file (which refuses what stat calls empty): a pipe or
    # a special file is read as a file is, and blocks as a hung file system would.
    with open(path, "rb") as handle:
        raw = handle.read()
    if not raw:
        raise OSError(f"{path} is empty")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    image = _decode_fast(data, exif)
    if image is not None:
        return image
    with Image.open(path) as handle:
        upright = ImageOps.exif_transpose(handle) if exif else handle
        return pil_to_tensor(upright.convert("RGB"))


def _decode_fast(data: torch.Tensor, exif: bool = True) -> torch.Tensor | None:
    """torchvision's decoders for JPEG and 8-bit PNG (``data``: the file's bytes as a uint8
    tensor); None where PIL should try."""
    head = data[:8].tolist()
    if head[:3] == _JPEG:
        decode = decode_jpeg
    elif head == _PNG:
        decode = decode_png
    else:
        return None
    try:
        image = decode(data, mode=ImageReadMode.RGB, apply_exif_orientation=exif)
    except RuntimeError:  # corrupt, CMYK/exotic JPEG, ...: PIL gets its chance (and its error)
        return None
    return image if image.dtype == torch.uint8 and image.shape[0] == 3 else None
