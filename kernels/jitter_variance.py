"""Box jittering and its localisation reliability (paper Eq. 7-9)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

VarianceNorm = Literal["paper", "original"]


def jitter_boxes(
    boxes: Tensor, n_jitter: int, scale: float, generator: torch.Generator | None = None
) -> Tensor:
    """``jitter(b)`` of Eq. 7: ``(n_jitter, N, 4)`` copies of ``(N, 4)`` xyxy boxes, each
    coordinate moved by a normal offset with std ``scale`` times the box width (x) or height (y).
    """
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    spread = torch.stack([widths, heights, widths, heights], dim=1) * scale
    noise = torch.randn(
        (n_jitter, *boxes.shape), generator=generator, dtype=boxes.dtype, device=boxes.device
    )
    return boxes.unsqueeze(0) + noise * spread.unsqueeze(0)


def clip_to_image(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """xyxy boxes (any leading shape) clipped to an image of ``(height, width)``."""
    height, width = image_size
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def box_jitter_variance(
    refined: Tensor, boxes: Tensor, image_size: tuple[int, int], norm: VarianceNorm = "paper"
) -> Tensor:
    """Mean normalised std of the refined jittered boxes, ``sigma_bar`` of Eq. 8-9.

    ``refined`` is ``(n_jitter, N, 4)``, ``boxes`` the ``(N, 4)`` candidates, ``image_size``
    the ``(height, width)`` of the view they were refined in. The refined boxes are clipped to
    that image first, as both references decode the refinement of Eq. 7 with the image shape:
    a coordinate pushed past the border is not spread. Eq. 9 divides every coordinate's std
    (unbiased, over the jitters) by ``0.5 * (h + w)`` of the candidate (``norm="paper"``); the
    authors' code divides x-stds by ``w`` and y-stds by ``h`` (``norm="original"``). A small
    value means a reliable box for the regression loss.
    """
    if refined.shape[0] < 2:
        raise ValueError("box_jitter_variance needs at least 2 jittered copies (n_jitter >= 2)")
    sigma = clip_to_image(refined, image_size).std(dim=0)
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
    if norm == "paper":
        scale = (0.5 * (heights + widths)).unsqueeze(1).expand(-1, 4)
    else:
        scale = torch.stack([widths, heights, widths, heights], dim=1)
    return (sigma / scale).mean(dim=1)


def refined_jitter_variance(
    deltas: Tensor,
    jittered: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    norm: VarianceNorm = "paper",
    weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
    bbox_xform_clip: float = math.log(1000.0 / 16),
) -> Tensor:
    """``box_jitter_variance`` of the jittered copies refined by their regression deltas:
    ``refine`` of Eq. 7 (torchvision's ``BoxCoder`` decode, ``weights`` and
    ``bbox_xform_clip`` those of the detector's ROI head, torchvision's defaults here), then
    Eq. 8-9. ``deltas`` are each candidate's own class's, ``(n_jitter, N, 4)`` as
    ``jittered``. The reference of the fused kernel (``triton_jitter_variance``); the same
    numbers as the method's CPU path, which decodes every class and picks afterwards.
    """
    if len(boxes) == 0:  # as the method's CPU path: no std of nothing (torch warns)
        return boxes.new_zeros(0)
    coder = BoxCoder(weights, bbox_xform_clip)
    refined = coder.decode_single(deltas.reshape(-1, 4), jittered.reshape(-1, 4))
    return box_jitter_variance(refined.reshape(deltas.shape), boxes, image_size, norm)
