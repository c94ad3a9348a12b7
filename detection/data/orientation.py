"""EXIF orientation: the frame annotation tools label in, and how to get there.

A camera stores the sensor's pixels as they came and an EXIF tag (0x0112) saying how to turn
them to show the picture upright: 1 = as stored, 2 = mirrored, 3 = turned 180°, 4 = flipped
upside down, 5 = transposed, 6 = turned 90° clockwise, 7 = transversed, 8 = turned 90°
anticlockwise. LabelMe, Roboflow and Ultralytics show (and label) the upright picture, and so
does orch with ``data.exif: apply`` (the default): every image is read upright, and COCO
``width``/``height`` are the upright sizes. ``data.exif: ignore`` reads the stored frame, for
datasets labelled in it.

Sizes come from the file header and its EXIF block (Pillow opens lazily: nothing is decoded).
Standard library, Pillow and numpy (the ``orch`` CLI imports this; no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The EXIF tag of the orientation.
ORIENTATION_TAG = 0x0112
#: What each orientation does to the stored picture to show it upright.
TURNS = {1: "none", 2: "mirrored", 3: "turned 180°", 4: "flipped upside down", 5: "transposed",
         6: "turned 90° clockwise", 7: "transversed", 8: "turned 90° anticlockwise"}
#: The ``data.exif`` values.
EXIF_MODES = ("apply", "ignore")


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says: the stored size and the EXIF orientation (1 without
    one). :attr:`upright` is the size the picture is shown (and read by orch) at."""

    width: int
    height: int
    orientation: int = 1

    @property
    def swaps(self) -> bool:
        """Whether showing it upright swaps width and height (orientations 5 to 8)."""
        return self.orientation in (5, 6, 7, 8)

    @property
    def upright(self) -> tuple[int, int]:
        """``(width, height)`` of the upright picture."""
        return (self.height, self.width) if self.swaps else (self.width, self.height)

    def size(self, exif: bool = True) -> tuple[int, int]:
        """``(width, height)`` as orch reads the image: upright with ``exif``, else as stored."""
        return self.upright if exif else (self.width, self.height)


def orientation_of(image: Any, header_only: bool = False) -> int:
    """The EXIF orientation (1..8) of an open Pillow image; 1 without a valid one. From what
    ``Image.open`` read already (JPEG's APP1, PNG's eXIf before the pixels, TIFF's tags), so
    ``verify()`` still works after it; ``header_only`` false also looks further (``getexif``)."""
    from PIL import Image

    try:
        raw = image.info.get("exif")
        if raw:
            exif = Image.Exif()
            exif.load(raw)
            value = exif.get(ORIENTATION_TAG, 1)
        elif hasattr(image, "tag_v2"):  # TIFF: the orientation is one of its own tags
            value = image.tag_v2.get(ORIENTATION_TAG, 1)
        elif not header_only:
            value = image.getexif().get(ORIENTATION_TAG, 1)
        else:
            value = 1
    except Exception:  # a broken EXIF block: Pillow raises what its parser meets
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_header(path: str | Path) -> ImageHeader:
    """The :class:`ImageHeader` of ``path``. Raises what ``PIL.Image.open`` raises
    (``FileNotFoundError``, ``UnidentifiedImageError``, ``OSError``)."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        return ImageHeader(width, height, orientation_of(image))


def upright_point(x: float, y: float, width: float, height: float, orientation: int) -> tuple[float, float]:
    """A point of the stored ``width x height`` frame in the upright frame (continuous pixel
    coordinates, so a corner maps onto a corner)."""
    return {
        1: (x, y), 2: (width - x, y), 3: (width - x, height - y), 4: (x, height - y),
        5: (y, x), 6: (height - y, x), 7: (height - y, width - x), 8: (y, width - x),
    }[orientation]


def upright_box(box: tuple[float, float, float, float], width: float, height: float,
                orientation: int) -> tuple[float, float, float, float]:
    """A COCO ``(x, y, w, h)`` box of the stored frame in the upright frame (numbers, or numpy
    arrays of many boxes)."""
    import numpy as np

    x, y, w, h = box
    (ax, ay), (bx, by) = (upright_point(x, y, width, height, orientation),
                          upright_point(x + w, y + h, width, height, orientation))
    return (np.minimum(ax, bx), np.minimum(ay, by), np.abs(bx - ax), np.abs(by - ay))


def upright_polygon(flat: list[float], width: float, height: float, orientation: int) -> list[float]:
    """A flat ``[x1, y1, x2, y2, ...]`` polygon of the stored frame in the upright frame."""
    out: list[float] = []
    for x, y in zip(flat[0::2], flat[1::2]):
        out.extend(upright_point(x, y, width, height, orientation))
    return out


def upright_array(array: Any, orientation: int) -> Any:
    """A numpy ``[H, W, ...]`` array of the stored frame turned upright (as PIL's
    ``ImageOps.exif_transpose`` and torchvision's decoders turn the pixels)."""
    import numpy as np

    flips = {1: array, 2: array[:, ::-1], 3: array[::-1, ::-1], 4: array[::-1]}
    if orientation in flips:
        return np.ascontiguousarray(flips[orientation])
    turned = np.swapaxes(array, 0, 1)  # 5: transpose
    return np.ascontiguousarray({5: turned, 6: turned[:, ::-1], 7: turned[::-1, ::-1], 8: turned[::-1]}[orientation])
