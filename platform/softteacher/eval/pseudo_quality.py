"""How good the teacher's pseudo boxes are, measured against the hidden ground truth (Fig. 3).

The paper's Figure 3 shows why Soft Teacher works: (a) the foreground precision/recall of
the pseudo boxes at several score thresholds, (b) box IoU against the foreground score and
(c) against the box-jitter variance. Here the same figures are measured live, on a fixed
sample of the unlabeled fold: its file keeps the annotations that training never reads.

Boxes are matched to the ground truth class-agnostically ("foreground", as in Fig. 3):
the question is whether the teacher found an object, not whether it named it.
Precision with no box above a threshold is NaN, not 1.0: a collapsed teacher that
proposes nothing must not look perfectly precise (MLflow skips NaN metrics).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.ops import box_iou

from softteacher.config import AugmentConfig, MethodConfig
from softteacher.data.coco import CocoDataset
from softteacher.data.images import load_image
from softteacher.eval.inference import boxes_to_original, device_of, prepare_input
from softteacher.model.pseudo_labels import teacher_view

THRESHOLDS: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95)
PREFIX = "pseudo_quality"
# The jitter draws of a measurement come from their own seeded generator state, so every
# evaluation sees the same jitter (curves over steps compare like with like) and the
# training's random stream is left where it was.
MEASURE_SEED = 0

GroundTruth = tuple[np.ndarray, np.ndarray]  # (N,4) xyxy boxes, (N,) labels


@dataclass(frozen=True)
class CandidateBoxes:
    """One image's teacher candidates (score > candidate_thr) in ORIGINAL image pixels.

    ``variances`` is the jitter variance of each box (Eq. 7-9), NaN where not measured.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    variances: np.ndarray

    def __post_init__(self) -> None:
        n = len(np.asarray(self.boxes).reshape(-1, 4))
        lengths = {len(self.labels), len(self.scores), len(self.variances)}
        if lengths != {n}:
            raise ValueError(
                f"CandidateBoxes: {n} boxes but labels/scores/variances have lengths "
                f"{len(self.labels)}/{len(self.scores)}/{len(self.variances)}; give one a box"
            )


def _ious(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """(N, M) IoU of xyxy boxes (torchvision's ``box_iou``, in float64)."""
    a = torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    b = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4))
    return box_iou(a, b).numpy()


def match_to_ground_truth(cand: CandidateBoxes, gt_boxes: np.ndarray) -> np.ndarray:
    """Per candidate, its IoU with the ground-truth box it overlaps most (0 with no GT).

    Class-agnostic, and without one-to-one matching: the x axis of Fig. 3b/3c.
    """
    ious = _ious(cand.boxes, gt_boxes)
    if ious.shape[1] == 0:
        return np.zeros(ious.shape[0])
    return ious.max(axis=1)


def _true_positives(
    boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray, iou_thr: float
) -> int:
    """Greedy matching by descending score: a box is a true positive when the not-yet-matched
    ground truth it overlaps most has IoU >= ``iou_thr``; a second box on a taken GT is not."""
    ious = _ious(boxes, gt_boxes)
    if ious.size == 0:
        return 0
    taken = np.zeros(ious.shape[1], dtype=bool)
    hits = 0
    for index in np.argsort(-np.asarray(scores), kind="stable"):
        free = np.where(taken, -1.0, ious[index])
        best = int(np.argmax(free))
        if free[best] >= iou_thr:
            taken[best] = True
            hits += 1
    return hits


def precision_recall(
    cands: Sequence[CandidateBoxes],
    gts: Sequence[GroundTruth],
    threshold: float,
    iou_thr: float = 0.5,
) -> tuple[float, float]:
    """Foreground precision and recall of the boxes with score > ``threshold`` (Fig. 3a).

    Pooled over the images: precision = TP / boxes kept, recall = TP / all GT boxes.
    NaN precision when no box is kept, NaN recall when there is no GT box.
    """
    if len(cands) != len(gts):
        raise ValueError(f"{len(cands)} candidate sets but {len(gts)} ground truths; one an image")
    kept_total = hits = gt_total = 0
    for cand, (gt_boxes, _) in zip(cands, gts, strict=True):
        keep = np.asarray(cand.scores) > threshold
        boxes = np.asarray(cand.boxes).reshape(-1, 4)[keep]
        kept_total += len(boxes)
        gt_total += len(np.asarray(gt_boxes).reshape(-1, 4))
        hits += _true_positives(boxes, np.asarray(cand.scores)[keep], gt_boxes, iou_thr)
    precision = hits / kept_total if kept_total else math.nan
    recall = hits / gt_total if gt_total else math.nan
    return precision, recall


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN with fewer than two points or a constant variable."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def box_samples(cands: Sequence[CandidateBoxes], gts: Sequence[GroundTruth]) -> list[dict]:
    """One ``{"iou", "score", "variance"}`` a candidate, for the scatter plots of Fig. 3b/3c.

    JSON-ready: a variance that was not measured is ``None`` (JSON has no NaN).
    """
    samples = []
    for cand, (gt_boxes, _) in zip(cands, gts, strict=True):
        ious = match_to_ground_truth(cand, gt_boxes)
        for iou, score, variance in zip(ious, cand.scores, cand.variances, strict=True):
            samples.append({
                "iou": float(iou),
                "score": float(score),
                "variance": float(variance) if math.isfinite(variance) else None,
            })
    return samples


def quality_metrics(
    cands: Sequence[CandidateBoxes], gts: Sequence[GroundTruth], cls_thr: float
) -> dict[str, float]:
    """The live Figure 3 as MLflow metrics, all under ``pseudo_quality/``:

    ``precision_<t>`` / ``recall_<t>`` for t in THRESHOLDS and ``precision_fg`` / ``recall_fg``
    at the run's foreground threshold; ``iou_score_corr`` (Fig. 3b, every candidate) and
    ``iou_variance_corr`` (Fig. 3c, candidates with a measured variance; negative when the
    variance is a good reliability signal); ``boxes_per_image`` (candidates) and
    ``gt_per_image``, to read the recall against.
    """
    metrics: dict[str, float] = {}
    for threshold in THRESHOLDS:
        precision, recall = precision_recall(cands, gts, threshold)
        metrics[f"{PREFIX}/precision_{threshold:g}"] = precision
        metrics[f"{PREFIX}/recall_{threshold:g}"] = recall
    precision, recall = precision_recall(cands, gts, cls_thr)
    metrics[f"{PREFIX}/precision_fg"] = precision
    metrics[f"{PREFIX}/recall_fg"] = recall

    samples = box_samples(cands, gts)
    ious = np.array([s["iou"] for s in samples])
    scores = np.array([s["score"] for s in samples])
    measured = [s for s in samples if s["variance"] is not None]
    metrics[f"{PREFIX}/iou_score_corr"] = _pearson(ious, scores)
    metrics[f"{PREFIX}/iou_variance_corr"] = _pearson(
        np.array([s["iou"] for s in measured]), np.array([s["variance"] for s in measured])
    )
    n_images = max(len(cands), 1)
    metrics[f"{PREFIX}/boxes_per_image"] = len(samples) / n_images
    metrics[f"{PREFIX}/gt_per_image"] = (
        sum(len(np.asarray(b).reshape(-1, 4)) for b, _ in gts) / n_images
    )
    return metrics


@torch.no_grad()
def measure_pseudo_labels(
    teacher: FasterRCNN,
    dataset: CocoDataset,
    method_cfg: MethodConfig,
    augment_cfg: AugmentConfig,
    *,
    max_images: int = 64,
    batch_size: int = 4,
) -> tuple[dict[str, float], list[dict]]:
    """``quality_metrics`` and ``box_samples`` of the teacher's candidates on the first
    ``max_images`` records of ``dataset`` (the unlabeled fold, annotations kept).

    The teacher sees the deterministic test view (no random resize, no flip), so the sample
    is the same at every evaluation; the jitter variance is always measured (the method is
    run as ``soft_teacher_jitter``) so that Fig. 3c exists for every method. The foreground
    threshold is the run's ``cls_thr``. The teacher's train/eval mode and the global torch
    random state are restored afterwards: safe to call between training steps.
    """
    cfg = dataclasses.replace(method_cfg, method="soft_teacher_jitter")
    records = list(dataset.records[:max_images])
    device = device_of(teacher)
    cands: list[CandidateBoxes] = []
    was_training = teacher.training
    forked = [device.index or 0] if device.type == "cuda" else []
    teacher.eval()
    try:
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(MEASURE_SEED)
            for start in range(0, len(records), batch_size):
                chunk = records[start : start + batch_size]
                inputs = [
                    prepare_input(
                        load_image(dataset.image_path(r), (r.width, r.height)), augment_cfg, device
                    )
                    for r in chunk
                ]
                view = teacher_view(teacher, inputs, cfg)
                for record, image, boxes, labels, scores, variances in zip(
                    chunk, inputs, view.boxes, view.labels, view.scores, view.variances,
                    strict=True,
                ):
                    original = (record.height, record.width)
                    cands.append(CandidateBoxes(
                        boxes=boxes_to_original(boxes, image.shape[1:], original),
                        labels=labels.cpu().numpy(),
                        scores=scores.cpu().numpy().astype(np.float64),
                        variances=variances.cpu().numpy().astype(np.float64),
                    ))
    finally:
        teacher.train(was_training)
    gts = [(record.boxes, record.labels) for record in records]
    return quality_metrics(cands, gts, method_cfg.cls_thr), box_samples(cands, gts)
