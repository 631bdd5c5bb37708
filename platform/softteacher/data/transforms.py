"""Weak and strong views of one image, each with the 3x3 matrix that maps original pixels into it.

Notes, "One training step" step 2: the teacher sees a weak view (random resize + horizontal
flip), the student a strong one (its own random resize + flip, then one colour op, one
geometric op and cutout). Both references run the two pipelines on separate copies of the
image, so the two views draw their resize and flip independently
(``AugmentConfig.shared_resize_flip`` shares one draw instead). Pseudo boxes travel between
the two with ``T_student @ inv(T_teacher)``, whatever each view drew. Labeled images get
resize + flip + one colour op, as in both references (``AugmentConfig.labeled_view``).

Coordinates are continuous with pixel edges at integers, so ``[0, 0, W, H]`` is the whole
image and a resize is exactly a scaling. Every geometric op returns ``(image, matrix)``;
a view's matrix is the product of its ops' matrices. Choices where the references leave
room (each documented at its function): colour then geometric in a fixed order, so the
fill value is never colour-jittered; rotate and shear act about the image centre; geometric
parameters are uniform in their +- ranges (the colour magnitude does not scale them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from softteacher.config import AugmentConfig
from softteacher.data.samples import ImageRecord, LabeledSample, UnlabeledSample, View

if TYPE_CHECKING:  # the Ray Data actors import this module and never need torch (~3 s)
    import torch

COLOUR_OPS: tuple[str, ...] = (
    "identity",
    "autocontrast",
    "equalize",
    "solarize",
    "colour",
    "contrast",
    "brightness",
    "sharpness",
    "posterize",
)
GEOMETRIC_OPS: tuple[str, ...] = ("translate", "rotate", "shear")
MIN_BOX_SIDE = 1.0

_ENHANCERS = {
    "colour": ImageEnhance.Color,
    "contrast": ImageEnhance.Contrast,
    "brightness": ImageEnhance.Brightness,
    "sharpness": ImageEnhance.Sharpness,
}


class ImageFormatError(ValueError):
    """An image that is not the HWC uint8 RGB array the views are defined on."""


# --------------------------------------------------------------------------- boxes


def _map_corners(boxes, matrix, width: int, height: int, xp):
    """Map xyxy boxes by an affine 3x3 matrix: four corners, min/max, clip to the image.

    Written once against operations numpy and torch share (``xp`` is either module), so
    ``map_boxes`` and ``transfer_boxes`` cannot drift apart. For an affine map the min/max
    of the corners is the smallest axis-aligned box enclosing the mapped box.
    """
    xs = boxes[:, [0, 2, 2, 0]]
    ys = boxes[:, [1, 1, 3, 3]]
    mapped_x = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    mapped_y = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
    return xp.stack(
        [
            xp.amin(mapped_x, axis=1).clip(0, width),
            xp.amin(mapped_y, axis=1).clip(0, height),
            xp.amax(mapped_x, axis=1).clip(0, width),
            xp.amax(mapped_y, axis=1).clip(0, height),
        ],
        axis=1,
    )


def map_boxes(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Map (N,4) xyxy boxes with a 3x3 matrix: the four corners, min/max, clipped to the
    (width, height) image. Returns float32, the dtype boxes travel in."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    mapped = _map_corners(boxes, np.asarray(matrix, dtype=np.float64), width, height, np)
    return mapped.astype(np.float32)


def transfer_boxes(
    boxes: torch.Tensor,
    src_matrix: torch.Tensor,
    dst_matrix: torch.Tensor,
    dst_size: tuple[int, int],
) -> torch.Tensor:
    """Boxes of one view into another view of the same original: T_dst @ inv(T_src), corners,
    min/max, clip. Used by the model on tensors; float32 in, float32 out.

    ``dst_size`` is (height, width). The matrix product is formed in float64 (the inverse of
    a resize-and-rotate matrix loses digits in float32); the boxes keep their dtype and device.
    """
    import torch  # here, not at the top: see the TYPE_CHECKING import

    src = torch.as_tensor(src_matrix, dtype=torch.float64)
    dst = torch.as_tensor(dst_matrix, dtype=torch.float64)
    matrix = (dst @ torch.linalg.inv(src)).to(device=boxes.device, dtype=boxes.dtype)
    height, width = dst_size
    return _map_corners(boxes.reshape(-1, 4), matrix, width, height, torch)


# --------------------------------------------------------------------------- geometric ops


def _affine(image: np.ndarray, matrix: np.ndarray, fill: int) -> np.ndarray:
    """Warp onto a canvas of the input's size; PIL's AFFINE wants the output->input map."""
    inverse = np.linalg.inv(matrix)[:2].ravel()
    height, width = image.shape[:2]
    warped = Image.fromarray(image).transform(
        (width, height),
        Image.Transform.AFFINE,
        tuple(float(v) for v in inverse),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(fill,) * image.shape[2],
    )
    return np.asarray(warped)


def _about_centre(linear: np.ndarray, width: int, height: int) -> np.ndarray:
    """The 3x3 matrix applying a 2x2 linear map about the image centre (centre stays put)."""
    centre = np.array([width / 2.0, height / 2.0])
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = centre - linear @ centre
    return matrix


def _resize(image: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize to (width, height); the matrix scales each axis by its exact size ratio."""
    old_height, old_width = image.shape[:2]
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    matrix = np.diag([width / old_width, height / old_height, 1.0])
    return resized, matrix


def _hflip(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right: x -> W - x."""
    width = image.shape[1]
    matrix = np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return np.ascontiguousarray(image[:, ::-1]), matrix


def _translate(image: np.ndarray, dx: float, dy: float, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Shift content by (dx, dy) pixels on the same canvas."""
    matrix = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])
    return _affine(image, matrix, fill), matrix


def _rotate(image: np.ndarray, degrees: float, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotate about the image centre, counter-clockwise on screen for positive degrees (as PIL)."""
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    linear = np.array([[cos, sin], [-sin, cos]])
    height, width = image.shape[:2]
    matrix = _about_centre(linear, width, height)
    return _affine(image, matrix, fill), matrix


def _shear(
    image: np.ndarray, degrees: float, axis: Literal["x", "y"], fill: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shear about the image centre: x += tan(deg) (y - cy) for "x", y += tan(deg) (x - cx) for "y".

    About the origin (the top-left corner) the far edge would move by tan(deg) times the
    image side, over half the canvas at 30 degrees; about the centre no edge moves more than
    half that.
    """
    factor = math.tan(math.radians(degrees))
    linear = (
        np.array([[1.0, factor], [0.0, 1.0]])
        if axis == "x"
        else np.array([[1.0, 0.0], [factor, 1.0]])
    )
    height, width = image.shape[:2]
    matrix = _about_centre(linear, width, height)
    return _affine(image, matrix, fill), matrix


def _resized_shape(
    height: int, width: int, short_side: int, max_size: int
) -> tuple[int, int, float]:
    """(height, width, scale): short side ``short_side`` unless the long side passes max_size."""
    scale = min(short_side / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale)), scale


# --------------------------------------------------------------------------- colour and cutout


def _colour(image: np.ndarray, op: str, magnitude: int) -> np.ndarray:
    """One colour op at magnitude m (1..10); shape and dtype are kept.

    Enhance ops use factor 0.1 + 0.18 m (notes: 0.28..1.9, 1.0 at m = 5). Solarize inverts
    pixels at or above 256 - 25.6 m, so m = 10 inverts every pixel and m = 1 only the
    brightest. Posterize keeps 8 - ceil(0.4 m) bits, 7 at m = 1 down to 4 at m = 10 (the
    RandAugment range).
    """
    if op not in COLOUR_OPS:
        raise ValueError(f"unknown colour op {op!r}; choose one of {COLOUR_OPS}")
    if op == "identity":
        return image
    pil = Image.fromarray(image)
    if op == "autocontrast":
        out = ImageOps.autocontrast(pil)
    elif op == "equalize":
        out = ImageOps.equalize(pil)
    elif op == "solarize":
        out = ImageOps.solarize(pil, threshold=int(round(256 - 25.6 * magnitude)))
    elif op == "posterize":
        out = ImageOps.posterize(pil, 8 - math.ceil(0.4 * magnitude))
    else:
        out = _ENHANCERS[op](pil).enhance(0.1 + 0.18 * magnitude)
    return np.asarray(out)


def _cutout(image: np.ndarray, squares: list[tuple[int, int, int]], fill: int) -> np.ndarray:
    """Fill each (x0, y0, side) square with ``fill``; geometry (and so the matrix) is unchanged."""
    out = image.copy()
    for x0, y0, side in squares:
        out[y0 : y0 + side, x0 : x0 + side] = fill
    return out


# --------------------------------------------------------------------------- random draws


def _sample_colour_op(cfg: AugmentConfig, rng: np.random.Generator) -> tuple[str, int]:
    low, high = cfg.magnitude_range
    return COLOUR_OPS[rng.integers(len(COLOUR_OPS))], int(rng.integers(low, high + 1))


def _random_geometric(view: View, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[View, str]:
    """One of translate (x and y), rotate or shear (x or y), parameters uniform in +- range."""
    op = GEOMETRIC_OPS[rng.integers(len(GEOMETRIC_OPS))]
    height, width = view.image.shape[:2]
    if op == "translate":
        dx = rng.uniform(-cfg.translate_frac, cfg.translate_frac) * width
        dy = rng.uniform(-cfg.translate_frac, cfg.translate_frac) * height
        image, matrix = _translate(view.image, dx, dy, cfg.fill)
    elif op == "rotate":
        image, matrix = _rotate(view.image, rng.uniform(-cfg.rotate_deg, cfg.rotate_deg), cfg.fill)
    else:
        axis = "x" if rng.random() < 0.5 else "y"
        image, matrix = _shear(
            view.image, rng.uniform(-cfg.shear_deg, cfg.shear_deg), axis, cfg.fill
        )
    return View(image=image, matrix=matrix @ view.matrix), op


def _random_cutout(view: View, cfg: AugmentConfig, rng: np.random.Generator) -> View:
    """``cfg.cutout_count`` squares, side 1..cutout_max_frac * short side, each inside the image."""
    height, width = view.image.shape[:2]
    max_side = max(1, int(cfg.cutout_max_frac * min(height, width)))
    low, high = cfg.cutout_count
    squares = []
    for _ in range(int(rng.integers(low, high + 1))):
        side = int(rng.integers(1, max_side + 1))
        squares.append(
            (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)), side)
        )
    return View(image=_cutout(view.image, squares, cfg.fill), matrix=view.matrix)


def _random_resize_flip(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> View:
    """The weak ops: short side a uniform integer in ``cfg.train_sizes``, then a flip with
    probability ``cfg.flip_prob``."""
    _check_image(image)
    low, high = cfg.train_sizes
    height, width = image.shape[:2]
    new_height, new_width, _ = _resized_shape(
        height, width, int(rng.integers(low, high + 1)), cfg.max_size
    )
    resized, matrix = _resize(image, new_width, new_height)
    if rng.random() < cfg.flip_prob:
        resized, flip = _hflip(resized)
        matrix = flip @ matrix
    return View(image=resized, matrix=matrix)


def _random_colour(view: View, cfg: AugmentConfig, rng: np.random.Generator) -> View:
    """One colour op at a random magnitude; pixels change, geometry (the matrix) does not."""
    op, magnitude = _sample_colour_op(cfg, rng)
    return View(image=_colour(view.image, op, magnitude), matrix=view.matrix)


def _add_strong_ops(weak: View, cfg: AugmentConfig, rng: np.random.Generator) -> View:
    """Colour, geometric, then cutout on a weak view (fixed order: fill is never recoloured)."""
    moved, _ = _random_geometric(_random_colour(weak, cfg, rng), cfg, rng)
    return _random_cutout(moved, cfg, rng)


def _check_image(image: np.ndarray) -> None:
    if not (
        isinstance(image, np.ndarray)
        and image.ndim == 3
        and image.shape[2] == 3
        and image.dtype == np.uint8
    ):
        described = (
            f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        )
        raise ImageFormatError(
            f"expected an HxWx3 uint8 RGB array, got {described}; "
            "convert with np.asarray(PIL.Image.open(path).convert('RGB'))"
        )


def _check_record_image(record: ImageRecord, image: np.ndarray) -> None:
    """Boxes are in the annotation's pixels, so the decoded image must have its size."""
    _check_image(image)
    if image.shape[:2] != (record.height, record.width):
        raise ImageFormatError(
            f"image {record.file_name!r} is {image.shape[1]}x{image.shape[0]} but its annotation "
            f"says {record.width}x{record.height}; fix the width/height in the annotation file"
        )


# --------------------------------------------------------------------------- public views


def weak_view(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> View:
    """Random resize (short side uniform in cfg.train_sizes, long side <= cfg.max_size) and a
    horizontal flip with cfg.flip_prob: the teacher's view."""
    return _random_resize_flip(image, cfg, rng)


def colour_view(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> View:
    """weak_view's ops + one colour op: what both references give a labeled image."""
    return _random_colour(_random_resize_flip(image, cfg, rng), cfg, rng)


def strong_view(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> View:
    """weak_view's ops + one colour op + one geometric op + cutout."""
    return _add_strong_ops(_random_resize_flip(image, cfg, rng), cfg, rng)


def weak_strong_views(
    image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[View, View]:
    """The teacher's weak and the student's strong view of one image.

    By default each view draws its own resize + flip, as both references do (they run the
    weak and the strong pipeline on separate copies): the weak view is ``weak_view`` and the
    strong one ``strong_view`` on the generator that follows. With
    ``cfg.shared_resize_flip`` the strong view is the weak one plus its colour, geometric and
    cutout ops, in ``strong_view``'s draw order.
    """
    weak = _random_resize_flip(image, cfg, rng)
    if cfg.shared_resize_flip:
        return weak, _add_strong_ops(weak, cfg, rng)
    return weak, strong_view(image, cfg, rng)


_LABELED_VIEWS = {"weak": weak_view, "colour": colour_view, "strong": strong_view}


def labeled_sample(
    record: ImageRecord, image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> LabeledSample:
    """cfg.labeled_view ('weak', 'colour' or 'strong') of a labeled image, its boxes mapped;
    boxes that end up under 1 px wide/high are dropped with their labels."""
    _check_record_image(record, image)
    view = _LABELED_VIEWS[cfg.labeled_view](image, cfg, rng)
    height, width = view.image.shape[:2]
    boxes = map_boxes(record.boxes, view.matrix, width, height)
    keep = (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIDE) & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIDE)
    return LabeledSample(
        image_id=record.image_id,
        image=view.image,
        boxes=boxes[keep],
        labels=np.asarray(record.labels)[keep],
    )


def unlabeled_sample(
    record: ImageRecord, image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> UnlabeledSample:
    """The teacher's weak and the student's strong view of one unlabeled image."""
    _check_record_image(record, image)
    weak, strong = weak_strong_views(image, cfg, rng)
    return UnlabeledSample(image_id=record.image_id, weak=weak, strong=strong)


def resize_for_test(image: np.ndarray, cfg: AugmentConfig) -> tuple[np.ndarray, float]:
    """Short side to cfg.test_size (long side <= cfg.max_size); returns the image and the scale
    (view = original * scale).

    The size is rounded to whole pixels, so the scale is exact for the binding side and within
    half a pixel for the other.
    """
    _check_image(image)
    height, width = image.shape[:2]
    new_height, new_width, scale = _resized_shape(height, width, cfg.test_size, cfg.max_size)
    resized, _ = _resize(image, new_width, new_height)
    return resized, scale
