"""The soft teacher's reliability-weighted classification loss (paper Eq. 4-6)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

SoftWeightNorm = Literal["joint", "paper"]


def background_reliability(
    indicator: str,
    *,
    teacher_bg: Tensor,
    student_bg: Tensor,
    max_iou: Tensor,
) -> Tensor:
    """Reliability ``r`` that a box assigned to background really is background (Sec. 3.2).

    ``bg_teacher`` (BG-T, the paper's choice): the teacher's background probability on the
    weak view; ``bg_student`` (BG-S); ``pred_diff``: Eq. 6, ``1 - |p_S - p_T|``; ``iou``: the
    box's best IoU with a pseudo box (hard-negative hypothesis); ``reverse_iou``: one minus it;
    ``none``: every background box alike (hard pseudo-labels).
    """
    if indicator == "bg_teacher":
        r = teacher_bg
    elif indicator == "bg_student":
        r = student_bg
    elif indicator == "pred_diff":
        r = 1.0 - (student_bg - teacher_bg).abs()
    elif indicator == "iou":
        r = max_iou
    elif indicator == "reverse_iou":
        r = 1.0 - max_iou
    elif indicator == "none":
        r = torch.ones_like(teacher_bg)
    else:
        raise ValueError(f"unknown reliability indicator {indicator!r}")
    return r.detach()


def reliability_weighted_ce(
    class_logits: Tensor, labels: Tensor, reliability: Tensor, norm: SoftWeightNorm = "joint"
) -> Tensor:
    """Classification loss with background boxes weighted by their reliability (Eq. 4-5).

    Foreground boxes (``labels > 0``) keep weight 1; a background box's weight is its
    reliability. ``norm="paper"`` follows Eq. 4-5 literally: the mean CE over foreground plus
    the background CEs weighted by ``w_j = r_j / sum_k r_k``. ``norm="joint"`` (default, the
    authors' code): ``sum_i w_i CE_i / max(sum_i w_i, 1)`` over all sampled boxes, which equals
    the usual mean CE when every ``r`` is 1.
    """
    ce = F.cross_entropy(class_logits, labels, reduction="none")
    foreground = labels > 0
    weights = torch.where(foreground, torch.ones_like(reliability), reliability)
    if norm == "joint":
        return (weights * ce).sum() / weights.sum().clamp(min=1.0)
    if norm != "paper":
        raise ValueError(f"unknown soft-weight normalisation {norm!r}; use 'joint' or 'paper'")
    fg_loss = ce[foreground].sum() / foreground.sum().clamp(min=1)
    bg_r = reliability[~foreground]
    bg_loss = (bg_r * ce[~foreground]).sum() / bg_r.sum().clamp(min=1e-6)
    return fg_loss + bg_loss
