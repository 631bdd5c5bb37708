"""A run's worker loop: ``train_loop_per_worker`` under ``TorchTrainer``, the same loop in
process through ``InProcessSession`` (``run/session.py``).

Ray stays at the edges: the worker builds its data streams from the spec's shards at its
checkpoint's data position, and metrics and checkpoints go out through its session; the
step and the loop are the ones the single-process runner uses.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from softteacher.config import ExperimentConfig
from softteacher.data.coco import CocoDataset, check_detector_classes, coco_summary, load_coco
from softteacher.data.ray_stream import RayRowStream
from softteacher.data.rows import StreamPlan
from softteacher.data.steps import StepBatches, start_positions
from softteacher.eval.models import RunEvaluation, evaluate_run
from softteacher.eval.overlays import overlay_artifacts
from softteacher.files import DiskFullError, disk_full_named
from softteacher.names import IMAGES_PER_S, LOSS_TOTAL, STEP, TEACHER_AP
from softteacher.run.session import RayTrainSession, RunSession, node_id
from softteacher.run.spec import RunSpec
from softteacher.track.mlflow_runs import (
    RunRef,
    last_logged_steps,
    log_file_artifact,
    log_json_artifact,
    log_metrics,
    set_tags,
)
from softteacher.track.provenance import cpu_description
from softteacher.train.checkpoint import BRANCH_POINT_DIR, restore_start, save_checkpoint
from softteacher.train.loop import LoopHooks, Metrics, fit
from softteacher.train.progress_metrics import ProgressGauges
from softteacher.train.trainer import SoftTeacherTrainer

# Errors no retry can fix: the input or the config is wrong (our one-line errors are
# ValueErrors, a NaN loss is a FloatingPointError, a missing file a FileNotFoundError), or
# the disk is full until the user frees space.
INPUT_ERRORS = (ValueError, FloatingPointError, FileNotFoundError, DiskFullError)
FATAL_ERROR_FILE = "fatal_error.txt"
# What marks a logged step summary and a logged evaluation: a replayed step is logged only
# when its MLflow run lacks it (each step logged once, whatever the restarts).
REPLAY_KEYS = (LOSS_TOTAL, TEACHER_AP)


class RunInputError(RuntimeError):
    """A run stopped on its input or config: retrying cannot help, the message says why."""


def fatal_error_file(spec: RunSpec) -> Path:
    """Where a worker leaves the message of an error no retry can fix."""
    return Path(spec.storage_path) / spec.name / FATAL_ERROR_FILE


def train_loop_per_worker(config: dict) -> None:
    """One ``TorchTrainer`` worker of a run."""
    train_recording_input_errors(config["spec"], RayTrainSession())


def train_recording_input_errors(spec: RunSpec, session: RunSession) -> None:
    """Train; an input error is recorded so that restarts (Ray Train's of the worker
    group, or the in-process runner's) stop at once instead of training to the same error
    again."""
    marker = fatal_error_file(spec)
    if marker.is_file():
        raise RunInputError(marker.read_text().strip())
    try:
        _train(spec, session)
    except Exception as error:
        cause = input_error(error)
        if cause is not None:
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{type(cause).__name__}: {_first_line(cause)}\n")
            except OSError:  # a disk too full for even this line: the error itself goes on
                pass
        raise


def input_error(error: BaseException) -> BaseException | None:
    """The input error in ``error``'s chain (Ray Data wraps an actor's error in its own)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, INPUT_ERRORS):
            return error
        error = error.__cause__ or error.__context__
    return None


def _first_line(error: BaseException) -> str:
    text = str(error.args[0]) if error.args else str(error)
    return (text.strip().splitlines() or [type(error).__name__])[0]


def _train(spec: RunSpec, session: RunSession) -> None:
    """Resume from the session's latest checkpoint, stream this worker's rows of the
    labeled and unlabeled data, train, evaluate on rank 0, report."""
    cfg = spec.config
    # on every worker, before its streams start (torch would stop at the first loss, naming
    # neither the file nor the setting)
    check_detector_classes(coco_summary(spec.fold.val_ann), cfg.detector.num_classes)
    torch.set_num_threads(spec.resources.threads_per_worker)
    rank, world_size, device = session.rank, session.world_size, session.device
    is_rank_zero = rank == 0
    if spec.tracking is not None:  # where each worker ran, for the user and the tests
        set_tags(
            spec.tracking,
            {f"worker/{rank}/node_id": node_id(), f"worker/{rank}/cpu": cpu_description()},
        )

    wrap = _prepare_ddp if world_size > 1 else (lambda module: module)
    trainer = SoftTeacherTrainer(cfg, device, wrap_student=wrap, rank=rank)
    with session.resume_dir() as directory:
        start = restore_start(trainer, directory)
    position = start.get("data_position", {})
    # the streams start now (their head rows and actors while the rest is set up) and are
    # closed however this ends, a failure in the set-up included
    with ray_step_batches(spec, rank, world_size, position, trainer.step_count, device) as batches:
        val, unlabeled = _eval_sets(spec) if is_rank_zero else (None, None)
        latest_eval: Metrics = {}
        latest_speed: Metrics = {}

        gauges = ProgressGauges(session.experiment_name) if is_rank_zero else None
        tracked = spec.tracking if is_rank_zero else None
        logged = last_logged_steps(tracked, REPLAY_KEYS) if tracked is not None else {}

        def log(step: int, metrics: Metrics) -> None:
            if tracked is not None and not _logged_before(step, metrics, logged):
                log_metrics(tracked, metrics, step)
            if gauges is not None:
                gauges.update(step, metrics)
            if IMAGES_PER_S in metrics:
                latest_speed[IMAGES_PER_S] = metrics[IMAGES_PER_S]
            # Every worker reports at the same steps: a report is a barrier in Ray Train.
            session.report({STEP: step, **latest_speed, **metrics, **latest_eval})

        def evaluate(trainer: SoftTeacherTrainer) -> Metrics:
            if val is None:
                return {}
            evaluation = evaluate_run(trainer, val, unlabeled, cfg)
            latest_eval.update(evaluation.metrics)
            latest_eval["eval_step"] = trainer.step_count
            if trainer.step_count == cfg.train.max_steps and spec.tracking is not None:
                log_final_artifacts(spec.tracking, trainer, val, evaluation, cfg)
            return dict(latest_eval)

        def save(trainer: SoftTeacherTrainer, metrics: Metrics) -> None:
            step = trainer.step_count
            report = {STEP: step, **latest_speed, **latest_eval, "checkpoint_step": step}
            if not is_rank_zero:
                session.report(report)
                return
            extra = {"data_position": batches.position()}
            run_dir = Path(spec.storage_path) / spec.name
            what = f"the checkpoint of step {step}"
            if step == cfg.method.burn_in_steps:  # the branch point, kept beside Ray's rolling ones
                with disk_full_named(run_dir, f"the branch point ({what})"):
                    save_checkpoint(trainer, run_dir / BRANCH_POINT_DIR, extra)
            with tempfile.TemporaryDirectory() as directory:
                with disk_full_named(Path(tempfile.gettempdir()), what):
                    save_checkpoint(trainer, Path(directory), extra)
                with disk_full_named(run_dir, what):
                    session.report(report, checkpoint_dir=Path(directory))

        fit(trainer, batches, LoopHooks(log=log, evaluate=evaluate, checkpoint=save))


def _logged_before(step: int, metrics: Metrics, logged: dict[str, int]) -> bool:
    """Whether a replayed step's summary (it holds the loss) or evaluation (the teacher's
    mAP) is in the MLflow run already, from the attempt before a restart or a resume."""
    key = next((k for k in REPLAY_KEYS if k in metrics), None)
    return key is not None and step <= logged.get(key, -1)


def ray_step_batches(
    spec: RunSpec,
    rank: int,
    world_size: int,
    position: dict[str, int],
    step: int,
    device: torch.device | str,
) -> StepBatches:
    """This worker's streams from ``position`` (a checkpoint's data position), bounded by
    the rows the steps from ``step`` to the end take. A stream that the first step does not
    read (the unlabeled one during burn-in) gets no in-process head: its actors are warm
    long before its first row is taken."""
    cfg = spec.config
    starts = start_positions(position)
    needed = dict(zip(("labeled", "unlabeled"), cfg.rows_needed(step), strict=True))
    read_now = dict(zip(("labeled", "unlabeled"), cfg.step_batch_sizes(step), strict=True))

    def stream(kind: str) -> RayRowStream:
        shards = spec.labeled if kind == "labeled" else spec.unlabeled
        plan = StreamPlan(kind, shards.num_rows, cfg.train.seed, rank, world_size)
        start = starts[kind]
        return RayRowStream(
            shards,
            plan,
            cfg.augment,
            start=start,
            stop=start + needed[kind],
            head_rows=cfg.train.stream_head_rows if read_now[kind] else 0,
            concurrency=(1, cfg.train.data_actors),
        )

    uses_unlabeled = spec.unlabeled is not None and needed["unlabeled"] > 0
    return StepBatches(stream("labeled"), stream("unlabeled") if uses_unlabeled else None, device)


def _eval_sets(spec: RunSpec) -> tuple[CocoDataset, CocoDataset | None]:
    """Val, and the unlabeled fold with its hidden labels (for pseudo-label quality)."""
    fold = spec.fold
    val = load_coco(fold.val_ann, fold.val_images)
    unlabeled = None
    if spec.config.method.uses_unlabeled:
        unlabeled = load_coco(fold.unlabeled_ann, fold.train_images)
    return val, unlabeled


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
