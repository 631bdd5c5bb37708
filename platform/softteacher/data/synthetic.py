"""The embedded synthetic COCO-format set: shapes on cluttered, noisy backgrounds.

The class of an object is its *shape*, never its colour: every object's colour is drawn
from one distribution whatever its class, so a detector has to learn outlines. Small,
rotated, stretched, slightly blurred shapes on textured backgrounds with non-object
clutter keep the task hard enough that labels matter, which is what a semi-supervised
method needs in order to show anything.

Each image is rendered from its own seed, derived from ``(cfg.seed, split, index)``, so
images can be generated in any order (or in parallel) and the set is identical either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from softteacher.config import SyntheticConfig

# Bump whenever rendering changes, so that ``ensure_synthetic_coco`` regenerates old sets.
GENERATOR_VERSION = 1
JPEG_QUALITY = 90
SPLITS = ("train", "val")
MANIFEST_NAME = "synthetic.json"

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


class SyntheticDirError(RuntimeError):
    """The output directory holds something that is not a synthetic set we may replace."""


@dataclass(frozen=True)
class SyntheticDataset:
    """Where a generated set lives: COCO annotation files and their image folders."""

    root: Path
    train_ann: Path
    val_ann: Path
    train_images: Path
    val_images: Path

    @classmethod
    def at(cls, root: Path) -> SyntheticDataset:
        root = Path(root)
        return cls(
            root=root,
            train_ann=root / "instances_train.json",
            val_ann=root / "instances_val.json",
            train_images=root / "train",
            val_images=root / "val",
        )

    def ann_file(self, split: str) -> Path:
        return {"train": self.train_ann, "val": self.val_ann}[split]

    def image_dir(self, split: str) -> Path:
        return {"train": self.train_images, "val": self.val_images}[split]


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
    points = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
              (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
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


def categories(cfg: SyntheticConfig) -> list[dict]:
    return [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(shape_names(cfg.num_classes))
    ]


def validate_config(cfg: SyntheticConfig) -> None:
    """Reject configs that would hang placement or make empty classes, before any work."""
    problems = []
    if not 1 <= cfg.num_classes <= len(SHAPES):
        problems.append(f"num_classes={cfg.num_classes} must be in 1..{len(SHAPES)}")
    if not 32 <= cfg.min_size <= cfg.max_size:
        problems.append(f"need 32 <= min_size <= max_size (got {cfg.min_size}, {cfg.max_size})")
    if not 1 <= cfg.min_objects <= cfg.max_objects:
        problems.append(
            f"need 1 <= min_objects <= max_objects (got {cfg.min_objects}, {cfg.max_objects})"
        )
    if not 0 < cfg.min_object_frac <= cfg.max_object_frac <= 1:
        problems.append(
            "need 0 < min_object_frac <= max_object_frac <= 1 "
            f"(got {cfg.min_object_frac}, {cfg.max_object_frac})"
        )
    if cfg.num_train < 1 or cfg.num_val < 1:
        problems.append(f"need num_train, num_val >= 1 (got {cfg.num_train}, {cfg.num_val})")
    if problems:
        raise SyntheticConfigError("invalid SyntheticConfig: " + "; ".join(problems))


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
    ramp = np.cos(angle) * np.linspace(0, 1, cols)[None, :] + np.sin(angle) * np.linspace(
        0, 1, rows
    )[:, None]
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
                (cx - r, cy - r, cx + r, cy + r), start, start + rng.uniform(40, 200),
                fill=colour, width=int(rng.integers(1, 4)),
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
        size = short * np.exp(rng.uniform(np.log(cfg.min_object_frac),
                                          np.log(cfg.max_object_frac)))
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
        if any(p.visible - covered[j] < _MIN_VISIBLE_FRACTION * p.pixels
               for j, p in enumerate(placed, start=1)):
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
    ramp = (np.cos(angle) * np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
            + np.sin(angle) * np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None])
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


# --------------------------------------------------------------------------- writing


def _write_image(cfg: SyntheticConfig, split: str, index: int, image_dir: Path) -> tuple:
    """Render and save one image; return ``(width, height, [(category_id, bbox), ...])``."""
    rendered = render_synthetic_image(cfg, split, index)
    buffer = io.BytesIO()
    Image.fromarray(rendered.image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    (image_dir / _file_name(index)).write_bytes(buffer.getvalue())
    height, width = rendered.image.shape[:2]
    return width, height, [(o.category_id, o.bbox) for o in rendered.objects]


def _file_name(index: int) -> str:
    return f"{index + 1:06d}.jpg"


def generate_synthetic_coco(out_dir: Path, cfg: SyntheticConfig) -> SyntheticDataset:
    """Write the set into ``out_dir`` (new or empty); ``synthetic.json`` is written last.

    One process is enough (about 400 images/s at the default size on this machine's CPU);
    the per-image seeds would let a pool render the same bytes if that ever changes.
    Prefer ``ensure_synthetic_coco``, which never leaves a half-written set behind.
    """
    validate_config(cfg)
    dataset = SyntheticDataset.at(Path(out_dir))
    if dataset.root.exists() and any(dataset.root.iterdir()):
        raise SyntheticDirError(
            f"{dataset.root} is not empty; generate into a new folder, or use "
            "ensure_synthetic_coco to replace an older set"
        )
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        image_dir = dataset.image_dir(split)
        image_dir.mkdir(parents=True, exist_ok=True)
        per_image = [_write_image(cfg, split, i, image_dir) for i in range(count)]
        _write_annotations(dataset.ann_file(split), cfg, per_image)
    manifest = {"version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg)}
    (dataset.root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return dataset


def _write_annotations(ann_file: Path, cfg: SyntheticConfig, per_image: list) -> None:
    images, annotations = [], []
    for index, (width, height, objects) in enumerate(per_image):
        image_id = index + 1
        images.append({"id": image_id, "file_name": _file_name(index),
                       "width": width, "height": height})
        for category_id, (x, y, w, h) in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })
    content = {
        "info": {"description": "softteacher synthetic shapes", "version": GENERATOR_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": categories(cfg),
    }
    ann_file.write_text(json.dumps(content))


# --------------------------------------------------------------------------- reuse


def existing_synthetic_coco(out_dir: Path, cfg: SyntheticConfig) -> SyntheticDataset | None:
    """The set in ``out_dir`` if it is complete and was made from ``cfg`` by this version."""
    dataset = SyntheticDataset.at(Path(out_dir))
    try:
        manifest = json.loads((dataset.root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest != {"version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg)}:
        return None
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        if not dataset.ann_file(split).is_file() or not dataset.image_dir(split).is_dir():
            return None
        if sum(1 for _ in os.scandir(dataset.image_dir(split))) != count:
            return None
    return dataset


def ensure_synthetic_coco(
    out_dir: Path, cfg: SyntheticConfig, *, force: bool = False
) -> SyntheticDataset:
    """Reuse the set in ``out_dir`` if it matches ``cfg``; otherwise generate it atomically.

    The set is built in a temporary sibling folder and renamed into place, so a killed run
    leaves either the old set or none, never a partial one that looks complete. A lock file
    beside ``out_dir`` makes concurrent callers (e.g. several Ray workers) wait for one
    generation instead of racing. ``force`` regenerates even a matching set.
    """
    out_dir = Path(out_dir)
    found = None if force else existing_synthetic_coco(out_dir, cfg)
    if found is not None:
        return found
    validate_config(cfg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
        found = None if force else existing_synthetic_coco(out_dir, cfg)
        if found is not None:  # another process finished it while we waited
            return found
        if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists():
            raise SyntheticDirError(
                f"{out_dir} is not empty and holds no {MANIFEST_NAME}; refusing to replace it: "
                "choose another --out folder or empty this one"
            )
        # Under the lock, any staging folder is left over from a killed run.
        for stale in out_dir.parent.glob(f".{out_dir.name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
        try:
            generate_synthetic_coco(staging, cfg)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.rename(out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return SyntheticDataset.at(out_dir)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
