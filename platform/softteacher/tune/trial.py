"""One Tune trial's life: its child MLflow run, its fit (two for multi-stage), its final
metrics, summary and logged teacher, and the run's status whatever happens."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from softteacher.eval.inference import export_teacher
from softteacher.files import write_atomically
from softteacher.names import (
    ALREADY_FINISHED,
    EVAL_STEP,
    FINAL_METRICS,
    FINAL_PREFIX,
    TRAINED_STEPS,
)
from softteacher.run.fit import RunResult, run
from softteacher.run.multi_stage import run_multi_stage
from softteacher.run.spec import RunSpec
from softteacher.track.datasets import DataSplit, log_data_inputs
from softteacher.track.mlflow_runs import (
    RunRef,
    ended_since,
    find_child_run,
    find_or_start_child_run,
    finish_run,
    log_final_metrics,
    log_json_artifact,
    run_status,
    set_tags,
    system_metrics,
)
from softteacher.track.models import log_logged_model
from softteacher.track.provenance import git_commit
from softteacher.train.checkpoint import has_branch_point
from softteacher.tune.grid import TrialSpec
from softteacher.tune.relay import fit_reporting_to_tune


@dataclass(frozen=True)
class TrialJob:
    """What a Tune trial receives: its grid point, its run, and the sweep's MLflow run."""

    point: TrialSpec
    spec: RunSpec
    parent: RunRef
    preset: str
    work_dir: str  # multi-stage's pseudo-label files and merged shards
    data_splits: tuple[DataSplit, ...] = ()  # logged to the trial's MLflow run
    # a shared burn-in's branch: the trial (grid point name) whose branch point it waits for
    root: str | None = None
    # where the sweep's driver writes the parent run of its latest command (``current_parent``)
    parent_file: str | None = None


class BranchPointError(RuntimeError):
    """A branch whose supervised trial ended without the checkpoint it branches off."""


def write_parent(path: Path, parent: RunRef) -> None:
    """Record the sweep's parent run for its trials, before they start or resume."""
    write_atomically(path, json.dumps(dataclasses.asdict(parent)) + "\n")


def current_parent(job: TrialJob) -> RunRef:
    """The parent run of the sweep command now running. Tune restores an unfinished trial
    with the job it was made with, whose parent may be in an MLflow store the new command
    no longer uses (a new ``MLFLOW_TRACKING_URI``, a deleted store); the driver's file
    names the parent it logs to now."""
    if job.parent_file is None or not Path(job.parent_file).is_file():
        return job.parent
    return RunRef(**json.loads(Path(job.parent_file).read_text()))


def trial_params(job: TrialJob) -> dict[str, object]:
    """The MLflow params of the trial's child run: its whole config under the config's own
    names (``method.cls_thr``, ``train.seed``, ...), plus what the config does not hold (the
    data's ratio and fold) and the short keys a runs table is filtered and grouped by."""
    cfg = job.spec.config
    return {
        "ratio": job.point.ratio,
        "fold": job.point.fold,
        "method": cfg.method.method,
        "seed": cfg.train.seed,
        "preset": job.preset,
        "git_commit": git_commit(),
    } | cfg.flat()


def rebuild_child_run(job: TrialJob, final: dict[str, float], ray_result: str) -> None:
    """A trial that Ray's storage holds as finished but whose MLflow run is missing or not
    FINISHED (a new or deleted MLflow store, a run that lost its ending): its child run
    made again from Ray's result, params and final metrics, tagged with where they came from
    (the step curves stay in the store that was lost)."""
    child = find_or_start_child_run(job.parent, job.point.name, params=trial_params(job))
    if run_status(child) == "FINISHED":
        return
    set_tags(child, {"rebuilt_from": ray_result})
    log_final_metrics(child, final)
    finish_run(child)


def run_trial(config: dict, jobs: dict[str, TrialJob]) -> None:
    """One Tune trial, the job ``config`` names: a child MLflow run and its run (two runs
    for ``multi_stage``, with the offline pseudo-labeling between them). A trial that raises
    ends its child run FAILED with the reason as a tag, so no MLflow run is left RUNNING by
    an error."""
    job = jobs[config["job"]]
    job = dataclasses.replace(job, parent=current_parent(job))
    point, spec = job.point, job.spec
    child = find_or_start_child_run(job.parent, point.name, params=trial_params(job))
    # the image lists this trial reads (a supervised run reads no unlabeled image)
    log_data_inputs(
        child, [s for s in job.data_splits if s.context != "unlabeled" or spec.unlabeled]
    )
    if run_status(child) == "FINISHED":
        tune.report(_final_metrics_of(child) | {"final": 1.0, ALREADY_FINISHED: 1.0})
        return
    spec = dataclasses.replace(spec, tracking=child)
    try:
        if job.root is not None:
            branch_from = Path(spec.config.train.branch_from)
            wait_for_branch_point(
                job.parent, job.root, branch_from.parent, spec.config.method.burn_in_steps
            )
        with system_metrics(child):
            final, summary = _fit_trial(job, spec)
    except BaseException as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        set_tags(child, {"error": f"{type(error).__name__}: {reason}"[:5000]})
        finish_run(child, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    summary["metrics"] = final.metrics
    if final.checkpoint is None:
        log_final_metrics(child, final.metrics)
    else:
        summary["checkpoint"] = final.checkpoint.path
        summary["model_id"] = log_final_teacher(child, job, spec, final)
    log_json_artifact(child, "summary.json", summary)
    finish_run(child)
    tune.report(final.metrics | {"final": 1.0})


def wait_for_branch_point(
    parent: RunRef, root: str, run_dir: Path, step: int, poll_s: float = 5.0
) -> None:
    """Wait until the supervised trial ``root`` (a child run of ``parent``, training in
    ``run_dir``) has saved its step-``step`` branch point; fail once its run ends without.

    A branch shares its Tune experiment with the supervised trials, so that no core idles
    while the last of them trains, and can therefore start before its own supervised trial
    has passed the burn-in. A run that ended before the wait began is a previous sweep's,
    which this one is training again, so it does not count."""
    waiting_since_ms = int(time.time() * 1000)
    while not has_branch_point(run_dir, step):
        root_run = find_child_run(parent, root)
        status = ended_since(root_run, waiting_since_ms) if root_run is not None else None
        if status is not None and not has_branch_point(run_dir, step):
            raise BranchPointError(
                f"branches off {root} at step {step}, whose run ended {status} without "
                f"that checkpoint (in {run_dir}); rerun the same command to train both"
            )
        time.sleep(poll_s)


def log_final_teacher(child: RunRef, job: TrialJob, spec: RunSpec, final: RunResult) -> str:
    """The trial's final teacher as a LoggedModel of its child run, with the final metrics
    linked to it and to the val set; returns the model id."""
    evaluation = [split for split in job.data_splits if split.context == "evaluation"]
    with (
        final.checkpoint.as_directory() as checkpoint_dir,
        tempfile.TemporaryDirectory(prefix="softteacher-teacher-") as tmp,
    ):
        folder = export_teacher(Path(checkpoint_dir), spec.config, Path(tmp))
        return log_logged_model(
            child,
            job.point.name,
            folder,
            final.metrics,
            trained_steps=spec.config.train.max_steps,
            evaluated_on=evaluation[0] if evaluation else None,
            params={"preset": job.preset, "method": job.point.method},
        )


def _fit_trial(job: TrialJob, spec: RunSpec) -> tuple[RunResult, dict]:
    log_json_artifact(spec.tracking, "config.json", spec.config.to_dict())
    summary: dict = {"trial": dataclasses.asdict(job.point)}
    # the early-stopping clock starts where the trial starts: at its branch point, if any
    origin = spec.config.method.burn_in_steps if spec.config.train.branch_from else 0

    def with_trained_steps(report: dict) -> dict | None:
        """Reports from the first evaluation on: Tune's scheduler refuses a result without
        its metric, and the terminal shows evaluations only."""
        if EVAL_STEP not in report:
            return None
        return report | {TRAINED_STEPS: report[EVAL_STEP] - origin}

    in_process = spec.resources.in_process
    if job.point.method == "multi_stage":
        result, summary["multi_stage"] = fit_reporting_to_tune(
            lambda callbacks: run_multi_stage(
                spec, job.point.cls_thr, Path(job.work_dir), callbacks
            ),
            with_trained_steps,
            in_process=in_process,
        )
    else:
        result = fit_reporting_to_tune(
            lambda callbacks: run(spec, callbacks), with_trained_steps, in_process=in_process
        )
    return result, summary


def _final_metrics_of(run_ref: RunRef) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(run_ref.tracking_uri).get_run(run_ref.run_id).data.metrics
    final = {name: FINAL_PREFIX + name for name in FINAL_METRICS}
    return {name: logged[key] for name, key in final.items() if key in logged}
