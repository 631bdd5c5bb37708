"""Metric names, defined once: the writers (the loop, the evaluation, the sweep) and the
readers (tables, plots, comparisons, progress lines) use these, never their own literals."""

from __future__ import annotations

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MODELS = ("teacher", "student")


def model_metric(model: str, name: str) -> str:
    """``teacher/AP``: a model's COCO metric as every tracker logs it."""
    return f"{model}/{name}"


TEACHER_AP = model_metric("teacher", "AP")
STUDENT_AP = model_metric("student", "AP")
# What a run reports at the end: ``teacher/AP`` ... ``student/APl``.
FINAL_METRICS = tuple(model_metric(m, n) for m in MODELS for n in COCO_METRICS)
FINAL_PREFIX = "final/"  # the final metrics of a trial's MLflow run: ``final/teacher/AP``
LOSS_TOTAL = "loss/total"
# Steps skipped so far because their loss or gradient was NaN or infinite.
NONFINITE_STEPS = "nonfinite_steps"
IMAGES_PER_S = "images_per_s"
EVAL_STEP = "eval_step"
# Steps a trial has trained up to its latest evaluation (from its branch point when it
# branched): the clock an early-stopping scheduler compares trials on.
TRAINED_STEPS = "trained_steps"
