"""Typed configuration of every stage, with the paper's values as defaults.

One dataclass per concern; ``presets.py`` is the only place where a preset changes them, and
``overrides.apply_overrides`` (``--set``) the only place a command line does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Method = Literal[
    "supervised", "multi_stage", "e2e", "e2e_ema", "soft_teacher", "soft_teacher_jitter"
]
Indicator = Literal["bg_teacher", "bg_student", "pred_diff", "iou", "reverse_iou", "none"]
SoftWeightNorm = Literal["joint", "paper"]
DetectorPreset = Literal["r50-fpn", "slim"]
Precision = Literal["off", "bf16"]
KernelChoice = Literal["auto", "reference"]
StudentForward = Literal["joint", "separate"]
ViewKind = Literal["weak", "colour", "strong"]

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


def _require_unit_interval(section: str, obj: object, names: Sequence[str], hint: str) -> None:
    """A score threshold outside [0, 1] silently keeps every box or none."""
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{section}.{name} must be in [0, 1], got {value!r}; {hint}")


def _require_at_least(
    section: str, obj: object, names: Sequence[str], low: float, hint: str
) -> None:
    """A count or weight below ``low`` fails (or does nothing) only deep inside a run."""
    for name in names:
        value = getattr(obj, name)
        if not value >= low:
            raise ValueError(f"{section}.{name} must be >= {low:g}, got {value!r}; {hint}")


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
    # Both references augment labeled images with resize + flip + one colour op ("colour");
    # "weak" drops the colour op, "strong" adds the unlabeled student's geometric op and cutout.
    labeled_view: ViewKind = "colour"
    # Both references run the weak and the strong pipeline on their own copy of an unlabeled
    # image, so each view draws its own resize and flip; True shares one draw between them.
    shared_resize_flip: bool = False

    def __post_init__(self) -> None:
        if self.labeled_view not in ("weak", "colour", "strong"):
            raise ValueError(
                f"unknown augment.labeled_view {self.labeled_view!r}; "
                "use 'weak', 'colour' or 'strong'"
            )


@dataclass(frozen=True)
class DetectorConfig:
    """Faster R-CNN assembly; ``slim`` is the CPU preset measured in CALIBRATION.md."""

    preset: DetectorPreset = "r50-fpn"
    num_classes: int = 80
    backbone_weights: str | None = None
    # BasicBlocks in each of the slim ResNet's four stages: (2, 2, 2, 2) is torchvision's
    # ResNet-18; fewer make a shallower ResNet of the same widths (ignored by r50-fpn)
    slim_blocks: tuple[int, int, int, int] = (2, 2, 2, 2)
    # Mixed precision (``--amp``): "bf16" runs the backbone and FPN under autocast and hands
    # their features on in float32, so the heads, box decoding, NMS and losses stay float32
    amp: Precision = "off"
    fpn_channels: int = 256
    box_head_dim: int = 1024
    rois_per_image: int = 512
    # RoIAlign's sample points a bin side (torchvision's default, 2): on a CPU its backward
    # is a fifth of a slim training step, and it scales with the square of this
    roi_sampling_ratio: int = 2
    positive_fraction: float = 0.25
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        if len(self.slim_blocks) != 4 or min(self.slim_blocks) < 1:
            raise ValueError(
                f"detector.slim_blocks must be 4 stage depths >= 1, got {self.slim_blocks!r}; "
                "ResNet-18 is (2, 2, 2, 2)"
            )
        if self.amp not in ("off", "bf16"):
            raise ValueError(f"unknown detector.amp {self.amp!r}; use 'off' or 'bf16'")


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
    # Eq. 9 divides each coordinate's std by 0.5 (h + w) ("paper"); the authors' code divides
    # x-stds by w and y-stds by h ("original").
    variance_norm: Literal["paper", "original"] = "paper"
    unsup_weight: float = 4.0
    # Not in the paper: teacher candidates scored above candidate_thr but not above rpn_thr
    # (for the RPN loss) or cls_thr (for the classification loss) are left out of that loss
    # instead of counting as background (a weak teacher misses most objects at cls_thr; see
    # CALIBRATION.md).
    ignore_uncertain: bool = False
    unsup_weight_ramp_steps: int = 0
    burn_in_steps: int = 0
    ema_momentum: float = 0.999
    ema_ramp: bool = True
    # Eq. 4-5's loss and Eq. 7-9's variance: "auto" runs the fused Triton kernels on CUDA
    # tensors when triton imports and the plain-torch reference (kernels/) otherwise;
    # "reference" always runs the reference (to compare, or to rule the kernels out).
    kernels: KernelChoice = "auto"
    # Not in the paper (its ResNet-50 has frozen BatchNorm): how the student's backbone sees
    # the strong views. "joint" runs them in one batch with the labeled images; "separate"
    # runs them in a pass of their own that normalises by their own batch statistics and
    # leaves the running statistics, which the EMA teacher and evaluation normalise by, to
    # the labeled images (the authors' code also runs the two forwards apart).
    student_forward: StudentForward = "joint"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.indicator not in INDICATORS:
            raise ValueError(f"unknown indicator {self.indicator!r}; choose one of {INDICATORS}")
        if self.variance_norm not in ("paper", "original"):
            raise ValueError(
                f"unknown method.variance_norm {self.variance_norm!r}; use 'paper' or 'original'"
            )
        if self.kernels not in ("auto", "reference"):
            raise ValueError(f"unknown method.kernels {self.kernels!r}; use 'auto' or 'reference'")
        if self.student_forward not in ("joint", "separate"):
            raise ValueError(
                f"unknown method.student_forward {self.student_forward!r}; "
                "use 'joint' or 'separate'"
            )
        _require_unit_interval(
            "method", self, ("candidate_thr", "cls_thr", "rpn_thr"),
            "it compares teacher scores, which are probabilities (the paper uses 0.9)",
        )
        _require_at_least(
            "method", self, ("reg_thr",), 0, "it bounds a box-coordinate std (the paper: 0.02)"
        )
        _require_at_least(
            "method", self, ("unsup_weight",), 0, "it weighs the unsupervised loss (the paper: 4)"
        )
        if self.uses_jitter and self.n_jitter < 2:
            raise ValueError(
                f"method.n_jitter must be >= 2 for method {self.method!r}, got {self.n_jitter}; "
                "the variance of fewer than 2 jittered boxes is undefined (the paper uses 10)"
            )

    @property
    def uses_unlabeled(self) -> bool:
        """Whether a training step reads unlabeled images: ``multi_stage`` trains supervised
        twice and reads them only offline, between its runs (run/offline_labels.py)."""
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

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr!r}; the paper uses 0.01")


@dataclass(frozen=True)
class TrainConfig:
    """Length and shape of a run: ``labeled_per_step`` : ``unlabeled_per_step`` images a step."""

    max_steps: int = 180_000
    labeled_per_step: int = 1
    unlabeled_per_step: int = 4
    # images a supervised step takes (the baseline's, and burn-in's); None: as many as a
    # semi-supervised step, so that both arms see as many images a step (CALIBRATION.md: 1
    # labeled image a step alone starves the detector). Set it to ``labeled_per_step`` to
    # give the semi-supervised step the baseline's labeled images plus unlabeled ones.
    supervised_per_step: int | None = None
    eval_every: int = 4000
    ckpt_every: int = 4000
    log_every: int = 50
    seed: int = 0
    num_threads: int | None = None
    max_val_images: int | None = None
    pseudo_quality_images: int = 64
    # Ray's rolling checkpoints kept (the latest ones; a run's end-of-burn-in branch point is
    # kept apart): a checkpoint holds student, teacher and optimiser, 69-140 MiB at the CPU sizes
    keep_checkpoints: int = 2
    # rows of each stream the trial's own process makes while its Ray Data actors start
    # (a run's first step then waits for no actor; the rows are the ones an actor would
    # make); 0: every row from the actors
    stream_head_rows: int = 128
    # the most Ray Data actors each stream's pool grows to (it starts with one, and Ray Data
    # adds actors while their queue is long). One makes hundreds of rows/s at the CPU
    # presets' 128 px (which keep one) but 15-17 unlabeled rows/s (weak + strong view) and
    # 43-47 labeled at the paper's 400-1200 px (`benchmark.py stream --preset paper`, one
    # AMD EPYC core): a GPU at 80 images/s takes 64 unlabeled rows/s, four actors' worth,
    # so six leave room for slower cores and JPEG decoding
    data_actors: int = 6
    # a step whose loss or gradient is NaN or infinite is skipped (no update) and counted in
    # ``nonfinite_steps``; this many in a row stop the run with the reason
    max_nonfinite_in_a_row: int = 3
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
        _require_at_least(
            "train", self, ("max_steps", "labeled_per_step", "unlabeled_per_step"), 1,
            "a run needs at least one step, and at least one image of each kind a step",
        )
        if self.supervised_per_step is not None:
            _require_at_least(
                "train", self, ("supervised_per_step",), 1,
                "a supervised step needs an image (leave it unset for labeled + unlabeled)",
            )
        _require_at_least(
            "train", self, ("stream_head_rows",), 0,
            "0 makes every row on the Data actors",
        )
        _require_at_least(
            "train", self, ("data_actors",), 1, "a stream needs an actor to make its rows"
        )
        _require_at_least(
            "train", self, ("eval_every", "ckpt_every", "log_every"), 1,
            "it is a number of steps (give a large one to do it rarely)",
        )
        _require_at_least(
            "train", self, ("keep_checkpoints",), 1, "a run resumes from its latest checkpoint"
        )
        _require_at_least(
            "train", self, ("max_nonfinite_in_a_row",), 1,
            "it counts skipped steps in a row (1 stops at the first non-finite step)",
        )

    @property
    def images_per_step(self) -> int:
        return self.labeled_per_step + self.unlabeled_per_step

    @property
    def supervised_images(self) -> int:
        """Images of a supervised step."""
        if self.supervised_per_step is not None:
            return self.supervised_per_step
        return self.images_per_step


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
        """Labeled and unlabeled images at ``step``: a supervised step (the baseline, and a
        semi-supervised run's burn-in) takes ``train.supervised_images`` labeled images."""
        if self.method.uses_unlabeled and step >= self.method.burn_in_steps:
            return self.train.labeled_per_step, self.train.unlabeled_per_step
        return self.train.supervised_images, 0

    def rows_needed(self, start_step: int) -> tuple[int, int]:
        """Labeled and unlabeled rows the steps from ``start_step`` to ``max_steps`` take: a
        stream's work list is bounded by it, so no row is augmented for nobody."""
        labeled = unlabeled = 0
        for step in range(start_step, self.train.max_steps):
            n_labeled, n_unlabeled = self.step_batch_sizes(step)
            labeled += n_labeled
            unlabeled += n_unlabeled
        return labeled, unlabeled

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentConfig:
        kwargs = {}
        for name, value in data.items():
            if name not in SECTION_TYPES:
                raise KeyError(f"unknown config section {name!r}; known: {sorted(SECTION_TYPES)}")
            section_cls = SECTION_TYPES[name]
            kwargs[name] = section_cls(**{k: _tuple_if_list(v) for k, v in value.items()})
        return cls(**kwargs)

    def flat(self) -> dict[str, object]:
        """``section.field`` -> value, the form MLflow params take."""
        return {
            f"{section}.{key}": value
            for section, fields in self.to_dict().items()
            for key, value in fields.items()
        }


SECTION_TYPES = {
    "detector": DetectorConfig,
    "method": MethodConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "augment": AugmentConfig,
    "synthetic": SyntheticConfig,
}


def _tuple_if_list(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value
