"""Eq. 4-5's reliability-weighted cross-entropy as fused Triton kernels, for CUDA tensors.

The reference (``soft_weights.reliability_weighted_ce``) runs a log-softmax, a gather, a
weighting and several reductions forward and as many again backward, each a kernel launch
over the sampled boxes. Here the forward is one pass over the rows (log-sum-exp, the CE at
the label, each program's partial sums) and one tiny launch that adds the partial sums and
normalises; the backward is one pass over the rows. Everything is computed in float32
whatever the logits' dtype; the loss is float32, the gradient has the logits' dtype.

Labels must lie in ``[0, num_classes)`` (the sampler's labels do): unlike ``F.cross_entropy``
the kernel does not check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from softteacher.kernels.soft_weights import SoftWeightNorm

# a program's tile: rows x classes (padded to a power of two) of about this many elements
_TILE_ELEMENTS = 4096
_MAX_ROWS_A_PROGRAM = 64
_PARTIALS = 4  # foreground CE sum, foreground count, background r * CE sum, background r sum
_FINISH_BLOCK = 128


@triton.jit
def _rows_forward(
    logits_ptr,
    labels_ptr,
    reliability_ptr,
    lse_ptr,
    partials_ptr,
    n_rows,
    n_classes,
    row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Each row's log-sum-exp (kept for the backward) and this program's partial sums."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_classes)
    x = tl.load(
        logits_ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=float("-inf")
    ).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)  # rows past the end stay finite
    row_max = tl.max(x, axis=1)
    lse = row_max + tl.log(tl.sum(tl.exp(x - row_max[:, None]), axis=1))
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    picked = tl.sum(tl.where(cols[None, :] == labels[:, None], x, 0.0), axis=1)
    ce = lse - picked
    r = tl.load(reliability_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    fg = row_ok & (labels > 0)
    bg = row_ok & (labels <= 0)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    out = partials_ptr + pid * 4
    tl.store(out + 0, tl.sum(tl.where(fg, ce, 0.0), axis=0))
    tl.store(out + 1, tl.sum(tl.where(fg, 1.0, 0.0), axis=0))
    tl.store(out + 2, tl.sum(tl.where(bg, r * ce, 0.0), axis=0))
    tl.store(out + 3, tl.sum(tl.where(bg, r, 0.0), axis=0))


@triton.jit
def _finish_forward(
    partials_ptr, n_parts, loss_ptr, denominators_ptr, PAPER: tl.constexpr, BLOCK: tl.constexpr
):
    """The partial sums added up: the loss, and the foreground and background denominators
    the backward divides by (``joint``: one, ``max(sum w, 1)``, for both)."""
    offsets = tl.arange(0, BLOCK)
    fg_ce = tl.zeros([BLOCK], dtype=tl.float32)
    fg_n = tl.zeros([BLOCK], dtype=tl.float32)
    bg_rce = tl.zeros([BLOCK], dtype=tl.float32)
    bg_r = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_parts, BLOCK):
        part = start + offsets
        ok = part < n_parts
        fg_ce += tl.load(partials_ptr + part * 4 + 0, mask=ok, other=0.0)
        fg_n += tl.load(partials_ptr + part * 4 + 1, mask=ok, other=0.0)
        bg_rce += tl.load(partials_ptr + part * 4 + 2, mask=ok, other=0.0)
        bg_r += tl.load(partials_ptr + part * 4 + 3, mask=ok, other=0.0)
    fg_ce_sum = tl.sum(fg_ce, axis=0)
    fg_n_sum = tl.sum(fg_n, axis=0)
    bg_rce_sum = tl.sum(bg_rce, axis=0)
    bg_r_sum = tl.sum(bg_r, axis=0)
    if PAPER:
        fg_den = tl.maximum(fg_n_sum, 1.0)
        bg_den = tl.maximum(bg_r_sum, 1e-6)
        loss = fg_ce_sum / fg_den + bg_rce_sum / bg_den
    else:
        fg_den = tl.maximum(fg_n_sum + bg_r_sum, 1.0)
        bg_den = fg_den
        loss = (fg_ce_sum + bg_rce_sum) / fg_den
    tl.store(loss_ptr, loss)
    tl.store(denominators_ptr + 0, fg_den)
    tl.store(denominators_ptr + 1, bg_den)


@triton.jit
def _rows_backward(
    logits_ptr,
    labels_ptr,
    reliability_ptr,
    lse_ptr,
    denominators_ptr,
    grad_loss_ptr,
    grad_ptr,
    n_rows,
    n_classes,
    row_stride,
    grad_row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """d loss / d logits = (softmax - onehot) * weight / denominator, one pass over the rows."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_classes)
    x = tl.load(logits_ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    r = tl.load(reliability_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    fg_den = tl.load(denominators_ptr + 0)
    bg_den = tl.load(denominators_ptr + 1)
    grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
    coef = tl.where(labels > 0, 1.0 / fg_den, r / bg_den) * grad_loss
    softmax = tl.exp(x.to(tl.float32) - lse[:, None])
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    grad = (softmax - onehot) * coef[:, None]
    tl.store(
        grad_ptr + rows[:, None] * grad_row_stride + cols[None, :],
        grad.to(grad_ptr.dtype.element_ty),
        mask=mask,
    )


def _blocks(n_classes: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(max(n_classes, 1))
    block_m = max(1, min(_MAX_ROWS_A_PROGRAM, _TILE_ELEMENTS // block_c))
    return block_m, block_c


class _ReliabilityWeightedCE(torch.autograd.Function):
    """The loss forward, its gradient for the logits backward (the reliability is detached
    in the method: it gets none)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, reliability: Tensor, paper: bool) -> Tensor:
        logits = logits.contiguous()
        labels = labels.contiguous()
        reliability = reliability.contiguous()
        n_rows, n_classes = logits.shape
        block_m, block_c = _blocks(n_classes)
        n_parts = triton.cdiv(n_rows, block_m)
        device = logits.device
        lse = torch.empty(n_rows, dtype=torch.float32, device=device)
        partials = torch.empty((n_parts, _PARTIALS), dtype=torch.float32, device=device)
        loss = torch.empty((), dtype=torch.float32, device=device)
        denominators = torch.empty(2, dtype=torch.float32, device=device)
        if n_rows > 0:
            _rows_forward[(n_parts,)](
                logits, labels, reliability, lse, partials, n_rows, n_classes,
                logits.stride(0), BLOCK_M=block_m, BLOCK_C=block_c,
            )  # fmt: skip
        _finish_forward[(1,)](
            partials, n_parts, loss, denominators, PAPER=paper, BLOCK=_FINISH_BLOCK
        )
        ctx.save_for_backward(logits, labels, reliability, lse, denominators)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, labels, reliability, lse, denominators = ctx.saved_tensors
        grad = torch.empty_like(logits)
        n_rows, n_classes = logits.shape
        if n_rows > 0:
            block_m, block_c = _blocks(n_classes)
            _rows_backward[(triton.cdiv(n_rows, block_m),)](
                logits, labels, reliability, lse, denominators,
                grad_loss.to(torch.float32).contiguous(), grad, n_rows, n_classes,
                logits.stride(0), grad.stride(0), BLOCK_M=block_m, BLOCK_C=block_c,
            )  # fmt: skip
        return grad, None, None, None


def fused_reliability_weighted_ce(
    class_logits: Tensor, labels: Tensor, reliability: Tensor, norm: SoftWeightNorm = "joint"
) -> Tensor:
    """``reliability_weighted_ce`` (Eq. 4-5, same ``norm`` choices) by the fused kernels:
    ``class_logits`` ``(N, K+1)`` of any float dtype, ``labels`` ``(N,)`` with 0 for
    background, ``reliability`` ``(N,)``; a float32 loss with gradients for the logits."""
    if norm not in ("joint", "paper"):
        raise ValueError(f"unknown soft-weight normalisation {norm!r}; use 'joint' or 'paper'")
    return _ReliabilityWeightedCE.apply(class_logits, labels, reliability, norm == "paper")
