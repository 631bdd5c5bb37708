"""Paper Table 5's multi-stage baseline (STAC-like) as a run of its own kind.

A supervised run on the labeled fold; its teacher pseudo-labels the unlabeled set once,
offline, keeping boxes with score > ``cls_thr`` (``run/offline_labels.py``); a second
supervised run on labeled + pseudo-labeled images, whose metrics are the trial's.

Each supervised run trains for the preset's ``max_steps``: the paper does not say how long
its stages ran, and equal stages make the stage-2 run comparable to the supervised
baseline. Only the second run logs step curves to the trial's MLflow run (two runs' curves
under the same keys and steps would interleave); the first run's final metrics are logged
as ``multi_stage/stage1/...``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ray
import ray.train
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from softteacher.config import ExperimentConfig
from softteacher.data.coco import load_coco
from softteacher.data.protocol import FoldData
from softteacher.data.shards import write_shards
from softteacher.run.fit import RunResult, run
from softteacher.run.offline_labels import PseudoLabelReport, label_fold_from_checkpoint
from softteacher.run.spec import RunSpec
from softteacher.track.mlflow_runs import log_metrics


def run_multi_stage(
    spec: RunSpec, cls_thr: float, work_dir: Path, callbacks: list | None = None
) -> tuple[RunResult, dict]:
    """Both stages and the labeling pass between them; returns the second stage's result
    and a summary of the first stage and the pseudo labels. ``work_dir`` holds the pseudo
    label file and the merged shards."""
    supervised = spec.config.replace(method={"method": "supervised"})
    first_spec = dataclasses.replace(spec, config=supervised, unlabeled=None, tracking=None)
    first = run(first_spec)
    if first.checkpoint is None:
        raise RuntimeError(
            f"stage 1 of multi-stage run {spec.name} finished without a checkpoint; "
            f"check its Ray Train run under {spec.storage_path}"
        )
    if spec.tracking is not None:
        stage1 = {f"multi_stage/stage1/{k}": v for k, v in first.metrics.items()}
        log_metrics(spec.tracking, stage1, step=0)
    out_file = Path(work_dir) / "pseudo_labels" / f"{spec.name}.json"
    report = _label_as_ray_task(spec, supervised, first.checkpoint, cls_thr, out_file)
    if spec.tracking is not None:
        log_metrics(spec.tracking, report.metrics(), step=0)
    print(
        f"{spec.name}: {report.boxes_kept} pseudo boxes on {report.images} unlabeled images "
        f"(score > {cls_thr:g}) in {out_file}",
        flush=True,
    )
    merged = write_shards(load_coco(out_file, spec.fold.train_images), Path(work_dir) / "shards")
    second_spec = dataclasses.replace(
        spec, config=supervised, labeled=merged, unlabeled=None, name=f"{spec.name}-stage2"
    )
    second = run(second_spec, callbacks)
    summary = {
        "pseudo_label_file": str(out_file),
        "pseudo_labels": report.to_dict(),
        "stage1_checkpoint": first.checkpoint.path,
        "stage1_metrics": first.metrics,
    }
    return second, summary


def _label_as_ray_task(
    spec: RunSpec,
    cfg: ExperimentConfig,
    checkpoint: ray.train.Checkpoint,
    cls_thr: float,
    out_file: Path,
) -> PseudoLabelReport:
    """The offline pass as a Ray task holding one Train worker's CPUs (and GPU): the trial's
    own process reserves almost no CPU, and a GPU cluster should label on a GPU. The task
    leaves the trial's placement group (one 0.01-CPU bundle), which would otherwise capture it."""
    resources = spec.resources
    task = ray.remote(_label_task).options(
        num_cpus=resources.cpus_per_worker,
        num_gpus=resources.gpus_per_worker,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    return ray.get(
        task.remote(cfg, spec.fold, checkpoint, cls_thr, out_file, resources.threads_per_worker)
    )


def _label_task(
    cfg: ExperimentConfig,
    fold: FoldData,
    checkpoint: ray.train.Checkpoint,
    cls_thr: float,
    out_file: Path,
    threads: int,
) -> PseudoLabelReport:
    torch.set_num_threads(threads)
    with checkpoint.as_directory() as directory:
        return label_fold_from_checkpoint(cfg, fold, Path(directory), cls_thr, out_file)
