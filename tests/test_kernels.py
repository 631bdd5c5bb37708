"""Eq. 4-9 against hand-computed cases."""

import math

import pytest
import torch

from softteacher.kernels import (
    background_reliability,
    box_jitter_variance,
    clip_to_image,
    jitter_boxes,
    reliability_weighted_ce,
)

LARGE = (10_000, 10_000)  # an image no refined box reaches the border of


def test_jitter_variance_matches_hand_computation():
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # w = 20, h = 40, 0.5 (h + w) = 30
    offsets = torch.tensor([-1.0, 1.0, 3.0])  # unbiased std = 2
    refined = box.unsqueeze(0) + torch.stack(
        [offsets * 1.0, offsets * 2.0, offsets * 3.0, offsets * 4.0], dim=1
    ).unsqueeze(1)
    # sigma_k = 2, 4, 6, 8 -> normalised by 30 -> mean = 20 / 4 / 30
    assert box_jitter_variance(refined, box, LARGE).item() == pytest.approx(5.0 / 30.0)
    # the authors' variant: x-stds by w (20), y-stds by h (40)
    expected = (2 / 20 + 4 / 40 + 6 / 20 + 8 / 40) / 4
    got = box_jitter_variance(refined, box, LARGE, norm="original")
    assert got.item() == pytest.approx(expected)


def test_jitter_variance_is_taken_on_boxes_clipped_to_the_image():
    """A candidate at the right border of a 100 x 100 image: x2 refined to 99, 101, 103."""
    box = torch.tensor([[80.0, 20.0, 100.0, 60.0]])  # w = 20, h = 40, 0.5 (h + w) = 30
    refined = box.repeat(3, 1, 1)
    refined[:, 0, 2] = torch.tensor([99.0, 101.0, 103.0])
    # unclipped: std(99, 101, 103) = 2 on x2 only -> 2 / 30 / 4
    assert box_jitter_variance(refined, box, LARGE).item() == pytest.approx(2.0 / 30.0 / 4)
    # clipped to x <= 100: (99, 100, 100), deviations -2/3, 1/3, 1/3 -> std sqrt(1/3)
    clipped = box_jitter_variance(refined, box, (100, 100))
    assert clipped.item() == pytest.approx(math.sqrt(1 / 3) / 30.0 / 4)


def test_clip_to_image_clips_x_by_width_and_y_by_height():
    boxes = torch.tensor([[[-5.0, -2.0, 70.0, 45.0]], [[3.0, 4.0, 5.0, 6.0]]])
    clipped = clip_to_image(boxes, (40, 60))  # (height, width)
    torch.testing.assert_close(
        clipped, torch.tensor([[[0.0, 0.0, 60.0, 40.0]], [[3.0, 4.0, 5.0, 6.0]]])
    )


def test_jitter_spread_follows_box_size():
    boxes = torch.tensor([[0.0, 0.0, 100.0, 10.0]])
    generator = torch.Generator().manual_seed(0)
    jittered = jitter_boxes(boxes, 4000, 0.06, generator)
    std = jittered.std(dim=0)[0]
    assert std[0].item() == pytest.approx(6.0, rel=0.1)  # 0.06 * width
    assert std[1].item() == pytest.approx(0.6, rel=0.1)  # 0.06 * height


def test_jitter_variance_separates_stable_and_unstable_boxes():
    boxes = torch.tensor([[0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 50.0, 50.0]])
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn((10, 2, 4), generator=generator)
    refined = boxes + noise * torch.tensor([0.2, 5.0]).view(1, 2, 1)
    variance = box_jitter_variance(refined, boxes, LARGE)
    assert variance[0] < 0.02 < variance[1]


def _ce(logits, label):
    return -math.log(math.exp(logits[label]) / sum(math.exp(v) for v in logits))


LOGITS = [[0.2, 1.5, -0.3], [1.0, 0.1, 0.4], [0.3, 0.3, 2.0]]
LABELS = [1, 0, 0]
RELIABILITY = [0.7, 0.2, 0.8]


def test_soft_weighted_ce_joint_normalisation():
    ce = [_ce(lg, lb) for lg, lb in zip(LOGITS, LABELS)]
    weights = [1.0, 0.2, 0.8]  # the foreground box keeps weight 1
    expected = sum(w * c for w, c in zip(weights, ce)) / max(sum(weights), 1.0)
    got = reliability_weighted_ce(
        torch.tensor(LOGITS), torch.tensor(LABELS), torch.tensor(RELIABILITY), "joint"
    )
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_soft_weighted_ce_paper_normalisation():
    ce = [_ce(lg, lb) for lg, lb in zip(LOGITS, LABELS)]
    expected = ce[0] / 1 + (0.2 * ce[1] + 0.8 * ce[2]) / (0.2 + 0.8)  # Eq. 4 with Eq. 5
    got = reliability_weighted_ce(
        torch.tensor(LOGITS), torch.tensor(LABELS), torch.tensor(RELIABILITY), "paper"
    )
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_uniform_reliability_is_plain_cross_entropy():
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    got = reliability_weighted_ce(logits, labels, torch.ones(3), "joint")
    assert got.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


@pytest.mark.parametrize(
    ("indicator", "expected"),
    [
        ("bg_teacher", [0.9, 0.3]),
        ("bg_student", [0.5, 0.6]),
        ("pred_diff", [1 - 0.4, 1 - 0.3]),  # Eq. 6
        ("iou", [0.1, 0.4]),
        ("reverse_iou", [0.9, 0.6]),
        ("none", [1.0, 1.0]),
    ],
)
def test_background_reliability_indicators(indicator, expected):
    r = background_reliability(
        indicator,
        teacher_bg=torch.tensor([0.9, 0.3]),
        student_bg=torch.tensor([0.5, 0.6]),
        max_iou=torch.tensor([0.1, 0.4]),
    )
    assert r.tolist() == pytest.approx(expected)


def test_unknown_indicator_is_rejected():
    with pytest.raises(ValueError, match="unknown reliability indicator"):
        background_reliability(
            "bg_oracle", teacher_bg=torch.ones(1), student_bg=torch.ones(1), max_iou=torch.ones(1)
        )
