"""The Ray Train side of a run: ``train_loop_per_worker`` and the ``TorchTrainer`` around it.

Ray stays at the edges: data shards come in through ``get_dataset_shard``, metrics and
checkpoints go out through ``ray.train.report``; the step and the loop are the same ones
the single-process runner uses.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from softteacher.config import ExperimentConfig
from softteacher.data.coco import CocoDataset, load_coco
from softteacher.data.ray_stream import StepBatches
from softteacher.eval.models import RunEvaluation, evaluate_run
from softteacher.eval.overlays import overlay_artifacts
from softteacher.track.mlflow_runs import (
    RunRef,
    log_file_artifact,
    log_json_artifact,
    log_metrics,
    set_tags,
)
from softteacher.train.checkpoint import restore_start, save_checkpoint
from softteacher.train.loop import LoopHooks, Metrics, fit
from softteacher.train.progress_metrics import ProgressGauges
from softteacher.train.trainer import SoftTeacherTrainer


@dataclass(frozen=True)
class WorkerJob:
    """What every worker of a run needs, as plain data that Ray can ship to any node."""

    experiment: ExperimentConfig
    val_ann: str
    val_images: str
    threads_per_worker: int
    tracking: RunRef | None = None
    # the unlabeled fold file keeps its annotations: rank 0 measures pseudo-label quality
    unlabeled_ann: str | None = None
    train_images: str | None = None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["experiment"] = self.experiment.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> WorkerJob:
        tracking = data.get("tracking")
        return cls(
            **(
                data
                | {
                    "experiment": ExperimentConfig.from_dict(data["experiment"]),
                    "tracking": RunRef(**tracking) if tracking else None,
                }
            )
        )

    def load_eval_sets(self) -> tuple[CocoDataset, CocoDataset | None]:
        val = load_coco(Path(self.val_ann), Path(self.val_images))
        unlabeled = None
        if self.unlabeled_ann and self.train_images:
            unlabeled = load_coco(Path(self.unlabeled_ann), Path(self.train_images))
        return val, unlabeled


@dataclass(frozen=True)
class WorkerResources:
    """How a run is spread: ``num_workers=0`` is Ray Train's local mode (in-process)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    placement_strategy: str = "PACK"

    def scaling_config(self) -> ScalingConfig:
        use_gpu = self.gpus_per_worker > 0
        resources = {"CPU": self.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return ScalingConfig(
            num_workers=self.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=self.placement_strategy,
        )


def train_loop_per_worker(config: dict) -> None:
    """One worker of a run: resume from Ray's latest checkpoint, stream this worker's shard
    of the labeled and unlabeled data, train, evaluate on rank 0, report."""
    job = WorkerJob.from_dict(config)
    cfg = job.experiment
    torch.set_num_threads(max(1, job.threads_per_worker))
    context = ray.train.get_context()
    is_rank_zero = context.get_world_rank() == 0
    device = ray.train.torch.get_device()
    if job.tracking is not None:  # where each worker ran, for the user and the tests
        node = ray.get_runtime_context().get_node_id()
        set_tags(job.tracking, {f"worker/{context.get_world_rank()}/node_id": node})

    wrap = _prepare_ddp if context.get_world_size() > 1 else (lambda module: module)
    trainer = SoftTeacherTrainer(cfg, device, wrap_student=wrap)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = restore_start(trainer, Path(directory))
    else:
        start = restore_start(trainer, None)
    position = start.get("data_position", {})

    batches = StepBatches(
        ray.train.get_dataset_shard("labeled"),
        ray.train.get_dataset_shard("unlabeled") if cfg.method.uses_unlabeled else None,
        cfg.labeled_batch_unit(),
        cfg.train.unlabeled_per_step,
        device,
        seed=cfg.train.seed + context.get_world_rank(),
        start_epoch=position,
    )
    val, unlabeled = job.load_eval_sets() if is_rank_zero else (None, None)
    latest_eval: Metrics = {}
    latest_speed: Metrics = {}

    gauges = ProgressGauges(context.get_experiment_name()) if is_rank_zero else None

    def log(step: int, metrics: Metrics) -> None:
        if is_rank_zero and job.tracking is not None:
            log_metrics(job.tracking, metrics, step)
        if gauges is not None:
            gauges.update(step, metrics)
        if "images_per_s" in metrics:
            latest_speed["images_per_s"] = metrics["images_per_s"]
        # Every worker reports at the same steps: a report is a barrier in Ray Train.
        ray.train.report({"step": step, **latest_speed, **metrics, **latest_eval})

    def evaluate(trainer: SoftTeacherTrainer) -> Metrics:
        if val is None:
            return {}
        evaluation = evaluate_run(trainer, val, unlabeled, cfg)
        latest_eval.update(evaluation.metrics)
        latest_eval["eval_step"] = trainer.step_count
        if trainer.step_count == cfg.train.max_steps and job.tracking is not None:
            log_final_artifacts(job.tracking, trainer, val, evaluation, cfg)
        return dict(latest_eval)

    def save(trainer: SoftTeacherTrainer, metrics: Metrics) -> None:
        step = trainer.step_count
        report = {"step": step, **latest_speed, **latest_eval, "checkpoint_step": step}
        if not is_rank_zero:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(trainer, Path(directory), {"data_position": batches.position()})
            ray.train.report(report, checkpoint=Checkpoint.from_directory(directory))

    fit(trainer, batches, LoopHooks(log=log, evaluate=evaluate, checkpoint=save))


def log_final_artifacts(
    run: RunRef,
    trainer: SoftTeacherTrainer,
    val: CocoDataset,
    evaluation: RunEvaluation,
    cfg: ExperimentConfig,
) -> None:
    """The last evaluation's pseudo-box samples (Fig. 3b/3c) and a few val images with the
    teacher's detections drawn on them (Fig. 4)."""
    if evaluation.box_samples:
        log_json_artifact(run, "pseudo_quality_boxes.json", {"boxes": evaluation.box_samples})
    with tempfile.TemporaryDirectory() as directory:
        for path in overlay_artifacts(trainer.teacher, val, cfg.augment, Path(directory), n=4):
            log_file_artifact(run, path, artifact_path="overlays")


def _prepare_ddp(module: torch.nn.Module) -> torch.nn.Module:
    """DDP through Ray; unused parameters happen (a step with no pseudo boxes of a kind)."""
    return ray.train.torch.prepare_model(
        module, parallel_strategy_kwargs={"find_unused_parameters": True}
    )


def build_torch_trainer(
    job: WorkerJob,
    resources: WorkerResources,
    datasets: dict[str, ray.data.Dataset],
    *,
    run_name: str,
    storage_path: Path,
    callbacks: list | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` for one run. ``run_name`` must be unique to the run: Ray Train
    resumes a run of the same name from its storage, which is what a restarted trial wants
    and what a new trial must never get."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        scaling_config=resources.scaling_config(),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=resources.max_failures),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
    )
