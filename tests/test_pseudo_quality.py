"""Pseudo-label quality (Fig. 3): hand-made precision/recall and correlations, then the live
measurement on a real slim detector over the synthetic unlabeled fold."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from softteacher.data.protocol import synthetic_folds
from softteacher.eval import pseudo_quality
from softteacher.eval.pseudo_quality import (
    THRESHOLDS,
    CandidateBoxes,
    box_samples,
    match_to_ground_truth,
    measure_pseudo_labels,
    precision_recall,
    quality_metrics,
)
from softteacher.model.detector import build_detector
from softteacher.model.pseudo_labels import TeacherView
from softteacher.presets import preset

NAN = float("nan")


def _cands(boxes, scores, variances=None) -> CandidateBoxes:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return CandidateBoxes(
        boxes=boxes,
        labels=np.ones(len(boxes), dtype=np.int64),
        scores=np.asarray(scores, dtype=np.float64),
        variances=np.full(len(boxes), NAN) if variances is None else np.asarray(variances, float),
    )


def _gt(boxes) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return boxes, np.ones(len(boxes), dtype=np.int64)


# Image 1: GT A and B; image 2: GT C. Candidates (IoU with their best GT, score):
#   exact A (1.0, 0.95), duplicate on A (0.9, 0.92), half of B (0.5, 0.6); a miss (0.0, 0.8).
HAND_CANDS = [
    _cands([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 25]], [0.95, 0.92, 0.6]),
    _cands([[40, 40, 50, 50]], [0.8]),
]
HAND_GTS = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]]), _gt([[0, 0, 20, 20]])]


def test_ious_with_the_best_ground_truth_are_class_agnostic():
    np.testing.assert_allclose(match_to_ground_truth(HAND_CANDS[0], HAND_GTS[0][0]), [1, 0.9, 0.5])
    np.testing.assert_allclose(match_to_ground_truth(HAND_CANDS[1], HAND_GTS[1][0]), [0.0])
    assert match_to_ground_truth(HAND_CANDS[1], np.zeros((0, 4))).tolist() == [0.0]


@pytest.mark.parametrize(
    ("threshold", "precision", "recall"),
    [
        (0.5, 2 / 4, 2 / 3),  # all four: exact A and half-B hit, the duplicate and the miss do not
        (0.7, 1 / 3, 1 / 3),  # half-B (0.6) drops out
        (0.9, 1 / 2, 1 / 3),  # exact A and its duplicate: the duplicate is a false positive
        (0.95, NAN, 0.0),  # score > threshold is strict: nothing passes, precision undefined
    ],
)
def test_hand_made_precision_and_recall(threshold, precision, recall):
    got_precision, got_recall = precision_recall(HAND_CANDS, HAND_GTS, threshold)
    if math.isnan(precision):
        assert math.isnan(got_precision)
    else:
        assert got_precision == pytest.approx(precision)
    assert got_recall == pytest.approx(recall)


def test_greedy_matching_goes_by_score_to_the_best_free_ground_truth():
    # The wide box overlaps G1 (IoU 0.83) more than G2 (0.57). The exact G1 box scores higher
    # and takes G1 first, so the wide box still hits G2: two true positives.
    gts = [_gt([[0, 0, 10, 10], [4, 0, 14, 10]])]
    wide = [0, 0, 12, 10]
    first_exact = [_cands([[0, 0, 10, 10], wide], [0.9, 0.8])]
    assert match_to_ground_truth(first_exact[0], gts[0][0])[1] == pytest.approx(10 / 12)
    assert precision_recall(first_exact, gts, 0.5) == pytest.approx((1.0, 1.0))
    # With the wide box first it takes G1 (its best); the exact box's only GT is gone.
    wide_first = [_cands([[0, 0, 10, 10], wide], [0.8, 0.9])]
    assert precision_recall(wide_first, gts, 0.5) == pytest.approx((0.5, 0.5))
    # An IoU bar of 0.7 turns the wide box's hit on G2 (IoU 8/14) into a false positive.
    assert precision_recall(first_exact, gts, 0.5, iou_thr=0.7) == pytest.approx((0.5, 0.5))


def test_no_ground_truth_gives_nan_recall_and_zero_precision():
    assert precision_recall([_cands([[0, 0, 5, 5]], [0.9])], [_gt([])], 0.5)[0] == 0.0
    assert math.isnan(precision_recall([_cands([[0, 0, 5, 5]], [0.9])], [_gt([])], 0.5)[1])
    with pytest.raises(ValueError, match="one an image"):
        precision_recall(HAND_CANDS, HAND_GTS[:1], 0.5)


def test_correlations_follow_the_constructed_trend_and_skip_unmeasured_variances():
    gt = [0, 0, 20, 20]
    shifts = np.arange(8.0)
    boxes = [[s, 0, 20 + s, 20] for s in shifts]  # IoU falls as the box slides off the GT
    scores = 0.99 - 0.05 * shifts  # the teacher is surer of the better boxes
    variances = 0.01 + 0.01 * shifts  # and their jitter spreads less
    # Two boxes whose variance was not measured, with IoUs that would break the trend.
    boxes += [[0, 0, 20, 20], [100, 100, 120, 120]]
    scores = np.concatenate([scores, [0.55, 0.99]])
    variances = np.concatenate([variances, [NAN, NAN]])
    cands, gts = [_cands(boxes, scores, variances)], [_gt([gt])]
    metrics = quality_metrics(cands, gts, cls_thr=0.9)
    assert metrics["pseudo_quality/iou_variance_corr"] < -0.95  # computed without them
    trend_only = quality_metrics([_cands(boxes[:8], scores[:8], variances[:8])], gts, 0.9)
    assert trend_only["pseudo_quality/iou_score_corr"] > 0.9
    # the score correlation does use every candidate: the two outliers weaken it
    weakened = metrics["pseudo_quality/iou_score_corr"]
    assert weakened < trend_only["pseudo_quality/iou_score_corr"] - 0.3
    assert trend_only["pseudo_quality/iou_variance_corr"] == pytest.approx(
        metrics["pseudo_quality/iou_variance_corr"]
    )
    # Fewer than two measured variances: undefined, not a number.
    unmeasured = quality_metrics(HAND_CANDS, HAND_GTS, 0.9)
    assert math.isnan(unmeasured["pseudo_quality/iou_variance_corr"])


def test_quality_metrics_keys_and_counts():
    metrics = quality_metrics(HAND_CANDS, HAND_GTS, cls_thr=0.7)
    expected = {
        f"pseudo_quality/{kind}_{t:g}" for t in THRESHOLDS for kind in ("precision", "recall")
    } | {
        f"pseudo_quality/{name}"
        for name in ("precision_fg", "recall_fg", "iou_score_corr", "iou_variance_corr",
                     "boxes_per_image", "gt_per_image")
    }
    assert set(metrics) == expected
    assert "pseudo_quality/precision_0.95" in metrics  # the key MLflow shows
    assert metrics["pseudo_quality/precision_fg"] == pytest.approx(1 / 3)  # the 0.7 row
    assert metrics["pseudo_quality/boxes_per_image"] == 2.0
    assert metrics["pseudo_quality/gt_per_image"] == 1.5


def test_box_samples_are_json_ready():
    cands = [_cands([[0, 0, 10, 10], [0, 0, 10, 5]], [0.9, 0.7], [0.01, NAN])]
    samples = box_samples(cands, [_gt([[0, 0, 10, 10]])])
    assert samples == [
        {"iou": 1.0, "score": 0.9, "variance": 0.01},
        {"iou": 0.5, "score": 0.7, "variance": None},
    ]
    assert json.loads(json.dumps(samples, allow_nan=False)) == samples


# --------------------------------------------------------------------------- on the model


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    cfg = preset("smoke")
    fold = synthetic_folds(tmp_path_factory.mktemp("data"), cfg.synthetic, [10], [1])[0]
    _, unlabeled, _ = fold.load()
    return unlabeled


def _confident_teacher() -> torch.nn.Module:
    """A slim detector whose ROI head calls every proposal class 1 (score ~0.98-0.99, varied by
    small random weights so that scores correlate with something) and regresses nothing."""
    torch.manual_seed(0)
    teacher = build_detector(preset("smoke").detector).eval()
    predictor = teacher.roi_heads.box_predictor
    with torch.no_grad():
        predictor.cls_score.weight.normal_(0.0, 0.05)
        predictor.cls_score.bias.zero_()
        predictor.cls_score.bias[1] = 6.0
        predictor.bbox_pred.weight.zero_()
        predictor.bbox_pred.bias.zero_()
    return teacher


def test_measure_on_a_real_detector(unlabeled):
    cfg = preset("smoke")
    teacher = _confident_teacher().train()  # the mode must come back as it was
    rng_before = torch.get_rng_state()
    method = dataclasses.replace(cfg.method, method="e2e")  # no jitter in training: measured anyway
    metrics, samples = measure_pseudo_labels(teacher, unlabeled, method, cfg.augment, max_images=4)
    assert teacher.training
    assert torch.equal(torch.get_rng_state(), rng_before)  # training's random stream untouched
    assert all(key.startswith("pseudo_quality/") for key in metrics)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["pseudo_quality/boxes_per_image"] > 0
    assert len(samples) == metrics["pseudo_quality/boxes_per_image"] * 4
    assert all(set(s) == {"iou", "score", "variance"} for s in samples)
    assert all(0.0 <= s["iou"] <= 1.0 and s["score"] > 0.5 and s["variance"] > 0 for s in samples)
    again, _ = measure_pseudo_labels(teacher, unlabeled, method, cfg.augment, max_images=4)
    assert again == metrics  # a fixed sample with fixed jitter: comparable across steps


def test_measure_maps_boxes_back_to_original_pixels(unlabeled, monkeypatch):
    """A teacher that returns each image's ground truth in its test view must score precision
    and recall 1: the right records, in order, scaled back axis by axis."""
    records = iter(unlabeled.records)
    seen_methods = []

    def oracle_view(teacher, images, cfg):
        seen_methods.append(cfg.method)
        boxes = []
        for image in images:
            record = next(records)
            height, width = image.shape[1:]
            scale = torch.tensor([width / record.width, height / record.height] * 2)
            boxes.append(torch.as_tensor(record.boxes) * scale)
        return TeacherView(
            features={}, image_sizes=[tuple(i.shape[1:]) for i in images], boxes=boxes,
            labels=[torch.ones(len(b), dtype=torch.int64) for b in boxes],
            scores=[torch.full((len(b),), 0.99) for b in boxes],
            variances=[torch.full((len(b),), 0.01) for b in boxes],
        )

    monkeypatch.setattr(pseudo_quality, "teacher_view", oracle_view)
    cfg = preset("smoke")
    metrics, samples = measure_pseudo_labels(
        _confident_teacher(), unlabeled, cfg.method, cfg.augment, max_images=6
    )
    assert seen_methods == ["soft_teacher_jitter", "soft_teacher_jitter"]  # batches of 4 + 2
    for t in (*THRESHOLDS, "fg"):
        key = t if t == "fg" else f"{t:g}"
        assert metrics[f"pseudo_quality/precision_{key}"] == pytest.approx(1.0)
        assert metrics[f"pseudo_quality/recall_{key}"] == pytest.approx(1.0)
    assert metrics["pseudo_quality/boxes_per_image"] == metrics["pseudo_quality/gt_per_image"]
    assert min(s["iou"] for s in samples) > 0.999
