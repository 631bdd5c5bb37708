"""Where a training step's time goes: ``torch.profiler`` over a few steps, read back by the
ranges the trainer marks (``names.STEP_PARTS``), each part's time without its nested parts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

from softteacher.names import NESTED_STEP_PARTS, STEP_PARTS

OTHER = "other"  # the step's time outside every marked part: batch to device, logging figures


@dataclass(frozen=True)
class StepProfile:
    """Milliseconds a step per part (nested parts taken out of their parent), the profiled
    step's wall time, and the operators that took the most time of their own."""

    step_ms: float
    part_ms: dict[str, float]
    top_ops: list[tuple[str, float]] = field(default_factory=list)

    def shares(self) -> dict[str, float]:
        """Each part's share of the step; ``other`` is what no part covers."""
        shares = {name: ms / self.step_ms for name, ms in self.part_ms.items()}
        shares[OTHER] = max(0.0, 1.0 - sum(shares.values()))
        return shares


def profile_steps(step: Callable[[], object], steps: int, *, top: int = 10) -> StepProfile:
    """Run ``step`` ``steps`` times under the profiler (CPU, and CUDA when present).

    The parts are timed on the host: on CUDA a range ends when its kernels are launched, not
    done, so run with ``CUDA_LAUNCH_BLOCKING=1`` for GPU shares."""
    activities = [ProfilerActivity.CPU]
    cuda = torch.cuda.is_available()
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    averages = {event.key: event for event in prof.key_averages()}
    inclusive = {
        name: averages[name].cpu_time_total / 1000 / steps
        for name in STEP_PARTS
        if name in averages
    }
    part_ms = dict(inclusive)
    for child, parent in NESTED_STEP_PARTS.items():
        if child in part_ms and parent in part_ms:
            part_ms[parent] -= part_ms[child]
    marked = set(STEP_PARTS)
    ops = sorted(
        (e for e in averages.values() if e.key not in marked),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    top_ops = [(e.key, e.self_cpu_time_total / 1000 / steps) for e in ops[:top]]
    return StepProfile(wall * 1000 / steps, part_ms, top_ops)
