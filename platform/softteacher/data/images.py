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
    """An image file that is missing, empty, undecodable, or not the size its annotation
    says."""


def decode_image(
    data: bytes, source: str, expected_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode encoded image bytes to an ``(H, W, 3)`` ``uint8`` RGB array.

    ``source`` names the file in errors. EXIF orientation is applied, as annotators saw the
    image upright (MMDetection's and Detectron2's loaders do the same). Greyscale, palette,
    CMYK and alpha images become RGB (alpha dropped); 16- and 32-bit greyscale is scaled to
    8 bits, not clipped (see :func:`_rgb_array`). No copies beyond the decode and one
    conversion: this runs once for every image of every step.
    ``expected_size`` is the record's ``(width, height)``: a mismatch would make every box
    clip against the wrong bounds, so it is an error, not a warning; pass None for the real
    size (the shards hold the real size, checked once by :func:`check_image_file`). The
    array may be read-only (PIL's buffer, not copied); copy it before writing into it.
    """
    if not data:
        raise CorruptImageError(
            f"image {source} is empty (0 bytes); "
            "re-download it or remove it from the annotation file"
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            array = _rgb_array(image)
    except UnidentifiedImageError:
        raise CorruptImageError(
            f"{source} is not an image format PIL can read; "
            "re-download it or remove it from the annotation file"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CorruptImageError(
            f"cannot decode image {source} ({reason}); "
            "re-download it or remove it from the annotation file"
        ) from None
    if expected_size is not None:
        check_size(array, expected_size, source)
    return array


# Greyscale of more than 8 bits: PIL's ``convert("RGB")`` clips it to 255, so a 16-bit scan
# would come out almost all white; it is scaled instead (the top 8 bits kept).
_DEEP_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _rgb_array(image: Image.Image) -> np.ndarray:
    """The decoded image as ``(H, W, 3)`` ``uint8``. ``I;16*`` keeps its top 8 bits
    (``value >> 8``); ``I`` (32-bit) too while its values fit 16 bits (how PIL opens some
    16-bit files), else ``value >> 24``, negatives as 0. A palette with transparency goes
    through RGBA (PIL warns on each such image otherwise)."""
    if image.mode in _DEEP_GREY_MODES:
        grey = np.asarray(image)
        if image.mode == "I":
            grey = np.clip(grey, 0, None).astype(np.uint32)
            grey = grey >> (24 if grey.size and grey.max() > 0xFFFF else 8)
        else:
            grey = grey.astype(np.uint16) >> 8  # also makes big-endian I;16B native
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8)


def check_image_file(path: str) -> tuple[int, int] | str:
    """The image's real ``(width, height)`` (EXIF orientation applied), or the one-line
    :class:`CorruptImageError` message that names the file and the fix.

    Decodes the whole file, as training will: run once a file before training, so that a
    bad image is known before the first step, not at image 117,000 of a multi-day run.
    A top-level function of a ``str``, for a ``concurrent.futures`` process pool.
    """
    try:
        array = load_image(Path(path))
    except CorruptImageError as error:
        return str(error)
    return array.shape[1], array.shape[0]


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
