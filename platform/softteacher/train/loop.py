"""The training loop's cadence: step, log, evaluate, checkpoint. The caller owns the I/O."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from softteacher.data.collate import DetectionBatch, UnlabeledBatch
from softteacher.names import DATA_SECONDS, EVAL_SECONDS, IMAGES_PER_S
from softteacher.train.trainer import SoftTeacherTrainer

Metrics = dict[str, float]


@dataclass
class LoopHooks:
    """Where the loop's results go: a print, MLflow, or ``ray.train.report``."""

    log: Callable[[int, Metrics], None]
    # None: the run is never scored (a benchmark's teacher, which needs no mAP)
    evaluate: Callable[[SoftTeacherTrainer], Metrics] | None
    checkpoint: Callable[[SoftTeacherTrainer, Metrics], None]


class StepSource(Protocol):
    """Where a step's images come from: Ray Data shards or in-process streams."""

    def labeled(self, images: int) -> DetectionBatch: ...

    def unlabeled(self, images: int) -> UnlabeledBatch: ...


def fit(trainer: SoftTeacherTrainer, source: StepSource, hooks: LoopHooks) -> Metrics:
    """Train from the trainer's current step to ``max_steps``; return the final evaluation
    (empty where ``hooks.evaluate`` is None).

    Each step asks ``source`` for what ``step_batch_sizes`` says the step takes: burn-in
    steps read labeled images only, and the unlabeled stream starts after them.

    Logged figures are means over the last ``log_every`` steps, with images/s over that
    window: data waiting included (the user pays for it), evaluation and checkpoints not.
    Where the time goes is logged too: ``data_s``, a step's seconds taking and collating
    its images (a run's first window holds the streams' start), and ``eval_s``, each
    evaluation's seconds.
    """
    cfg = trainer.cfg.train
    window: defaultdict[str, list[float]] = defaultdict(list)
    window_start, window_images = time.perf_counter(), 0
    evaluation: Metrics = {}
    while trainer.step_count < cfg.max_steps:
        n_labeled, n_unlabeled = trainer.cfg.step_batch_sizes(trainer.step_count)
        asked = time.perf_counter()
        labeled = source.labeled(n_labeled)
        unlabeled = source.unlabeled(n_unlabeled) if n_unlabeled else None
        window[DATA_SECONDS].append(time.perf_counter() - asked)
        for key, value in trainer.step(labeled, unlabeled).items():
            window[key].append(value)
        window_images += len(labeled.images) + (len(unlabeled.weak) if unlabeled else 0)
        step = trainer.step_count
        last = step == cfg.max_steps
        if step % cfg.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            summary = {key: sum(values) / len(values) for key, values in window.items()}
            summary[IMAGES_PER_S] = window_images / max(elapsed, 1e-9)
            hooks.log(step, summary)
            window.clear()
            window_start, window_images = time.perf_counter(), 0
        paused = time.perf_counter()
        if hooks.evaluate is not None and (step % cfg.eval_every == 0 or last):
            evaluation = hooks.evaluate(trainer)
            hooks.log(step, evaluation | {EVAL_SECONDS: time.perf_counter() - paused})
        # the end of burn-in too: the branch point of semi-supervised runs (train.branch_from)
        if step % cfg.ckpt_every == 0 or last or step == trainer.cfg.method.burn_in_steps:
            hooks.checkpoint(trainer, evaluation)
        window_start += time.perf_counter() - paused  # images/s counts training time only
    return evaluation
