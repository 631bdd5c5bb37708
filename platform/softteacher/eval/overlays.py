"""Detections drawn on images (the paper's Figure 4): per run, per folder, side by side.

Small images (the synthetic set is 64-256 px) are enlarged before drawing, so that the
"class 0.93" captions stay legible; boxes are scaled with them.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from softteacher.config import AugmentConfig
from softteacher.data.coco import CocoDataset, load_coco
from softteacher.data.images import load_image
from softteacher.eval.inference import Detections, detect

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Distinct, saturated colours that read on both light and dark backgrounds.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)
DEFAULT_MIN_SIDE = 320
TITLE_BACKGROUND = (255, 255, 255)


class ImageFolderError(FileNotFoundError):
    """A folder of images to predict on that is missing or holds no image."""


class ClassNamesError(ValueError):
    """A class-name file whose categories do not match the detector's classes."""


def class_colour(name: str) -> tuple[int, int, int]:
    """A colour per class name, the same in every run and process (``hash`` is salted)."""
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def draw_detections(
    image: np.ndarray,
    detections: Sequence[Mapping],
    *,
    min_score: float = 0.5,
    min_side: int = DEFAULT_MIN_SIDE,
) -> Image.Image:
    """``image`` (HWC uint8) with every detection scoring >= ``min_score`` drawn: its box
    outline and a "class 0.93" caption, in the class's colour.

    Each detection is ``{"box": [x1, y1, x2, y2] (image pixels), "label": name, "score"}``.
    Images whose short side is under ``min_side`` are enlarged to it first.
    """
    canvas = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    zoom = max(1.0, min_side / min(canvas.size))
    if zoom > 1.0:
        size = (round(canvas.width * zoom), round(canvas.height * zoom))
        canvas = canvas.resize(size, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, min(canvas.size) // 28))
    line = max(1, min(canvas.size) // 160)
    for det in sorted(detections, key=lambda d: float(d["score"])):  # best drawn last, on top
        score = float(det["score"])
        if score < min_score:
            continue
        x1, y1, x2, y2 = (float(v) * zoom for v in det["box"])
        colour = class_colour(str(det["label"]))
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        caption = f"{det['label']} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        width, height = right - left + 4, bottom - top + 2
        # Above the box when there is room, inside its top edge otherwise; never off the side.
        ty = y1 - height if y1 - height >= 0 else y1
        tx = max(0.0, min(x1, canvas.width - width))
        draw.rectangle((tx, ty, tx + width, ty + height), fill=colour)
        draw.text((tx + 2 - left, ty + 1 - top), caption, fill=(0, 0, 0), font=font)
    return canvas


def side_by_side(
    images: Sequence[Image.Image], titles: Sequence[str], *, gap: int = 8
) -> Image.Image:
    """Images in one row, each under its title (e.g. supervised | Soft Teacher, Figure 4)."""
    if len(images) != len(titles) or not images:
        raise ValueError(f"side_by_side needs one title an image, got {len(images)} images "
                         f"and {len(titles)} titles")
    font = _font(max(12, min(min(im.size) for im in images) // 20))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), title, font=font) for title in titles]
    strip = max(bottom - top for _, top, _, bottom in boxes) + 2 * gap
    width = sum(im.width for im in images) + gap * (len(images) + 1)
    height = max(im.height for im in images) + strip + gap
    canvas = Image.new("RGB", (width, height), TITLE_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = gap
    for im, title, (left, top, right, _) in zip(images, titles, boxes, strict=True):
        draw.text((x + (im.width - (right - left)) / 2 - left, gap - top), title,
                  fill=(0, 0, 0), font=font)
        canvas.paste(im.convert("RGB"), (x, strip))
        x += im.width + gap
    return canvas


def detection_dicts(detections: Detections, class_names: Mapping[int, str]) -> list[dict]:
    """``Detections`` as the dicts ``draw_detections`` takes; unknown labels read "class k"."""
    return [
        {"box": box.tolist(), "label": class_names.get(int(label), f"class {int(label)}"),
         "score": float(score)}
        for box, label, score in zip(
            detections.boxes, detections.labels, detections.scores, strict=True
        )
    ]


def dataset_class_names(dataset: CocoDataset) -> dict[int, str]:
    """Contiguous label -> category name."""
    return {label: cat["name"] for label, cat in enumerate(dataset.categories, start=1)}


def class_names_for(num_classes: int, ann_file: Path | None = None) -> dict[int, str]:
    """Names from a COCO file's categories (which must number ``num_classes``), else "class k"."""
    if ann_file is None:
        return {k: f"class {k}" for k in range(1, num_classes + 1)}
    names = dataset_class_names(load_coco(ann_file))
    if len(names) != num_classes:
        raise ClassNamesError(
            f"{ann_file} has {len(names)} categories but the detector has {num_classes} classes; "
            "pass the annotation file the run was trained on (or none for 'class k' names)"
        )
    return names


def overlay_artifacts(
    model: torch.nn.Module,
    dataset: CocoDataset,
    augment_cfg: AugmentConfig,
    out_dir: Path,
    n: int = 4,
    *,
    min_score: float = 0.5,
) -> list[Path]:
    """The model's detections on the first ``n`` images of ``dataset`` (the val set), one
    ``<image stem>.png`` each in ``out_dir``: the same file names in every run, so the
    overlays of two runs pair up side by side."""
    records = list(dataset.records[:n])
    images = [load_image(dataset.image_path(r), (r.width, r.height)) for r in records]
    names = dataset_class_names(dataset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    found_all = detect(model, images, augment_cfg)
    for record, image, found in zip(records, images, found_all, strict=True):
        path = out_dir / f"{Path(record.file_name).stem}.png"
        draw_detections(image, detection_dicts(found, names), min_score=min_score).save(path)
        paths.append(path)
    return paths


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderError(f"{folder} is not a folder; pass --images DIR with image files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageFolderError(
            f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images"
        )
    return files


def predict_folder(
    model: torch.nn.Module,
    image_dir: Path,
    out_dir: Path,
    augment_cfg: AugmentConfig,
    class_names: Mapping[int, str],
    *,
    min_score: float = 0.5,
    batch_size: int = 4,
) -> list[Path]:
    """Overlays of the model's detections on every image of ``image_dir``, written as
    ``out_dir/<stem>.png``; a few images in memory at a time."""
    files = image_files(image_dir)
    stems = [path.stem for path in files]
    # a.jpg and a.png would both write a.png: those keep their suffix (a.jpg.png).
    targets = {
        path: f"{path.stem}.png" if stems.count(path.stem) == 1 else f"{path.name}.png"
        for path in files
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = [load_image(path) for path in chunk]
        found_all = detect(model, images, augment_cfg)
        for path, image, found in zip(chunk, images, found_all, strict=True):
            target = out_dir / targets[path]
            drawn = draw_detections(image, detection_dicts(found, class_names), min_score=min_score)
            drawn.save(target)
            written.append(target)
    return written
