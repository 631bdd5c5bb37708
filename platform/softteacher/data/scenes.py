"""One synthetic image: shapes on a cluttered, noisy background, and the boxes drawn.

The class of an object is its *shape*, never its colour: every object's colour is drawn
from one distribution whatever its class, so a detector has to learn outlines. Small,
rotated, stretched, slightly blurred shapes on textured backgrounds with non-object
clutter keep the task hard enough that labels matter, which is what a semi-supervised
method needs in order to show anything.

Each image is rendered from its own seed, derived from ``(cfg.seed, split, index)``, so
images can be generated in any order (or in parallel) and the set is identical either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from softteacher.config import SyntheticConfig

SPLITS = ("train", "val")

# Rendering constants (why each value): objects under ~16 pixels are unreadable as shapes;
# 60% of a shape must lie inside the image and each object keeps >= 50% of its pixels when
# later objects overlap it, so every box still shows a recognisable part of its shape.
_MIN_OBJECT_PIXELS = 16
_MIN_INSIDE_FRACTION = 0.6
_MIN_VISIBLE_FRACTION = 0.5
_PLACEMENT_TRIES = 12
_REQUIRED_PLACEMENT_TRIES = 200
_MIN_COLOUR_CONTRAST = 70.0
_BLUR_PROBABILITY = 0.3
_MAX_SHADING = 60.0  # brightness difference across an object, in grey levels

Polygon = np.ndarray  # (V, 2) float, x and y in the shape's unit frame ([-1, 1]^2)


class SyntheticConfigError(ValueError):
    """A ``SyntheticConfig`` that cannot produce a valid set."""


@dataclass(frozen=True)
class SyntheticObject:
    """One drawn object: its COCO category id, tight visible box ``[x, y, w, h]`` and colour."""

    category_id: int
    bbox: tuple[int, int, int, int]
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class RenderedImage:
    """An image (HWC ``uint8``) and the objects drawn in it."""

    image: np.ndarray
    objects: tuple[SyntheticObject, ...]


# --------------------------------------------------------------------------- shapes


def _regular_polygon(sides: int, radius: float = 1.0, phase: float = -np.pi / 2) -> Polygon:
    angles = phase + 2 * np.pi * np.arange(sides) / sides
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _circle(rng: np.random.Generator) -> tuple[list[Polygon], list[Polygon]]:
    return [_regular_polygon(40)], []


def _square(rng: np.random.Generator) -> tuple[list[Polygon], list[Polygon]]:
    return [np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float)], []


def _triangle(rng: np.random.Generator) -> tuple[list[Polygon], list[Polygon]]:
    return [_regular_polygon(3)], []


def _cross(rng: np.random.Generator) -> tuple[list[Polygon], list[Polygon]]:
    a = rng.uniform(0.25, 0.4)  # half-width of an arm
    points = [
        (-a, -1),
        (a, -1),
        (a, -a),
        (1, -a),
        (1, a),
        (a, a),
        (a, 1),
        (-a, 1),
        (-a, a),
        (-1, a),
        (-1, -a),
        (-a, -a),
    ]
    return [np.array(points, dtype=float)], []


def _star(rng: np.random.Generator) -> tuple[list[Polygon], list[Polygon]]:
    outer = _regular_polygon(5)
    inner = _regular_polygon(5, radius=rng.uniform(0.35, 0.5), phase=-np.pi / 2 + np.pi / 5)
    return [np.stack([outer, inner], axis=1).reshape(10, 2)], []


def _ring(rng: np.random.Generator) -> tuple[list[Polygon], list[Polygon]]:
    return [_regular_polygon(40)], [_regular_polygon(40, radius=rng.uniform(0.45, 0.65))]


def _diamond(rng: np.random.Generator) -> tuple[list[Polygon], list[Polygon]]:
    # Unequal diagonals keep a diamond distinct from a rotated square.
    w = rng.uniform(0.45, 0.7)
    return [np.array([(0, -1), (w, 0), (0, 1), (-w, 0)], dtype=float)], []


def _hexagon(rng: np.random.Generator) -> tuple[list[Polygon], list[Polygon]]:
    return [_regular_polygon(6)], []


def _crescent(rng: np.random.Generator) -> tuple[list[Polygon], list[Polygon]]:
    bite = _regular_polygon(40, radius=rng.uniform(0.8, 0.9)) + (rng.uniform(0.35, 0.6), 0.0)
    return [_regular_polygon(40)], [bite]


def _arrow(rng: np.random.Generator) -> tuple[list[Polygon], list[Polygon]]:
    t = rng.uniform(0.18, 0.3)  # half-thickness of the shaft
    points = [(-1, -t), (0.2, -t), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, t), (-1, t)]
    return [np.array(points, dtype=float)], []


ShapeFn = Callable[[np.random.Generator], tuple[list[Polygon], list[Polygon]]]
# The first four match the set measured in CALIBRATION.md, so a 4-class set is that set.
SHAPES: dict[str, ShapeFn] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "star": _star,
    "ring": _ring,
    "diamond": _diamond,
    "hexagon": _hexagon,
    "crescent": _crescent,
    "arrow": _arrow,
}
# Shapes whose look is already set by their own aspect parameter: stretching a diamond
# could make its diagonals equal, i.e. a rotated square.
_NO_STRETCH = {"diamond"}


def shape_names(num_classes: int) -> list[str]:
    """The first ``num_classes`` shapes; category id ``i + 1`` is ``shape_names(K)[i]``."""
    return list(SHAPES)[:num_classes]


# --------------------------------------------------------------------------- rendering


def image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of one image: independent of how many images or which others are drawn."""
    return np.random.SeedSequence([seed, SPLITS.index(split), index])


def render_synthetic_image(cfg: SyntheticConfig, split: str, index: int) -> RenderedImage:
    """Draw image ``index`` of ``split``: background, clutter, objects, then sensor noise."""
    rng = np.random.default_rng(image_seed(cfg.seed, split, index))
    width = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    height = int(rng.integers(cfg.min_size, cfg.max_size + 1))
    canvas = _background(rng, width, height)
    _draw_clutter(rng, canvas)
    pixels = np.asarray(canvas, dtype=np.float32).copy()

    owner = np.zeros((height, width), dtype=np.int16)  # 0: background, j: object j
    placed: list[_Placement] = []
    for k in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        # Objects up to min_objects must be placed: give them many more tries.
        tries = _PLACEMENT_TRIES if k >= cfg.min_objects else _REQUIRED_PLACEMENT_TRIES
        placement = _place_object(rng, cfg, owner, placed, tries)
        if placement is not None:
            placed.append(placement)
        elif k < cfg.min_objects:
            raise SyntheticConfigError(
                f"could not place {cfg.min_objects} objects in {split} image {index} "
                f"({width}x{height}); lower min_objects or max_object_frac"
            )

    objects = []
    for j, p in enumerate(placed, start=1):
        colour = _pick_colour(rng, pixels, p)
        _paint(rng, pixels, p, colour)
        objects.append(SyntheticObject(p.category_id, _visible_box(owner, p, j), colour))

    pixels += _sensor_noise(rng, pixels.shape)
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    return RenderedImage(image=image, objects=tuple(objects))


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A linear gradient between two random colours plus low-frequency colour mottling.

    Both are built on a coarse grid and upscaled once (a smooth upscale of a linear ramp is
    still a ramp), which is several times faster than computing them per pixel.
    """
    rows, cols = (int(n) for n in rng.integers(3, 9, size=2))
    start, end = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (
        np.cos(angle) * np.linspace(0, 1, cols)[None, :]
        + np.sin(angle) * np.linspace(0, 1, rows)[:, None]
    )
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    coarse = start + ramp[..., None] * (end - start)
    coarse += rng.normal(0.0, rng.uniform(10.0, 35.0), size=(rows, cols, 3))
    small = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB")
    return small.resize((width, height), Image.BICUBIC)


def _sensor_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean noise of random strength (std 3-12): the sum of two uniform bytes.

    Its triangular shape is as good as Gaussian noise here and 10x cheaper to draw.
    """
    count = int(np.prod(shape))
    raw = np.frombuffer(rng.bytes(2 * count), dtype=np.uint8).reshape(2, *shape)
    noise = raw[0].astype(np.float32)
    noise += raw[1]
    noise -= 255.0
    noise *= rng.uniform(3.0, 12.0) / 104.5  # std of the sum of two uniform bytes
    return noise


def _draw_clutter(rng: np.random.Generator, canvas: Image.Image) -> None:
    """Lines, arcs and irregular blobs: edges and colours that are not objects."""
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    short = min(width, height)
    for _ in range(int(rng.integers(2, 7))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.integers(3)
        if kind == 0:
            points = rng.uniform(0, 1, size=(int(rng.integers(2, 5)), 2)) * (width, height)
            draw.line([tuple(p) for p in points], fill=colour, width=int(rng.integers(1, 4)))
        elif kind == 1:
            cx, cy = rng.uniform(0, 1, size=2) * (width, height)
            r = rng.uniform(0.1, 0.5) * short
            start = rng.uniform(0, 360)
            draw.arc(
                (cx - r, cy - r, cx + r, cy + r),
                start,
                start + rng.uniform(40, 200),
                fill=colour,
                width=int(rng.integers(1, 4)),
            )
        else:
            vertices = int(rng.integers(5, 10))
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=vertices))
            radii = rng.uniform(0.3, 1.0, size=vertices) * rng.uniform(0.03, 0.12) * short
            centre = rng.uniform(0, 1, size=2) * (width, height)
            points = centre + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
            draw.polygon([tuple(p) for p in points], fill=colour)


@dataclass
class _Placement:
    category_id: int
    mask: np.ndarray  # bool, the in-image part of the shape
    x0: int
    y0: int
    pixels: int  # in-image pixel count when placed
    visible: int  # pixels not covered by later objects
    blur: float


def _place_object(
    rng: np.random.Generator,
    cfg: SyntheticConfig,
    owner: np.ndarray,
    placed: list[_Placement],
    tries: int,
) -> _Placement | None:
    """Try a few random placements; accept one that keeps every object mostly visible."""
    height, width = owner.shape
    short = min(width, height)
    category_id = int(rng.integers(1, cfg.num_classes + 1))  # drawn once: classes stay uniform
    name = shape_names(cfg.num_classes)[category_id - 1]
    for _ in range(tries):
        fills, holes = SHAPES[name](rng)
        # Log-uniform size: small objects are as common as large ones per octave.
        size = short * np.exp(rng.uniform(np.log(cfg.min_object_frac), np.log(cfg.max_object_frac)))
        aspect = 1.0 if name in _NO_STRETCH else np.exp(rng.uniform(np.log(0.75), np.log(1.33)))
        angle = rng.uniform(0, 2 * np.pi)
        centre = rng.uniform(0, 1, size=2) * (width, height)
        transform = _shape_transform(size / 2, aspect, angle)
        fills = [p @ transform.T + centre for p in fills]
        holes = [p @ transform.T + centre for p in holes]

        mask, x0, y0, total = _rasterise(fills, holes, width, height)
        if total < _MIN_OBJECT_PIXELS or mask.sum() < _MIN_INSIDE_FRACTION * total:
            continue
        region = owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        covered = np.bincount(region[mask], minlength=len(placed) + 1)
        if any(
            p.visible - covered[j] < _MIN_VISIBLE_FRACTION * p.pixels
            for j, p in enumerate(placed, start=1)
        ):
            continue
        for j, p in enumerate(placed, start=1):
            p.visible -= int(covered[j])
        region[mask] = len(placed) + 1
        pixels = int(mask.sum())
        blur = float(rng.uniform(0.5, 1.2)) if rng.uniform() < _BLUR_PROBABILITY else 0.0
        return _Placement(category_id, mask, x0, y0, pixels, pixels, blur)
    return None


def _shape_transform(scale: float, aspect: float, angle: float) -> np.ndarray:
    """Stretch in the shape's own frame (area kept), then rotate: a rectangle stays one."""
    stretch = np.diag([scale * np.sqrt(aspect), scale / np.sqrt(aspect)])
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]]) @ stretch


def _rasterise(
    fills: list[Polygon], holes: list[Polygon], width: int, height: int
) -> tuple[np.ndarray, int, int, int]:
    """The shape's mask clipped to the image, its offset, and its pixel count before clipping."""
    points = np.concatenate(fills)
    bx0, by0 = np.floor(points.min(axis=0)).astype(int)
    bx1, by1 = np.ceil(points.max(axis=0)).astype(int) + 1
    layer = Image.new("L", (int(bx1 - bx0), int(by1 - by0)), 0)
    draw = ImageDraw.Draw(layer)
    for polygon in fills:
        draw.polygon([tuple(p) for p in polygon - (bx0, by0)], fill=1)
    for polygon in holes:
        draw.polygon([tuple(p) for p in polygon - (bx0, by0)], fill=0)
    full = np.asarray(layer, dtype=bool)
    x0, y0 = max(int(bx0), 0), max(int(by0), 0)
    x1, y1 = min(int(bx1), width), min(int(by1), height)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), dtype=bool), x0, y0, int(full.sum())
    mask = full[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
    return mask, x0, y0, int(full.sum())


def _pick_colour(
    rng: np.random.Generator, pixels: np.ndarray, p: _Placement
) -> tuple[int, int, int]:
    """A uniform random colour that stands out from what lies under the object.

    It depends on the background only, never on the class, so colour predicts nothing.
    """
    h, w = p.mask.shape
    underneath = pixels[p.y0 : p.y0 + h, p.x0 : p.x0 + w][p.mask].mean(axis=0)
    for _ in range(10):
        colour = rng.integers(0, 256, size=3)
        if np.linalg.norm(colour - underneath) >= _MIN_COLOUR_CONTRAST:
            break
    return (int(colour[0]), int(colour[1]), int(colour[2]))


def _paint(
    rng: np.random.Generator, pixels: np.ndarray, p: _Placement, colour: tuple[int, int, int]
) -> None:
    """Blend the colour in through the object's mask, with a mild random shading ramp.

    The shading keeps objects from being flat patches that colour segmentation alone finds;
    a blurred object also gets soft edges.
    """
    h, w = p.mask.shape
    alpha = p.mask.astype(np.float32)
    if p.blur > 0:
        pad = 3
        padded = np.pad(alpha * 255, pad).astype(np.uint8)
        blurred = Image.fromarray(padded).filter(ImageFilter.GaussianBlur(p.blur))
        alpha = np.asarray(blurred, np.float32)[pad:-pad, pad:-pad] / 255.0
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (
        np.cos(angle) * np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
        + np.sin(angle) * np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    )
    shaded = np.asarray(colour, np.float32) + (ramp * rng.uniform(0.0, _MAX_SHADING))[..., None]
    alpha = alpha[..., None]
    patch = pixels[p.y0 : p.y0 + h, p.x0 : p.x0 + w]
    patch *= 1.0 - alpha
    patch += alpha * shaded


def _visible_box(owner: np.ndarray, p: _Placement, j: int) -> tuple[int, int, int, int]:
    """Tight ``[x, y, w, h]`` box of the object's pixels that no later object covers."""
    h, w = p.mask.shape
    mine = owner[p.y0 : p.y0 + h, p.x0 : p.x0 + w] == j
    rows = np.flatnonzero(mine.any(axis=1))
    cols = np.flatnonzero(mine.any(axis=0))
    x, y = p.x0 + int(cols[0]), p.y0 + int(rows[0])
    return x, y, int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)
