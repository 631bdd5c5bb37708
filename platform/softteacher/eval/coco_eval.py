"""The official COCO box metric (pycocotools) of a torchvision-style detector.

The detector never resizes by itself (images reach it at their final size), so ``predict``
resizes each image with the test transform and maps boxes back to the original pixels and
labels back to COCO category ids before pycocotools sees them. The ground truth is always
the annotation file itself (crowd regions and areas as COCO defines them), read per call.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import TYPE_CHECKING

import torch

from softteacher.config import AugmentConfig
from softteacher.data.coco import CocoDataset
from softteacher.data.images import load_image
from softteacher.data.samples import ImageRecord
from softteacher.eval.inference import Detections, detect
from softteacher.names import COCO_METRICS

if TYPE_CHECKING:
    from pycocotools.coco import COCO


class DetectionMismatchError(ValueError):
    """Detections that do not belong to the dataset they are scored against."""


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: CocoDataset,
    cfg: AugmentConfig,
    *,
    max_images: int | None = None,
    batch_size: int = 4,
) -> list[dict]:
    """COCO-format detections ``{image_id, category_id, bbox: [x, y, w, h], score}``.

    ``model(list of CHW float tensors in [0, 1])`` returns ``{boxes, labels, scores}`` per
    image in the input's pixels. The first ``max_images`` records are used when given. The
    model's train/eval mode is restored afterwards, so it is safe to call mid-training.
    """
    records = _first_records(dataset, max_images)
    detections: list[dict] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [load_image(dataset.image_path(r), (r.width, r.height)) for r in chunk]
        for record, found in zip(chunk, detect(model, images, cfg, batch_size=batch_size)):
            detections.extend(_to_coco(record, found, dataset))
    return detections


def coco_metrics(
    dataset: CocoDataset, detections: list[dict], image_ids: list[int] | None = None
) -> dict[str, float]:
    """COCOeval (bbox) on the dataset's annotation file, restricted to ``image_ids``.

    Returns ``COCO_METRICS`` -> percent (0-100); all of the dataset's records by default.
    A metric pycocotools leaves undefined (-1: no ground truth in that size range among the
    images) is NaN rather than a number that would average in as a score.
    """
    # imported where it scores: training and its benchmarks run without pycocotools (the
    # GPU check's machine has torch and Triton but not it: scripts/gpu_check.sh)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = [r.image_id for r in dataset.records] if image_ids is None else list(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(dataset.ann_file))
        _check_image_ids(detections, ground_truth, dataset)
        results = ground_truth.loadRes(detections) if detections else _no_results(ground_truth)
        evaluator = COCOeval(ground_truth, results, iouType="bbox")
        evaluator.params.imgIds = sorted(ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[: len(COCO_METRICS)]
    return {name: _percent(value) for name, value in zip(COCO_METRICS, stats, strict=True)}


def evaluate(
    model: torch.nn.Module,
    dataset: CocoDataset,
    cfg: AugmentConfig,
    *,
    max_images: int | None = None,
    batch_size: int = 4,
) -> dict[str, float]:
    """``coco_metrics`` of ``predict`` on the same (first ``max_images``) images."""
    detections = predict(model, dataset, cfg, max_images=max_images, batch_size=batch_size)
    image_ids = [r.image_id for r in _first_records(dataset, max_images)]
    return coco_metrics(dataset, detections, image_ids)


def _first_records(dataset: CocoDataset, max_images: int | None) -> list[ImageRecord]:
    records = list(dataset.records)
    return records if max_images is None else records[:max_images]


def _to_coco(record: ImageRecord, found: Detections, dataset: CocoDataset) -> list[dict]:
    """One image's detections (already in its own pixels) with COCO category ids."""
    boxes, labels, scores = found.boxes, found.labels.tolist(), found.scores.tolist()
    detections = []
    for (x1, y1, x2, y2), label, score in zip(boxes.tolist(), labels, scores, strict=True):
        if label not in dataset.label_to_cat_id:
            raise DetectionMismatchError(
                f"the model predicted label {label} but {dataset.ann_file} has labels "
                f"1..{dataset.num_classes}; set detector.num_classes to {dataset.num_classes}"
            )
        detections.append({
            "image_id": record.image_id,
            "category_id": dataset.label_to_cat_id[label],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(score),
        })
    return detections


def _check_image_ids(detections: list[dict], ground_truth: COCO, dataset: CocoDataset) -> None:
    """pycocotools only asserts this; say which ids and which file instead."""
    unknown = {d["image_id"] for d in detections} - set(ground_truth.getImgIds())
    if unknown:
        raise DetectionMismatchError(
            f"detections for image ids {sorted(unknown)[:5]} not in {dataset.ann_file}; "
            "score detections against the annotation file they were predicted from"
        )


def _no_results(ground_truth: COCO) -> COCO:
    """An empty result set: ``loadRes([])`` raises, but COCOeval scores an empty one as 0."""
    from pycocotools.coco import COCO

    results = COCO()
    results.dataset = {
        "images": list(ground_truth.dataset["images"]),
        "categories": list(ground_truth.dataset.get("categories", [])),
        "annotations": [],
    }
    results.createIndex()
    return results


def _percent(value: float) -> float:
    return math.nan if value < 0 else 100.0 * float(value)
