"""Evaluation of a run's two models, teacher and student, on the val set."""

from __future__ import annotations

from softteacher.config import ExperimentConfig
from softteacher.data.coco import CocoDataset
from softteacher.eval.coco_eval import evaluate
from softteacher.train.trainer import SoftTeacherTrainer


def evaluate_teacher_and_student(
    trainer: SoftTeacherTrainer, val: CocoDataset, cfg: ExperimentConfig
) -> dict[str, float]:
    """``teacher/AP`` ... ``student/APl``: the original reports the student, MMDetection 3
    the teacher (usually the better one); the platform reports both."""
    metrics: dict[str, float] = {}
    for name, model in (("teacher", trainer.teacher), ("student", trainer.student)):
        scores = evaluate(model, val, cfg.augment, max_images=cfg.train.max_val_images)
        metrics.update({f"{name}/{key}": value for key, value in scores.items()})
    return metrics
