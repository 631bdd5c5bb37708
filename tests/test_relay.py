"""Train reports reach the Tune trial through the relay, in order, and the sweep's ASHA
scheduler stops the trials that trail (a real Tune run on the loopback cluster; each
trial's "training" is a stand-in that reports as Ray Train's controller would)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import pytest
from ray import cloudpickle, tune

from softteacher.names import EVAL_STEP, TEACHER_AP, TRAINED_STEPS
from softteacher.tune.asha import asha_scheduler
from softteacher.tune.grid import EarlyStopping, SweepSettings
from softteacher.tune.relay import fit_reporting_to_tune

pytestmark = pytest.mark.ray
# the trial function below lives in this test file, which Ray's workers cannot import
cloudpickle.register_pickle_by_value(sys.modules[__name__])

EVAL_STEPS = (2, 4, 6, 8, 10, 12)  # the smoke preset runs 12 steps


@dataclass(frozen=True)
class _Job:
    """A stand-in for the sweep's TrialJob: how good the trial is, and the trial it
    branches off under a shared burn-in (None: a root, or no shared burn-in)."""

    quality: float
    root: str | None = None


def _trial(config: dict, jobs: dict[str, _Job], in_process: bool = False) -> None:
    quality = jobs[config["job"]].quality

    def stand_in_fit(callbacks: list) -> str:
        callbacks[0].after_report(None, [{"step": 1}], None)  # before any evaluation
        for step in EVAL_STEPS:
            report = {EVAL_STEP: step, TEACHER_AP: quality * step}
            callbacks[0].after_report(None, [report], None)  # as the Train controller does
            time.sleep(0.2)
        if quality < 0:
            raise ValueError("a run that fails")
        return "fitted"

    def from_first_evaluation(report: dict) -> dict | None:  # as the sweep's trials do
        if EVAL_STEP not in report:
            return None  # ASHA's Tune refuses a result without its metric
        return report | {TRAINED_STEPS: report[EVAL_STEP]}

    assert fit_reporting_to_tune(stand_in_fit, from_first_evaluation, in_process=in_process)
    tune.report({TEACHER_AP: quality * EVAL_STEPS[-1], "final": 1.0})  # as run_trial


def _tune(
    tmp_path, jobs: list[_Job], settings: SweepSettings | None = None, in_process: bool = False
) -> dict:
    """The grid over ``jobs`` as the sweep runs it (a trial's config names its job), under
    the settings' early stopping; each result by its job's quality."""
    by_name = {f"job-{i}": job for i, job in enumerate(jobs)}
    tuner = tune.Tuner(
        tune.with_parameters(_trial, jobs=by_name, in_process=in_process),
        param_space={"job": tune.grid_search(list(by_name))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=1,
            scheduler=asha_scheduler(settings, by_name) if settings else None,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    )
    return {by_name[result.config["job"]].quality: result for result in tuner.fit()}


@pytest.mark.parametrize("in_process", [False, True], ids=["actor relay", "in-process relay"])
def test_every_report_reaches_tune_in_order_and_errors_surface(ray_cluster, tmp_path, in_process):
    """Through the relay actor (a Ray Train run reports from its controller) and through
    the in-process relay (a ``--workers 0`` run reports from the trial's own process)."""
    by_quality = _tune(tmp_path, [_Job(1.0), _Job(-1.0)], in_process=in_process)
    good, bad = by_quality[1.0], by_quality[-1.0]
    history = good.metrics_dataframe
    assert list(history[EVAL_STEP].dropna().astype(int)) == list(EVAL_STEPS)
    assert good.metrics["final"] == 1.0
    assert bad.error is not None and "a run that fails" in str(bad.error)
    assert list(bad.metrics_dataframe[EVAL_STEP].astype(int)) == list(EVAL_STEPS)


def test_asha_stops_the_trials_that_trail_their_rung(ray_cluster, tmp_path):
    settings = SweepSettings(preset="smoke", early_stopping=EarlyStopping(grace_steps=2))
    # one trial at a time, best first: each later one trails the rung's record at step 2
    by_quality = _tune(tmp_path, [_Job(q) for q in (4.0, 3.0, 2.0, 1.0)], settings)
    assert by_quality[4.0].metrics.get("final") == 1.0
    for quality in (3.0, 2.0, 1.0):
        stopped = by_quality[quality]
        assert stopped.error is None and "final" not in stopped.metrics
        assert stopped.metrics[TRAINED_STEPS] == 2


def test_under_a_shared_burn_in_asha_ranks_the_branches_only(ray_cluster, tmp_path):
    """The supervised roots share the branches' Tune experiment: a root that trails every
    rung still trains to its end, while a branch that trails is stopped."""
    settings = SweepSettings(
        preset="smoke", early_stopping=EarlyStopping(grace_steps=2), shared_burn_in=True
    )
    jobs = [_Job(4.0, root="r-a"), _Job(1.0), _Job(3.0, root="r-b")]
    by_quality = _tune(tmp_path, jobs, settings)
    assert by_quality[4.0].metrics.get("final") == 1.0
    assert by_quality[1.0].metrics.get("final") == 1.0  # the root, unranked
    stopped = by_quality[3.0]
    assert stopped.error is None and "final" not in stopped.metrics
    assert stopped.metrics[TRAINED_STEPS] == 2
