"""The fold sweep: ratio x fold x cls_thr x reg_thr (x method x seed) on Ray Tune.

Ray 2.60 runs Train V2, where ``Tuner(trainer)`` is gone: each Tune trial is a function
that starts its own run (``run.fit.run``) and forwards the Train reports to Tune
(``tune/relay.py``); ``tune/trial.py`` is that function. What crosses from this driver to
a trial is one frozen ``TrialJob`` (the grid point and its ``RunSpec``): the jobs travel
with the trainable (``tune.with_parameters``), a trial's config names its job. The sweep's
name is derived from its settings, so running the same command again resumes it: finished
trials are not rerun.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune

from softteacher.config import ExperimentConfig
from softteacher.data.ray_stream import DATA_ACTOR_CPUS
from softteacher.names import FINAL_METRICS, TRAINED_STEPS
from softteacher.run.spec import RunSpec, WorkerResources
from softteacher.track.mlflow_runs import (
    RunRef,
    find_child_run,
    finish_run,
    finish_running_children,
    log_json_artifact,
    resume_parent_run,
    run_status,
    set_tags,
    start_parent_run,
)
from softteacher.track.provenance import git_commit
from softteacher.track.stores import default_tracking_uri
from softteacher.track.tables import (
    TrialResult,
    format_table,
    log_tables_to_run,
    summarize,
    write_tables,
)
from softteacher.track.ui import ui_hint
from softteacher.train.checkpoint import branch_point_dir
from softteacher.tune.asha import asha_scheduler, is_ranked
from softteacher.tune.grid import (
    SweepSettings,
    TrialSpec,
    added_roots,
    root_key,
    split_shared_burn_in,
)
from softteacher.tune.prepared import PreparedFold, fold_key, prepare_folds
from softteacher.tune.progress import TrialEventPrinter
from softteacher.tune.trial import (
    TrialJob,
    rebuild_child_run,
    run_trial,
    write_parent,
)

TUNE_DRIVER_CPUS = 0.01  # the trial function only waits on its TorchTrainer
# the smallest Ray Data footprint of a trial: one actor in each of its two pools
DATA_CPUS_PER_TRIAL = 2 * DATA_ACTOR_CPUS


@dataclass(frozen=True)
class FinishedTrial:
    spec: TrialSpec
    metrics: dict[str, float]


@dataclass(frozen=True)
class StoppedTrial:
    """A trial the early-stopping scheduler ended, at ``trained_steps`` of its own."""

    spec: TrialSpec
    trained_steps: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class SweepResult:
    """The trials that finished, the names of those that failed, and those stopped early
    (which are neither: the scheduler judged them; they stay out of the means)."""

    finished: list[FinishedTrial]
    failed: list[str]
    stopped: list[StoppedTrial] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


# Ray Tune reads it when fit() starts
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep, after its MLflow runs were ended KILLED: what to tell the user."""

    def __init__(self, sweep_name: str, interrupted_trials: list[str]) -> None:
        trials = ", ".join(interrupted_trials) or "none"
        super().__init__(
            f"sweep {sweep_name} interrupted; its MLflow run and the trials it was training "
            f"({trials}) are KILLED, the finished ones kept. Rerun the same command to "
            "resume: finished trials are not trained again, interrupted ones go on from "
            "their latest checkpoint"
        )


@contextmanager
def exit_on_interrupt() -> Iterator[None]:
    """A sweep's Ctrl-C as its one message on stderr and exit 130 (the shell's code for
    SIGINT), never a traceback."""
    try:
        yield
    except SweepInterrupted as interrupted:
        print(f"\n{interrupted}", file=sys.stderr)
        raise SystemExit(130) from None


def run_sweep(settings: SweepSettings, specs: list[TrialSpec] | None = None) -> SweepResult:
    """Prepare the folds, run (or resume) the trials, and write the mean +- std table.

    ``specs`` defaults to the settings' grid; an ablation passes its own list (the sweep's
    name should then say which, through ``settings.sweep_name``). The sweep's MLflow run
    ends FINISHED only when every trial finished, FAILED otherwise, KILLED when interrupted.
    """
    results_dir = Path(settings.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    base = settings.base_config()
    prepared = prepare_folds(settings)
    tracking_uri = default_tracking_uri(results_dir)
    parent = resume_parent_run(tracking_uri, settings.experiment_name, settings.name)
    if parent is None:
        parent = start_parent_run(
            tracking_uri,
            settings.experiment_name,
            settings.name,
            params={"preset": settings.preset, "git_commit": git_commit()},
        )
    log_json_artifact(parent, "sweep_settings.json", dataclasses.asdict(settings))
    specs = specs if specs is not None else settings.trial_specs()
    print(f"sweep {settings.name}: {len(specs)} trials; MLflow {tracking_uri} run {parent.run_id}")
    print(ui_hint(tracking_uri, parent.experiment_id))
    printer = TrialEventPrinter(total=len(specs) + added_roots(settings, specs, base))
    # Ctrl-C raises out of tuner.fit(): Tune's own handler would instead end fit() as if the
    # sweep were done, its interrupted trials reading as stopped early or failed
    os.environ[TUNE_SIGINT_ENV] = "1"
    try:
        result = _run_trials(settings, specs, prepared, parent, base, printer)
    except KeyboardInterrupt:
        interrupted = finish_running_children(parent, "KILLED")
        finish_run(parent, "KILLED")
        raise SweepInterrupted(settings.name, interrupted) from None
    summaries = summarize(
        [table_row(t) for t in result.finished] + [stopped_row(t) for t in result.stopped]
    )
    print(format_table(summaries))
    paths = write_tables(summaries, results_dir, stem=f"{settings.name}_table")
    log_tables_to_run(parent, summaries, paths)
    for path in paths.values():
        print(f"wrote {path}")
    if result.stopped:
        print(
            f"{len(result.stopped)} trial(s) stopped early by ASHA (their MLflow runs are "
            "KILLED with a stopped_early tag, and the table counts them apart): "
            + ", ".join(f"{t.spec.name} at {t.trained_steps} steps" for t in result.stopped)
        )
    if result.failed:
        print(
            f"{len(result.failed)} trial(s) did not finish: {', '.join(result.failed)}; their "
            "cells are missing from the table (see each trial's [error] line above)"
        )
        finish_run(parent, "FAILED")
    else:
        finish_run(parent)
    return result


def _run_trials(
    settings: SweepSettings,
    specs: list[TrialSpec],
    prepared: dict[str, PreparedFold],
    parent: RunRef,
    base: ExperimentConfig,
    printer: TrialEventPrinter,
) -> SweepResult:
    """One Tune experiment over the sweep's trials. Under a shared burn-in the supervised
    roots come first in it and each semi-supervised branch after them, set to start from its
    root's end-of-burn-in checkpoint: a branch then takes the core a root leaves, and the
    last root does not train alone (15 of them, two at a time, left a core idle for a whole
    root when the branches waited for every root to finish)."""
    if not settings.shared_burn_in:
        jobs = [trial_job(settings, spec, prepared, parent) for spec in specs]
        return _run_grid(settings, jobs, parent, printer)
    roots, branches = split_shared_burn_in(specs, base)
    print(
        f"shared burn-in: {len(roots)} run(s) first, then {len(branches)} semi-supervised "
        f"run(s), each from its supervised run's step-{base.method.burn_in_steps} checkpoint "
        "once that is saved"
    )
    supervised = {root_key(s): s for s in roots if s.method == "supervised"}
    jobs = [trial_job(settings, spec, prepared, parent) for spec in roots]
    jobs += [
        _branch_job(settings, spec, supervised[root_key(spec)], prepared, parent)
        for spec in branches
    ]
    return _run_grid(settings, jobs, parent, printer)


def _branch_job(
    settings: SweepSettings,
    branch: TrialSpec,
    root: TrialSpec,
    prepared: dict[str, PreparedFold],
    parent: RunRef,
) -> TrialJob:
    """The branch's trial, set to start from its supervised trial's branch point."""
    root_run = settings.train_storage / settings.run_name(root)
    branched = dataclasses.replace(branch, branch_from=str(branch_point_dir(root_run)))
    return dataclasses.replace(trial_job(settings, branched, prepared, parent), root=root.name)


def _run_grid(
    settings: SweepSettings,
    jobs: list[TrialJob],
    parent: RunRef,
    printer: TrialEventPrinter,
) -> SweepResult:
    """One Tune experiment over ``jobs`` (resumed when the sweep's name ran before), under the
    settings' early stopping, which ranks a shared burn-in's branches only. A trial Ray
    holds as finished whose MLflow run under ``parent`` is missing or unfinished is logged
    again from Ray's result."""
    if not jobs:
        return SweepResult([], [])
    # A trial's config is its job's name, and the jobs travel with the trainable: Tune
    # keeps a restored trial's config as it was saved, and an object in it as a placeholder
    # that a trial started in a reused process would receive as is.
    by_name = {job.point.name: job for job in jobs}
    printer.plan(
        {name: job.point.title for name, job in by_name.items()},
        {name: job.point.kind for name, job in by_name.items()},
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, jobs=by_name), trial_resources(settings.resources)
    )
    storage = Path(settings.results_dir) / "ray"
    experiment_path = storage / settings.name
    write_parent(parent_file(settings), parent)
    if tune.Tuner.can_restore(str(experiment_path)):
        print(f"resuming sweep from {experiment_path}")
        tuner = tune.Tuner.restore(
            str(experiment_path), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search(list(by_name))},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent_trials(settings.resources),
                scheduler=asha_scheduler(settings, by_name),
                # the next trial in the finished one's process: no process start and no
                # second import of torch, torchvision and MLflow (10-18 s a trial)
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=settings.name,
                storage_path=str(storage),
                callbacks=[printer],
                verbose=0,
            ),
        )
    grid = tuner.fit()
    scheduled = settings.early_stopping is not None
    finished, failed, stopped = [], [], []
    for result in grid:
        job = by_name[result.config["job"]]
        metrics = result.metrics or {}
        final = {k: float(metrics[k]) for k in FINAL_METRICS if k in metrics}
        if result.error is None and "final" in metrics:
            finished.append(FinishedTrial(job.point, final))
            child = find_child_run(parent, job.point.name)
            if child is None or run_status(child) != "FINISHED":
                print(f"{job.point.name}: finished in Ray's results, not in MLflow; logged again")
                rebuild_child_run(job, final, str(result.path))
        elif (
            scheduled
            and is_ranked(job, settings)
            and result.error is None
            and (TRAINED_STEPS in metrics)
        ):
            # ended without an error and without its final report: the scheduler stopped it
            trial = StoppedTrial(job.point, int(metrics[TRAINED_STEPS]), final)
            mark_stopped(job, trial)
            stopped.append(trial)
        else:
            failed.append(job.point.name)
    return SweepResult(finished, failed, stopped)


def mark_stopped(job: TrialJob, trial: StoppedTrial) -> None:
    """The stopped trial's MLflow run: KILLED (it did not finish), tagged with why."""
    child = find_child_run(job.parent, trial.spec.name)
    if child is None:
        return
    set_tags(child, {"stopped_early": f"ASHA at {trial.trained_steps} trained steps"})
    finish_run(child, "KILLED")


def trial_job(
    settings: SweepSettings,
    point: TrialSpec,
    prepared: dict[str, PreparedFold],
    parent: RunRef,
) -> TrialJob:
    """The grid point as the trial will run it: the config it resolves to and its data."""
    fold = prepared[fold_key(point.ratio, point.fold)]
    cfg = point.apply(settings.base_config())
    spec = RunSpec(
        config=cfg,
        fold=fold.data,
        labeled=fold.labeled,
        unlabeled=fold.unlabeled if cfg.method.uses_unlabeled else None,
        name=settings.run_name(point),
        storage_path=str(settings.train_storage),
        resources=settings.resources,
    )
    return TrialJob(
        point,
        spec,
        parent,
        settings.preset,
        settings.data_dir,
        fold.splits,
        parent_file=str(parent_file(settings)),
    )


def parent_file(settings: SweepSettings) -> Path:
    """Where the driver names the sweep's MLflow parent run for the trials (beside Tune's
    experiment folder, which Tune must create itself)."""
    return Path(settings.results_dir) / "ray" / f"{settings.name}.mlflow_parent.json"


def trial_resources(resources: WorkerResources) -> dict[str, float]:
    """What a Tune trial holds itself: little when its run has a worker group of its own,
    the one worker's share when the run trains in the trial's process."""
    if not resources.in_process:
        return {"CPU": TUNE_DRIVER_CPUS}
    held = {"CPU": TUNE_DRIVER_CPUS + resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        held["GPU"] = resources.gpus_per_worker
    return held


def cpus_per_trial(resources: WorkerResources) -> float:
    """The CPUs one trial holds: its Tune process, its workers, its two data actors."""
    workers = resources.worker_count * resources.cpus_per_worker
    return TUNE_DRIVER_CPUS + workers + DATA_CPUS_PER_TRIAL


def max_concurrent_trials(resources: WorkerResources) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once, at least one."""
    total = ray.cluster_resources()
    limit = math.floor(total.get("CPU", 1.0) / cpus_per_trial(resources))
    if resources.gpus_per_worker > 0:
        per_trial_gpu = resources.worker_count * resources.gpus_per_worker
        limit = min(limit, math.floor(total.get("GPU", 0.0) / per_trial_gpu))
    return max(1, limit)


def table_row(trial: FinishedTrial) -> TrialResult:
    spec = trial.spec
    return TrialResult(
        spec.ratio, spec.fold, spec.label, spec.cls_thr, spec.reg_thr, trial.metrics, spec.seed
    )


def stopped_row(trial: StoppedTrial) -> TrialResult:
    spec = trial.spec
    return TrialResult(
        spec.ratio,
        spec.fold,
        spec.label,
        spec.cls_thr,
        spec.reg_thr,
        trial.metrics,
        spec.seed,
        stopped_at=trial.trained_steps,
    )
