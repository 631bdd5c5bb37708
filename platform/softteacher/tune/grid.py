"""The sweep's grid: its points (``TrialSpec``), the settings that make them, and how a
shared burn-in splits them into the supervised runs that go first and their branches.

``TrialSpec.apply`` is the one place a grid point becomes config fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from softteacher.config import ExperimentConfig
from softteacher.data.shards import BadImagePolicy
from softteacher.overrides import apply_overrides
from softteacher.presets import preset
from softteacher.run.spec import WorkerResources


@dataclass(frozen=True)
class TrialSpec:
    """One point of the grid."""

    ratio: float
    fold: int
    method: str
    cls_thr: float
    reg_thr: float
    indicator: str | None = None  # None: the preset's (BG-T)
    n_jitter: int | None = None  # None: the preset's
    seed: int | None = None  # None: the preset's
    # a shared burn-in checkpoint: where the trial starts, not which trial it is
    branch_from: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """The trial's identity in file, run and MLflow names: ``r10-f1-supervised-...``."""
        name = f"r{self.ratio:g}-f{self.fold}-{self.method}-cls{self.cls_thr:g}-reg{self.reg_thr:g}"
        return name + "".join(f"-{short}" for short, _ in self._set_fields())

    @property
    def kind(self) -> str:
        """Trials that take about as long: the method, and whether it branches off a burn-in
        (it then trains the semi-supervised phase only)."""
        return f"{self.method} (branch)" if self.branch_from else self.method

    @property
    def title(self) -> str:
        """The trial as the terminal shows it:
        ``10% fold 1 supervised cls_thr 0.7 reg_thr 0.02``."""
        title = (
            f"{self.ratio:g}% fold {self.fold} {self.method} "
            f"cls_thr {self.cls_thr:g} reg_thr {self.reg_thr:g}"
        )
        return title + "".join(f" {long}" for _, long in self._set_fields())

    def _set_fields(self) -> list[tuple[str, str]]:
        """The optional fields this trial sets, short and long: the rows of the indicator,
        n_jitter and seed sweeps differ only there."""
        fields = []
        if self.indicator is not None:
            fields.append((self.indicator, f"indicator {self.indicator}"))
        if self.n_jitter is not None:
            fields.append((f"nj{self.n_jitter}", f"n_jitter {self.n_jitter}"))
        if self.seed is not None:
            fields.append((f"s{self.seed}", f"seed {self.seed}"))
        return fields

    def apply(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """The paper's foreground threshold serves the classification and RPN pseudo boxes."""
        changes = {
            "method": self.method,
            "cls_thr": self.cls_thr,
            "rpn_thr": self.cls_thr,
            "reg_thr": self.reg_thr,
        }
        if self.indicator is not None:
            changes["indicator"] = self.indicator
        if self.n_jitter is not None:
            changes["n_jitter"] = self.n_jitter
        train = {"branch_from": self.branch_from} if self.branch_from else {}
        if self.seed is not None:
            train["seed"] = self.seed
        cfg = cfg.replace(method=changes)
        return cfg.replace(train=train) if train else cfg

    @property
    def label(self) -> str:
        """The method as the sweep table names it: a trial that sets its own indicator or
        jitter count gets them appended (``soft_teacher+iou``), so that the rows of an
        indicator or n_jitter ablation stay apart instead of counting as one setting's
        repeated fold."""
        label = self.method
        if self.indicator is not None:
            label += f"+{self.indicator}"
        if self.n_jitter is not None:
            label += f"+nj{self.n_jitter}"
        return label


@dataclass(frozen=True)
class EarlyStopping:
    """ASHA over a threshold sweep's semi-supervised trials, on the teacher mAP of each
    evaluation against the steps a trial has trained (Train V2 reports no
    ``training_iteration``): at ``grace_steps``, then every ``reduction_factor`` times
    more, trials below the top ``1 / reduction_factor`` of their rung are stopped."""

    grace_steps: int
    reduction_factor: int = 2

    def check(self, settings: SweepSettings) -> None:
        """ASHA ranks trials against each other: they must differ in thresholds only."""
        base = settings.base_config()
        if len(settings.ratios) != 1 or len(settings.folds) != 1:
            raise ValueError(
                "--scheduler asha ranks trials against each other, so they must share one "
                "ratio and one fold; pass a single --ratios and --folds value"
            )
        if settings.baseline and not settings.shared_burn_in:
            raise ValueError(
                "--scheduler asha would rank the supervised baseline against the "
                "semi-supervised trials; add --shared-burn-in (the baseline then runs first, "
                "unscheduled) or drop --baseline"
            )
        if self.grace_steps < 1 or self.reduction_factor < 2:
            raise ValueError("--grace-steps must be >= 1 and --reduction-factor >= 2")
        if base.train.eval_every > self.grace_steps:
            raise ValueError(
                f"train.eval_every ({base.train.eval_every}) is beyond --grace-steps "
                f"({self.grace_steps}): ASHA compares trials at their evaluations; set "
                "--set train.eval_every=N with N <= the grace steps"
            )


@dataclass(frozen=True)
class SweepSettings:
    """Everything the command line decides; its hash names the sweep (and so resumes it)."""

    preset: str = "cpu"
    ratios: tuple[float, ...] = (1.0, 5.0, 10.0)
    folds: tuple[int, ...] = (1, 2, 3, 4, 5)
    methods: tuple[str, ...] = ("soft_teacher_jitter",)
    # the thresholds to sweep (None: the preset's ``method.cls_thr`` / ``method.reg_thr``,
    # after ``overrides``); resolved on construction, so the library and the CLI agree
    cls_thrs: tuple[float, ...] | None = None
    reg_thrs: tuple[float, ...] | None = None
    # replicates: every trial once a seed (None: the preset's seed only)
    seeds: tuple[int, ...] | None = None
    baseline: bool = False
    # semi-supervised trials branch off their (ratio, fold)'s supervised trial at the end of
    # burn-in instead of repeating it, so both arms share one burn-in
    shared_burn_in: bool = False
    coco_root: str | None = None
    # relative to the working directory, as the CLI reads them; made absolute on construction
    # (Ray's storage and the trials' processes need absolute paths)
    results_dir: str = "experiments/results"
    data_dir: str = "data"
    on_bad_image: BadImagePolicy = "skip"  # a training image that does not decode
    resources: WorkerResources = field(default_factory=WorkerResources)
    max_steps: int | None = None
    ckpt_every: int | None = None
    overrides: tuple[str, ...] = ()  # ``section.field=value``, applied last (``--set``)
    experiment_name: str = "fold_sweep"
    sweep_name: str | None = None
    early_stopping: EarlyStopping | None = None  # None: every trial runs to the end

    def __post_init__(self) -> None:
        object.__setattr__(self, "results_dir", str(Path(self.results_dir).resolve()))
        object.__setattr__(self, "data_dir", str(Path(self.data_dir).resolve()))
        if self.cls_thrs is None or self.reg_thrs is None:
            method = apply_overrides(preset(self.preset), self.overrides).method
            if self.cls_thrs is None:
                object.__setattr__(self, "cls_thrs", (method.cls_thr,))
            if self.reg_thrs is None:
                object.__setattr__(self, "reg_thrs", (method.reg_thr,))

    def base_config(self) -> ExperimentConfig:
        cfg = preset(self.preset)
        train_changes = {}
        if self.max_steps is not None:
            train_changes["max_steps"] = self.max_steps
        if self.ckpt_every is not None:
            train_changes["ckpt_every"] = self.ckpt_every
        cfg = cfg.replace(train=train_changes) if train_changes else cfg
        return apply_overrides(cfg, self.overrides)

    def trial_specs(self) -> list[TrialSpec]:
        seeds = self.seeds or (None,)
        specs = [
            TrialSpec(r, f, m, cls, reg, seed=s)
            for r in self.ratios
            for f in self.folds
            for m in self.methods
            for cls in self.cls_thrs
            for reg in self.reg_thrs
            for s in seeds
        ]
        if self.baseline and "supervised" not in self.methods:
            # thresholds mean nothing to the baseline: one run per (ratio, fold, seed)
            default = self.base_config().method
            specs += [
                TrialSpec(r, f, "supervised", default.cls_thr, default.reg_thr, seed=s)
                for r in self.ratios
                for f in self.folds
                for s in seeds
            ]
        return specs

    @property
    def name(self) -> str:
        if self.sweep_name:
            return self.sweep_name
        # The resolved config is part of the identity: a preset changed in code starts a new
        # sweep instead of resuming one whose MLflow runs hold the old params.
        # on_bad_image is left out: it cannot change a finished trial (and names stay stable)
        identity = dataclasses.asdict(self)
        del identity["on_bad_image"]
        identity |= {
            "results_dir": None,
            "data_dir": None,
            "config": self.base_config().to_dict(),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.experiment_name}-{self.preset}-{digest}"

    def run_name(self, spec: TrialSpec) -> str:
        """The Ray Train run of a trial (unique to it: Ray Train resumes by name)."""
        return f"{self.name}-{spec.name}"

    @property
    def train_storage(self) -> Path:
        return Path(self.results_dir) / "ray" / "train"


def split_shared_burn_in(
    specs: list[TrialSpec], base: ExperimentConfig
) -> tuple[list[TrialSpec], list[TrialSpec]]:
    """The trials that run first (the supervised ones, and multi-stage, which does not
    branch) and the semi-supervised ones that branch off the supervised trial of their
    (ratio, fold, seed) at the end of burn-in; a (ratio, fold, seed) without a supervised
    trial gets one (the preset's thresholds), as ``--baseline`` would add."""
    if base.method.burn_in_steps <= 0 or base.method.burn_in_steps >= base.train.max_steps:
        raise ValueError(
            f"a shared burn-in needs 0 < method.burn_in_steps < train.max_steps (the preset "
            f"has {base.method.burn_in_steps} and {base.train.max_steps}); choose a preset "
            "with a burn-in or drop --shared-burn-in"
        )
    branches = [
        s for s in specs if s.method != "multi_stage" and s.apply(base).method.uses_unlabeled
    ]
    roots = [s for s in specs if s not in branches]
    supervised = {root_key(s) for s in roots if s.method == "supervised"}
    branch_keys = dict.fromkeys(root_key(s) for s in branches)  # ordered, unique
    roots += [
        TrialSpec(ratio, fold, "supervised", base.method.cls_thr, base.method.reg_thr, seed=seed)
        for ratio, fold, seed in branch_keys
        if (ratio, fold, seed) not in supervised
    ]
    return roots, branches


def root_key(spec: TrialSpec) -> tuple[float, int, int | None]:
    return spec.ratio, spec.fold, spec.seed


def added_roots(settings: SweepSettings, specs: list[TrialSpec], base: ExperimentConfig) -> int:
    """Supervised trials a shared burn-in adds to ``specs`` (for the progress count)."""
    if not settings.shared_burn_in:
        return 0
    roots, branches = split_shared_burn_in(specs, base)
    return len(roots) + len(branches) - len(specs)
