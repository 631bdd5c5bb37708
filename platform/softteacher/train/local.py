"""The single-process runner: one fold, one process, no Ray. Tests and benchmarks use it;
the Ray Train worker runs the same trainer and loop on Ray Data batches."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from softteacher.config import ExperimentConfig
from softteacher.data.collate import UnlabeledBatch, collate_labeled, collate_unlabeled
from softteacher.data.protocol import FoldData
from softteacher.data.streams import batched, labeled_stream, unlabeled_stream
from softteacher.eval.models import evaluate_run
from softteacher.train.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from softteacher.train.loop import LoopHooks, Metrics, fit
from softteacher.train.trainer import SoftTeacherTrainer


def print_metrics(step: int, metrics: Metrics) -> None:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    print(f"step {step}: {shown}", flush=True)


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
    if has_checkpoint(checkpoint_dir):
        load_checkpoint(trainer, checkpoint_dir)
    elif cfg.train.init_from:
        load_weights(trainer, Path(cfg.train.init_from))
    # The data position is the step: a resumed run draws a fresh, reproducible order.
    seed = cfg.train.seed * 1_000_003 + trainer.step_count
    n_labeled, n_unlabeled = cfg.step_batch_sizes()
    labeled_batches = (
        collate_labeled(samples, device)
        for samples in batched(labeled_stream(labeled, cfg.augment, seed), n_labeled)
    )
    unlabeled_batches: Iterator[UnlabeledBatch | None] = itertools.repeat(None)
    if n_unlabeled:
        unlabeled_batches = (
            collate_unlabeled(samples, device)
            for samples in batched(unlabeled_stream(unlabeled, cfg.augment, seed + 1), n_unlabeled)
        )

    def checkpoint(trainer: SoftTeacherTrainer, metrics: Metrics) -> None:
        if checkpoint_dir is not None:
            save_checkpoint(trainer, checkpoint_dir, {"metrics": metrics})

    hooks = LoopHooks(
        log=log,
        evaluate=lambda t: evaluate_run(t, val, unlabeled, cfg).metrics,
        checkpoint=checkpoint,
    )
    return fit(trainer, zip(labeled_batches, unlabeled_batches), hooks)
