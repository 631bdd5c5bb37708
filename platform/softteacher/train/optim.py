"""SGD with linear warm-up and step decay, the schedule of the paper and of MMDetection."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from softteacher.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up from ``warmup_factor``, then
    ``decay_gamma`` once per milestone passed."""
    decay = cfg.decay_gamma ** bisect.bisect_right(sorted(cfg.decay_steps), step)
    if step >= cfg.warmup_steps:
        return decay
    alpha = step / cfg.warmup_steps
    return decay * (cfg.warmup_factor * (1.0 - alpha) + alpha)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
