"""Load and validate a COCO-format detection file into ``ImageRecord``s.

Every problem a user can fix is reported as one ``CocoFormatError`` line that names the
file, what is wrong and the fix. Boxes that are merely bad (empty or outside their image)
are clipped or dropped, counted, and summarised in one warning: real files such as COCO
train2017 contain a few, and failing on them would make the file unusable.

Only what training needs is kept (no raw JSON): COCO train2017 is about 450 MB of JSON.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from softteacher.data.samples import ImageRecord

BadBoxPolicy = Literal["clip", "drop", "error"]
REQUIRED_KEYS = ("images", "annotations", "categories")
IMAGE_KEYS = ("id", "file_name", "width", "height")
# Clipping a box by less than this (float noise in real files) is not worth a warning.
_CLIP_TOLERANCE = 1e-3


class CocoFormatError(ValueError):
    """A COCO annotation file that cannot be used as it is."""


@dataclass(frozen=True)
class CocoDataset:
    """A validated COCO file: categories, contiguous labels and one record an image."""

    ann_file: Path
    image_root: Path | None
    categories: list[dict]
    cat_id_to_label: dict[int, int]
    label_to_cat_id: dict[int, int]
    records: list[ImageRecord]
    clipped_boxes: int = 0
    dropped_boxes: int = 0
    crowd_boxes: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def image_ids(self) -> list[int]:
        return [record.image_id for record in self.records]

    def image_path(self, record: ImageRecord) -> Path:
        if self.image_root is None:
            raise CocoFormatError(
                f"{self.ann_file}: no image folder known; pass image_root= to load_coco"
            )
        return self.image_root / record.file_name


@dataclass(frozen=True)
class CocoSummary:
    """A COCO file's image count and validated categories, without building its records:
    what the checks before a sweep need (the detector's class count comes from it)."""

    ann_file: Path
    num_images: int
    categories: list[dict]

    @property
    def num_classes(self) -> int:
        return len(self.categories)


def coco_summary(ann_file: Path) -> CocoSummary:
    """The image count and the categories of ``ann_file`` (``.num_classes``: their number)."""
    ann_file = Path(ann_file)
    content = read_coco_json(ann_file)
    categories = _validated_categories(ann_file, content["categories"])
    return CocoSummary(ann_file, len(content["images"]), categories)


def read_coco_json(ann_file: Path) -> dict:
    """The file's JSON, checked to be an object with ``images``, ``annotations``, ``categories``."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise CocoFormatError(
            f"{ann_file}: annotation file not found; check the path "
            "(or create it with experiments/make_synthetic.py or experiments/prepare_folds.py)"
        )
    try:
        with ann_file.open("rb") as handle:
            content = json.load(handle)
    except json.JSONDecodeError as err:
        raise CocoFormatError(
            f"{ann_file}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "re-download or regenerate the file"
        ) from None
    except UnicodeDecodeError:
        raise CocoFormatError(
            f"{ann_file}: not UTF-8 text; re-download or regenerate the file"
        ) from None
    if not isinstance(content, dict):
        raise CocoFormatError(
            f"{ann_file}: top level is a {type(content).__name__}, not a JSON object; "
            "give a COCO instances file"
        )
    missing = [key for key in REQUIRED_KEYS if not isinstance(content.get(key), list)]
    if missing:
        raise CocoFormatError(
            f"{ann_file}: missing or non-list top-level keys {missing}; a COCO instances file "
            f"needs lists {list(REQUIRED_KEYS)}"
        )
    return content


def load_coco(
    ann_file: Path,
    image_root: Path | None = None,
    *,
    on_bad_box: BadBoxPolicy = "clip",
) -> CocoDataset:
    """Read ``ann_file`` into validated records with contiguous labels ``1..K``.

    ``on_bad_box``: ``clip`` clips boxes to their image and drops the ones left empty,
    ``drop`` drops every box that is empty or leaves its image, ``error`` raises on the
    first. Crowd boxes (``iscrowd=1``) are never training targets, as in COCO's own
    evaluation: they are skipped and counted (``crowd_boxes``). An image without
    annotations is kept, with no boxes.
    """
    if on_bad_box not in ("clip", "drop", "error"):
        raise ValueError(f"on_bad_box={on_bad_box!r}; choose 'clip', 'drop' or 'error'")
    ann_file = Path(ann_file)
    content = read_coco_json(ann_file)
    cats = _validated_categories(ann_file, content["categories"])
    cat_id_to_label = {cat["id"]: label for label, cat in enumerate(cats, start=1)}
    images = _validated_images(ann_file, content["images"])

    slots, labels, boxes, crowd = _gather_annotations(
        ann_file, content["annotations"], {image_id: i for i, image_id in enumerate(images)},
        cat_id_to_label,
    )
    sizes = np.array([(image["width"], image["height"]) for image in images.values()], float)
    xyxy, keep, clipped = _apply_box_policy(boxes, sizes[slots].reshape(-1, 2), on_bad_box)
    if on_bad_box == "error" and not keep.all():
        first = int(np.flatnonzero(~keep)[0])
        raise CocoFormatError(
            f"{ann_file}: box {boxes[first].tolist()} (image id {list(images)[slots[first]]}) is "
            "empty or leaves its image; fix it or load with on_bad_box='clip' or 'drop'"
        )
    records = _records(list(images.values()), slots[keep], xyxy[keep], labels[keep])
    counts = {"clipped": int(clipped.sum()), "dropped": int((~keep).sum()), "crowd": crowd}
    if counts["clipped"] or counts["dropped"]:
        warnings.warn(
            f"{ann_file}: {counts['clipped']} boxes clipped to their image, "
            f"{counts['dropped']} empty or out-of-image boxes dropped (on_bad_box={on_bad_box!r}), "
            f"{counts['crowd']} crowd boxes skipped",
            stacklevel=2,
        )
    if content["annotations"] and not keep.any():
        # an unlabeled file has no annotations at all; a labeled one left without a box
        # would teach its images as all background
        warnings.warn(
            f"{ann_file}: none of its {len(content['annotations'])} annotations is a training "
            f"box ({counts['crowd']} crowd, {counts['dropped']} empty or out of their image); "
            "its images would teach only background: check the file",
            stacklevel=2,
        )
    return CocoDataset(
        ann_file=ann_file,
        image_root=None if image_root is None else Path(image_root),
        categories=cats,
        cat_id_to_label=cat_id_to_label,
        label_to_cat_id={label: cat_id for cat_id, label in cat_id_to_label.items()},
        records=records,
        clipped_boxes=counts["clipped"],
        dropped_boxes=counts["dropped"],
        crowd_boxes=counts["crowd"],
    )


def check_same_categories(
    first: CocoDataset | CocoSummary, second: CocoDataset | CocoSummary
) -> None:
    """Fail when two files disagree on categories (ids and names).

    A known trap of the reference code: an unlabeled set whose classes differ from the
    labeled set's silently gives zero unsupervised loss; a val file's, a wrong score.
    """
    left = [(c["id"], c["name"]) for c in first.categories]
    right = [(c["id"], c["name"]) for c in second.categories]
    if left == right:
        return
    only_left = sorted(set(left) - set(right))[:5]
    only_right = sorted(set(right) - set(left))[:5]
    raise CocoFormatError(
        f"{second.ann_file}: categories differ from {first.ann_file} "
        f"(only in {first.ann_file.name}: {only_left}, only in {second.ann_file.name}: "
        f"{only_right}); every file of a run must list the same categories: take them from one "
        "dataset release and build the folds from it (experiments/prepare_folds.py)"
    )


class ClassCountError(ValueError):
    """A detector with fewer classes than its dataset has categories."""


def check_detector_classes(dataset: CocoDataset | CocoSummary, num_classes: int) -> None:
    """Fail before training when a detector of ``num_classes`` cannot hold ``dataset``'s
    labels (1..K, one a category): torch would stop at the first loss with ``IndexError:
    Target K is out of bounds``, naming neither the file nor the setting. (More classes than
    categories trains; the sweep commands set the count from a ``--coco-root`` themselves.)"""
    if dataset.num_classes > num_classes:
        raise ClassCountError(
            f"{dataset.ann_file}: {dataset.num_classes} categories, and the detector has "
            f"{num_classes} classes; set detector.num_classes={dataset.num_classes} (--set "
            f"detector.num_classes={dataset.num_classes})"
        )


def _validated_categories(ann_file: Path, raw: list) -> list[dict]:
    seen: set[int] = set()
    for index, cat in enumerate(raw):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or "name" not in cat:
            raise CocoFormatError(
                f"{ann_file}: category {index} needs an integer 'id' and a 'name' (got {cat!r}); "
                "fix the 'categories' list"
            )
        if cat["id"] in seen:
            raise CocoFormatError(
                f"{ann_file}: category id {cat['id']} appears twice; give each category its own id"
            )
        seen.add(cat["id"])
    if not raw:
        raise CocoFormatError(f"{ann_file}: 'categories' is empty; list the classes to detect")
    return sorted((dict(cat) for cat in raw), key=lambda cat: cat["id"])


def _validated_images(ann_file: Path, raw: list) -> dict[int, dict]:
    """``image id -> image`` in file order, each with an id, a file name and a positive size."""
    images: dict[int, dict] = {}
    for index, image in enumerate(raw):
        if not isinstance(image, dict) or any(key not in image for key in IMAGE_KEYS):
            missing = IMAGE_KEYS if not isinstance(image, dict) else [
                key for key in IMAGE_KEYS if key not in image
            ]
            raise CocoFormatError(
                f"{ann_file}: image {index} lacks {list(missing)}; every image needs "
                f"{list(IMAGE_KEYS)}"
            )
        # Some tools write sizes as 640.0: accept whole numbers, store ints.
        ok_size = all(
            _is_number(image[k]) and image[k] > 0 and float(image[k]).is_integer()
            for k in ("width", "height")
        )
        if not _is_int(image["id"]) or not ok_size:
            raise CocoFormatError(
                f"{ann_file}: image {index} needs an integer id and a positive whole width and "
                f"height (got id={image['id']!r}, width={image['width']!r}, "
                f"height={image['height']!r}); fix that image"
            )
        if image["id"] in images:
            raise CocoFormatError(
                f"{ann_file}: image id {image['id']} appears twice (image {index}); "
                "give each image its own id"
            )
        images[image["id"]] = {
            "id": image["id"], "file_name": image["file_name"],
            "width": int(image["width"]), "height": int(image["height"]),
        }
    return images


def _gather_annotations(
    ann_file: Path, raw: list, slot_of_image: dict[int, int], cat_id_to_label: dict[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Image slots, labels and ``x, y, w, h`` boxes of the non-crowd annotations; crowd count.

    The loop is kept lean (COCO train2017 has 860k annotations): one try block on the happy
    path, and ``_annotation_error`` works out what was wrong only when something was.
    """
    slots: list[int] = []
    labels: list[int] = []
    boxes: list[list] = []
    ids: list[object] = []
    crowd = 0
    isfinite = math.isfinite
    for index, ann in enumerate(raw):
        try:
            slot = slot_of_image[ann["image_id"]]
            label = cat_id_to_label[ann["category_id"]]
            box = ann["bbox"]
            x, y, w, h = box
            well_formed = (
                type(box) is list
                and isfinite(x) and isfinite(y) and isfinite(w) and isfinite(h)
                and bool not in (type(x), type(y), type(w), type(h))
            )
        except (KeyError, TypeError, ValueError):
            well_formed = False
        if not well_formed:
            raise _annotation_error(ann_file, index, ann, slot_of_image, cat_id_to_label)
        ids.append(ann.get("id"))
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        slots.append(slot)
        labels.append(label)
        boxes.append(box)
    if not all(map(_is_int, ids)) or len(set(ids)) != len(ids):
        raise _annotation_id_error(ann_file, ids)
    return (
        np.asarray(slots, dtype=np.int64),
        np.asarray(labels, dtype=np.int64),
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        crowd,
    )


def _annotation_error(
    ann_file: Path, index: int, ann: object, slot_of_image: dict, cat_id_to_label: dict
) -> CocoFormatError:
    """Say precisely what is wrong with an annotation the fast path rejected."""
    where = f"{ann_file}: annotation {index}"
    if not isinstance(ann, dict):
        return CocoFormatError(f"{where} is a {type(ann).__name__}, not an object; fix it")
    where += f" (id {ann.get('id')})"
    image_id, category_id, box = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
    if not _is_int(image_id) or image_id not in slot_of_image:
        return CocoFormatError(
            f"{where} points to unknown image id {image_id!r}; remove it or add the image to "
            "'images'"
        )
    if not _is_int(category_id) or category_id not in cat_id_to_label:
        return CocoFormatError(
            f"{where} has unknown category id {category_id!r}; known ids are "
            f"{sorted(cat_id_to_label)}: fix it or add the category to 'categories'"
        )
    return CocoFormatError(
        f"{where} has malformed bbox {box!r}; it must be [x, y, width, height] of 4 finite "
        "numbers"
    )


def _annotation_id_error(ann_file: Path, ids: list[object]) -> CocoFormatError:
    """pycocotools indexes annotations by id: a repeated one is silently overwritten, and
    the file scores wrongly."""
    seen: dict[object, int] = {}
    for index, ann_id in enumerate(ids):
        if not _is_int(ann_id):
            return CocoFormatError(
                f"{ann_file}: annotation {index} needs an integer 'id' (got {ann_id!r}); give "
                "every annotation its own id (pycocotools indexes them by id)"
            )
        if ann_id in seen:
            return CocoFormatError(
                f"{ann_file}: annotation id {ann_id!r} appears twice (annotations {seen[ann_id]} "
                f"and {index}); give each annotation its own id, or pycocotools scores wrongly"
            )
        seen[ann_id] = index
    raise AssertionError("called without a missing or repeated id")


def _apply_box_policy(
    boxes: np.ndarray, sizes: np.ndarray, policy: BadBoxPolicy
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x1, y1, x2, y2`` boxes after the policy, which to keep, and which were clipped.

    A box is bad when it is empty (w or h <= 0) or leaves its image by more than float
    noise. ``clip`` keeps a bad box clipped to the image unless that leaves it empty;
    ``drop`` (and ``error``) keep no bad box.
    """
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    limits = np.concatenate([sizes, sizes], axis=1)
    inside = np.clip(xyxy, 0.0, limits)
    moved = np.abs(inside - xyxy).max(axis=1, initial=0.0)
    bad = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (moved > _CLIP_TOLERANCE)
    non_empty = (inside[:, 2] > inside[:, 0]) & (inside[:, 3] > inside[:, 1])
    keep = ~bad | (non_empty if policy == "clip" else np.zeros_like(bad))
    return inside, keep, bad & keep


def _records(
    images: list[dict], slots: np.ndarray, xyxy: np.ndarray, labels: np.ndarray
) -> list[ImageRecord]:
    """One record an image (file order), annotations in file order within each image."""
    order = np.argsort(slots, kind="stable")
    bounds = np.searchsorted(slots[order], np.arange(len(images) + 1))
    boxes = xyxy[order].astype(np.float32)
    labels = labels[order]
    return [
        ImageRecord(
            image_id=image["id"],
            file_name=image["file_name"],
            width=image["width"],
            height=image["height"],
            boxes=boxes[bounds[i] : bounds[i + 1]],
            labels=labels[bounds[i] : bounds[i + 1]],
        )
        for i, image in enumerate(images)
    ]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
