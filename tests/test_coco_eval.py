"""COCO evaluation: a detector that returns the ground truth, seen through the test resize,
must score AP 100 once boxes are scaled back and labels mapped back to category ids."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from softteacher.config import AugmentConfig
from softteacher.data.coco import CocoDataset, load_coco
from softteacher.eval.coco_eval import (
    COCO_METRICS,
    DetectionMismatchError,
    coco_metrics,
    evaluate,
    predict,
)

# Non-contiguous category ids: an identity label mapping would score far below 100.
CATEGORY_IDS = (3, 7, 12)
# (width, height, [(category_id, x, y, w, h), ...]); areas span small (<32^2),
# medium and large (>96^2) so that every metric is defined on the first image.
IMAGES = (
    (200, 150, [(3, 10, 12, 20, 18), (7, 60, 30, 50, 40), (12, 70, 40, 120, 100)]),
    (180, 240, [(12, 5, 8, 25, 20), (3, 90, 120, 60, 70)]),
    (160, 130, [(7, 30, 30, 40, 35), (7, 100, 70, 22, 26)]),
)
# Short side 96: each image is shrunk by a different, non-trivial factor.
AUGMENT = AugmentConfig(test_size=96, max_size=400)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CocoDataset:
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, (width, height, objects) in enumerate(IMAGES, start=1):
        file_name = f"img_{image_id}.png"
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for category_id, x, y, w, h in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })
    categories = [{"id": c, "name": f"class_{c}"} for c in CATEGORY_IDS]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}
    ))
    return load_coco(ann_file, root)


class GroundTruthDetector(torch.nn.Module):
    """Returns each image's ground truth scaled into the view it receives.

    Images arrive in the dataset's order; the scale is read from the view's own size, so
    the test does not reuse the code under test to compute it.
    """

    def __init__(self, dataset: CocoDataset, shift_by_half_width: bool = False,
                 empty: bool = False) -> None:
        super().__init__()
        self.records = list(dataset.records)
        self.shift_by_half_width = shift_by_half_width
        self.empty = empty
        self.calls_in_training_mode: list[bool] = []
        self.view_sizes: list[tuple[int, int]] = []
        self.next_index = 0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.calls_in_training_mode.append(self.training)
        outputs = []
        for image in images:
            record = self.records[self.next_index]
            self.next_index += 1
            assert image.dtype == torch.float32 and image.shape[0] == 3
            assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
            height, width = image.shape[1:]
            self.view_sizes.append((width, height))
            boxes = torch.as_tensor(record.boxes, dtype=torch.float32).clone()
            if self.shift_by_half_width:
                boxes[:, 0::2] += 0.5 * (boxes[:, 2:3] - boxes[:, 0:1])
            boxes *= torch.tensor([width / record.width, height / record.height] * 2)
            labels = torch.as_tensor(record.labels, dtype=torch.int64)
            if self.empty:
                boxes, labels = boxes[:0], labels[:0]
            outputs.append({"boxes": boxes, "labels": labels,
                            "scores": torch.ones(len(labels))})
        return outputs


def test_ground_truth_scores_100_after_resize_and_label_mapping(dataset: CocoDataset) -> None:
    model = GroundTruthDetector(dataset)
    metrics = evaluate(model, dataset, AUGMENT, batch_size=2)
    assert tuple(metrics) == COCO_METRICS
    for name in COCO_METRICS:
        assert metrics[name] == pytest.approx(100.0, abs=1e-6), name
    # The model saw resized views, not the originals.
    originals = [(r.width, r.height) for r in dataset.records]
    assert len(model.view_sizes) == len(originals)
    assert all(max(view) < max(original)
               for view, original in zip(model.view_sizes, originals, strict=True))


def test_detections_are_in_original_pixels_and_category_ids(dataset: CocoDataset) -> None:
    detections = predict(GroundTruthDetector(dataset), dataset, AUGMENT, batch_size=3)
    first = [d for d in detections if d["image_id"] == 1]
    assert sorted(d["category_id"] for d in first) == sorted(o[0] for o in IMAGES[0][2])
    expected = sorted(o[1:] for o in IMAGES[0][2])
    actual = sorted(tuple(d["bbox"]) for d in first)
    np.testing.assert_allclose(actual, expected, atol=1.0)


def test_shifted_boxes_score_far_lower(dataset: CocoDataset) -> None:
    metrics = evaluate(GroundTruthDetector(dataset, shift_by_half_width=True), dataset, AUGMENT)
    assert metrics["AP"] < 10.0
    assert metrics["AP50"] < 10.0


def test_no_detections_score_zero(dataset: CocoDataset) -> None:
    assert coco_metrics(dataset, []) == dict.fromkeys(COCO_METRICS, 0.0)
    metrics = evaluate(GroundTruthDetector(dataset, empty=True), dataset, AUGMENT)
    assert metrics == dict.fromkeys(COCO_METRICS, 0.0)


def test_max_images_restricts_prediction_and_scoring(dataset: CocoDataset) -> None:
    model = GroundTruthDetector(dataset)
    detections = predict(model, dataset, AUGMENT, max_images=2, batch_size=1)
    assert {d["image_id"] for d in detections} == {1, 2}
    assert model.next_index == 2
    # Scored on all images, the third image's objects are misses.
    assert coco_metrics(dataset, detections)["AP"] < 90.0
    assert coco_metrics(dataset, detections, image_ids=[1, 2])["AP"] == pytest.approx(100.0)


def test_size_range_without_ground_truth_is_nan(dataset: CocoDataset) -> None:
    detections = predict(GroundTruthDetector(dataset), dataset, AUGMENT)
    metrics = coco_metrics(dataset, detections, image_ids=[3])
    assert math.isnan(metrics["APl"])
    assert metrics["AP"] == pytest.approx(100.0)


def test_predict_runs_in_eval_mode_and_restores_training(dataset: CocoDataset) -> None:
    model = GroundTruthDetector(dataset).train()
    predict(model, dataset, AUGMENT, batch_size=2)
    assert model.calls_in_training_mode == [False, False]
    assert model.training
    eval_model = GroundTruthDetector(dataset).eval()
    predict(eval_model, dataset, AUGMENT)
    assert not eval_model.training


def test_pycocotools_prints_are_silenced(dataset: CocoDataset,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    evaluate(GroundTruthDetector(dataset), dataset, AUGMENT)
    assert capsys.readouterr().out == ""


def test_label_outside_the_dataset_is_a_clear_error(dataset: CocoDataset) -> None:
    class WrongClassCount(torch.nn.Module):
        def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            return [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]),
                     "labels": torch.tensor([dataset.num_classes + 1]),
                     "scores": torch.tensor([0.9])} for _ in images]

    with pytest.raises(DetectionMismatchError, match="num_classes"):
        predict(WrongClassCount(), dataset, AUGMENT, max_images=1)


def test_detections_of_another_file_are_a_clear_error(dataset: CocoDataset) -> None:
    stranger = {"image_id": 999, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0}
    with pytest.raises(DetectionMismatchError, match=r"999.*instances\.json"):
        coco_metrics(dataset, [stranger])

