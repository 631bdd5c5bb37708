"""The teacher: an exponential moving average of the student (notes, step 8)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from softteacher.config import MethodConfig


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of the student, in eval mode: it never receives gradients."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def ema_momentum(step: int, cfg: MethodConfig) -> float:
    """Momentum ``m`` for the update after ``step`` (0-based).

    ``e2e`` has no EMA (the teacher is the current student, ``m = 0``); during burn-in the
    teacher also follows the student exactly. After it, the authors' ramp
    ``min(m, 1 - 1 / (t + 1))`` (``t`` counted from the end of burn-in) lets an early teacher
    follow the student closely.
    """
    if not cfg.uses_ema or step < cfg.burn_in_steps:
        return 0.0
    if not cfg.ema_ramp:
        return cfg.ema_momentum
    t = step - cfg.burn_in_steps
    return min(cfg.ema_momentum, 1.0 - 1.0 / (t + 1))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = m * teacher + (1 - m) * student`` over parameters; buffers (BatchNorm's
    running statistics) are copied, so the eval-mode teacher normalises like the student."""
    for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
        t_param.mul_(momentum).add_(s_param.detach(), alpha=1.0 - momentum)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers(), strict=True):
        t_buf.copy_(s_buf)


def same_weights(teacher: nn.Module, student: nn.Module) -> bool:
    """Whether the teacher is the student weight for weight (every parameter and buffer on
    the same device, of the same dtype and equal): what ``ema_update`` makes of it while the
    momentum is 0, during burn-in and throughout E2E."""
    mine = [*teacher.parameters(), *teacher.buffers()]
    theirs = [*student.parameters(), *student.buffers()]
    return len(mine) == len(theirs) and all(
        t.device == s.device and t.dtype == s.dtype and torch.equal(t, s)
        for t, s in zip(mine, theirs, strict=True)
    )
