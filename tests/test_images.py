"""Every image mode a real dataset holds decodes to ``(H, W, 3)`` ``uint8`` RGB with the right
pixels (16- and 32-bit greyscale scaled, not clipped; EXIF orientation applied), and the
one-file check gives the real size or the one-line error, from any process."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softteacher.data.images import check_image_file, load_image

HEIGHT, WIDTH = 6, 8


def _values(high: int) -> np.ndarray:
    """``HEIGHT x WIDTH`` values spread over ``[0, high]``."""
    return (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) * (high // (HEIGHT * WIDTH - 1)))


def _grey(image: Image.Image, grey: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    return image, np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


def _l() -> tuple[Image.Image, np.ndarray]:
    grey = _values(255).astype(np.uint8)
    return _grey(Image.fromarray(grey, "L"), grey)


def _la() -> tuple[Image.Image, np.ndarray]:
    grey = _values(255).astype(np.uint8)
    alpha = np.full_like(grey, 77)
    return _grey(Image.fromarray(np.stack([grey, alpha], -1), "LA"), grey)


def _rgba() -> tuple[Image.Image, np.ndarray]:
    rgb = np.stack([_values(255), 255 - _values(255), np.full((HEIGHT, WIDTH), 9)], -1)
    alpha = _values(255)[..., None]  # alpha 0 included: dropped, not composited
    rgba = np.concatenate([rgb, alpha], -1).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA"), rgb.astype(np.uint8)


def _palette() -> tuple[Image.Image, np.ndarray]:
    """A palette whose transparency is one alpha a colour (a PNG tRNS chunk): PIL warns on
    converting it straight to RGB."""
    index = (_values(255) % 4).astype(np.uint8)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(colours.reshape(-1).tolist())
    image.info["transparency"] = bytes([0, 128, 255, 64])
    return image, colours[index]


def _cmyk() -> tuple[Image.Image, np.ndarray]:
    cmyk = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    cmyk[: HEIGHT // 2, :, 0] = 255  # cyan
    cmyk[HEIGHT // 2 :, :, 3] = 128  # grey
    expected = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    expected[: HEIGHT // 2] = (0, 255, 255)
    expected[HEIGHT // 2 :] = (127, 127, 127)
    return Image.fromarray(cmyk, "CMYK"), expected


def _i16(mode: str) -> Callable[[], tuple[Image.Image, np.ndarray]]:
    def make() -> tuple[Image.Image, np.ndarray]:
        values = _values(65535).astype(np.uint16)  # PIL's convert("RGB") makes most of it 255
        dtype = ">u2" if mode == "I;16B" else "<u2"
        image = Image.frombytes(mode, (WIDTH, HEIGHT), values.astype(dtype).tobytes())
        return _grey(image, values >> 8)

    return make


def _i32(high: int, shift: int) -> Callable[[], tuple[Image.Image, np.ndarray]]:
    def make() -> tuple[Image.Image, np.ndarray]:
        values = _values(high).astype(np.int32)
        return _grey(Image.fromarray(values, "I"), values.astype(np.int64) >> shift)

    return make


CASES = {
    "L png": (_l, "PNG", 0),
    "LA png": (_la, "PNG", 0),
    "RGBA png": (_rgba, "PNG", 0),
    "P png with transparency": (_palette, "PNG", 0),
    "CMYK jpeg": (_cmyk, "JPEG", 4),  # JPEG loss only
    "I;16 png": (_i16("I;16"), "PNG", 0),
    "I;16B tiff": (_i16("I;16B"), "TIFF", 0),
    "I tiff, 16-bit values": (_i32(65535, 8), "TIFF", 0),
    "I tiff, 32-bit values": (_i32(2**31 - 1, 24), "TIFF", 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_decodes_to_rgb_uint8_with_the_right_pixels(tmp_path: Path, case: str):
    make, fmt, tolerance = CASES[case]
    image, expected = make()
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's warning on a palette with transparency
        decoded = load_image(path)
        size = check_image_file(str(path))

    assert decoded.dtype == np.uint8 and decoded.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(decoded.astype(int) - expected).max() <= tolerance, (decoded, expected)
    assert size == (WIDTH, HEIGHT)


def test_exif_rotated_jpeg_is_upright_and_checked_at_its_shown_size(tmp_path: Path):
    stored = np.zeros((24, 32, 3), np.uint8)
    stored[:, 16:] = 255  # stored landscape: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the left half goes on top
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, format="JPEG", exif=exif, quality=95)

    decoded = load_image(path)

    assert decoded.shape == (32, 24, 3)
    assert decoded[:14].mean() < 10 and decoded[18:].mean() > 245
    assert check_image_file(str(path)) == (24, 32)  # (width, height), as shown


@pytest.mark.parametrize("damage", ["truncated", "empty", "not an image", "missing"])
def test_the_check_gives_a_one_line_error_naming_the_file(tmp_path: Path, damage: str):
    path = tmp_path / "bad.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        contents = {"truncated": data[: len(data) // 2], "empty": b"", "not an image": b"text"}
        path.write_bytes(contents[damage])

    message = check_image_file(str(path))

    assert isinstance(message, str) and str(path) in message and "\n" not in message
    assert "re-download" in message
    if damage == "empty":
        assert "empty (0 bytes)" in message


def test_the_check_is_a_top_level_function_for_a_process_pool():
    assert pickle.loads(pickle.dumps(check_image_file)) is check_image_file
