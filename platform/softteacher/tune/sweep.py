"""The fold sweep: ratio x fold x fg_thr x var_thr (x method) on Ray Tune.

Ray 2.60 runs Train V2, where ``Tuner(trainer)`` is gone: each Tune trial is a function
that builds and fits its own ``TorchTrainer`` and forwards the Train reports to Tune with
``TuneReportCallback``. The sweep's name is derived from its settings, so running the same
command again resumes it: finished trials are not rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.train
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from softteacher.config import ExperimentConfig, preset
from softteacher.data.coco import load_coco
from softteacher.data.protocol import FoldData, coco_folds, synthetic_folds
from softteacher.data.ray_stream import (
    DATA_ACTOR_CPUS,
    labeled_dataset,
    unlabeled_dataset,
)
from softteacher.data.shards import ShardSet, write_shards
from softteacher.eval.coco_eval import METRIC_NAMES
from softteacher.track.mlflow_runs import (
    RunRef,
    default_tracking_uri,
    find_or_start_child_run,
    finish_run,
    git_commit,
    log_final_metrics,
    log_json_artifact,
    log_metrics,
    resume_parent_run,
    run_status,
    start_parent_run,
)
from softteacher.track.tables import (
    TrialResult,
    format_table,
    log_tables_to_run,
    summarize,
    write_tables,
)
from softteacher.train.checkpoint import checkpoint_at_step
from softteacher.train.multi_stage import PseudoLabelReport, label_fold_from_checkpoint
from softteacher.train.ray_worker import WorkerJob, WorkerResources, build_torch_trainer
from softteacher.tune.progress import TrialEventPrinter

PROJECT_ROOT = Path(__file__).resolve().parents[3]
TUNE_DRIVER_CPUS = 0.01  # the trial function only waits on its TorchTrainer
# the smallest Ray Data footprint of a trial: one actor in each of its two pools (the actors
# read their own row groups: there are no read tasks)
DATA_CPUS_PER_TRIAL = 2 * DATA_ACTOR_CPUS
FINAL_METRICS = tuple(
    f"{model}/{name}" for model in ("teacher", "student") for name in METRIC_NAMES
)


@dataclass(frozen=True)
class TrialSpec:
    """One point of the grid."""

    ratio: float
    fold: int
    method: str
    fg_thr: float
    var_thr: float
    indicator: str | None = None  # None: the preset's (BG-T)
    n_jitter: int | None = None  # None: the preset's
    # a shared burn-in checkpoint: where the trial starts, not which trial it is
    branch_from: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        name = f"r{self.ratio:g}-f{self.fold}-{self.method}-fg{self.fg_thr:g}-var{self.var_thr:g}"
        if self.indicator is not None:
            name += f"-{self.indicator}"
        if self.n_jitter is not None:
            name += f"-nj{self.n_jitter}"
        return name

    def apply(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """The paper's foreground threshold serves the classification and RPN pseudo boxes."""
        changes = {
            "method": self.method,
            "cls_thr": self.fg_thr,
            "rpn_thr": self.fg_thr,
            "reg_thr": self.var_thr,
        }
        if self.indicator is not None:
            changes["indicator"] = self.indicator
        if self.n_jitter is not None:
            changes["n_jitter"] = self.n_jitter
        cfg = cfg.replace(method=changes)
        return cfg.replace(train={"branch_from": self.branch_from}) if self.branch_from else cfg


@dataclass(frozen=True)
class SweepSettings:
    """Everything the command line decides; its hash names the sweep (and so resumes it)."""

    preset: str = "cpu"
    ratios: tuple[float, ...] = (1.0, 5.0, 10.0)
    folds: tuple[int, ...] = (1, 2, 3, 4, 5)
    methods: tuple[str, ...] = ("soft_teacher_jitter",)
    fg_thrs: tuple[float, ...] = (0.9,)
    var_thrs: tuple[float, ...] = (0.02,)
    baseline: bool = False
    # semi-supervised trials branch off their (ratio, fold)'s supervised trial at the end of
    # burn-in instead of repeating it, so both arms share one burn-in
    shared_burn_in: bool = False
    coco_root: str | None = None
    results_dir: str = str(PROJECT_ROOT / "experiments" / "results")
    data_dir: str = str(PROJECT_ROOT / "data")
    resources: WorkerResources = field(default_factory=WorkerResources)
    max_steps: int | None = None
    ckpt_every: int | None = None
    experiment_name: str = "fold_sweep"
    sweep_name: str | None = None

    def base_config(self) -> ExperimentConfig:
        cfg = preset(self.preset)
        train_changes = {}
        if self.max_steps is not None:
            train_changes["max_steps"] = self.max_steps
        if self.ckpt_every is not None:
            train_changes["ckpt_every"] = self.ckpt_every
        return cfg.replace(train=train_changes) if train_changes else cfg

    def trial_specs(self) -> list[TrialSpec]:
        specs = [
            TrialSpec(r, f, m, fg, var)
            for r in self.ratios
            for f in self.folds
            for m in self.methods
            for fg in self.fg_thrs
            for var in self.var_thrs
        ]
        if self.baseline and "supervised" not in self.methods:
            # thresholds mean nothing to the baseline: one run per (ratio, fold)
            default = self.base_config().method
            specs += [
                TrialSpec(r, f, "supervised", default.cls_thr, default.reg_thr)
                for r in self.ratios
                for f in self.folds
            ]
        return specs

    @property
    def name(self) -> str:
        if self.sweep_name:
            return self.sweep_name
        # The resolved config is part of the identity: a preset changed in code starts a new
        # sweep instead of resuming one whose MLflow runs hold the old params.
        identity = dataclasses.asdict(self) | {
            "results_dir": None,
            "data_dir": None,
            "config": self.base_config().to_dict(),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.experiment_name}-{self.preset}-{digest}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SweepSettings:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        fields["resources"] = WorkerResources(**data["resources"])
        return cls(**fields)


@dataclass(frozen=True)
class PreparedFold:
    """A fold's files and its Parquet shards, made once by the driver before any trial."""

    data: FoldData
    labeled: ShardSet
    unlabeled: ShardSet


@dataclass(frozen=True)
class FinishedTrial:
    spec: TrialSpec
    metrics: dict[str, float]


def run_sweep(settings: SweepSettings, specs: list[TrialSpec] | None = None) -> list[FinishedTrial]:
    """Prepare the folds, run (or resume) the trials, and write the mean +- std table.

    ``specs`` defaults to the settings' grid; an ablation passes its own list (the sweep's
    name should then say which, through ``settings.sweep_name``)."""
    results_dir = Path(settings.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    base = settings.base_config()
    prepared = prepare_folds(settings, base)
    tracking_uri = default_tracking_uri(results_dir)
    parent = resume_parent_run(tracking_uri, settings.experiment_name, settings.name)
    if parent is None:
        parent = start_parent_run(
            tracking_uri,
            settings.experiment_name,
            settings.name,
            params={"preset": settings.preset, "git_commit": git_commit(PROJECT_ROOT)},
        )
    log_json_artifact(parent, "sweep_settings.json", settings.to_dict())
    specs = specs if specs is not None else settings.trial_specs()
    print(f"sweep {settings.name}: {len(specs)} trials; MLflow {tracking_uri} run {parent.run_id}")

    shared = {
        "settings": settings.to_dict(),
        "parent": dataclasses.asdict(parent),
        "folds": {key: _prepared_to_dict(p) for key, p in prepared.items()},
    }
    if settings.shared_burn_in:
        roots, branches = split_shared_burn_in(specs, base)
        burn_in = base.method.burn_in_steps
        print(
            f"shared burn-in: {len(roots)} run(s) first, then {len(branches)} semi-supervised "
            f"run(s) branch off their supervised run's step-{burn_in} checkpoint"
        )
        finished, errors = _run_grid(settings, roots, shared, name=f"{settings.name}-roots")
        branched = [
            dataclasses.replace(spec, branch_from=str(path))
            for spec, path in _branch_points(settings, branches, roots, burn_in, finished)
        ]
        errors += len(branches) - len(branched)
        more, more_errors = _run_grid(settings, branched, shared, name=settings.name)
        finished, errors = finished + more, errors + more_errors
    else:
        finished, errors = _run_grid(settings, specs, shared, name=settings.name)
    summaries = summarize([_trial_result(t) for t in finished])
    print(format_table(summaries))
    paths = write_tables(summaries, results_dir, stem=f"{settings.name}_table")
    log_tables_to_run(parent, summaries, paths)
    for path in paths.values():
        print(f"wrote {path}")
    if errors:
        print(f"{errors} trial(s) failed; rerun the same command to retry them")
    else:
        finish_run(parent)
    return finished


def _run_grid(
    settings: SweepSettings, specs: list[TrialSpec], shared: dict, *, name: str
) -> tuple[list[FinishedTrial], int]:
    """One Tune experiment over ``specs`` (resumed when ``name`` ran before); returns the
    finished trials and how many failed."""
    if not specs:
        return [], 0
    trainable = tune.with_resources(run_trial, {"CPU": TUNE_DRIVER_CPUS})
    storage = Path(settings.results_dir) / "ray"
    experiment_path = storage / name
    if tune.Tuner.can_restore(str(experiment_path)):
        print(f"resuming sweep from {experiment_path}")
        tuner = tune.Tuner.restore(
            str(experiment_path), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={
                "trial": tune.grid_search([dataclasses.asdict(s) for s in specs]),
                **shared,
            },
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent_trials(settings.resources)
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                callbacks=[TrialEventPrinter()],
                verbose=0,
            ),
        )
    grid = tuner.fit()
    finished = [
        FinishedTrial(
            TrialSpec(**r.config["trial"]),
            {k: float(r.metrics[k]) for k in FINAL_METRICS if k in r.metrics},
        )
        for r in grid
        if r.error is None and r.metrics and "final" in r.metrics
    ]
    return finished, sum(r.error is not None for r in grid)


def split_shared_burn_in(
    specs: list[TrialSpec], base: ExperimentConfig
) -> tuple[list[TrialSpec], list[TrialSpec]]:
    """The trials that run first (the supervised ones, and multi-stage, which does not
    branch) and the semi-supervised ones that branch off the supervised trial of their
    (ratio, fold) at the end of burn-in; a (ratio, fold) without a supervised trial gets one
    (the preset's thresholds), as ``--baseline`` would add."""
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
    supervised = {(s.ratio, s.fold) for s in roots if s.method == "supervised"}
    branch_folds = dict.fromkeys((s.ratio, s.fold) for s in branches)  # ordered, unique
    roots += [
        TrialSpec(ratio, fold, "supervised", base.method.cls_thr, base.method.reg_thr)
        for ratio, fold in branch_folds
        if (ratio, fold) not in supervised
    ]
    return roots, branches


def _branch_points(
    settings: SweepSettings,
    branches: list[TrialSpec],
    roots: list[TrialSpec],
    burn_in: int,
    finished: list[FinishedTrial],
) -> list[tuple[TrialSpec, Path]]:
    """Each branch with its supervised trial's end-of-burn-in checkpoint; a branch whose
    supervised trial did not finish is left out (with a message) until a rerun."""
    done = {(t.spec.ratio, t.spec.fold) for t in finished if t.spec.method == "supervised"}
    supervised = {(s.ratio, s.fold): s for s in roots if s.method == "supervised"}
    points = []
    for spec in branches:
        key = (spec.ratio, spec.fold)
        if key not in done:
            print(f"{spec.name}: waits for its supervised trial, which did not finish")
            continue
        train_runs = Path(settings.results_dir) / "ray" / "train"
        run_dir = train_runs / _run_name(settings, supervised[key])
        points.append((spec, checkpoint_at_step(run_dir, burn_in)))
    return points


def _run_name(settings: SweepSettings, spec: TrialSpec) -> str:
    """The Ray Train run of a trial (unique to it: Ray Train resumes by name)."""
    return f"{settings.name}-{spec.name}"


def prepare_folds(settings: SweepSettings, base: ExperimentConfig) -> dict[str, PreparedFold]:
    """Fold files and their shards (both cached by content) for every (ratio, fold)."""
    data_dir = Path(settings.data_dir)
    if settings.coco_root:
        folds = coco_folds(
            Path(settings.coco_root), data_dir / "coco_folds", settings.ratios, settings.folds
        )
    else:
        folds = synthetic_folds(data_dir, base.synthetic, settings.ratios, settings.folds)
    prepared = {}
    for fold in folds:
        labeled, unlabeled, _ = fold.load()
        prepared[_fold_key(fold.percent, fold.fold)] = PreparedFold(
            fold,
            write_shards(labeled, data_dir / "shards"),
            write_shards(unlabeled, data_dir / "shards"),
        )
        print(
            f"fold {fold.fold}@{fold.percent:g}%: {len(labeled.records)} labeled, "
            f"{len(unlabeled.records)} unlabeled images"
        )
    return prepared


def max_concurrent_trials(resources: WorkerResources) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once, at least one."""
    total = ray.cluster_resources()
    per_trial_cpu = (
        TUNE_DRIVER_CPUS + resources.num_workers * resources.cpus_per_worker + DATA_CPUS_PER_TRIAL
    )
    limit = math.floor(total.get("CPU", 1.0) / per_trial_cpu)
    if resources.gpus_per_worker > 0:
        per_trial_gpu = resources.num_workers * resources.gpus_per_worker
        limit = min(limit, math.floor(total.get("GPU", 0.0) / per_trial_gpu))
    return max(1, limit)


def run_trial(config: dict) -> None:
    """One Tune trial: a child MLflow run and a fitted ``TorchTrainer`` (two for
    ``multi_stage``, with the offline pseudo-labeling between them)."""
    settings = SweepSettings.from_dict(config["settings"])
    spec = TrialSpec(**config["trial"])
    parent = RunRef(**config["parent"])
    prepared = _prepared_from_dict(config["folds"][_fold_key(spec.ratio, spec.fold)])
    cfg = spec.apply(settings.base_config())
    child = find_or_start_child_run(
        parent,
        spec.name,
        params=dataclasses.asdict(spec)
        | {
            "preset": settings.preset,
            "seed": cfg.train.seed,
            "git_commit": git_commit(PROJECT_ROOT),
        }
        | cfg.flat(),
    )
    if run_status(child) == "FINISHED":
        tune.report(_final_metrics_of(child) | {"final": 1.0})
        return
    log_json_artifact(child, "config.json", cfg.to_dict())
    run_name = _run_name(settings, spec)
    summary: dict = {"trial": dataclasses.asdict(spec)}
    if spec.method == "multi_stage":
        result, summary["multi_stage"] = _fit_multi_stage(
            settings, spec, cfg, prepared, child, run_name
        )
    else:
        result = _fit_run(
            settings,
            cfg,
            prepared.data,
            prepared.labeled,
            prepared.unlabeled if cfg.method.uses_unlabeled else None,
            run_name=run_name,
            tracking=child,
            callbacks=[TuneReportCallback()],
        )
    final = _final_metrics_of_result(result)
    log_final_metrics(child, final)
    summary["metrics"] = final
    if result.checkpoint is not None:
        summary["checkpoint"] = result.checkpoint.path
    log_json_artifact(child, "summary.json", summary)
    finish_run(child)
    tune.report(final | {"final": 1.0})


def _final_metrics_of(run: RunRef) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(run.tracking_uri).get_run(run.run_id).data.metrics
    return {name: logged[f"final/{name}"] for name in FINAL_METRICS if f"final/{name}" in logged}


def _trial_result(trial: FinishedTrial) -> TrialResult:
    spec = trial.spec
    return TrialResult(
        spec.ratio, spec.fold, _method_label(spec), spec.fg_thr, spec.var_thr, trial.metrics
    )


def _fold_key(ratio: float, fold: int) -> str:
    return f"{fold}@{ratio:g}"


def _prepared_to_dict(prepared: PreparedFold) -> dict:
    return {
        "data": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in dataclasses.asdict(prepared.data).items()
        },
        "labeled": _shards_to_dict(prepared.labeled),
        "unlabeled": _shards_to_dict(prepared.unlabeled),
    }


def _prepared_from_dict(data: dict) -> PreparedFold:
    fold = data["data"]
    return PreparedFold(
        FoldData(**{k: Path(v) if isinstance(v, str) else v for k, v in fold.items()}),
        _shards_from_dict(data["labeled"]),
        _shards_from_dict(data["unlabeled"]),
    )


def _shards_to_dict(shards: ShardSet) -> dict:
    return {
        "root": str(shards.root),
        "files": [str(f) for f in shards.files],
        "num_rows": shards.num_rows,
        "key": shards.key,
    }


def _shards_from_dict(data: dict) -> ShardSet:
    return ShardSet(
        root=Path(data["root"]),
        files=tuple(Path(f) for f in data["files"]),
        num_rows=data["num_rows"],
        key=data["key"],
    )


def _method_label(spec: TrialSpec) -> str:
    """The method as the sweep table names it: a trial that sets its own indicator or jitter
    count gets them appended (``soft_teacher+iou``, ``soft_teacher_jitter+nj5``), so that the
    rows of an indicator or n_jitter ablation stay apart instead of counting as one setting's
    repeated fold."""
    label = spec.method
    if spec.indicator is not None:
        label += f"+{spec.indicator}"
    if spec.n_jitter is not None:
        label += f"+nj{spec.n_jitter}"
    return label


def _fit_run(
    settings: SweepSettings,
    cfg: ExperimentConfig,
    fold: FoldData,
    labeled: ShardSet,
    unlabeled: ShardSet | None,
    *,
    run_name: str,
    tracking: RunRef | None,
    callbacks: list,
) -> ray.train.Result:
    """One ``TorchTrainer`` run on ``labeled`` (and ``unlabeled`` when given), evaluated on
    the fold's val set; ``run_name`` must be unique to the run (Ray Train resumes by name)."""
    job = WorkerJob(
        experiment=cfg,
        val_ann=str(fold.val_ann),
        val_images=str(fold.val_images),
        threads_per_worker=_threads_per_worker(settings.resources),
        tracking=tracking,
        unlabeled_ann=str(fold.unlabeled_ann),
        train_images=str(fold.train_images),
    )
    datasets = {"labeled": labeled_dataset(labeled, cfg.augment, seed=cfg.train.seed)}
    if unlabeled is not None:
        datasets["unlabeled"] = unlabeled_dataset(unlabeled, cfg.augment, seed=cfg.train.seed + 1)
    trainer = build_torch_trainer(
        job,
        settings.resources,
        datasets,
        run_name=run_name,
        storage_path=Path(settings.results_dir) / "ray" / "train",
        callbacks=callbacks,
    )
    return trainer.fit()


def _fit_multi_stage(
    settings: SweepSettings,
    spec: TrialSpec,
    cfg: ExperimentConfig,
    prepared: PreparedFold,
    child: RunRef,
    run_name: str,
) -> tuple[ray.train.Result, dict]:
    """Paper Table 5's multi-stage baseline (STAC-like): a supervised run on the labeled fold;
    its teacher pseudo-labels the unlabeled set once, offline, keeping boxes with score >
    ``spec.fg_thr`` (train/multi_stage.py); a second supervised run on labeled +
    pseudo-labeled images, whose metrics are the trial's.

    Each supervised run trains for the preset's ``max_steps``: the paper does not say how
    long its stages ran, and equal stages make the stage-2 run comparable to the supervised
    baseline. Only the second run logs step curves to the child run (two runs' curves under
    the same keys and steps would interleave); the first run's final metrics are logged as
    ``multi_stage/stage1/...`` and its Ray Train run keeps its own curves.
    """
    supervised = cfg.replace(method={"method": "supervised"})
    first = _fit_run(
        settings,
        supervised,
        prepared.data,
        prepared.labeled,
        None,
        run_name=run_name,
        tracking=None,
        callbacks=[],
    )
    if first.checkpoint is None:
        raise RuntimeError(
            f"stage 1 of multi-stage trial {spec.name} finished without a checkpoint; "
            f"check its Ray Train run {run_name} under {settings.results_dir}/ray/train"
        )
    first_metrics = _final_metrics_of_result(first)
    log_metrics(child, {f"multi_stage/stage1/{k}": v for k, v in first_metrics.items()}, step=0)
    out_file = Path(settings.data_dir) / "pseudo_labels" / f"{run_name}.json"
    report = _label_as_ray_task(
        settings.resources, supervised, prepared.data, first.checkpoint, spec.fg_thr, out_file
    )
    log_metrics(child, report.metrics(), step=0)
    print(
        f"{spec.name}: {report.boxes_kept} pseudo boxes on {report.images} unlabeled images "
        f"(score > {spec.fg_thr:g}) in {out_file}",
        flush=True,
    )
    merged = write_shards(
        load_coco(out_file, prepared.data.train_images), Path(settings.data_dir) / "shards"
    )
    second = _fit_run(
        settings,
        supervised,
        prepared.data,
        merged,
        None,
        run_name=f"{run_name}-stage2",
        tracking=child,
        callbacks=[TuneReportCallback()],
    )
    summary = {
        "pseudo_label_file": str(out_file),
        "pseudo_labels": report.to_dict(),
        "stage1_checkpoint": first.checkpoint.path,
        "stage1_metrics": first_metrics,
    }
    return second, summary


def _label_as_ray_task(
    resources: WorkerResources,
    cfg: ExperimentConfig,
    fold: FoldData,
    checkpoint: ray.train.Checkpoint,
    fg_thr: float,
    out_file: Path,
) -> PseudoLabelReport:
    """The offline pass as a Ray task holding one Train worker's CPUs (and GPU): the trial's
    own process reserves almost no CPU, and a GPU cluster should label on a GPU. The task
    leaves the trial's placement group (one 0.01-CPU bundle), which would otherwise capture it."""
    task = ray.remote(_label_task).options(
        num_cpus=resources.cpus_per_worker,
        num_gpus=resources.gpus_per_worker,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    return ray.get(
        task.remote(
            cfg.to_dict(), fold, checkpoint, fg_thr, str(out_file), _threads_per_worker(resources)
        )
    )


def _label_task(
    cfg: dict,
    fold: FoldData,
    checkpoint: ray.train.Checkpoint,
    fg_thr: float,
    out_file: str,
    threads: int,
) -> PseudoLabelReport:
    torch.set_num_threads(threads)
    with checkpoint.as_directory() as directory:
        return label_fold_from_checkpoint(
            ExperimentConfig.from_dict(cfg), fold, Path(directory), fg_thr, Path(out_file)
        )


def _threads_per_worker(resources: WorkerResources) -> int:
    return max(1, int(resources.cpus_per_worker))


def _final_metrics_of_result(result: ray.train.Result) -> dict[str, float]:
    return {k: float(v) for k, v in (result.metrics or {}).items() if k in FINAL_METRICS}
