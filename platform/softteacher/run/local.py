"""The single-process runner: one fold, one process, no Ray. Tests and benchmarks use it;
the Ray Train worker runs the same trainer, loop and row code on Ray Data actors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from softteacher.config import ExperimentConfig
from softteacher.data.coco import check_detector_classes
from softteacher.data.protocol import FoldData
from softteacher.data.rows import StreamPlan
from softteacher.data.shards import ShardSet, write_shards
from softteacher.data.steps import LocalRowStream, StepBatches, start_positions
from softteacher.eval.models import evaluate_run
from softteacher.train.checkpoint import restore_start, save_checkpoint
from softteacher.train.loop import LoopHooks, Metrics, fit
from softteacher.train.trainer import SoftTeacherTrainer


def print_metrics(step: int, metrics: Metrics) -> None:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    print(f"step {step}: {shown}", flush=True)


def local_step_batches(
    cfg: ExperimentConfig,
    labeled: ShardSet,
    unlabeled: ShardSet | None,
    device: torch.device | str,
    position: dict[str, int] | None = None,
) -> StepBatches:
    """In-process streams over the shards, from ``position`` (a checkpoint's), with the
    plans a single Ray Train worker would use: the two paths yield the same rows."""
    starts = start_positions(position)

    def stream(kind: str, shards: ShardSet) -> LocalRowStream:
        plan = StreamPlan(kind, shards.num_rows, cfg.train.seed)
        return LocalRowStream(shards, plan, cfg.augment, start=starts[kind])

    return StepBatches(
        stream("labeled", labeled),
        stream("unlabeled", unlabeled) if unlabeled is not None else None,
        device,
    )


def run_single_process(
    cfg: ExperimentConfig,
    fold: FoldData,
    *,
    shard_dir: Path,
    checkpoint_dir: Path | None = None,
    log: Callable[[int, Metrics], None] = print_metrics,
    device: torch.device | None = None,
    evaluate: bool = True,
) -> Metrics:
    """Train one fold to ``max_steps`` (resuming from ``checkpoint_dir`` when it holds one);
    returns the final teacher and student COCO metrics (none without ``evaluate``: the
    benchmarks' teacher is trained so, where pycocotools may be missing). ``shard_dir``
    caches the fold's Parquet shards (by content, shared with the Ray path)."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    labeled, unlabeled, val = fold.load()
    check_detector_classes(val, cfg.detector.num_classes)
    trainer = SoftTeacherTrainer(cfg, device)
    start = restore_start(trainer, checkpoint_dir)
    batches = local_step_batches(
        cfg,
        write_shards(labeled, shard_dir),
        write_shards(unlabeled, shard_dir) if cfg.method.uses_unlabeled else None,
        device,
        start.get("data_position"),
    )

    def checkpoint(trainer: SoftTeacherTrainer, metrics: Metrics) -> None:
        if checkpoint_dir is not None:
            save_checkpoint(trainer, checkpoint_dir, {"data_position": batches.position()})

    hooks = LoopHooks(
        log=log,
        evaluate=(lambda t: evaluate_run(t, val, unlabeled, cfg).metrics) if evaluate else None,
        checkpoint=checkpoint,
    )
    with batches:
        return fit(trainer, batches, hooks)
