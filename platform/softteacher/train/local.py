"""The single-process runner: one fold, one process, no Ray. Tests and benchmarks use it;
the Ray Train worker runs the same trainer and loop on Ray Data batches."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from softteacher.config import ExperimentConfig
from softteacher.data.collate import (
    DetectionBatch,
    UnlabeledBatch,
    collate_labeled,
    collate_unlabeled,
)
from softteacher.data.protocol import FoldData
from softteacher.data.samples import LabeledSample, UnlabeledSample
from softteacher.data.streams import labeled_stream, unlabeled_stream
from softteacher.eval.models import evaluate_run
from softteacher.train.checkpoint import restore_start, save_checkpoint
from softteacher.train.loop import LoopHooks, Metrics, fit
from softteacher.train.trainer import SoftTeacherTrainer


def print_metrics(step: int, metrics: Metrics) -> None:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    print(f"step {step}: {shown}", flush=True)


class LocalSteps:
    """In-process step data: lazy augmented streams, so unused views are never made."""

    def __init__(
        self,
        labeled: Iterator[LabeledSample],
        unlabeled: Iterator[UnlabeledSample],
        unlabeled_per_step: int,
        device: torch.device,
    ) -> None:
        self._labeled = labeled
        self._unlabeled = unlabeled
        self._unlabeled_per_step = unlabeled_per_step
        self._device = device

    def labeled(self, images: int) -> DetectionBatch:
        return collate_labeled(list(itertools.islice(self._labeled, images)), self._device)

    def unlabeled(self) -> UnlabeledBatch:
        samples = list(itertools.islice(self._unlabeled, self._unlabeled_per_step))
        return collate_unlabeled(samples, self._device)


def run_single_process(
    cfg: ExperimentConfig,
    fold: FoldData,
    *,
    checkpoint_dir: Path | None = None,
    log: Callable[[int, Metrics], None] = print_metrics,
    device: torch.device | None = None,
) -> Metrics:
    """Train one fold to ``max_steps`` (resuming from ``checkpoint_dir`` when it holds one);
    returns the final teacher and student COCO metrics."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    labeled, unlabeled, val = fold.load()
    trainer = SoftTeacherTrainer(cfg, device)
    restore_start(trainer, checkpoint_dir)
    # The data position is the step: a resumed run draws a fresh, reproducible order.
    seed = cfg.train.seed * 1_000_003 + trainer.step_count
    source = LocalSteps(
        labeled_stream(labeled, cfg.augment, seed),
        unlabeled_stream(unlabeled, cfg.augment, seed + 1),
        cfg.train.unlabeled_per_step,
        device,
    )

    def checkpoint(trainer: SoftTeacherTrainer, metrics: Metrics) -> None:
        if checkpoint_dir is not None:
            save_checkpoint(trainer, checkpoint_dir, {"metrics": metrics})

    hooks = LoopHooks(
        log=log,
        evaluate=lambda t: evaluate_run(t, val, unlabeled, cfg).metrics,
        checkpoint=checkpoint,
    )
    return fit(trainer, source, hooks)
