"""The presets: each a change of the paper's configuration (or of another preset), with the
reason for every change in its docstring; ``PRESETS`` is the only place they are named."""

from __future__ import annotations

import dataclasses

from softteacher.config import (
    AugmentConfig,
    DetectorConfig,
    ExperimentConfig,
    MethodConfig,
    OptimConfig,
    SyntheticConfig,
    TrainConfig,
)


def _slim_detector(num_classes: int) -> DetectorConfig:
    """ResNet-18 + FPN(64) with a 256-d box head and 128 RoIs: ~6.5 img/s at 256 px on 2 cores."""
    return DetectorConfig(
        preset="slim",
        num_classes=num_classes,
        fpn_channels=64,
        box_head_dim=256,
        rois_per_image=128,
        anchor_sizes=(16, 32, 64, 128),
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
    )


# Lighter heads for 2-core trials: RoIAlign with one sample a bin side (its backward was
# 22% of a step), 64 RoIs and 300/150 RPN proposals an image (1-4 objects an image need no
# more): 17.4 images/s against 12.7 for a supervised cpu-preset step.
_LIGHT_HEADS = {
    "roi_sampling_ratio": 1,
    "rois_per_image": 64,
    "rpn_pre_nms_top_n_train": 300,
    "rpn_post_nms_top_n_train": 150,
}


def _cpu_augment(short_side: int) -> AugmentConfig:
    return AugmentConfig(
        train_sizes=(int(short_side * 0.8), int(short_side * 1.2)),
        max_size=short_side * 2,
        test_size=short_side,
    )


def _preset_paper() -> ExperimentConfig:
    return ExperimentConfig()


def _preset_bench() -> ExperimentConfig:
    """The synthetic benchmark of "does Soft Teacher beat supervised?" on 2 cores.

    What differs from the paper and why (each measured, see README "Status of the paper's
    findings"):
    - an easier set (4 shapes, 1-4 objects, 128 px images): the slim detector learns it in
      minutes, so the labeled set is used up before the run ends;
    - the semi-supervised run is the baseline's own run for ``burn_in_steps`` (5 labeled
      images a step), then 1 labeled + 4 unlabeled images a step to ``max_steps``;
    - the learning rate drops 5x when the unlabeled images join, in both runs: a step of 1
      labeled image at the baseline's lr 0.02 wrecks the classifier (loss 0.06 -> 0.33 in
      100 steps, supervised alone), which the linear scaling rule predicts;
    - uncertain teacher candidates are ignored rather than called background;
    - one Ray Data actor a stream (``train.data_actors``): it makes 150-270 rows/s at these
      sizes against the ~10 a trial takes, and a second one a pool grows to is a process
      more on the two cores (a 2-trial sweep started 8 actors with two a stream, 4 with
      one; README "Measured on this machine").
    """
    synthetic = SyntheticConfig(
        num_train=2000,
        num_val=200,
        min_size=128,
        max_size=128,
        num_classes=4,
        min_objects=1,
        max_objects=4,
        min_object_frac=0.15,
        max_object_frac=0.4,
    )
    burn_in = 1500
    return ExperimentConfig(
        detector=_slim_detector(synthetic.num_classes),
        method=MethodConfig(
            candidate_thr=0.3,
            cls_thr=0.7,
            rpn_thr=0.7,
            ignore_uncertain=True,
            burn_in_steps=burn_in,
            unsup_weight=2.0,
            ema_momentum=0.99,
        ),
        optim=OptimConfig(
            lr=0.02,
            warmup_steps=100,
            decay_steps=(burn_in,),
            decay_gamma=0.2,
            grad_clip_norm=10.0,
        ),
        train=TrainConfig(
            max_steps=burn_in + 1000,
            eval_every=500,
            ckpt_every=500,
            log_every=50,
            pseudo_quality_images=32,
            data_actors=1,
        ),
        augment=dataclasses.replace(_cpu_augment(128), labeled_view="weak"),
        synthetic=synthetic,
    )


def _preset_cpu() -> ExperimentConfig:
    """The 2-core default (``make sweep``): the bench preset's set and method, shortened so
    that the whole protocol with the baseline (3 ratios x 5 folds x 2 methods = 30 trials,
    two at a time, both arms from one burn-in) fits in about an hour and still shows learning.

    What changes from ``bench`` and why (measured on 2 cores, 1 thread a trial, supervised
    10% fold 1; README "Cheaper steps for the main job"):
    - lighter heads (``_LIGHT_HEADS``): 17.4 images/s against 12.7 for a supervised step;
    - a ResNet-10 (one block a stage, ResNet-18's widths): x1.5 images/s and the same mAP
      at every evaluation (14.78 against 14.85 at step 750, float32, one run each);
    - training at the set's own 128 px instead of 102-153: a batch of random sizes pads to
      its largest rounded up to 32 (160 px, 1.56x the pixels), so a fixed size is x1.35;
    - lr 0.04 (twice bench's): +3 mAP at 800 steps in a run this short;
    - 750 steps with the burn-in (the baseline's own steps) to 600, where the lr drops 5x: a
      Soft Teacher trial trains the last 150 steps from the baseline's step-600 checkpoint;
    - one evaluation, at the end (16.5 s for teacher and student on the 200 val images);
    - a semi-supervised step of the baseline's 5 labeled images plus 4 unlabeled ones (the
      paper's 1 + 4 gives up 4 labeled images a step, which 150 steps never pay back:
      Soft Teacher 12.71 / 12.37 with 1 + 4 against 14.25 / 13.88 with 5 + 4 at 10% folds
      1-2, seed 0, one branch point each; supervised 14.40 / 14.18);
    - the student's unlabeled views in a backbone pass of their own (``student_forward``):
      this detector's BatchNorm trains, and statistics shared with the strong views cost
      Soft Teacher 0.9 and 0.7 mAP by step 1350 at 10% and 5% (10 fold-seed pairs each,
      outside the noise), 0.4 at 10% at step 750, nothing at 1% (README "Levers").
    """
    burn_in = 600
    return _preset_bench().replace(
        detector=_LIGHT_HEADS | {"slim_blocks": (1, 1, 1, 1)},
        method={"burn_in_steps": burn_in, "student_forward": "separate"},
        optim={"lr": 0.04, "warmup_steps": 50, "decay_steps": (burn_in,)},
        train={
            "max_steps": 750,
            "eval_every": 750,
            "ckpt_every": 750,
            "log_every": 50,
            "labeled_per_step": 5,
            "supervised_per_step": 5,
        },
        augment={"train_sizes": (128, 128)},
    )


def _preset_smoke() -> ExperimentConfig:
    """Tiny, for tests: seconds a run. The cpu preset's lighter heads halve its step
    (0.92 -> 0.49 s for 5 images at ~80 px, one thread), and every test trains it."""
    synthetic = SyntheticConfig(num_train=60, num_val=16, min_size=64, max_size=96, num_classes=4)
    return ExperimentConfig(
        detector=dataclasses.replace(_slim_detector(synthetic.num_classes), **_LIGHT_HEADS),
        method=MethodConfig(
            cls_thr=0.5,
            rpn_thr=0.5,
            burn_in_steps=4,
            unsup_weight=2.0,
            ema_momentum=0.9,
            n_jitter=4,
        ),
        optim=OptimConfig(lr=0.02, warmup_steps=4, decay_steps=(20,)),
        train=TrainConfig(
            max_steps=12,
            eval_every=12,
            ckpt_every=6,
            log_every=4,
            pseudo_quality_images=4,
            data_actors=1,
        ),
        augment=dataclasses.replace(_cpu_augment(80), labeled_view="weak"),
        synthetic=synthetic,
    )


PRESETS = {
    "paper": _preset_paper,
    "cpu": _preset_cpu,
    "bench": _preset_bench,
    "smoke": _preset_smoke,
}


def preset(name: str) -> ExperimentConfig:
    """The named preset: ``smoke`` (tests), ``cpu`` (2-core default), ``bench`` (the 2-core
    benchmark of the method), ``paper`` (R50-FPN, COCO)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
