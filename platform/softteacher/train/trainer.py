"""One run's student, teacher, optimiser and schedule, and the step that trains them.

Free of Ray: the Ray Train worker and the single-process runner call the same ``step``.
"""

from __future__ import annotations

import hashlib
import random
import sys
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn
from torch.profiler import record_function

from softteacher.config import ExperimentConfig
from softteacher.data.collate import DetectionBatch, UnlabeledBatch
from softteacher.model.detector import build_detector
from softteacher.model.ema import ema_momentum, ema_update, make_teacher
from softteacher.model.pseudo_labels import (
    pseudo_targets,
    teacher_background_prob,
    teacher_view,
)
from softteacher.model.soft_teacher import SUPERVISED_LOSSES, UNSUPERVISED_LOSSES, StudentLosses
from softteacher.names import (
    NONFINITE_STEPS,
    STEP_BACKWARD,
    STEP_EMA,
    STEP_OPTIMIZER,
    STEP_PSEUDO_TARGETS,
    STEP_STUDENT_FORWARD,
    STEP_TEACHER_VIEW,
)
from softteacher.train.optim import build_optimizer, build_scheduler


class NonFiniteLossError(FloatingPointError):
    """Losses or gradients stayed NaN or infinite for ``train.max_nonfinite_in_a_row``
    steps; no update was applied, so the weights and every checkpoint are finite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one step on one worker: the RPN and RoI samplers and the box
    jitter draw from it, so a step's randomness depends on the step, not on what ran before
    (a resumed run draws what the uninterrupted run drew)."""
    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SoftTeacherTrainer:
    """Holds the state of one run; ``step`` is one iteration of the student / EMA-teacher loop.

    ``wrap_student`` lets the caller wrap the student's loss module (Ray Train's
    ``prepare_model`` for DDP); the teacher stays a local, unwrapped copy on every worker,
    updated from the synchronised student. ``rank`` (the worker's) seeds its steps.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        device: torch.device,
        wrap_student: Callable[[nn.Module], nn.Module] = lambda module: module,
        rank: int = 0,
    ) -> None:
        seed_everything(cfg.train.seed)
        self.cfg = cfg
        self.device = device
        self.rank = rank
        self.student = build_detector(cfg.detector).to(device)
        self.teacher = make_teacher(self.student)
        self.losses = wrap_student(StudentLosses(self.student, cfg.method))
        self.optimizer = build_optimizer(self.student, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.step_count = 0
        self.nonfinite_steps = 0  # skipped for a NaN or infinite loss or gradient, in all
        self._nonfinite_in_a_row = 0

    def unsup_weight(self, step: int) -> float:
        """``alpha`` of Eq. 1: zero during burn-in, then ramped linearly to ``unsup_weight``."""
        method = self.cfg.method
        if not method.uses_unlabeled or step < method.burn_in_steps:
            return 0.0
        if method.unsup_weight_ramp_steps <= 0:
            return method.unsup_weight
        progress = (step - method.burn_in_steps + 1) / method.unsup_weight_ramp_steps
        return method.unsup_weight * min(1.0, progress)

    def step(self, labeled: DetectionBatch, unlabeled: UnlabeledBatch | None) -> dict[str, float]:
        """One student update and one teacher update; returns the figures worth logging."""
        step = self.step_count
        torch.manual_seed(step_seed(self.cfg.train.seed, self.rank, step))
        alpha = self.unsup_weight(step)
        self.student.train()
        # BatchNorm statistics change in the forward: kept to undo on a skipped step
        statistics = [buffer.clone() for buffer in self.student.buffers()]
        metrics: dict[str, float] = {}
        if alpha > 0.0 and unlabeled is not None:
            with record_function(STEP_TEACHER_VIEW):
                view = teacher_view(self.teacher, unlabeled.weak, self.cfg.method)
            with record_function(STEP_PSEUDO_TARGETS):
                pseudo = pseudo_targets(view, unlabeled, self.cfg.method)
            scorer = partial(teacher_background_prob, self.teacher, view, unlabeled)
            with record_function(STEP_STUDENT_FORWARD):
                losses = self.losses(
                    labeled.images, labeled.targets, unlabeled.strong, pseudo, scorer
                )
            metrics.update(pseudo.counts_per_image())
            metrics["pseudo/candidates_per_image"] = sum(map(len, view.boxes)) / len(view.boxes)
        else:
            with record_function(STEP_STUDENT_FORWARD):
                losses = self.losses(labeled.images, labeled.targets)
        total = sum(losses[k] for k in SUPERVISED_LOSSES) + alpha * sum(
            (losses[k] for k in UNSUPERVISED_LOSSES if k in losses), torch.zeros(())
        )
        self.optimizer.zero_grad(set_to_none=True)
        # backward even for a non-finite loss: under DDP every worker must join the gradient
        # all-reduce, and the NaN it spreads makes every worker skip the same step
        with record_function(STEP_BACKWARD):
            total.backward()
        grad_norm = self._grad_norm()
        if bool(torch.isfinite(total.detach() + grad_norm)):  # one host sync for both
            with record_function(STEP_OPTIMIZER):
                if self.cfg.optim.grad_clip_norm is not None:
                    nn.utils.clip_grads_with_norm_(
                        self.student.parameters(), self.cfg.optim.grad_clip_norm, grad_norm
                    )
                self.optimizer.step()
            with record_function(STEP_EMA):
                ema_update(self.teacher, self.student, ema_momentum(step, self.cfg.method))
            self._nonfinite_in_a_row = 0
        else:
            with torch.no_grad():
                for buffer, saved in zip(self.student.buffers(), statistics, strict=True):
                    buffer.copy_(saved)
            self._skip_nonfinite(total, grad_norm, losses)
        with warnings.catch_warnings():  # a first step skipped steps the schedule before an update
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()  # the schedule follows the step count, skipped steps included
        self.step_count += 1
        metrics.update({f"loss/{k}": float(v.detach()) for k, v in losses.items()})
        metrics["loss/total"] = float(total.detach())
        metrics["unsup_weight"] = alpha
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics[NONFINITE_STEPS] = float(self.nonfinite_steps)
        return metrics

    def _grad_norm(self) -> Tensor:
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        return nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def _skip_nonfinite(self, total: Tensor, grad_norm: Tensor, losses: dict[str, Tensor]) -> None:
        """Count a step left without an update; stop the run after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        what = f"loss {float(total.detach()):.4g} ({parts}), gradient norm {float(grad_norm):.4g}"
        limit = self.cfg.train.max_nonfinite_in_a_row
        if self._nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {self.step_count}, {limit} step(s) in a "
                f"row ({what}); lower optim.lr (--set optim.lr=...) or raise "
                "optim.warmup_steps, or set optim.grad_clip_norm; resume from the last checkpoint"
            )
        print(
            f"step {self.step_count}: non-finite {what}; step skipped "
            f"({self._nonfinite_in_a_row} in a row, the run stops at {limit})",
            file=sys.stderr,
            flush=True,
        )

    def state_dict(self) -> dict:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step_count,
            "nonfinite_steps": self.nonfinite_steps,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
