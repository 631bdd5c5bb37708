"""Evaluation of a run at an evaluation step: both models on val, and the teacher's pseudo
labels against the unlabeled images' hidden ground truth (paper Fig. 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from softteacher.config import ExperimentConfig
from softteacher.data.coco import CocoDataset
from softteacher.eval.coco_eval import evaluate
from softteacher.eval.pseudo_quality import measure_pseudo_labels
from softteacher.model.ema import same_weights
from softteacher.train.trainer import SoftTeacherTrainer


@dataclass
class RunEvaluation:
    """Scalar metrics for the trackers, and per-box samples for the Fig. 3 scatter plots."""

    metrics: dict[str, float]
    box_samples: list[dict] = field(default_factory=list)


def evaluate_run(
    trainer: SoftTeacherTrainer,
    val: CocoDataset,
    unlabeled: CocoDataset | None,
    cfg: ExperimentConfig,
) -> RunEvaluation:
    """``teacher/AP`` ... ``student/APl`` (the original reports the student, MMDetection 3
    the teacher; the platform reports both) and, when the method uses unlabeled data and
    the unlabeled set is given, ``pseudo_quality/*`` of the teacher's pseudo boxes. A
    teacher that is the student, weight for weight, is evaluated once for both: half an
    evaluation's time during burn-in."""
    metrics: dict[str, float] = {}
    teacher = evaluate(trainer.teacher, val, cfg.augment, max_images=cfg.train.max_val_images)
    if same_weights(trainer.teacher, trainer.student):  # burn-in, and E2E's teacher always
        student = teacher
    else:
        student = evaluate(trainer.student, val, cfg.augment, max_images=cfg.train.max_val_images)
    for name, scores in (("teacher", teacher), ("student", student)):
        metrics.update({f"{name}/{key}": value for key, value in scores.items()})
    samples: list[dict] = []
    if unlabeled is not None and cfg.method.uses_unlabeled and cfg.train.pseudo_quality_images:
        quality, samples = measure_pseudo_labels(
            trainer.teacher,
            unlabeled,
            cfg.method,
            cfg.augment,
            max_images=cfg.train.pseudo_quality_images,
        )
        metrics.update(quality)
    return RunEvaluation(metrics, samples)
