"""Image files to HWC ``uint8`` RGB arrays, with one-line errors that name the bad file.

A COCO-scale run reads hundreds of thousands of files; one truncated download must stop the
run with the file's name and the fix, not with a PIL traceback deep inside a worker.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class CorruptImageError(ValueError):
    """An image file that is missing, unreadable, or not the size its annotation says."""


def decode_image(
    data: bytes, source: str, expected_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode encoded image bytes to an ``(H, W, 3)`` ``uint8`` RGB array.

    ``source`` names the file in errors. EXIF orientation is applied, as annotators saw the
    image upright (MMDetection's and Detectron2's loaders do the same). No copies beyond
    the decode and one conversion: this runs once for every image of every step.
    ``expected_size`` is the record's ``(width, height)``: a mismatch would make every box
    clip against the wrong bounds, so it is an error, not a warning. The array is read-only
    (PIL's buffer, not copied); copy it before writing into it.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            array = np.asarray(rgb, dtype=np.uint8)
    except UnidentifiedImageError:
        raise CorruptImageError(
            f"{source} is not an image format PIL can read; "
            "re-download it or remove it from the annotation file"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CorruptImageError(
            f"cannot decode image {source} ({reason}); "
            "re-download it or remove it from the annotation file"
        ) from None
    if expected_size is not None:
        check_size(array, expected_size, source)
    return array


def load_image(path: Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read and decode one image file; see :func:`decode_image`."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CorruptImageError(
            f"cannot read image {path} ({error.strerror or type(error).__name__}); "
            "check the image root, re-download it or remove it from the annotation file"
        ) from None
    return decode_image(data, str(path), expected_size)


def check_size(array: np.ndarray, expected_size: tuple[int, int], source: str) -> None:
    """Raise unless the decoded ``(H, W, C)`` array is ``expected_size`` = ``(width, height)``."""
    height, width = array.shape[:2]
    expected_width, expected_height = expected_size
    if (width, height) != (expected_width, expected_height):
        raise CorruptImageError(
            f"image {source} is {width}x{height} (WxH) but its annotation says "
            f"{expected_width}x{expected_height}; fix width/height in the annotation file "
            "or replace the image"
        )
