"""Eq. 7-9's jitter variance as one fused Triton kernel, for CUDA tensors.

The reference decodes the refined boxes (torchvision's ``BoxCoder``, some twenty
element-wise launches), clips them, takes the std over the jitters, normalises and averages,
each a launch of its own. Here one program holds every jittered copy of a block of
candidates in registers and does all of it: decode (as ``BoxCoder.decode_single``, with the
detector's weights and ``bbox_xform_clip``), clip to the image, unbiased std over the
jitters (two passes: mean, then squared deviations), divide by the normaliser and average
the four coordinates. Computed in float32; the variances are float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from softteacher.kernels.jitter_variance import VarianceNorm

_BLOCK_N = 32  # candidates a program; the method keeps at most ~100 an image


@triton.jit
def _clipped_std(values, limit, valid, n_jitter):
    """Unbiased std over axis 0 (the jitters) of a ``(BLOCK_J, BLOCK_N)`` tile of coordinates
    first clipped to ``[0, limit]`` (the image's width or height)."""
    values = tl.minimum(tl.maximum(values, 0.0), limit)
    mean = tl.sum(tl.where(valid, values, 0.0), axis=0) / n_jitter
    deviation = tl.where(valid, values - mean[None, :], 0.0)
    return tl.sqrt(tl.sum(deviation * deviation, axis=0) / (n_jitter - 1))


@triton.jit
def _jitter_variance_kernel(
    deltas_ptr,
    jittered_ptr,
    boxes_ptr,
    out_ptr,
    n_boxes,
    n_jitter,
    height,
    width,
    wx,
    wy,
    ww,
    wh,
    clip,
    PAPER: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    box = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    jitter = tl.arange(0, BLOCK_J)
    box_ok = box < n_boxes
    valid = (jitter[:, None] < n_jitter) & box_ok[None, :]
    at = (jitter[:, None] * n_boxes + box[None, :]) * 4  # (n_jitter, N, 4), contiguous

    # refine: BoxCoder.decode_single, operation for operation
    x1 = tl.load(jittered_ptr + at + 0, mask=valid, other=0.0).to(tl.float32)
    y1 = tl.load(jittered_ptr + at + 1, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(jittered_ptr + at + 2, mask=valid, other=0.0).to(tl.float32)
    y2 = tl.load(jittered_ptr + at + 3, mask=valid, other=0.0).to(tl.float32)
    dx = tl.load(deltas_ptr + at + 0, mask=valid, other=0.0).to(tl.float32) / wx
    dy = tl.load(deltas_ptr + at + 1, mask=valid, other=0.0).to(tl.float32) / wy
    dw = tl.load(deltas_ptr + at + 2, mask=valid, other=0.0).to(tl.float32) / ww
    dh = tl.load(deltas_ptr + at + 3, mask=valid, other=0.0).to(tl.float32) / wh
    dw = tl.minimum(dw, clip)
    dh = tl.minimum(dh, clip)
    widths = x2 - x1
    heights = y2 - y1
    ctr_x = x1 + 0.5 * widths
    ctr_y = y1 + 0.5 * heights
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = 0.5 * (tl.exp(dw) * widths)
    half_h = 0.5 * (tl.exp(dh) * heights)

    # clip to the image, then the spread of each coordinate over the jitters
    sx1 = _clipped_std(pred_ctr_x - half_w, width, valid, n_jitter)
    sy1 = _clipped_std(pred_ctr_y - half_h, height, valid, n_jitter)
    sx2 = _clipped_std(pred_ctr_x + half_w, width, valid, n_jitter)
    sy2 = _clipped_std(pred_ctr_y + half_h, height, valid, n_jitter)

    # Eq. 9's normaliser, of the candidate box
    bx1 = tl.load(boxes_ptr + box * 4 + 0, mask=box_ok, other=0.0).to(tl.float32)
    by1 = tl.load(boxes_ptr + box * 4 + 1, mask=box_ok, other=0.0).to(tl.float32)
    bx2 = tl.load(boxes_ptr + box * 4 + 2, mask=box_ok, other=0.0).to(tl.float32)
    by2 = tl.load(boxes_ptr + box * 4 + 3, mask=box_ok, other=0.0).to(tl.float32)
    box_w = tl.maximum(bx2 - bx1, 1e-6)
    box_h = tl.maximum(by2 - by1, 1e-6)
    if PAPER:
        scale = 0.5 * (box_h + box_w)
        variance = (sx1 / scale + sy1 / scale + sx2 / scale + sy2 / scale) / 4.0
    else:
        variance = (sx1 / box_w + sy1 / box_h + sx2 / box_w + sy2 / box_h) / 4.0
    tl.store(out_ptr + box, variance, mask=box_ok)


def fused_jitter_variance(
    deltas: Tensor,
    jittered: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    norm: VarianceNorm = "paper",
    weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
    bbox_xform_clip: float = math.log(1000.0 / 16),
) -> Tensor:
    """``refined_jitter_variance`` (decode, then Eq. 8-9) in one kernel: ``deltas`` the
    ``(n_jitter, N, 4)`` regressions of each candidate's own class on its ``jittered`` copies
    ``(n_jitter, N, 4)``, ``boxes`` the ``(N, 4)`` candidates, ``image_size`` ``(height,
    width)``, ``weights`` and ``bbox_xform_clip`` those of the detector's box coder."""
    n_jitter, n_boxes = deltas.shape[:2]
    if n_jitter < 2:
        raise ValueError("box_jitter_variance needs at least 2 jittered copies (n_jitter >= 2)")
    if deltas.shape != (n_jitter, n_boxes, 4) or jittered.shape != deltas.shape:
        raise ValueError(
            f"deltas {tuple(deltas.shape)} and jittered {tuple(jittered.shape)} must both be "
            "(n_jitter, N, 4): pick each candidate's own class's deltas first"
        )
    if boxes.shape != (n_boxes, 4):
        raise ValueError(f"boxes {tuple(boxes.shape)} must be ({n_boxes}, 4), one a candidate")
    if norm not in ("paper", "original"):
        raise ValueError(f"unknown variance norm {norm!r}; use 'paper' or 'original'")
    out = torch.empty(n_boxes, dtype=torch.float32, device=deltas.device)
    if n_boxes == 0:
        return out
    height, width = image_size
    wx, wy, ww, wh = (float(w) for w in weights)
    _jitter_variance_kernel[(triton.cdiv(n_boxes, _BLOCK_N),)](
        deltas.contiguous(), jittered.contiguous(), boxes.contiguous(), out,
        n_boxes, n_jitter, float(height), float(width), wx, wy, ww, wh, float(bbox_xform_clip),
        PAPER=norm == "paper", BLOCK_J=triton.next_power_of_2(n_jitter), BLOCK_N=_BLOCK_N,
    )  # fmt: skip
    return out
