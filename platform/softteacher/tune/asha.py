"""Early stopping of a threshold sweep: Ray Tune's ASHA on the teacher mAP of each
evaluation, against the steps a trial has trained (Train V2 reports no
``training_iteration``), ranking a shared burn-in's branches only."""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from softteacher.names import TEACHER_AP, TRAINED_STEPS
from softteacher.tune.grid import SweepSettings
from softteacher.tune.trial import TrialJob


def asha_scheduler(settings: SweepSettings, jobs: dict[str, TrialJob]) -> ASHAScheduler | None:
    """ASHA on the teacher mAP against the steps a trial trained, or None (FIFO)."""
    stopping = settings.early_stopping
    if stopping is None:
        return None
    base = settings.base_config()
    return SweepASHA(
        unranked={name for name, job in jobs.items() if not is_ranked(job, settings)},
        time_attr=TRAINED_STEPS,
        metric=TEACHER_AP,
        mode="max",
        max_t=base.train.max_steps,
        grace_period=stopping.grace_steps,
        reduction_factor=stopping.reduction_factor,
        stop_last_trials=False,  # a trial at its last evaluation goes on to its final report
    )


def is_ranked(job: TrialJob, settings: SweepSettings) -> bool:
    """Whether early stopping ranks the trial: under a shared burn-in the branches only,
    since their supervised roots, in the same experiment, are what they branch off."""
    return not settings.shared_burn_in or job.root is not None


class SweepASHA(ASHAScheduler):
    """ASHA that lets a shared burn-in's supervised roots run to their end unranked."""

    def __init__(self, *, unranked: set[str], **asha: object) -> None:
        super().__init__(**asha)
        self._unranked_jobs = unranked

    def _unranked(self, trial: Trial) -> bool:
        return trial.config["job"] in self._unranked_jobs

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if not self._unranked(trial):
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        if self._unranked(trial):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        if not self._unranked(trial):
            super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        if not self._unranked(trial):
            super().on_trial_remove(tune_controller, trial)
