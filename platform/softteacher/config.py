"""Typed configuration of every stage, with the paper's values as defaults.

One dataclass per concern; ``PRESETS`` is the only place where a preset changes them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

Method = Literal[
    "supervised", "multi_stage", "e2e", "e2e_ema", "soft_teacher", "soft_teacher_jitter"
]
Indicator = Literal["bg_teacher", "bg_student", "pred_diff", "iou", "reverse_iou", "none"]
SoftWeightNorm = Literal["joint", "paper"]
DetectorPreset = Literal["r50-fpn", "slim"]
ViewKind = Literal["weak", "strong"]

# In the paper's ablation order (Tables 5-6): tables list methods in this order.
METHODS: tuple[str, ...] = (
    "supervised",
    "multi_stage",
    "e2e",
    "e2e_ema",
    "soft_teacher",
    "soft_teacher_jitter",
)
INDICATORS: tuple[str, ...] = (
    "bg_teacher",
    "bg_student",
    "pred_diff",
    "iou",
    "reverse_iou",
    "none",
)


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded synthetic COCO-format set: shapes whose class is the shape, never the colour."""

    num_train: int = 2000
    num_val: int = 300
    min_size: int = 160
    max_size: int = 256
    num_classes: int = 8
    min_objects: int = 1
    max_objects: int = 8
    min_object_frac: float = 0.08
    max_object_frac: float = 0.45
    seed: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    """Weak and strong views (notes, "Other settings"): sizes are the short side in pixels."""

    train_sizes: tuple[int, int] = (400, 1200)
    max_size: int = 1333
    test_size: int = 800
    flip_prob: float = 0.5
    magnitude_range: tuple[int, int] = (1, 10)
    translate_frac: float = 0.1
    rotate_deg: float = 30.0
    shear_deg: float = 30.0
    fill: int = 125
    cutout_count: tuple[int, int] = (1, 4)
    cutout_max_frac: float = 0.2
    labeled_view: ViewKind = "strong"


@dataclass(frozen=True)
class DetectorConfig:
    """Faster R-CNN assembly; ``slim`` is the CPU preset measured in CALIBRATION.md."""

    preset: DetectorPreset = "r50-fpn"
    num_classes: int = 80
    backbone_weights: str | None = None
    fpn_channels: int = 256
    box_head_dim: int = 1024
    rois_per_image: int = 512
    positive_fraction: float = 0.25
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100


@dataclass(frozen=True)
class MethodConfig:
    """The Soft Teacher method (paper Sec. 3, notes "One training step")."""

    method: Method = "soft_teacher_jitter"
    indicator: Indicator = "bg_teacher"
    soft_weight_norm: SoftWeightNorm = "joint"
    candidate_thr: float = 0.5
    cls_thr: float = 0.9
    rpn_thr: float = 0.9
    reg_thr: float = 0.02
    n_jitter: int = 10
    jitter_scale: float = 0.06
    unsup_weight: float = 4.0
    # Not in the paper: teacher candidates scored above candidate_thr but not above cls_thr
    # are left out of the unsupervised RPN and classification losses instead of counting as
    # background (a weak teacher misses most objects at cls_thr; see CALIBRATION.md).
    ignore_uncertain: bool = False
    unsup_weight_ramp_steps: int = 0
    burn_in_steps: int = 0
    ema_momentum: float = 0.999
    ema_ramp: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.indicator not in INDICATORS:
            raise ValueError(f"unknown indicator {self.indicator!r}; choose one of {INDICATORS}")

    @property
    def uses_unlabeled(self) -> bool:
        """Whether a training step reads unlabeled images: ``multi_stage`` trains supervised
        twice and reads them only offline, between its runs (train/multi_stage.py)."""
        return self.method not in ("supervised", "multi_stage")

    @property
    def effective_indicator(self) -> Indicator:
        """Hard pseudo-labels (e2e, e2e_ema) weigh every background box alike."""
        return self.indicator if self.method.startswith("soft_teacher") else "none"

    @property
    def uses_jitter(self) -> bool:
        return self.method == "soft_teacher_jitter"

    @property
    def uses_ema(self) -> bool:
        """The EMA teacher is what supervised runs (multi-stage's too) report and label with."""
        return self.method != "e2e"


@dataclass(frozen=True)
class OptimConfig:
    """SGD with linear warm-up and step decay (paper: lr 0.01, 500 warm-up, x0.1 at 2/3 and 8/9)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    warmup_factor: float = 0.001
    decay_steps: tuple[int, ...] = (120_000, 160_000)
    decay_gamma: float = 0.1
    grad_clip_norm: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Length and shape of a run: ``labeled_per_step`` : ``unlabeled_per_step`` images a step."""

    max_steps: int = 180_000
    labeled_per_step: int = 1
    unlabeled_per_step: int = 4
    eval_every: int = 4000
    ckpt_every: int = 4000
    log_every: int = 50
    seed: int = 0
    num_threads: int | None = None
    max_val_images: int | None = None
    pseudo_quality_images: int = 64
    init_from: str | None = None  # a checkpoint folder: its student and teacher start the run
    # a checkpoint folder whose whole state (weights, optimiser, schedule, step, data
    # position) this new run continues from: a branch off another run at that step
    branch_from: str | None = None

    def __post_init__(self) -> None:
        if self.init_from and self.branch_from:
            raise ValueError(
                "train.init_from (weights only, a fresh schedule) and train.branch_from (the "
                "whole state, the schedule continues) exclude each other; set one"
            )

    @property
    def images_per_step(self) -> int:
        return self.labeled_per_step + self.unlabeled_per_step


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs, resolvable to a flat dict for MLflow."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def replace(self, **sections: dict) -> ExperimentConfig:
        """Copy with fields of named sections replaced: ``cfg.replace(method={"cls_thr": 0.8})``."""
        updated = {
            name: dataclasses.replace(getattr(self, name), **changes)
            for name, changes in sections.items()
        }
        return dataclasses.replace(self, **updated)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def step_batch_sizes(self, step: int) -> tuple[int, int]:
        """Labeled and unlabeled images at ``step``. A supervised step (the baseline, and a
        semi-supervised run's burn-in) takes as many images as a semi-supervised one, all
        labeled (CALIBRATION.md: 1 labeled a step alone starves the detector), in whole
        units of ``labeled_per_step`` so that one labeled stream serves both phases."""
        if self.method.uses_unlabeled and step >= self.method.burn_in_steps:
            return self.train.labeled_per_step, self.train.unlabeled_per_step
        units = max(1, self.train.images_per_step // self.train.labeled_per_step)
        return units * self.train.labeled_per_step, 0

    def labeled_batch_unit(self) -> int:
        """The labeled stream's batch: every step's labeled count is a multiple of it."""
        if self.method.uses_unlabeled:
            return self.train.labeled_per_step
        return self.step_batch_sizes(0)[0]

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentConfig:
        kwargs = {}
        for name, value in data.items():
            if name not in _SECTION_TYPES:
                raise KeyError(f"unknown config section {name!r}; known: {sorted(_SECTION_TYPES)}")
            section_cls = _SECTION_TYPES[name]
            kwargs[name] = section_cls(**{k: _tuple_if_list(v) for k, v in value.items()})
        return cls(**kwargs)

    def flat(self) -> dict[str, object]:
        """``section.field`` -> value, the form MLflow params take."""
        return {
            f"{section}.{key}": value
            for section, fields in self.to_dict().items()
            for key, value in fields.items()
        }


_SECTION_TYPES = {
    "detector": DetectorConfig,
    "method": MethodConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "augment": AugmentConfig,
    "synthetic": SyntheticConfig,
}


def _tuple_if_list(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


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


def _cpu_augment(short_side: int) -> AugmentConfig:
    return AugmentConfig(
        train_sizes=(int(short_side * 0.8), int(short_side * 1.2)),
        max_size=short_side * 2,
        test_size=short_side,
    )


def _preset_paper() -> ExperimentConfig:
    return ExperimentConfig()


def _preset_cpu() -> ExperimentConfig:
    """Sized so that the whole protocol with the baseline (3 ratios x 5 folds x 2 methods =
    30 trials) takes about an hour on 2 cores: ~2 minutes a trial, Ray's fixed cost (~45 s)
    and evaluation included (measured: 150 steps took 2.9 min a supervised trial).
    A first look at the platform, not a benchmark of the method."""
    synthetic = SyntheticConfig()
    return ExperimentConfig(
        detector=_slim_detector(synthetic.num_classes),
        method=MethodConfig(
            cls_thr=0.7,
            rpn_thr=0.7,
            burn_in_steps=40,
            unsup_weight=2.0,
            unsup_weight_ramp_steps=20,
            ema_momentum=0.99,
        ),
        optim=OptimConfig(lr=0.02, warmup_steps=20, decay_steps=(80,), grad_clip_norm=10.0),
        train=TrainConfig(
            max_steps=100,
            eval_every=100,
            ckpt_every=50,
            log_every=25,
            max_val_images=100,
            pseudo_quality_images=16,
        ),
        augment=dataclasses.replace(_cpu_augment(160), labeled_view="weak"),
        synthetic=synthetic,
    )


def _preset_bench() -> ExperimentConfig:
    """The synthetic benchmark of "does Soft Teacher beat supervised?" on 2 cores.

    What differs from ``cpu`` and why (each measured, see README "Benchmark"):
    - an easier set (4 shapes, 1-4 objects, 128 px images): the slim detector learns it in
      minutes, so the labeled set is used up before the run ends;
    - the semi-supervised run is the baseline's own run for ``burn_in_steps`` (5 labeled
      images a step), then 1 labeled + 4 unlabeled images a step to ``max_steps``;
    - the learning rate drops 5x when the unlabeled images join, in both runs: a step of 1
      labeled image at the baseline's lr 0.02 wrecks the classifier (loss 0.06 -> 0.33 in
      100 steps, supervised alone), which the linear scaling rule predicts;
    - uncertain teacher candidates are ignored rather than called background.
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
        ),
        augment=dataclasses.replace(_cpu_augment(128), labeled_view="weak"),
        synthetic=synthetic,
    )


def _preset_smoke() -> ExperimentConfig:
    synthetic = SyntheticConfig(num_train=60, num_val=16, min_size=64, max_size=96, num_classes=4)
    return ExperimentConfig(
        detector=_slim_detector(synthetic.num_classes),
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
            max_steps=12, eval_every=12, ckpt_every=6, log_every=4, pseudo_quality_images=4
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
