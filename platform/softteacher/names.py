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
# Where a run's time goes besides its steps: a step's seconds taking and collating its
# images (mean over a logging window) and an evaluation's seconds (both models on val,
# pseudo-box quality; at a run's last step also the final artifacts it logs).
DATA_SECONDS = "data_s"
EVAL_SECONDS = "eval_s"
STEP = "step"  # the training step a report is of (every report a worker sends has it)
EVAL_STEP = "eval_step"
# Steps a trial has trained up to its latest evaluation (from its branch point when it
# branched): the clock an early-stopping scheduler compares trials on.
TRAINED_STEPS = "trained_steps"
# A trial's final report that comes from its FINISHED MLflow run, not from training: the
# same sweep (its name: settings and config) already finished it in this store.
ALREADY_FINISHED = "already_finished"

# The ``torch.profiler`` ranges of one training step (``record_function``), in step order;
# the benchmark's step breakdown reads them. Two are nested: the jittering runs inside the
# teacher's view, the teacher's scoring of the student's boxes inside the student's forward.
STEP_TEACHER_VIEW = "step/teacher_view"
STEP_JITTER = "step/box_jitter"
STEP_PSEUDO_TARGETS = "step/pseudo_targets"
STEP_STUDENT_FORWARD = "step/student_forward"
STEP_TEACHER_SCORING = "step/teacher_scoring"
STEP_BACKWARD = "step/backward"
STEP_OPTIMIZER = "step/optimizer"
STEP_EMA = "step/ema"
STEP_PARTS = (
    STEP_TEACHER_VIEW,
    STEP_JITTER,
    STEP_PSEUDO_TARGETS,
    STEP_STUDENT_FORWARD,
    STEP_TEACHER_SCORING,
    STEP_BACKWARD,
    STEP_OPTIMIZER,
    STEP_EMA,
)
NESTED_STEP_PARTS = {STEP_JITTER: STEP_TEACHER_VIEW, STEP_TEACHER_SCORING: STEP_STUDENT_FORWARD}
